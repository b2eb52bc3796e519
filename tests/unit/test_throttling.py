"""The Raspberry Pi firmware's throttling and under-voltage bits: read from the sysfs node or
a (fake) ``vcgencmd``, shown in the metrics and ``fleet-updater status``, and an install
deferred while the supply is under-voltage now, on a virtual device and through the daemon."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import chaos.lab_firmwares  # noqa: F401 (fills LAB_FIRMWARES)
from chaos.virtual_device import VirtualDevice
from signing.keyring import Keyring
from tests.chaos.conftest import Releases
from tests.unit.test_daemon import Lab, lab, template  # noqa: F401 (fixtures)
from updater.cli import EXIT_REBOOT_REQUIRED, main
from updater.client import ServerClient
from updater.daemon import Daemon
from updater.device import (
    MAX_THROTTLED,
    Throttled,
    parse_throttled,
    read_throttled,
    throttled_names,
    throttled_state,
    under_voltage_now,
    vcgencmd_throttled,
)
from updater.metrics import UpdaterMetrics

DEFERRED = "supply under-voltage now (get_throttled 0x50005): update deferred"

# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("50005\n", 0x50005),
        ("throttled=0x50005\n", 0x50005),
        ("0x0", 0),
        ("ffffffff", MAX_THROTTLED),
        ("100000000", None),  # above 32 bits: not the firmware's
        ("throttled=0x" + "f" * 80, None),  # longer than any real answer
        ("throttled=0x\uff15", None),  # a digit, but not an ASCII one
        ("throttled=", None),
        ("", None),
        ("-1", None),
        ("throttled=0x1 junk", None),
    ],
)
def test_parse_throttled(text: str, value: int | None) -> None:
    assert parse_throttled(text) == value


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(max_size=100),
    st.integers().map(lambda n: f"throttled={n:#x}" if n >= 0 else f"throttled=-{-n:#x}"),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
))  # fmt: skip
def test_parse_throttled_never_raises_and_stays_in_32_bits(text: str) -> None:
    value = parse_throttled(text)
    assert value is None or 0 <= value <= MAX_THROTTLED


def test_under_voltage_is_bit_zero_now_only() -> None:
    assert under_voltage_now(0x50005) is True
    assert under_voltage_now(0x1) is True
    # under-voltage and throttling occurred since boot, the supply is fine now: no deferral
    assert under_voltage_now(0x50000) is False
    assert under_voltage_now(0x4) is False  # throttled now (heat), not under-voltage
    assert under_voltage_now(None) is None
    assert throttled_names(Throttled(0x50005).now) == ["under_voltage", "throttled"]


def test_a_huge_node_is_read_bounded(tmp_path: Path) -> None:
    node = tmp_path / "get_throttled"
    node.write_text("0" * (10 << 20) + "1")
    assert read_throttled(node) is None


# --- vcgencmd --------------------------------------------------------------------------------


@pytest.fixture
def fake_vcgencmd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Put a ``vcgencmd`` running ``script`` (shell) first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")

    def install(script: str) -> None:
        path = bin_dir / "vcgencmd"
        path.write_text(f"#!/bin/sh\n{script}\n")
        path.chmod(0o755)

    return install


def test_vcgencmd_is_asked_when_the_node_is_absent(
    tmp_path: Path, fake_vcgencmd: Callable[[str], None]
) -> None:
    fake_vcgencmd('[ "$1" = get_throttled ] && echo throttled=0x50005')
    assert vcgencmd_throttled() == 0x50005
    assert throttled_state(tmp_path / "no-node") == 0x50005


def test_the_node_wins_over_vcgencmd_even_when_it_reads_badly(
    tmp_path: Path, fake_vcgencmd: Callable[[str], None]
) -> None:
    fake_vcgencmd("echo throttled=0x50005")
    node = tmp_path / "get_throttled"
    node.write_text("0\n")
    assert throttled_state(node) == 0
    node.write_text("garbage\n")
    assert throttled_state(node) is None
    node.unlink()
    node.mkdir()
    assert throttled_state(node) is None  # there but unreadable: not a reason to ask vcgencmd
    assert throttled_state(node / "missing") == 0x50005
    (tmp_path / "file").write_text("")
    assert throttled_state(tmp_path / "file" / "get_throttled") == 0x50005  # absent too


@pytest.mark.parametrize(
    "script",
    [
        "echo 'VCHI initialization failed'; exit 1",  # no access to /dev/vchiq
        "echo throttled=0x50005; exit 1",  # a failure whatever it printed
        "echo 'error=1 error_msg=\"Command not registered\"'",
        "echo throttled=banana",
        "echo 50005",  # not the form vcgencmd prints
        "head -c 10000000 /dev/zero",
        "exit 0",
    ],
)
def test_a_bad_vcgencmd_answer_is_unknown(
    tmp_path: Path, fake_vcgencmd: Callable[[str], None], script: str
) -> None:
    fake_vcgencmd(script)
    assert throttled_state(tmp_path / "no-node") is None


def test_a_hung_vcgencmd_is_given_up_within_its_timeout(
    tmp_path: Path, fake_vcgencmd: Callable[[str], None]
) -> None:
    fake_vcgencmd("exec sleep 30")
    started = time.monotonic()
    assert throttled_state(tmp_path / "no-node", timeout_s=0.3) is None
    assert time.monotonic() - started < 5


def test_without_node_or_vcgencmd_it_is_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert shutil.which("vcgencmd") is None
    assert throttled_state(tmp_path / "no-node") is None


# --- metrics ---------------------------------------------------------------------------------


def test_the_gauges_show_the_bits_and_under_voltage_now() -> None:
    registry = CollectorRegistry()
    metrics = UpdaterMetrics(registry)

    def gauges() -> tuple[float | None, float | None]:
        return (
            registry.get_sample_value("fleet_updater_throttled"),
            registry.get_sample_value("fleet_updater_under_voltage"),
        )

    assert all(math.isnan(v or 0.0) for v in gauges())
    metrics.set_throttled(0x50005)
    assert gauges() == (0x50005, 1)
    metrics.set_throttled(0x50000)
    assert gauges() == (0x50000, 0)
    metrics.set_throttled(None)
    assert all(math.isnan(v or 0.0) for v in gauges())


@pytest.fixture
def device(tmp_path: Path, template: Path) -> VirtualDevice:  # noqa: F811 (the fixture)
    """A provisioned GRUB device running 1.0.0 from slot a, its supply normal."""
    root = tmp_path / "device"
    shutil.copytree(template, root)
    return VirtualDevice(root, "grub")


def test_published_metrics_read_the_device(device: VirtualDevice) -> None:
    registry = CollectorRegistry()
    runtime = dataclasses.replace(device.runtime(), live_metrics=UpdaterMetrics(registry))
    device.set_throttled(0x50005)
    runtime.publish_metrics()
    assert registry.get_sample_value("fleet_updater_throttled") == 0x50005
    assert registry.get_sample_value("fleet_updater_under_voltage") == 1
    data = {"path": str(device.config.data_dir)}
    size = registry.get_sample_value("fleet_updater_disk_size_bytes", data)
    free = registry.get_sample_value("fleet_updater_free_space_bytes", data)
    assert size is not None and free is not None and 0 <= free <= size
    device.set_throttled(0x50000)
    runtime.publish_metrics()
    assert registry.get_sample_value("fleet_updater_under_voltage") == 0
    # the host figures are the machine's own, its CPU use compared with the round before
    total = registry.get_sample_value("fleet_updater_memory_total_bytes")
    assert total is not None and total > 0
    ratio = registry.get_sample_value("fleet_updater_cpu_usage_ratio")
    assert ratio is not None and (math.isnan(ratio) or 0.0 <= ratio <= 1.0)
    assert not device.events("metrics.host_unreadable")


# --- the command line on a virtual device ----------------------------------------------------


def updater(device: VirtualDevice, *args: str) -> Result:
    config = device.root / "updater.toml"
    config.write_text(device.config_toml())
    return CliRunner().invoke(main, ["--config", str(config), *args])


def status(device: VirtualDevice) -> dict[str, Any]:
    result = updater(device, "status", "--json")
    assert result.exit_code == 0, result.output
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def test_status_shows_the_throttling_state(
    device: VirtualDevice, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert status(device)["power"] == {
        "throttled": 0, "under_voltage": False, "now": [], "since_boot": [],
    }  # fmt: skip
    assert "power:     normal now (0x0)\n" in updater(device, "status").stdout
    device.set_throttled(0x50005)
    assert status(device)["power"] == {
        "throttled": 0x50005, "under_voltage": True, "now": ["under_voltage", "throttled"],
        "since_boot": ["under_voltage", "throttled"],
    }  # fmt: skip
    text = updater(device, "status").stdout
    assert (
        "power:     under_voltage, throttled now (0x50005): installs wait until the supply "
        "recovers; since boot: under_voltage, throttled\n"
    ) in text
    device.config.throttled_path.write_text("garbage\n")
    assert status(device)["power"]["throttled"] is None
    device.config.throttled_path.unlink()
    monkeypatch.setenv("PATH", str(tmp_path))  # no vcgencmd either: not a Raspberry Pi
    assert status(device)["power"] == {
        "throttled": None, "under_voltage": None, "now": [], "since_boot": [],
    }  # fmt: skip
    assert "power:     unknown (no get_throttled node or vcgencmd answered" in (
        updater(device, "status").stdout
    )


def test_an_install_is_deferred_while_under_voltage_now(
    device: VirtualDevice, releases: Releases
) -> None:
    before = status(device)
    device.set_throttled(0x50005)
    result = updater(device, "install", str(releases.bundle("2.0.0")), "--no-reboot")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and DEFERRED in errors[0], result.stderr
    after = status(device)
    assert after["slots"] == before["slots"]
    # only "occurred since boot" left: the supply recovered, the install goes ahead
    device.set_throttled(0x50000)
    result = updater(device, "install", str(releases.bundle("2.0.0")), "--no-reboot")
    assert result.exit_code == EXIT_REBOOT_REQUIRED, result.output
    assert status(device)["slots"]["b"]["status"] == "trial"


# --- the daemon ------------------------------------------------------------------------------


def daemon_with_metrics(device_lab: Lab, registry: CollectorRegistry) -> Daemon:
    """The lab's daemon, its runtime serving metrics into ``registry``."""
    config = device_lab.device.config
    assert config.server_keyring is not None
    client = ServerClient(
        config.server_urls, device_lab.identity.key, Keyring.load(config.server_keyring),
        clock=device_lab.clock, rng=lambda: 0.5, timeout_s=2.0,
    )  # fmt: skip
    runtime = dataclasses.replace(
        device_lab.device.runtime(), live_metrics=UpdaterMetrics(registry)
    )
    return Daemon(
        runtime, client, device_lab.clock, device_lab.clock.sleep, lambda: 0.5,
        hostname="lab-device", wall_clock=lambda: 1.7e9,
    )  # fmt: skip


