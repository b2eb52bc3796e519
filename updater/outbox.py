"""The outbox: every event the updater logs, kept on the data partition until the release
server acknowledges it (``<data_dir>/outbox.jsonl``, rewritten whole through
:func:`fleet_core.durable.atomic_write`: a power cut leaves the old file or the new one).

:class:`OutboxLog` tees an event log into it; the daemon sends what waits, oldest first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet_core.durable import atomic_write
from fleet_core.text import printable
from updater.log import EventSink

OUTBOX_NAME = "outbox.jsonl"
OUTBOX_FORMAT = 1
MAX_OUTBOX_EVENTS = 1000  # at ~300 bytes each, a few hundred KiB of the data partition at most
MAX_SEQ = 2**63 - 1  # the protocol's range of seq
MAX_EVENT_BYTES = 8 * 1024


# Events about talking to the server are kept locally only: queueing them while the server
# is unreachable would fill the outbox with news of its own outage.
LOCAL_ONLY_EVENTS = frozenset({"daemon.server_unreachable", "daemon.events_rejected"})


@dataclass(frozen=True)
class OutboxEvent:
    """One event waiting to be acknowledged; ``to_wire`` is its protocol form."""

    seq: int
    event: str
    fields: Mapping[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {"event": self.event, "seq": self.seq, "fields": dict(self.fields)}


@dataclass(frozen=True)
class _OutboxContent:
    next_seq: int
    dropped: int
    events: tuple[OutboxEvent, ...]


class Outbox:
    """Events waiting for the server, in ``<data_dir>/outbox.jsonl``.

    File: a header line ``{"format": 1, "next_seq": N, "dropped": D}``, then one event per line
    (``{"seq", "event", "fields"}``), oldest first. ``seq`` is the device's event counter and
    only grows (the header keeps it when the outbox is empty): the server stores an event only
    if its ``seq`` is above the highest it has stored for the device, so an event can be sent
    again after a lost answer. At most ``limit`` events are kept; beyond that the oldest are
    dropped and counted in ``dropped`` (the server sees a gap in ``seq``). Several processes may
    use it: every change is made under an ``flock`` on ``outbox.jsonl.lock``.

    Because the server ignores numbers at or below its highest, a counter that went back would
    silence the device. So a *new* outbox (no file: first start, or the file was deleted to
    make room) numbers from the wall clock in milliseconds, above anything numbered before as
    long as the clock is not behind; and a damaged file is set aside as
    ``outbox.jsonl.damaged`` with numbering resumed above every number still legible in it.

    Power cut: every change rewrites the file whole through ``atomic_write``, so it holds the
    events before or after the change, never a torn line.
    """

    def __init__(
        self,
        path: Path,
        limit: int = MAX_OUTBOX_EVENTS,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.limit = limit
        self.problem: str | None = None  # what was wrong with the file, once
        self._wall_clock = wall_clock

    # --- reading and writing, under the lock ---

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _first_seq(self, *at_least: int) -> int:
        clock_ms = self._wall_clock() * 1000
        from_clock = int(clock_ms) if math.isfinite(clock_ms) else 0
        return min(MAX_SEQ, max(1, from_clock, *at_least))

    def _read(self) -> _OutboxContent:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return _OutboxContent(self._first_seq(), 0, ())
        try:
            return _parse_outbox(data)
        except (ValueError, TypeError, KeyError, IndexError) as err:
            legible = [int(n) + 1 for n in re.findall(rb'"seq": ?(\d{1,18})', data)]
            legible += [int(n) for n in re.findall(rb'"next_seq": ?(\d{1,18})', data)]
            atomic_write(self.path.with_name(self.path.name + ".damaged"), data)
            fresh = _OutboxContent(self._first_seq(*legible), 0, ())
            self._write(fresh)
            self.problem = (
                f"{self.path}: damaged ({err}); set aside, numbering from {fresh.next_seq}"
            )
            return fresh

    def _write(self, content: _OutboxContent) -> None:
        header = {"format": OUTBOX_FORMAT, "next_seq": content.next_seq, "dropped": content.dropped}
        lines = [json.dumps(header, sort_keys=True)]
        lines += [
            json.dumps({"seq": e.seq, "event": e.event, "fields": e.fields}, sort_keys=True)
            for e in content.events
        ]
        atomic_write(self.path, ("\n".join(lines) + "\n").encode())

    # --- the interface ---

    def append(self, event: str, fields: Mapping[str, Any]) -> int:
        """Keep one event (``fields`` JSON-ready); returns its ``seq``.

        Raises:
            OSError: the data partition cannot be written.
        """
        with self._locked():
            content = self._read()
            queued = (*content.events, OutboxEvent(content.next_seq, event, dict(fields)))
            over = max(0, len(queued) - self.limit)
            self._write(_OutboxContent(content.next_seq + 1, content.dropped + over, queued[over:]))
            return content.next_seq

    def pending(self, limit: int = 100) -> list[OutboxEvent]:
        """The oldest ``limit`` events not yet acknowledged."""
        with self._locked():
            return list(self._read().events[:limit])

    def ack(self, through_seq: int) -> None:
        """Forget every event up to ``through_seq``: the server has stored them."""
        with self._locked():
            content = self._read()
            kept = tuple(e for e in content.events if e.seq > through_seq)
            if len(kept) != len(content.events):
                self._write(dataclasses.replace(content, events=kept))

    def counts(self) -> tuple[int, int, int]:
        """(events waiting, next seq, events dropped because the outbox was full)."""
        with self._locked():
            content = self._read()
            return len(content.events), content.next_seq, content.dropped


def _parse_outbox(data: bytes) -> _OutboxContent:
    lines = data.decode("utf-8").splitlines()
    header = json.loads(lines[0])
    if not isinstance(header, dict) or header.get("format") != OUTBOX_FORMAT:
        raise ValueError("unknown format")
    next_seq, dropped = header["next_seq"], header.get("dropped", 0)
    if type(next_seq) is not int or next_seq < 1 or type(dropped) is not int or dropped < 0:
        raise ValueError("bad header")
    events: list[OutboxEvent] = []
    for line in lines[1:]:
        record = json.loads(line)
        seq, name, fields = record["seq"], record["event"], record["fields"]
        if type(seq) is not int or not 0 < seq < next_seq or not isinstance(name, str):
            raise ValueError(f"bad event line {line[:60]!r}")
        if not isinstance(fields, dict) or (events and seq <= events[-1].seq):
            raise ValueError(f"bad event line {line[:60]!r}")
        events.append(OutboxEvent(seq, name, fields))
    return _OutboxContent(next_seq, dropped, tuple(events))


class OutboxLog:
    """An event sink that logs to ``inner`` and keeps a copy of every event for the server in
    ``outbox`` (all but ``debug`` and :data:`LOCAL_ONLY_EVENTS`). Never raises: an event that
    cannot be kept is reported on ``inner`` as ``outbox.write_failed``."""

    def __init__(self, inner: EventSink, outbox: Outbox) -> None:
        self.inner = inner
        self.outbox = outbox

    def event(self, event: str, level: str = "info", **fields: Any) -> None:
        self.inner.event(event, level=level, **fields)
        if level == "debug" or event in LOCAL_ONLY_EVENTS:
            return
        try:
            self.outbox.append(event, _wire_fields(level, fields))
        except Exception as err:  # a logger must not kill the updater
            self.inner.event(
                "outbox.write_failed", level="warning", event_name=event, error=str(err)
            )


def _plain(value: Any, depth: int = 6) -> Any:
    """``value`` as JSON the server stores: finite numbers, inert text (see
    :mod:`fleet_core.text`: the server refuses control, format and separator characters, and
    the whole batch with them), bounded depth."""
    if isinstance(value, str):
        # lone surrogates (from undecodable file names) are not UTF-8: escape them first
        text = value.encode("utf-8", "backslashreplace").decode("utf-8")
        return printable(text.replace("\0", "\\0"))
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth > 0 and isinstance(value, Mapping):
        return {_plain(str(k)): _plain(v, depth - 1) for k, v in value.items()}
    if depth > 0 and isinstance(value, list | tuple):
        return [_plain(v, depth - 1) for v in value]
    return _plain(str(value))


def _wire_fields(level: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    plain: dict[str, Any] = {"level": level, **_plain(dict(fields))}
    if len(json.dumps(plain)) <= MAX_EVENT_BYTES:
        return plain
    text = json.dumps(plain, sort_keys=True)
    return {"level": level, "truncated": text[: MAX_EVENT_BYTES // 2]}
