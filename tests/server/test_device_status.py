"""Devices withdrawn by operators: decommissioned (sessions ended, key refused until reinstated)
and quarantined (checks in, reports, gets nothing, rollouts skip it); sessions capped per device
and never extended."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from server.models import AuditRow, Device, DeviceSession
from server.settings import DEFAULT_MAX_DEVICE_SESSIONS, SESSION_TTL_S
from tests.server.conftest import FakeDevice, Harness, at_once

Enrolled = Callable[..., FakeDevice]
MakeBundle = Callable[..., Path]
ROLES = ("none", "viewer", "operator", "admin")
CHANGES = ("quarantine", "release", "decommission", "reinstate")


def change(harness: Harness, device: FakeDevice, what: str, reason: str | None = None) -> Any:
    body = {} if reason is None else {"reason": reason}
    return harness.client.post(
        f"/api/v1/devices/{device.id}/{what}", json=body, headers=harness.operator
    )


def listed(harness: Harness, device: FakeDevice) -> dict[str, Any]:
    devices = harness.client.get("/api/v1/devices", headers=harness.viewer).json()["devices"]
    (found,) = [d for d in devices if d["id"] == device.id]
    return dict(found)


def stored(harness: Harness) -> tuple[Any, ...]:
    """Devices, sessions and the trail: a refused request leaves them as they were."""
    with harness.db.read() as session:
        devices = session.execute(
            select(Device.id, Device.status, Device.status_reason, Device.assigned_release_id)
        ).all()
        sessions = session.scalars(select(DeviceSession.token_sha256)).all()
        trail = session.scalars(select(AuditRow.seq)).all()
    return tuple(devices), tuple(sorted(sessions)), tuple(trail)


def sessions_of(harness: Harness, device: FakeDevice) -> int:
    with harness.db.read() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(DeviceSession)
                .where(DeviceSession.device_id == device.id)
            )
            or 0
        )


def assign(harness: Harness, device: FakeDevice, version: str) -> None:
    response = harness.client.post(
        f"/api/v1/devices/{device.id}/assignment",
        json={"version": version},
        headers=harness.operator,
    )
    assert response.status_code == 200, response.text


def assigned_version(response: Any) -> str | None:
    assert response.status_code == 200, response.text
    assignment = json.loads(response.json()["answer"])["assignment"]
    return None if assignment is None else str(assignment["version"])


# --- roles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_only_operators_change_a_device_status(
    harness: Harness, enrolled: Enrolled, role: str
) -> None:
    device = enrolled()
    headers = {} if role == "none" else harness.headers[role]
    before = stored(harness)
    answers = [
        harness.client.post(f"/api/v1/devices/{device.id}/{what}", json={}, headers=headers)
        for what in CHANGES
    ]
    if role in ("operator", "admin"):
        assert [a.status_code for a in answers] == [200, 200, 200, 200]
        assert [a.json()["status"] for a in answers] == [
            "quarantined",
            "active",
            "decommissioned",
            "active",
        ]
        return
    assert {a.status_code for a in answers} == {401 if role == "none" else 403}
    assert stored(harness) == before


# --- decommission -----------------------------------------------------------------------------


def test_a_decommissioned_device_is_refused_everywhere(
    harness: Harness, enrolled: Enrolled
) -> None:
    device = enrolled()
    other = enrolled(hostname="cam-0002")
    pending = device.challenge()  # issued before: still refused after
    assert sessions_of(harness, device) == 1
    done = change(harness, device, "decommission", "stolen from site 4")
    assert done.status_code == 200, done.text
    assert sessions_of(harness, device) == 0
    assert sessions_of(harness, other) == 1  # only its own sessions end
    before = stored(harness)
    refusals = [
        device.checkin(),
        device.heartbeat(),
        device.events(("install.started", 1)),
        harness.client.post(f"/api/v1/devices/{device.id}/challenge"),
        harness.client.post(
            f"/api/v1/devices/{device.id}/session", json=device.session_body(pending)
        ),
        device.enroll(harness.enrollment_token()),
    ]
    for response in refusals:
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "device_decommissioned"
    # the enrollment token made for the last attempt was not used up
    with harness.db.read() as session:
        trail_after = session.scalars(select(AuditRow.seq)).all()
    assert stored(harness)[:2] == before[:2]
    assert len(trail_after) == len(before[2]) + 1  # only the token's creation
    assert other.checkin().status_code == 200


def test_pre_authorizing_the_key_again_does_not_reinstate(
    harness: Harness, enrolled: Enrolled
) -> None:
    device = enrolled()
    change(harness, device, "decommission", "stolen")
    response = harness.client.post(
        "/api/v1/preauthorized-keys",
        json={"public_key": device.public_hex},
        headers=harness.operator,
    )
    assert response.status_code == 201
    assert device.enroll().status_code == 403
    assert listed(harness, device)["status"] == "decommissioned"


def test_a_reinstated_device_enrolls_and_opens_sessions_again(
    harness: Harness, enrolled: Enrolled
) -> None:
    device = enrolled()
    old_token = device.token
    change(harness, device, "decommission", "sent for repair")
    back = change(harness, device, "reinstate", "repaired")
    assert back.status_code == 200 and back.json()["status"] == "active"
    assert device.enroll().status_code == 200  # the enrolled key: no token needed
    device.token = old_token
    assert device.checkin().status_code == 401  # ended sessions stay ended
    device.login()
    assert device.checkin().status_code == 200
    assert device.heartbeat().status_code == 204


def test_status_is_listed_with_its_reason_and_time(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled()
    assert {k: listed(harness, device)[k] for k in ("status", "status_reason", "status_since")} == {
        "status": "active",
        "status_reason": None,
        "status_since": None,
    }
    harness.clock.advance(60)
    change(harness, device, "quarantine", "odd traffic")
    view = listed(harness, device)
    assert (view["status"], view["status_reason"], view["status_since"]) == (
        "quarantined",
        "odd traffic",
        "2023-11-14T22:14:20Z",
    )
    one = harness.client.get(f"/api/v1/devices/{device.id}", headers=harness.viewer).json()
    assert one["status"] == "quarantined"
    with harness.db.read() as session:
        assert session.scalar(select(Device.status_by)) == "operator:test-operator"


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        (("release",), "release"),
        (("reinstate",), "reinstate"),
        (("quarantine", "quarantine"), "quarantine"),
        (("decommission", "quarantine"), "quarantine"),
        (("decommission", "release"), "release"),
        (("decommission", "decommission"), "decommission"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, tuple) else v,
)
def test_a_change_from_the_wrong_status_is_refused(
    harness: Harness, enrolled: Enrolled, path: tuple[str, ...], refused: str
) -> None:
    device = enrolled()
    for what in path[:-1]:
        assert change(harness, device, what).status_code == 200
    before = stored(harness)
    response = change(harness, device, refused, "again")
    assert response.status_code == 409, response.text
    assert response.json()["error"] == "device_status_conflict"
    assert stored(harness) == before


def test_an_unknown_device_cannot_change_status(harness: Harness) -> None:
    ghost = FakeDevice(harness.client)
    before = stored(harness)
    for what in CHANGES:
        response = change(harness, ghost, what)
        assert response.status_code == 404 and response.json()["error"] == "unknown_device"
    assert stored(harness) == before


def test_status_changes_are_audited(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled()
    for what, reason in zip(CHANGES, ("a", None, "c", "d"), strict=True):
        assert change(harness, device, what, reason).status_code == 200
    with harness.db.read() as session:
        rows = session.scalars(
            select(AuditRow).where(AuditRow.action.like("device.%")).order_by(AuditRow.seq)
        ).all()
    mine = [(r.action, r.subject, r.actor, json.loads(r.details)) for r in rows][-4:]
    actor = "operator:test-operator"
    assert mine == [
        ("device.quarantined", device.id, actor,
         {"reason": "a", "previous": "active", "sessions_ended": 0}),
        ("device.released", device.id, actor,
         {"reason": None, "previous": "quarantined", "sessions_ended": 0}),
        ("device.decommissioned", device.id, actor,
         {"reason": "c", "previous": "active", "sessions_ended": 1}),
        ("device.reinstated", device.id, actor,
         {"reason": "d", "previous": "decommissioned", "sessions_ended": 0}),
    ]  # fmt: skip


def test_two_operators_changing_one_device_at_once_cannot_both_start_from_its_old_status(
    harness: Harness, enrolled: Enrolled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device's row is locked while its status changes: the second change waits, then
    starts from the first one's outcome. Each change waits (up to a second) for the other to
    have read the status too, so without the lock both would change an active device."""
    import contextlib
    import threading
    from datetime import UTC, datetime

    from server import audit, devices
    from server.database import Database
    from server.errors import DeviceStatusConflictError

    device = enrolled()
    both_read = threading.Barrier(2)
    append = audit.append

    def append_once_both_read(*args: Any, **kwargs: Any) -> None:
        # the other one waits for our row: the barrier breaks, and we go on alone
        with contextlib.suppress(threading.BrokenBarrierError):
            both_read.wait(timeout=1.0)
        append(*args, **kwargs)

    monkeypatch.setattr(audit, "append", append_once_both_read)
    outcomes: list[str] = []

    def quarantine(db: Database, _: object) -> None:
        try:
            devices.change_status(db, device.id, "quarantine", "x", actor="operator:t",
                                  now=datetime(2030, 1, 1, tzinfo=UTC))  # fmt: skip
            outcomes.append("changed")
        except DeviceStatusConflictError:
            outcomes.append("conflict")

    at_once(harness, quarantine, [1, 2])
    assert sorted(outcomes) == ["changed", "conflict"]