def rebooting(device: VirtualDevice) -> bool:
    return device.pending_reboot is not None


def test_the_daemon_waits_while_under_voltage_and_installs_once_it_clears(
    lab: Lab,  # noqa: F811 (the fixture)
) -> None:
    lab.server.assign(lab.device_id, lab.release("2.0.0"))
    lab.device.set_throttled(0x50005)
    registry = CollectorRegistry()
    daemon = daemon_with_metrics(lab, registry)
    for _ in range(3):
        daemon.run_once()
        lab.clock.now += 61
    assert registry.get_sample_value("fleet_updater_under_voltage") == 1
    assert (registry.get_sample_value("fleet_updater_memory_available_bytes") or 0) > 0
    assert not lab.local("install.started") and not rebooting(lab.device)
    skipped = lab.local("daemon.install_skipped")
    assert [e["reason"] for e in skipped] == [f"deferred: {DEFERRED}"]  # once, not per check-in
    assert any(
        e["event"] == "daemon.install_skipped" and DEFERRED in e["fields"]["reason"]
        for e in lab.server_events()
    )
    assert lab.slot("b").status != "trial"
    assert lab.heartbeats()[-1]["throttled"] == 0x50005  # the server sees it too

    lab.device.set_throttled(0x50000)
    daemon.run_once()
    assert len(lab.local("install.started")) == 1 and rebooting(lab.device)
    assert registry.get_sample_value("fleet_updater_under_voltage") == 0
    assert lab.reboot()[-1].action == "committed"
    assert lab.slot("b").version == "2.0.0"


