"""The device gauges the alerts read, as node_exporter would see them in the textfile:
``fleet_updater_server_unreachable_seconds`` through a server outage (the daemon on a virtual
device against the server simulator, on a fake clock), and ``fleet_updater_config_drift`` and
``fleet_updater_config_problems`` after the configuration file changes or is damaged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import chaos.lab_firmwares  # noqa: F401 (fills LAB_FIRMWARES)
from chaos.lab_image import make_lab_image
from chaos.virtual_device import VirtualDevice
from signing.keyring import Keyring, trust_key
from signing.keys import SigningKey, public_key_pem
from tests.server_simulator import FakeClock, ServerSimulator
from tests.unit.conftest import ADMISSION
from updater.client import ServerClient
from updater.config import LAST_GOOD_NAME, load_config
from updater.daemon import Daemon
from updater.identity import load_or_create_identity
from updater.log import EventLog
from updater.runtime import Runtime

UNREACHABLE = "fleet_updater_server_unreachable_seconds"
DRIFT = "fleet_updater_config_drift"
PROBLEMS = "fleet_updater_config_problems"


def textfile_values(path: Path) -> dict[str, float]:
    """The unlabelled samples of a metrics textfile, by name."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(path.read_text())
        for sample in family.samples
        if not sample.labels
    }


@pytest.fixture
def device(tmp_path: Path) -> VirtualDevice:
    """A provisioned GRUB device running 1.0.0 from slot a."""
    device = VirtualDevice(tmp_path / "device", "grub")
    device.provision(make_lab_image("1.0.0"), "1.0.0")
    assert device.power_on()[-1].action == "confirmed"
    return device


# --- the server unreachable ---------------------------------------------------------------------


class Outage:
    """The daemon of ``device``, writing its metrics textfile, and the simulator it talks to."""

    def __init__(
        self, device: VirtualDevice, server: ServerSimulator, server_key: SigningKey, root: Path
    ) -> None:
        (root / "server.pub").write_bytes(public_key_pem(server_key.public_key))
        self.keyring = root / "server-keyring"
        trust_key(self.keyring, root / "server.pub")
        self.textfile = root / "node_exporter" / "fleet_updater.prom"
        self.server = server
        self.clock = FakeClock()
        self.device = device
        device.config = dataclasses.replace(
            device.config,
            server_urls=(server.url,),
            server_keyring=self.keyring,
            enrollment_token=ADMISSION,
            metrics_textfile=self.textfile,
        )

    def daemon(self, heartbeat_interval_s: float = 60.0) -> Daemon:
        self.device.config = dataclasses.replace(
            self.device.config, heartbeat_interval_s=heartbeat_interval_s
        )
        identity = load_or_create_identity(self.device.config.data_dir)[0]
        client = ServerClient(
            self.device.config.server_urls, identity.key,
            Keyring.load(self.keyring),
            clock=self.clock, rng=lambda: 0.5, timeout_s=2.0,
        )  # fmt: skip
        return Daemon(
            self.device.runtime(), client, self.clock, self.clock.sleep, lambda: 0.5,
            hostname="lab-device", wall_clock=lambda: 1.7e9,
        )  # fmt: skip

    def unreachable_s(self) -> float:
        return textfile_values(self.textfile)[UNREACHABLE]

    def step(self, daemon: Daemon) -> None:
        """One step of the daemon, then the fake clock moves on to when it wants the next."""
        self.clock.sleep(daemon.run_once())


@pytest.fixture
def outage(
    device: VirtualDevice, server: ServerSimulator, server_key: SigningKey, tmp_path: Path
) -> Outage:
    return Outage(device, server, server_key, tmp_path)


def test_the_textfile_shows_how_long_the_server_has_been_unreachable(outage: Outage) -> None:
    daemon = outage.daemon()
    outage.step(daemon)
    assert daemon.last_error is None and outage.unreachable_s() == 0
    outage.server.faults.down = True
    first_failure = outage.clock.now
    shown: list[float] = []
    while outage.clock.now - first_failure < 300:
        attempt = outage.clock.now
        outage.step(daemon)
        assert "no answer" in str(daemon.last_error)
        # what the textfile says at each failed attempt: the outage so far, by the daemon's clock
        assert outage.unreachable_s() == attempt - first_failure
        shown.append(outage.unreachable_s())
        assert len(shown) < 50
    assert shown[0] == 0 and shown == sorted(shown) and shown[-1] > 60  # the alert's threshold
    outage.server.faults.down = False
    outage.step(daemon)
    assert daemon.last_error is None
    assert outage.unreachable_s() == 0


