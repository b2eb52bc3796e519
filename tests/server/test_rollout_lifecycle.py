"""A rollout's life as operators and the engine drive it, called in process: what starting it
records, how pause, resume, abort and roll back change its state, its devices' assignments and
the audit trail, the emergency stop, and what the views of a rollout and of the fleet say."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import Connection, event, inspect
from sqlalchemy.orm import Session

from server import audit, rollouts
from server.database import alembic_config
from server.errors import InvalidRolloutError, RolloutConflictError
from server.rollouts import ROLLOUT_EVALUATOR_LOCK, RolloutRequest
from server.settings import iso, utc
from tests.server.conftest import FakeDevice, Harness

Enrolled = Callable[..., FakeDevice]
MakeBundle = Callable[..., Path]
ALICE = "operator:alice"
BOB = "operator:bob"


def device_id(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


@pytest.fixture
def fleet(harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle) -> Callable[..., Any]:
    """Releases 1.0.0 and 2.0.0, and ``size`` devices that run 1.0.0, sorted by id. They are
    enrolled out of id order (and out of its reverse), so a list in stored order gives itself
    away."""

    def make(size: int = 3, **labels: Any) -> list[FakeDevice]:
        for version in ("1.0.0", "2.0.0"):
            response = harness.upload(make_bundle(f"{version}.bundle", version=version))
            assert response.status_code == 201, response.text
        keys = sorted((Ed25519PrivateKey.generate() for _ in range(size)), key=device_id)
        devices = [
            enrolled(hostname=f"cam-{i:04d}", key=key)
            for i, key in enumerate(keys[1::2] + keys[0::2])
        ]
        for device in devices:
            assert device.heartbeat(**labels.get(device.hostname, {})).status_code == 204
        return sorted(devices, key=lambda d: d.id)

    return make


@pytest.fixture
def unordered_reversed(harness: Harness) -> Iterator[None]:
    """SQLite answers a query without ORDER BY in reverse order from here on: a list that
    must be in id order has to ask for it."""
    if harness.db.dialect != "sqlite":
        yield
        return

    def reverse(connection: Connection) -> None:
        connection.exec_driver_sql("PRAGMA reverse_unordered_selects = ON")

    event.listen(harness.db.engine, "begin", reverse)
    yield
    event.remove(harness.db.engine, "begin", reverse)


def now(harness: Harness) -> datetime:
    return utc(harness.clock)


def begin(harness: Harness, actor: str = ALICE, **request: Any) -> dict[str, Any]:
    view: dict[str, Any] = rollouts.start(
        harness.db, RolloutRequest(version="2.0.0", **request), actor=actor, now=now(harness)
    )
    return view


def act(
    harness: Harness, view: dict[str, Any], action: str, reason: str | None = None,
    actor: str = ALICE,
) -> dict[str, Any]:  # fmt: skip
    answer: dict[str, Any] = rollouts.transition(
        harness.db, view["id"], action, actor=actor, now=now(harness), reason=reason
    )
    return answer


def evaluate(harness: Harness) -> dict[str, Any]:
    """One evaluation now; the newest rollout after it."""
    rollouts.evaluate(harness.db, now(harness))
    newest: dict[str, Any] = rollouts.status(harness.db, now(harness))["rollouts"][0]
    return newest


def trail(harness: Harness, action: str) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(actor, subject, details) of every audit entry of ``action``, oldest first."""
    with harness.db.read() as session:
        return [
            (e.actor, e.subject, json.loads(e.details))
            for e in audit.entries(session)
            if e.action == action
        ]


def assigned(harness: Harness) -> dict[str, str | None]:
    response = harness.client.get("/api/v1/devices", headers=harness.viewer)
    return {d["id"]: d["assigned_version"] for d in response.json()["devices"]}


def commit(device: FakeDevice, version: str = "2.0.0") -> None:
    slots = {"a": {"status": "good", "version": version}, "b": {"status": "good"}}
    assert device.heartbeat(version=version, slots=slots).status_code == 204


def fail(device: FakeDevice) -> None:
    assert device.events(("install.failed", 1)).status_code == 204


def soak_all(harness: Harness, devices: list[FakeDevice], seconds: int = 60) -> dict[str, Any]:
    """Every device assigned 2.0.0 heartbeats it committed; ``seconds`` later, an evaluation."""
    versions = assigned(harness)
    for device in devices:
        if versions[device.id] == "2.0.0":
            commit(device)
    harness.clock.advance(seconds)
    return evaluate(harness)


