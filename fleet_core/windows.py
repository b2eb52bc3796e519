"""Maintenance windows: when a device may start an install, in its local time.

One syntax for the device's ``[updates] windows`` and a rollout's ``--window``, read here so
the updater and the server (which never imports the updater) accept the same entries:

    ``02:00-05:00``            every day from 02:00 to 05:00
    ``22:30-01:30``            every day from 22:30 to 01:30 the next morning (crosses midnight)
    ``Sat 00:00-24:00``        all of Saturday
    ``Mon-Fri 01:00-04:00``    weekdays; a range may wrap (``Fri-Mon``)
    ``Sat,Sun 00:00-06:00``    a list of days and ranges

Days are ``Mon`` … ``Sun`` (any case), times ``HH:MM`` from ``00:00`` to ``23:59``, and
``24:00`` as an end. A window's days are the days it *opens*: ``Fri 22:00-02:00`` runs from
Friday 22:00 to Saturday 02:00. A start equal to its end is refused (``00:00-24:00`` is the
whole day).

What a window means in real time (the rule every function here follows): a window opens at
the first instant the device's clock reads its start on one of its days, and closes at the
first instant after that the clock reads its end. So on the night the clocks go forward
through a window's start (02:30 in a 02:00-03:00 gap), it opens when they land (03:00); on the
night they go back, an hour read twice is in the window once, the first time. Each opening is
one interval; a schedule is inside when any of its intervals holds the instant. No windows at
all means any time.

Pure: no clock is read, every function takes the instant it judges (an aware ``datetime``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo

from fleet_core.errors import FleetError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_WINDOWS = 16
MAX_ENTRY = 64  # characters of one entry; a longer one is refused before it is parsed
# How far ahead an opening is looked for: a week of days, the day before (a window that
# opened yesterday may still be open) and slack for a window a clock change swallowed.
HORIZON_DAYS = 15
MAX_INTERSECTION_STEPS = 4 * HORIZON_DAYS * MAX_WINDOWS

_ENTRY = re.compile(
    r"(?:(?P<days>[A-Za-z][A-Za-z,\- ]*?)\s+)?"
    r"(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})",
    re.ASCII,
)
_TIME = re.compile(r"(\d{2}):(\d{2})", re.ASCII)


class WindowError(FleetError):
    """A window entry that cannot be read; the message names the entry and what is wrong."""


@dataclass(frozen=True)
class Window:
    """One maintenance window: the days it opens on (0 = Monday), its start and end in
    minutes of the day (``end`` may be 1440, and below ``start`` when it crosses midnight)."""

    days: frozenset[int]
    start: int
    end: int

    @property
    def text(self) -> str:
        """The canonical entry: ``Mon-Fri 02:00-05:00``, ``22:00-01:00`` (every day)."""
        span = f"{_clock_text(self.start)}-{_clock_text(self.end)}"
        return span if len(self.days) == 7 else f"{_days_text(self.days)} {span}"

    def opening(self, day: date, tz: tzinfo) -> tuple[datetime, datetime] | None:
        """The window's opening on local date ``day`` as a UTC interval [open, close), or None
        when it does not open that day (not one of its days, or a clock change swallowed it)."""
        if day.weekday() not in self.days:
            return None
        opens = first_reading(day, self.start, tz)
        end_day = day if self.end > self.start else day + timedelta(days=1)
        closes = first_reading(end_day, self.end, tz)
        return (opens, closes) if opens < closes else None


def parse_window(entry: object) -> Window:
    """Read one entry (see the module docstring).

    Raises:
        WindowError: ``window 'Sta 02:00-05:00': unknown day 'Sta' (Mon, Tue, …, Sun)``.
    """
    if not isinstance(entry, str):
        raise WindowError(f"window {entry!r:.40}: must be a string like 'Sat 02:00-05:00'")
    shown = repr(entry) if len(entry) <= MAX_ENTRY else repr(entry[:MAX_ENTRY]) + "…"
    if len(entry) > MAX_ENTRY:
        raise WindowError(f"window {shown}: longer than {MAX_ENTRY} characters")
    match = _ENTRY.fullmatch(entry.strip())
    if match is None:
        raise WindowError(
            f"window {shown}: not [days] HH:MM-HH:MM (e.g. '02:00-05:00', 'Sat 00:00-24:00', "
            "'Mon-Fri 22:00-02:00')"
        )
    try:
        days = _parse_days(match["days"]) if match["days"] else frozenset(range(7))
        start = _parse_clock(match["start"], end=False)
        end = _parse_clock(match["end"], end=True)
    except ValueError as err:
        raise WindowError(f"window {shown}: {err}") from None
    if start == end:
        raise WindowError(
            f"window {shown}: starts and ends at the same time (the whole day is 00:00-24:00)"
        )
    if end == 0:
        end = 24 * 60  # "22:00-00:00" ends at midnight, as "22:00-24:00"
    return Window(days, start, end)


def parse_windows(entries: object, *, where: str = "windows") -> tuple[Window, ...]:
    """Read a list of entries; duplicates (by their canonical text) count once.

    Raises:
        WindowError: not a list of strings, more than ``MAX_WINDOWS``, or an entry that
            cannot be read (named, prefixed with ``where``).
    """
    if not isinstance(entries, list | tuple):
        raise WindowError(f"{where}: must be a list of windows like 'Sat 02:00-05:00'")
    if len(entries) > MAX_WINDOWS:
        raise WindowError(f"{where}: at most {MAX_WINDOWS} windows, not {len(entries)}")
    found: dict[str, Window] = {}
    for index, entry in enumerate(entries):
        try:
            window = parse_window(entry)
        except WindowError as err:
            raise WindowError(f"{where}[{index}]: {err}") from None
        found.setdefault(window.text, window)
    return tuple(found.values())


def first_reading(day: date, minute: int, tz: tzinfo) -> datetime:
    """The first instant (UTC) at which a clock in ``tz`` reads local date ``day``, minute
    ``minute`` (1440: midnight ending the day) or later.

    An ordinary time is its one instant; a time read twice (clocks going back) its first
    reading; a time the clocks skip (clocks going forward) the instant they land past it."""
    day = day + timedelta(days=minute // 1440)
    local = datetime.combine(day, time(minute % 1440 // 60, minute % 60), tzinfo=tz)
    naive = local.replace(tzinfo=None)
    readings = [
        instant
        for instant in (local.replace(fold=fold).astimezone(UTC) for fold in (0, 1))
        if _reads(instant, tz) == naive
    ]
    if readings:
        return min(readings)  # read twice (clocks going back): the first reading
    # skipped: the clocks jump over it between the instants the offsets before and after the
    # change give; the landing is the first second whose reading is past it (bisection:
    # clock changes happen on whole seconds)
    low, high = sorted(int(local.replace(fold=fold).astimezone(UTC).timestamp()) for fold in (0, 1))
    while high - low > 1:
        middle = (low + high) // 2
        if _reads(datetime.fromtimestamp(middle, UTC), tz) >= naive:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


def _reads(instant: datetime, tz: tzinfo) -> datetime:
    """What a clock in ``tz`` reads at ``instant``, as a naive local time."""
    return instant.astimezone(tz).replace(tzinfo=None)


def _reckonable(now: datetime) -> bool:
    """Whether the calendar around ``now`` can be worked out: a clock near year 1 or 9999 (a
    device's clock gone wild) is outside every window and no window opens after it."""
    margin = timedelta(days=HORIZON_DAYS + 7)
    return (
        datetime.min.replace(tzinfo=UTC) + margin < now < datetime.max.replace(tzinfo=UTC) - margin
    )


def inside(windows: Sequence[Window], now: datetime, tz: tzinfo) -> bool:
    """Whether ``now`` (aware) lies in one of ``windows`` in time zone ``tz``; with no
    windows, always."""
    if not windows:
        return True
    if not _reckonable(now):
        return False
    today = now.astimezone(tz).date()
    return any(
        opens <= now < closes
        for opens, closes in _openings(windows, today - timedelta(days=2), 3, tz)
    )


def next_open(windows: Sequence[Window], now: datetime, tz: tzinfo) -> datetime | None:
    """``now`` when inside, else the first instant after ``now`` at which one of ``windows``
    opens (UTC); None only when none opens within ``HORIZON_DAYS`` (a window on no day can
    not be written, so this means a clock change swallowed every opening)."""
    if inside(windows, now, tz):
        return now
    if not _reckonable(now):
        return None
    today = now.astimezone(tz).date()
    later = [
        opens
        for opens, _ in _openings(windows, today - timedelta(days=1), HORIZON_DAYS, tz)
        if opens > now
    ]
    return min(later, default=None)


def next_open_all(
    schedules: Sequence[tuple[Sequence[Window], tzinfo]], now: datetime
) -> datetime | None:
    """The first instant from ``now`` inside every one of ``schedules`` (each windows and
    their time zone): ``now`` when inside all; None when they do not meet within
    ``HORIZON_DAYS`` (a device's 02:00-03:00 and a rollout's 10:00-11:00 never do)."""
    if not _reckonable(now):
        return now if all(not windows for windows, _ in schedules) else None
    limit = now + timedelta(days=HORIZON_DAYS)
    candidate = now
    for _ in range(MAX_INTERSECTION_STEPS):
        moved = False
        for windows, tz in schedules:
            opened = next_open(windows, candidate, tz)
            if opened is None or opened > limit:
                return None
            if opened != candidate:
                candidate, moved = opened, True
        if not moved:
            return candidate
    return None


def _openings(
    windows: Iterable[Window], first: date, days: int, tz: tzinfo
) -> Iterator[tuple[datetime, datetime]]:
    for offset in range(days + 1):
        day = first + timedelta(days=offset)
        for window in windows:
            interval = window.opening(day, tz)
            if interval is not None:
                yield interval


def _parse_clock(text: str, *, end: bool) -> int:
    match = _TIME.fullmatch(text.zfill(5))
    if match is None:
        raise ValueError(f"{text!r} is not HH:MM")
    hours, minutes = int(match[1]), int(match[2])
    if minutes > 59 or hours > 24 or (hours == 24 and (minutes or not end)):
        limit = "24:00" if end else "23:59"
        raise ValueError(f"{text!r} is not a time of day (00:00 to {limit})")
    return hours * 60 + minutes


def _parse_days(text: str) -> frozenset[int]:
    days: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not part or (dash and not last):
            raise ValueError(
                f"{text.strip()!r} is not a list of days (e.g. 'Mon-Fri' or 'Sat,Sun')"
            )
        start = _day(first)
        stop = _day(last) if dash else start
        span = (stop - start) % 7
        days.update((start + step) % 7 for step in range(span + 1))
    return frozenset(days)


def _day(name: str) -> int:
    try:
        return DAYS.index(name.lower())
    except ValueError:
        raise ValueError(f"unknown day {name!r} (Mon, Tue, Wed, Thu, Fri, Sat, Sun)") from None


def _clock_text(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _days_text(days: frozenset[int]) -> str:
    """Runs of consecutive days in week order: ``Mon-Fri``, ``Sat,Sun``, ``Mon,Wed-Fri``."""
    runs: list[list[int]] = []
    for day in sorted(days):
        if runs and runs[-1][-1] == day - 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    names = [d.capitalize() for d in DAYS]
    return ",".join(
        names[run[0]] if len(run) == 1 else
        f"{names[run[0]]},{names[run[1]]}" if len(run) == 2 else
        f"{names[run[0]]}-{names[run[-1]]}"
        for run in runs
    )  # fmt: skip


# Zones whose clocks change differently (forward and back, by an hour or by half of one, at
# other hours and in both hemispheres): a clock change can shift an opening, or swallow a
# window that lies in the hour it skips, and the next opening is then a period later.
CHANGING_ZONES = ("Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Santiago")


def longest_wait_s(windows: Sequence[Window]) -> int:
    """The longest a device may wait for one of ``windows`` to open (seconds; 0 with none),
    over a year, in UTC and in zones with clock changes (:data:`CHANGING_ZONES`): a window a
    clock change swallows makes the wait a whole period longer."""
    if not windows:
        return 0
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    zones: list[tzinfo] = [UTC]
    for name in CHANGING_ZONES:
        try:
            zones.append(ZoneInfo(name))
        except ZoneInfoNotFoundError:  # no time zone data: UTC and the margin must do
            continue
    longest = 0.0
    for zone in zones:
        spans = sorted(_openings(windows, date(2024, 1, 1), 380, zone))
        reach = spans[0][1]
        for opens, closes in spans[1:]:
            if opens > reach:
                longest = max(longest, (opens - reach).total_seconds())
            reach = max(reach, closes)
    return int(longest)