def test_a_server_from_before_the_field_still_gets_the_heartbeat(
    lab: Lab,  # noqa: F811 (the fixture)
) -> None:
    lab.server.heartbeat_optional = {"role", "tags", "metrics_address"}
    lab.device.set_throttled(0x50005)
    daemon = lab.daemon()
    for _ in range(3):
        daemon.run_once()
        lab.clock.now += 61
    beats = lab.heartbeats()
    assert len(beats) == 3, beats
    assert all("throttled" not in beat for beat in beats)
    assert len(lab.local("daemon.heartbeat_reduced")) == 1  # said once, not every minute
    refused = [r for r in lab.server.requests if r[1].endswith("/heartbeat")]
    assert len(refused) == 4, refused  # one refused, then three without the field


@pytest.mark.parametrize("retry_passes", [True, False], ids=["once", "until fixed"])
def test_a_refusal_for_another_reason_keeps_the_field(
    lab: Lab,  # noqa: F811 (the fixture)
    monkeypatch: pytest.MonkeyPatch,
    retry_passes: bool,
) -> None:
    """A 422 that names another field (once, or until the server is fixed) is no sign of a
    server from before throttled: the field is sent again."""
    lab.device.set_throttled(0x50005)
    beat = lab.server._heartbeat
    refusals = iter([True] if retry_passes else [True, True])

    def refuse_tags(device_id: str, body: dict[str, Any]) -> Any:
        if next(refusals, False):
            lab.server.heartbeat_optional = {"role", "metrics_address", "throttled"}
            try:
                return beat(device_id, body)
            finally:
                lab.server.heartbeat_optional = {"role", "tags", "metrics_address", "throttled"}
        return beat(device_id, body)

    monkeypatch.setattr(lab.server, "_heartbeat", refuse_tags)
    daemon = lab.daemon()
    for _ in range(3):
        daemon.run_once()
        lab.clock.now += 61
    assert not lab.local("daemon.heartbeat_reduced")
    beats = [beat.get("throttled") for beat in lab.heartbeats()]
    assert beats == [0x50005] * (2 if retry_passes else 1), beats


