"""Staged rollouts: a release reaches the selected devices cohort by cohort, and stops itself.

Three layers, as in the rest of the server:

- **the model** (``server.models.Rollout``, ``RolloutDevice``, ``FleetControl``);
- **the rules**, pure functions of plain values (:func:`cohort_point`, :func:`device_stage`,
  :func:`failure_allowance`, :func:`decide`, :func:`device_outcome`), tested by property;
- **the I/O**: :func:`evaluate` reads what devices reported, applies the rules and writes the
  transitions, each with an audit entry, in one write transaction under the evaluator lock.

Vocabulary. A rollout's *plan* is its stages: ``canary`` (the named canary devices, when any are
named), then one stage per percentage of the selected devices (default 5 %, 25 %, 100 %). A
device's *cohort point* is a hash of the rollout id and the device id into [0, 1); it joins the
first percentage stage whose fraction is above its point, so cohorts never change between
evaluations, a device in the 5 % stays in the 25 %, and a device enrolled later joins the cohort
it hashes into (it is assigned as soon as the rollout's current stage covers it).

A device is **offline** for a rollout when it has not been seen (no check-in, heartbeat or event)
for longer than the rollout's ``offline_after_s`` (see :func:`offline`): the rollout neither
assigns it nor expects it in any stage's count, and its view lists it as skipped. Back online
while the rollout is active, it joins its cohort like any late device. A device the rollout
already assigned stays its member: one that goes silent mid-install fails at the deadline.

A device's *outcome* (see :func:`device_outcome`): it **succeeded** when it has heartbeated the
new version, committed (not a trial boot, booted slot = primary slot, not in safe mode),
continuously for the soak time (every evaluation saw a fresh committed heartbeat); it **failed**
on an ``install.failed``, ``boot_check.rolled_back``, ``boot_check.fell_back`` or
``boot_check.reported`` event after its assignment, on a safe-mode heartbeat, or when it has not
been committed by the install deadline. Both are final.

The **failure rule** (the minimum-sample rule): with ``n`` devices assigned so far and ``f`` of
them failed, the rollout halts when ``f > floor(max_failure_rate * n)``; in the canary stage no
failure is tolerated. So at 5 %, 1 failure out of 20 does not halt and 2 do; with fewer than 20
devices any failure halts.

A stage is **promoted** when every device assigned so far has an outcome, the failures are within
the allowance (so, with no tolerated failure, every device succeeded) and the stage has soaked
for ``soak_s`` since it started; the last stage's promotion completes the rollout. A rollout
never promotes past a gate whose failure rule tripped, nor while a device is pending.

With ``rollback_on_halt`` (the default), a failed device is assigned the release it ran before at
once (even a tolerated failure: left assigned, it would retry the release that failed on it),
and on a halt so are the devices still pending.

A rollout may carry **maintenance windows** (``windows``, :mod:`fleet_core.windows`), read in
each device's local time: the assignment carries them and a device starts installing only
inside them and inside its own ``[updates] windows``; one that waits heartbeats
``updater_state`` ``waiting_window``, and the view counts its pending members in that state
(``waiting_window``). Windows change nothing here: a device is assigned, expected and judged
(install deadline included) as without them, so a deadline must leave room for the wait.

The **emergency stop** pauses every running rollout with its reason and withdraws the assignment
of every device of a running or paused rollout that has not committed the new release, in the
same transaction, so the next check-in answers "no assignment". While it is on, nothing starts or
resumes. The **fleet-wide guard** turns it on by itself when more than 20 % of all enrolled
devices are unhealthy (in safe mode, or failed in a rollout).

Evaluations are serialized through the database (an advisory lock on PostgreSQL, the write lock
on SQLite), so any number of server processes may evaluate at once. Every change is one
transaction: a power cut leaves either the state before the evaluation or the state after it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session, joinedload

from fleet_core.windows import WindowError, longest_wait_s, parse_windows
from server import audit
from server.database import AUDIT_CHAIN_LOCK, Database
from server.errors import (
    InvalidRolloutError,
    RolloutConflictError,
    UnknownReleaseError,
    UnknownRolloutError,
)
from server.models import (
    AuditRow,
    Device,
    DeviceStatus,
    FleetControl,
    Release,
    Rollout,
    RolloutDevice,
)
from server.rollout_text import duration_text
from server.schemas import (
    DEFAULT_INSTALL_DEADLINE_S,
    DEFAULT_MAX_FAILURE_RATE,
    DEFAULT_OFFLINE_AFTER_S,
    DEFAULT_SOAK_S,
    DEFAULT_STAGES,
    MIN_OFFLINE_AFTER_S,
    RolloutStartRequest,
)
from server.settings import iso

# A PostgreSQL advisory lock key, fixed forever (server.database holds the others).
ROLLOUT_EVALUATOR_LOCK = 0x6D66_0003
ENGINE_ACTOR = "rollout-engine"


def _lock_rollouts(db: Database, session: Session) -> None:
    """Serialize a change of rollouts: the rollouts' lock, then the audit chain's, before any
    device row. Every audited change takes the chain before the rows it changes (a device's
    events: server.devices); a rollout step that changed rows first and then waited for the
    chain would deadlock with them on PostgreSQL."""
    db.lock(session, ROLLOUT_EVALUATOR_LOCK)
    db.lock(session, AUDIT_CHAIN_LOCK)


# A device heartbeats every 60 s; a committed device silent for longer than this is not
# "continuously" committed, and its soak starts again with its next heartbeat.
HEARTBEAT_FRESH_S = 180
FLEET_UNHEALTHY_LIMIT = 0.20
FAILURE_EVENTS = (
    "install.failed",
    "boot_check.rolled_back",
    "boot_check.fell_back",
    "boot_check.reported",
    # refused before any install (below its security floor, interrupted too often, failed on
    # it before): it never will install this release, so it fails now, not at the deadline;
    # counted only when it names the rollout's release (_failure_events)
    "daemon.release_failed",
)
REFUSAL_EVENT = "daemon.release_failed"
CANARY = "canary"
# Named device ids are looked up this many at a time (a database takes only so many parameters).
ENROLLED_CHECK_BATCH = 500
# Devices a cohort assigns are updated this many at a time, for the same reason.
ASSIGN_BATCH = 500


class RolloutState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    ABORTED = "aborted"
    COMPLETED = "completed"


ACTIVE = (RolloutState.RUNNING, RolloutState.PAUSED)


class Outcome(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


# --- the rules (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The stages of a rollout: ``has_canary`` first, then the percentages (the last 100)."""

    has_canary: bool
    percents: tuple[int, ...]

    @property
    def names(self) -> list[str]:
        return ([CANARY] if self.has_canary else []) + [f"{p}%" for p in self.percents]

    def __len__(self) -> int:
        return len(self.percents) + (1 if self.has_canary else 0)

    def is_canary(self, stage: int) -> bool:
        return self.has_canary and stage == 0


