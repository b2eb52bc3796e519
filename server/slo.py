"""The roadmap's success metrics, measured from the server's own records (``fleet slo report``).

What is measured, and exactly how, is docs/slo.md; in short, for a window ``[since, until)``:

- **uptime**: the share of device-time the devices were in contact. A device silent for longer
  than :data:`OFFLINE_AFTER_S` (the DeviceOffline alert's threshold) is down from its last
  contact until the contact that ended the silence (or the window's end). The silences are the
  ``contact_gaps`` rows that :func:`server.contacts.record_contact` writes, once per silence;
- **update success**: the rollout assignments the engine judged in the window, succeeded
  against failed;
- **update latency**: per device, its assignment to its committed heartbeat; per rollout, its
  release's upload to the rollout reaching its 100 % stage, and to its completion;
- **incidents**: rollout halts and device silences that fired the DeviceOffline alert, each
  with when the fault began (as far as the server can know), when it was detected and when it
  was repaired; their means are MTTD and MTTR.

Uptime counts every silence known when the report is made (one that spans the window's end is
down time once it has lasted longer than the threshold). The rollout figures and the incidents
count only what was recorded before ``until``: a report of a past window reads the same later.
Every figure without data is None (``no data``), never a division by zero.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.audit import audit_time
from server.contacts import CONTACT_GAPS, OFFLINE_AFTER_S, OFFLINE_ALERT_FOR_S
from server.database import Database
from server.models import (
    AuditRow,
    ContactGap,
    Device,
    DeviceStatus,
    RecordEpoch,
    Release,
    Rollout,
    RolloutDevice,
)
from server.rollouts import FAILURE_EVENTS
from server.settings import iso

NO_ROLE = "(none)"
REMOVED = "(removed)"
# Rollout entries of the audit trail that the report reads.
SUCCEEDED = "rollout.device_succeeded"
FAILED = "rollout.device_failed"
HALTED = "rollout.halted"
REPAIRS = ("rollout.resumed", "rollout.aborted", "rollout.rolled_back")
PROMOTED = "rollout.promoted"
COMPLETED = "rollout.completed"
FULL_STAGE = "100%"


def percentile(values: Sequence[float], percent: float) -> float:
    """The nearest-rank percentile of ``values`` (not empty): the smallest value with at least
    ``percent`` % of them at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(percent / 100 * len(ordered) - 1e-9))
    return ordered[rank - 1]


def distribution(values: Sequence[float]) -> dict[str, Any]:
    """Count, p50, p95, max and mean of durations in seconds; None for each without data."""
    if not values:
        return {"count": 0, "p50_s": None, "p95_s": None, "max_s": None, "mean_s": None}
    return {
        "count": len(values),
        "p50_s": _seconds(percentile(values, 50)),
        "p95_s": _seconds(percentile(values, 95)),
        "max_s": _seconds(max(values)),
        "mean_s": _seconds(sum(values) / len(values)),
    }


def ratio(part: float, whole: float) -> float | None:
    """``part / whole``, or None when ``whole`` is zero (no data)."""
    return part / whole if whole > 0 else None


def overlap(start: datetime, end: datetime, lower: datetime, upper: datetime) -> float:
    """Seconds of ``[start, end)`` inside ``[lower, upper)``."""
    return max(0.0, (min(end, upper) - max(start, lower)).total_seconds())


def _seconds(value: float) -> float:
    return round(value, 3)


@dataclass(frozen=True)
class Window:
    """The report's window: ``[since, until)``, and the time the report is made (``now``);
    nothing after ``min(until, now)`` is known."""

    since: datetime
    until: datetime
    now: datetime

    @property
    def end(self) -> datetime:
        return min(self.until, self.now)

    def holds(self, moment: datetime) -> bool:
        return self.since <= moment < self.end


@dataclass
class _Tally:
    """Succeeded and failed assignments, and assignment-to-commit durations, of one group."""

    succeeded: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    latencies: list[float] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        return {
            "succeeded": self.succeeded,
            "failed": self.failed,
            "success_rate": ratio(self.succeeded, self.succeeded + self.failed),
            "failure_reasons": dict(sorted(self.reasons.items())),
            "assignment_to_commit": distribution(self.latencies),
        }


