"""A real Prometheus (Debian's ``prometheus``) against a real server and a virtual fleet.

Two ``fleet server run`` processes serve one database; three virtual devices run the real
daemon, serve their metrics on loopback ports and report them in their heartbeats. Prometheus
runs with the committed prometheus.yml and rules, changed only where this machine differs
(ports, 1 s intervals, the viewer token file). Then:

- the devices arrive through http_sd, with their device, hostname, role and version labels;
- every rule evaluates without error;
- every Prometheus query of every dashboard panel runs through the HTTP API without error,
  and the fleet overview's panels return data, as do the "Device health" rows' panels once the
  devices export the series they read.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from chaos.fleet import MemberSpec, VirtualFleet
from chaos.monitoring_lab import Endpoints, prometheus_config, serve_member_metrics
from tests.chaos.conftest import Releases
from tests.chaos.servers import Fleet, run
from tests.conftest import require_tools
from tests.monitoring.conftest import MONITORING
from tests.server.conftest import SCRAPE_TOKEN, free_port
from updater.metrics import MetricsServer

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


@pytest.fixture(autouse=True)
def prometheus_installed() -> None:
    require_tools(prometheus=Path(PROMETHEUS).exists())


DASHBOARDS = MONITORING / "grafana" / "dashboards"
ROLES = ("camera", "sensor", "gateway")
WAIT_S = 45  # bound on each wait for Prometheus; it normally takes a few seconds
# Overview panels that may rightly be empty on a healthy fleet with no rollout.
MAY_BE_EMPTY = {"Rollout progress", "Active alerts"}
# The "Device health" rows (overview and device) read series some updaters do not export
# (older versions, or a host figure that could not be read): a panel there is empty only while
# no device exports every series it reads.
HEALTH_ROW = "Device health"


@dataclasses.dataclass
class Lab:
    servers: Fleet
    fleet: VirtualFleet
    prometheus: str  # base URL


def wait_for(what: str, check: Any) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            result = check()
        except requests.RequestException:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.5)


def write_prometheus_config(
    lab_dir: Path, servers: Fleet, token_file: Path, port: int, scrape_token: Path
) -> Path:
    """The committed prometheus.yml, pointed at this machine's processes and token files, its
    intervals 15 times shorter (a scrape a second)."""
    endpoints = Endpoints(servers.urls, port, scrape_token, token_file)
    path = lab_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(prometheus_config(lab_dir, endpoints, factor=15)))
    return path


@pytest.fixture
def lab(tmp_path: Path, releases: Releases) -> Iterator[Lab]:
    # the server accepts loopback scrape addresses only when told they are the fleet's; its
    # per-device series go to the scrape token only
    scrape_token = tmp_path / "fleet-metrics-token"
    scrape_token.write_text(SCRAPE_TOKEN + "\n")
    servers = Fleet(
        tmp_path, None, releases,
        server_args=("--metrics-networks", "127.0.0.0/8",
                     "--metrics-token-file", str(scrape_token)),
    )  # fmt: skip
    served: list[MetricsServer] = []
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        token = run("server", "enrollment-token", "create", "--uses", "10", *servers.db_args)
        fleet = VirtualFleet(
            tmp_path / "fleet", [MemberSpec(role=role) for role in ROLES],
            server_urls=servers.urls[:1], server_key=servers.data / "server-key.pub",
            release_key=releases.directory / "release-key.pub",
            enrollment_token=token.splitlines()[0],
        )  # fmt: skip
        served = serve_member_metrics(fleet)
        fleet.step(5)  # enroll, check in, heartbeat (with the metrics address)
        viewer = run("server", "token", "create", "--role", "viewer", "--name", "prometheus",
                     *servers.db_args).splitlines()[0]  # fmt: skip
        token_file = tmp_path / "viewer-token"
        token_file.write_text(viewer + "\n")
        port = free_port()
        config = write_prometheus_config(tmp_path, servers, token_file, port, scrape_token)
        log = (tmp_path / "prometheus.log").open("wb")
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_for("Prometheus ready", lambda: requests.get(url + "/-/ready", timeout=2).ok)
        # Prometheus binds the port itself, chosen a moment before: the answer must be from
        # the Prometheus started here (its configuration file), not whatever took the port
        flags = requests.get(url + "/api/v1/status/flags", timeout=10).json()["data"]
        assert flags["config.file"] == str(config), f"another Prometheus answers on {url}"
        yield Lab(servers, fleet, url)
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        for server in served:
            server.stop()
        for process in servers.processes:
            process.stop()


def api(lab: Lab, path: str, **params: str) -> Any:
    answer = requests.get(lab.prometheus + "/api/v1/" + path, params=params, timeout=10)
    body = answer.json()
    assert answer.ok and body["status"] == "success", (path, params, body)
    return body["data"]


def query(lab: Lab, expr: str) -> list[dict[str, Any]]:
    data = api(lab, "query", query=expr)
    return [data["result"]] if data["resultType"] == "scalar" else list(data["result"])


def since(stamp: str, moment: float) -> bool:
    """Whether Prometheus's RFC 3339 time ``stamp`` is after the Unix time ``moment``."""
    return datetime.fromisoformat(stamp).timestamp() > moment


