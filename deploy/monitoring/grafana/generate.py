"""Generate the Grafana dashboards of deploy/monitoring/grafana/dashboards/ from this code.

Run ``python deploy/monitoring/grafana/generate.py`` after changing a panel and commit the JSON
it writes; ``--check`` exits 1 when the committed JSON differs from what this file generates (a
test runs it). The JSON model is Grafana's dashboard schema at :data:`SCHEMA_VERSION`, so a
Grafana upgrade never migrates these files silently.

Aggregation: series read from the server's database are reported by every server process,
identically, so they are combined with ``max`` (never ``sum``); per-process counters are summed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 39
OUT = Path(__file__).resolve().parent / "dashboards"
PROMETHEUS = {"type": "prometheus", "uid": "prometheus"}
LOKI = {"type": "loki", "uid": "loki"}
GRID_WIDTH = 24


class Layout:
    """Places panels left to right, wrapping at the grid's width; ids in order."""

    def __init__(self) -> None:
        self.x = self.y = self.row_height = 0
        self.next_id = 1

    def place(self, panel: dict[str, Any], width: int, height: int) -> dict[str, Any]:
        if self.x + width > GRID_WIDTH:
            self.x, self.y, self.row_height = 0, self.y + self.row_height, 0
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": width, "h": height}
        panel["id"] = self.next_id
        self.next_id += 1
        self.x += width
        self.row_height = max(self.row_height, height)
        return panel


def target(expr: str, legend: str = "", *, instant: bool = False, ref: str = "A") -> dict[str, Any]:
    return {
        "datasource": PROMETHEUS,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "instant": instant,
        "range": not instant,
        "refId": ref,
    }


def panel(
    kind: str,
    title: str,
    targets: list[dict[str, Any]],
    *,
    unit: str = "short",
    description: str = "",
    thresholds: list[tuple[float | None, str]] | None = None,
    options: dict[str, Any] | None = None,
    datasource: dict[str, str] = PROMETHEUS,
) -> dict[str, Any]:
    steps = [{"value": value, "color": color} for value, color in thresholds or [(None, "green")]]
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": datasource,
        "targets": targets,
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": options or {},
    }


def logs(title: str, expr: str) -> dict[str, Any]:
    return panel(
        "logs",
        title,
        [{"datasource": LOKI, "expr": expr, "refId": "A"}],
        datasource=LOKI,
        options={"showTime": True, "wrapLogMessage": True, "sortOrder": "Descending"},
    )


def variable(name: str, label: str, query: str, *, include_all: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": PROMETHEUS,
        "query": {"query": query, "refId": f"{name}-query"},
        "definition": query,
        "refresh": 2,
        "includeAll": include_all,
        "multi": False,
        "sort": 1,
    }