# --- starting -----------------------------------------------------------------------------------


def test_start_records_the_plan_the_operator_and_the_first_cohort(
    harness: Harness, fleet: Callable[..., list[FakeDevice]]
) -> None:
    devices = fleet(4)
    canaries = [devices[0].id, devices[1].id]
    started_at = now(harness)
    view = begin(
        harness, canary_ids=tuple(canaries), stages=(50, 100), soak_s=120,
        max_failure_rate=0.5, install_deadline_s=900,
    )  # fmt: skip
    assert view["state"] == "running" and view["reason"] is None
    assert (view["stage"], view["stage_name"]) == (0, "canary")
    assert view["stages"] == ["canary", "50%", "100%"]
    assert view["stage_started"] == view["created"] == iso(started_at)
    assert view["created_by"] == ALICE
    assert (view["soak_s"], view["install_deadline_s"], view["max_failure_rate"]) == (120, 900, 0.5)
    assert view["selector"] is None  # every compatible device
    assert view["acknowledged"] == []
    assert view["devices"] == [
        {"id": c, "stage": "canary", "outcome": "pending", "reason": None} for c in canaries
    ]
    # Half of two canaries failing would be tolerated after the canary stage, not in it.
    rule = view["failure_rule"]
    assert (rule["assigned"], rule["failed"], rule["allowed"]) == (2, 0, 0)
    subject = f"rollout:{view['id']}"
    assert trail(harness, "rollout.started") == [
        (ALICE, subject, {"version": "2.0.0", "stage": 0, "plan": ["canary", "50%", "100%"]})
    ]
    assert trail(harness, "rollout.assigned") == [
        ("rollout-engine", subject, {"version": "2.0.0", "stage": 0, "devices": canaries})
    ]
    assert rollouts.get(harness.db, view["id"], now(harness)) == view
    assert {d: v for d, v in assigned(harness).items() if v == "2.0.0"} == {
        c: "2.0.0" for c in canaries
    }


def test_a_cohort_is_assigned_in_device_order(
    harness: Harness, fleet: Callable[..., list[FakeDevice]], unordered_reversed: None
) -> None:
    devices = fleet(5)
    view = begin(harness, stages=(100,))
    ids = [d.id for d in devices]
    assert [d["id"] for d in view["devices"]] == ids
    assert trail(harness, "rollout.assigned")[0][2]["devices"] == ids


def test_a_role_alone_selects_the_devices_of_that_role(
    harness: Harness, fleet: Callable[..., list[FakeDevice]]
) -> None:
    labels = {f"cam-{i:04d}": {"role": "sensor" if i % 2 else "camera"} for i in range(4)}
    devices = fleet(4, **labels)
    sensors = sorted(d.id for d in devices if labels[d.hostname]["role"] == "sensor")
    view = begin(harness, stages=(100,), role="sensor")
    assert view["selector"] == {"role": "sensor", "tags": []}
    assert [d["id"] for d in view["devices"]] == sensors
    versions = assigned(harness)
    assert sorted(d for d, v in versions.items() if v == "2.0.0") == sensors


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"max_failure_rate": 1.0}, "max failure rate: give a fraction from 0 to below 1"),
        ({"max_failure_rate": -0.01}, "max failure rate: give a fraction from 0 to below 1"),
        ({"soak_s": -1}, "soak and install deadline: give positive seconds"),
        ({"install_deadline_s": 0}, "soak and install deadline: give positive seconds"),
        ({"offline_after_s": 0}, "offline after: give at least 300 s"),
        ({"offline_after_s": 299}, "offline after: give at least 300 s"),
    ],
)
def test_start_refuses_rates_and_times_out_of_range(
    harness: Harness, fleet: Callable[..., list[FakeDevice]], change: dict[str, Any], words: str
) -> None:
    fleet(1)
    with pytest.raises(InvalidRolloutError, match=words):
        begin(harness, **change)
    assert rollouts.status(harness.db, now(harness))["rollouts"] == []


def test_start_accepts_the_edges_of_the_ranges(
    harness: Harness, fleet: Callable[..., list[FakeDevice]]
) -> None:
    fleet(1)
    view = begin(harness, max_failure_rate=0.0, soak_s=0, install_deadline_s=1)
    assert (view["max_failure_rate"], view["soak_s"], view["install_deadline_s"]) == (0.0, 0, 1)
    assert view["failure_rule"]["min_devices_for_one_failure"] is None