def test_a_vcgencmd_printing_without_end_is_read_bounded(
    tmp_path: Path, fake_vcgencmd: Callable[[str], None]
) -> None:
    fake_vcgencmd("echo throttled=0x50005\nexec /usr/bin/yes flood")
    started = time.monotonic()
    assert throttled_state(tmp_path / "no-node", timeout_s=1) == 0x50005  # killed at 1 s
    assert time.monotonic() - started < 4


def test_a_fifo_in_place_of_the_node_is_unknown_at_once(tmp_path: Path) -> None:
    node = tmp_path / "get_throttled"
    os.mkfifo(node)
    started = time.monotonic()
    assert throttled_state(node) is None
    assert time.monotonic() - started < 1


def test_a_vcgencmd_leaving_a_child_on_its_output_is_read_by_the_deadline(
    tmp_path: Path, fake_vcgencmd: Callable[[str], None]
) -> None:
    # no newline, and the child in a session of its own: only the deadline ends the read
    fake_vcgencmd("printf throttled=0x4\nsetsid /bin/sleep 60 &\nexit 0")
    started = time.monotonic()
    assert throttled_state(tmp_path / "no-node", timeout_s=0.5) == 0x4
    assert time.monotonic() - started < 5
    fake_vcgencmd("echo throttled=0x5\nsetsid /bin/sleep 60 &\nexit 0")
    started = time.monotonic()
    assert throttled_state(tmp_path / "no-node", timeout_s=30) == 0x5  # its line ends the read
    assert time.monotonic() - started < 5  # and its own exit: the child is not waited for
