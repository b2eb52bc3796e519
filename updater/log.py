"""Structured event log: one JSON object per line, for Promtail and Loki.

Event names
-----------
An event name is ``<subject>.<what happened>``, lower case, words joined by ``_``; the subject
is a word of the glossary (``install``, ``download``, ``boot_check``, ``health``, ``slot``,
``config``, ``state``, ``update``, ``daemon``). Names are an interface: Loki queries and alerts
match them (``{job="fleet-updater"} | json | event="install.failed"``), so a name, once
shipped, never changes meaning. Examples:

==================================  ==================================================
``install.started``                 an install begins (source)
``install.verified``                the manifest is authentic and meant for this device
                                    (version, security_version, slot, signed_by)
``install.slot_marked``             the target slot is marked installing (slot)
``install.image_started``           an image starts streaming into a slot (slot_class, path)
``install.progress``                bytes written so far (bytes, total)
``install.finished``                every image written and verified (slot, version, bytes)
``install.trial_armed``             the target slot is armed for one trial boot (slot)
``install.rebooting``               the reboot into the trial (command)
``install.failed``                  the install stopped; the target slot is bad (slot, error)
``install.abandoned``               given up on purpose (the server withdrew the release); the
                                    target slot is bad (slot, error)
``boot_check.started``              the boot check began (slot, trial, situation)
``boot_check.committed``            a trial slot passed its health checks and is primary
``boot_check.confirmed``            a committed slot passed; its attempts are reset
``boot_check.rolled_back``          a trial slot failed; marked bad, rebooting into the old
``boot_check.retrying``             a committed slot failed; rebooting to try again
``boot_check.gave_up``              a committed slot failed too often; marked bad
``boot_check.reported``             safe mode: nothing to commit, reported
``boot_check.fell_back``            the firmware fell back from a trial (slot, running)
``boot_check.trial_never_started``  a one-shot trial never reached user space (tryboot)
``boot_check.trial_died``           a one-shot trial reached user space, then died (tryboot)
``boot_check.trial_rearmed``        a one-shot trial is armed again (tryboot)
``boot_check.install_interrupted``  an install never reached its trial (slot)
``health.check_failed``             one health check failed (check, detail)
``slot.marked_good``, ``slot.marked_bad``, ``rollback.armed``, ``update.resumed``
                                    operator commands
``updater.crash_loop``              too many starts in a short time: updates suspended
``config.fallback``                 the configuration file was unusable (source, problem)
``state.damaged``                   the state file was unreadable and set aside (detail)
``recovery.started``, ``recovery.verified``, ``recovery.finished``, ``recovery.rebooting``,
``recovery.failed``, ``recovery.abandoned``, ``recovery.boot_state_repaired``
                                    safe mode: a release put back into a root slot
``device.provisioned``              the factory release recorded (``fleet-updater provision``)
``state.save_failed``, ``metrics.write_failed``
                                    a write on the data partition failed (error)
==================================  ==================================================

The daemon (``updater/daemon.py``, ``updater/client.py``) adds: ``daemon.started``,
``daemon.stopped``, ``daemon.enrolled``, ``daemon.enroll_refused``, ``daemon.enrollment_lost``,
``daemon.decommissioned``, ``daemon.reinstated``, ``daemon.install``,
``daemon.install_skipped``, ``daemon.install_retry``,
``daemon.install_interrupted``, ``daemon.install_abandoned``,
``daemon.checkin_during_install_failed``, ``daemon.release_failed``, ``daemon.reboot_failed``,
``daemon.step_failed``, ``daemon.health_failed``, ``daemon.server_unreachable``,
``daemon.server_back``, ``daemon.events_rejected``, ``daemon.heartbeat_reduced``,
``daemon.start_not_counted``,
``daemon.no_server_keyring``; ``server.failover``, ``server.failback``,
``server.answer_rejected``, ``server.session_opened``; ``download.mirror``; ``outbox.damaged``,
``outbox.write_failed``; ``identity.regenerated``.

Field names are snake_case with the unit in the name (``duration_s``, ``bytes``); ``error``
holds an error message. Levels: ``debug``, ``info``, ``warning``, ``error``.

Line format: ``{"ts": ..., "level": ..., "event": ..., <labels>, <fields sorted by name>}``,
where ``ts`` is RFC 3339 UTC with milliseconds (``2024-05-01T12:00:00.123Z``). The clock is the
wall clock and may be years off on a device without a real-time clock: order events by their
position in the log, never by ``ts``.

Labels
------
The few values the log shipper (Alloy, Promtail) turns into Loki labels, the same on every line
of a process: ``component`` (``updater``), ``device`` (the device id) and ``role``, each only
when known (:func:`device_labels`). Nothing else may become a label: a label per event, slot or
version would multiply Loki's streams; those stay fields, found with ``| json``. A field named
like a label is always written with a leading ``_``, as ``ts`` is, so a field can never become
a label.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

LEVELS = ("debug", "info", "warning", "error")
RESERVED_KEYS = ("ts", "level", "event")
LABELS = ("component", "device", "role")
_NOT_FIELDS = frozenset((*RESERVED_KEYS, *LABELS))
MAX_DEPTH = 8  # deeper structures are written as text: a log line is not a data dump


class EventSink(Protocol):
    """Where the updater reports what it does: :class:`EventLog`, or a tee of it (the daemon's
    outbox), or a test's recorder."""

    def event(self, event: str, level: str = "info", **fields: Any) -> None: ...


