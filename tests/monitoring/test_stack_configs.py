"""The monitoring stack's files, checked as far as this machine can without Docker: promtool
and amtool run for real; the Compose file, Grafana provisioning, Loki, Alloy, Promtail and
Netdata configurations are parsed and checked for what the stack relies on."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from grafana_foundation_sdk.models.dashboard import Dashboard as SdkDashboard

from tests.monitoring.conftest import MONITORING, ROOT, RULES, load_yaml

GENERATOR = MONITORING / "grafana" / "generate.py"


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.usefixtures("promtool")
def test_promtool_checks_the_config_with_its_rules(tmp_path: Path) -> None:
    # the container paths, mapped onto the repository: promtool then checks the rule files and
    # the file_sd list the configuration names, not only the configuration's syntax
    text = (MONITORING / "prometheus" / "prometheus.yml").read_text()
    # the token files are the operator's (secrets/ is ignored by git): promtool reads them, so
    # the ones the configuration names are made here
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name in ("fleet-metrics-token", "fleet-viewer-token"):
        (secrets / name).write_text("t" * 64 + "\n")
    text = text.replace("/etc/prometheus/secrets/", f"{secrets}/")
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace("/etc/prometheus/", f"{MONITORING / 'prometheus'}/"))
    result = tool("promtool", "check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    # every rule of the rule files the configuration names (rules/*.yml): promtool parsed each
    files = sorted((MONITORING / "prometheus" / "rules").glob("*.yml"))
    assert RULES in files
    count = sum(len(group["rules"]) for path in files for group in load_yaml(path)["groups"])
    assert count >= 19
    assert f"SUCCESS: {count} rules found" in result.stdout + result.stderr
    assert "does not exist" not in result.stdout + result.stderr


def test_prometheus_scrapes_the_server_with_the_scrape_token() -> None:
    # without it the server answers the fleet-wide series only: no per-device alert would fire
    config = load_yaml(MONITORING / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    authorization = jobs["fleet-server"]["authorization"]
    assert authorization["type"] == "Bearer"
    assert authorization["credentials_file"] == "/etc/prometheus/secrets/fleet-metrics-token"
    assert "fleet-metrics-token" in (MONITORING / "README.md").read_text()


def test_prometheus_discovers_devices_through_the_server() -> None:
    config = load_yaml(MONITORING / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    sd = jobs["fleet-devices"]["http_sd_configs"][0]
    assert sd["url"].endswith("/api/v1/sd/prometheus")
    assert sd["authorization"]["type"] == "Bearer"
    assert config["global"]["evaluation_interval"] == "30s"


@pytest.mark.usefixtures("amtool")
def test_amtool_checks_the_alertmanager_config() -> None:
    result = tool("amtool", "check-config", str(MONITORING / "alertmanager" / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_watchdog_goes_to_the_dead_mans_switch() -> None:
    config = load_yaml(MONITORING / "alertmanager" / "alertmanager.yml")
    route = next(r for r in config["route"]["routes"] if 'alertname = "Watchdog"' in r["matchers"])
    assert route["receiver"] == "deadmans-switch"
    assert route["repeat_interval"] == "1m"
    receivers = {r["name"]: r for r in config["receivers"]}
    assert receivers["deadmans-switch"]["webhook_configs"][0]["url"].startswith("https://")


def test_compose_pins_every_image_and_mounts_what_exists() -> None:
    compose = load_yaml(MONITORING / "docker-compose.yml")
    services: dict[str, Any] = compose["services"]
    assert set(services) >= {"prometheus", "alertmanager", "grafana", "loki"}
    for name, service in services.items():
        image, _, tag = service["image"].rpartition(":")
        assert image and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin {service['image']}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (MONITORING / source).exists(), f"{name}: {source} does not exist"


def load_generator() -> ModuleType:
    """deploy/monitoring/grafana/generate.py, imported as a module (it is a script)."""
    spec = importlib.util.spec_from_file_location("grafana_generate", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    """The committed dashboards by uid."""
    boards = [json.loads(p.read_text()) for p in (MONITORING / "grafana/dashboards").glob("*.json")]
    return {board["uid"]: board for board in boards}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but the row headings, those nested in a collapsed row included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels") or [])
        else:
            found.append(panel)
    return found


def test_grafana_provisioning_matches_the_dashboards() -> None:
    sources = load_yaml(MONITORING / "grafana/provisioning/datasources/datasources.yml")
    uids = {source["uid"]: source["type"] for source in sources["datasources"]}
    assert uids == {"prometheus": "prometheus", "loki": "loki"}
    providers = load_yaml(MONITORING / "grafana/provisioning/dashboards/dashboards.yml")
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    for dashboard in dashboards().values():
        # the schema the SDK writes; Grafana migrates older schemas forward, never back
        assert dashboard["schemaVersion"] == SdkDashboard().schema_version
        for panel in panels(dashboard):
            for target in panel["targets"]:
                assert uids[target["datasource"]["uid"]] == target["datasource"]["type"]


def test_every_panel_has_a_data_source_and_a_query() -> None:
    for uid, dashboard in dashboards().items():
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{uid}: panel ids repeat"
        for panel in panels(dashboard):
            where = f"{uid}: {panel['title']!r}"
            assert panel["datasource"]["uid"] in {"prometheus", "loki"}, where
            assert panel["targets"], f"{where} has no query"
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"], where
                assert target["expr"].strip(), f"{where} has an empty query"
            refs = [target["refId"] for target in panel["targets"]]
            assert len(refs) == len(set(refs)), f"{where}: query refIds repeat"
            # Grafana reads a panel without options as one whose options are null
            assert isinstance(panel["options"], dict), where


def prometheus_queries() -> list[tuple[str, str]]:
    """(dashboard uid and panel title, query) of every Prometheus query, variables filled in."""
    found = []
    for uid, dashboard in dashboards().items():
        for panel in panels(dashboard):
            for target in panel["targets"]:
                if target["datasource"]["type"] == "prometheus":
                    expr = target["expr"].replace("$device", "d").replace("$rollout", ".*")
                    found.append((f"{uid}: {panel['title']}", expr))
    return found


@pytest.mark.usefixtures("promtool")
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # each query as a recording rule: promtool parses it with Prometheus's own parser, so a
    # panel that Grafana would show as an error fails here, without a running Prometheus
    queries = prometheus_queries()
    rules = [{"record": f"dashboard:query{n}", "expr": expr} for n, (_, expr) in enumerate(queries)]
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = tool("promtool", "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


# The device health series of the updater's exporter (updater/metrics.py), each shown per
# device and fleet-wide.
HEALTH_METRICS = {
    "fleet_updater_cpu_usage_ratio",
    "fleet_updater_memory_total_bytes",
    "fleet_updater_memory_available_bytes",
    "fleet_updater_free_space_bytes",
    "fleet_updater_disk_size_bytes",
    "fleet_updater_network_receive_bytes_total",
    "fleet_updater_network_transmit_bytes_total",
    "fleet_updater_throttled",
    "fleet_updater_under_voltage",
}


def row_panels(dashboard: dict[str, Any], title: str) -> list[dict[str, Any]]:
    """The panels under the row heading ``title``, up to the next row."""
    rows = [n for n, panel in enumerate(dashboard["panels"]) if panel["type"] == "row"]
    start = next(n for n in rows if dashboard["panels"][n]["title"] == title)
    end = next((n for n in rows if n > start), len(dashboard["panels"]))
    nested: list[dict[str, Any]] = dashboard["panels"][start].get("panels") or []
    return nested or dashboard["panels"][start + 1 : end]


@pytest.mark.parametrize("uid", ["fleet-device", "fleet-overview"])
def test_the_device_health_row_shows_every_health_metric(uid: str) -> None:
    health = row_panels(dashboards()[uid], "Device health")
    exprs = " ".join(target["expr"] for panel in health for target in panel["targets"])
    names = set(re.findall(r"fleet_updater_\w+", exprs))
    assert names == HEALTH_METRICS
    # counters are shown as rates; a device's own row reads only that device
    for counter in ("fleet_updater_network_receive_bytes_total",
                    "fleet_updater_network_transmit_bytes_total"):  # fmt: skip
        assert re.findall(rf"{counter}[^\[]*\[", exprs) and f"rate({counter}" in exprs
    if uid == "fleet-device":
        for panel in health:
            for target in panel["targets"]:
                assert target["expr"].count("fleet_updater_") == target["expr"].count(
                    'device="$device"'
                ), panel["title"]


def test_a_panel_outside_the_grid_or_over_another_is_refused() -> None:
    generator = load_generator()
    board = generator.fleet_device()
    generator.check_grid(board)
    wide = json.loads(json.dumps(board))
    wide["panels"][1]["gridPos"]["w"] = 9  # 16 + 9 > 24
    with pytest.raises(ValueError, match="sticks out of the grid"):
        generator.check_grid(wide)
    overlapping = json.loads(json.dumps(board))
    overlapping["panels"][1]["gridPos"]["x"] = 15
    with pytest.raises(ValueError, match="overlaps panel 'Device'"):
        generator.check_grid(overlapping)


def test_dashboards_are_generated_from_code() -> None:
    result = tool(sys.executable, str(GENERATOR), "--check")
    assert result.returncode == 0, result.stderr
    names = {path.name for path in (MONITORING / "grafana" / "dashboards").glob("*.json")}
    assert names == {"fleet-overview.json", "fleet-device.json", "fleet-rollouts.json"}


def test_the_device_dashboard_shows_the_devices_logs() -> None:
    dashboard = json.loads((MONITORING / "grafana/dashboards/fleet-device.json").read_text())
    logs = [p for p in dashboard["panels"] if p["type"] == "logs"]
    assert logs and logs[0]["targets"][0]["expr"] == '{device="$device"}'
    assert any("explore" in link["url"] for link in dashboard["links"])


def test_loki_keeps_labels_few() -> None:
    config = load_yaml(MONITORING / "loki" / "loki.yml")
    assert config["schema_config"]["configs"][0]["schema"] == "v13"
    assert config["limits_config"]["max_label_names_per_series"] <= 8
    assert config["compactor"]["retention_enabled"] is True


def test_alloy_ships_the_updater_log_with_three_labels() -> None:
    text = (MONITORING / "alloy" / "config.alloy").read_text()
    assert text.count("{") == text.count("}")
    for component in ('loki.source.journal "fleet"', 'loki.process "fleet"',
                      'loki.write "fleet"', "stage.json", "stage.labels"):  # fmt: skip
        assert component in text
    labels = re.search(r"stage\.labels \{\s*values = \{([^}]*)\}", text)
    assert labels is not None
    assert re.findall(r"(\w+) = \"\"", labels[1]) == ["device", "role", "component"]


def test_alloy_ships_the_server_log_labelled_component_server() -> None:
    text = (MONITORING / "alloy" / "server.alloy").read_text()
    assert text.count("{") == text.count("}")
    for component in ('loki.source.journal "server"', 'loki.process "server"',
                      'loki.write "server"', 'sys.env("FLEET_LOKI_URL")'):  # fmt: skip
        assert component in text
    # the label is static, so a line that is not JSON (a traceback before logging starts, or
    # --log-format text) is found under {component="server"} all the same; no label is read
    # from the line, so a device id or route in it can never become one
    labels = re.search(r"stage\.static_labels \{\s*values = \{([^}]*)\}", text)
    assert labels is not None and labels[1].strip() == 'component = "server"'
    assert "stage.labels" not in text
    selector = re.search(r'selector = "\{unit!~\\"([^\\]+)\\", container!~\\"([^\\]+)\\"', text)
    assert selector is not None
    unit, container = re.compile(selector[1]), re.compile(selector[2])
    for kept in ("fleet-server.service", "fleet-server@2.service"):
        assert unit.fullmatch(kept)
    for dropped in ("fleet-updater.service", "fleet-server-backup.service", "sshd.service"):
        assert not unit.fullmatch(dropped)
    assert container.fullmatch("fleet-server-1") and not container.fullmatch("postgres")


def test_promtail_does_the_same_for_older_images() -> None:
    config = load_yaml(MONITORING / "promtail" / "promtail.yml")
    job = config["scrape_configs"][0]
    assert "journal" in job
    labels = next(stage["labels"] for stage in job["pipeline_stages"] if "labels" in stage)
    assert set(labels) == {"device", "role", "component"}


def test_netdata_reads_the_updater_metrics() -> None:
    jobs = load_yaml(MONITORING / "netdata" / "go.d" / "prometheus.conf")["jobs"]
    assert jobs[0]["url"].endswith("/metrics")
    assert "[db]" in (MONITORING / "netdata" / "netdata.conf").read_text()


def test_the_readme_says_how_to_start_and_point_at_a_server() -> None:
    readme = (MONITORING / "README.md").read_text()
    assert "docker compose" in readme
    assert "targets/fleet-server.yml" in readme
    assert (ROOT / "docs" / "observability.md").exists()
