"""Staged rollouts: the pure rules by property, the engine through the API, the CLI and a fake
fleet of devices that heartbeat and report events on the server's fake clock."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import example, given
from hypothesis import strategies as st

from fleet_core.cli import fleet
from server import rollouts
from server.audit import AuditEntry, verify_chain
from server.database import Database
from server.errors import RolloutConflictError
from server.rollout_text import duration_text
from server.rollouts import (
    Decision,
    Observation,
    Outcome,
    Plan,
    cohort_point,
    decide,
    device_outcome,
    device_stage,
    failure_allowance,
)
from server.settings import utc
from tests.server.conftest import FakeDevice, Harness, LiveServer, at_once

Enrolled = Callable[..., FakeDevice]
MakeBundle = Callable[..., Path]
T0 = datetime(2026, 1, 1, tzinfo=UTC)

# --- the rules, by property -----------------------------------------------------------------

percent_lists = st.lists(st.integers(1, 99), max_size=4, unique=True).map(
    lambda ps: (*sorted(ps), 100)
)
plans = st.builds(Plan, st.booleans(), percent_lists)
outcome_lists = st.lists(st.sampled_from(list(Outcome)), max_size=60)
rates = st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.25, 0.5])
device_ids = st.text("0123456789abcdef", min_size=64, max_size=64)


def test_failure_rule_examples() -> None:
    assert failure_allowance(20, 0.05, canary=False) == 1  # 1 of 20 holds, 2 of 20 halt
    assert failure_allowance(19, 0.05, canary=False) == 0
    assert failure_allowance(100, 0.07, canary=False) == 7
    assert failure_allowance(100, 0.29, canary=False) == 29
    assert failure_allowance(1000, 0.5, canary=True) == 0
    plan = Plan(False, (5, 25, 100))
    ok = [Outcome.SUCCEEDED] * 19
    assert decide(plan, 0, [*ok, Outcome.FAILED], True, 0.05) is Decision.PROMOTE
    assert decide(plan, 0, [*ok, Outcome.PENDING], True, 0.05) is Decision.WAIT
    assert decide(plan, 0, [*ok[:18], Outcome.FAILED, Outcome.FAILED], True, 0.05) is (
        Decision.HALT
    )


@given(plans, st.data(), outcome_lists, st.booleans(), rates)
def test_decide_halts_exactly_when_the_rule_says(
    plan: Plan, data: st.DataObject, outcomes: list[Outcome], soaked: bool, rate: float
) -> None:
    stage = data.draw(st.integers(0, len(plan) - 1))
    decision = decide(plan, stage, outcomes, soaked, rate)
    failures = outcomes.count(Outcome.FAILED)
    canary = plan.has_canary and stage == 0
    limit = 0 if canary else int(rate * len(outcomes) + 1e-9)
    assert (decision is Decision.HALT) == (failures > limit)
    if decision in (Decision.PROMOTE, Decision.COMPLETE):
        # Never past a failed or unfinished gate, never before the soak.
        assert soaked and Outcome.PENDING not in outcomes and failures <= limit
        assert (decision is Decision.COMPLETE) == (stage == len(plan) - 1)
    if soaked and Outcome.PENDING not in outcomes and failures <= limit:
        assert decision in (Decision.PROMOTE, Decision.COMPLETE)
    if failures == 0 and decision is not Decision.WAIT:
        assert decision is not Decision.HALT


@given(plans, st.integers(1, 2**31 - 1), st.lists(device_ids, max_size=40, unique=True), st.data())
def test_cohorts_are_stable_and_monotone(
    plan: Plan, rollout_id: int, ids: list[str], data: st.DataObject
) -> None:
    canaries = set(data.draw(st.lists(st.sampled_from(ids), max_size=3))) if ids else set()

    def stages() -> dict[str, int]:
        return {d: device_stage(plan, cohort_point(rollout_id, d), d in canaries) for d in ids}

    first = stages()
    assert stages() == first  # the same on every evaluation
    # A device enrolled later changes nobody's cohort: each device's stage depends on itself.
    assert {d: first[d] for d in ids[: len(ids) // 2]} == {
        d: device_stage(plan, cohort_point(rollout_id, d), d in canaries)
        for d in ids[: len(ids) // 2]
    }
    previous: set[str] = set()
    for stage in range(len(plan)):
        cohort = {d for d, s in first.items() if s <= stage}
        assert previous <= cohort  # a device in 5 % stays in 25 %
        previous = cohort
    assert previous == set(ids)  # the last stage is everybody
    for d, s in first.items():
        assert 0 <= cohort_point(rollout_id, d) < 1
        if plan.has_canary:
            assert (s == 0) == (d in canaries)


@given(plans, rates, st.lists(st.booleans(), min_size=1, max_size=50), st.integers(1, 10**6))
def test_a_simulated_rollout_never_passes_a_failed_gate(
    plan: Plan, rate: float, fates: list[bool], rollout_id: int
) -> None:
    """Devices with a bad fate fail, the others succeed; run the rules stage by stage."""
    ids = [f"{i:064x}" for i in range(len(fates))]
    canaries = set(ids[:2])
    stage_of = {d: device_stage(plan, cohort_point(rollout_id, d), d in canaries) for d in ids}
    stage, decision = 0, Decision.PROMOTE
    while decision is Decision.PROMOTE:
        cohort = [good for d, good in zip(ids, fates, strict=True) if stage_of[d] <= stage]
        outcomes = [Outcome.SUCCEEDED if good else Outcome.FAILED for good in cohort]
        decision = decide(plan, stage, outcomes, True, rate)
        if decision is Decision.PROMOTE:
            stage += 1
    failures = outcomes.count(Outcome.FAILED)
    if decision is Decision.COMPLETE:
        assert failures <= failure_allowance(len(outcomes), rate, canary=False)
        assert stage == len(plan) - 1
    else:
        assert decision is Decision.HALT
        assert failures > failure_allowance(len(outcomes), rate, plan.is_canary(stage))


# the interesting outcomes are rare among random draws: each is pinned by an example
@example(True, False, True, None, 1000, 1000, 0)  # soaked, fresh heartbeat: succeeded
@example(True, False, True, None, 1000, 2000, 0)  # soaked, heartbeat stale: pending
@example(True, False, True, None, 1000, 1000, 300)  # not soaked yet: pending
@example(False, False, False, None, 3700, 3700, None)  # silent past the deadline: failed
@given(
    st.booleans(), st.booleans(), st.booleans(),
    st.sampled_from([None, "install.failed", "boot_check.fell_back"]),
    st.integers(-100, 5000), st.integers(0, 5000), st.sampled_from([None, 0, 300, 2000]),
)  # fmt: skip
def test_device_outcome_rules(
    committed: bool,
    safe_mode: bool,
    new_version: bool,
    event: str | None,
    heartbeat_offset: int,
    now_offset: int,
    since_offset: int | None,
) -> None:
    heartbeat_at = T0 + timedelta(seconds=heartbeat_offset)
    now = max(heartbeat_at, T0 + timedelta(seconds=now_offset))
    since = T0 + timedelta(seconds=since_offset) if since_offset is not None else None
    observation = Observation("2.0.0" if new_version else "1.0.0", committed, safe_mode,
                              heartbeat_at, event)  # fmt: skip
    outcome, new_since, reason = device_outcome(
        observation, version="2.0.0", assigned_at=T0, committed_since=since, now=now,
        soak_s=900, install_deadline_s=3600,
    )  # fmt: skip
    if event is not None:
        assert (outcome, reason) == (Outcome.FAILED, event)
    elif safe_mode and heartbeat_offset >= 0:
        assert (outcome, reason) == (Outcome.FAILED, "safe_mode")
    if outcome is Outcome.SUCCEEDED:
        assert committed and new_version and not safe_mode and event is None
        assert new_since is not None and now - new_since >= timedelta(seconds=900)
        assert now - heartbeat_at <= timedelta(seconds=rollouts.HEARTBEAT_FRESH_S)
    if reason == "install_deadline":
        assert now - T0 > timedelta(seconds=3600)


# --- the engine through the API -------------------------------------------------------------


class Fleet:
    """Fake devices that check in and heartbeat what they were assigned (or stay put)."""

    def __init__(self, harness: Harness, devices: list[FakeDevice]) -> None:
        self.harness = harness
        self.devices = devices
        self.bad: set[str] = set()  # devices whose install of the new release fails
        self.seq: dict[str, int] = {d.id: 0 for d in devices}
        self.version = {d.id: "1.0.0" for d in devices}
        self.logged_in: dict[str, float] = {}
        self.labels: dict[str, dict[str, Any]] = {}  # device id -> {"role", "tags"}

    def assigned(self) -> dict[str, str | None]:
        response = self.harness.client.get("/api/v1/devices", headers=self.harness.viewer)
        return {d["id"]: d["assigned_version"] for d in response.json()["devices"]}

    def tick(self, seconds: float = 150) -> dict[str, Any]:
        assigned = self.assigned()
        for device in self.devices:
            if self.harness.clock.now - self.logged_in.get(device.id, -1e12) > 3000:
                device.login()  # sessions last an hour of the fake clock
                self.logged_in[device.id] = self.harness.clock.now
            target = assigned[device.id]
            if target is not None and target != self.version[device.id]:
                if device.id in self.bad:
                    self.seq[device.id] += 1
                    response = device.events(("install.failed", self.seq[device.id]))
                    assert response.status_code == 204, response.text
                    continue
                self.version[device.id] = target
            version = self.version[device.id]
            response = device.heartbeat(
                version=version,
                slots={"a": {"status": "good", "version": version}, "b": {"status": "good"}},
                **self.labels.get(device.id, {}),
            )
            assert response.status_code == 204, response.text
        self.harness.clock.advance(seconds)
        return status(self.harness)


def status(harness: Harness) -> dict[str, Any]:
    response = harness.client.get("/api/v1/rollouts", headers=harness.viewer)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def start(harness: Harness, **body: Any) -> dict[str, Any]:
    response = harness.client.post("/api/v1/rollouts", json=body, headers=harness.operator)
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


def actions(harness: Harness) -> list[dict[str, Any]]:
    response = harness.client.get("/api/v1/audit?limit=1000", headers=harness.viewer)
    return [e for e in response.json()["entries"] if not e["actor"].startswith("device:")]


@pytest.fixture
def fleet_of(
    harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle
) -> Callable[[int], Fleet]:
    def make(size: int) -> Fleet:
        for version in ("1.0.0", "2.0.0"):
            response = harness.upload(make_bundle(f"{version}.bundle", version=version))
            assert response.status_code == 201, response.text
        devices = [enrolled(hostname=f"cam-{i:04d}") for i in range(size)]
        return Fleet(harness, devices)

    return make


def test_a_good_release_goes_canary_5_25_100(harness: Harness, fleet_of: Any) -> None:
    fleet = fleet_of(20)
    fleet.tick(0)
    canaries = [d.id for d in fleet.devices[:2]]
    rollout = start(harness, version="2.0.0", canary=canaries, soak_s=600)
    assert rollout["stage_name"] == "canary"
    assert {d["id"] for d in rollout["devices"]} == set(canaries)
    seen, cohorts = ["canary"], [set(canaries)]
    for _ in range(60):
        answer = fleet.tick()["rollouts"][0]
        members = {d["id"] for d in answer["devices"]}
        assert cohorts[-1] <= members  # nobody ever leaves a cohort
        if answer["stage_name"] != seen[-1]:
            seen.append(answer["stage_name"])
            cohorts.append(members)
        if answer["state"] == "completed":
            break
    assert answer["state"] == "completed", answer
    assert seen == ["canary", "5%", "25%", "100%"]
    assert answer["counts"] == {"pending": 0, "succeeded": 20, "failed": 0}
    assert set(fleet.assigned().values()) == {"2.0.0"}
    assert set(fleet.version.values()) == {"2.0.0"}
    done = [e["action"] for e in actions(harness) if e["subject"] == f"rollout:{rollout['id']}"]
    assert done.count("rollout.promoted") == 3
    assert done[0] == "rollout.started" and done[-1] == "rollout.completed"


def test_a_bad_release_halts_at_canary(harness: Harness, fleet_of: Any) -> None:
    fleet = fleet_of(10)
    fleet.tick(0)
    canaries = [d.id for d in fleet.devices[:2]]
    fleet.bad = {d.id for d in fleet.devices}
    rollout = start(harness, version="2.0.0", canary=canaries, soak_s=600)
    for _ in range(5):
        answer = fleet.tick()["rollouts"][0]
        if answer["state"] != "running":
            break
    assert answer["state"] == "halted", answer
    assert answer["stage_name"] == "canary"
    assert "failed in stage canary" in answer["reason"]
    assert {d["id"] for d in answer["devices"]} == set(canaries)
    assigned = fleet.assigned()
    # The canaries go back to what they ran; nobody else was ever assigned anything.
    assert all(assigned[c] == "1.0.0" for c in canaries)
    assert all(assigned[d.id] is None for d in fleet.devices[2:])
    halted = [e for e in actions(harness) if e["action"] == "rollout.halted"]
    assert len(halted) == 1
    failed = [e["details"] for e in actions(harness) if e["action"] == "rollout.device_failed"]
    assert sorted(f["device"] for f in failed) == sorted(canaries)
    assert all(f["reason"] == "install.failed" and f["returned"] for f in failed)
    for _ in range(3):  # a halted rollout stays halted
        assert fleet.tick()["rollouts"][0]["state"] == "halted"
    assert rollout["id"] == answer["id"]


def test_emergency_stop_withdraws_assignments_at_once(harness: Harness, fleet_of: Any) -> None:
    fleet = fleet_of(4)
    fleet.tick(0)
    committed = fleet.devices[0]
    rollout = start(harness, version="2.0.0", stages=[100], soak_s=600)
    assert rollout["counts"]["pending"] == 4
    # Only the first device installs and heartbeats the new release before the stop.
    response = committed.heartbeat(version="2.0.0")
    assert response.status_code == 204
    status(harness)
    response = harness.client.post(
        "/api/v1/emergency-stop", json={"reason": "cameras dropping"}, headers=harness.operator
    )
    assert response.status_code == 200, response.text
    assert response.json()["active"] is True
    for device in fleet.devices:
        answer = json.loads(device.checkin().json()["answer"])
        expected = "2.0.0" if device is committed else None
        assert (answer["assignment"] or {}).get("version") == expected, device.hostname
    answer = status(harness)
    assert answer["emergency_stop"]["reason"] == "cameras dropping"
    assert answer["rollouts"][0]["state"] == "paused"
    assert "emergency stop" in answer["rollouts"][0]["reason"]
    # Nothing starts or resumes while the stop is on; clearing it and resuming reassigns.
    path = f"/api/v1/rollouts/{rollout['id']}"
    resumed = harness.client.post(f"{path}/resume", headers=harness.operator)
    assert resumed.status_code == 409, resumed.text
    cleared = harness.client.post("/api/v1/emergency-stop/clear", headers=harness.operator)
    assert cleared.json()["active"] is False
    resumed = harness.client.post(f"{path}/resume", headers=harness.operator)
    assert resumed.status_code == 200, resumed.text
    assert set(fleet.assigned().values()) == {"2.0.0"}
    stops = [e["action"] for e in actions(harness) if e["action"].startswith("fleet.")]
    assert stops == ["fleet.emergency_stop", "fleet.emergency_stop_cleared"]


def test_fleet_guard_stops_everything(harness: Harness, fleet_of: Any) -> None:
    fleet = fleet_of(10)
    fleet.tick(0)
    start(harness, version="2.0.0", stages=[100], soak_s=600)
    for device in fleet.devices[:2]:  # 2 of 10 is not more than 20 %
        assert device.heartbeat(safe_mode=True).status_code == 204
    answer = status(harness)
    assert answer["emergency_stop"]["active"] is False
    assert fleet.devices[2].heartbeat(safe_mode=True).status_code == 204
    answer = status(harness)
    # The 3 in safe mode failed the rollout first (3 > floor(0.05 * 10)): it halted; the guard
    # counts them too and stops the fleet.
    stop = answer["emergency_stop"]
    assert stop["active"] is True and stop["actor"] == "rollout-engine"
    assert "3 of 10 devices unhealthy" in stop["reason"]
    assert [e for e in actions(harness) if e["action"] == "fleet.emergency_stop"]


def test_fleet_guard_without_rollouts(harness: Harness, fleet_of: Any) -> None:
    fleet = fleet_of(4)
    for device in fleet.devices[:1]:
        assert device.heartbeat(safe_mode=True).status_code == 204
    answer = status(harness)
    assert answer["emergency_stop"]["active"] is True
    refused = harness.client.post(
        "/api/v1/rollouts", json={"version": "2.0.0"}, headers=harness.operator
    )
    assert refused.status_code == 409 and refused.json()["error"] == "rollout_conflict"


def test_rollout_api_refusals_and_roles(harness: Harness, fleet_of: Any) -> None:
    fleet = fleet_of(2)
    post = harness.client.post
    viewer = post("/api/v1/rollouts", json={"version": "2.0.0"}, headers=harness.viewer)
    assert viewer.status_code == 403
    unknown = post("/api/v1/rollouts", json={"version": "9.9.9"}, headers=harness.operator)
    assert unknown.status_code == 404
    for bad in ({"stages": [25, 5, 100]}, {"stages": [5, 25]}, {"canary": ["0" * 64]}):
        answer = post(
            "/api/v1/rollouts", json={"version": "2.0.0", **bad}, headers=harness.operator
        )
        assert answer.status_code == 422, (bad, answer.text)
    rollout = start(harness, version="2.0.0", device_ids=[fleet.devices[0].id], stages=[100])
    assert [d["id"] for d in rollout["devices"]] == [fleet.devices[0].id]
    again = post("/api/v1/rollouts", json={"version": "2.0.0"}, headers=harness.operator)
    assert again.status_code == 409
    path = f"/api/v1/rollouts/{rollout['id']}"
    assert post(f"{path}/resume", headers=harness.operator).status_code == 409
    assert post(f"{path}/pause", headers=harness.viewer).status_code == 403
    paused = post(f"{path}/pause", json={"reason": "lunch"}, headers=harness.operator).json()
    assert (paused["state"], paused["reason"]) == ("paused", "lunch")
    aborted = post(f"{path}/abort", headers=harness.operator).json()
    assert aborted["state"] == "aborted"
    assert fleet.assigned()[fleet.devices[0].id] is None  # back to what it had: nothing
    assert harness.client.get("/api/v1/rollouts/99", headers=harness.viewer).status_code == 404


def test_a_selector_picks_devices_by_role_and_tags(harness: Harness, fleet_of: Any) -> None:
    fleet = fleet_of(12)
    for index, device in enumerate(fleet.devices):
        role = ("camera", "sensor", "gateway")[index % 3]
        fleet.labels[device.id] = {"role": role, "tags": ["north"] if index < 6 else ["south"]}
    fleet.tick(0)
    chosen = {
        d.id for d in fleet.devices
        if fleet.labels[d.id] == {"role": "camera", "tags": ["north"]}
    }  # fmt: skip
    assert len(chosen) == 2
    rollout = start(
        harness, version="2.0.0", stages=[50, 100], soak_s=60,
        selector={"role": "camera", "tags": ["north"]},
    )  # fmt: skip
    assert rollout["selector"] == {"role": "camera", "tags": ["north"]}
    assert sum(s["expected"] for s in rollout["stage_progress"]) == 2
    for _ in range(10):
        answer = fleet.tick()["rollouts"][0]
        if answer["state"] == "completed":
            break
    assert answer["state"] == "completed", answer
    assert {d["id"] for d in answer["devices"]} == chosen
    assigned = fleet.assigned()
    assert {d for d, v in assigned.items() if v == "2.0.0"} == chosen
    assert [s["succeeded"] for s in answer["stage_progress"]] == [
        s["expected"] for s in answer["stage_progress"]
    ]
    refused = harness.client.post(
        "/api/v1/rollouts", json={"version": "2.0.0", "selector": {"role": "Camera!"}},
        headers=harness.operator,
    )  # fmt: skip
    assert refused.status_code == 422 and "role" in refused.text


def test_the_failure_rule_is_shown_with_the_sample_it_needs(
    harness: Harness, fleet_of: Any
) -> None:
    fleet = fleet_of(20)
    fleet.tick(0)
    fleet.bad = {fleet.devices[0].id}
    start(harness, version="2.0.0", stages=[100], soak_s=300)
    answer = fleet.tick()["rollouts"][0]
    rule = answer["failure_rule"]
    assert rule["min_devices_for_one_failure"] == 20
    assert (rule["assigned"], rule["failed"], rule["allowed"]) == (20, 1, 1)
    assert "floor(0.05 x assigned devices)" in rule["text"]


def test_a_halted_rollout_resumes_once_its_failures_are_acknowledged(
    harness: Harness, fleet_of: Any
) -> None:
    fleet = fleet_of(10)
    fleet.tick(0)
    canaries = [d.id for d in fleet.devices[:2]]
    fleet.bad = {canaries[0]}
    rollout = start(harness, version="2.0.0", canary=canaries, soak_s=60)
    for _ in range(5):
        if fleet.tick()["rollouts"][0]["state"] == "halted":
            break
    fleet.bad = set()  # say the failure was the device's, not the release's
    resumed = harness.client.post(
        f"/api/v1/rollouts/{rollout['id']}/resume", json={"reason": "bad sd card on cam-0000"},
        headers=harness.operator,
    )  # fmt: skip
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["acknowledged"] == [canaries[0]]
    entry = [e for e in actions(harness) if e["action"] == "rollout.resumed"][-1]
    assert entry["details"]["acknowledged"] == [canaries[0]]
    assert entry["details"]["reason"] == "bad sd card on cam-0000"
    assert entry["actor"].startswith("operator")
    for _ in range(20):
        answer = fleet.tick()["rollouts"][0]
        if answer["state"] != "running":
            break
    assert answer["state"] == "completed", answer
    assert answer["counts"]["failed"] == 1


def test_a_resume_naming_its_acknowledged_devices_refuses_a_failure_it_does_not_name(
    harness: Harness, fleet_of: Any
) -> None:
    fleet = fleet_of(10)
    fleet.tick(0)
    canaries = [d.id for d in fleet.devices[:2]]
    fleet.bad = {canaries[0]}
    rollout = start(harness, version="2.0.0", canary=canaries, soak_s=60)
    for _ in range(5):
        if fleet.tick()["rollouts"][0]["state"] == "halted":
            break
    path = f"/api/v1/rollouts/{rollout['id']}"
    # The operator looked before the canary failed: it named no device.
    refused = harness.client.post(
        f"{path}/resume", json={"acknowledge": []}, headers=harness.operator
    )
    assert refused.status_code == 409, refused.text
    assert f"not acknowledged: {canaries[0]}" in refused.json()["detail"]
    view = harness.client.get(path, headers=harness.viewer).json()
    assert (view["state"], view["acknowledged"]) == ("halted", [])
    assert [e for e in actions(harness) if e["action"] == "rollout.resumed"] == []
    for bad_body in ({"acknowledge": ["cam-0000"]}, {"acknowledge": canaries[0]}):
        answer = harness.client.post(f"{path}/resume", json=bad_body, headers=harness.operator)
        assert answer.status_code == 422 and "acknowledge" in answer.text, answer.text
    paused = harness.client.post(
        f"{path}/pause", json={"acknowledge": [canaries[0]]}, headers=harness.operator
    )
    assert paused.status_code == 422, paused.text  # only a resume acknowledges
    resumed = harness.client.post(
        f"{path}/resume", json={"acknowledge": [canaries[0]], "reason": "bad sd card"},
        headers=harness.operator,
    )  # fmt: skip
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["acknowledged"] == [canaries[0]]
    entry = [e for e in actions(harness) if e["action"] == "rollout.resumed"][-1]
    assert entry["details"]["acknowledged"] == [canaries[0]]


def test_transition_acknowledges_only_failures_it_names_or_every_one_unnamed(
    harness: Harness, fleet_of: Any
) -> None:
    fleet = fleet_of(10)
    fleet.tick(0)
    canaries = [d.id for d in fleet.devices[:2]]
    fleet.bad = set(canaries)
    rollout = start(harness, version="2.0.0", canary=canaries, soak_s=60)
    for _ in range(5):
        answer = fleet.tick()["rollouts"][0]
        if answer["state"] == "halted" and answer["counts"]["failed"] == 2:
            break
    assert answer["counts"]["failed"] == 2, answer

    def resume(acknowledge: list[str] | None) -> dict[str, Any]:
        return rollouts.transition(
            harness.db, rollout["id"], "resume", actor="operator:test", now=utc(harness.clock),
            reason=None, acknowledge=acknowledge,
        )  # fmt: skip

    with pytest.raises(RolloutConflictError, match=canaries[1]) as refused:
        resume([canaries[0], "f" * 64])
    assert canaries[0] not in str(refused.value)
    assert resume(None)["acknowledged"] == sorted(canaries)


def test_while_a_rollout_is_active_devices_are_asked_to_check_in_more_often(
    harness: Harness, fleet_of: Any
) -> None:
    fleet = fleet_of(3)
    device = fleet.devices[0]

    def answer() -> tuple[dict[str, Any], str]:
        response = device.checkin()
        assert response.status_code == 200, response.text
        return json.loads(response.json()["answer"]), response.headers["ETag"]

    quiet, quiet_etag = answer()
    assert quiet["checkin_interval_s"] is None
    rollout = start(harness, version="2.0.0", stages=[100])
    busy, busy_etag = answer()
    assert busy["checkin_interval_s"] == harness.settings.active_checkin_interval_s == 15
    assert busy_etag != quiet_etag  # so a device holding the old answer gets the new one
    harness.client.post(f"/api/v1/rollouts/{rollout['id']}/abort", headers=harness.operator)
    assert answer()[0]["checkin_interval_s"] is None


def test_an_unchanged_checkin_of_a_device_seen_recently_writes_nothing(
    harness: Harness, fleet_of: Any
) -> None:
    device = fleet_of(1).devices[0]

    def last_seen() -> str:
        response = harness.client.get(f"/api/v1/devices/{device.id}", headers=harness.viewer)
        return str(response.json()["last_seen"])

    etag = device.checkin().headers["ETag"]
    seen = last_seen()
    harness.clock.advance(10)
    assert device.checkin(etag=etag).status_code == 304
    assert last_seen() == seen  # a read, not a write
    harness.clock.advance(60)
    assert device.checkin(etag=etag).status_code == 304
    assert last_seen() != seen  # refreshed once it is older than the resolution


# --- the CLI --------------------------------------------------------------------------------


def run(live: LiveServer, *args: str, role: str = "operator") -> Result:
    token = live.harness.headers[role]["Authorization"].split()[1]
    return CliRunner().invoke(fleet, [*args, "--server", live.url, "--token", token])


def test_rollout_cli(live_server: LiveServer, enrolled: Enrolled, make_bundle: MakeBundle) -> None:
    harness = live_server.harness
    assert harness.upload(make_bundle(version="2.0.0")).status_code == 201
    devices = [enrolled(hostname=f"cam-{i}") for i in range(3)]
    started = run(
        live_server, "rollout", "start", "2.0.0", "--canary", devices[0].id,
        "--stages", "5,25,100", "--soak", "15m", "--max-failure", "5%",
    )  # fmt: skip
    assert started.exit_code == 0, started.output
    assert "rollout 1: 2.0.0 running at stage canary (canary > 5% > 25% > 100%)" in started.output
    listed = run(live_server, "rollout", "status", "--json")
    assert listed.exit_code == 0, listed.output
    document = json.loads(listed.stdout)
    assert document["rollouts"][0]["soak_s"] == 900
    assert document["rollouts"][0]["max_failure_rate"] == 0.05
    assert run(live_server, "rollout", "pause", "1", "--reason", "look").output.count("paused")
    viewer = run(live_server, "rollout", "resume", "1", role="viewer")
    assert viewer.exit_code == 1 and "Traceback" not in viewer.output
    assert "running" in run(live_server, "rollout", "resume", "1").output
    stopped = run(live_server, "emergency-stop", "--reason", "storm")
    assert "emergency stop ON" in stopped.output and "storm" in stopped.output
    assert "EMERGENCY STOP" in run(live_server, "rollout", "status").output
    assert "off" in run(live_server, "emergency-stop", "--clear").output
    rolled = run(live_server, "rollout", "rollback", "1")
    assert rolled.exit_code == 0 and "aborted" in rolled.output
    conflict = run(live_server, "rollout", "pause", "1")
    assert conflict.exit_code == 1 and "cannot pause" in conflict.output
    bad = run(live_server, "rollout", "start", "2.0.0", "--max-failure", "lots")
    assert bad.exit_code == 2
    odd = run(live_server, "rollout", "start", "2.0.0", "--selector", "colour=red")
    assert odd.exit_code == 2 and "role=NAME or tag=NAME" in odd.output
    listed = run(live_server, "audit", "list", "--action", "rollout", "--json", role="viewer")
    assert listed.exit_code == 0, listed.output
    entries = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [e["action"] for e in entries][:2] == ["rollout.started", "rollout.assigned"]
    assert {e["subject"] for e in entries} == {"rollout:1"}
    assert all(e["action"].startswith("rollout.") for e in entries)
    stops = run(live_server, "audit", "list", "--action", "fleet.emergency_stop", "--last", "1")
    assert stops.stdout.count("\n") == 1 and "fleet.emergency_stop" in stops.stdout
    assert "storm" in stops.stdout
    again = json.loads(run(live_server, "emergency-stop", "--reason", "again", "--json").stdout)
    assert (again["active"], again["reason"]) == (True, "again")
    cleared = json.loads(run(live_server, "emergency-stop", "--clear", "--json").stdout)
    assert cleared["active"] is False


def test_rollout_status_watch_draws_a_bar_per_stage(
    live_server: LiveServer, enrolled: Enrolled, make_bundle: MakeBundle
) -> None:
    harness = live_server.harness
    assert harness.upload(make_bundle(version="2.0.0")).status_code == 201
    devices = [enrolled(hostname=f"cam-{i}") for i in range(4)]
    for device in devices:
        device.heartbeat(role="camera", tags=["north"])
    started = run(
        live_server, "rollout", "start", "2.0.0", "--canary", devices[0].id,
        "--selector", "role=camera", "--selector", "tag=north", "--stages", "50,100",
    )  # fmt: skip
    assert started.exit_code == 0, started.output
    assert run(live_server, "rollout", "abort", "1").exit_code == 0
    # --watch ends by itself once nothing is running or paused: here the newest, aborted
    watched = run(live_server, "rollout", "status", "--watch", "--interval", "0.1")
    assert watched.exit_code == 1, watched.output
    assert watched.stderr.startswith("Error: rollout 1 aborted")
    lines = watched.stdout.splitlines()
    assert lines[0].startswith("rollout 1: 2.0.0 ABORTED at stage canary")
    assert lines[1] == "  selector: role=camera tag=north"
    bars = [line for line in lines if "[" in line and "ok," in line]
    assert [b.split()[0] for b in bars] == ["canary", "50%", "100%"]
    assert "failure rule: halt on any failure in the canary stage" in watched.output
    assert "one failure is tolerated from 20 devices on" in watched.output


@pytest.mark.parametrize(("bad", "code", "end"), [(False, 0, "COMPLETED"), (True, 1, "HALTED")])
def test_watching_one_rollout_exits_as_it_ends(
    live_server: LiveServer, fleet_of: Any, monkeypatch: pytest.MonkeyPatch,
    bad: bool, code: int, end: str,
) -> None:  # fmt: skip
    """As `kubectl rollout status`: 0 once it completes, 1 once it halts; each wait of the watch
    lets the fake fleet move on."""
    fleet = fleet_of(4)
    fleet.tick(0)
    if bad:
        fleet.bad = {d.id for d in fleet.devices}
    rollout = start(live_server.harness, version="2.0.0", stages=[100], soak_s=60)
    waits: list[float] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        assert len(waits) < 20, "the watch did not end"
        fleet.tick()

    monkeypatch.setattr("server.cli.rollouts.time.sleep", wait)
    watched = run(live_server, "rollout", "status", str(rollout["id"]), "--watch")
    assert watched.exit_code == code, watched.output
    assert waits and set(waits) == {2.0}
    finals = [line for line in watched.stdout.splitlines() if line.startswith("rollout ")]
    assert finals[-1].startswith(f"rollout {rollout['id']}: 2.0.0 {end}")
    if bad:
        assert watched.stderr.startswith(f"Error: rollout {rollout['id']} halted: ")
    as_json = run(live_server, "rollout", "status", str(rollout["id"]), "--watch", "--json")
    assert as_json.exit_code == code  # ended already: one document, the same verdict
    assert json.loads(as_json.stdout)["state"] == end.lower()


def test_watching_the_rollouts_follows_those_running_when_it_began(
    live_server: LiveServer, fleet_of: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = fleet_of(4)
    fleet.tick(0)
    first = start(live_server.harness, version="2.0.0", stages=[100], soak_s=60)
    aborted = run(live_server, "rollout", "abort", str(first["id"]), "--json")
    assert aborted.exit_code == 0 and json.loads(aborted.stdout)["state"] == "aborted"
    # with none going, the newest is judged: aborted (before the watch began) is a failure
    ended = run(live_server, "rollout", "status", "--watch")
    assert ended.exit_code == 1 and ended.stderr.startswith(f"Error: rollout {first['id']} aborted")
    begun = run(live_server, "rollout", "start", "2.0.0", "--stages", "100", "--soak", "1m",
                "--json")  # fmt: skip
    assert begun.exit_code == 0, begun.output
    second = json.loads(begun.stdout)
    assert (second["state"], second["soak_s"]) == ("running", 60)
    monkeypatch.setattr("server.cli.rollouts.time.sleep", lambda seconds: fleet.tick())
    watched = run(live_server, "rollout", "status", "--watch", "--json")
    assert watched.exit_code == 0, watched.output
    [document] = [json.loads(watched.stdout)]  # one document, at the end
    assert [r["state"] for r in document["rollouts"]] == ["completed", "aborted"]
    assert document["rollouts"][0]["id"] == second["id"]
    unknown = run(live_server, "rollout", "status", "99")
    assert unknown.exit_code == 1 and "unknown_rollout" in unknown.stderr


def test_late_devices_join_once_with_concurrent_evaluators(
    harness: Harness, fleet_of: Any, enrolled: Enrolled
) -> None:
    """Two processes' evaluators at once: each late device is assigned exactly once."""
    fleet = fleet_of(2)
    rollout = start(harness, version="2.0.0", stages=[100])
    late = [enrolled(hostname=f"late-{i}") for i in range(4)]
    now = utc(harness.clock)

    def work(db: Database, _: object) -> None:
        for _ in range(5):
            rollouts.evaluate(db, now)

    at_once(harness, work, [1, 2])
    answer = status(harness)["rollouts"][0]
    assert {d["id"] for d in answer["devices"]} == {d.id for d in fleet.devices + late}
    assigned = [
        e for e in actions(harness)
        if e["action"] == "rollout.assigned" and e["subject"] == f"rollout:{rollout['id']}"
    ]  # fmt: skip
    late_ids = sorted(d for e in assigned for d in e["details"]["devices"] if d in fleet.assigned())
    assert len(late_ids) == len(set(late_ids)) == 6
    verified = harness.client.get("/api/v1/audit?limit=1000", headers=harness.viewer).json()
    assert verify_chain(AuditEntry.from_dict(e) for e in verified["entries"]).intact


