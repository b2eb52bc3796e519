"""Generate the Grafana dashboards of deploy/monitoring/grafana/dashboards/ from this code.

Run ``python deploy/monitoring/grafana/generate.py`` after changing a panel and commit the JSON
it writes; ``--check`` exits 1 when the committed JSON differs from what this file generates (a
test runs it). The dashboards are built with Grafana's own typed builders (the
``grafana-foundation-sdk`` package, pinned in the ``test`` extra), so a panel option Grafana does
not know is a type error here rather than a setting Grafana silently ignores. The JSON carries the
schema version the SDK writes; Grafana migrates it forward when it loads a dashboard.

Aggregation: series read from the server's database are reported by every server process,
identically, so they are combined with ``max`` (never ``sum``); per-process counters are summed.
Device series (``fleet_updater_*``) carry the device, hostname and role labels that Prometheus's
HTTP service discovery adds (prometheus.yml), so they are grouped by those.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

try:
    from grafana_foundation_sdk.builders import (
        bargauge,
        dashboard,
        logs,
        loki,
        prometheus,
        stat,
        table,
        timeseries,
    )
    from grafana_foundation_sdk.builders import (
        common as options,
    )
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as model
except ImportError as err:  # a development tool, not installed on devices or servers
    raise SystemExit(
        f"{err.name} is not installed; install the test extra: pip install -e '.[test]'"
    ) from err

OUT = Path(__file__).resolve().parent / "dashboards"
# the data source uids the provisioning (provisioning/datasources/datasources.yml) gives
PROMETHEUS = model.DataSourceRef(type_val="prometheus", uid="prometheus")
LOKI = model.DataSourceRef(type_val="loki", uid="loki")
GRID_WIDTH = 24
MiB = 2**20

PanelBuilder = TypeVar(
    "PanelBuilder", bargauge.Panel, logs.Panel, stat.Panel, table.Panel, timeseries.Panel
)


def query(
    expr: str, legend: str = "", *, instant: bool = False, ref: str = "A"
) -> prometheus.Dataquery:
    """A Prometheus query of a panel: a range query for graphs, an instant one for the rest."""
    target = (
        prometheus.Dataquery()
        .datasource(PROMETHEUS)
        .expr(expr)
        .legend_format(legend or "__auto")
        .ref_id(ref)
    )
    return target.instant() if instant else target.range()


def panel(
    builder: PanelBuilder,
    title: str,
    targets: Sequence[prometheus.Dataquery],
    *,
    unit: str = "short",
    description: str = "",
    thresholds: Sequence[tuple[float | None, str]] = ((None, "green"),),
    limits: tuple[float, float] | None = None,
) -> PanelBuilder:
    """``builder`` with the settings every panel here has: title, queries, unit, thresholds.

    ``thresholds`` are (from value, colour) steps, the first from ``None`` (minus infinity);
    ``limits`` fixes the axis or gauge range, as for a ratio that is always 0..1.
    """
    builder.title(title)
    builder.description(description)
    builder.datasource(PROMETHEUS)
    builder.targets(list(targets))
    builder.unit(unit)
    steps = [model.Threshold(value=value, color=color) for value, color in thresholds]
    builder.thresholds(
        dashboard.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(steps)
    )
    if limits is not None:
        builder.min(limits[0])
        builder.max(limits[1])
    return builder


# The SDK writes "options": null for a panel none of whose options were set; each kind's
# constructor below sets some, so every panel carries its options as an object.
def last_value() -> options.ReduceDataOptions:
    """One value per series, its last one (not one per sample)."""
    return options.ReduceDataOptions().calcs(["lastNotNull"]).values(False)


def stat_panel() -> stat.Panel:
    """A single value per series: the last one."""
    return stat.Panel().reduce_options(last_value())


def bargauge_panel() -> bargauge.Panel:
    """A bar per series, its last value."""
    return bargauge.Panel().reduce_options(last_value())


def table_panel() -> table.Panel:
    return table.Panel().show_header(True)


def timeseries_panel() -> timeseries.Panel:
    """A graph with its legend below and every series in the tooltip."""
    return (
        timeseries.Panel()
        .legend(
            options.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
        )
        .tooltip(
            options.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )


def log_panel(title: str, expr: str) -> logs.Panel:
    """A Loki log panel, newest line first."""
    builder = (
        logs.Panel()
        .show_time(True)
        .wrap_log_message(True)
        .enable_log_details(True)
        .sort_order(common.LogsSortOrder.DESCENDING)
    )
    builder.title(title)
    builder.description("")
    builder.datasource(LOKI)
    builder.targets([loki.Dataquery().datasource(LOKI).expr(expr).ref_id("A")])
    return builder


def variable(
    name: str, label: str, expr: str, *, include_all: bool = False
) -> dashboard.QueryVariable:
    """A variable whose values a Prometheus ``label_values`` query lists, sorted."""
    return (
        dashboard.QueryVariable(name)
        .id(name)  # Grafana tells variables apart by id: one per name
        .label(label)
        .datasource(PROMETHEUS)
        .query({"query": expr, "refId": f"{name}-query"})
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .include_all(include_all)
        .multi(False)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
    )


def link(title: str, url: str) -> dashboard.DashboardLink:
    return dashboard.DashboardLink(title).type(model.DashboardLinkType.LINK).url(url)


class Board:
    """One dashboard: panels placed left to right in the order added; a row heading starts a
    new line, and panel ids follow the same order.

    The SDK starts a new line only once a line's widths reach the grid's width, so the panels
    of a line must add up to it: one that would stick out is refused by :func:`check_grid`.
    """

    def __init__(self, uid: str, title: str) -> None:
        self.builder = (
            dashboard.Dashboard(title)
            .uid(uid)
            .tags(["metrica-fleet"])
            .annotations([])
            .version(1)
            .readonly()
            .tooltip(model.DashboardCursorSync.CROSSHAIR)
            .time("now-6h", "now")
            .refresh("30s")
            .timezone("utc")
        )
        self.next_id = 1

    def add(self, builder: PanelBuilder, width: int, height: int) -> Board:
        builder.id(self.next_id)
        builder.span(width)
        builder.height(height)
        self.builder.with_panel(builder)
        self.next_id += 1
        return self

    def row(self, title: str) -> Board:
        """A row heading; the panels added after it, up to the next row, belong to it.

        The row stays open with its panels after it, not inside it: Grafana shows panels
        nested in a row only while the row is collapsed.
        """
        self.builder.with_row(dashboard.Row(title).id(self.next_id).collapsed(False))
        self.next_id += 1
        return self

    def build(
        self,
        *,
        variables: Sequence[dashboard.QueryVariable] = (),
        links: Sequence[dashboard.DashboardLink] = (),
    ) -> dict[str, Any]:
        """The dashboard's JSON model, as Grafana reads it; raises ValueError on a panel that
        overlaps another or leaves the grid."""
        self.builder.variables(list(variables))
        self.builder.links(list(links))
        board: dict[str, Any] = json.loads(json.dumps(self.builder.build(), cls=JSONEncoder))
        check_grid(board)
        return board


def check_grid(board: dict[str, Any]) -> None:
    """Every panel lies inside the grid's width and no two panels overlap: Grafana would move
    them silently, so a layout mistake here is an error instead."""
    taken: dict[tuple[int, int], str] = {}
    for item in board["panels"]:
        pos, title = item["gridPos"], item.get("title", "")
        if pos["x"] + pos["w"] > GRID_WIDTH:
            raise ValueError(
                f"{board['uid']}: panel {title!r} sticks out of the grid's {GRID_WIDTH} columns"
            )
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                if (x, y) in taken:
                    raise ValueError(
                        f"{board['uid']}: panel {title!r} overlaps panel {taken[(x, y)]!r}"
                    )
                taken[(x, y)] = title


# Fleet series are identical in every server process: max over processes.
DEVICES = "max by (state, version) (fleet_devices)"
TOTAL = "sum(max by (state, version) (fleet_devices))"


def links() -> list[dashboard.DashboardLink]:
    return [
        link("Fleet overview", "/d/fleet-overview"),
        link("Device", "/d/fleet-device"),
        link("Rollouts", "/d/fleet-rollouts"),
    ]


def fleet_overview() -> dict[str, Any]:
    # the fleet guard's rule: unhealthy = in safe mode, or failed in an active rollout
    health = f"1 - max(fleet_devices_unhealthy) / {TOTAL}"
    board = Board("fleet-overview", "Fleet overview")
    board.add(
        panel(
            stat_panel(),
            "Health",
            [query(health, "healthy", instant=True)],
            unit="percentunit",
            description="Devices neither in safe mode nor failed in "
            "an active rollout. Below 80 % the fleet guard stops every update.",
            thresholds=[(None, "red"), (0.8, "orange"), (0.95, "green")],
        ),
        4,
        5,
    )
    board.add(panel(stat_panel(), "Devices", [query(TOTAL, "devices", instant=True)]), 4, 5)
    board.add(
        panel(
            stat_panel().color_mode(common.BigValueColorMode.BACKGROUND),
            "Emergency stop",
            [query("max(fleet_emergency_stop)", "stop", instant=True)],
            thresholds=[(None, "green"), (1, "red")],
        ),
        4,
        5,
    )
    board.add(
        panel(
            stat_panel(),
            "Running rollouts",
            [query('max(fleet_rollouts{state="running"})', "running", instant=True)],
        ),
        4,
        5,
    )
    board.add(
        panel(
            stat_panel(),
            "Firing alerts",
            [
                query(
                    'count(ALERTS{alertstate="firing", alertname!="Watchdog"}) or vector(0)',
                    "alerts",
                    instant=True,
                )
            ],
            thresholds=[(None, "green"), (1, "red")],
        ),
        4,
        5,
    )
    board.add(
        panel(
            stat_panel(),
            "Offline > 5 min",
            [
                query(
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
    )
    board.add(
        panel(
            timeseries_panel(),
            "Devices by state",
            [query("sum by (state) (" + DEVICES + ")", "{{state}}")],
        ),
        12,
        8,
    )
    board.add(
        panel(
            timeseries_panel(),
            "Devices by version",
            [query("sum by (version) (" + DEVICES + ")", "{{version}}")],
        ),
        12,
        8,
    )
    board.add(
        panel(
            bargauge_panel(),
            "Rollout progress",
            [
                query(
                    "sum by (rollout, version, outcome) (max by (rollout, version, stage, "
                    "outcome) (fleet_rollout_devices))",
                    "rollout {{rollout}} ({{version}}) {{outcome}}",
                    instant=True,
                )
            ],
        ),
        12,
        8,
    )
    board.add(
        panel(
            table_panel(),
            "Active alerts",
            [query('ALERTS{alertstate="firing", alertname!="Watchdog"}', instant=True)],
        ),
        12,
        8,
    )
    board.add(
        panel(
            timeseries_panel(),
            "Last contact (slowest devices)",
            [
                query(
                    "topk(10, max by (hostname) (fleet_device_last_seen_age_seconds))",
                    "{{hostname}}",
                )
            ],
            unit="s",
        ),
        12,
        8,
    )
    board.add(
        panel(
            timeseries_panel(),
            "Server requests by status",
            [query("sum by (status) (rate(fleet_server_requests_total[5m]))", "{{status}}")],
            unit="reqps",
        ),
        12,
        8,
    )
    fleet_health(board)
    return board.build(links=links())


def throttled_now(expr: str) -> str:
    """1 where the firmware's get_throttled bits ``expr`` say under-voltage, a capped
    frequency, throttling or the soft temperature limit now (bits 0-3), else 0."""
    return f"{expr} % 16 > bool 0"


def throttled_since_boot(expr: str) -> str:
    """1 where any of the same four happened since boot (bits 16-19), else 0."""
    return f"floor({expr} / 65536) % 16 > bool 0"


TOP = 10  # devices in each fleet-wide health panel


def fleet_health(board: Board) -> None:
    """The fleet-wide "Device health" row: the devices worst off, from their own exporters."""
    board.row("Device health")
    board.add(
        panel(
            stat_panel().color_mode(common.BigValueColorMode.BACKGROUND),
            "Under-voltage now",
            [
                query(
                    "count(max by (device) (fleet_updater_under_voltage) == 1) or vector(0)",
                    "devices",
                    instant=True,
                )
            ],
            description="Devices whose power supply is below what the board needs now. "
            "Their updates wait until it recovers (DeviceUnderVoltage).",
            thresholds=[(None, "green"), (1, "red")],
        ),
        12,
        4,
    )
    board.add(
        panel(
            stat_panel(),
            "Throttled or capped since boot",
            [
                query(
                    "count("
                    + throttled_since_boot("max by (device) (fleet_updater_throttled)")
                    + " == 1) or vector(0)",
                    "devices",
                    instant=True,
                )
            ],
            description="Devices whose firmware reported under-voltage, a capped frequency, "
            "throttling or the soft temperature limit at least once since boot.",
            thresholds=[(None, "green"), (1, "orange")],
        ),
        12,
        4,
    )
    board.add(
        panel(
            timeseries_panel(),
            "CPU usage (busiest devices)",
            [
                query(
                    f"topk({TOP}, max by (hostname) (fleet_updater_cpu_usage_ratio))",
                    "{{hostname}}",
                )
            ],
            unit="percentunit",
            limits=(0, 1),
            thresholds=[(None, "green"), (0.9, "orange")],
        ),
        12,
        8,
    )
    board.add(
        panel(
            timeseries_panel(),
            "Memory available (lowest)",
            [
                query(
                    f"bottomk({TOP}, max by (hostname) (fleet_updater_memory_available_bytes) "
                    "/ max by (hostname) (fleet_updater_memory_total_bytes))",
                    "{{hostname}}",
                )
            ],
            unit="percentunit",
            limits=(0, 1),
            description="Memory available to new work (MemAvailable), as a share of the "
            "device's memory.",
            thresholds=[(None, "red"), (0.1, "orange"), (0.2, "green")],
        ),
        12,
        8,
    )
    board.add(
        panel(
            timeseries_panel(),
            "Disk free (lowest)",
            [
                query(
                    f"bottomk({TOP}, max by (hostname) (fleet_updater_free_space_bytes) "
                    "/ max by (hostname) (fleet_updater_disk_size_bytes))",
                    "{{hostname}}",
                )
            ],
            unit="percentunit",
            limits=(0, 1),
            description="Free space of the data partition, as a share of its size.",
            thresholds=[(None, "red"), (0.1, "orange"), (0.2, "green")],
        ),
        12,
        8,
    )
    board.add(
        panel(
            timeseries_panel(),
            "Network throughput (busiest devices)",
            [
                query(
                    f"topk({TOP}, sum by (hostname) "
                    "(rate(fleet_updater_network_receive_bytes_total[5m]) "
                    "+ rate(fleet_updater_network_transmit_bytes_total[5m])))",
                    "{{hostname}}",
                )
            ],
            unit="Bps",
            description="Bytes received and sent per second, all interfaces but loopback.",
        ),
        12,
        8,
    )


def by_device(metric: str) -> str:
    return f'max by (hostname) ({metric}{{device="$device"}})'


def fleet_device() -> dict[str, Any]:
    board = Board("fleet-device", "Fleet device")
    board.add(
        panel(
            table_panel(),
            "Device",
            [
                query(
                    "max by (hostname, role, compatible, version, state) "
                    '(fleet_device_info{device="$device"})',
                    instant=True,
                )
            ],
        ),
        16,
        4,
    )
    board.add(
        panel(
            stat_panel(),
            "Last contact",
            [query(by_device("fleet_device_last_seen_age_seconds"), instant=True)],
            unit="s",
            thresholds=[(None, "green"), (300, "orange"), (900, "red")],
        ),
        8,
        4,
    )
    board.add(
        panel(
            table_panel(),
            "Slots",
            [
                query(
                    'max by (slot, status, version) (fleet_device_slot_info{device="$device"})',
                    instant=True,
                )
            ],
        ),
        12,
        6,
    )
    board.add(
        panel(
            timeseries_panel(),
            "Boots and fallbacks",
            [
                query(
                    'max by (hostname) (resets(fleet_device_uptime_seconds{device="$device"}[1h]))',
                    "boots",
                    ref="A",
                ),
                query(
                    # stored events, from the database: the same in every server process,
                    # and 0 before the first, so the first one shows too
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
    )
    board.add(
        panel(
            timeseries_panel(),
            "Temperature",
            [query(by_device("fleet_device_temperature_celsius"), "heartbeat")],
            unit="celsius",
            thresholds=[(None, "green"), (70, "orange"), (80, "red")],
        ),
        8,
        7,
    )
    board.add(
        panel(
            timeseries_panel(),
            "Free space (data partition)",
            [query(by_device("fleet_device_free_space_bytes"), "free")],
            unit="bytes",
            thresholds=[(None, "red"), (500 * MiB, "green")],
        ),
        8,
        7,
    )
    board.add(
        panel(
            timeseries_panel(),
            "Clock skew",
            [query(by_device("fleet_device_clock_skew_seconds"), "server - device")],
            unit="s",
        ),
        8,
        7,
    )
    board.add(
        panel(
            timeseries_panel(),
            "Update history",
            [
                query(
                    'max by (version) (fleet_device_info{device="$device"})',
                    "{{version}}",
                    ref="A",
                ),
                query(
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
    )
    device_health(board)
    board.row("Logs")
    board.add(log_panel("Logs", '{device="$device"}'), 24, 12)
    return board.build(
        variables=[variable("device", "Device", "label_values(fleet_device_info, device)")],
        links=[
            *links(),
            link(
                "Logs in Explore (Loki)",
                '/explore?left={"datasource":"loki","queries":[{"refId":"A",'
                '"expr":"{device=\\"${device}\\"}"}]}',
            ),
        ],
    )


def device_health(board: Board) -> None:
    """The selected device's "Device health" row, read from its own exporter (so only devices
    Prometheus can scrape show it)."""
    board.row("Device health")
    board.add(
        panel(
            timeseries_panel(),
            "CPU usage",
            [query(by_device("fleet_updater_cpu_usage_ratio"), "busy")],
            unit="percentunit",
            limits=(0, 1),
            thresholds=[(None, "green"), (0.9, "orange")],
        ),
        8,
        7,
    )
    board.add(
        panel(
            timeseries_panel(),
            "Memory",
            [
                query(by_device("fleet_updater_memory_available_bytes"), "available", ref="A"),
                query(by_device("fleet_updater_memory_total_bytes"), "total", ref="B"),
            ],
            unit="bytes",
        ),
        8,
        7,
    )
    board.add(
        panel(
            timeseries_panel(),
            "Disk (data partition)",
            [
                query(by_device("fleet_updater_free_space_bytes"), "free", ref="A"),
                query(by_device("fleet_updater_disk_size_bytes"), "size", ref="B"),
            ],
            unit="bytes",
        ),
        8,
        7,
    )
    board.add(
        panel(
            timeseries_panel(),
            "Network",
            [
                query(
                    "max by (interface) (rate(fleet_updater_network_receive_bytes_total"
                    '{device="$device"}[5m]))',
                    "{{interface}} received",
                    ref="A",
                ),
                query(
                    "max by (interface) (rate(fleet_updater_network_transmit_bytes_total"
                    '{device="$device"}[5m]))',
                    "{{interface}} sent",
                    ref="B",
                ),
            ],
            unit="Bps",
        ),
        12,
        7,
    )
    throttled = by_device("fleet_updater_throttled")
    board.add(
        panel(
            timeseries_panel(),
            "Power and throttling",
            [
                query(by_device("fleet_updater_under_voltage"), "under-voltage now", ref="A"),
                query(throttled_now(throttled), "any of them now", ref="B"),
                query(throttled_since_boot(throttled), "any since boot", ref="C"),
            ],
            description="1 while the firmware reports it. An install waits while the device "
            "is under-voltage now; what happened earlier since boot does not hold it back.",
            limits=(0, 1),
            thresholds=[(None, "green"), (1, "red")],
        ),
        12,
        7,
    )


def fleet_rollouts() -> dict[str, Any]:
    rollout = 'rollout=~"$rollout"'
    board = Board("fleet-rollouts", "Rollouts")
    board.add(
        panel(
            table_panel(),
            "Unfinished rollouts",
            [query("max by (rollout, version, state) (fleet_rollout_state)", instant=True)],
        ),
        12,
        6,
    )
    board.add(
        panel(
            stat_panel(),
            "Rollouts by state",
            [query("max by (state) (fleet_rollouts)", "{{state}}", instant=True)],
        ),
        12,
        6,
    )
    board.add(
        panel(
            bargauge_panel(),
            "Stage",
            [
                query(
                    f"max by (rollout, version, stage) (fleet_rollout_stage{{{rollout}}}) + 1",
                    "rollout {{rollout}}: {{stage}}",
                    instant=True,
                )
            ],
            description="Current stage, counted from 1, of the rollout's stages.",
        ),
        8,
        7,
    )
    board.add(
        panel(
            bargauge_panel(),
            "Devices by stage and outcome",
            [
                query(
                    f"max by (stage, outcome) (fleet_rollout_devices{{{rollout}}})",
                    "{{stage}} {{outcome}}",
                    instant=True,
                )
            ],
        ),
        16,
        7,
    )
    board.add(
        panel(
            timeseries_panel(),
            "Outcomes over time",
            [
                query(
                    f"sum by (outcome) (max by (rollout, stage, outcome) "
                    f"(fleet_rollout_devices{{{rollout}}}))",
                    "{{outcome}}",
                )
            ],
        ),
        12,
        8,
    )
    board.add(
        panel(
            timeseries_panel(),
            "Devices assigned by version",
            [query("max by (version) (fleet_devices_assigned)", "{{version}}")],
        ),
        12,
        8,
    )
    board.add(
        panel(
            table_panel(),
            "Devices still updating",
            [
                query(
                    f"max by (hostname, device, version) "
                    f"(fleet_device_update_pending_seconds{{{rollout}}})",
                    instant=True,
                )
            ],
            unit="s",
        ),
        24,
        8,
    )
    board.add(log_panel("Rollout engine", '{component="server"} |= "rollout"'), 24, 8)
    return board.build(
        variables=[
            variable(
                "rollout", "Rollout", "label_values(fleet_rollout_state, rollout)", include_all=True
            )
        ],
        links=links(),
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
