"""Devices over their lifetime: shown with their latest entries, renamed (hostnames stay unique),
removed (admitted again only with a token or a new pre-authorization), and referred to by id,
id prefix or hostname in every `fleet device` command."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from fleet_core.cli import fleet
from server import devices
from server.cli.devices import DeviceReferenceError, resolve_device
from server.enrollment import NAMESAKES_NAMED
from server.models import AuditRow, DeviceSession, PreauthorizedKey
from tests.conftest import assert_one_line_error
from tests.server.conftest import FakeDevice, Harness, LiveServer, at_once

Enrolled = Callable[..., FakeDevice]
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def audit_actions(harness: Harness, subject: str) -> list[tuple[str, dict[str, Any]]]:
    with harness.db.read() as session:
        rows = session.scalars(select(AuditRow).where(AuditRow.subject == subject)).all()
        return [(row.action, json.loads(row.details)) for row in rows]


def rename(harness: Harness, device_id: str, hostname: Any, role: str = "operator") -> Any:
    return harness.client.post(
        f"/api/v1/devices/{device_id}/rename", json={"hostname": hostname},
        headers=harness.headers[role],
    )  # fmt: skip


# --- rename -----------------------------------------------------------------------------------


def test_a_rename_is_audited_and_hostnames_stay_unique(
    harness: Harness, enrolled: Enrolled
) -> None:
    cam, other = enrolled(hostname="cam-1"), enrolled(hostname="cam-2")
    answer = rename(harness, cam.id, "gate-east")
    assert answer.status_code == 200, answer.text
    assert answer.json()["hostname"] == "gate-east"
    taken = rename(harness, other.id, "gate-east")
    assert taken.status_code == 409 and taken.json()["error"] == "hostname_taken"
    assert cam.id in taken.json()["detail"]
    assert rename(harness, cam.id, "gate-east").status_code == 200  # its own name: nothing
    assert audit_actions(harness, cam.id)[-1] == (
        "device.renamed", {"from": "cam-1", "to": "gate-east"},
    )  # fmt: skip
    assert [a for a, _ in audit_actions(harness, cam.id)].count("device.renamed") == 1
    # re-enrolling with its key changes nothing: the operator's name stays
    assert cam.enroll(harness.enrollment_token()).status_code == 200
    one = harness.client.get(f"/api/v1/devices/{cam.id}", headers=harness.viewer).json()
    assert one["hostname"] == "gate-east"


@pytest.mark.parametrize("hostname", ["", "-x", "a b", "cam\u202e", "x" * 254, 7, None])
def test_a_hostname_that_is_not_one_is_refused_by_name(
    harness: Harness, enrolled: Enrolled, hostname: Any
) -> None:
    cam = enrolled(hostname="cam-1")
    answer = rename(harness, cam.id, hostname)
    assert answer.status_code == 422 and "hostname" in answer.text
    assert audit_actions(harness, cam.id)[-1][0] == "device.enrolled"


def test_renaming_and_removing_are_for_operators(harness: Harness, enrolled: Enrolled) -> None:
    cam = enrolled(hostname="cam-1")
    assert rename(harness, cam.id, "x", role="viewer").status_code == 403
    gone = harness.client.delete(f"/api/v1/devices/{cam.id}", headers=harness.viewer)
    assert gone.status_code == 403
    assert harness.client.delete(f"/api/v1/devices/{cam.id}").status_code == 401
    assert rename(harness, "0" * 64, "x").status_code == 404


# --- remove -----------------------------------------------------------------------------------


def test_a_removed_device_is_gone_until_admitted_again(
    harness: Harness, enrolled: Enrolled
) -> None:
    cam = enrolled(hostname="cam-1")
    assert cam.events(("install.started", 1)).status_code == 204
    harness.client.post(
        "/api/v1/preauthorized-keys", json={"public_key": cam.public_hex},
        headers=harness.operator,
    )  # fmt: skip
    removed = harness.client.delete(f"/api/v1/devices/{cam.id}", headers=harness.operator)
    assert removed.status_code == 200, removed.text
    assert removed.json()["hostname"] == "cam-1"
    assert (
        harness.client.get(f"/api/v1/devices/{cam.id}", headers=harness.viewer).status_code == 404
    )
    assert cam.heartbeat().status_code == 401  # its session went with it
    with harness.db.read() as session:
        assert (
            session.scalars(select(DeviceSession).where(DeviceSession.device_id == cam.id)).first()
            is None
        )
        assert session.get(PreauthorizedKey, cam.id) is None
    action, details = audit_actions(harness, cam.id)[-1]
    assert action == "device.removed"
    assert details["hostname"] == "cam-1" and details["preauthorization_removed"] is True
    # its events stay in the trail; it comes back only with a token
    assert cam.enroll().status_code == 403
    assert cam.enroll(harness.enrollment_token()).status_code == 200
    again = harness.client.delete(f"/api/v1/devices/{'0' * 64}", headers=harness.operator)
    assert again.status_code == 404


def test_a_decommissioned_device_cannot_be_removed(harness: Harness, enrolled: Enrolled) -> None:
    """Its record is what refuses its key: removed, it would enroll again with a token it holds."""
    token = harness.enrollment_token(uses=5)
    stolen = FakeDevice(harness.client, hostname="cam-7")
    assert stolen.enroll(token).status_code == 200
    decommissioned = harness.client.post(
        f"/api/v1/devices/{stolen.id}/decommission", json={"reason": "stolen"},
        headers=harness.operator,
    )  # fmt: skip
    assert decommissioned.status_code == 200
    refused = harness.client.delete(f"/api/v1/devices/{stolen.id}", headers=harness.operator)
    assert refused.status_code == 409 and refused.json()["error"] == "device_status_conflict"
    assert "would let its key enroll again" in refused.json()["detail"]
    again = stolen.enroll(token)
    assert again.status_code == 403 and again.json()["error"] == "device_decommissioned"


def test_a_device_removed_during_a_rollout_leaves_the_rollout_readable(
    harness: Harness, enrolled: Enrolled, make_bundle: Callable[..., Path]
) -> None:
    assert harness.upload(make_bundle(version="2.0.0")).status_code == 201
    cams = [enrolled(hostname=f"cam-{i}") for i in range(3)]
    started = harness.client.post(
        "/api/v1/rollouts", json={"version": "2.0.0", "stages": [100]}, headers=harness.operator
    )
    assert started.status_code == 201, started.text
    assert (
        harness.client.delete(f"/api/v1/devices/{cams[0].id}", headers=harness.operator).status_code
        == 200
    )
    view = harness.client.get(f"/api/v1/rollouts/{started.json()['id']}", headers=harness.viewer)
    assert view.status_code == 200
    assert {d["id"] for d in view.json()["devices"]} == {cams[1].id, cams[2].id}


# --- recent entries ---------------------------------------------------------------------------


def test_a_device_s_recent_entries_newest_last_within_a_bounded_window(
    harness: Harness, enrolled: Enrolled, monkeypatch: pytest.MonkeyPatch
) -> None:
    cam, other = enrolled(hostname="cam-1"), enrolled(hostname="cam-2")
    assert cam.events(*[("install.progress", n) for n in range(1, 6)]).status_code == 204
    assert other.events(("install.started", 1)).status_code == 204
    assert rename(harness, cam.id, "gate").status_code == 200

    def recent(limit: int) -> list[dict[str, Any]]:
        answer = harness.client.get(
            f"/api/v1/devices/{cam.id}/events", params={"limit": limit}, headers=harness.viewer
        )
        assert answer.status_code == 200, answer.text
        return list(answer.json()["entries"])

    latest = recent(3)
    assert [e["action"] for e in latest] == [
        "install.progress",
        "install.progress",
        "device.renamed",
    ]
    assert [e["seq"] for e in latest] == sorted(e["seq"] for e in latest)
    assert all(e["actor"] == f"device:{cam.id}" or e["subject"] == cam.id for e in recent(100))
    assert len(recent(100)) == 1 + 5 + 1  # enrolled, five events, renamed
    monkeypatch.setattr(devices, "RECENT_AUDIT_WINDOW", 2)  # only the trail's last two entries
    assert [e["action"] for e in recent(100)] == ["device.renamed"]
    unknown = harness.client.get(f"/api/v1/devices/{'0' * 64}/events", headers=harness.viewer)
    assert unknown.status_code == 404


def test_an_enrollment_under_a_hostname_in_use_is_noted(
    harness: Harness, enrolled: Enrolled
) -> None:
    first = enrolled(hostname="cam")
    second = enrolled(hostname="cam")
    (_, details), *_ = [e for e in audit_actions(harness, second.id) if e[0] == "device.enrolled"]
    assert (details["hostname_also_used_by"], details["hostname_shared_with"]) == ([first.id], 1)
    (_, alone), *_ = [e for e in audit_actions(harness, first.id) if e[0] == "device.enrolled"]
    assert "hostname_also_used_by" not in alone
    # a fleet built from one image all answers "raspberrypi": a few named, all counted
    crowd = [enrolled(hostname="raspberrypi") for _ in range(NAMESAKES_NAMED + 3)]
    (_, last), *_ = [e for e in audit_actions(harness, crowd[-1].id) if e[0] == "device.enrolled"]
    assert last["hostname_shared_with"] == NAMESAKES_NAMED + 2
    assert last["hostname_also_used_by"] == sorted(d.id for d in crowd[:-1])[:NAMESAKES_NAMED]


# --- references -------------------------------------------------------------------------------

FLEET = [
    {"id": "ab12" + "0" * 60, "hostname": "cam-1"},
    {"id": "ab13" + "0" * 60, "hostname": "cam-2"},
    {"id": "cd00" + "0" * 60, "hostname": "cam-2"},
    {"id": "ef00" + "0" * 60, "hostname": "ab12"},  # a hostname that looks like a prefix
]


@pytest.mark.parametrize(
    ("reference", "device_id"),
    [
        ("cam-1", FLEET[0]["id"]),
        ("ab13", FLEET[1]["id"]),
        ("AB13", FLEET[1]["id"]),
        ("cd00", FLEET[2]["id"]),
        (FLEET[3]["id"].upper(), FLEET[3]["id"]),
        (" cam-1 ", FLEET[0]["id"]),
    ],
)
def test_a_device_is_found_by_id_prefix_or_hostname(reference: str, device_id: str) -> None:
    assert resolve_device(FLEET, reference) == device_id


@pytest.mark.parametrize(
    ("reference", "problem"),
    [
        ("cam-2", "'cam-2' names 2 devices: ab1300000000 (cam-2), cd0000000000 (cam-2)"),
        ("ab1", "no device is 'ab1'"),  # too short to be a prefix
        ("ab", "no device is 'ab'"),
        ("ab12", "'ab12' names 2 devices: ef0000000000 (ab12), ab1200000000 (cam-1)"),
        ("cam-9", "no device is 'cam-9'"),
        ("", "no device is ''"),
    ],
)
def test_a_reference_to_none_or_several_is_refused_naming_them(
    reference: str, problem: str
) -> None:
    with pytest.raises(DeviceReferenceError) as caught:
        resolve_device(FLEET, reference)
    assert str(caught.value).startswith(problem)


@settings(max_examples=200)
@given(st.text(max_size=70))
def test_any_reference_resolves_to_one_device_or_is_refused(reference: str) -> None:
    try:
        found = resolve_device(FLEET, reference)
    except DeviceReferenceError as err:
        assert "device" in str(err)
        return
    assert found in {d["id"] for d in FLEET}


def run(live: LiveServer, *args: str, role: str = "operator", stdin: str | None = None) -> Result:
    token = live.harness.headers[role]["Authorization"].split()[1]
    return CliRunner().invoke(fleet, [*args, "--server", live.url, "--token", token], input=stdin)


def test_device_commands_take_hostnames_and_prefixes(
    live_server: LiveServer, enrolled: Enrolled, make_bundle: Callable[..., Path]
) -> None:
    harness = live_server.harness
    assert harness.upload(make_bundle(version="2.0.0")).status_code == 201
    cam = enrolled(hostname="cam-1")
    twins = [enrolled(hostname="twin"), enrolled(hostname="twin")]
    assert cam.heartbeat(role="camera", tags=["north"]).status_code == 204
    assert cam.events(("install.started", 1)).status_code == 204

    shown = run(live_server, "device", "show", "cam-1", role="viewer")
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[0] == f"device {cam.id}"
    assert "  role, tags:  camera; north" in lines
    assert any(line.startswith("  slot a:      good 1.0.0") for line in lines)
    assert "install.started" in shown.stdout
    as_json = json.loads(run(live_server, "device", "show", cam.id[:6], "--json").stdout)
    assert as_json["id"] == cam.id and as_json["recent_entries"][-1]["action"] == "install.started"

    assigned = run(live_server, "device", "assign", "cam-1", "2.0.0")
    assert assigned.exit_code == 0 and assigned.stdout == f"device {cam.id}: assigned 2.0.0\n"
    started = run(live_server, "rollout", "start", "2.0.0", "--canary", "cam-1",
                  "--device", "cam-1", "--device", twins[0].id[:6], "--json")  # fmt: skip
    assert started.exit_code == 0, started.output
    assert [(d["id"], d["stage"]) for d in json.loads(started.stdout)["devices"]] == [
        (cam.id, "canary")
    ]
    ambiguous_canary = run(live_server, "rollout", "start", "2.0.0", "--canary", "twin")
    assert_one_line_error(ambiguous_canary, "'twin' names 2 devices")
    assert run(live_server, "rollout", "abort", "1").exit_code == 0
    quarantined = run(live_server, "device", "quarantine", cam.id[:8], "--reason", "x", "--json")
    assert json.loads(quarantined.stdout)["status"] == "quarantined"
    ambiguous = run(live_server, "device", "quarantine", "twin", "--reason", "x")
    assert_one_line_error(ambiguous, "'twin' names 2 devices")
    listed = run(live_server, "device", "list", role="viewer")
    assert "warning: 2 devices are 'twin'" in listed.stderr

    renamed = run(live_server, "device", "rename", twins[0].id, "twin-east")
    assert renamed.exit_code == 0 and renamed.stdout == f"device {twins[0].id}: twin-east\n"
    taken = run(live_server, "device", "rename", "twin", "cam-1")  # one twin left: unambiguous
    assert_one_line_error(taken, "409 hostname_taken")

    kept = run(live_server, "device", "remove", "twin-east", stdin="n\n")
    assert kept.exit_code == 1 and "Aborted" in kept.output
    assert f"remove device {twins[0].id} (twin-east)?" in kept.output
    removed = run(live_server, "device", "remove", "twin-east", "--yes")
    assert removed.exit_code == 0, removed.output
    assert removed.stdout == f"device {twins[0].id} (twin-east) removed\n"
    assert_one_line_error(run(live_server, "device", "show", "twin-east"), "no device is")


def test_two_renames_to_one_name_at_once_give_it_to_one_device(
    harness: Harness, enrolled: Enrolled
) -> None:
    from server.database import Database
    from server.errors import HostnameTakenError

    cams = [enrolled(hostname=f"cam-{i}") for i in range(2)]
    outcomes: list[str] = []

    def work(db: Database, device_id: str) -> None:
        try:
            devices.rename(db, device_id, "same", actor="operator:test", now=NOW)
            outcomes.append("renamed")
        except HostnameTakenError:
            outcomes.append("taken")

    at_once(harness, work, [c.id for c in cams])
    assert sorted(outcomes) == ["renamed", "taken"]
    listed = harness.client.get("/api/v1/devices", headers=harness.viewer).json()["devices"]
    assert [d["hostname"] for d in listed].count("same") == 1
