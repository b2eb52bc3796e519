"""Bandwidth controls on the device: the download rate limit (a token bucket every downloaded
byte passes), the maintenance windows' syntax and rules (fleet_core.windows, shared with the
server), their configuration, and what ``fleet-updater status`` says about them."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fleet_core.windows import (
    MAX_WINDOWS,
    Window,
    WindowError,
    first_reading,
    inside,
    longest_wait_s,
    next_open,
    next_open_all,
    parse_window,
    parse_windows,
)
from updater.bandwidth import (
    RateLimit,
    UpdateSchedule,
    from_config,
    parse_rate,
    system_time_zone,
    time_zone,
)
from updater.config import UpdaterConfig, parse_config
from updater.errors import ConfigError
from updater.fetch import HttpStream

# --- the rate limit ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds


@settings(max_examples=300, deadline=None)
@given(
    rate=st.integers(8 * 1024, 10**8),
    steps=st.lists(
        st.tuples(st.integers(0, 1 << 20), st.floats(0, 3, allow_nan=False)), max_size=40
    ),
)
def test_no_span_passes_more_than_the_rate_allows(
    rate: int, steps: list[tuple[int, float]]
) -> None:
    """Whatever the reads and the pauses between them: by any moment, at most one second's
    burst plus the rate times the time elapsed has passed; and a limit never waits longer
    than the bytes need (no read waits once the bucket covers it)."""
    clock = Clock()
    limit = RateLimit(rate, clock=clock, sleep=clock.sleep)
    start, passed = clock.now, 0
    for size, pause in steps:
        clock.now += pause
        limit.take(size)
        passed += size
        elapsed = clock.now - start
        assert passed <= rate * (elapsed + 1.0) + 1e-6 * passed + 1
        # nothing waited for beyond what the bytes needed: back-to-back reads are at the rate
        assert elapsed <= max(sum(p for _, p in steps), 0) + max(0.0, (passed - rate) / rate) + 1e-6


def test_back_to_back_reads_run_at_the_rate() -> None:
    clock = Clock()
    limit = RateLimit(100_000, clock=clock, sleep=clock.sleep)
    for _ in range(50):
        limit.take(64 * 1024)
    # 3,276,800 bytes: the first 100,000 from the full bucket, the rest at 100 kB/s
    assert clock.now - 100.0 == pytest.approx((50 * 64 * 1024 - 100_000) / 100_000)


def test_a_wait_cut_short_leaves_its_debt_to_the_next_take() -> None:
    clock = Clock()
    limit = RateLimit(10_000, clock=clock, sleep=lambda s: None)  # a stop: returns at once
    limit.take(30_000)  # 20,000 into debt
    clock.now += 1.0
    slept: list[float] = []
    limit._sleep = slept.append
    limit.take(1)
    assert slept == [pytest.approx(1.0001)]


def test_no_limit_never_waits() -> None:
    limit = RateLimit(None, clock=lambda: 0.0, sleep=lambda s: pytest.fail("waited"))
    limit.take(10**12)


def test_a_rate_is_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RateLimit(0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2MB/s", 2_000_000),
        ("2 MiB/s", 2 * 1024**2),
        ("512K/s", 512 * 1024),
        ("512KB / s", 512_000),
        ("1G/s", 1024**3),
        ("1gb/S", 1000**3),
        ("65536/s", 65536),
        ("8KiB/s", 8192),
    ],
)
def test_rates_are_read_as_sizes_per_second(text: str, expected: int) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2MB", "not a rate"),
        ("fast", "not a rate"),
        ("2.5MB/s", "not a rate"),
        ("-2MB/s", "not a rate"),
        ("0/s", "not a rate"),
        ("1K/s", "give 8KiB/s to 100GB/s"),
        ("1T/s", "give 8KiB/s to 100GB/s"),
        (2000000, "must be a rate"),
    ],
)
def test_a_rate_that_is_not_one_is_refused(text: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rate(text)


def test_the_rate_limit_comes_from_the_configuration() -> None:
    config = parse_config(BASE + b'[bandwidth]\nrate_limit = "4MB/s"\n', "t")
    assert config.rate_limit_bytes_per_s == 4_000_000
    assert from_config(config).bytes_per_s == 4_000_000
    assert from_config(UpdaterConfig()).bytes_per_s is None


class _Response:
    status_code = 200

    def __init__(self) -> None:
        self.headers = {"Content-Length": str(4 * 65536)}

    def iter_content(self, size: int) -> Any:
        return iter([b"x" * 65536] * 4)

    def close(self) -> None:
        pass


class _Session:
    def get(self, *args: Any, **kwargs: Any) -> _Response:
        return _Response()


def test_every_byte_an_http_stream_reads_passes_the_rate_limit() -> None:
    clock = Clock()
    limit = RateLimit(65536, clock=clock, sleep=clock.sleep)
    stream = HttpStream("http://127.0.0.1/blob", session=_Session(), rate=limit)  # type: ignore[arg-type]
    body = b""
    while chunk := stream.read(10_000):
        body += chunk
    assert len(body) == 4 * 65536
    assert clock.now - 100.0 == pytest.approx(3.0)  # a second's burst, then 64 KiB/s


def test_the_installer_gives_its_streams_the_configured_limit(tmp_path: Any) -> None:
    from updater.install import Installer

    config = parse_config(BASE + b'[bandwidth]\nrate_limit = "1MB/s"\n', "t")
    installer = Installer(config, lambda: None, None, None, None)  # type: ignore[arg-type, return-value]
    options = installer.http(0.0)
    assert options["rate"].bytes_per_s == 1_000_000
    plain = Installer(parse_config(BASE, "t"), lambda: None, None, None, None)  # type: ignore[arg-type, return-value]
    assert "rate" not in plain.http(0.0)


# --- the windows: syntax ---------------------------------------------------------------------

BASE = b'compatible = "x"\nkeyring = "/etc/fleet/keyring"\n'


@pytest.mark.parametrize(
    ("entry", "canonical", "days", "start", "end"),
    [
        ("02:00-05:00", "02:00-05:00", range(7), 120, 300),
        ("2:00 - 5:00", "02:00-05:00", range(7), 120, 300),
        ("Sat 00:00-24:00", "Sat 00:00-24:00", [5], 0, 1440),
        ("mon-fri 22:00-02:00", "Mon-Fri 22:00-02:00", range(5), 1320, 120),
        ("Fri-Mon 01:00-02:00", "Mon,Fri-Sun 01:00-02:00", [4, 5, 6, 0], 60, 120),
        ("Sat,Sun 22:00-00:00", "Sat,Sun 22:00-24:00", [5, 6], 1320, 1440),
        ("Mon-Sun 01:00-02:00", "01:00-02:00", range(7), 60, 120),
    ],
)
def test_windows_are_read_as_written(
    entry: str, canonical: str, days: Any, start: int, end: int
) -> None:
    window = parse_window(entry)
    assert (window.text, window.days, window.start, window.end) == (
        canonical, frozenset(days), start, end,
    )  # fmt: skip
    assert parse_window(window.text) == window  # the canonical text reads back the same


MALFORMED = [
    ("", "not [days] HH:MM-HH:MM"),
    ("02:00", "not [days] HH:MM-HH:MM"),
    ("02:00-", "not [days] HH:MM-HH:MM"),
    ("2-5", "not [days] HH:MM-HH:MM"),
    ("0200-0500", "not [days] HH:MM-HH:MM"),
    ("02:00-05:00 Sat", "not [days] HH:MM-HH:MM"),
    ("Sat02:00-05:00", "not [days] HH:MM-HH:MM"),
    ("Sta 02:00-05:00", "unknown day 'Sta'"),
    ("Mon- 02:00-05:00", "not a list of days"),
    ("Mon,,Tue 02:00-05:00", "not a list of days"),
    ("Saturday 02:00-05:00", "unknown day 'Saturday'"),
    ("24:00-02:00", "not a time of day (00:00 to 23:59)"),
    ("02:00-24:01", "not a time of day (00:00 to 24:00)"),
    ("25:00-26:00", "not a time of day"),
    ("02:60-03:00", "not a time of day"),
    ("02:00-02:00", "starts and ends at the same time"),
    ("00:00-00:00", "starts and ends at the same time"),
    ("02:00-05:00\nSat 01:00-02:00", "not [days] HH:MM-HH:MM"),
    ("\u0660\u0662:\u0660\u0660-\u0660\u0665:\u0660\u0660", "not [days] HH:MM-HH:MM"),  # not \d
    ("x" * 65, "longer than 64 characters"),
]


@pytest.mark.parametrize(("entry", "message"), MALFORMED)
def test_a_malformed_window_is_refused_naming_it(entry: str, message: str) -> None:
    with pytest.raises(WindowError, match=re.escape(message)) as caught:
        parse_window(entry)
    assert repr(entry[:64]) in str(caught.value)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_any_text_is_a_window_or_a_clear_refusal(text: str) -> None:
    try:
        window = parse_window(text)
    except WindowError as err:
        assert str(err).startswith("window ") and "\n" not in str(err)
    else:
        assert parse_window(window.text) == window


def test_a_list_of_windows_names_the_entry_at_fault() -> None:
    with pytest.raises(WindowError, match=r"^windows\[1\]: window 'Sta 01:00-02:00': unknown"):
        parse_windows(["02:00-05:00", "Sta 01:00-02:00"])
    with pytest.raises(WindowError, match="at most 16"):
        parse_windows(["02:00-05:00"] * (MAX_WINDOWS + 1))
    with pytest.raises(WindowError, match="must be a list"):
        parse_windows("02:00-05:00")
    with pytest.raises(WindowError, match=r"windows\[0\]: window 5: must be a string"):
        parse_windows([5])
    assert parse_windows(["02:00-05:00", "2:00-5:00"]) == (parse_window("02:00-05:00"),)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b'[updates]\nwindows = ["02:00-05:00", "Sta 01:00-02:00"]\n',
         "updates.windows[1]: window 'Sta 01:00-02:00': unknown day"),
        (b'[updates]\nwindows = "02:00-05:00"\n', "updates.windows: must be a list"),
        (b'[updates]\ntime_zone = "Mars/Olympus"\n', "updates.time_zone: unknown time zone"),
        (b'[updates]\ntime_zone = "../../etc/passwd"\n', "updates.time_zone: unknown time zone"),
        (b"[updates]\ntime_zone = 1\n", "updates.time_zone: must be str"),
        (b"[updates]\nwindow = []\n", "did you mean windows"),
        (b'[bandwidth]\nrate_limit = "2MB"\n', "bandwidth.rate_limit: '2MB' is not a rate"),
        (b'[bandwidth]\nrate = "2MB/s"\n', "bandwidth: unknown setting rate"),
    ],
)  # fmt: skip
def test_a_bad_bandwidth_setting_is_named(document: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(BASE + document, "t")


def test_the_windows_come_from_the_configuration() -> None:
    config = parse_config(
        BASE + b'[updates]\nwindows = ["02:00-05:00", "Sat 00:00-24:00"]\n'
        b'time_zone = "Europe/Berlin"\n',
        "t",
    )
    assert [w.text for w in config.update_windows] == ["02:00-05:00", "Sat 00:00-24:00"]
    assert str(time_zone(config.time_zone)) == "Europe/Berlin"


def test_the_system_time_zone(tmp_path: Any) -> None:
    assert str(system_time_zone({"TZ": "America/New_York"})) == "America/New_York"
    assert str(system_time_zone({"TZ": ":Asia/Tokyo"})) == "Asia/Tokyo"
    link = tmp_path / "localtime"
    link.symlink_to("/usr/share/zoneinfo/Europe/Berlin")
    assert str(system_time_zone({}, link)) == "Europe/Berlin"
    assert system_time_zone({"TZ": "Nowhere/Else"}, tmp_path / "missing") is UTC


# --- the windows: rules ----------------------------------------------------------------------

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Santiago"]
windows_strategy = st.lists(
    st.builds(
        Window,
        days=st.frozensets(st.integers(0, 6), min_size=1),
        start=st.integers(0, 1439),
        end=st.integers(1, 1440),
    ).filter(lambda w: w.start != w.end),
    min_size=1,
    max_size=4,
)
instants = st.datetimes(
    min_value=datetime(2024, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC)
)


def wall_clock_inside(windows: list[Window], now: datetime, tz: Any) -> bool:
    """The oracle, away from clock changes: what the device's clock reads is in a window."""
    local = now.astimezone(tz)
    minute = local.hour * 60 + local.minute
    day = local.weekday()
    for w in windows:
        if w.end > w.start and day in w.days and w.start <= minute < w.end:
            return True
        if w.end < w.start:
            if day in w.days and minute >= w.start:
                return True
            if (day - 1) % 7 in w.days and minute < w.end:
                return True
    return False