@pytest.mark.parametrize(("bad", "end"), [(1, "completed"), (2, "halted")])
def test_one_failure_in_twenty_is_tolerated_two_halt(
    harness: Harness, fleet_of: Any, bad: int, end: str
) -> None:
    fleet = fleet_of(20)
    fleet.tick(0)
    fleet.bad = {d.id for d in fleet.devices[:bad]}
    start(harness, version="2.0.0", stages=[100], soak_s=300)
    for _ in range(10):
        answer = fleet.tick()["rollouts"][0]
        if answer["state"] != "running":
            break
    assert answer["state"] == end, answer
    assert answer["counts"]["failed"] == bad
    assigned = fleet.assigned()
    assert all(assigned[d] == "1.0.0" for d in fleet.bad)  # returned at once, by policy


# --- what counts as a device's success or failure, and what a stop or halt changes -----------


def outcomes(harness: Harness) -> dict[str, tuple[str, str | None]]:
    """Each device of the newest rollout: (outcome, reason), after an evaluation."""
    answer = status(harness)["rollouts"][0]
    return {d["id"]: (d["outcome"], d["reason"]) for d in answer["devices"]}


def committed_heartbeat(device: FakeDevice, version: str = "2.0.0", **changes: Any) -> None:
    slots = {"a": {"status": "good", "version": version}, "b": {"status": "good"}}
    response = device.heartbeat(version=version, slots=slots, **changes)
    assert response.status_code == 204, response.text


