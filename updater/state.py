"""The state store on the data partition: what each slot holds and how far an update got.

One versioned JSON file, ``<data_dir>/state.json``, always replaced whole through
:func:`fleet_core.durable.atomic_write`: a power cut leaves the previous state or the new one.
Every save increments ``save_count``; the boot check uses ``trial_boots`` per slot to break
reboot loops (a slot whose trial keeps coming back without a verdict is marked bad).

Slot statuses, in the order an install moves through them (RAUC's "unsafe until proven safe"):

``empty`` → ``installing`` (before the first byte is written) → ``installed`` (every byte
verified) → ``trial`` (armed for one trial boot) → ``good`` (committed) or ``bad``.

A damaged state file never stops the updater: :meth:`StateStore.load` keeps the damaged bytes
next to it for diagnosis and starts from an empty state, in which nothing is trusted that the
boot firmware does not confirm.

The anti-rollback floor (``installed_security_version``) is kept twice: in ``state.json`` and in
``<data_dir>/security-floor``, written first whenever the floor rises. A load takes the higher of
the two, so a deleted, damaged or hand-edited ``state.json`` never lowers the floor (only a
data partition wiped whole does: the device is then as it left the factory).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleet_core.durable import atomic_write
from fleet_core.locks import LockHeld, holding
from image_builder.manifest import MAX_SECURITY_VERSION
from updater.errors import LockedError, StateError

STATE_FORMAT = 1
STATE_NAME = "state.json"
FLOOR_NAME = "security-floor"
LOCK_NAME = "update.lock"
SLOT_STATUSES = ("empty", "installing", "installed", "trial", "good", "bad")
CRASH_LOOP_STARTS = 3
CRASH_LOOP_WINDOW_S = 300


def now_text() -> str:
    """Wall-clock time for humans. Never used for decisions: a Pi has no real-time clock."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class SlotState:
    """What one root slot holds, as far as the updater knows."""

    status: str = "empty"
    version: str | None = None
    bundle_sha256: str | None = None  # SHA-256 of the manifest bytes: names the release
    security_version: int | None = None
    updated_at: str | None = None
    trial_boots: int = 0  # boot checks that found this slot still on trial
    failures: int = 0  # consecutive boots of this (committed) slot that failed their checks

    @classmethod
    def from_dict(cls, document: Any, slot: str) -> SlotState:
        where = f"slot {slot}"
        if not isinstance(document, dict):
            raise StateError(f"{where}: must be an object")
        unknown = set(document) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise StateError(f"{where}: unknown field(s) {sorted(unknown)}")
        state = cls(**document)
        if state.status not in SLOT_STATUSES:
            raise StateError(f"{where}: unknown status {state.status!r}")
        for name, kind in (("version", str), ("bundle_sha256", str), ("updated_at", str)):
            value = getattr(state, name)
            if value is not None and not isinstance(value, kind):
                raise StateError(f"{where}: {name} must be a string")
        for name in ("security_version", "trial_boots", "failures"):
            value = getattr(state, name)
            if value is None and name == "security_version":
                continue  # unknown until an install names it; the counters always have a value
            if type(value) is not int or value < 0:
                raise StateError(f"{where}: {name} must be a non-negative integer")
        return state


@dataclass(frozen=True)
class DeviceState:
    """Everything the updater persists between runs and reboots."""

    slots: Mapping[str, SlotState] = field(
        default_factory=lambda: {"a": SlotState(), "b": SlotState()}
    )
    installed_security_version: int = 0  # highest security version ever committed
    save_count: int = 0
    restarts: tuple[tuple[str, float], ...] = ()  # (boot id, seconds since boot) of starts
    suspended: str | None = None  # why updates are not applied (crash loop), until cleared

    def slot(self, name: str) -> SlotState:
        try:
            return self.slots[name]
        except KeyError:
            raise StateError(f"unknown slot {name!r}") from None

    def with_slot(self, name: str, **changes: Any) -> DeviceState:
        updated = replace(self.slot(name), updated_at=now_text(), **changes)
        return replace(self, slots={**self.slots, name: updated})

    def with_start(self, boot_id: str, uptime_s: float) -> DeviceState:
        """Record a start of the updater; suspend updates if it is crash-looping.

        More than ``CRASH_LOOP_STARTS`` starts within ``CRASH_LOOP_WINDOW_S`` seconds of one boot
        (timed by the kernel's uptime, which, unlike the wall clock, is always right) suspend
        updates until an operator resumes them.
        """
        window = [
            (b, t)
            for b, t in self.restarts
            if b == boot_id and 0 <= uptime_s - t <= CRASH_LOOP_WINDOW_S
        ]
        recent = (*window, (boot_id, uptime_s))
        suspended = self.suspended
        if len(recent) > CRASH_LOOP_STARTS and suspended is None:
            suspended = (
                f"crash loop: {len(recent)} updater starts within "
                f"{CRASH_LOOP_WINDOW_S // 60} minutes"
            )
        return replace(self, restarts=recent[-(CRASH_LOOP_STARTS + 1) :], suspended=suspended)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "slots": {name: asdict(s) for name, s in sorted(self.slots.items())},
            "installed_security_version": self.installed_security_version,
            "save_count": self.save_count,
            "restarts": [list(r) for r in self.restarts],
            "suspended": self.suspended,
        }

    @classmethod
    def from_dict(cls, document: Any) -> DeviceState:
        if not isinstance(document, dict):
            raise StateError("state: must be a JSON object")
        if document.get("format") != STATE_FORMAT:
            raise StateError(f"state: unknown format {document.get('format')!r}")
        raw_slots = document.get("slots")
        if not isinstance(raw_slots, dict) or set(raw_slots) != {"a", "b"}:
            raise StateError("state: slots must hold exactly a and b")
        restarts = document.get("restarts", [])
        if not isinstance(restarts, list) or not all(
            isinstance(r, list) and len(r) == 2 and isinstance(r[0], str)
            and isinstance(r[1], int | float) and math.isfinite(r[1])
            for r in restarts
        ):  # fmt: skip
            raise StateError("state: restarts must be a list of [boot id, seconds]")
        isv = document.get("installed_security_version", 0)
        count = document.get("save_count", 0)
        if type(isv) is not int or isv < 0 or type(count) is not int or count < 0:
            raise StateError("state: counters must be non-negative integers")
        suspended = document.get("suspended")
        if suspended is not None and not isinstance(suspended, str):
            raise StateError("state: suspended must be a string or null")
        return cls(
            slots={name: SlotState.from_dict(raw, name) for name, raw in raw_slots.items()},
            installed_security_version=isv,
            save_count=count,
            restarts=tuple((str(r[0]), float(r[1])) for r in restarts),
            suspended=suspended,
        )


