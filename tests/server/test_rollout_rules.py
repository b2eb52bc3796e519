"""The rollout rules at their edges: the plan, the stages' percentages, the cohorts, the failure
rule, a device's outcome; and, through the API, what the engine makes of them: cohort members,
safe-mode failures, the release a device returns to, failure events and the fleet-wide guard."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server import rollouts
from server.errors import InvalidRolloutError
from server.rollouts import (
    Decision,
    Observation,
    Outcome,
    Plan,
    check_percents,
    cohort_point,
    decide,
    device_outcome,
    device_stage,
    failure_rule,
)
from server.settings import utc
from tests.server.conftest import FakeDevice, Harness

Enrolled = Callable[..., FakeDevice]
MakeBundle = Callable[..., Path]
T0 = datetime(2026, 1, 1, tzinfo=UTC)

# --- the rules ------------------------------------------------------------------------------


def test_a_plan_counts_its_canary_stage_and_only_the_first_stage_is_it() -> None:
    plan = Plan(True, (5, 25, 100))
    assert len(plan) == 4
    assert plan.names == ["canary", "5%", "25%", "100%"]
    assert [plan.is_canary(stage) for stage in range(4)] == [True, False, False, False]
    plain = Plan(False, (100,))
    assert len(plain) == 1
    assert not plain.is_canary(0)


@pytest.mark.parametrize("stages", [(100,), (1, 100), (1, 2, 100), (99, 100), (5, 25, 100)])
def test_percentages_from_1_to_100_strictly_increasing_make_a_plan(stages: tuple[int, ...]) -> None:
    assert check_percents(list(stages)) == stages


@pytest.mark.parametrize(
    ("stages", "shown"),
    [
        ([0, 100], r"\[0, 100\]"),
        ([0, 50, 100], r"\[0, 50, 100\]"),
        ([50, 50, 100], r"\[50, 50, 100\]"),
        ([100, 100], r"\[100, 100\]"),
        ([25, 5, 100], r"\[25, 5, 100\]"),
        ([5, 25], r"\[5, 25\]"),
        ([], r"\[\]"),
    ],
)
def test_other_percentages_are_refused_naming_them(stages: list[int], shown: str) -> None:
    with pytest.raises(
        InvalidRolloutError,
        match=rf"^stages {shown}: give increasing percentages from 1 to 100, ending with 100$",
    ):
        check_percents(stages)


def expected_point(rollout_id: int, device_id: str) -> float:
    digest = hashlib.sha256(f"rollout {rollout_id}\n{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@pytest.mark.parametrize(("rollout_id", "device_id"), [(1, "0" * 64), (7, "ab" * 32), (42, "x")])
def test_a_cohort_point_is_pinned_by_rollout_and_device(rollout_id: int, device_id: str) -> None:
    """Every server process (of every version) must put a device in the same cohort."""
    point = cohort_point(rollout_id, device_id)
    assert point == expected_point(rollout_id, device_id)
    assert 0 <= point < 1


def test_the_cohort_points_spread_over_the_whole_unit_interval() -> None:
    points = [cohort_point(3, f"{i:064x}") for i in range(200)]
    assert max(points) > 0.9  # a smaller scale would leave the top cohorts empty
    assert min(points) < 0.1


@pytest.mark.parametrize(
    ("point", "stage"),
    [
        (0.0, 0),
        (0.0499, 0),
        (0.05, 1),  # a fraction's own point belongs to the next cohort
        (0.2499, 1),
        (0.25, 2),
        (0.9999, 2),
        (1.0, 2),  # at or past the end: the last stage, always
    ],
)
def test_device_stage_boundaries(point: float, stage: int) -> None:
    assert device_stage(Plan(False, (5, 25, 100)), point, canary=False) == stage


@pytest.mark.parametrize(
    ("point", "canary", "stage"),
    [
        (0.0, True, 0),
        (0.99, True, 0),
        (0.0, False, 1),
        (0.4999, False, 1),
        (0.5, False, 2),
        (1.0, False, 2),
    ],
)
def test_device_stage_with_a_canary_stage(point: float, canary: bool, stage: int) -> None:
    assert device_stage(Plan(True, (50, 100)), point, canary) == stage


def test_a_canary_named_for_a_plan_without_canary_stage_joins_by_its_point() -> None:
    assert device_stage(Plan(False, (50, 100)), 0.7, canary=True) == 1


def test_the_canary_stage_tolerates_no_failure_the_next_stages_do() -> None:
    plan = Plan(True, (5, 100))
    outcomes = [Outcome.SUCCEEDED] * 19 + [Outcome.FAILED]
    assert decide(plan, 0, outcomes, True, 0.05) is Decision.HALT
    assert decide(plan, 1, outcomes, True, 0.05) is Decision.PROMOTE
    assert decide(plan, 2, outcomes, True, 0.05) is Decision.COMPLETE
    assert decide(Plan(False, (5, 100)), 0, outcomes, True, 0.05) is Decision.PROMOTE


def committed_observation(heartbeat_at: datetime) -> Observation:
    return Observation("2.0.0", True, False, heartbeat_at, None)


def outcome_at(observation: Observation, now: datetime) -> tuple[Outcome, str | None]:
    outcome, _, reason = device_outcome(
        observation, version="2.0.0", assigned_at=T0, committed_since=T0, now=now, soak_s=600,
        install_deadline_s=3600,
    )  # fmt: skip
    return outcome, reason


def test_a_heartbeat_exactly_as_old_as_the_freshness_limit_still_counts() -> None:
    now = T0 + timedelta(seconds=1000)
    limit = rollouts.HEARTBEAT_FRESH_S
    assert limit == 180  # a device heartbeats every 60 s: three missed heartbeats
    fresh = committed_observation(now - timedelta(seconds=limit))
    assert outcome_at(fresh, now) == (Outcome.SUCCEEDED, None)
    stale = committed_observation(now - timedelta(seconds=limit + 1))
    assert outcome_at(stale, now) == (Outcome.PENDING, None)


def test_the_install_deadline_itself_is_still_in_time() -> None:
    silent = Observation(None, False, False, None, None)
    assert outcome_at(silent, T0 + timedelta(seconds=3600)) == (Outcome.PENDING, None)
    late = T0 + timedelta(seconds=3601)
    assert outcome_at(silent, late) == (Outcome.FAILED, "install_deadline")


def test_the_failure_rule_shown_allows_nothing_in_the_canary_stage() -> None:
    plan = Plan(True, (5, 100))
    canary = failure_rule(plan, 0, 20, 1, 0.05)
    assert canary == {
        "text": "halt on any failure in the canary stage; after it, halt when failed devices > "
        "floor(0.05 x assigned devices)",
        "assigned": 20,
        "failed": 1,
        "allowed": 0,
        "min_devices_for_one_failure": 20,
    }
    assert failure_rule(plan, 1, 20, 1, 0.05)["allowed"] == 1
    assert failure_rule(Plan(False, (5, 100)), 0, 40, 0, 0.05)["allowed"] == 2


def test_the_failure_rule_with_no_tolerated_failure_names_no_sample() -> None:
    rule = failure_rule(Plan(False, (100,)), 0, 50, 0, 0.0)
    assert (rule["allowed"], rule["min_devices_for_one_failure"]) == (0, None)
    assert "floor(0 x assigned devices)" in rule["text"]
    assert failure_rule(Plan(False, (100,)), 0, 50, 0, 0.3)["min_devices_for_one_failure"] == 4


# --- the engine through the API -------------------------------------------------------------


def device_key(index: int) -> Ed25519PrivateKey:
    """A fixed key, so the devices (and their cohorts) are the same on every run."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"rule device %d" % index).digest())