def test_emergency_stop_withdraws_the_assignments_of_a_paused_rollout_too(
    harness: Harness, fleet_of: Any
) -> None:
    fleet = fleet_of(3)
    fleet.tick(0)
    committed, *waiting = fleet.devices
    rollout = start(harness, version="2.0.0", stages=[100], soak_s=600)
    committed_heartbeat(committed)
    status(harness)  # evaluated while running: the first device has committed
    path = f"/api/v1/rollouts/{rollout['id']}"
    paused = harness.client.post(f"{path}/pause", json={"reason": "look"}, headers=harness.operator)
    assert paused.json()["state"] == "paused"
    assert set(fleet.assigned().values()) == {"2.0.0"}  # a pause alone withdraws nothing
    response = harness.client.post(
        "/api/v1/emergency-stop", json={"reason": "storm"}, headers=harness.operator
    )
    assert response.status_code == 200, response.text
    for device in fleet.devices:
        answer = json.loads(device.checkin().json()["answer"])
        expected = "2.0.0" if device is committed else None
        assert (answer["assignment"] or {}).get("version") == expected, device.hostname
    answer = status(harness)["rollouts"][0]
    assert (answer["state"], answer["reason"]) == ("paused", "look")  # still the operator's pause
    entry = [e for e in actions(harness) if e["action"] == "rollout.paused"][-1]
    assert entry["details"]["withdrawn"] == sorted(d.id for d in waiting)


