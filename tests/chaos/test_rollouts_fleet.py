"""Staged rollouts across a virtual fleet following a real server process whose clock runs
ten times faster (soaks in seconds): a good release reaches 100 %, a bad one halts at the
canaries and sends them back, no install starts after an emergency stop."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chaos.fleet import MemberSpec, VirtualFleet
from tests.chaos.conftest import Releases
from tests.chaos.servers import Fleet, run

DEVICES = 20


@pytest.fixture
def lab(tmp_path: Path, releases: Releases) -> Iterator[tuple[Fleet, VirtualFleet]]:
    servers = Fleet(
        tmp_path, None, releases, server_args=("--time-scale", "10", "--rollout-interval", "0.2")
    )
    try:
        token = run("server", "enrollment-token", "create", "--uses", "100", *servers.db_args)
        fleet = VirtualFleet(
            tmp_path / "fleet", [MemberSpec(role="camera") for _ in range(DEVICES)],
            server_urls=servers.urls[:1], server_key=servers.data / "server-key.pub",
            release_key=releases.directory / "release-key.pub",
            enrollment_token=token.splitlines()[0],
        )  # fmt: skip
        known = lambda: len(json.loads(servers.fleet("device", "list", "--json")))  # noqa: E731
        fleet.run_until(lambda: known() == DEVICES, limit_s=600, step_s=15)
        yield servers, fleet
    finally:
        for process in servers.processes:
            process.stop()


def rollouts(servers: Fleet) -> list[dict[str, Any]]:
    answer: dict[str, Any] = json.loads(servers.fleet("rollout", "status", "--json"))
    return list(answer["rollouts"])


def installs_of(fleet: VirtualFleet, version: str) -> list[str]:
    """Device ids whose updater started installing ``version``."""
    started = []
    for member in fleet.members:
        for event in member.device.events("install.verified"):
            if event.get("version") == version:
                started.append(member.device_id)
    return started


def test_good_release_to_100_percent_then_bad_release_halts_at_the_canaries(
    lab: tuple[Fleet, VirtualFleet], releases: Releases
) -> None:
    servers, fleet = lab
    canaries = [m.device_id for m in fleet.members[:2]]
    canary_args = [arg for device in canaries for arg in ("--canary", device)]
    servers.fleet("release", "upload", str(releases.bundle("2.0.0")))
    servers.fleet("rollout", "start", "2.0.0", *canary_args, "--soak", "30s")
    fleet.run_until(lambda: fleet.versions()["2.0.0"] == DEVICES, limit_s=3600, step_s=15)
    fleet.run_until(lambda: rollouts(servers)[0]["state"] == "completed", limit_s=600, step_s=15)

    servers.fleet("release", "upload", str(releases.bundle("3.0.0", "unhealthy")))
    servers.fleet("rollout", "start", "3.0.0", *canary_args, "--soak", "30s")
    fleet.run_until(lambda: rollouts(servers)[0]["state"] == "halted", limit_s=1800, step_s=15)
    # nobody but the canaries ever started on the bad release
    assert set(installs_of(fleet, "3.0.0")) <= set(canaries)
    # and the canaries are back on the good release within 5 simulated minutes
    took = fleet.run_until(
        lambda: all(m.version == "2.0.0" for m in fleet.members[:2]), limit_s=300, step_s=15
    )
    assert took <= 300
    assert fleet.versions()["2.0.0"] == DEVICES


def test_no_install_starts_after_an_emergency_stop(
    lab: tuple[Fleet, VirtualFleet], releases: Releases
) -> None:
    servers, fleet = lab
    servers.fleet("release", "upload", str(releases.bundle("2.0.0")))
    canaries = [arg for m in fleet.members[:2] for arg in ("--canary", m.device_id)]
    servers.fleet("rollout", "start", "2.0.0", *canaries, "--soak", "30s")
    fleet.run_until(lambda: len(installs_of(fleet, "2.0.0")) >= 3, limit_s=3600, step_s=15)
    servers.fleet("emergency-stop")
    before = len(installs_of(fleet, "2.0.0"))
    for _ in range(20):
        fleet.step(15)
    assert len(installs_of(fleet, "2.0.0")) == before
    assert rollouts(servers)[0]["state"] == "paused"
