"""Every metric a rule or a dashboard reads is one our code exports (or Prometheus's own)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import cast

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from server.database import Database
from server.metrics import FleetCollector, ServerMetrics
from tests.monitoring.conftest import MONITORING, alert_rules
from updater.metrics import UpdaterMetrics

# Series Prometheus makes itself: scrape health and the alerts.
PROMETHEUS_OWN = {"up", "ALERTS"}
NAME = re.compile(r"\b(fleet_[a-z0-9_]+|up|ALERTS)\b")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "info": ("_info",)}


def sample_names(families: Iterable[Metric]) -> set[str]:
    names = set()
    for family in families:
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def exported() -> set[str]:
    """Sample names of every series the server and the updater can export. Nothing here
    touches a database: describing the fleet collector does not query."""
    no_database = cast(Database, None)
    updater = CollectorRegistry()
    UpdaterMetrics(updater)
    server = ServerMetrics(no_database, lambda: 0.0)
    counted = (server.requests, server.latency, server.events, server.outcomes, server.uploads)
    return (
        sample_names(iter(updater.collect()))
        | sample_names(iter(FleetCollector(no_database, lambda: 0.0).describe()))
        | sample_names(family for metric in counted for family in metric.describe())
    )


def used() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in NAME.findall(rule["expr"]):
            found.setdefault(name, set()).add(f"rule {rule['alert']}")
    for path in sorted((MONITORING / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                if target["datasource"]["type"] == "prometheus":
                    for name in NAME.findall(target["expr"]):
                        found.setdefault(name, set()).add(f"{path.name}: {panel['title']}")
    return found


def test_every_metric_used_is_exported() -> None:
    known = exported() | PROMETHEUS_OWN
    missing = {name: sorted(where) for name, where in used().items() if name not in known}
    assert not missing


def test_the_rules_and_dashboards_read_both_sides() -> None:
    names = set(used())
    assert any(n.startswith("fleet_updater_") for n in names)  # scraped devices
    assert any(n.startswith("fleet_device_") for n in names)  # the server's view of them