def test_a_device_not_committed_by_the_install_deadline_fails(
    harness: Harness, fleet_of: Any
) -> None:
    """Silence is failure, and so is a device that keeps reporting its old release."""
    fleet = fleet_of(3)
    fleet.tick(0)
    good, stuck, silent = fleet.devices
    start(harness, version="2.0.0", stages=[100], soak_s=60, install_deadline_s=600)
    for _ in range(4):
        harness.clock.advance(145)  # 580 s after the assignment: within the deadline
        committed_heartbeat(good)
        assert stuck.heartbeat().status_code == 204  # still 1.0.0
        seen = outcomes(harness)
    assert seen == {
        good.id: ("succeeded", None),
        stuck.id: ("pending", None),
        silent.id: ("pending", None),
    }
    harness.clock.advance(30)  # 610 s
    committed_heartbeat(good)
    assert stuck.heartbeat().status_code == 204
    seen = outcomes(harness)
    assert seen[stuck.id] == seen[silent.id] == ("failed", "install_deadline")
    answer = status(harness)["rollouts"][0]
    assert answer["state"] == "halted" and answer["counts"]["failed"] == 2
    assigned = fleet.assigned()
    assert (assigned[stuck.id], assigned[silent.id]) == ("1.0.0", "1.0.0")


def test_install_deadline_rule() -> None:
    silent = Observation(None, False, False, None, None)
    rule = {"version": "2.0.0", "assigned_at": T0, "committed_since": None, "soak_s": 900,
            "install_deadline_s": 3600}  # fmt: skip
    at = lambda s: device_outcome(silent, now=T0 + timedelta(seconds=s), **rule)[0::2]  # noqa: E731
    assert at(3599) == (Outcome.PENDING, None)
    assert at(3601) == (Outcome.FAILED, "install_deadline")