def near_a_clock_change(now: datetime, tz: Any) -> bool:
    offsets = {(now + timedelta(hours=h)).astimezone(tz).utcoffset() for h in range(-27, 28)}
    return len(offsets) > 1


@settings(max_examples=400, deadline=None)
@given(windows=windows_strategy, now=instants, zone=st.sampled_from(ZONES))
def test_inside_is_what_the_local_clock_reads(
    windows: list[Window], now: datetime, zone: str
) -> None:
    tz = ZoneInfo(zone)
    assume(not near_a_clock_change(now, tz))
    assert inside(windows, now, tz) == wall_clock_inside(windows, now, tz)


@settings(max_examples=300, deadline=None)
@given(windows=windows_strategy, now=instants, zone=st.sampled_from(ZONES))
def test_next_open_is_the_first_instant_inside(
    windows: list[Window], now: datetime, zone: str
) -> None:
    tz = ZoneInfo(zone)
    opens = next_open(windows, now, tz)
    assert opens is not None and opens >= now
    assert inside(windows, opens, tz)
    assert opens - now <= timedelta(days=8)
    # nothing in between is inside (sampled every 10 minutes, and just before it)
    probe = now
    while probe < opens - timedelta(seconds=1):
        assert not inside(windows, probe, tz)
        probe += timedelta(minutes=10)
    if opens > now:
        assert not inside(windows, opens - timedelta(seconds=1), tz)