@dataclass(frozen=True)
class Loaded:
    state: DeviceState
    problem: str | None = None


class StateStore:
    """Loads and saves :class:`DeviceState` in ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / STATE_NAME
        self.floor_path = data_dir / FLOOR_NAME

    def load(self, *, keep_evidence: bool = True) -> Loaded:
        """The saved state; an empty state (and the problem) if it is missing or damaged. The
        floor is the higher of the state's and the kept copy's (see the module docstring).

        A damaged file is kept as ``state.json.damaged`` for diagnosis (unless not
        ``keep_evidence``: a reader that never writes, such as ``fleet-updater status``).
        """
        loaded = self._load_state(keep_evidence)
        kept, problem = self._kept_floor()
        state, problems = loaded.state, [p for p in (loaded.problem, problem) if p]
        if kept > state.installed_security_version:
            if loaded.problem is None and self.path.exists():
                problems.append(
                    f"state {self.path}: names security floor {state.installed_security_version}"
                    f", below the {kept} kept in {self.floor_path}: the higher one holds"
                )
            elif not self.path.exists():
                problems.append(
                    f"state {self.path}: missing; security floor {kept} kept in {self.floor_path}"
                )
            state = replace(state, installed_security_version=kept)
        return Loaded(state, "; ".join(problems) or None)

    def _load_state(self, keep_evidence: bool) -> Loaded:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return Loaded(DeviceState())
        except OSError as err:
            return Loaded(DeviceState(), f"state {self.path}: cannot read: {err.strerror}")
        try:
            return Loaded(DeviceState.from_dict(json.loads(data.decode("utf-8"))))
        except (ValueError, TypeError, OverflowError, RecursionError, StateError) as err:
            if keep_evidence:
                with contextlib.suppress(OSError):
                    atomic_write(self.path.with_name(STATE_NAME + ".damaged"), data)
            return Loaded(DeviceState(), f"state {self.path}: damaged ({err}); starting afresh")

    def _kept_floor(self) -> tuple[int, str | None]:
        """The floor in ``security-floor`` (0 when there is none) and what is wrong with it."""
        try:
            text = self.floor_path.read_bytes()
        except FileNotFoundError:
            return 0, None
        except OSError as err:
            return 0, f"security floor {self.floor_path}: cannot read: {err.strerror}"
        stripped = text.strip()
        if not (stripped.isascii() and stripped.isdigit() and len(stripped) <= 10):
            return 0, f"security floor {self.floor_path}: damaged (not a whole number)"
        if int(stripped) > MAX_SECURITY_VERSION:
            return 0, f"security floor {self.floor_path}: damaged (above {MAX_SECURITY_VERSION})"
        return int(stripped), None

    def save(self, state: DeviceState) -> DeviceState:
        """Persist ``state`` (with its save counter incremented) and return what was saved; a
        floor higher than the kept copy's is written there first.

        The kept copy is read again at every save (a few bytes), not remembered from the last
        load: a copy deleted or damaged since is rewritten now, not left lost until the floor
        next rises.

        Power cut: the file holds the previous state or this one (and the kept floor, the
        previous floor or the new one, never lower than the state's).

        Raises:
            StateError: the data partition cannot be written (full, read-only).
        """
        saved = replace(state, save_count=state.save_count + 1)
        data = json.dumps(saved.to_dict(), indent=1, sort_keys=True).encode() + b"\n"
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if saved.installed_security_version > self._kept_floor()[0]:
                atomic_write(self.floor_path, f"{saved.installed_security_version}\n".encode())
            atomic_write(self.path, data)
        except OSError as err:
            raise StateError(f"state {self.path}: cannot write: {err.strerror}") from err
        return saved


@contextlib.contextmanager
def update_lock(data_dir: Path) -> Iterator[None]:
    """Hold the update lock: one install, boot check or rollback at a time.

    The lock is an ``flock`` on ``<data_dir>/update.lock``, released by the kernel if the holder
    dies, so a crash or power cut never leaves a stale lock.

    Raises:
        LockedError: another process holds it (its pid is named when known).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with holding(data_dir / LOCK_NAME):
            yield
    except LockHeld as held:
        raise LockedError(f"another update is running (pid {held.holder})") from None