def test_the_gauge_returns_to_zero_when_the_server_answers_between_heartbeats(
    outage: Outage,
) -> None:
    # heartbeats every 10 minutes; an outage of 2: when the server answers again the next
    # heartbeat is 8 minutes away, and DeviceServerUnreachable (over 60 s for 1 m) must not fire
    daemon = outage.daemon(heartbeat_interval_s=600.0)
    outage.step(daemon)
    outage.server.faults.down = True
    started = outage.clock.now
    while outage.clock.now - started < 120:
        outage.step(daemon)
    assert outage.unreachable_s() > 60
    outage.server.faults.down = False
    outage.step(daemon)
    assert daemon.last_error is None and outage.device.events("daemon.server_back")
    assert outage.unreachable_s() == 0


# --- the configuration --------------------------------------------------------------------------


class Configured:
    """``device``'s configuration as a file, loaded the way ``fleet-updater`` loads it, with the
    metrics written to a textfile."""

    def __init__(self, device: VirtualDevice, root: Path) -> None:
        self.device = device
        self.path = root / "updater.toml"
        self.textfile = root / "node_exporter" / "fleet_updater.prom"
        self.text = device.config_toml(extra=f'[metrics]\ntextfile = "{self.textfile}"\n')
        self.path.write_text(self.text)

    def runtime(self) -> Runtime:
        """A runtime as the updater builds one at start: the file loaded, its checksum taken."""
        loaded = load_config(self.path, data_dir=self.device.config.data_dir)
        return dataclasses.replace(self.device.runtime(), loaded=loaded, config_sha256=None)

    def published(self, runtime: Runtime) -> tuple[float, float]:
        """(drift, problems) as the textfile shows them after ``runtime`` publishes."""
        self.textfile.unlink(missing_ok=True)
        runtime.publish_metrics()
        values = textfile_values(self.textfile)
        return values[DRIFT], values[PROBLEMS]


@pytest.fixture
def configured(device: VirtualDevice, tmp_path: Path) -> Configured:
    return Configured(device, tmp_path)


def test_a_configuration_that_loaded_cleanly_shows_no_drift(configured: Configured) -> None:
    runtime = configured.runtime()
    assert runtime.loaded.source == str(configured.path) and not runtime.loaded.problems
    assert configured.published(runtime) == (0, 0)


def test_a_changed_configuration_file_shows_as_drift_until_it_matches_again(
    configured: Configured,
) -> None:
    runtime = configured.runtime()
    configured.path.write_text(configured.text + "# edited after the updater started\n")
    assert configured.published(runtime) == (1, 0)
    # the daemon rebuilds its runtime with dataclasses.replace: the checksum stays the one
    # taken at load, so the drift is still seen
    rebuilt = dataclasses.replace(runtime, log=EventLog(keep=True))
    assert configured.published(rebuilt) == (1, 0)
    configured.path.write_text(configured.text)  # put back as it was
    assert configured.published(runtime) == (0, 0)
    configured.path.unlink()  # removed: the file no longer describes what runs
    assert configured.published(runtime) == (1, 0)
    # a restart loads what is there: the last good copy, with a problem and no drift
    restarted = configured.runtime()
    assert restarted.loaded.source.endswith(LAST_GOOD_NAME)
    assert configured.published(restarted) == (0, 1)


def test_a_damaged_configuration_shows_its_problem_while_the_last_good_one_runs(
    configured: Configured,
) -> None:
    configured.runtime()  # a clean start keeps a last-good copy
    configured.path.write_bytes(configured.text.encode()[:120] + b"\x00 damaged [")
    runtime = configured.runtime()
    assert runtime.loaded.source.endswith(LAST_GOOD_NAME)
    assert len(runtime.loaded.problems) == 1
    assert runtime.config.metrics_textfile == configured.textfile
    # the fallback runs exactly the copy it loaded: a problem, not drift
    assert configured.published(runtime) == (0, 1)
    # the file is repaired: the updater still runs the fallback until it restarts
    configured.path.write_text(configured.text)
    assert configured.published(runtime) == (0, 1)
    assert configured.published(configured.runtime()) == (0, 0)