# --- quarantine -------------------------------------------------------------------------------


def test_a_quarantined_device_reports_but_is_assigned_nothing(
    harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle
) -> None:
    assert harness.upload(make_bundle(version="2.0.0")).status_code == 201
    device = enrolled()
    assign(harness, device, "2.0.0")
    first = device.checkin()
    assert assigned_version(first) == "2.0.0"
    etag = first.headers["etag"]
    assert change(harness, device, "quarantine", "odd traffic").status_code == 200
    quiet = device.checkin(etag=etag)  # the old answer is not current any more
    assert assigned_version(quiet) is None
    assert device.checkin(etag=quiet.headers["etag"]).status_code == 304
    harness.clock.advance(120)  # past the last-seen resolution: the write path too
    assert assigned_version(device.checkin()) is None
    assert device.heartbeat(version="1.0.0").status_code == 204
    assert device.events(("boot_check.passed", 1)).status_code == 204
    assert listed(harness, device)["assigned_version"] == "2.0.0"  # kept for its release
    assert change(harness, device, "release", "all clear").status_code == 200
    assert assigned_version(device.checkin(etag=quiet.headers["etag"])) == "2.0.0"


def test_rollouts_skip_quarantined_and_decommissioned_devices(
    harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle
) -> None:
    assert harness.upload(make_bundle(version="2.0.0")).status_code == 201
    kept, quarantined, gone = (enrolled(hostname=f"cam-{i}") for i in range(3))
    change(harness, quarantined, "quarantine", "x")
    change(harness, gone, "decommission", "y")
    response = harness.client.post(
        "/api/v1/rollouts", json={"version": "2.0.0", "stages": [100]}, headers=harness.operator
    )
    assert response.status_code == 201, response.text
    rollout = response.json()
    assert [d["id"] for d in rollout["devices"]] == [kept.id]
    assert sum(stage["expected"] for stage in rollout["stage_progress"]) == 1
    assigned = {
        d["id"]: d["assigned_version"]
        for d in harness.client.get("/api/v1/devices", headers=harness.viewer).json()["devices"]
    }
    assert assigned == {kept.id: "2.0.0", quarantined.id: None, gone.id: None}
    # a device named as a canary while quarantined is not a selected device
    harness.client.post(
        f"/api/v1/rollouts/{rollout['id']}/abort", json={}, headers=harness.operator
    )
    canary = harness.client.post(
        "/api/v1/rollouts",
        json={"version": "2.0.0", "canary": [quarantined.id]},
        headers=harness.operator,
    )
    assert canary.status_code == 422, canary.text