@pytest.fixture
def releases(harness: Harness, make_bundle: MakeBundle) -> None:
    for version in ("1.0.0", "2.0.0"):
        response = harness.upload(make_bundle(f"{version}.bundle", version=version))
        assert response.status_code == 201, response.text


@pytest.fixture
def devices(
    harness: Harness, enrolled: Enrolled, releases: None
) -> Callable[[int], list[FakeDevice]]:
    def make(count: int) -> list[FakeDevice]:
        return [enrolled(hostname=f"cam-{i:04d}", key=device_key(i)) for i in range(count)]

    return make


def start(harness: Harness, **body: Any) -> dict[str, Any]:
    response = harness.client.post("/api/v1/rollouts", json=body, headers=harness.operator)
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


def status(harness: Harness) -> dict[str, Any]:
    """Every rollout and the emergency stop, after an evaluation."""
    response = harness.client.get("/api/v1/rollouts", headers=harness.viewer)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def rollout_outcomes(harness: Harness) -> dict[str, tuple[str, str | None]]:
    answer = status(harness)["rollouts"][0]
    return {d["id"]: (d["outcome"], d["reason"]) for d in answer["devices"]}


def assigned_versions(harness: Harness) -> dict[str, str | None]:
    response = harness.client.get("/api/v1/devices", headers=harness.viewer)
    return {d["id"]: d["assigned_version"] for d in response.json()["devices"]}


