"""Enrolled devices: check-ins, heartbeats, events, assignments, and the operators' view.

A device's *state* (for listings and metrics) comes from its last heartbeat: ``safe_mode`` when
it runs its safe-mode slot, ``trial`` during a trial boot, otherwise the updater's own state
(``idle``, ``downloading``, ...); a device that never sent a heartbeat is ``enrolled``.

Its *status* is what operators made of it (``DeviceStatus``): ``active``; ``quarantined``,
which checks in and reports but is answered "nothing assigned" (its assignment is kept for
when it is released) and which rollouts skip; ``decommissioned``, whose sessions were ended and
whose key opens none, checks in, reports and enrolls no more until an operator reinstates it
(``fleet device reinstate``; it then opens a session with its key as before). Each change is
audited with its reason.

Operators also rename a device (its hostname, unique among devices whatever its case, as DNS names
are: references by hostname stay unambiguous) and remove one: its record, sessions and
pre-authorization go, so it must be admitted again (an enrollment token or a new pre-authorization)
to come back; its audit entries stay. Removing does not stop a device (one that still holds a valid
enrollment token enrolls again): decommission it to refuse its key, and a decommissioned device
cannot be removed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, selectinload

from server import audit
from server.assignment import SignedAnswer, assignment_etag, etag_matches, signed_answer
from server.contacts import record_contact
from server.database import AUDIT_CHAIN_LOCK, Database
from server.errors import (
    DeviceStatusConflictError,
    HostnameTakenError,
    IncompatibleReleaseError,
    UnknownDeviceError,
    UnknownReleaseError,
)
from server.models import (
    AuditRow,
    Device,
    DeviceSession,
    DeviceStatus,
    PreauthorizedKey,
    Release,
    Rollout,
)
from server.rollouts import ACTIVE, assignment_windows
from server.schemas import Event, Heartbeat
from server.settings import LAST_SEEN_RESOLUTION_S, iso
from signing.keys import SigningKey

NEVER_REPORTED = "enrolled"


def _device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise UnknownDeviceError(f"device {device_id} is not enrolled")
    return device


def _locked_device(db: Database, session: Session, device_id: str) -> Device:
    """The device's row, locked until the transaction ends, for a change that is audited.

    The audit chain's lock is taken first: the rollout evaluator holds it while it changes
    device rows, so a transaction that locked a device row and then waited for the chain would
    deadlock with it (PostgreSQL; SQLite's one writer cannot)."""
    db.lock(session, AUDIT_CHAIN_LOCK)
    device = session.get(Device, device_id, with_for_update=True)
    if device is None:
        raise UnknownDeviceError(f"device {device_id} is not enrolled")
    return device


@dataclass(frozen=True)
class NotModified:
    """A check-in whose ``If-None-Match`` names the current assignment."""

    etag: str


def check_in(
    db: Database,
    device_id: str,
    nonce: str,
    if_none_match: str | None,
    server_key: SigningKey,
    now: datetime,
    active_checkin_interval_s: int | None = None,
) -> SignedAnswer | NotModified:
    """Answer with the device's assignment, signed, and note that the device was seen.

    The common case, an unchanged answer (``304``) from a device seen recently, only reads:
    ``last_seen`` is refreshed when the stored one is older than ``LAST_SEEN_RESOLUTION_S``.
    While a rollout is running or paused, the answer asks for check-ins every
    ``active_checkin_interval_s``. A quarantined device is answered "nothing assigned".

    Raises:
        UnknownDeviceError: no such device.
    """
    with db.read() as session:
        row = session.execute(
            select(Device.last_seen, Release.manifest_sha256, Release.id)
            .outerjoin(
                Release,
                (Release.id == Device.assigned_release_id)
                & (Device.status != DeviceStatus.QUARANTINED),
            )
            .where(Device.id == device_id)
        ).first()
        if row is None:
            raise UnknownDeviceError(f"device {device_id} is not enrolled")
        active = session.scalars(
            select(Rollout.id).where(Rollout.state.in_(ACTIVE)).limit(1)
        ).first()
        windows = assignment_windows(session, device_id, row.id) if row.id is not None else []
    interval = active_checkin_interval_s if active is not None else None
    fresh = now - row.last_seen < timedelta(seconds=LAST_SEEN_RESOLUTION_S)
    etag = assignment_etag(device_id, row.manifest_sha256, interval, windows)
    if fresh and etag_matches(if_none_match, etag):
        return NotModified(etag)
    with db.write() as session:
        device = _device(session, device_id)
        record_contact(session, device, now)
        release = None
        if device.assigned_release_id is not None and device.status != DeviceStatus.QUARANTINED:
            release = session.scalars(
                select(Release)
                .options(selectinload(Release.images))
                .where(Release.id == device.assigned_release_id)
            ).one()
        windows = assignment_windows(session, device_id, release.id) if release else []
    etag = assignment_etag(
        device_id, release.manifest_sha256 if release else None, interval, windows
    )
    if etag_matches(if_none_match, etag):
        return NotModified(etag)
    return signed_answer(device_id, nonce, release, server_key, interval, windows)


def device_state(heartbeat: Heartbeat) -> str:
    """The one word that summarises a device in listings and metrics."""
    if heartbeat.safe_mode:
        return "safe_mode"
    if heartbeat.trial:
        return "trial"
    return heartbeat.updater_state


def record_heartbeat(db: Database, device_id: str, heartbeat: Heartbeat, now: datetime) -> None:
    """Keep the heartbeat as the device's latest, with when it arrived (server clock).

    The clock skew kept is the device's own report (it measured it against the server's
    ``Date`` header); without one, the server computes it from the device's clock.

    Raises:
        UnknownDeviceError: no such device.
    """
    with db.write() as session:
        device = _device(session, device_id)
        record_contact(session, device, now)
        device.last_heartbeat = heartbeat.model_dump_json()
        device.last_heartbeat_at = now
        device.version = heartbeat.version
        device.state = device_state(heartbeat)
        device.role = heartbeat.role
        device.tags = json.dumps(sorted(set(heartbeat.tags))) if heartbeat.tags else None
        if heartbeat.clock_skew_s is not None:
            device.clock_skew_s = heartbeat.clock_skew_s
        elif heartbeat.clock is not None:
            device.clock_skew_s = now.timestamp() - heartbeat.clock


def record_events(db: Database, device_id: str, events: list[Event], now: datetime) -> list[Event]:
    """Append the events the server has not stored yet to the audit trail; returns them.

    An event whose ``seq`` is not above the highest stored for the device is a resend and is
    ignored, so a device may repeat a batch whose answer it lost.

    Raises:
        UnknownDeviceError: no such device.
    """
    stored = []
    with db.write() as session:
        # The row lock keeps two concurrent batches of one device from both storing a seq.
        device = _locked_device(db, session, device_id)
        record_contact(session, device, now)
        for event in sorted(events, key=lambda e: e.seq):
            if event.seq <= device.event_seq:
                continue
            audit.append(
                db,
                session,
                at=now,
                actor=f"device:{device_id}",
                action=event.event,
                subject=device_id,
                details={"seq": event.seq, "fields": event.fields},
            )
            device.event_seq = event.seq
            stored.append(event)
    return stored


def assign(
    db: Database, device_id: str, version: str | None, *, actor: str, now: datetime
) -> dict[str, Any]:
    """Assign the release ``version`` to the device (None: no release); returns the device.

    Raises:
        UnknownDeviceError: no such device.
        UnknownReleaseError: no such release.
        IncompatibleReleaseError: the release is for other devices (``compatible``).
    """
    with db.write() as session:
        device = _locked_device(db, session, device_id)
        previous = device.assigned_release.version if device.assigned_release else None
        if version is None:
            device.assigned_release = None
        else:
            release = session.scalars(select(Release).where(Release.version == version)).first()
            if release is None:
                raise UnknownReleaseError(f"no release {version!r}")
            if release.compatible != device.compatible:
                raise IncompatibleReleaseError(
                    f"release {version} is for {release.compatible!r}, device {device_id} is "
                    f"{device.compatible!r}"
                )
            device.assigned_release = release
        audit.append(
            db,
            session,
            at=now,
            actor=actor,
            action="device.assigned" if version is not None else "device.unassigned",
            subject=device_id,
            details={"version": version, "previous": previous},
        )
        session.flush()
        return describe(device)


def describe(device: Device, *, heartbeat: bool = False) -> dict[str, Any]:
    """The operators' view of a device; with ``heartbeat``, its last heartbeat too."""
    view: dict[str, Any] = {
        "id": device.id,
        "hostname": device.hostname,
        "compatible": device.compatible,
        "role": device.role,
        "tags": json.loads(device.tags) if device.tags else [],
        "enrolled": iso(device.enrolled),
        "last_seen": iso(device.last_seen),
        "version": device.version,
        "state": device.state or NEVER_REPORTED,
        "assigned_version": device.assigned_release.version if device.assigned_release else None,
        "clock_skew_s": device.clock_skew_s,
        "status": device.status,
        "status_reason": device.status_reason,
        "status_since": iso(device.status_since) if device.status_since else None,
    }
    if heartbeat:
        view["last_heartbeat"] = (
            json.loads(device.last_heartbeat) if device.last_heartbeat else None
        )
        view["last_heartbeat_at"] = (
            iso(device.last_heartbeat_at) if device.last_heartbeat_at else None
        )
    return view


def list_devices(db: Database) -> list[dict[str, Any]]:
    """Every enrolled device, in order of enrollment."""
    with db.read() as session:
        devices = session.scalars(
            select(Device)
            .options(selectinload(Device.assigned_release))
            .order_by(Device.enrolled, Device.id)
        ).all()
        return [describe(device) for device in devices]


def get_device(db: Database, device_id: str) -> dict[str, Any]:
    """One device, with its last heartbeat.

    Raises:
        UnknownDeviceError: no such device.
    """
    with db.read() as session:
        return describe(_device(session, device_id), heartbeat=True)


# What each status change starts from, where it leads, and its audit action.
_CHANGES = {
    "quarantine": ((DeviceStatus.ACTIVE,), DeviceStatus.QUARANTINED, "device.quarantined"),
    "release": ((DeviceStatus.QUARANTINED,), DeviceStatus.ACTIVE, "device.released"),
    "decommission": (
        (DeviceStatus.ACTIVE, DeviceStatus.QUARANTINED),
        DeviceStatus.DECOMMISSIONED,
        "device.decommissioned",
    ),
    "reinstate": ((DeviceStatus.DECOMMISSIONED,), DeviceStatus.ACTIVE, "device.reinstated"),
}


def change_status(
    db: Database, device_id: str, change: str, reason: str | None, *, actor: str, now: datetime
) -> dict[str, Any]:
    """Quarantine, release, decommission or reinstate the device; returns it.

    Decommissioning ends the device's sessions in the same transaction, so its session tokens
    are refused from the next request on.

    Raises:
        UnknownDeviceError: no such device.
        DeviceStatusConflictError: the device's status is not one the change starts from.
    """
    starts, status, action = _CHANGES[change]
    with db.write() as session:
        device = _locked_device(db, session, device_id)
        if device.status not in starts:
            raise DeviceStatusConflictError(
                f"device {device_id} is {device.status}: cannot {change} it"
            )
        previous = device.status
        device.status = status
        device.status_reason = reason
        device.status_since = now
        device.status_by = actor
        ended = 0
        if status == DeviceStatus.DECOMMISSIONED:
            result = session.execute(
                delete(DeviceSession).where(DeviceSession.device_id == device_id)
            )
            ended = result.rowcount  # type: ignore[attr-defined]
        audit.append(
            db,
            session,
            at=now,
            actor=actor,
            action=action,
            subject=device_id,
            details={"reason": reason, "previous": previous, "sessions_ended": ended},
        )
        session.flush()
        return describe(device)


def rename(
    db: Database, device_id: str, hostname: str, *, actor: str, now: datetime
) -> dict[str, Any]:
    """Give the device another hostname (as validated by the API: ``schemas.Hostname``); returns
    it. Renaming to its own hostname changes nothing and is not audited.

    Raises:
        UnknownDeviceError: no such device.
        HostnameTakenError: another device has that hostname.
    """
    with db.write() as session:
        # serialized with every audited change: two renames to one name cannot both see it free
        db.lock(session, AUDIT_CHAIN_LOCK)
        device = _device(session, device_id)
        if device.hostname == hostname:
            return describe(device)
        holder = session.scalars(
            # hostnames are DNS names: CAMERA-0000 is camera-0000's (and one reference finds both)
            select(Device.id).where(
                func.lower(Device.hostname) == hostname.lower(), Device.id != device_id
            )
        ).first()
        if holder is not None:
            raise HostnameTakenError(f"device {holder} is {hostname!r} already")
        previous, device.hostname = device.hostname, hostname
        audit.append(
            db, session, at=now, actor=actor, action="device.renamed", subject=device_id,
            details={"from": previous, "to": hostname},
        )  # fmt: skip
        session.flush()
        return describe(device)


def remove(db: Database, device_id: str, *, actor: str, now: datetime) -> dict[str, Any]:
    """Remove the device's record, sessions and pre-authorization (see the module docstring);
    returns the device as it was.

    A decommissioned device is refused: its record is what refuses its key, and without it
    the device would enroll again with any enrollment token it still holds.

    Raises:
        UnknownDeviceError: no such device.
        DeviceStatusConflictError: the device is decommissioned.
    """
    with db.write() as session:
        device = _locked_device(db, session, device_id)
        if device.status == DeviceStatus.DECOMMISSIONED:
            raise DeviceStatusConflictError(
                f"device {device_id} is decommissioned: removing it would let its key enroll "
                "again (a token it holds would admit it); it stays, refused"
            )
        view = describe(device)
        preauthorized = session.execute(
            delete(PreauthorizedKey).where(PreauthorizedKey.key_id == device_id)
        ).rowcount  # type: ignore[attr-defined]
        session.delete(device)  # sessions and rollout memberships go with it (ON DELETE CASCADE)
        audit.append(
            db, session, at=now, actor=actor, action="device.removed", subject=device_id,
            details={"hostname": view["hostname"], "status": view["status"],
                     "version": view["version"], "preauthorization_removed": bool(preauthorized)},
        )  # fmt: skip
        return view


RECENT_AUDIT_WINDOW = 10_000  # how far back in the audit trail a device's recent entries are sought


def recent_entries(db: Database, device_id: str, limit: int) -> list[dict[str, Any]]:
    """The device's newest ``limit`` audit entries (its events, and what operators did to it;
    a rollout's entries name the rollout instead), oldest first, among the trail's last
    ``RECENT_AUDIT_WINDOW`` entries: a bounded scan whatever the trail's length.

    Raises:
        UnknownDeviceError: no such device.
    """
    with db.read() as session:
        _device(session, device_id)
        newest = session.scalar(select(AuditRow.seq).order_by(AuditRow.seq.desc()).limit(1)) or 0
        rows = session.scalars(
            select(AuditRow)
            .where(
                AuditRow.seq > newest - RECENT_AUDIT_WINDOW,
                (AuditRow.actor == f"device:{device_id}") | (AuditRow.subject == device_id),
            )
            .order_by(AuditRow.seq.desc())
            .limit(limit)
        ).all()
        return [audit.AuditEntry.from_row(row).to_dict() for row in reversed(rows)]