# --- the emergency stop ---------------------------------------------------------------------


def test_the_emergency_stop_on_a_fresh_server_and_on_and_off(
    harness: Harness, fleet: Callable[..., list[FakeDevice]]
) -> None:
    off = {"active": False, "reason": None, "since": None, "actor": None}
    assert rollouts.status(harness.db, now(harness)) == {"rollouts": [], "emergency_stop": off}
    fleet(1)
    stopped_at = now(harness)
    on = {"active": True, "reason": "storm", "since": iso(stopped_at), "actor": ALICE}
    assert rollouts.emergency_stop(harness.db, "storm", actor=ALICE, now=stopped_at) == on
    assert trail(harness, "fleet.emergency_stop") == [(ALICE, None, {"reason": "storm"})]
    harness.clock.advance(60)
    # Stopping again changes nothing, not even who stopped it or why.
    assert rollouts.emergency_stop(harness.db, "again", actor=BOB, now=now(harness)) == on
    assert rollouts.status(harness.db, now(harness))["emergency_stop"] == on
    with pytest.raises(RolloutConflictError, match="the emergency stop is on: clear it first"):
        begin(harness)
    harness.clock.advance(60)
    cleared_at = now(harness)
    cleared = {"active": False, "reason": None, "since": iso(cleared_at), "actor": BOB}
    assert rollouts.clear_emergency_stop(harness.db, actor=BOB, now=cleared_at) == cleared
    assert [a for a, _, _ in trail(harness, "fleet.emergency_stop_cleared")] == [BOB]
    assert rollouts.status(harness.db, now(harness))["emergency_stop"] == cleared
    assert begin(harness)["state"] == "running"


def test_the_emergency_stop_keeps_only_devices_committed_to_the_new_release(
    harness: Harness, fleet: Callable[..., list[FakeDevice]]
) -> None:
    succeeded, fell_back, waiting = fleet(3)
    view = begin(harness, stages=(100,), soak_s=60)
    commit(succeeded)
    harness.clock.advance(30)
    commit(fell_back)
    harness.clock.advance(30)
    answer = evaluate(harness)
    assert [d["outcome"] for d in answer["devices"]] == ["succeeded", "pending", "pending"]
    # It had committed 2.0.0, then reports 1.0.0 again before the next evaluation.
    commit(fell_back, "1.0.0")
    rollouts.emergency_stop(harness.db, "storm", actor=ALICE, now=now(harness))
    versions = assigned(harness)
    assert [versions[d.id] for d in (succeeded, fell_back, waiting)] == ["2.0.0", None, None]
    paused = rollouts.get(harness.db, view["id"], now(harness))
    assert (paused["state"], paused["reason"]) == ("paused", "emergency stop: storm")
    assert trail(harness, "rollout.paused") == [
        (ALICE, f"rollout:{view['id']}", {
            "version": "2.0.0", "stage": 0, "reason": "emergency stop: storm",
            "withdrawn": sorted([fell_back.id, waiting.id]),
        })
    ]  # fmt: skip