def test_a_heartbeat_from_before_the_assignment_is_no_evidence(
    harness: Harness, fleet_of: Any
) -> None:
    device = fleet_of(1).devices[0]
    committed_heartbeat(device)  # it already says 2.0.0, committed
    harness.clock.advance(30)
    start(harness, version="2.0.0", stages=[100], soak_s=0)
    assert outcomes(harness)[device.id] == ("pending", None)
    harness.clock.advance(30)
    committed_heartbeat(device)  # the same report, after the assignment, counts
    assert outcomes(harness)[device.id] == ("succeeded", None)


@pytest.mark.parametrize(
    "boot",
    [
        {"booted": "b", "primary": "b", "trial": True},  # an undecided trial boot
        {"booted": "b", "primary": "a", "trial": False},  # not booted from the primary slot
    ],
)
def test_a_trial_boot_of_the_new_release_is_not_success(
    harness: Harness, fleet_of: Any, boot: dict[str, Any]
) -> None:
    device = fleet_of(1).devices[0]
    start(harness, version="2.0.0", stages=[100], soak_s=0)
    harness.clock.advance(30)
    committed_heartbeat(device, **boot)
    assert outcomes(harness)[device.id] == ("pending", None)
    harness.clock.advance(30)
    committed_heartbeat(device, booted="b", primary="b", trial=False)
    assert outcomes(harness)[device.id] == ("succeeded", None)