# The clock changes of 2026: Berlin goes forward on 29 March at 02:00 (to 03:00) and back on 25
# October at 03:00 (to 02:00); New York forward on 8 March at 02:00, back on 1 November at 02:00.
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_a_window_that_crosses_midnight_belongs_to_the_day_it_opens() -> None:
    windows = parse_windows(["Fri 22:00-02:00"])
    assert inside(windows, utc(2026, 6, 5, 23), UTC)  # Friday night
    assert inside(windows, utc(2026, 6, 6, 1, 59), UTC)  # Saturday morning
    assert not inside(windows, utc(2026, 6, 6, 2), UTC)
    assert not inside(windows, utc(2026, 6, 5, 1), UTC)  # Friday morning: Thursday's, none
    assert next_open(windows, utc(2026, 6, 6, 2), UTC) == utc(2026, 6, 12, 22)


def test_a_window_whose_start_the_clocks_skip_opens_when_they_land() -> None:
    windows = parse_windows(["02:30-04:00"])
    # 29 March 2026, Berlin: 02:00 CET becomes 03:00 CEST (01:00 UTC)
    assert first_reading(date(2026, 3, 29), 150, BERLIN) == utc(2026, 3, 29, 1)
    assert next_open(windows, utc(2026, 3, 28, 12), BERLIN) == utc(2026, 3, 29, 1)
    assert inside(windows, utc(2026, 3, 29, 1, 30), BERLIN)  # 03:30 CEST
    assert not inside(windows, utc(2026, 3, 29, 2), BERLIN)  # 04:00 CEST
    # a window wholly in the skipped hour does not open that night
    gone = parse_windows(["02:10-02:50"])
    assert next_open(gone, utc(2026, 3, 28, 12), BERLIN) == utc(2026, 3, 30, 0, 10)