def test_the_operations_take_the_evaluator_lock_in_their_transaction(
    harness: Harness, fleet: Callable[..., list[FakeDevice]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet(1)
    calls: list[tuple[bool, int]] = []
    real = harness.db.lock

    def spy(session: Session, key: int) -> None:
        calls.append((isinstance(session, Session), key))
        real(session, key)

    monkeypatch.setattr(harness.db, "lock", spy)
    operations: list[Callable[[], Any]] = [
        lambda: begin(harness),
        lambda: rollouts.transition(
            harness.db, 1, "pause", actor=ALICE, now=now(harness), reason=None
        ),
        lambda: rollouts.emergency_stop(harness.db, "storm", actor=ALICE, now=now(harness)),
        lambda: rollouts.clear_emergency_stop(harness.db, actor=ALICE, now=now(harness)),
    ]
    for operation in operations:
        calls.clear()
        operation()
        assert calls[0] == (True, ROLLOUT_EVALUATOR_LOCK)


# --- pause, abort, roll back ----------------------------------------------------------------


def started_with_one_success(
    harness: Harness, fleet: Callable[..., list[FakeDevice]]
) -> tuple[dict[str, Any], list[FakeDevice]]:
    """Three devices on 1.0.0 in one stage of 2.0.0: the first has succeeded, two pending."""
    devices = fleet(3)
    view = begin(harness, stages=(100,), soak_s=60)
    commit(devices[0])
    harness.clock.advance(60)
    answer = evaluate(harness)
    assert [d["outcome"] for d in answer["devices"]] == ["succeeded", "pending", "pending"]
    return view, devices


def test_pause_without_a_reason_says_paused(
    harness: Harness, fleet: Callable[..., list[FakeDevice]]
) -> None:
    view, _ = started_with_one_success(harness, fleet)
    paused = act(harness, view, "pause", actor=BOB)
    assert (paused["state"], paused["reason"]) == ("paused", "paused")
    assert set(assigned(harness).values()) == {"2.0.0"}  # a pause withdraws nothing
    assert trail(harness, "rollout.paused") == [
        (BOB, f"rollout:{view['id']}", {"version": "2.0.0", "stage": 0, "reason": None})
    ]


def test_abort_returns_only_the_devices_that_have_not_succeeded(
    harness: Harness, fleet: Callable[..., list[FakeDevice]], unordered_reversed: None
) -> None:
    view, (done, *waiting) = started_with_one_success(harness, fleet)
    aborted = act(harness, view, "abort", actor=BOB)
    assert (aborted["state"], aborted["reason"]) == ("aborted", "aborted")
    versions = assigned(harness)
    assert versions[done.id] == "2.0.0"
    assert [versions[d.id] for d in waiting] == ["1.0.0", "1.0.0"]  # what they ran before
    assert trail(harness, "rollout.aborted") == [
        (BOB, f"rollout:{view['id']}", {
            "version": "2.0.0", "stage": 0, "reason": None, "returned": [d.id for d in waiting],
        })
    ]  # fmt: skip
    assert trail(harness, "rollout.rolled_back") == []


def test_abort_keeps_the_operators_reason(
    harness: Harness, fleet: Callable[..., list[FakeDevice]]
) -> None:
    view, _ = started_with_one_success(harness, fleet)
    aborted = act(harness, view, "abort", reason="wrong build")
    assert (aborted["state"], aborted["reason"]) == ("aborted", "wrong build")
    assert trail(harness, "rollout.aborted")[0][2]["reason"] == "wrong build"


def test_rollback_returns_every_device_even_those_that_succeeded(
    harness: Harness, fleet: Callable[..., list[FakeDevice]], unordered_reversed: None
) -> None:
    view, devices = started_with_one_success(harness, fleet)
    rolled = act(harness, view, "rollback", actor=BOB)
    assert (rolled["state"], rolled["reason"]) == ("aborted", "rolled back")
    assert set(assigned(harness).values()) == {"1.0.0"}
    assert trail(harness, "rollout.rolled_back") == [
        (BOB, f"rollout:{view['id']}", {
            "version": "2.0.0", "stage": 0, "reason": None, "returned": [d.id for d in devices],
        })
    ]  # fmt: skip
    assert trail(harness, "rollout.aborted") == []
    with pytest.raises(
        RolloutConflictError, match=f"rollout {view['id']} is aborted: cannot pause"
    ):
        act(harness, view, "pause")


# --- halt, resume and the stages ------------------------------------------------------------


def test_a_halt_names_the_failures_and_a_resume_acknowledges_them(
    harness: Harness, fleet: Callable[..., list[FakeDevice]]
) -> None:
    devices = fleet(6)  # one failure in six leaves the fleet guard alone
    failing, slow = devices[0], devices[1]
    view = begin(harness, canary_ids=(failing.id, slow.id), stages=(50, 100), soak_s=60)
    subject = f"rollout:{view['id']}"
    fail(failing)
    halted = evaluate(harness)
    assert (halted["state"], halted["reason"]) == (
        "halted", "1 of 2 devices failed in stage canary"
    )  # fmt: skip
    versions = assigned(harness)
    # the failed device went back at once, the pending one with the halt
    assert (versions[failing.id], versions[slow.id]) == ("1.0.0", "1.0.0")
    assert trail(harness, "rollout.halted") == [
        ("rollout-engine", subject, {
            "version": "2.0.0", "stage": 0, "reason": "1 of 2 devices failed in stage canary",
            "rolled_back": [slow.id],
        })
    ]  # fmt: skip

    harness.clock.advance(60)
    resumed = act(harness, view, "resume", reason="bad sd card", actor=BOB)
    assert (resumed["state"], resumed["reason"]) == ("running", None)
    assert resumed["acknowledged"] == [failing.id]
    assert resumed["failure_rule"]["failed"] == 0  # an acknowledged failure no longer counts
    versions = assigned(harness)
    # the pending device gets the release again; the failed one does not retry it
    assert (versions[failing.id], versions[slow.id]) == ("1.0.0", "2.0.0")
    assert trail(harness, "rollout.resumed") == [
        (BOB, subject, {
            "version": "2.0.0", "stage": 0, "reason": "bad sd card",
            "acknowledged": [failing.id], "reassigned": [slow.id],
        })
    ]  # fmt: skip

    seen = ["canary"]
    for _ in range(6):
        answer = soak_all(harness, devices)
        if answer["stage_name"] != seen[-1]:
            seen.append(answer["stage_name"])
        if answer["state"] != "running":
            break
    assert answer["state"] == "completed", answer
    assert seen == ["canary", "50%", "100%"]
    assert answer["acknowledged"] == [failing.id]
    promoted = [(d["stage"], d["to"]) for _, s, d in trail(harness, "rollout.promoted")]
    assert promoted == [(1, "50%"), (2, "100%")]
    assert trail(harness, "rollout.completed") == [
        ("rollout-engine", subject, {"version": "2.0.0", "stage": 2})
    ]


def test_a_stage_that_has_soaked_exactly_its_time_is_promoted(
    harness: Harness, fleet: Callable[..., list[FakeDevice]]
) -> None:
    (device,) = fleet(1)
    view = begin(harness, stages=(100,), soak_s=60)
    commit(device)
    harness.clock.advance(59)
    assert evaluate(harness)["state"] == "running"
    harness.clock.advance(1)
    answer = evaluate(harness)
    assert (answer["state"], answer["counts"]["succeeded"]) == ("completed", 1)
    assert [s for _, s, _ in trail(harness, "rollout.completed")] == [f"rollout:{view['id']}"]


def test_resume_waits_for_the_other_active_rollout(
    harness: Harness, fleet: Callable[..., list[FakeDevice]]
) -> None:
    devices = fleet(3)
    first = begin(harness, canary_ids=(devices[0].id,), stages=(100,))
    fail(devices[0])
    assert evaluate(harness)["state"] == "halted"
    second = begin(harness, stages=(100,))
    with pytest.raises(RolloutConflictError, match=f"rollout {second['id']} is running: one at"):
        act(harness, first, "resume")
    act(harness, second, "pause")
    with pytest.raises(RolloutConflictError, match=f"rollout {second['id']} is paused: one at"):
        act(harness, first, "resume")
    rollouts.emergency_stop(harness.db, "storm", actor=ALICE, now=now(harness))
    with pytest.raises(RolloutConflictError, match="the emergency stop is on: clear it first"):
        act(harness, second, "resume")
    rollouts.clear_emergency_stop(harness.db, actor=ALICE, now=now(harness))
    act(harness, second, "abort")
    # an ended rollout is in nobody's way
    assert act(harness, first, "resume")["state"] == "running"
    listed = rollouts.status(harness.db, now(harness))["rollouts"]
    assert [(r["id"], r["state"]) for r in listed] == [
        (second["id"], "aborted"), (first["id"], "running")
    ]  # fmt: skip


# --- migration 0006 ---------------------------------------------------------------------------


def test_a_rollout_from_before_offline_after_existed_gets_a_day(
    harness: Harness, fleet: Callable[..., list[FakeDevice]]
) -> None:
    """Down to 0005 and up again: the rollout and its devices are kept, with the default."""
    fleet(2)
    view = begin(harness, stages=(100,), offline_after_s=300)
    with harness.db.engine.connect() as connection, connection.begin():
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "0005")
    with harness.db.engine.connect() as connection:
        columns = {c["name"] for c in inspect(connection).get_columns("rollouts")}
        members = connection.exec_driver_sql("SELECT count(*) FROM rollout_devices").scalar()
    assert "offline_after_s" not in columns
    assert members == 2  # the downgrade keeps the rollouts' devices
    harness.db.migrate()
    again = rollouts.get(harness.db, view["id"], now(harness))
    assert again["offline_after_s"] == 86400
    assert {key: again[key] for key in ("devices", "state")} == {
        key: view[key] for key in ("devices", "state")
    }