def test_success_needs_fresh_heartbeats_for_the_whole_soak(harness: Harness, fleet_of: Any) -> None:
    device = fleet_of(1).devices[0]
    start(harness, version="2.0.0", stages=[100], soak_s=600, install_deadline_s=7200)
    harness.clock.advance(10)
    committed_heartbeat(device)
    assert outcomes(harness)[device.id] == ("pending", None)
    harness.clock.advance(700)  # silent for longer than the soak: not continuously committed
    assert outcomes(harness)[device.id] == ("pending", None)
    committed_heartbeat(device)  # the soak starts again from here
    assert outcomes(harness)[device.id] == ("pending", None)
    for minutes in (2.5, 5, 7.5, 10):
        harness.clock.advance(150)
        committed_heartbeat(device)
        expected = "succeeded" if minutes == 10 else "pending"
        assert outcomes(harness)[device.id] == (expected, None), minutes


def test_only_devices_compatible_with_the_release_are_selected(
    harness: Harness, fleet_of: Any, enrolled: Enrolled
) -> None:
    fleet = fleet_of(2)
    other = enrolled(hostname="cm5-0001", compatible="metrica-cm5")
    fleet.tick(0)
    assert other.heartbeat().status_code == 204
    refused = harness.client.post(
        "/api/v1/rollouts", json={"version": "2.0.0", "canary": [other.id]},
        headers=harness.operator,
    )  # fmt: skip
    assert refused.status_code == 422, refused.text
    rollout = start(harness, version="2.0.0", stages=[100])
    assert {d["id"] for d in rollout["devices"]} == {d.id for d in fleet.devices[:2]}
    assert sum(s["expected"] for s in rollout["stage_progress"]) == 2
    assert fleet.assigned()[other.id] is None
    assert other.id not in outcomes(harness)


def test_without_rollback_on_halt_failed_and_pending_devices_stay_assigned(
    harness: Harness, fleet_of: Any
) -> None:
    fleet = fleet_of(4)
    fleet.tick(0)
    failing, slow = canaries = [d.id for d in fleet.devices[:2]]
    fleet.bad = {failing}
    rollout = start(harness, version="2.0.0", canary=canaries, soak_s=600, rollback_on_halt=False)
    assert rollout["rollback_on_halt"] is False
    answer = fleet.tick()["rollouts"][0]
    assert answer["state"] == "halted", answer
    assert outcomes(harness) == {failing: ("failed", "install.failed"), slow: ("pending", None)}
    assigned = fleet.assigned()
    assert (assigned[failing], assigned[slow]) == ("2.0.0", "2.0.0")  # left where they are
    done = {e["action"]: e["details"] for e in actions(harness)}
    assert done["rollout.device_failed"]["returned"] is False
    assert done["rollout.halted"]["rolled_back"] == []


# --- offline devices: skipped, not failed ---------------------------------------------------


def test_offline_is_unseen_for_longer_than_offline_after() -> None:
    day = rollouts.DEFAULT_OFFLINE_AFTER_S
    assert day == 86400
    assert not rollouts.offline(T0, T0 + timedelta(seconds=day), day)  # exactly: still online
    assert rollouts.offline(T0, T0 + timedelta(seconds=day + 1), day)
    assert not rollouts.offline(T0, T0, 1)
    assert rollouts.offline(T0, T0 + timedelta(seconds=2), 1)