def audit_actions(harness: Harness, action: str) -> list[dict[str, Any]]:
    response = harness.client.get("/api/v1/audit?limit=1000", headers=harness.viewer)
    return [e for e in response.json()["entries"] if e["action"] == action]


SEQ = itertools.count(1)  # a device's event numbers only grow


def report(device: FakeDevice, *events: str) -> None:
    response = device.events(*((name, next(SEQ)) for name in events))
    assert response.status_code == 204, response.text


def test_the_first_cohort_is_the_devices_whose_point_is_below_its_fraction(
    harness: Harness, devices: Callable[[int], list[FakeDevice]]
) -> None:
    fleet = devices(12)
    rollout = start(harness, version="2.0.0", stages=[50, 100], soak_s=600)
    first = {d.id for d in fleet if cohort_point(rollout["id"], d.id) < 0.5}
    assert 0 < len(first) < len(fleet)  # both cohorts have members
    assert {d["id"] for d in rollout["devices"]} == first
    assert {d["stage"] for d in rollout["devices"]} == {"50%"}
    assigned = assigned_versions(harness)
    assert {d for d, version in assigned.items() if version == "2.0.0"} == first
    progress = rollout["stage_progress"]
    assert [(s["name"], s["expected"], s["assigned"]) for s in progress] == [
        ("50%", len(first), len(first)),
        ("100%", len(fleet) - len(first), 0),
    ]


def test_unassigned_devices_are_expected_in_the_cohort_of_their_point(
    harness: Harness, devices: Callable[[int], list[FakeDevice]]
) -> None:
    fleet = devices(12)
    canary = fleet[0].id
    rollout = start(harness, version="2.0.0", canary=[canary], stages=[50, 100], soak_s=600)
    assert [d["id"] for d in rollout["devices"]] == [canary]
    others = [d.id for d in fleet[1:]]
    first = [d for d in others if cohort_point(rollout["id"], d) < 0.5]
    assert 0 < len(first) < len(others)
    progress = rollout["stage_progress"]
    assert [(s["name"], s["expected"], s["assigned"]) for s in progress] == [
        ("canary", 1, 1),
        ("50%", len(first), 0),
        ("100%", len(others) - len(first), 0),
    ]


def test_a_safe_mode_heartbeat_after_the_assignment_is_a_failure(
    harness: Harness, devices: Callable[[int], list[FakeDevice]]
) -> None:
    fleet = devices(5)
    for device in fleet:
        assert device.heartbeat().status_code == 204  # all on 1.0.0
    start(harness, version="2.0.0", stages=[100], soak_s=600)
    harness.clock.advance(30)
    sick, *others = fleet
    assert sick.heartbeat(safe_mode=True).status_code == 204
    assert rollout_outcomes(harness) == {
        sick.id: ("failed", "safe_mode"),
        **{d.id: ("pending", None) for d in others},
    }
    assert assigned_versions(harness)[sick.id] == "1.0.0"
    # 1 of 5 unhealthy is not more than 20 %: the rollout halts, the fleet keeps going
    answer = status(harness)
    assert answer["rollouts"][0]["state"] == "halted"
    assert answer["emergency_stop"]["active"] is False


def test_a_device_that_never_reported_a_version_returns_to_what_it_was_assigned(
    harness: Harness, devices: Callable[[int], list[FakeDevice]]
) -> None:
    """With no version reported, the release a rollback returns it to is its earlier
    assignment (here, the 1.0.0 of a halted rollout that left its devices assigned)."""
    (device,) = devices(1)
    start(
        harness, version="1.0.0", stages=[100], soak_s=0, install_deadline_s=60,
        rollback_on_halt=False,
    )  # fmt: skip
    harness.clock.advance(61)
    first = status(harness)["rollouts"][0]
    assert first["state"] == "halted", first
    assert assigned_versions(harness)[device.id] == "1.0.0"  # left where it was
    second = start(harness, version="2.0.0", stages=[100], soak_s=0)
    assert assigned_versions(harness)[device.id] == "2.0.0"
    aborted = harness.client.post(
        f"/api/v1/rollouts/{second['id']}/abort", headers=harness.operator
    )  # fmt: skip
    assert aborted.status_code == 200, aborted.text
    assert assigned_versions(harness)[device.id] == "1.0.0"


