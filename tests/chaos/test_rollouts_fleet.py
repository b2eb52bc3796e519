"""Staged rollouts across a virtual fleet following a real server process whose clock runs
ten times faster (soaks in seconds): a good release reaches 100 %, a bad one halts at the
canaries and sends them back, no install starts after an emergency stop, a rollback returns
every device within 5 simulated minutes by a slot flip, and the fleet-wide guard stops a
rollout whose own threshold was set too loose."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from chaos.fleet import MemberSpec, VirtualFleet
from tests.chaos.conftest import Releases
from tests.chaos.servers import Fleet, run

DEVICES = 20


@contextlib.contextmanager
def open_lab(tmp_path: Path, releases: Releases, size: int) -> Iterator[tuple[Fleet, VirtualFleet]]:
    """Two fast-clock server processes and ``size`` enrolled cameras following the first."""
    servers = Fleet(
        tmp_path, None, releases, server_args=("--time-scale", "10", "--rollout-interval", "0.2")
    )
    try:
        token = run("server", "enrollment-token", "create", "--uses", "100", *servers.db_args)
        fleet = VirtualFleet(
            tmp_path / "fleet", [MemberSpec(role="camera") for _ in range(size)],
            server_urls=servers.urls[:1], server_key=servers.data / "server-key.pub",
            release_key=releases.directory / "release-key.pub",
            enrollment_token=token.splitlines()[0],
        )  # fmt: skip
        known = lambda: len(json.loads(servers.fleet("device", "list", "--json")))  # noqa: E731
        fleet.run_until(lambda: known() == size, limit_s=600, step_s=15)
        yield servers, fleet
    finally:
        for process in servers.processes:
            process.stop()


@pytest.fixture
def lab(tmp_path: Path, releases: Releases) -> Iterator[tuple[Fleet, VirtualFleet]]:
    with open_lab(tmp_path, releases, DEVICES) as opened:
        yield opened


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


def test_a_rollback_returns_every_device_within_5_simulated_minutes(
    lab: tuple[Fleet, VirtualFleet], releases: Releases
) -> None:
    servers, fleet = lab
    for version in ("2.0.0", "2.1.0"):
        servers.fleet("release", "upload", str(releases.bundle(version)))
        servers.fleet("rollout", "start", version, "--stages", "100", "--soak", "30s")
        fleet.run_until(lambda: rollouts(servers)[0]["state"] == "completed", limit_s=3600)
    assert fleet.versions()["2.1.0"] == DEVICES
    latest = rollouts(servers)[0]["id"]
    servers.fleet("rollout", "rollback", str(latest), "--reason", "field reports")
    took = fleet.run_until(lambda: fleet.versions()["2.0.0"] == DEVICES, limit_s=300, step_s=5)
    assert took <= 300
    # 2.0.0 was intact in every device's other slot: a slot flip, no download
    assert sum(len(m.device.events("rollback.armed")) for m in fleet.members) == DEVICES
    assert len(installs_of(fleet, "2.0.0")) == DEVICES  # the first rollout's, none since


def test_the_fleet_guard_stops_a_rollout_whose_threshold_is_too_loose(
    lab: tuple[Fleet, VirtualFleet], releases: Releases
) -> None:
    servers, fleet = lab
    servers.fleet("release", "upload", str(releases.bundle("3.0.0", "unhealthy")))
    # 90 %: the rollout's own rule would let most of the fleet fail
    servers.fleet("rollout", "start", "3.0.0", "--stages", "100", "--max-failure", "90%")
    stopped = lambda: json.loads(servers.fleet("rollout", "status", "--json"))["emergency_stop"]  # noqa: E731
    fleet.run_until(lambda: stopped()["active"], limit_s=1800, step_s=15)
    answer = json.loads(servers.fleet("rollout", "status", "--json"))
    stop = answer["emergency_stop"]
    assert stop["actor"] == "rollout-engine" and stop["reason"].startswith("fleet guard")
    assert answer["rollouts"][0]["state"] == "paused"
    failed = answer["rollouts"][0]["counts"]["failed"]
    assert DEVICES * 0.2 < failed < DEVICES  # stopped once more than 20 % were unhealthy
    before = fleet.installs_started()
    for _ in range(10):
        fleet.step(15)
    assert fleet.installs_started() == before  # nothing new starts after the stop
    audit = servers.api("/api/v1/audit?limit=1000")["entries"]
    assert any(
        e["action"] == "fleet.emergency_stop" and e["actor"] == "rollout-engine" for e in audit
    )


def test_a_member_silent_after_its_assignment_fails_at_the_install_deadline(
    tmp_path: Path, releases: Releases
) -> None:
    deadline_s = 150  # of the server's clock, ten times faster than the wall clock
    with open_lab(tmp_path, releases, 5) as (servers, fleet):
        silent = fleet.members[-1]
        servers.fleet("release", "upload", str(releases.bundle("2.0.0")))
        servers.fleet(
            "rollout", "start", "2.0.0", "--stages", "100", "--soak", "30s",
            "--install-deadline", f"{deadline_s}s", "--max-failure", "20%",
        )  # fmt: skip
        # assigned, then off the network for good before its next check-in
        gone = ((fleet.clock() - fleet.started, math.inf),)
        silent.spec = dataclasses.replace(silent.spec, offline=gone)
        # The deadline runs on the server's clock, so wait in wall-clock time, stepping the fleet.
        give_up = time.monotonic() + 3 * deadline_s / 10 + 30
        while (rollout := rollouts(servers)[0])["state"] == "running":
            assert time.monotonic() < give_up, rollout["devices"]
            fleet.step(15)
        # 1 failure in 5 is within 20 %: the others completed the rollout
        assert rollout["state"] == "completed", rollout
        outcomes = {d["id"]: (d["outcome"], d["reason"]) for d in rollout["devices"]}
        assert outcomes.pop(silent.device_id) == ("failed", "install_deadline")
        assert set(outcomes.values()) == {("succeeded", None)}
        assert silent.version == "1.0.0" and not silent.device.events("install.started")
        entries = servers.api("/api/v1/audit?limit=1000")["entries"]
        started = next(e["at"] for e in entries if e["action"] == "rollout.started")
        failed = next(e["at"] for e in entries if e["action"] == "rollout.device_failed")
        assert seconds_between(started, failed) > deadline_s  # not before its deadline


def seconds_between(earlier: str, later: str) -> float:
    """Seconds between two audit times (``2026-01-01T00:00:00.000000Z``)."""
    parse = lambda text: datetime.fromisoformat(text.replace("Z", "+00:00"))  # noqa: E731
    return (parse(later) - parse(earlier)).total_seconds()