def test_a_device_unseen_for_a_day_is_skipped_and_the_rollout_completes(
    harness: Harness, fleet_of: Any
) -> None:
    """The default: a device last seen exactly a day ago is assigned, one seen a day and a
    second ago is skipped, neither expected nor failed at the deadline (it would halt a rollout
    of four: no failure is tolerated below 20 devices)."""
    fleet = fleet_of(4)  # all seen at enrollment
    stale, edge, *fresh = fleet.devices
    harness.clock.advance(1)
    assert edge.heartbeat().status_code == 204
    harness.clock.advance(86400)
    for device in fresh:
        device.login()  # (sessions last an hour)
        assert device.heartbeat().status_code == 204
    rollout = start(harness, version="2.0.0", stages=[100], soak_s=60, install_deadline_s=600)
    assert rollout["offline_after_s"] == 86400
    assert rollout["skipped_offline"] == [stale.id]
    online = {d.id for d in (edge, *fresh)}
    assert {d["id"] for d in rollout["devices"]} == online
    assert [(s["expected"], s["assigned"]) for s in rollout["stage_progress"]] == [(3, 3)]
    assert fleet.assigned()[stale.id] is None
    reporting = Fleet(harness, [edge, *fresh])
    for _ in range(10):
        answer = reporting.tick()["rollouts"][0]
        if answer["state"] != "running":
            break
    assert answer["state"] == "completed", answer
    assert answer["counts"] == {"pending": 0, "succeeded": 3, "failed": 0}
    assert stale.id not in {d["id"] for d in answer["devices"]}
    assert answer["skipped_offline"] == []  # ended: nothing is skipped any more
    assigned = fleet.assigned()
    assert assigned[stale.id] is None


def test_a_skipped_device_seen_again_joins_its_cohort(harness: Harness, fleet_of: Any) -> None:
    fleet = fleet_of(3)
    sleeper, *awake = fleet.devices
    harness.clock.advance(3601)
    for device in awake:
        device.login()
    rollout = start(harness, version="2.0.0", stages=[100], soak_s=600, offline_after_s=3600)
    assert rollout["offline_after_s"] == 3600
    assert rollout["skipped_offline"] == [sleeper.id]
    assert sum(s["expected"] for s in rollout["stage_progress"]) == 2
    assert status(harness)["rollouts"][0]["skipped_offline"] == [sleeper.id]
    sleeper.login()  # seen again
    answer = status(harness)["rollouts"][0]
    assert answer["skipped_offline"] == []
    assert {d["id"] for d in answer["devices"]} == {d.id for d in fleet.devices}
    assert fleet.assigned()[sleeper.id] == "2.0.0"
    assert sum(s["expected"] for s in answer["stage_progress"]) == 3
    joined = [
        e["details"]["devices"] for e in actions(harness) if e["action"] == "rollout.assigned"
    ]
    assert joined[-1] == [sleeper.id]


def test_an_assigned_device_that_goes_offline_stays_a_member_and_fails_at_the_deadline(
    harness: Harness, fleet_of: Any
) -> None:
    fleet = fleet_of(2)
    good, silent = fleet.devices
    start(harness, version="2.0.0", stages=[100], soak_s=60, install_deadline_s=600,
          offline_after_s=300)  # fmt: skip
    for _ in range(4):
        harness.clock.advance(145)  # 580 s: silent is offline (after 300 s), within its deadline
        committed_heartbeat(good)
        answer = status(harness)["rollouts"][0]
        assert answer["skipped_offline"] == []  # a member, not skipped
        assert sum(s["expected"] for s in answer["stage_progress"]) == 2
    harness.clock.advance(30)
    committed_heartbeat(good)
    assert outcomes(harness)[silent.id] == ("failed", "install_deadline")
    assert status(harness)["rollouts"][0]["state"] == "halted"


def test_an_offline_canary_is_refused_by_name(harness: Harness, fleet_of: Any) -> None:
    fleet = fleet_of(2)
    sleeper, awake = fleet.devices
    harness.clock.advance(601)
    awake.login()
    refused = harness.client.post(
        "/api/v1/rollouts", json={"version": "2.0.0", "canary": [sleeper.id],
                                  "offline_after_s": 600},
        headers=harness.operator,
    )  # fmt: skip
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"] == (
        f"canary {sleeper.id} is offline: not seen for more than 600 s"
    )
    rollout = start(harness, version="2.0.0", canary=[awake.id], offline_after_s=600)
    assert [d["id"] for d in rollout["devices"]] == [awake.id]


@pytest.mark.parametrize("value", [0, 299, 365 * 86400 + 1, "1d"])
def test_offline_after_out_of_range_is_refused(harness: Harness, fleet_of: Any, value: Any) -> None:
    fleet_of(1)
    refused = harness.client.post(
        "/api/v1/rollouts", json={"version": "2.0.0", "offline_after_s": value},
        headers=harness.operator,
    )  # fmt: skip
    assert refused.status_code == 422, refused.text
    assert "offline_after_s" in refused.text


def test_rollout_start_offline_after_on_the_cli(
    live_server: LiveServer, enrolled: Enrolled, make_bundle: MakeBundle
) -> None:
    harness = live_server.harness
    assert harness.upload(make_bundle(version="2.0.0")).status_code == 201
    sleepers = [enrolled(hostname=f"cam-{i}") for i in range(2)]
    harness.clock.advance(5401)
    awake = enrolled(hostname="cam-9")
    started = run(live_server, "rollout", "start", "2.0.0", "--stages", "100",
                  "--offline-after", "1h30m", "--json")  # fmt: skip
    assert started.exit_code == 0, started.output
    answer = json.loads(started.stdout)
    assert answer["offline_after_s"] == 5400
    assert answer["skipped_offline"] == sorted(d.id for d in sleepers)
    assert [d["id"] for d in answer["devices"]] == [awake.id]
    shown = run(live_server, "rollout", "status")
    assert "  2 devices skipped: offline for more than 1h30m (assigned when seen again)" in (
        shown.output.splitlines()
    )
    assert run(live_server, "rollout", "abort", "1").exit_code == 0
    default = run(live_server, "rollout", "start", "2.0.0", "--json")
    assert default.exit_code == 0, default.output
    assert json.loads(default.stdout)["offline_after_s"] == 86400
    assert "skipped" not in run(live_server, "rollout", "status", "2").output
    bad = run(live_server, "rollout", "start", "2.0.0", "--offline-after", "soon")
    assert bad.exit_code == 2 and "--offline-after" in bad.output


def test_durations_are_shown_as_they_are_written() -> None:
    assert [duration_text(s) for s in (1, 59, 60, 3600, 5400, 86400, 90061)] == [
        "1s", "59s", "1m", "1h", "1h30m", "1d", "1d1h1m1s",
    ]  # fmt: skip


# --- a rollout that would assign no device ----------------------------------------------------

NOTHING = "the rollout would assign no device: "
ANYWAY = " (allow_empty starts it anyway)"


def test_why_a_selection_is_empty() -> None:
    assert rollouts.empty_selection("metrica-rpi4", 0, 0, 60) == (
        f"{NOTHING}no active device is compatible with 'metrica-rpi4'{ANYWAY}"
    )
    assert rollouts.empty_selection("metrica-rpi4", 1, 0, 60) == (
        f"{NOTHING}none of the 1 active devices compatible with 'metrica-rpi4' matches the "
        f"device ids and selector{ANYWAY}"
    )
    assert rollouts.empty_selection("metrica-rpi4", 1, 1, 60) == (
        f"{NOTHING}all 1 matching devices are offline: not seen for more than 60 s{ANYWAY}"
    )


def other_compatible(harness: Harness, enrolled: Enrolled) -> None:
    enrolled(hostname="cm5-0001", compatible="metrica-cm5")