def scraped_since(lab: Lab, moment: float) -> bool:
    """Every active target (devices, servers, Prometheus) was scraped after ``moment``."""
    active = api(lab, "targets", state="active")["activeTargets"]
    return bool(active) and all(since(t["lastScrape"], moment) for t in active)


def evaluated_since(lab: Lab, moment: float) -> bool:
    """Every rule group was evaluated after ``moment``."""
    groups = api(lab, "rules")["groups"]
    return bool(groups) and all(since(g["lastEvaluation"], moment) for g in groups)


def panel_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(row title, panel title, query) of every Prometheus query, those in a collapsed row
    included; the row title is "" above the first row."""
    row = ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
        for target in [
            *panel.get("targets", []),
            *(t for inner in panel.get("panels") or [] for t in inner.get("targets", [])),
        ]:
            if target.get("datasource", {}).get("type") == "prometheus":
                yield row, panel["title"], target["expr"]


def test_real_prometheus_scrapes_the_fleet_and_runs_every_panel(lab: Lab) -> None:
    members = {member.device_id: member for member in lab.fleet.members}

    def devices_up() -> list[dict[str, Any]]:
        active = api(lab, "targets", state="active")["activeTargets"]
        up = [t for t in active if t["labels"]["job"] == "fleet-devices" and t["health"] == "up"]
        return up if len(up) == len(members) else []

    for target in wait_for("every device scraped through http_sd", devices_up):
        labels = target["labels"]
        member = members[labels["device"]]
        assert labels["hostname"] == member.hostname
        assert labels["version"] == "1.0.0"
        assert labels["instance"].startswith("127.0.0.1:")
        assert set(labels) >= {"device", "hostname", "role", "version", "compatible"}
    wait_for(
        "both server processes scraped",
        lambda: len(query(lab, 'up{job="fleet-server"} == 1')) == 2,
    )
    wait_for(
        "device series with the http_sd labels",
        lambda: len(query(lab, 'fleet_updater_update_state{state="idle"} == 1')) == len(members),
    )
    lab.fleet.step(65)  # a second round of heartbeats, so rates and resets have two samples
    stepped = time.time()
    wait_for("every target scraped after the second round", lambda: scraped_since(lab, stepped))
    scraped = time.time()
    wait_for("every rule group evaluated after them", lambda: evaluated_since(lab, scraped))

    rules = api(lab, "rules")["groups"]
    broken = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"]
              if r["health"] == "err"]  # fmt: skip
    assert not broken
    assert sum(len(g["rules"]) for g in rules) >= 19

    device = next(iter(members))
    empty = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for row, title, expr in panel_queries(dashboard):
            expr = expr.replace("$device", device).replace("$rollout", ".*")
            result = query(lab, expr)  # asserts the query runs without error
            health = row == HEALTH_ROW
            checked = health or (dashboard["uid"] == "fleet-overview" and title not in MAY_BE_EMPTY)
            if result or not checked:
                continue
            series = set(re.findall(r"fleet_updater_\w+", expr))
            if not health or all(query(lab, f"count({name})") for name in series):
                empty.append(f"{dashboard['uid']}: {title}")
    assert not empty, f"fleet panels without data: {empty}"
    devices = query(lab, "sum(max by (state, version) (fleet_devices))")
    assert float(devices[0]["value"][1]) == len(members)
    # the server's per-device series reach Prometheus through the scrape token only
    seen = query(
        lab, 'count(max by (device) (fleet_device_last_seen_age_seconds{job="fleet-server"}))'
    )
    assert float(seen[0]["value"][1]) == len(members)