def test_an_hour_read_twice_is_in_the_window_once() -> None:
    windows = parse_windows(["02:15-02:45"])
    # 25 October 2026, Berlin: 03:00 CEST becomes 02:00 CET; 02:15 is read at 00:15 and 01:15 UTC
    assert inside(windows, utc(2026, 10, 25, 0, 20), BERLIN)
    assert not inside(windows, utc(2026, 10, 25, 1, 20), BERLIN)
    assert next_open(windows, utc(2026, 10, 25, 0, 50), BERLIN) == utc(2026, 10, 26, 1, 15)
    # a window across the change lasts its wall-clock length plus the hour read twice
    night = parse_windows(["01:00-04:00"])
    assert inside(night, utc(2026, 10, 25, 2, 30), BERLIN)  # 03:30 CET
    assert not inside(night, utc(2026, 10, 25, 3), BERLIN)


@settings(max_examples=200, deadline=None)
@given(
    windows=windows_strategy,
    now=st.sampled_from([utc(2026, 3, 7, 12), utc(2026, 3, 28, 12), utc(2026, 10, 24, 12),
                         utc(2026, 10, 31, 12)]),
    zone=st.sampled_from([BERLIN, NEW_YORK, ZoneInfo("Australia/Lord_Howe")]),
    step_min=st.integers(1, 59),
)  # fmt: skip
def test_across_clock_changes_every_opening_is_an_interval_whose_edges_are_its_times(
    windows: list[Window], now: datetime, zone: Any, step_min: int
) -> None:
    """Around clock changes the rule still holds: next_open is inside and nothing before it
    is; each opening starts where the clock first reads (at least) its start."""
    opens = next_open(windows, now, zone)
    assert opens is not None and inside(windows, opens, zone)
    probe = now
    while probe < opens:
        assert not inside(windows, probe, zone)
        probe += timedelta(minutes=step_min)
    if opens > now:
        local = opens.astimezone(zone)
        before = (opens - timedelta(seconds=1)).astimezone(zone)
        starts = {w.start for w in windows}
        minute = local.hour * 60 + local.minute
        assert minute in starts or before.utcoffset() != local.utcoffset()


def test_no_windows_is_any_time() -> None:
    now = utc(2026, 1, 1)
    assert inside((), now, UTC) and next_open((), now, UTC) == now