def dashboard(
    uid: str,
    title: str,
    panels: list[tuple[dict[str, Any], int, int]],
    *,
    variables: list[dict[str, Any]] | None = None,
    links: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    layout = Layout()
    return {
        "uid": uid,
        "title": title,
        "tags": ["metrica-fleet"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": False,
        "graphTooltip": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "utc",
        "templating": {"list": variables or []},
        "annotations": {"list": []},
        "links": links or [],
        "panels": [layout.place(p, w, h) for p, w, h in panels],
    }


# Fleet series are identical in every server process: max over processes.
DEVICES = "max by (state, version) (fleet_devices)"
TOTAL = "sum(max by (state, version) (fleet_devices))"
LINKS = [
    {"title": "Fleet overview", "type": "link", "url": "/d/fleet-overview"},
    {"title": "Device", "type": "link", "url": "/d/fleet-device"},
    {"title": "Rollouts", "type": "link", "url": "/d/fleet-rollouts"},
]


def fleet_overview() -> dict[str, Any]:
    # the fleet guard's rule: unhealthy = in safe mode, or failed in an active rollout
    health = f"1 - max(fleet_devices_unhealthy) / {TOTAL}"
    return dashboard(
        "fleet-overview",
        "Fleet overview",
        [
            (
                panel(
                    "stat",
                    "Health",
                    [target(health, "healthy", instant=True)],
                    unit="percentunit",
                    description="Devices neither in safe mode nor failed in "
                    "an active rollout. Below 80 % the fleet guard stops every update.",
                    thresholds=[(None, "red"), (0.8, "orange"), (0.95, "green")],
                ),
                4,
                5,
            ),
            (panel("stat", "Devices", [target(TOTAL, "devices", instant=True)]), 4, 5),
            (
                panel(
                    "stat",
                    "Emergency stop",
                    [target("max(fleet_emergency_stop)", "stop", instant=True)],
                    thresholds=[(None, "green"), (1, "red")],
                    options={"colorMode": "background"},
                ),
                4,
                5,
            ),
            (
                panel(
                    "stat",
                    "Running rollouts",
                    [target('max(fleet_rollouts{state="running"})', "running", instant=True)],
                ),
                4,
                5,
            ),
            (
                panel(
                    "stat",
                    "Firing alerts",
                    [
                        target(
                            'count(ALERTS{alertstate="firing", alertname!="Watchdog"})'
                            " or vector(0)",
                            "alerts",
                            instant=True,
                        )
                    ],
                    thresholds=[(None, "green"), (1, "red")],
                ),
                4,
                5,
            ),
            (
                panel(
                    "stat",
                    "Offline > 5 min",
                    [
                        target(
                            "count(max by (device) (fleet_device_last_seen_age_seconds) > 300) "
                            "or vector(0)",
                            "offline",
                            instant=True,
                        )
                    ],
                    thresholds=[(None, "green"), (1, "orange")],
                ),
                4,
                5,
            ),
            (
                panel(
                    "timeseries",
                    "Devices by state",
                    [target("sum by (state) (" + DEVICES + ")", "{{state}}")],
                ),
                12,
                8,
            ),
            (
                panel(
                    "timeseries",
                    "Devices by version",
                    [target("sum by (version) (" + DEVICES + ")", "{{version}}")],
                ),
                12,
                8,
            ),
            (
                panel(
                    "bargauge",
                    "Rollout progress",
                    [
                        target(
                            "sum by (rollout, version, outcome) (max by (rollout, version, stage, "
                            "outcome) (fleet_rollout_devices))",
                            "rollout {{rollout}} ({{version}}) {{outcome}}",
                            instant=True,
                        )
                    ],
                ),
                12,
                8,
            ),
            (
                panel(
                    "table",
                    "Active alerts",
                    [target('ALERTS{alertstate="firing", alertname!="Watchdog"}', instant=True)],
                ),
                12,
                8,
            ),
            (
                panel(
                    "timeseries",
                    "Last contact (slowest devices)",
                    [
                        target(
                            "topk(10, max by (hostname) (fleet_device_last_seen_age_seconds))",
                            "{{hostname}}",
                        )
                    ],
                    unit="s",
                ),
                12,
                8,
            ),
            (
                panel(
                    "timeseries",
                    "Server requests by status",
                    [
                        target(
                            "sum by (status) (rate(fleet_server_requests_total[5m]))", "{{status}}"
                        )
                    ],
                    unit="reqps",
                ),
                12,
                8,
            ),
        ],
        links=LINKS,
    )


def by_device(metric: str) -> str:
    return f'max by (hostname) ({metric}{{device="$device"}})'


def fleet_device() -> dict[str, Any]:
    return dashboard(
        "fleet-device",
        "Fleet device",
        [
            (
                panel(
                    "table",
                    "Device",
                    [
                        target(
                            "max by (hostname, role, compatible, version, state) "
                            '(fleet_device_info{device="$device"})',
                            instant=True,
                        )
                    ],
                ),
                16,
                4,
            ),
            (
                panel(
                    "stat",
                    "Last contact",
                    [target(by_device("fleet_device_last_seen_age_seconds"), instant=True)],
                    unit="s",
                    thresholds=[(None, "green"), (300, "orange"), (900, "red")],
                ),
                8,
                4,
            ),
            (
                panel(
                    "table",
                    "Slots",
                    [
                        target(
                            "max by (slot, status, version) "
                            '(fleet_device_slot_info{device="$device"})',
                            instant=True,
                        )
                    ],
                ),
                12,
                6,
            ),
            (
                panel(
                    "timeseries",
                    "Boots and fallbacks",
                    [
                        target(
                            "max by (hostname) "
                            '(resets(fleet_device_uptime_seconds{device="$device"}[1h]))',
                            "boots",
                            ref="A",
                        ),
                        target(
                            # stored events, from the database: the same in every server
                            # process, and 0 before the first, so the first one shows too
                            "max by (event) (increase(fleet_device_outcome_events_total"
                            '{device="$device"}[1h]))',
                            "{{event}}",
                            ref="B",
                        ),
                    ],
                    description="Boots: resets of the reported uptime; events: boot-check "
                    "outcomes, failed installs and crash loops reported by the device.",
                ),
                12,
                6,
            ),
            (
                panel(
                    "timeseries",
                    "Temperature",
                    [
                        target(by_device("fleet_device_temperature_celsius"), "heartbeat"),
                    ],
                    unit="celsius",
                    thresholds=[(None, "green"), (70, "orange"), (80, "red")],
                ),
                8,
                7,
            ),
            (
                panel(
                    "timeseries",
                    "Free space (data partition)",
                    [
                        target(by_device("fleet_device_free_space_bytes"), "free"),
                    ],
                    unit="bytes",
                    thresholds=[(None, "red"), (500 * 2**20, "green")],
                ),
                8,
                7,
            ),
            (
                panel(
                    "timeseries",
                    "Clock skew",
                    [
                        target(by_device("fleet_device_clock_skew_seconds"), "server - device"),
                    ],
                    unit="s",
                ),
                8,
                7,
            ),
            (
                panel(
                    "timeseries",
                    "Update history",
                    [
                        target(
                            'max by (version) (fleet_device_info{device="$device"})',
                            "{{version}}",
                            ref="A",
                        ),
                        target(
                            "max by (rollout, version) (fleet_device_update_pending_seconds"
                            '{device="$device"})',
                            "pending {{version}} (rollout {{rollout}})",
                            ref="B",
                        ),
                    ],
                    description="Which version the device ran when, and how long each assigned "
                    "release has been pending.",
                ),
                24,
                7,
            ),
            (logs("Logs", '{device="$device"}'), 24, 12),
        ],
        variables=[
            variable("device", "Device", "label_values(fleet_device_info, device)"),
        ],
        links=[
            *LINKS,
            {
                "title": "Logs in Explore (Loki)",
                "type": "link",
                "url": '/explore?left={"datasource":"loki","queries":[{"refId":"A",'
                '"expr":"{device=\\"${device}\\"}"}]}',
            },
        ],
    )


def fleet_rollouts() -> dict[str, Any]:
    rollout = 'rollout=~"$rollout"'
    return dashboard(
        "fleet-rollouts",
        "Rollouts",
        [
            (
                panel(
                    "table",
                    "Unfinished rollouts",
                    [
                        target(
                            "max by (rollout, version, state) (fleet_rollout_state)", instant=True
                        )
                    ],
                ),
                12,
                6,
            ),
            (
                panel(
                    "stat",
                    "Rollouts by state",
                    [target("max by (state) (fleet_rollouts)", "{{state}}", instant=True)],
                ),
                12,
                6,
            ),
            (
                panel(
                    "bargauge",
                    "Stage",
                    [
                        target(
                            "max by (rollout, version, stage) "
                            f"(fleet_rollout_stage{{{rollout}}}) + 1",
                            "rollout {{rollout}}: {{stage}}",
                            instant=True,
                        )
                    ],
                    description="Current stage, counted from 1, of the rollout's stages.",
                ),
                8,
                7,
            ),
            (
                panel(
                    "bargauge",
                    "Devices by stage and outcome",
                    [
                        target(
                            f"max by (stage, outcome) (fleet_rollout_devices{{{rollout}}})",
                            "{{stage}} {{outcome}}",
                            instant=True,
                        )
                    ],
                ),
                16,
                7,
            ),
            (
                panel(
                    "timeseries",
                    "Outcomes over time",
                    [
                        target(
                            f"sum by (outcome) (max by (rollout, stage, outcome) "
                            f"(fleet_rollout_devices{{{rollout}}}))",
                            "{{outcome}}",
                        )
                    ],
                ),
                12,
                8,
            ),
            (
                panel(
                    "timeseries",
                    "Devices assigned by version",
                    [target("max by (version) (fleet_devices_assigned)", "{{version}}")],
                ),
                12,
                8,
            ),
            (
                panel(
                    "table",
                    "Devices still updating",
                    [
                        target(
                            f"max by (hostname, device, version) "
                            f"(fleet_device_update_pending_seconds{{{rollout}}})",
                            instant=True,
                        )
                    ],
                    unit="s",
                ),
                24,
                8,
            ),
            (logs("Rollout engine", '{component="server"} |= "rollout"'), 24, 8),
        ],
        variables=[
            variable(
                "rollout", "Rollout", "label_values(fleet_rollout_state, rollout)", include_all=True
            ),
        ],
        links=LINKS,
    )


DASHBOARDS = {
    "fleet-overview.json": fleet_overview,
    "fleet-device.json": fleet_device,
    "fleet-rollouts.json": fleet_rollouts,
}


def rendered() -> Iterator[tuple[Path, str]]:
    for name, build in DASHBOARDS.items():
        yield OUT / name, json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered():
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date (run {Path(__file__).name}): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