def test_a_device_fails_with_its_first_failure_event(
    harness: Harness, devices: Callable[[int], list[FakeDevice]]
) -> None:
    fleet = devices(3)
    start(harness, version="2.0.0", stages=[100], soak_s=600, max_failure_rate=0.5)
    harness.clock.advance(30)
    report(fleet[0], "install.failed", "boot_check.fell_back", "boot_check.reported")
    report(fleet[1], "boot_check.rolled_back", "install.failed")
    seen = rollout_outcomes(harness)
    assert seen[fleet[0].id] == ("failed", "install.failed")
    assert seen[fleet[1].id] == ("failed", "boot_check.rolled_back")
    assert seen[fleet[2].id] == ("pending", None)


@pytest.mark.parametrize(
    "event",
    ["install.failed", "boot_check.rolled_back", "boot_check.fell_back", "boot_check.reported"],
)
def test_each_failure_event_alone_fails_a_member(
    harness: Harness, devices: Callable[[int], list[FakeDevice]], event: str
) -> None:
    fleet = devices(2)
    start(harness, version="2.0.0", stages=[100], soak_s=600, max_failure_rate=0.5)
    harness.clock.advance(30)
    report(fleet[0], "install.started", event)
    assert rollout_outcomes(harness) == {
        fleet[0].id: ("failed", event), fleet[1].id: ("pending", None),
    }  # fmt: skip


def test_a_refusal_fails_a_member_only_for_the_rollout_s_release(
    harness: Harness, devices: Callable[[int], list[FakeDevice]]
) -> None:
    """A device back from days offline sends its backlog after it was assigned: a refusal of
    another release, or one that names none, is not a failure of this rollout."""
    fleet = devices(2)
    start(harness, version="2.0.0", stages=[100], soak_s=600, max_failure_rate=0.5)
    harness.clock.advance(30)
    refusals = [
        ("daemon.release_failed", {"version": "1.9.0", "reason": "old"}),
        ("daemon.release_failed", {"reason": "no version"}),
        ("daemon.release_failed", {"version": 2}),
        ("daemon.release_failed", {"version": "2.0.0", "reason": "below the floor"}),
    ]
    for name, fields in refusals[:3]:
        send(fleet[0], name, fields)
    assert rollout_outcomes(harness)[fleet[0].id] == ("pending", None)
    send(fleet[0], *refusals[3])
    assert rollout_outcomes(harness) == {
        fleet[0].id: ("failed", "daemon.release_failed"), fleet[1].id: ("pending", None),
    }  # fmt: skip


def send(device: FakeDevice, name: str, fields: dict[str, Any]) -> None:
    body = {"events": [{"event": name, "seq": next(SEQ), "fields": fields}]}
    response = device.client.post(
        f"/api/v1/devices/{device.id}/events", json=body, headers=device.headers
    )
    assert response.status_code == 204, response.text


def test_failure_events_of_devices_outside_the_rollout_change_nothing(
    harness: Harness, devices: Callable[[int], list[FakeDevice]]
) -> None:
    fleet = devices(3)
    members, outsider = fleet[:2], fleet[2]
    start(
        harness, version="2.0.0", stages=[100], soak_s=600,
        device_ids=[d.id for d in members],
    )  # fmt: skip
    harness.clock.advance(30)
    report(outsider, "install.failed")
    answer = status(harness)
    assert answer["rollouts"][0]["state"] == "running"
    assert rollout_outcomes(harness) == {d.id: ("pending", None) for d in members}
    # the event of a member already failed is not a second failure either
    report(members[0], "install.failed")
    assert rollout_outcomes(harness)[members[0].id] == ("failed", "install.failed")
    harness.clock.advance(30)
    report(members[0], "boot_check.reported")
    answer = status(harness)["rollouts"][0]
    assert {d["id"]: d["reason"] for d in answer["devices"]}[members[0].id] == "install.failed"
    assert len(audit_actions(harness, "rollout.device_failed")) == 1