def test_a_rollouts_windows_narrow_the_devices() -> None:
    device = UpdateSchedule(parse_windows(["02:00-05:00"]), BERLIN)
    both = device.narrowed(["Sun 04:30-06:00"])
    now = utc(2026, 3, 28, 12)  # Saturday
    assert both.next_open(now) == utc(2026, 3, 29, 2, 30)  # Sunday 04:30 CEST
    assert not both.inside(utc(2026, 3, 29, 1, 30))  # 03:30: the device's, not the rollout's
    assert both.inside(utc(2026, 3, 29, 2, 45))
    never = device.narrowed(["10:00-11:00"])
    assert never.next_open(now) is None
    assert never.describe(now)["next_open"] is None and not never.describe(now)["inside"]
    with pytest.raises(WindowError, match=r"rollout windows\[0\]"):
        device.narrowed(["weekdays 02:00-05:00"])


@settings(max_examples=200, deadline=None)
@given(a=windows_strategy, b=windows_strategy, now=instants)
def test_next_open_all_is_inside_both_and_nothing_before_it_is(
    a: list[Window], b: list[Window], now: datetime
) -> None:
    opens = next_open_all([(a, BERLIN), (b, BERLIN)], now)
    if opens is None:
        return
    assert inside(a, opens, BERLIN) and inside(b, opens, BERLIN)
    probe = now
    while probe < opens:
        assert not (inside(a, probe, BERLIN) and inside(b, probe, BERLIN))
        probe += timedelta(minutes=7)


def test_the_longest_wait_for_a_window() -> None:
    # 21 h, and an hour more across a clock change in the devices' zones
    assert longest_wait_s(parse_windows(["02:00-05:00"])) == 22 * 3600
    # a window a spring-forward night swallows: the next one is a week later
    assert longest_wait_s(parse_windows(["Sun 02:00-03:00"])) == 2 * 7 * 86400 - 2 * 3600
    assert longest_wait_s(parse_windows(["Sat 00:00-24:00"])) == 6 * 86400 + 3600
    assert longest_wait_s(parse_windows(["Sat,Sun 00:00-24:00"])) == 5 * 86400
    assert longest_wait_s(parse_windows(["22:00-02:00", "01:00-23:00"])) == 0
    assert longest_wait_s(()) == 0


# --- fleet-updater status -----------------------------------------------------------------------


def test_status_shows_the_rate_limit_and_the_windows() -> None:
    from updater.cli.status import _windows_text, bandwidth_status

    config = parse_config(
        BASE + b'[bandwidth]\nrate_limit = "2MB/s"\n'
        b'[updates]\nwindows = ["02:00-05:00"]\ntime_zone = "UTC"\n',
        "t",
    )
    outside = bandwidth_status(config, lambda: utc(2026, 6, 1, 12).timestamp())
    assert outside == {
        "bandwidth": {"rate_limit_bytes_per_s": 2_000_000},
        "updates": {
            "windows": ["02:00-05:00"], "time_zone": "UTC", "inside": False,
            "next_open": "2026-06-02T02:00:00+00:00",
        },
    }  # fmt: skip
    assert _windows_text(outside["updates"]) == (
        "02:00-05:00 (UTC): outside, next opens 2026-06-02T02:00:00+00:00"
    )
    inside_now = bandwidth_status(config, lambda: utc(2026, 6, 1, 3).timestamp())
    assert inside_now["updates"]["inside"]
    assert _windows_text(inside_now["updates"]) == "02:00-05:00 (UTC): inside one now"
    anytime = bandwidth_status(parse_config(BASE, "t"))
    assert anytime["updates"]["inside"] and anytime["bandwidth"]["rate_limit_bytes_per_s"] is None
    assert _windows_text(anytime["updates"]) == "any time (no windows configured)"


def test_a_clock_gone_wild_is_outside_every_window_and_never_raises() -> None:
    """A device clock near year 1 or 9999 cannot be placed in a calendar: it waits (no
    window opens ahead) instead of failing every check-in."""
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    from fleet_core.windows import inside, next_open, next_open_all

    windows = parse_windows(["02:00-05:00"])
    berlin = ZoneInfo("Europe/Berlin")
    for now in (datetime(1, 1, 1, 3, tzinfo=UTC), datetime(9999, 12, 31, 3, tzinfo=UTC)):
        assert inside(windows, now, berlin) is False
        assert next_open(windows, now, berlin) is None
        assert next_open_all([(windows, berlin)], now) is None
        assert inside((), now, berlin) is True  # no windows: any time, whatever the clock
