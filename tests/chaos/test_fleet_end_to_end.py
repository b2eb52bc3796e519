"""The whole fleet loop on loopback: real ``fleet server run`` processes (on SQLite and, with
``FLEET_TEST_DATABASE_URL``, PostgreSQL), the real daemon in a virtual device, the operator's
``fleet`` commands.

enroll → upload → assign → the device downloads, installs, reboots, commits → the server shows
the new version and the audit trail holds every step; the primary server killed → the device
carries on through the second URL; the server restarted → nothing lost.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

from bootloader_hooks.base import BootCause, BootEvent
from chaos.virtual_device import BootRecord, VirtualDevice
from signing.keyring import Keyring, trust_key
from tests.chaos.conftest import MakeDevice, Releases
from tests.chaos.servers import Fleet, device_row, run
from tests.server_simulator import FakeClock
from updater.client import ServerClient
from updater.daemon import Daemon
from updater.identity import load_or_create_identity


class Device:
    """A virtual device whose real daemon follows the fleet, on a fake clock."""

    def __init__(self, device: VirtualDevice, fleet: Fleet, enrollment_token: str) -> None:
        self.device = device
        self.clock = FakeClock()
        keyring = device.root / "server-keyring"
        trust_key(keyring, fleet.data / "server-key.pub")
        device.config = dataclasses.replace(
            device.config, server_urls=fleet.urls, server_keyring=keyring,
            enrollment_token=enrollment_token,
        )  # fmt: skip
        identity = load_or_create_identity(device.config.data_dir)[0]
        self.device_id = identity.device_id
        client = ServerClient(
            fleet.urls, identity.key, Keyring.load(keyring), clock=self.clock,
            rng=lambda: 0.5, timeout_s=2.0, failover_after_s=30.0,
        )  # fmt: skip
        self.daemon = Daemon(
            device.runtime(), client, self.clock, self.clock.sleep, lambda: 0.5,
            hostname="cam-0042",
        )  # fmt: skip

    def follow(self, done: Callable[[], bool], steps: int = 40) -> list[BootRecord]:
        """Let the daemon work (reboots included) until ``done``; return the boots."""
        boots: list[BootRecord] = []
        for _ in range(steps):
            self.clock.sleep(max(self.daemon.run_once(), 1.0))
            if self.device.pending_reboot is not None:
                command = tuple(self.device.pending_reboot)
                boots += self.device.settle(BootEvent(BootCause.REBOOT, command))
            if done():
                return boots
        raise AssertionError(f"not done after {steps} daemon steps: {self.daemon.last_error}")


def test_enroll_upload_assign_install_commit_failover_restart(
    fleet_servers: Fleet, make_device: MakeDevice, releases: Releases
) -> None:
    fleet_ = fleet_servers
    created = run("server", "enrollment-token", "create", "--uses", "1", *fleet_.db_args)
    token = created.splitlines()[0]
    cam = Device(make_device("grub"), fleet_, token)

    cam.follow(lambda: cam.daemon.last_error is None and bool(device_row(fleet_, cam.device_id)))
    assert device_row(fleet_, cam.device_id)["hostname"] == "cam-0042"

    fleet_.fleet("release", "upload", str(releases.bundle("2.0.0")))
    fleet_.fleet("device", "assign", cam.device_id, "2.0.0")
    boots = cam.follow(lambda: device_row(fleet_, cam.device_id).get("version") == "2.0.0")
    assert [(b.slot, b.action) for b in boots] == [("b", "committed")]
    assert cam.device.state().slot("b").version == "2.0.0"

    actions = [entry["action"] for entry in fleet_.api("/api/v1/audit?limit=1000")["entries"]]
    for step in ("release.uploaded", "device.assigned", "device.enrolled", "install.started",
                 "install.finished", "boot_check.committed"):  # fmt: skip
        assert any(step in action for action in actions), (step, actions)

    # the primary goes silent: the device carries on through the second URL
    fleet_.stop(0)
    fleet_.fleet("release", "upload", str(releases.bundle("2.1.0")), server=1)
    fleet_.fleet("device", "assign", cam.device_id, "2.1.0", server=1)
    boots = cam.follow(
        lambda: device_row(fleet_, cam.device_id, server=1).get("version") == "2.1.0"
    )
    assert boots[-1].action == "committed" and boots[-1].image.version == "2.1.0"  # type: ignore[union-attr]

    # the primary comes back: nothing was lost, and the audit trail is intact
    fleet_.start(0)
    assert device_row(fleet_, cam.device_id).get("version") == "2.1.0"
    versions = [r["version"] for r in json.loads(fleet_.fleet("release", "list", "--json"))]
    assert {"2.0.0", "2.1.0"} <= set(versions)
    run("audit", "verify", *fleet_.db_args)