@dataclass(frozen=True)
class Incident:
    """A fault the server saw: when it began (``fault``), was detected and was repaired (None:
    still open at the window's end)."""

    kind: str  # rollout_halt, device_offline
    subject: str  # rollout:ID, or the device id
    stage: str | None  # a halt's stage
    role: str | None  # an offline device's role
    fault: datetime
    detected: datetime
    repaired: datetime | None

    def view(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "stage": self.stage,
            "role": self.role,
            "fault": iso(self.fault),
            "detected": iso(self.detected),
            "repaired": iso(self.repaired) if self.repaired else None,
            "detection_s": _seconds((self.detected - self.fault).total_seconds()),
            "repair_s": _seconds((self.repaired - self.detected).total_seconds())
            if self.repaired
            else None,
        }


def _incident_summary(incidents: Sequence[Incident]) -> dict[str, Any]:
    detections = [(i.detected - i.fault).total_seconds() for i in incidents]
    repairs = [(i.repaired - i.detected).total_seconds() for i in incidents if i.repaired]
    return {
        "count": len(incidents),
        "open": sum(1 for i in incidents if i.repaired is None),
        "mttd_s": _seconds(sum(detections) / len(detections)) if detections else None,
        "mttr_s": _seconds(sum(repairs) / len(repairs)) if repairs else None,
    }


def _stage_names(rollout: Rollout) -> list[str]:
    canary = ["canary"] if json.loads(rollout.canary_ids) else []
    return canary + [f"{p}%" for p in json.loads(rollout.stages)]


def stage_order(name: str) -> tuple[int, float, str]:
    """Stages in a plan's order: the canary stage, the percentages rising, then the rest."""
    if name == "canary":
        return (0, 0.0, name)
    number = name.removesuffix("%")
    if name.endswith("%") and number.isdigit():
        return (1, float(number), name)
    return (2, 0.0, name)


def _stage_name(names: Sequence[str], index: int | None) -> str:
    if index is None or not 0 <= index < len(names):
        return "(unknown)"
    return names[index]