class EventLog:
    """Writes events as JSON lines to ``stream`` (``sys.stdout`` when not given, looked up when
    the log is made, so a redirected stdout is honoured).

    ``labels`` (see the module docstring) are written on every line; a ``None`` or empty value
    is left out. :meth:`event` never raises: a logger must not kill the updater. A line that
    cannot be written (closed stream, broken pipe, full disk) is counted in :attr:`dropped` and
    lost.
    With ``keep=True`` every event is also kept, as a dict, in :attr:`events` (for tests; a
    daemon must not grow a list forever). Safe to use from several threads: lines never
    interleave.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.time,
        keep: bool = False,
        labels: Mapping[str, str | None] | None = None,
    ) -> None:
        self._stream = stream if stream is not None else sys.stdout
        unknown = set(labels or {}) - set(LABELS)
        if unknown:
            raise ValueError(f"not log labels: {', '.join(sorted(unknown))} (only {LABELS})")
        self._labels = {name: str(value) for name, value in (labels or {}).items() if value}
        self._clock = clock
        self._keep = keep
        self._kept: list[dict[str, Any]] = []
        self._dropped = 0
        self._lock = threading.Lock()

    @property
    def dropped(self) -> int:
        """How many events could not be written."""
        return self._dropped

    @property
    def events(self) -> list[dict[str, Any]]:
        """The events logged so far, as written (empty unless made with ``keep=True``)."""
        return list(self._kept)

    def event(self, event: str, level: str = "info", **fields: Any) -> None:
        """Log one event: see the module docstring for names, fields and the line format.

        Values that JSON cannot represent are written as their ``str()``; a field named ``ts``
        (or like a label) is written as ``_ts`` so the timestamp key is never overwritten.
        """
        with self._lock:
            try:
                record = self._record(event, level, fields)
                line = json.dumps(record, ensure_ascii=True, allow_nan=False)
            except Exception:  # a value whose str() raises: lose the line, keep the updater
                self._dropped += 1
                return
            if self._keep:
                self._kept.append(record)
            try:
                # ASCII only: the stream's encoding is whatever the service manager gave us
                self._stream.write(line + "\n")
                # flushed per line so that a crash right after an event still leaves it on disk
                self._stream.flush()
            except Exception:
                self._dropped += 1

    def _record(self, event: str, level: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {
            "ts": rfc3339_millis(self._clock()),
            "level": str(level),
            "event": str(event),
            **self._labels,
        }
        named = {(f"_{key}" if key in _NOT_FIELDS else key): value for key, value in fields.items()}
        for name in sorted(named):
            record[name] = _jsonable(named[name], MAX_DEPTH)
        return record


def rfc3339_millis(timestamp: float) -> str:
    """``timestamp`` (seconds since the epoch) as RFC 3339 UTC with milliseconds."""
    # integer milliseconds first: rounding a float could otherwise print ".1000"
    millis = math.floor(timestamp * 1000)
    moment = datetime.fromtimestamp(millis // 1000, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{millis % 1000:03d}Z"


def _jsonable(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        # NaN and infinities are not JSON; Loki would reject the whole line
        return value if math.isfinite(value) else str(value)
    if depth <= 0:
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): _jsonable(value[key], depth - 1) for key in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [_jsonable(item, depth - 1) for item in value]
    return str(value)


def device_labels(role: str | None, device_id: str | None = None) -> dict[str, str | None]:
    """The log labels of the updater on a device: ``component`` ``updater``, the device id
    and the configured role (each left out of the lines when None)."""
    return {"component": "updater", "device": device_id, "role": role}