def check_percents(percents: Sequence[int]) -> tuple[int, ...]:
    """The percentages, validated: strictly increasing, within 1..100, ending with 100.

    Raises:
        InvalidRolloutError: anything else.
    """
    values = tuple(percents)
    if (
        not values
        or values[-1] != 100
        or any(not 1 <= p <= 100 for p in values)
        or any(a >= b for a, b in itertools.pairwise(values))
    ):
        raise InvalidRolloutError(
            f"stages {list(values)}: give increasing percentages from 1 to 100, ending with 100"
        )
    return values


def cohort_point(rollout_id: int, device_id: str) -> float:
    """The device's place in the rollout's cohorts, in [0, 1): the same on every evaluation
    and every server process (SHA-256 of the rollout id and the device id)."""
    digest = hashlib.sha256(f"rollout {rollout_id}\n{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def device_stage(plan: Plan, point: float, canary: bool) -> int:
    """The stage whose cohort the device joins: the canary stage for a canary, otherwise the
    first percentage stage whose fraction exceeds ``point`` (the last stage, 100 %, always)."""
    if canary and plan.has_canary:
        return 0
    offset = 1 if plan.has_canary else 0
    for index, percent in enumerate(plan.percents):
        if point < percent / 100:
            return offset + index
    return offset + len(plan.percents) - 1


def offline(last_seen: datetime, now: datetime, offline_after_s: int) -> bool:
    """Whether a device last seen at ``last_seen`` is offline at ``now``: unseen for longer
    than ``offline_after_s`` (a device seen exactly that long ago is still online)."""
    return now - last_seen > timedelta(seconds=offline_after_s)


def failure_allowance(devices: int, max_failure_rate: float, canary: bool) -> int:
    """How many failed devices a stage with ``devices`` assigned tolerates:
    ``floor(max_failure_rate * devices)``, and none in the canary stage.

    (The small epsilon keeps 0.07 * 100 from counting as 7.000000000000001 or 0.29 * 100 as
    28.999999999999996.)"""
    if canary:
        return 0
    return math.floor(max_failure_rate * devices + 1e-9)


class Decision(StrEnum):
    WAIT = "wait"
    PROMOTE = "promote"
    COMPLETE = "complete"
    HALT = "halt"


def decide(
    plan: Plan,
    stage: int,
    outcomes: Sequence[Outcome],
    soaked: bool,
    max_failure_rate: float,
) -> Decision:
    """What a running rollout in ``stage`` does next, given the outcomes of every device
    assigned so far and whether the stage has soaked for its time.

    Halting wins over everything. Promotion needs every device to have an outcome and the
    failures to stay within the allowance: a tolerated failure (1 of 20 at 5 %) neither halts
    the rollout nor holds it at its stage forever.
    """
    failures = sum(1 for o in outcomes if o is Outcome.FAILED)
    if failures > failure_allowance(len(outcomes), max_failure_rate, plan.is_canary(stage)):
        return Decision.HALT
    if not soaked or any(o is Outcome.PENDING for o in outcomes):
        return Decision.WAIT
    return Decision.COMPLETE if stage >= len(plan) - 1 else Decision.PROMOTE


@dataclass(frozen=True)
class Observation:
    """What the server knows of a device, as the rules need it."""

    version: str | None  # of the last heartbeat
    committed: bool  # last heartbeat: not trial, booted == primary, not safe mode
    safe_mode: bool  # last heartbeat
    heartbeat_at: datetime | None
    failure_event: str | None  # the first failure event since the assignment


def device_outcome(
    observation: Observation,
    *,
    version: str,
    assigned_at: datetime,
    committed_since: datetime | None,
    now: datetime,
    soak_s: int,
    install_deadline_s: int,
) -> tuple[Outcome, datetime | None, str | None]:
    """The device's outcome, its new ``committed_since`` and the reason of a failure."""
    if observation.failure_event is not None:
        return Outcome.FAILED, committed_since, observation.failure_event
    heartbeat_at = observation.heartbeat_at
    # Only what the device said after it was assigned the release counts.
    if heartbeat_at is not None and heartbeat_at >= assigned_at:
        if observation.safe_mode:
            return Outcome.FAILED, committed_since, "safe_mode"
        fresh = now - heartbeat_at <= timedelta(seconds=HEARTBEAT_FRESH_S)
        if fresh and observation.committed and observation.version == version:
            since = committed_since or heartbeat_at
            if now - since >= timedelta(seconds=soak_s):
                return Outcome.SUCCEEDED, since, None
            return Outcome.PENDING, since, None
    if now - assigned_at > timedelta(seconds=install_deadline_s):
        return Outcome.FAILED, None, "install_deadline"
    return Outcome.PENDING, None, None


# --- the I/O ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutRequest:
    """What an operator asks for; the defaults are the issue's."""

    version: str
    device_ids: tuple[str, ...] | None = None
    canary_ids: tuple[str, ...] = ()
    stages: tuple[int, ...] = DEFAULT_STAGES
    soak_s: int = DEFAULT_SOAK_S
    max_failure_rate: float = DEFAULT_MAX_FAILURE_RATE
    install_deadline_s: int = DEFAULT_INSTALL_DEADLINE_S
    rollback_on_halt: bool = True
    role: str | None = None  # select devices of this role only
    tags: tuple[str, ...] = ()  # ... that carry every one of these tags
    offline_after_s: int = DEFAULT_OFFLINE_AFTER_S  # unseen longer: not assigned, not expected
    allow_empty: bool = False  # start even when no online device is selected
    windows: tuple[str, ...] = ()  # maintenance windows, devices' local time; empty: any time

    @classmethod
    def from_body(cls, body: RolloutStartRequest) -> RolloutRequest:
        """The request a validated ``POST /api/v1/rollouts`` body makes (the API's and the
        console's)."""
        return cls(
            version=body.version,
            device_ids=tuple(body.device_ids) if body.device_ids is not None else None,
            canary_ids=tuple(body.canary),
            stages=tuple(body.stages),
            soak_s=body.soak_s,
            max_failure_rate=body.max_failure_rate,
            install_deadline_s=body.install_deadline_s,
            rollback_on_halt=body.rollback_on_halt,
            role=body.selector.role if body.selector else None,
            tags=tuple(body.selector.tags) if body.selector else (),
            offline_after_s=body.offline_after_s,
            allow_empty=body.allow_empty,
            windows=tuple(body.windows),
        )


def _plan(rollout: Rollout) -> Plan:
    return Plan(bool(json.loads(rollout.canary_ids)), tuple(json.loads(rollout.stages)))


def _control(session: Session) -> FleetControl:
    control = session.get(FleetControl, 1)
    if control is None:
        control = FleetControl(id=1, emergency_stop=False)
        session.add(control)
        session.flush()
    return control


def _rollout(session: Session, rollout_id: int) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise UnknownRolloutError(f"no rollout {rollout_id}")
    return rollout


class Selected(NamedTuple):
    """What a rollout reads of a device it selects: not its whole row (the last heartbeat's
    JSON), which a selection of a large fleet would load by the ten thousand."""

    id: str
    last_seen: datetime
    version: str | None
    assigned_release_id: int | None


@dataclass(frozen=True)
class Selection:
    """The devices a rollout is for, in id order: those it assigns and expects (``online``),
    and those it skips because they are :func:`offline`."""

    online: list[Selected]
    offline: list[Selected]


def _selected(session: Session, rollout: Rollout, release: Release, now: datetime) -> Selection:
    """The devices the rollout is for: compatible with the release, among the named devices
    (when named), of the selector's role, carrying every one of its tags; split into those
    online at ``now`` and those offline for longer than the rollout's ``offline_after_s``. A
    device's role and tags are what its last heartbeat said, so a device joins (or leaves) the
    selection as it reports them, and it joins the online part when it is seen again; a device
    already assigned by the rollout stays its member. A quarantined or decommissioned device is
    never selected: it is neither assigned nor expected."""
    query = (
        select(Device.id, Device.last_seen, Device.version, Device.assigned_release_id, Device.tags)
        .where(Device.compatible == release.compatible, Device.status == DeviceStatus.ACTIVE)
        .order_by(Device.id)
    )
    chosen = json.loads(rollout.device_ids) if rollout.device_ids is not None else None
    if chosen is not None:
        query = query.where(Device.id.in_(chosen))
    selector = json.loads(rollout.selector) if rollout.selector else {}
    if selector.get("role"):
        query = query.where(Device.role == selector["role"])
    wanted = set(selector.get("tags", ()))
    selection = Selection([], [])
    for device_id, last_seen, version, assigned_release_id, tags in session.execute(query):
        if wanted <= set(json.loads(tags) if tags else ()):
            device = Selected(device_id, last_seen, version, assigned_release_id)
            if offline(last_seen, now, rollout.offline_after_s):
                selection.offline.append(device)
            else:
                selection.online.append(device)
    return selection


def empty_selection(
    compatible_with: str, compatible: int, offline_selected: int, offline_after_s: int
) -> str:
    """Why a rollout selects no online device, given how many active devices are compatible
    with its release and how many selected ones are offline; and the way to start it anyway."""
    if compatible == 0:
        why = f"no active device is compatible with {compatible_with!r}"
    elif offline_selected == 0:
        why = (
            f"none of the {compatible} active devices compatible with {compatible_with!r} "
            "matches the device ids and selector"
        )
    else:
        why = (
            f"all {offline_selected} matching devices are offline: not seen for more than "
            f"{offline_after_s} s"
        )
    return f"the rollout would assign no device: {why} (allow_empty starts it anyway)"


def check_named_devices(field: str, device_ids: Sequence[str]) -> None:
    """A list of device ids names each device once.

    Raises:
        InvalidRolloutError: an id named twice (the message names it and the ``field``).
    """
    seen: set[str] = set()
    for device_id in device_ids:
        if device_id in seen:
            raise InvalidRolloutError(f"{field}: device {device_id} is named twice")
        seen.add(device_id)


def _check_enrolled(session: Session, field: str, device_ids: Sequence[str]) -> None:
    """Raises InvalidRolloutError naming the first of ``device_ids`` that no device has."""
    known: set[str] = set()
    for start in range(0, len(device_ids), ENROLLED_CHECK_BATCH):
        batch = device_ids[start : start + ENROLLED_CHECK_BATCH]
        known.update(session.scalars(select(Device.id).where(Device.id.in_(batch))))
    for device_id in device_ids:
        if device_id not in known:
            raise InvalidRolloutError(f"{field}: no device {device_id} is enrolled")


def _audit(
    db: Database, session: Session, now: datetime, actor: str, action: str, rollout: Rollout,
    **details: Any,
) -> None:  # fmt: skip
    audit.append(
        db,
        session,
        at=now,
        actor=actor,
        action=action,
        subject=f"rollout:{rollout.id}",
        details={"version": rollout.release.version, "stage": rollout.stage, **details},
    )


def start(db: Database, request: RolloutRequest, *, actor: str, now: datetime) -> dict[str, Any]:
    """Create a running rollout of ``request.version`` and assign its first cohort.

    Every device named (``device_ids``, canaries) must be enrolled and named once: an unknown
    id is a typo or another fleet's device, and silently leaving it out would start a rollout
    that is not the one asked for. A rollout that selects no online device is refused, saying
    why (:func:`empty_selection`), unless ``allow_empty``: it would assign nothing, yet hold off
    every other rollout while it lasts.

    Raises:
        UnknownReleaseError: no such release.
        InvalidRolloutError: the stages, rates or canaries do not make a plan; a device named
            twice, or one that is not enrolled; no online device selected.
        RolloutConflictError: another rollout is running or paused, or the emergency stop is on.
    """
    percents = check_percents(request.stages)
    check_named_devices("device_ids", request.device_ids or ())
    check_named_devices("canary", request.canary_ids)
    if not 0 <= request.max_failure_rate < 1:
        raise InvalidRolloutError("max failure rate: give a fraction from 0 to below 1")
    if request.soak_s < 0 or request.install_deadline_s <= 0:
        raise InvalidRolloutError("soak and install deadline: give positive seconds")
    if request.offline_after_s < MIN_OFFLINE_AFTER_S:
        raise InvalidRolloutError(
            f"offline after: give at least {MIN_OFFLINE_AFTER_S} s (a healthy device is seen "
            "about once a minute)"
        )
    try:
        parsed = parse_windows(list(request.windows), where="windows")
    except WindowError as err:
        raise InvalidRolloutError(str(err)) from err
    windows = [w.text for w in parsed]
    needed = longest_wait_s(parsed) + WINDOW_DEADLINE_MARGIN_S if parsed else 0
    if request.install_deadline_s < needed:
        # the deadline counts from the assignment, the wait for a window included: shorter,
        # every device assigned outside the windows would fail the rollout
        raise InvalidRolloutError(
            f"install deadline: with windows {', '.join(windows)} a device may wait "
            f"{duration_text(longest_wait_s(parsed))} for one to open, and the deadline counts "
            f"from the assignment: give at least {duration_text(needed)}"
        )
    with db.write() as session:
        _lock_rollouts(db, session)
        if _control(session).emergency_stop:
            raise RolloutConflictError("the emergency stop is on: clear it first")
        active = session.scalars(select(Rollout).where(Rollout.state.in_(ACTIVE))).first()
        if active is not None:
            raise RolloutConflictError(
                f"rollout {active.id} is {active.state}: abort it or let it finish first"
            )
        release = session.scalars(select(Release).where(Release.version == request.version)).first()
        if release is None:
            raise UnknownReleaseError(f"no release {request.version!r}")
        _check_enrolled(session, "device_ids", request.device_ids or ())
        _check_enrolled(session, "canary", request.canary_ids)
        rollout = Rollout(
            release=release,
            device_ids=json.dumps(sorted(request.device_ids))
            if request.device_ids is not None
            else None,
            canary_ids=json.dumps(sorted(set(request.canary_ids))),
            selector=json.dumps({"role": request.role, "tags": sorted(set(request.tags))})
            if request.role or request.tags
            else None,
            stages=json.dumps(list(percents)),
            soak_s=request.soak_s,
            max_failure_rate=request.max_failure_rate,
            install_deadline_s=request.install_deadline_s,
            rollback_on_halt=request.rollback_on_halt,
            offline_after_s=request.offline_after_s,
            windows=json.dumps(windows) if windows else None,
            state=RolloutState.RUNNING,
            stage=0,
            stage_started=now,
            created=now,
            created_by=actor,
        )
        session.add(rollout)
        session.flush()
        selection = _selected(session, rollout, release, now)
        selected = {d.id for d in selection.online}
        strangers = sorted(set(request.canary_ids) - selected)
        if strangers and strangers[0] in {d.id for d in selection.offline}:
            raise InvalidRolloutError(
                f"canary {strangers[0]} is offline: not seen for more than "
                f"{request.offline_after_s} s"
            )
        if strangers:
            raise InvalidRolloutError(
                f"canary {strangers[0]} is not a selected device compatible with "
                f"{release.compatible!r}"
            )
        if not selection.online and not request.allow_empty:
            compatible = session.scalar(
                select(func.count())
                .select_from(Device)
                .where(
                    Device.compatible == release.compatible,
                    Device.status == DeviceStatus.ACTIVE,
                )
            )
            raise InvalidRolloutError(
                empty_selection(
                    release.compatible, compatible or 0, len(selection.offline),
                    request.offline_after_s,
                )
            )  # fmt: skip
        _audit(db, session, now, actor, "rollout.started", rollout, plan=_plan(rollout).names)
        _assign_cohort(db, session, rollout, now)
        session.flush()
        return _view(session, rollout, now)


def _assign_cohort(db: Database, session: Session, rollout: Rollout, now: datetime) -> None:
    """Assign the release to every selected online device the current stage covers and that
    has no assignment from this rollout yet (new cohort members, devices enrolled since and
    devices back online)."""
    plan = _plan(rollout)
    canaries = set(json.loads(rollout.canary_ids))
    known = set(
        session.scalars(
            select(RolloutDevice.device_id).where(RolloutDevice.rollout_id == rollout.id)
        )
    )
    versions: dict[str, int] = {
        version: release_id
        for version, release_id in session.execute(select(Release.version, Release.id))
    }
    assigned = []
    for device in _selected(session, rollout, rollout.release, now).online:
        if device.id in known:
            continue
        stage = device_stage(plan, cohort_point(rollout.id, device.id), device.id in canaries)
        if stage > rollout.stage:
            continue
        # The release it runs now is what a rollback returns it to; failing that, what it was
        # assigned before.
        previous = versions.get(device.version or "", device.assigned_release_id)
        session.add(
            RolloutDevice(
                rollout_id=rollout.id,
                device_id=device.id,
                stage=stage,
                previous_release_id=previous,
                assigned_at=now,
                outcome=Outcome.PENDING,
            )
        )
        assigned.append(device.id)
    for first in range(0, len(assigned), ASSIGN_BATCH):
        session.execute(
            update(Device)
            .where(Device.id.in_(assigned[first : first + ASSIGN_BATCH]))
            .values(assigned_release_id=rollout.release_id)
        )
    if assigned:
        _audit(db, session, now, ENGINE_ACTOR, "rollout.assigned", rollout, devices=assigned)


def _observe(member: RolloutDevice, device: Device, failure_event: str | None) -> Observation:
    heartbeat = json.loads(device.last_heartbeat) if device.last_heartbeat else {}
    committed = (
        bool(heartbeat)
        and not heartbeat.get("trial", True)
        and not heartbeat.get("safe_mode", False)
        and heartbeat.get("booted") == heartbeat.get("primary")
    )
    return Observation(
        version=device.version,
        committed=committed,
        safe_mode=bool(heartbeat.get("safe_mode", False)),
        heartbeat_at=device.last_heartbeat_at,
        failure_event=failure_event,
    )


def _failure_events(
    session: Session, members: Sequence[RolloutDevice], version: str
) -> dict[str, str]:
    """The first failure event each member reported since its assignment, for all of them in
    one query (failure events are rare and ``action`` is indexed; the members are picked out
    here, so no list of thousands of ids goes into the query).

    A refusal (``daemon.release_failed``) counts only for the rollout's ``version``: a device
    back from days offline sends its backlog after it was assigned, refusals of other releases
    included."""
    if not members:
        return {}
    since = {f"device:{m.device_id}": audit.audit_time(m.assigned_at) for m in members}
    rows = session.execute(
        select(AuditRow.actor, AuditRow.action, AuditRow.at, AuditRow.details)
        .where(AuditRow.action.in_(FAILURE_EVENTS), AuditRow.at >= min(since.values()))
        .order_by(AuditRow.seq)
    )
    first: dict[str, str] = {}
    for actor, action, at, details in rows:
        device_id = actor.removeprefix("device:")
        if actor not in since or device_id in first or at < since[actor]:
            continue
        if action == REFUSAL_EVENT and _refused_version(details) != version:
            continue
        first[device_id] = action
    return first


def _refused_version(details: str) -> object:
    """The release version a device's refusal event names (its ``fields.version``)."""
    try:
        fields = json.loads(details).get("fields")
    except (ValueError, AttributeError):
        return None
    return fields.get("version") if isinstance(fields, dict) else None


def _members(session: Session, rollout: Rollout) -> list[tuple[RolloutDevice, Device]]:
    rows = session.execute(
        select(RolloutDevice, Device)
        .join(Device, Device.id == RolloutDevice.device_id)
        .where(RolloutDevice.rollout_id == rollout.id)
        .order_by(RolloutDevice.device_id)
    )
    return [(member, device) for member, device in rows]


def _assignments(session: Session, rollout: Rollout) -> list[RolloutDevice]:
    """The rollout's members as :func:`_members` gives them, without their devices' rows: all
    that its view and its decisions read."""
    return list(
        session.scalars(
            select(RolloutDevice)
            .join(Device, Device.id == RolloutDevice.device_id)
            .where(RolloutDevice.rollout_id == rollout.id)
            .order_by(RolloutDevice.device_id)
        )
    )


def _update_outcomes(db: Database, session: Session, rollout: Rollout, now: datetime) -> None:
    pending = [(m, d) for m, d in _members(session, rollout) if m.outcome == Outcome.PENDING]
    failures = _failure_events(session, [m for m, _ in pending], rollout.release.version)
    for member, device in pending:
        outcome, since, reason = device_outcome(
            _observe(member, device, failures.get(device.id)),
            version=rollout.release.version,
            assigned_at=member.assigned_at,
            committed_since=member.committed_since,
            now=now,
            soak_s=rollout.soak_s,
            install_deadline_s=rollout.install_deadline_s,
        )
        member.committed_since = since
        if outcome is not Outcome.PENDING:
            member.outcome, member.reason = outcome, reason
            # By policy a failed device goes back at once, even when its failure is tolerated:
            # left assigned, it would retry the release that just failed on it.
            returned = (
                outcome is Outcome.FAILED
                and rollout.rollback_on_halt
                and device.assigned_release_id == rollout.release_id
            )
            if returned:
                device.assigned_release_id = member.previous_release_id
            _audit(
                db, session, now, ENGINE_ACTOR, f"rollout.device_{outcome.value}", rollout,
                device=device.id, reason=reason, returned=returned,
            )  # fmt: skip


def _return_devices(session: Session, rollout: Rollout, outcomes: Iterable[Outcome]) -> list[str]:
    """Assign the previous release back to this rollout's devices with ``outcomes``."""
    wanted = set(outcomes)
    returned = []
    for member, device in _members(session, rollout):
        if Outcome(member.outcome) in wanted and device.assigned_release_id == rollout.release_id:
            device.assigned_release_id = member.previous_release_id
            returned.append(device.id)
    return returned


def _step(db: Database, session: Session, rollout: Rollout, now: datetime) -> None:
    """One evaluation of one running rollout."""
    _assign_cohort(db, session, rollout, now)
    session.flush()
    _update_outcomes(db, session, rollout, now)
    session.flush()
    plan = _plan(rollout)
    acknowledged = set(json.loads(rollout.acknowledged or "[]"))
    members = _assignments(session, rollout)
    if not members and not _selected(session, rollout, rollout.release, now).online:
        # nobody assigned and nobody to assign: it waits for devices (an --allow-empty rollout,
        # or every selected device offline) instead of soaking empty stages to "completed"
        return
    outcomes = [Outcome(m.outcome) for m in members if m.device_id not in acknowledged]
    soaked = now - rollout.stage_started >= timedelta(seconds=rollout.soak_s)
    decision = decide(plan, rollout.stage, outcomes, soaked, rollout.max_failure_rate)
    if decision is Decision.HALT:
        failed = outcomes.count(Outcome.FAILED)
        rollout.state = RolloutState.HALTED
        rollout.reason = (
            f"{failed} of {len(outcomes)} devices failed in stage " + (plan.names[rollout.stage])
        )
        returned = (
            _return_devices(session, rollout, (Outcome.FAILED, Outcome.PENDING))
            if rollout.rollback_on_halt
            else []
        )
        _audit(
            db, session, now, ENGINE_ACTOR, "rollout.halted", rollout,
            reason=rollout.reason, rolled_back=returned,
        )  # fmt: skip
    elif decision is Decision.COMPLETE:
        rollout.state = RolloutState.COMPLETED
        _audit(db, session, now, ENGINE_ACTOR, "rollout.completed", rollout)
    elif decision is Decision.PROMOTE:
        rollout.stage += 1
        rollout.stage_started = now
        _audit(
            db,
            session,
            now,
            ENGINE_ACTOR,
            "rollout.promoted",
            rollout,
            to=plan.names[rollout.stage],
        )
        _assign_cohort(db, session, rollout, now)


def unhealthy() -> ColumnElement[bool]:
    """The fleet guard's rule, as a condition on ``devices``: a device is unhealthy in safe mode,
    or failed in an active rollout (a halted rollout's devices are on their way back). The
    guard, the ``fleet_devices_unhealthy`` gauge and the web console all count with it."""
    failed = (
        select(RolloutDevice.device_id)
        .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .where(RolloutDevice.outcome == Outcome.FAILED, Rollout.state.in_(ACTIVE))
    )
    return (Device.state == "safe_mode") | Device.id.in_(failed)


def _fleet_guard(db: Database, session: Session, control: FleetControl, now: datetime) -> None:
    total = session.scalar(select(func.count()).select_from(Device)) or 0
    if total == 0 or control.emergency_stop:
        return
    unhealthy_count = (
        session.scalar(select(func.count()).select_from(Device).where(unhealthy())) or 0
    )
    if unhealthy_count / total > FLEET_UNHEALTHY_LIMIT:
        _stop(
            db, session, control, now, ENGINE_ACTOR,
            f"fleet guard: {unhealthy_count} of {total} devices unhealthy",
        )  # fmt: skip


def evaluate(db: Database, now: datetime) -> None:
    """Evaluate every running rollout once: new cohort members, outcomes, halt or promotion;
    then the fleet-wide guard. One evaluator at a time, whichever process runs it."""
    with db.write() as session:
        _lock_rollouts(db, session)
        control = _control(session)
        if not control.emergency_stop:
            running = session.scalars(
                select(Rollout).where(Rollout.state == RolloutState.RUNNING).order_by(Rollout.id)
            )
            for rollout in list(running):
                _step(db, session, rollout, now)
        session.flush()
        _fleet_guard(db, session, control, now)


def _stop(
    db: Database, session: Session, control: FleetControl, now: datetime, actor: str, reason: str
) -> None:
    control.emergency_stop, control.reason, control.since, control.actor = True, reason, now, actor
    audit.append(
        db, session, at=now, actor=actor, action="fleet.emergency_stop", details={"reason": reason}
    )
    for rollout in session.scalars(select(Rollout).where(Rollout.state.in_(ACTIVE))).all():
        withdrawn = []
        for member, device in _members(session, rollout):
            committed = member.outcome == Outcome.SUCCEEDED or (
                member.committed_since is not None and device.version == rollout.release.version
            )
            if not committed and device.assigned_release_id == rollout.release_id:
                device.assigned_release_id = None
                withdrawn.append(device.id)
        if rollout.state == RolloutState.RUNNING:
            rollout.state, rollout.reason = RolloutState.PAUSED, f"emergency stop: {reason}"
        _audit(db, session, now, actor, "rollout.paused", rollout, reason=rollout.reason,
               withdrawn=withdrawn)  # fmt: skip


def emergency_stop(db: Database, reason: str, *, actor: str, now: datetime) -> dict[str, Any]:
    """Pause every rollout and withdraw every uncommitted rollout assignment, at once."""
    with db.write() as session:
        _lock_rollouts(db, session)
        control = _control(session)
        if not control.emergency_stop:
            _stop(db, session, control, now, actor, reason)
        return control_view(control)


def clear_emergency_stop(db: Database, *, actor: str, now: datetime) -> dict[str, Any]:
    """Turn the emergency stop off; paused rollouts stay paused until resumed."""
    with db.write() as session:
        _lock_rollouts(db, session)
        control = _control(session)
        if control.emergency_stop:
            control.emergency_stop, control.reason, control.since = False, None, now
            control.actor = actor
            audit.append(db, session, at=now, actor=actor, action="fleet.emergency_stop_cleared")
        return control_view(control)


def transition(
    db: Database,
    rollout_id: int,
    action: str,
    *,
    actor: str,
    now: datetime,
    reason: str | None,
    acknowledge: Iterable[str] | None = None,
) -> dict[str, Any]:
    """``pause``, ``resume``, ``abort`` or ``rollback`` the rollout.

    A resume acknowledges the rollout's failed devices (they stop counting against the failure
    rule). ``acknowledge`` names the devices the operator saw fail: a failed device not yet
    acknowledged and not named (it failed after the operator looked) refuses the resume, so
    nothing is acknowledged unseen; ``None`` acknowledges every failed device.

    ``abort`` ends it and returns its uncommitted devices to their previous release;
    ``rollback`` ends it and returns every one of its devices.

    A rollback means something where the rollout's devices are still its own: while it runs or
    is paused, once halted (a halt without ``rollback_on_halt`` left them on the release, and
    even with it the succeeded ones stay), and once completed (the release turned out bad in
    the field: the usual rollback). It is refused

    - from ``aborted``: an operator ended it already, by an abort (the uncommitted devices went
      back; the committed ones stay where that operator chose to leave them) or by a rollback
      (every device went back: another would return nothing, yet write a second rollback to
      the audit trail). Moving those devices now is a new decision: an assignment, or a
      rollout of the release to return to;
    - when a later rollout exists: that one decided where the devices go since (and, of the
      same release, holds the very assignments a rollback would take back); roll back that
      one.

    Raises:
        UnknownRolloutError: no such rollout.
        RolloutConflictError: not allowed from the rollout's state (or during the emergency
            stop, or with a failed device ``acknowledge`` does not name, for ``resume``; or
            after a later rollout, for ``rollback``).
    """
    allowed = {
        "pause": (RolloutState.RUNNING,),
        "resume": (RolloutState.PAUSED, RolloutState.HALTED),
        "abort": (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.HALTED),
        "rollback": (*ACTIVE, RolloutState.HALTED, RolloutState.COMPLETED),
    }
    with db.write() as session:
        _lock_rollouts(db, session)
        rollout = _rollout(session, rollout_id)
        if rollout.state not in allowed[action]:
            raise RolloutConflictError(f"rollout {rollout_id} is {rollout.state}: cannot {action}")
        if action == "rollback":
            later = session.scalar(select(func.min(Rollout.id)).where(Rollout.id > rollout.id))
            if later is not None:
                raise RolloutConflictError(
                    f"rollout {rollout_id} is {rollout.state} and rollout {later} started after "
                    "it: only the latest rollout can be rolled back"
                )
        details: dict[str, Any] = {"reason": reason}
        if action == "pause":
            rollout.state, rollout.reason = RolloutState.PAUSED, reason or "paused"
        elif action == "resume":
            if _control(session).emergency_stop:
                raise RolloutConflictError("the emergency stop is on: clear it first")
            other = session.scalars(
                select(Rollout).where(Rollout.state.in_(ACTIVE), Rollout.id != rollout.id)
            ).first()
            if other is not None:
                raise RolloutConflictError(f"rollout {other.id} is {other.state}: one at a time")
            # The failures seen so far are acknowledged by whoever resumes: they no longer
            # count against the failure rule (the audit entry names them and the actor).
            acknowledged = set(json.loads(rollout.acknowledged or "[]"))
            seen = {m.device_id for m, _ in _members(session, rollout) if m.outcome == "failed"}
            unseen = seen - acknowledged - set(acknowledge if acknowledge is not None else seen)
            if unseen:
                raise RolloutConflictError(
                    f"rollout {rollout_id} cannot resume: not acknowledged: "
                    f"{', '.join(sorted(unseen))} (failed, and not among the devices named to "
                    "acknowledge)"
                )
            details["acknowledged"] = sorted(seen - acknowledged)
            rollout.acknowledged = json.dumps(sorted(acknowledged | seen))
            rollout.state, rollout.reason = RolloutState.RUNNING, None
            details["reassigned"] = _reassign_pending(session, rollout, now)
        elif action == "abort":
            rollout.state, rollout.reason = RolloutState.ABORTED, reason or "aborted"
            details["returned"] = _return_devices(session, rollout, (Outcome.PENDING,))
        else:
            rollout.state, rollout.reason = RolloutState.ABORTED, reason or "rolled back"
            details["returned"] = _return_devices(session, rollout, tuple(Outcome))
        past = {"pause": "paused", "resume": "resumed", "abort": "aborted"}
        _audit(db, session, now, actor, f"rollout.{past.get(action, 'rolled_back')}", rollout,
               **details)  # fmt: skip
        session.flush()
        return _view(session, rollout, now)


def _reassign_pending(session: Session, rollout: Rollout, now: datetime) -> list[str]:
    """On a resume: give the rollout's pending devices its release again (the emergency stop
    withdrew it, a halt sent them back), with a new install deadline."""
    reassigned = []
    for member, device in _members(session, rollout):
        if member.outcome == Outcome.PENDING and device.assigned_release_id != rollout.release_id:
            device.assigned_release_id = rollout.release_id
            member.assigned_at = now
            reassigned.append(device.id)
    return reassigned


def control_view(control: FleetControl) -> dict[str, Any]:
    """The emergency stop as operators see it."""
    return {
        "active": control.emergency_stop,
        "reason": control.reason,
        "since": iso(control.since) if control.since else None,
        "actor": control.actor,
    }


def _stage_progress(
    rollout: Rollout, plan: Plan, members: Sequence[RolloutDevice], selection: Selection | None
) -> list[dict[str, Any]]:
    """Per stage: the devices of its cohort (expected: the assigned ones, and the ``selection``'s
    online devices that hash into it, when given), and the outcomes of those assigned."""
    progress: list[dict[str, Any]] = [
        {"name": name, "expected": 0, "assigned": 0, **{o.value: 0 for o in Outcome}}
        for name in plan.names
    ]
    for member in members:
        progress[member.stage]["assigned"] += 1
        progress[member.stage][member.outcome] += 1
    if selection is not None:
        canaries = set(json.loads(rollout.canary_ids))
        assigned = {m.device_id for m in members}
        for device in selection.online:
            if device.id not in assigned:
                point = cohort_point(rollout.id, device.id)
                progress[device_stage(plan, point, device.id in canaries)]["expected"] += 1
    for stage in progress:
        stage["expected"] += stage["assigned"]
    return progress


def failure_rule(
    plan: Plan, stage: int, assigned: int, failed: int, max_failure_rate: float
) -> dict[str, Any]:
    """The failure rule as it stands, for operators: with ``assigned`` devices counted so far,
    the rollout halts when more than ``allowed`` failed."""
    canary = plan.is_canary(stage)
    return {
        "text": (
            "halt on any failure in the canary stage; after it, halt when failed devices > "
            f"floor({max_failure_rate:.4g} x assigned devices)"
        ),
        "assigned": assigned,
        "failed": failed,
        "allowed": failure_allowance(assigned, max_failure_rate, canary),
        # the smallest sample in which one failure is tolerated
        "min_devices_for_one_failure": math.ceil(1 / max_failure_rate - 1e-9)
        if max_failure_rate > 0
        else None,
    }


def _view(session: Session, rollout: Rollout, now: datetime) -> dict[str, Any]:
    plan = _plan(rollout)
    members = _assignments(session, rollout)
    # Who is still expected, and who is skipped as offline, for a rollout still going (running
    # or paused). Once halted or ended, its counts are what it assigned: devices enrolling,
    # changing their role or going offline change nothing in them.
    selection = (
        _selected(session, rollout, rollout.release, now) if rollout.state in ACTIVE else None
    )
    member_ids = {m.device_id for m in members}
    counts = {o.value: 0 for o in Outcome}
    for member in members:
        counts[member.outcome] += 1
    acknowledged = json.loads(rollout.acknowledged or "[]")
    counted = [m for m in members if m.device_id not in set(acknowledged)]
    return {
        "id": rollout.id,
        "version": rollout.release.version,
        "state": rollout.state,
        "stage": rollout.stage,
        "stage_name": plan.names[rollout.stage],
        "stages": plan.names,
        "stage_started": iso(rollout.stage_started),
        "soak_s": rollout.soak_s,
        "max_failure_rate": rollout.max_failure_rate,
        "install_deadline_s": rollout.install_deadline_s,
        "rollback_on_halt": rollout.rollback_on_halt,
        "offline_after_s": rollout.offline_after_s,
        "windows": rollout_windows(rollout),
        # pending members whose last heartbeat says they wait for a maintenance window
        "waiting_window": _waiting_window(session, rollout, members),
        # selected devices offline for longer than offline_after_s, not assigned (while the
        # rollout is going)
        "skipped_offline": [d.id for d in selection.offline if d.id not in member_ids]
        if selection is not None
        else [],
        "reason": rollout.reason,
        "created": iso(rollout.created),
        "created_by": rollout.created_by,
        "counts": counts,
        "selector": json.loads(rollout.selector) if rollout.selector else None,
        "acknowledged": acknowledged,
        "stage_progress": _stage_progress(rollout, plan, members, selection),
        "failure_rule": failure_rule(
            plan,
            rollout.stage,
            len(counted),
            sum(1 for m in counted if m.outcome == Outcome.FAILED),
            rollout.max_failure_rate,
        ),
        "devices": [
            {
                "id": m.device_id,
                "stage": plan.names[m.stage],
                "outcome": m.outcome,
                "reason": m.reason,
            }
            for m in members
        ],
    }


def rollout_windows(rollout: Rollout) -> list[str]:
    """The rollout's maintenance windows (canonical entries); empty: any time."""
    return list(json.loads(rollout.windows)) if rollout.windows else []


def _waiting_window(session: Session, rollout: Rollout, members: Sequence[RolloutDevice]) -> int:
    """How many of the rollout's pending members last heartbeated ``waiting_window``: they
    hold the assignment and wait for a window (theirs or the rollout's) to start."""
    if not any(m.outcome == Outcome.PENDING for m in members):
        return 0
    return int(
        session.scalar(
            select(func.count())
            .select_from(RolloutDevice)
            .join(Device, Device.id == RolloutDevice.device_id)
            .where(
                RolloutDevice.rollout_id == rollout.id,
                RolloutDevice.outcome == Outcome.PENDING,
                Device.state == WAITING_WINDOW,
            )
        )
        or 0
    )


def assignment_windows(session: Session, device_id: str, release_id: int) -> list[str]:
    """The windows a device's assignment of ``release_id`` carries: those of the newest
    rollout that made the device a member and rolls out that release (empty when none does:
    an operator's assignment, a rollback to the release a device ran before)."""
    rollout = session.scalars(
        select(Rollout)
        .join(RolloutDevice, RolloutDevice.rollout_id == Rollout.id)
        .where(RolloutDevice.device_id == device_id, Rollout.release_id == release_id)
        .order_by(Rollout.id.desc())
        .limit(1)
    ).first()
    return rollout_windows(rollout) if rollout is not None else []


def status(db: Database, now: datetime) -> dict[str, Any]:
    """Every rollout (newest first) as of ``now`` and the emergency stop."""
    with db.read() as session:
        rollouts = session.scalars(select(Rollout).order_by(Rollout.id.desc())).all()
        return {
            "rollouts": [_view(session, r, now) for r in rollouts],
            "emergency_stop": emergency_stop_view(session),
        }


def emergency_stop_view(session: Session) -> dict[str, Any]:
    """The emergency stop as operators see it (:func:`control_view`): off until first used."""
    return control_view(session.get(FleetControl, 1) or FleetControl(id=1, emergency_stop=False))


# What an install deadline must leave beyond the longest wait for a rollout's window (clock
# changes included: fleet_core.windows.longest_wait_s): an hour to install.
WINDOW_DEADLINE_MARGIN_S = 3600
# The heartbeat's updater_state of a device that holds an assignment and waits for a window
# (updater.daemon.WAITING_STATE; docs/device-protocol.md).
WAITING_WINDOW = "waiting_window"

# The fields of a rollout's view (:func:`get`) that a list of rollouts shows.
SUMMARY_FIELDS = (
    "id", "version", "state", "stage", "stage_name", "stages", "created", "created_by", "counts",
)  # fmt: skip


def summaries(db: Database, rollout_ids: Sequence[int]) -> list[dict[str, Any]]:
    """The rollouts of ``rollout_ids`` (unknown ones left out), newest first, each as the
    :data:`SUMMARY_FIELDS` of its view: their members counted by one grouped query, never
    loaded, and no device selected (a list of rollouts of a large fleet would otherwise load
    every member of each)."""
    found: list[dict[str, Any]] = []
    with db.read() as session:
        for first in range(0, len(rollout_ids), ENROLLED_CHECK_BATCH):
            batch = rollout_ids[first : first + ENROLLED_CHECK_BATCH]
            counts = {rollout_id: {o.value: 0 for o in Outcome} for rollout_id in batch}
            for rollout_id, outcome, count in session.execute(
                select(RolloutDevice.rollout_id, RolloutDevice.outcome, func.count())
                .join(Device, Device.id == RolloutDevice.device_id)
                .where(RolloutDevice.rollout_id.in_(batch))
                .group_by(RolloutDevice.rollout_id, RolloutDevice.outcome)
            ):
                counts[rollout_id][outcome] += count
            rows = session.scalars(
                select(Rollout).options(joinedload(Rollout.release)).where(Rollout.id.in_(batch))
            )
            for rollout in rows:
                plan = _plan(rollout)
                found.append(
                    {
                        "id": rollout.id,
                        "version": rollout.release.version,
                        "state": rollout.state,
                        "stage": rollout.stage,
                        "stage_name": plan.names[rollout.stage],
                        "stages": plan.names,
                        "created": iso(rollout.created),
                        "created_by": rollout.created_by,
                        "counts": counts[rollout.id],
                    }
                )
    return sorted(found, key=lambda summary: summary["id"], reverse=True)


def get(db: Database, rollout_id: int, now: datetime) -> dict[str, Any]:
    """One rollout, as of ``now``.

    Raises:
        UnknownRolloutError: no such rollout.
    """
    with db.read() as session:
        return _view(session, _rollout(session, rollout_id), now)