# --- the fleet-wide guard -------------------------------------------------------------------


def test_the_guard_counts_the_failures_of_a_running_rollout(
    harness: Harness, devices: Callable[[int], list[FakeDevice]]
) -> None:
    fleet = devices(4)
    start(harness, version="2.0.0", stages=[100], soak_s=600, max_failure_rate=0.5)
    harness.clock.advance(30)
    report(fleet[0], "install.failed")  # tolerated (1 <= floor(0.5 x 4)), but 25 % of the fleet
    answer = status(harness)
    stop = answer["emergency_stop"]
    assert stop["active"] is True
    assert (stop["reason"], stop["actor"]) == (
        "fleet guard: 1 of 4 devices unhealthy",
        "rollout-engine",
    )
    assert answer["rollouts"][0]["state"] == "paused"


def test_the_guard_does_not_count_the_failures_of_a_halted_rollout(
    harness: Harness, devices: Callable[[int], list[FakeDevice]]
) -> None:
    """A halted rollout's devices are on their way back to the release they ran."""
    fleet = devices(4)
    start(harness, version="2.0.0", stages=[100], soak_s=600)
    harness.clock.advance(30)
    report(fleet[0], "install.failed")
    answer = status(harness)
    assert answer["rollouts"][0]["state"] == "halted"
    assert rollout_outcomes(harness)[fleet[0].id] == ("failed", "install.failed")
    assert answer["emergency_stop"]["active"] is False
    assert status(harness)["emergency_stop"]["active"] is False


def test_the_guard_of_a_fleet_of_one(
    harness: Harness, devices: Callable[[int], list[FakeDevice]]
) -> None:
    (device,) = devices(1)
    assert status(harness)["emergency_stop"]["active"] is False
    assert device.heartbeat(safe_mode=True).status_code == 204
    stop = status(harness)["emergency_stop"]
    assert stop["active"] is True
    assert stop["reason"] == "fleet guard: 1 of 1 devices unhealthy"


def test_an_empty_fleet_is_evaluated_without_a_stop(harness: Harness) -> None:
    rollouts.evaluate(harness.db, utc(harness.clock))
    assert status(harness)["emergency_stop"]["active"] is False


def test_the_guard_leaves_an_operators_stop_as_it_is(
    harness: Harness, devices: Callable[[int], list[FakeDevice]]
) -> None:
    fleet = devices(4)
    response = harness.client.post(
        "/api/v1/emergency-stop", json={"reason": "storm"}, headers=harness.operator
    )
    assert response.status_code == 200, response.text
    before = response.json()
    harness.clock.advance(30)
    for device in fleet[:2]:
        assert device.heartbeat(safe_mode=True).status_code == 204
    stop = status(harness)["emergency_stop"]
    assert stop == before
    assert stop["reason"] == "storm" and stop["actor"].startswith("operator")
    assert len(audit_actions(harness, "fleet.emergency_stop")) == 1


# --- one evaluator at a time ----------------------------------------------------------------


def test_an_evaluation_holds_the_evaluator_lock_in_its_own_transaction(
    harness: Harness, devices: Callable[[int], list[FakeDevice]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The evaluator, the emergency stop and the transitions exclude each other through one
    lock, taken in the transaction that writes (on PostgreSQL an advisory lock; SQLite's write
    transaction already excludes other writers, so only the call itself can be checked)."""
    devices(2)
    start(harness, version="2.0.0", stages=[100])
    db = harness.db
    taken: list[tuple[Any, int]] = []
    real_lock = db.lock

    def lock(session: Any, key: int) -> None:
        assert session is not None and session.in_transaction()
        taken.append((session, key))
        real_lock(session, key)

    monkeypatch.setattr(db, "lock", lock)
    now = utc(harness.clock)
    firsts = []
    for work in (
        lambda: rollouts.evaluate(db, now),
        lambda: rollouts.emergency_stop(db, "storm", actor="operator:test", now=now),
    ):
        taken.clear()
        work()
        # the evaluator lock first, then (the audit chain's) in the same transaction
        assert len({id(session) for session, _ in taken}) == 1
        firsts.append(taken[0][1])
    assert firsts == [rollouts.ROLLOUT_EVALUATOR_LOCK] * 2
