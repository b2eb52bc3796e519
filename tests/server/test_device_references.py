"""A reference never takes one device for another: no hostname may have a device id's shape,
hostnames are compared case-insensitively (DNS names), and a reference that is one device's
hostname and another's id or id prefix is refused naming both."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import update

from fleet_core.cli import fleet
from server.cli.devices import DeviceReferenceError, resolve_device
from server.models import Device
from tests.conftest import assert_one_line_error
from tests.server.conftest import FakeDevice, Harness, LiveServer

Enrolled = Callable[..., FakeDevice]


def rename(harness: Harness, device_id: str, hostname: str) -> Any:
    return harness.client.post(
        f"/api/v1/devices/{device_id}/rename", json={"hostname": hostname},
        headers=harness.operator,
    )  # fmt: skip


def run(live: LiveServer, *args: str) -> Result:
    token = live.harness.headers["operator"]["Authorization"].split()[1]
    return CliRunner().invoke(fleet, [*args, "--server", live.url, "--token", token])


def listing(harness: Harness) -> list[dict[str, Any]]:
    answer = harness.client.get("/api/v1/devices", headers=harness.viewer)
    devices: list[dict[str, Any]] = answer.json()["devices"]
    return devices


def store_hostname(harness: Harness, device_id: str, hostname: str) -> None:
    """A row as an older server stored it, before hostnames were refused a device id's shape."""
    with harness.db.write() as session:
        session.execute(update(Device).where(Device.id == device_id).values(hostname=hostname))


# --- the API: enrollment and rename -----------------------------------------------------------


def test_a_device_cannot_enroll_or_be_renamed_with_a_device_ids_shape(
    harness: Harness, enrolled: Enrolled
) -> None:
    victim = enrolled(hostname="sensor-0001")
    for hostname in (victim.id, victim.id.upper(), "0" * 64):
        hostile = FakeDevice(harness.client, hostname=hostname)
        refused = hostile.enroll(harness.enrollment_token())
        assert refused.status_code == 422, refused.text
        assert refused.json()["detail"].startswith("hostname: "), refused.text
        assert "device id" in refused.json()["detail"]
        assert rename(harness, victim.id, hostname).status_code == 422
    assert [d["id"] for d in listing(harness)] == [victim.id]
    # shorter hex hostnames (a board's serial number) still enroll: resolution handles them
    serial = enrolled(hostname="00000000a1b2c3d4")
    assert rename(harness, serial.id, "d007").status_code == 200


def test_hostnames_are_unique_whatever_their_case(harness: Harness, enrolled: Enrolled) -> None:
    cam, other = enrolled(hostname="camera-0000"), enrolled(hostname="gate")
    taken = rename(harness, other.id, "CAMERA-0000")
    assert taken.status_code == 409 and taken.json()["error"] == "hostname_taken"
    assert cam.id in taken.json()["detail"]
    assert rename(harness, cam.id, "Camera-0000").status_code == 200  # its own name, recased
    # a namesake at enrollment (only warned about, as before) is found whatever its case
    twin = enrolled(hostname="CAMERA-0000")
    entries = harness.client.get(f"/api/v1/devices/{twin.id}/events", headers=harness.viewer)
    (enrolled_entry,) = [e for e in entries.json()["entries"] if e["action"] == "device.enrolled"]
    assert enrolled_entry["details"]["hostname_also_used_by"] == [cam.id]


# --- resolution -------------------------------------------------------------------------------

FLEET = [
    {"id": "d0076628" + "0" * 56, "hostname": "camera-0000"},
    {"id": "dee77c18" + "0" * 56, "hostname": "d007"},
    {"id": "0ce52b1c" + "1" * 56, "hostname": "sensor-0001"},
    {"id": "271e7dc0" + "2" * 56, "hostname": "0ce52b1c" + "1" * 56},  # stored before the rule
]


@pytest.mark.parametrize(
    ("reference", "names"),
    [
        ("d007", ("dee77c180000 (d007)", "d00766280000 (camera-0000)")),
        ("D007", ("dee77c180000 (d007)", "d00766280000 (camera-0000)")),
        (FLEET[2]["id"], ("271e7dc02222", "0ce52b1c1111 (sensor-0001)")),
        (FLEET[2]["id"].upper(), ("271e7dc02222", "0ce52b1c1111 (sensor-0001)")),
        ("0ce52b1c", ("0ce52b1c1111 (sensor-0001)",)),  # a prefix of both: the id's only
    ],
)
def test_a_reference_that_is_a_hostname_and_an_id_is_refused_naming_both(
    reference: str, names: tuple[str, ...]
) -> None:
    if len(names) == 1:
        assert resolve_device(FLEET, reference) == FLEET[2]["id"]
        return
    with pytest.raises(DeviceReferenceError) as caught:
        resolve_device(FLEET, reference)
    assert f"names {len(names)} devices" in str(caught.value)
    for name in names:
        assert name in str(caught.value)


@pytest.mark.parametrize("reference", ["CAMERA-0000", "Camera-0000", "camera-0000"])
def test_a_hostname_is_found_whatever_its_case(reference: str) -> None:
    assert resolve_device(FLEET, reference) == FLEET[0]["id"]


def test_the_commands_never_act_on_a_device_whose_id_another_takes_as_hostname(
    live_server: LiveServer, enrolled: Enrolled
) -> None:
    harness = live_server.harness
    victim, hostile = enrolled(hostname="sensor-0001"), enrolled(hostname="x")
    store_hostname(harness, hostile.id, victim.id)
    quarantined = run(live_server, "device", "quarantine", victim.id, "--reason", "hostile")
    assert_one_line_error(quarantined, f"{victim.id!r} names 2 devices")
    assert f"{hostile.id[:12]} ({victim.id})" in quarantined.stderr
    assert f"{victim.id[:12]} (sensor-0001)" in quarantined.stderr
    assert {d["status"] for d in listing(harness)} == {"active"}
    # its own id, unambiguous, still reaches the hostile one
    assert run(live_server, "device", "quarantine", hostile.id, "--reason", "x").exit_code == 0
    statuses = {d["id"]: d["status"] for d in listing(harness)}
    assert statuses == {victim.id: "active", hostile.id: "quarantined"}


def test_the_commands_find_hostnames_whatever_their_case_and_warn_of_recased_twins(
    live_server: LiveServer, enrolled: Enrolled
) -> None:
    cam = enrolled(hostname="camera-0000")
    shown = run(live_server, "device", "show", "CAMERA-0000", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["id"] == cam.id
    enrolled(hostname="CAMERA-0000")
    listed = run(live_server, "device", "list")
    assert listed.exit_code == 0, listed.output
    assert "warning: 2 devices are 'CAMERA-0000' / 'camera-0000'" in listed.stderr
    assert_one_line_error(run(live_server, "device", "show", "camera-0000"), "names 2 devices")
