"""What a rollout refuses: devices it does not know or is told of twice, and a rollback where
it means nothing (server/rollouts.py: ``start``, ``transition``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server import rollouts
from server.errors import InvalidRolloutError
from tests.server.conftest import FakeDevice, Harness

MakeBundle = Callable[..., Path]
Enrolled = Callable[..., FakeDevice]
STRANGER = "e" * 64


@pytest.fixture
def devices(harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle) -> list[FakeDevice]:
    """Releases 1.0.0, 2.0.0 and 3.0.0, and three devices that run 1.0.0."""
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        response = harness.upload(make_bundle(f"{version}.bundle", version=version))
        assert response.status_code == 201, response.text
    made = [enrolled(hostname=f"cam-{i}") for i in range(3)]
    for device in made:
        assert device.heartbeat(version="1.0.0").status_code == 204
    return made


def post(harness: Harness, path: str, **body: Any) -> Any:
    return harness.client.post(f"/api/v1/rollouts{path}", json=body, headers=harness.operator)


def rollouts_started(harness: Harness) -> int:
    response = harness.client.get("/api/v1/rollouts", headers=harness.viewer)
    return len(response.json()["rollouts"])


def assert_refused(response: Any, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    for word in words:
        assert word in response.json()["detail"], (word, response.json())


@pytest.mark.parametrize("field", ["device_ids", "canary"])
def test_an_unknown_device_is_refused_by_name(
    harness: Harness, devices: list[FakeDevice], field: str
) -> None:
    named = [devices[0].id, STRANGER, devices[1].id]
    answer = post(harness, "", version="2.0.0", **{field: named})
    assert_refused(answer, 422, f"{field}: no device {STRANGER} is enrolled")
    assert answer.json()["error"] == "invalid_rollout"
    assert rollouts_started(harness) == 0


@pytest.mark.parametrize("field", ["device_ids", "canary"])
def test_a_device_named_twice_is_refused_by_name(
    harness: Harness, devices: list[FakeDevice], field: str
) -> None:
    named = [devices[0].id, devices[1].id, devices[0].id]
    answer = post(harness, "", version="2.0.0", **{field: named})
    assert_refused(answer, 422, field, devices[0].id, "twice")
    assert rollouts_started(harness) == 0


def test_named_enrolled_devices_start_a_rollout(
    harness: Harness, devices: list[FakeDevice]
) -> None:
    ids = [d.id for d in devices]
    answer = post(harness, "", version="2.0.0", device_ids=ids, canary=ids[:1])
    assert answer.status_code == 201, answer.text
    assert {d["id"] for d in answer.json()["devices"]} == set(ids[:1])


def test_the_check_looks_devices_up_in_batches(
    harness: Harness, devices: list[FakeDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rollouts, "ENROLLED_CHECK_BATCH", 1)
    ids = [d.id for d in devices]
    request = rollouts.RolloutRequest(version="3.0.0", device_ids=(*ids, STRANGER))
    with pytest.raises(InvalidRolloutError, match=f"device_ids: no device {STRANGER}"):
        rollouts.start(harness.db, request, actor="test", now=harness.app.state.fleet.now())
    # every device of every batch is found: three devices, looked up one at a time
    assert post(harness, "", version="2.0.0", device_ids=ids, stages=[100]).status_code == 201


def test_check_named_devices() -> None:
    rollouts.check_named_devices("canary", ())
    rollouts.check_named_devices("canary", ("a", "b", "c"))
    with pytest.raises(InvalidRolloutError, match="^canary: device b is named twice$"):
        rollouts.check_named_devices("canary", ("a", "b", "c", "b"))


# --- the rollback -------------------------------------------------------------------------------


def started(harness: Harness, version: str = "2.0.0", **body: Any) -> int:
    answer = post(harness, "", version=version, stages=[100], soak_s=0, **body)
    assert answer.status_code == 201, answer.text
    rollout_id: int = answer.json()["id"]
    return rollout_id


def completed(harness: Harness, devices: list[FakeDevice], version: str = "2.0.0") -> int:
    rollout_id = started(harness, version)
    slots = {"a": {"status": "good", "version": version}, "b": {"status": "good"}}
    for device in devices:
        assert device.heartbeat(version=version, slots=slots).status_code == 204
    harness.clock.advance(1)
    state = post(harness, "/evaluate").json()["rollouts"][0]["state"]
    assert state == "completed"
    return rollout_id


@pytest.mark.parametrize("first", ["abort", "rollback"])
def test_no_rollback_of_an_aborted_rollout(
    harness: Harness, devices: list[FakeDevice], first: str
) -> None:
    rollout_id = started(harness)
    assert post(harness, f"/{rollout_id}/{first}").status_code == 200
    answer = post(harness, f"/{rollout_id}/rollback")
    assert_refused(answer, 409, f"rollout {rollout_id} is aborted", "cannot rollback")
    assert answer.json()["error"] == "rollout_conflict"


@pytest.mark.parametrize("before", [None, "pause"])
def test_a_running_or_paused_rollout_rolls_back(
    harness: Harness, devices: list[FakeDevice], before: str | None
) -> None:
    rollout_id = started(harness)
    if before:
        assert post(harness, f"/{rollout_id}/{before}").status_code == 200
    answer = post(harness, f"/{rollout_id}/rollback")
    assert answer.status_code == 200, answer.text
    assert (answer.json()["state"], answer.json()["reason"]) == ("aborted", "rolled back")


def test_a_halted_rollout_rolls_back(harness: Harness, devices: list[FakeDevice]) -> None:
    rollout_id = started(harness, rollback_on_halt=False)
    assert devices[0].events(("install.failed", 1)).status_code == 204
    assert post(harness, "/evaluate").json()["rollouts"][0]["state"] == "halted"
    answer = post(harness, f"/{rollout_id}/rollback")
    assert answer.status_code == 200, answer.text


def test_the_latest_completed_rollout_rolls_back(
    harness: Harness, devices: list[FakeDevice]
) -> None:
    rollout_id = completed(harness, devices)
    answer = post(harness, f"/{rollout_id}/rollback")
    assert answer.status_code == 200, answer.text
    listed = harness.client.get("/api/v1/devices", headers=harness.viewer).json()["devices"]
    assert {d["assigned_version"] for d in listed} == {"1.0.0"}


def test_a_rollout_followed_by_another_does_not_roll_back(
    harness: Harness, devices: list[FakeDevice]
) -> None:
    first = completed(harness, devices, "2.0.0")
    second = completed(harness, devices, "3.0.0")
    answer = post(harness, f"/{first}/rollback")
    assert_refused(answer, 409, f"rollout {first} is completed", f"rollout {second} started after")
    listed = harness.client.get("/api/v1/devices", headers=harness.viewer).json()["devices"]
    assert {d["assigned_version"] for d in listed} == {"3.0.0"}
    assert post(harness, f"/{second}/rollback").status_code == 200
