"""The JSON event log: one line per event, stable keys, and never an exception."""

from __future__ import annotations

import io
import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from updater.log import EventLog, device_labels, rfc3339_millis

T0 = 1714564800.0  # 2024-05-01T12:00:00Z


def lines_of(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return text.splitlines()


def test_one_json_line_per_event() -> None:
    out = io.StringIO()
    log = EventLog(out, clock=lambda: T0 + 0.123)
    log.event("install.started", slot="b", version="1.2.0")
    log.event("install.failed", "error", slot="b", error="disk full\nsecond line")
    lines = lines_of(out)
    assert len(lines) == 2
    assert json.loads(lines[0]) == {
        "ts": "2024-05-01T12:00:00.123Z",
        "level": "info",
        "event": "install.started",
        "slot": "b",
        "version": "1.2.0",
    }
    assert json.loads(lines[1])["error"] == "disk full\nsecond line"


def test_keys_in_a_stable_order() -> None:
    out = io.StringIO()
    log = EventLog(out, clock=lambda: T0)
    log.event("install.progress", total_bytes=10, bytes=5, slot="a", attempt=1)
    keys = list(json.loads(out.getvalue()))
    assert keys == ["ts", "level", "event", "attempt", "bytes", "slot", "total_bytes"]


def test_timestamps_are_rfc3339_utc_milliseconds() -> None:
    assert rfc3339_millis(T0) == "2024-05-01T12:00:00.000Z"
    assert rfc3339_millis(T0 + 0.9999) == "2024-05-01T12:00:00.999Z"
    assert rfc3339_millis(T0 + 59.5) == "2024-05-01T12:00:59.500Z"
    assert rfc3339_millis(0.0) == "1970-01-01T00:00:00.000Z"


def test_values_json_cannot_hold_are_text() -> None:
    out = io.StringIO()
    log = EventLog(out, clock=lambda: T0)
    marker = object()
    log.event(
        "state.damaged",
        path=Path("/var/lib/fleet/state.json"),
        raw=b"\x00\x01",
        ratio=float("nan"),
        limit=float("inf"),
        thing=marker,
        nested={"z": 1, "a": {"deep": Path("/x")}, 3: (1, 2)},
    )
    record = json.loads(out.getvalue())
    assert record["path"] == "/var/lib/fleet/state.json"
    assert record["raw"] == "b'\\x00\\x01'"
    assert record["ratio"] == "nan"
    assert record["limit"] == "inf"
    assert record["thing"] == str(marker)
    assert record["nested"] == {"3": [1, 2], "a": {"deep": "/x"}, "z": 1}
    assert list(record["nested"]) == ["3", "a", "z"]


def test_lines_are_ascii() -> None:
    out = io.StringIO()
    EventLog(out, clock=lambda: T0).event("config.fallback", problem="température > 80 °C")
    assert out.getvalue().isascii()
    assert json.loads(out.getvalue())["problem"] == "température > 80 °C"


def test_a_field_named_ts_does_not_replace_the_timestamp() -> None:
    out = io.StringIO()
    EventLog(out, clock=lambda: T0).event("download.retry", ts="yesterday")
    record = json.loads(out.getvalue())
    assert record["ts"] == "2024-05-01T12:00:00.000Z"
    assert record["_ts"] == "yesterday"


def test_deep_structures_are_cut_to_text() -> None:
    value: Any = "leaf"
    for _ in range(20):
        value = [value]
    out = io.StringIO()
    EventLog(out, clock=lambda: T0).event("x.y", deep=value)
    assert len(out.getvalue().splitlines()) == 1


class BrokenStream(io.StringIO):
    def __init__(self, error: Exception, on: str = "write") -> None:
        super().__init__()
        self.error = error
        self.on = on

    def write(self, text: str) -> int:
        if self.on == "write":
            raise self.error
        return super().write(text)

    def flush(self) -> None:
        if self.on == "flush":
            raise self.error


@pytest.mark.parametrize(
    "stream",
    [
        BrokenStream(BrokenPipeError(32, "Broken pipe")),
        BrokenStream(OSError(28, "No space left on device"), on="flush"),
        BrokenStream(UnicodeEncodeError("ascii", "é", 0, 1, "no")),
    ],
)
def test_a_broken_stream_never_raises(stream: io.StringIO) -> None:
    log = EventLog(stream, keep=True)
    log.event("install.started", slot="a")
    log.event("install.finished", slot="a")
    assert log.dropped == 2
    assert [e["event"] for e in log.events] == ["install.started", "install.finished"]


def test_a_closed_stream_never_raises() -> None:
    out = io.StringIO()
    out.close()
    log = EventLog(out)
    log.event("boot_check.committed", slot="b")
    assert log.dropped == 1


def test_a_value_whose_str_raises_drops_only_that_line() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    out = io.StringIO()
    log = EventLog(out, clock=lambda: T0)
    log.event("x.bad", value=Unprintable())
    log.event("x.good")
    assert log.dropped == 1
    assert [json.loads(line)["event"] for line in lines_of(out)] == ["x.good"]


def test_events_are_kept_only_when_asked() -> None:
    kept = EventLog(io.StringIO(), clock=lambda: T0, keep=True)
    kept.event("boot_check.committed", "info", slot="b")
    assert kept.events == [
        {"ts": "2024-05-01T12:00:00.000Z", "level": "info", "event": "boot_check.committed",
         "slot": "b"}
    ]  # fmt: skip
    plain = EventLog(io.StringIO())
    plain.event("boot_check.committed")
    assert plain.events == []


def test_default_stream_is_stdout_at_construction(capsys: pytest.CaptureFixture[str]) -> None:
    EventLog(clock=lambda: T0).event("daemon.started")
    assert json.loads(capsys.readouterr().out)["event"] == "daemon.started"
    assert sys.stdout is not None


def test_threads_never_interleave_lines() -> None:
    out = io.StringIO()
    log = EventLog(out)

    def work(worker: int) -> None:
        for index in range(200):
            log.event("install.progress", worker=worker, index=index, text="x" * 50)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = [json.loads(line) for line in lines_of(out)]
    assert len(records) == 1600
    assert log.dropped == 0


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=5) | st.integers(), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    event=st.text(),
    level=st.text(max_size=8),
    fields=st.dictionaries(
        st.text(min_size=1, max_size=10).filter(lambda k: k not in ("event", "level")),
        _values,
        max_size=5,
    ),
)
def test_any_event_is_one_parseable_line(event: str, level: str, fields: dict[str, Any]) -> None:
    out = io.StringIO()
    log = EventLog(out, clock=lambda: T0)
    log.event(event, level, **fields)
    assert log.dropped == 0
    lines = out.getvalue().split("\n")
    assert lines[1:] == [""]
    record = json.loads(lines[0])
    assert list(record)[:3] == ["ts", "level", "event"]
    assert list(record)[3:] == sorted(list(record)[3:])
    assert record["event"] == event


def test_labels_on_every_line_after_the_event() -> None:
    out = io.StringIO()
    log = EventLog(out, clock=lambda: T0, labels=device_labels("camera", "ab" * 32))
    log.event("daemon.started", role="a field", version="1.0.0")
    log.event("daemon.stopped")
    first, second = (json.loads(line) for line in lines_of(out))
    assert list(first)[:6] == ["ts", "level", "event", "component", "device", "role"]
    assert first["component"] == "updater" and first["role"] == "camera"
    assert first["device"] == "ab" * 32
    assert first["_role"] == "a field"  # a field cannot pose as a label
    assert second["device"] == "ab" * 32


def test_unknown_labels_are_left_out() -> None:
    out = io.StringIO()
    EventLog(out, clock=lambda: T0, labels=device_labels(None)).event("x.y", device="field")
    line = json.loads(lines_of(out)[0])
    assert line["component"] == "updater"
    assert "role" not in line
    assert "device" not in line  # no device label, and a field never poses as one
    assert line["_device"] == "field"


def test_only_the_three_labels_exist() -> None:
    with pytest.raises(ValueError, match="not log labels: version"):
        EventLog(io.StringIO(), labels={"version": "1.0.0"})