def _parse_at(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z")


def _rollout_id(subject: str | None) -> int | None:
    if subject is None or not subject.startswith("rollout:"):
        return None
    tail = subject.removeprefix("rollout:")
    return int(tail) if tail.isdigit() else None


@dataclass(frozen=True)
class _Entry:
    at: datetime
    action: str
    rollout_id: int | None
    actor: str
    details: dict[str, Any]


def _entries(
    session: Session,
    actions: Iterable[str],
    since: datetime,
    before: datetime,
    actors: Iterable[str] | None = None,
) -> list[_Entry]:
    """The audit entries of ``actions`` (by ``actors``, when given) recorded from ``since`` to
    before ``before``, oldest first."""
    query = select(
        AuditRow.at, AuditRow.action, AuditRow.subject, AuditRow.actor, AuditRow.details
    ).where(
        AuditRow.action.in_(list(actions)),
        AuditRow.at >= audit_time(since),
        AuditRow.at < audit_time(before),
    )
    if actors is not None:
        query = query.where(AuditRow.actor.in_(list(actors)))
    found = []
    for at, action, subject, actor, details in session.execute(query.order_by(AuditRow.seq)):
        try:
            parsed = json.loads(details)
        except ValueError:
            parsed = {}
        found.append(
            _Entry(
                _parse_at(at),
                action,
                _rollout_id(subject),
                actor,
                parsed if isinstance(parsed, dict) else {},
            )
        )
    return found


def report(db: Database, window: Window) -> dict[str, Any]:
    """The report of ``window`` (docs/slo.md): every figure, and each objective beside its
    target. Reads only; one read transaction, so the figures agree with each other."""
    with db.read() as session:
        epoch_row = session.get(RecordEpoch, CONTACT_GAPS)
        epoch = epoch_row.since if epoch_row is not None else window.end
        devices = {d.id: d for d in session.scalars(select(Device))}
        rollouts = {r.id: r for r in session.scalars(select(Rollout))}
        releases = {
            r.id: (r.created, r.version)
            for r in session.execute(select(Release.id, Release.created, Release.version))
        }
        members = {(m.rollout_id, m.device_id): m for m in session.scalars(select(RolloutDevice))}
        gaps = list(
            session.scalars(
                select(ContactGap)
                .where(ContactGap.ended > window.since, ContactGap.started < window.end)
                .order_by(ContactGap.device_id, ContactGap.started)
            )
        )
        outcomes = _entries(session, (SUCCEEDED, FAILED), window.since, window.end)
        lifecycle = _entries(
            session, (HALTED, *REPAIRS, "rollout.started", PROMOTED, COMPLETED), window.since,
            window.end,
        )  # fmt: skip
        tripped = _tripping_failures(lifecycle, outcomes)
        failure_events = _failure_reports(session, tripped, members, window.end)
    roles = {device_id: d.role or NO_ROLE for device_id, d in devices.items()}
    stage_names = {rollout_id: _stage_names(r) for rollout_id, r in rollouts.items()}

    uptime = _uptime(window, epoch, devices.values(), gaps, roles)
    updates = _updates(window, outcomes, members, roles, stage_names)
    releases_view = _to_full(window, lifecycle, rollouts, releases, stage_names)
    incidents = _halts(window, lifecycle, tripped, failure_events, members, stage_names)
    incidents += _offline(window, epoch, devices.values(), gaps, roles)
    incidents.sort(key=lambda i: (i.detected, i.kind, i.subject))
    incident_view = _incident_summary(incidents)
    by_kind: dict[str, list[Incident]] = defaultdict(list)
    by_stage: dict[str, list[Incident]] = defaultdict(list)
    by_role: dict[str, list[Incident]] = defaultdict(list)
    for incident in incidents:
        by_kind[incident.kind].append(incident)
        if incident.stage is not None:
            by_stage[incident.stage].append(incident)
        if incident.role is not None:
            by_role[incident.role].append(incident)
    incident_view["by_kind"] = {k: _incident_summary(v) for k, v in sorted(by_kind.items())}
    incident_view["by_stage"] = {
        k: _incident_summary(by_stage[k]) for k in sorted(by_stage, key=stage_order)
    }
    incident_view["by_role"] = {k: _incident_summary(v) for k, v in sorted(by_role.items())}
    incident_view["incidents"] = [i.view() for i in incidents]

    return {
        "window": {"since": iso(window.since), "until": iso(window.until)},
        "generated": iso(window.now),
        "contact_record_since": iso(epoch) if epoch is not None else None,
        "objectives": objectives(uptime, updates, incident_view),
        "uptime": uptime,
        "updates": updates,
        "releases": releases_view,
        "incidents": incident_view,
    }


def _down_intervals(
    device: Device, gaps: Sequence[ContactGap], end: datetime, now: datetime
) -> list[tuple[datetime, datetime]]:
    """When ``device`` was down up to ``end``: its recorded silences, and the one it is in
    when the report is made (``now``), once that has lasted longer than the threshold."""
    threshold = timedelta(seconds=OFFLINE_AFTER_S)
    down = [(g.started, g.ended) for g in gaps if g.ended - g.started > threshold]
    if device.last_seen < end and now - device.last_seen > threshold:
        down.append((device.last_seen, end))
    return down


def _observed(device: Device, lower: datetime, end: datetime) -> tuple[datetime, datetime]:
    """The part of ``[lower, end)`` the device counts for: from its enrollment, and not after
    it was decommissioned (its key is refused from then: it cannot be in contact)."""
    begin = max(lower, device.enrolled)
    if device.status == DeviceStatus.DECOMMISSIONED and device.status_since is not None:
        end = min(end, device.status_since)
    return begin, max(begin, end)


def _known(device: Device, window: Window) -> datetime:
    """Until when the device's silences count: the report's time, or, for a decommissioned
    device, when it was decommissioned (a silence that had not lasted longer than the threshold
    then was not down time: the device was refused from then)."""
    if device.status == DeviceStatus.DECOMMISSIONED and device.status_since is not None:
        return min(window.now, device.status_since)
    return window.now


def _uptime(
    window: Window,
    epoch: datetime | None,
    devices: Iterable[Device],
    gaps: Sequence[ContactGap],
    roles: dict[str, str],
) -> dict[str, Any]:
    lower = max(window.since, epoch) if epoch is not None else window.since
    by_device: dict[str, list[ContactGap]] = defaultdict(list)
    for gap in gaps:
        by_device[gap.device_id].append(gap)
    observed: dict[str, float] = defaultdict(float)
    down: dict[str, float] = defaultdict(float)
    counted: dict[str, int] = defaultdict(int)
    for device in devices:
        begin, end = _observed(device, lower, window.end)
        seconds = (end - begin).total_seconds()
        if seconds <= 0:
            continue
        lost = sum(
            overlap(start, stop, begin, end)
            for start, stop in _down_intervals(
                device, by_device[device.id], end, _known(device, window)
            )
        )
        role = roles[device.id]
        observed[role] += seconds
        down[role] += min(lost, seconds)
        counted[role] += 1

    def view(devices_n: int, seen: float, lost: float) -> dict[str, Any]:
        share = ratio(seen - lost, seen)
        return {
            "devices": devices_n,
            "observed_s": _seconds(seen),
            "down_s": _seconds(lost),
            "uptime": share,
        }

    total = view(sum(counted.values()), sum(observed.values()), sum(down.values()))
    total["from"] = iso(lower) if lower < window.end else None
    total["by_role"] = {
        role: view(counted[role], observed[role], down[role]) for role in sorted(observed)
    }
    return total


def _updates(
    window: Window,
    outcomes: Sequence[_Entry],
    members: dict[tuple[int, str], RolloutDevice],
    roles: dict[str, str],
    stage_names: dict[int, list[str]],
) -> dict[str, Any]:
    total = _Tally()
    by_stage: dict[str, _Tally] = defaultdict(_Tally)
    by_role: dict[str, _Tally] = defaultdict(_Tally)
    for entry in outcomes:
        device_id = entry.details.get("device")
        if not window.holds(entry.at) or entry.rollout_id is None or not isinstance(device_id, str):
            continue
        member = members.get((entry.rollout_id, device_id))
        names = stage_names.get(entry.rollout_id, [])
        stage_index = member.stage if member is not None else entry.details.get("stage")
        stage = _stage_name(names, stage_index if isinstance(stage_index, int) else None)
        role = roles.get(device_id, REMOVED)
        tallies = (total, by_stage[stage], by_role[role])
        for tally in tallies:
            if entry.action == SUCCEEDED:
                tally.succeeded += 1
            else:
                tally.failed += 1
                tally.reasons[str(entry.details.get("reason"))] += 1
        if entry.action == SUCCEEDED and member is not None and member.committed_since:
            latency = max(0.0, (member.committed_since - member.assigned_at).total_seconds())
            for tally in tallies:
                tally.latencies.append(latency)
    view = total.view()
    view["by_stage"] = {k: by_stage[k].view() for k in sorted(by_stage, key=stage_order)}
    view["by_role"] = {k: v.view() for k, v in sorted(by_role.items())}
    return view


def _to_full(
    window: Window,
    lifecycle: Sequence[_Entry],
    rollouts: dict[int, Rollout],
    uploaded: dict[int, tuple[datetime, str]],
    stage_names: dict[int, list[str]],
) -> dict[str, Any]:
    """Per rollout that reached its 100 % stage in the window: its release's upload to that
    moment (every selected device assigned), and to its completion when it completed."""
    reached: dict[int, datetime] = {}
    completed: dict[int, datetime] = {}
    for entry in lifecycle:
        if entry.rollout_id not in rollouts:
            continue
        names = stage_names[entry.rollout_id]
        full = (entry.action == PROMOTED and entry.details.get("to") == FULL_STAGE) or (
            entry.action == "rollout.started" and names == [FULL_STAGE]
        )
        if full:
            reached.setdefault(entry.rollout_id, entry.at)
        elif entry.action == COMPLETED:
            completed.setdefault(entry.rollout_id, entry.at)
    listed: list[dict[str, Any]] = []
    for rollout_id, moment in sorted(reached.items()):
        if not window.holds(moment):
            continue
        rollout = rollouts[rollout_id]
        upload, version = uploaded[rollout.release_id]
        done = completed.get(rollout_id)
        listed.append(
            {
                "rollout": rollout_id,
                "version": version,
                "uploaded": iso(upload),
                "full_stage": iso(moment),
                "upload_to_full_s": _seconds((moment - upload).total_seconds()),
                "completed": iso(done) if done else None,
                "upload_to_completed_s": _seconds((done - upload).total_seconds())
                if done
                else None,
            }
        )
    return {
        "upload_to_full": distribution([r["upload_to_full_s"] for r in listed]),
        "rollouts": listed,
    }


def _tripping_failures(
    lifecycle: Sequence[_Entry], outcomes: Sequence[_Entry]
) -> dict[tuple[int, datetime], list[_Entry]]:
    """Per halt (its rollout and time): the failures that tripped the failure rule, the ones
    the engine judged in the evaluation that halted it (an evaluation judges the outcomes
    first, then decides, in one transaction at one time)."""
    halts = {(e.rollout_id, e.at) for e in lifecycle if e.action == HALTED and e.rollout_id}
    tripped: dict[tuple[int, datetime], list[_Entry]] = defaultdict(list)
    for entry in outcomes:
        if entry.action == FAILED and entry.rollout_id and (entry.rollout_id, entry.at) in halts:
            tripped[(entry.rollout_id, entry.at)].append(entry)
    return tripped


def _failure_reports(
    session: Session,
    tripped: dict[tuple[int, datetime], list[_Entry]],
    members: dict[tuple[int, str], RolloutDevice],
    before: datetime,
) -> list[_Entry]:
    """The failure events of the devices whose failures tripped a halt, from the earliest of
    their assignments on: where each fault began."""
    failed = [(rollout_id, str(f.details.get("device"))) for (rollout_id, _), fs in
              tripped.items() for f in fs]  # fmt: skip
    assigned = [members[key].assigned_at for key in failed if key in members]
    if not failed or not assigned:
        return []
    actors = sorted({f"device:{device_id}" for _, device_id in failed})
    return _entries(session, FAILURE_EVENTS, min(assigned), before, actors)


def _halts(
    window: Window,
    lifecycle: Sequence[_Entry],
    tripped: dict[tuple[int, datetime], list[_Entry]],
    failure_events: Sequence[_Entry],
    members: dict[tuple[int, str], RolloutDevice],
    stage_names: dict[int, list[str]],
) -> list[Incident]:
    """Each halt detected in the window: the fault began at the earliest of the failures that
    tripped it (the device's failure event as the server received it; for a device past its
    install deadline, its assignment, the earliest it could have gone wrong; for a safe-mode
    heartbeat, the judgement), detected at the halt, repaired by the operator's resume, abort
    or rollback."""
    reports: dict[tuple[str, str], list[datetime]] = defaultdict(list)
    for event in failure_events:
        reports[(event.actor.removeprefix("device:"), event.action)].append(event.at)
    found = []
    for index, entry in enumerate(lifecycle):
        rollout_id = entry.rollout_id
        if rollout_id is None or entry.action != HALTED or not window.holds(entry.at):
            continue
        faults = [
            _fault_began(f, rollout_id, members, reports)
            for f in tripped.get((rollout_id, entry.at), [])
        ]
        repaired = next(
            (
                later.at
                for later in lifecycle[index + 1 :]
                if later.rollout_id == rollout_id and later.action in REPAIRS
            ),
            None,
        )
        stage = entry.details.get("stage")
        found.append(
            Incident(
                kind="rollout_halt",
                subject=f"rollout:{rollout_id}",
                stage=_stage_name(
                    stage_names.get(rollout_id, []), stage if isinstance(stage, int) else None
                ),
                role=None,
                fault=min(faults, default=entry.at),
                detected=entry.at,
                repaired=repaired,
            )
        )
    return found


def _fault_began(
    failure: _Entry,
    rollout_id: int,
    members: dict[tuple[int, str], RolloutDevice],
    reports: dict[tuple[str, str], list[datetime]],
) -> datetime:
    """When the failure the engine judged at ``failure.at`` began, as far as the server knows."""
    device_id = str(failure.details.get("device"))
    reason = str(failure.details.get("reason"))
    member = members.get((rollout_id, device_id))
    assigned = member.assigned_at if member is not None else None
    if reason == "install_deadline" and assigned is not None:
        return min(assigned, failure.at)
    received = [
        at
        for at in reports.get((device_id, reason), [])
        if at <= failure.at and (assigned is None or at >= assigned)
    ]
    return min(received, default=failure.at)


def _offline(
    window: Window,
    epoch: datetime | None,
    devices: Iterable[Device],
    gaps: Sequence[ContactGap],
    roles: dict[str, str],
) -> list[Incident]:
    """Each silence whose DeviceOffline alert fired in the window: the fault began at the
    device's last contact, was detected when the alert fired (``OFFLINE_AFTER_S`` then
    ``OFFLINE_ALERT_FOR_S`` later) and was repaired by the contact that ended the silence."""
    fires = timedelta(seconds=OFFLINE_AFTER_S + OFFLINE_ALERT_FOR_S)
    lower = max(window.since, epoch) if epoch is not None else window.since
    by_device: dict[str, list[ContactGap]] = defaultdict(list)
    for gap in gaps:
        by_device[gap.device_id].append(gap)
    found = []
    for device in devices:
        begin, end = _observed(device, lower, window.end)
        silences: list[tuple[datetime, datetime | None]] = [
            (g.started, g.ended if g.ended <= window.end else None) for g in by_device[device.id]
        ]
        if not any(g.ended >= window.end for g in by_device[device.id]):
            silences.append((device.last_seen, None))
        for started, ended in silences:
            detected = started + fires
            if ended is not None and ended <= detected:
                continue  # back before the alert fired
            if not begin <= detected < end:
                continue
            found.append(
                Incident(
                    kind="device_offline",
                    subject=device.id,
                    stage=None,
                    role=roles[device.id],
                    fault=started,
                    detected=detected,
                    repaired=ended,
                )
            )
    return found


@dataclass(frozen=True)
class Objective:
    """A success metric of the roadmap: ``measured`` meets it when ``measured op target``."""

    name: str
    title: str
    target: float
    op: str  # ">=" or "<"
    unit: str  # ratio, s
    measured_by: str  # where the figure is in the report, or why it is not measured here


OBJECTIVES = (
    Objective("uptime", "Uptime", 0.999, ">=", "ratio", "uptime.uptime"),
    Objective("update_success", "Update success rate", 0.99, ">=", "ratio",
              "updates.success_rate"),
    Objective("mttd", "Mean time to detection", 180, "<", "s", "incidents.mttd_s"),
    Objective("mttr", "Mean time to recovery", 900, "<", "s", "incidents.mttr_s"),
    Objective("update_latency", "Update latency (assignment to commit, p95)", 300, "<", "s",
              "updates.assignment_to_commit.p95_s"),
    Objective("alert_false_positives", "Alert false positive rate", 0.05, "<", "ratio",
              "not measured here: Alertmanager knows which alerts fired, not the server"),
    Objective("dashboard_load", "Dashboard load time", 2, "<", "s",
              "not measured here: a browser's measure"),
    Objective("agent_cpu", "Agent CPU usage", 0.05, "<", "ratio",
              "not measured here: fleet_updater_cpu_usage_ratio in Prometheus"),
    Objective("agent_memory", "Agent memory usage", 100_000_000, "<", "bytes",
              "not measured here: the updater's metrics in Prometheus"),
    Objective("network", "Network usage per device per day", 100_000_000, "<", "bytes",
              "not measured here: fleet_updater_network_*_bytes_total in Prometheus"),
)  # fmt: skip
MET, MISSED, NO_DATA, NOT_MEASURED = "met", "missed", "no data", "not measured"


def objectives(
    uptime: dict[str, Any], updates: dict[str, Any], incidents: dict[str, Any]
) -> list[dict[str, Any]]:
    """Each roadmap objective with its target, the measured figure (None: no data, or not
    measured by the server) and whether it is met."""
    measured: dict[str, float | None] = {
        "uptime": uptime["uptime"],
        "update_success": updates["success_rate"],
        "mttd": incidents["mttd_s"],
        "mttr": incidents["mttr_s"],
        "update_latency": updates["assignment_to_commit"]["p95_s"],
    }
    listed = []
    for objective in OBJECTIVES:
        value = measured.get(objective.name)
        if objective.name not in measured:
            status = NOT_MEASURED
        elif value is None:
            status = NO_DATA
        elif value >= objective.target if objective.op == ">=" else value < objective.target:
            status = MET
        else:
            status = MISSED
        listed.append(
            {
                "name": objective.name,
                "title": objective.title,
                "target": objective.target,
                "comparison": objective.op,
                "unit": objective.unit,
                "measured": value,
                "status": status,
                "source": objective.measured_by,
            }
        )
    return listed