# --- sessions ---------------------------------------------------------------------------------


def test_opening_one_session_too_many_ends_the_oldest(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled()
    tokens = [device.token]
    for _ in range(DEFAULT_MAX_DEVICE_SESSIONS):
        harness.clock.advance(1)
        tokens.append(device.login())
    assert sessions_of(harness, device) == DEFAULT_MAX_DEVICE_SESSIONS
    for token in tokens:
        device.token = token
        expected = 401 if token == tokens[0] else 200
        assert device.checkin().status_code == expected
    harness.clock.advance(1)
    device.login()
    device.token = tokens[1]
    assert device.checkin().status_code == 401
    device.token = tokens[2]
    assert device.checkin().status_code == 200


def test_a_session_is_never_extended_by_use(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled()
    for _ in range(SESSION_TTL_S // 600 - 1):
        harness.clock.advance(600)
        assert device.checkin().status_code == 200
        assert device.heartbeat().status_code == 204
    harness.clock.advance(SESSION_TTL_S - (SESSION_TTL_S // 600 - 1) * 600 - 1)
    assert device.checkin().status_code == 200  # one second before its end
    harness.clock.advance(1)
    assert device.checkin().status_code == 401  # an hour after opening, however used


# --- every sequence of changes ----------------------------------------------------------------

# The rule, written out apart from the product: where each change may start, and where it leads.
MODEL = {
    "quarantine": ({"active"}, "quarantined"),
    "release": ({"quarantined"}, "active"),
    "decommission": ({"active", "quarantined"}, "decommissioned"),
    "reinstate": ({"decommissioned"}, "active"),
}


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(st.sampled_from(CHANGES), min_size=1, max_size=8))
def test_any_sequence_of_changes_follows_the_rule(
    harness: Harness, enrolled: Enrolled, steps: list[str]
) -> None:
    if not harness.scratch:  # one device for every example; each example starts it active
        harness.scratch["device"] = enrolled()
    device: FakeDevice = harness.scratch["device"]
    with harness.db.write() as session:
        session.get(Device, device.id).status = "active"  # type: ignore[union-attr]
    status = "active"
    for step in steps:
        before = stored(harness)
        response = change(harness, device, step, step)
        starts, target = MODEL[step]
        if status in starts:
            assert response.status_code == 200, (step, status, response.text)
            status = target
        else:
            assert response.status_code == 409, (step, status, response.text)
            assert stored(harness) == before
        assert listed(harness, device)["status"] == status
        if status == "decommissioned":
            assert harness.client.post(f"/api/v1/devices/{device.id}/challenge").status_code == 403
        else:
            device.login()
            answer = device.checkin()
            assert answer.status_code == 200
