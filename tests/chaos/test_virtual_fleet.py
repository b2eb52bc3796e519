"""A virtual fleet following a real server process: roles, fault profiles, outages, wrong
clocks, on simulated time."""

from __future__ import annotations

import json
from pathlib import Path

from chaos.fleet import MemberSpec, VirtualFleet
from chaos.virtual_device import FaultProfile
from tests.chaos.conftest import Releases
from tests.chaos.servers import Fleet, device_row, run

YEARS = 5 * 365 * 24 * 3600.0


def test_a_release_reaches_a_fleet_with_faults(
    fleet_servers: Fleet, releases: Releases, tmp_path: Path
) -> None:
    servers = fleet_servers
    token = run("server", "enrollment-token", "create", "--uses", "20", *servers.db_args)
    specs = [MemberSpec(role=("camera", "sensor", "gateway")[i % 3]) for i in range(9)]
    specs.append(MemberSpec(role="camera", profile=FaultProfile(hang_on=frozenset({"2.0.0"}))))
    specs.append(MemberSpec(role="sensor", offline=((0.0, 600.0),)))
    specs.append(MemberSpec(role="gateway", clock_offset_s=-YEARS))
    fleet = VirtualFleet(
        tmp_path / "fleet", specs, server_urls=servers.urls,
        server_key=servers.data / "server-key.pub",
        release_key=releases.directory / "release-key.pub",
        enrollment_token=token.splitlines()[0],
    )  # fmt: skip
    offline, skewed = fleet.members[-2], fleet.members[-1]

    fleet.run_until(lambda: _known(servers, fleet) == len(fleet.members) - 1, limit_s=300)
    servers.fleet("release", "upload", str(releases.bundle("2.0.0")))
    for member in fleet.members:
        if member is not offline:
            servers.fleet("device", "assign", member.device_id, "2.0.0")
    hanging = fleet.members[9]
    # the hanging member's check-in may fall due a step after the others' (jitter): wait for it
    tried = lambda: hanging.device.state().slot("b").status != "empty"  # noqa: E731
    fleet.run_until(lambda: fleet.versions()["2.0.0"] == 10 and tried(), limit_s=600)
    assert hanging.version == "1.0.0" and hanging.device.state().slot("b").status == "bad"
    # the device that was offline comes back, enrolls, and follows
    fleet.run_until(lambda: _known(servers, fleet) == len(fleet.members), limit_s=900)
    servers.fleet("device", "assign", offline.device_id, "2.0.0")
    fleet.run_until(lambda: offline.version == "2.0.0", limit_s=600)
    # a clock five years behind is reported, and changes nothing else
    assert skewed.version == "2.0.0"
    skew = device_row(servers, skewed.device_id).get("clock_skew_s")
    assert skew is not None and skew > YEARS - 3600
    assert all(m.daemon.last_error is None for m in fleet.members)


def _known(servers: Fleet, fleet: VirtualFleet) -> int:
    """How many members the server knows."""
    rows = json.loads(servers.fleet("device", "list", "--json"))
    ids = {row["id"] for row in rows}
    return sum(1 for m in fleet.members if m.device_id in ids)


def test_fleet_simulate_command(fleet_servers: Fleet, releases: Releases, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from chaos.cli import simulate

    servers = fleet_servers
    token = run("server", "enrollment-token", "create", "--uses", "5", *servers.db_args)
    faults = tmp_path / "faults.toml"
    faults.write_text('[[devices]]\ncount = 1\nrole = "gateway"\nhang_on = ["2.0.0"]\n')
    result = CliRunner().invoke(simulate, [
        "--devices", "3", "--server", servers.urls[0],
        "--server-key", str(servers.data / "server-key.pub"),
        "--release-key", str(releases.directory / "release-key.pub"),
        "--enrollment-token", token.splitlines()[0], "--workdir", str(tmp_path / "fleet"),
        "--faults", str(faults), "--duration", "120", "--speed", "1000000",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 virtual devices" in result.output and "1.0.0: 3" in result.output
    assert _known_count(servers) == 3


def _known_count(servers: Fleet) -> int:
    return len(json.loads(servers.fleet("device", "list", "--json")))


def test_faults_file_errors_are_clear(tmp_path: Path) -> None:
    import pytest

    from chaos.cli import FaultsFileError, read_specs

    faults = tmp_path / "faults.toml"
    for text, message in [
        ('[[devices]]\ncount = 5\nrole = "camera"\n', "more than 3"),
        ('[[devices]]\nrole = "toaster"\n', "role one of"),
        ('[[devices]]\ncolour = "red"\n', "expected a table"),
        ("[[devices]\n", "faults.toml"),
    ]:
        faults.write_text(text)
        with pytest.raises(FaultsFileError, match=message):
            read_specs(3, faults)
    faults.write_text('[[devices]]\ncount = 2\nrole = "sensor"\nunhealthy_on = ["3.0.0"]\n')
    specs = read_specs(4, faults)
    assert [s.role for s in specs] == ["sensor", "sensor", "camera", "sensor"]
    assert specs[0].profile.unhealthy_on == {"3.0.0"}
