"""Device metrics: values in the exposition, the textfile, and the HTTP endpoint."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_tools
from updater.health import CheckResult, HealthReport
from updater.metrics import UPDATE_STATES, SlotView, UpdaterMetrics, scrape_address


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> UpdaterMetrics:
    return UpdaterMetrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def populate(metrics: UpdaterMetrics) -> None:
    metrics.set_info(version="0.1.0", backend="tryboot", compatible="metrica-rpi4")
    metrics.set_update_state("trial")
    metrics.set_slots(
        {
            "a": SlotView("good", "1.0.0", booted=False, primary=True),
            "b": SlotView("trial", "1.1.0", booted=True, primary=False, attempts_left=1),
        }
    )
    metrics.observe_install(1_000_000, 40.0)
    metrics.record_health_check_failures(["http:http://127.0.0.1:8080/health"])
    metrics.set_temperature(61.5)
    metrics.set_free_space(Path("/var/lib/fleet"), 2_000_000_000)
    metrics.set_throttled(0x50005)
    metrics.set_last_boot_check(1_714_564_800.0)
    metrics.set_crash_loop_restarts(2)


def test_update_state_is_one_hot(registry: CollectorRegistry, metrics: UpdaterMetrics) -> None:
    assert value(registry, "fleet_updater_update_state", state="idle") == 1
    metrics.set_update_state("installing")
    states = {s: value(registry, "fleet_updater_update_state", state=s) for s in UPDATE_STATES}
    assert states == {s: (1.0 if s == "installing" else 0.0) for s in UPDATE_STATES}
    with pytest.raises(ValueError, match="unknown update state"):
        metrics.set_update_state("exploded")


def test_slots(registry: CollectorRegistry, metrics: UpdaterMetrics) -> None:
    populate(metrics)
    labels = {"slot": "b", "status": "trial", "version": "1.1.0", "booted": "true",
              "primary": "false"}  # fmt: skip
    assert value(registry, "fleet_updater_slot_info", **labels) == 1
    assert value(registry, "fleet_updater_attempts_left", slot="b") == 1
    assert value(registry, "fleet_updater_attempts_left", slot="a") is None
    # after the commit: the old label set must be gone, not left beside the new one
    metrics.set_slots(
        {
            "a": SlotView("good", "1.0.0", booted=False, primary=False),
            "b": SlotView("good", "1.1.0", booted=True, primary=True),
        }
    )
    assert value(registry, "fleet_updater_slot_info", **labels) is None
    committed = {**labels, "status": "good", "primary": "true"}
    assert value(registry, "fleet_updater_slot_info", **committed) == 1
    assert value(registry, "fleet_updater_attempts_left", slot="b") is None


def test_empty_slot_has_an_empty_version(
    registry: CollectorRegistry, metrics: UpdaterMetrics
) -> None:
    metrics.set_slots({"b": SlotView("empty", None, booted=False, primary=False)})
    labels = {"slot": "b", "status": "empty", "version": "", "booted": "false", "primary": "false"}
    assert value(registry, "fleet_updater_slot_info", **labels) == 1


def test_installs(registry: CollectorRegistry, metrics: UpdaterMetrics) -> None:
    metrics.observe_install(1_000_000, 40.0)
    metrics.observe_install(3_000_000, 100.0)
    assert value(registry, "fleet_updater_install_bytes_total") == 4_000_000
    assert value(registry, "fleet_updater_install_duration_seconds") == 100.0
    assert value(registry, "fleet_updater_install_throughput_bytes_per_second") == 30_000.0
    assert value(registry, "fleet_updater_install_seconds_count") == 2
    assert value(registry, "fleet_updater_install_seconds_sum") == 140.0
    bucket = value(registry, "fleet_updater_install_seconds_bucket", le="60.0")
    assert bucket == 1
    metrics.observe_install(0, 0.0)
    throughput = value(registry, "fleet_updater_install_throughput_bytes_per_second")
    assert throughput is not None and math.isnan(throughput)
    with pytest.raises(ValueError, match="negative"):
        metrics.observe_install(-1, 1.0)


def test_health_failures_by_check(registry: CollectorRegistry, metrics: UpdaterMetrics) -> None:
    report = HealthReport(
        ok=False,
        results=(
            CheckResult("systemd:camera.service", "systemd", False, "inactive", 0.1),
            CheckResult("tcp:127.0.0.1:1883", "tcp", True, "connected", 0.1),
        ),
        elapsed_s=0.2,
    )
    metrics.observe_health_report(report)
    metrics.observe_health_report(report)
    name = "fleet_updater_health_check_failures_total"
    assert value(registry, name, check="systemd:camera.service") == 2
    assert value(registry, name, check="tcp:127.0.0.1:1883") is None


def test_device_readings(registry: CollectorRegistry, metrics: UpdaterMetrics) -> None:
    for name in ("fleet_updater_temperature_celsius", "fleet_updater_throttled"):
        unknown = value(registry, name)
        assert unknown is not None and math.isnan(unknown)
    populate(metrics)
    assert value(registry, "fleet_updater_temperature_celsius") == 61.5
    assert value(registry, "fleet_updater_throttled") == 0x50005
    path = "/var/lib/fleet"
    assert value(registry, "fleet_updater_free_space_bytes", path=path) == 2_000_000_000
    assert value(registry, "fleet_updater_last_boot_check_timestamp_seconds") == 1_714_564_800
    assert value(registry, "fleet_updater_crash_loop_restarts") == 2
    metrics.set_temperature(None)
    metrics.set_throttled(None)
    assert math.isnan(value(registry, "fleet_updater_temperature_celsius") or 0.0)
    assert math.isnan(value(registry, "fleet_updater_throttled") or 0.0)


def test_info(registry: CollectorRegistry, metrics: UpdaterMetrics) -> None:
    metrics.set_info(version="0.1.0", backend="grub", compatible=None)
    labels = {"version": "0.1.0", "backend": "grub", "compatible": ""}
    assert value(registry, "fleet_updater_info", **labels) == 1


def test_server_and_config(registry: CollectorRegistry, metrics: UpdaterMetrics) -> None:
    assert value(registry, "fleet_updater_server_unreachable_seconds") == 0
    metrics.set_server_unreachable(125.5)
    assert value(registry, "fleet_updater_server_unreachable_seconds") == 125.5
    metrics.set_server_unreachable(-3)  # a clock that went backwards is not "minus reachable"
    assert value(registry, "fleet_updater_server_unreachable_seconds") == 0
    metrics.set_config(problems=2, drift=True)
    assert value(registry, "fleet_updater_config_problems") == 2
    assert value(registry, "fleet_updater_config_drift") == 1
    metrics.set_config(problems=0, drift=False)
    assert value(registry, "fleet_updater_config_drift") == 0
    assert value(registry, "fleet_updater_boot_state_problem") == 0
    metrics.set_boot_state_problem(True)
    assert value(registry, "fleet_updater_boot_state_problem") == 1
    metrics.set_boot_state_problem(False)
    assert value(registry, "fleet_updater_boot_state_problem") == 0


@pytest.mark.parametrize(
    ("listen", "advertise", "expected"),
    [
        ("127.0.0.1", None, None),  # no other machine reaches it: not advertised
        ("::1", None, None),
        ("fe80::1", None, None),
        ("169.254.0.7", None, None),
        ("192.168.1.20", None, "192.168.1.20:9101"),
        ("2001:db8::7", None, "[2001:db8::7]:9101"),
        ("0.0.0.0", None, "cam-0001:9101"),  # noqa: S104
        ("::", None, "cam-0001:9101"),
        ("cam-0001.local", None, "cam-0001.local:9101"),
        ("0.0.0.0", "gw-7.example.net:19101", "gw-7.example.net:19101"),  # noqa: S104
        ("127.0.0.1", "127.0.0.1:19101", "127.0.0.1:19101"),  # a lab on one machine says so
    ],
)
def test_scrape_address(listen: str, advertise: str | None, expected: str | None) -> None:
    assert scrape_address(listen, 9101, "cam-0001", advertise) == expected


def test_registries_are_independent() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    UpdaterMetrics(first).set_update_state("failed")
    UpdaterMetrics(second)
    assert value(first, "fleet_updater_update_state", state="failed") == 1
    assert value(second, "fleet_updater_update_state", state="failed") == 0


EXPECTED_FAMILIES = {
    "fleet_updater_update_state",
    "fleet_updater_slot_info",
    "fleet_updater_attempts_left",
    "fleet_updater_install_bytes",
    "fleet_updater_install_duration_seconds",
    "fleet_updater_install_seconds",
    "fleet_updater_install_throughput_bytes_per_second",
    "fleet_updater_health_check_failures",
    "fleet_updater_temperature_celsius",
    "fleet_updater_free_space_bytes",
    "fleet_updater_throttled",
    "fleet_updater_under_voltage",
    "fleet_updater_cpu_usage_ratio",
    "fleet_updater_memory_total_bytes",
    "fleet_updater_memory_available_bytes",
    "fleet_updater_disk_size_bytes",
    "fleet_updater_network_receive_bytes",
    "fleet_updater_network_transmit_bytes",
    "fleet_updater_last_boot_check_timestamp_seconds",
    "fleet_updater_crash_loop_restarts",
    "fleet_updater_server_unreachable_seconds",
    "fleet_updater_config_problems",
    "fleet_updater_config_drift",
    "fleet_updater_boot_state_problem",
    "fleet_updater_info",
}


def test_textfile_parses_back(tmp_path: Path, metrics: UpdaterMetrics) -> None:
    populate(metrics)
    path = tmp_path / "fleet_updater.prom"
    metrics.write_textfile(path)
    families = {f.name: f for f in text_string_to_metric_families(path.read_text())}
    # prometheus_client adds a "<counter or histogram>_created" gauge family of its own
    assert {name for name in families if not name.endswith("_created")} == EXPECTED_FAMILIES
    assert families["fleet_updater_install_bytes"].type == "counter"
    assert families["fleet_updater_install_seconds"].type == "histogram"
    assert families["fleet_updater_info"].type == "gauge"  # the text format has no info type
    temperature = families["fleet_updater_temperature_celsius"].samples[0]
    assert temperature.value == 61.5
    assert path.read_bytes() == metrics.exposition()


def test_textfile_write_leaves_no_temporary_files(tmp_path: Path, metrics: UpdaterMetrics) -> None:
    path = tmp_path / "fleet_updater.prom"
    metrics.write_textfile(path)
    metrics.set_update_state("downloading")
    metrics.write_textfile(path)
    assert [p.name for p in tmp_path.iterdir()] == ["fleet_updater.prom"]
    assert 'fleet_updater_update_state{state="downloading"} 1.0' in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o644


def test_textfile_in_a_missing_directory(tmp_path: Path, metrics: UpdaterMetrics) -> None:
    with pytest.raises(FileNotFoundError):
        metrics.write_textfile(tmp_path / "missing" / "fleet_updater.prom")
    assert list(tmp_path.iterdir()) == []


def test_promtool_accepts_the_textfile(tmp_path: Path, metrics: UpdaterMetrics) -> None:
    promtool = shutil.which("promtool")
    require_tools(promtool=promtool is not None)
    assert promtool is not None
    populate(metrics)
    path = tmp_path / "fleet_updater.prom"
    metrics.write_textfile(path)
    with path.open("rb") as textfile:
        checked = subprocess.run(
            [promtool, "check", "metrics"], stdin=textfile, capture_output=True, timeout=30
        )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    assert checked.stdout.decode() + checked.stderr.decode() == ""  # no lint warnings either


def test_serve_on_loopback(metrics: UpdaterMetrics) -> None:
    populate(metrics)
    server = metrics.serve(0)
    try:
        assert server.server.server_address[0] == "127.0.0.1"
        response = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
    finally:
        server.stop()
    assert response.status_code == 200
    assert 'fleet_updater_update_state{state="trial"} 1.0' in response.text
    assert not server.thread.is_alive()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