def one_quarantined(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled(hostname="cam-q")
    response = harness.client.post(
        f"/api/v1/devices/{device.id}/quarantine", json={}, headers=harness.operator
    )
    assert response.status_code == 200, response.text


def none_with_the_role(harness: Harness, enrolled: Enrolled) -> None:
    for index in range(2):
        assert enrolled(hostname=f"cam-{index}").heartbeat(role="camera").status_code == 204


def all_offline(harness: Harness, enrolled: Enrolled) -> None:
    for index in range(3):
        enrolled(hostname=f"cam-{index}")
    enrolled(hostname="cm5-0001", compatible="metrica-cm5")  # online, and not compatible
    harness.clock.advance(86401)


@pytest.mark.parametrize(
    ("fleet", "why"),
    [
        (other_compatible, "no active device is compatible with 'metrica-rpi4'"),
        (one_quarantined, "no active device is compatible with 'metrica-rpi4'"),
        (
            none_with_the_role,
            "none of the 2 active devices compatible with 'metrica-rpi4' matches the device ids "
            "and selector",
        ),
        (all_offline, "all 3 matching devices are offline: not seen for more than 86400 s"),
    ],
)
def test_a_rollout_that_would_assign_no_device_is_refused_unless_allowed(
    harness: Harness, fleet_of: Any, enrolled: Enrolled,
    fleet: Callable[[Harness, Enrolled], None], why: str,
) -> None:  # fmt: skip
    fleet_of(0)
    fleet(harness, enrolled)
    body = {"version": "2.0.0", "selector": {"role": "sensor"}}
    if fleet is not none_with_the_role:
        del body["selector"]
    refused = harness.client.post("/api/v1/rollouts", json=body, headers=harness.operator)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"] == "invalid_rollout"
    assert refused.json()["detail"] == f"{NOTHING}{why}{ANYWAY}"
    assert status(harness)["rollouts"] == []
    assert not [e for e in actions(harness) if e["action"].startswith("rollout.")]
    allowed = start(harness, **body, allow_empty=True)
    assert (allowed["state"], allowed["devices"]) == ("running", [])
    assert sum(s["expected"] for s in allowed["stage_progress"]) == 0


def test_an_empty_rollout_waits_for_devices_instead_of_completing(
    harness: Harness, fleet_of: Any, enrolled: Enrolled
) -> None:
    """allow_empty is for devices that will enroll or come back: soaking its empty stages to
    "completed" would leave them without the release."""
    fleet_of(0)
    rollout = start(harness, version="2.0.0", stages=[5, 25, 100], soak_s=60, allow_empty=True)
    for _ in range(6):  # six soaks and more: it still waits, at its first stage
        harness.clock.advance(120)
        answer = status(harness)["rollouts"][0]
        assert (answer["state"], answer["stage"]) == ("running", 0)
    late = enrolled(hostname="late")  # online and selected: the plan goes on, to its stage
    for _ in range(4):
        answer = status(harness)["rollouts"][0]
        if answer["devices"]:
            break
        harness.clock.advance(120)
    assert rollout["id"] == answer["id"] and answer["state"] == "running"
    assert [d["id"] for d in answer["devices"]] == [late.id]


def test_one_online_device_is_enough(harness: Harness, fleet_of: Any) -> None:
    fleet = fleet_of(3)
    harness.clock.advance(86400)
    fleet.devices[0].login()
    harness.clock.advance(1)  # the other two: a day and a second
    rollout = start(harness, version="2.0.0", stages=[100])
    assert [d["id"] for d in rollout["devices"]] == [fleet.devices[0].id]
    assert len(rollout["skipped_offline"]) == 2


def test_rollout_start_allow_empty_on_the_cli(
    live_server: LiveServer, enrolled: Enrolled, make_bundle: MakeBundle
) -> None:
    harness = live_server.harness
    assert harness.upload(make_bundle(version="2.0.0")).status_code == 201
    enrolled(hostname="cam-0")
    harness.clock.advance(7201)
    refused = run(live_server, "rollout", "start", "2.0.0", "--offline-after", "2h")
    assert refused.exit_code == 1, refused.output
    assert "all 1 matching devices are offline: not seen for more than 7200 s" in refused.output
    assert "Traceback" not in refused.output
    assert json.loads(run(live_server, "rollout", "status", "--json").stdout)["rollouts"] == []
    allowed = run(live_server, "rollout", "start", "2.0.0", "--offline-after", "2h",
                  "--allow-empty", "--json")  # fmt: skip
    assert allowed.exit_code == 0, allowed.output
    answer = json.loads(allowed.stdout)
    assert (answer["state"], answer["devices"], answer["offline_after_s"]) == ("running", [], 7200)


# --- a halted rollout's counts are frozen -------------------------------------------------------


def test_a_halted_rollouts_counts_are_what_it_assigned(
    harness: Harness, fleet_of: Any, enrolled: Enrolled
) -> None:
    fleet = fleet_of(8)
    fleet.tick(0)
    canary = fleet.devices[0].id
    fleet.bad = {canary}
    rollout = start(harness, version="2.0.0", canary=[canary], stages=[50, 100], soak_s=600)
    assert sum(s["expected"] for s in rollout["stage_progress"]) == 8  # running: every device
    for _ in range(5):
        halted = fleet.tick()["rollouts"][0]
        if halted["state"] != "running":
            break
    assert halted["state"] == "halted", halted
    frozen = {key: halted[key] for key in ("stage_progress", "counts", "skipped_offline")}
    assert [(s["name"], s["expected"], s["assigned"]) for s in frozen["stage_progress"]] == [
        ("canary", 1, 1),
        ("50%", 0, 0),
        ("100%", 0, 0),
    ]
    assert frozen["skipped_offline"] == []
    late = enrolled(hostname="late-0")  # enrolls while halted
    assert late.heartbeat().status_code == 204
    after = status(harness)["rollouts"][0]
    assert {key: after[key] for key in frozen} == frozen
    harness.clock.advance(2 * 86400)  # and every device goes offline
    after = status(harness)["rollouts"][0]
    assert {key: after[key] for key in frozen} == frozen
    assert after["state"] == "halted"


def test_a_paused_rollout_still_expects_the_devices_that_enroll(
    harness: Harness, fleet_of: Any, enrolled: Enrolled
) -> None:
    fleet_of(2)
    rollout = start(harness, version="2.0.0", stages=[50, 100], soak_s=600)
    path = f"/api/v1/rollouts/{rollout['id']}/pause"
    assert harness.client.post(path, headers=harness.operator).status_code == 200
    enrolled(hostname="late-0")
    paused = status(harness)["rollouts"][0]
    assert paused["state"] == "paused"
    assert sum(s["expected"] for s in paused["stage_progress"]) == 3


def test_summaries_are_the_listed_fields_of_the_views(harness: Harness, fleet_of: Any) -> None:
    fleet = fleet_of(10)
    fleet.tick(0)
    canaries = [d.id for d in fleet.devices[:2]]
    fleet.bad = set(canaries[:1])
    halted = start(harness, version="2.0.0", canary=canaries, soak_s=600)
    for _ in range(5):
        if fleet.tick()["rollouts"][0]["state"] == "halted":
            break
    aborted = harness.client.post(
        f"/api/v1/rollouts/{halted['id']}/abort", headers=harness.operator
    )
    assert aborted.status_code == 200, aborted.text
    fleet.bad = set()
    start(harness, version="2.0.0", canary=canaries, soak_s=600)
    views = status(harness)["rollouts"]
    assert [v["state"] for v in views] == ["running", "aborted"]
    assert views[1]["counts"]["failed"] == 1 and views[0]["counts"]["pending"] == 2
    ids = [v["id"] for v in views]
    listed = rollouts.summaries(harness.db, [*reversed(ids), 999])
    assert listed == [{name: v[name] for name in rollouts.SUMMARY_FIELDS} for v in views]
