"""The alert rules under promtool: valid, documented, and timed.

Every alert has at least one case of input series. Each case runs three ways, 30 s apart for
20 minutes (the interval of ``evaluation_interval`` in prometheus.yml):

- **bad**: healthy for 5 minutes, then the failure from 5m on. The alert must not fire before
  5m and must be firing at 8m: within 3 minutes of the condition.
- **healthy**: healthy values throughout; the alert never fires.
- **blip**: the failure for one minute only (two samples, 5m and 5m30s); it never fires.

A value of ``None`` is an absent series; a series that disappears gets a staleness marker, as
Prometheus writes when a target stops exporting it.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.monitoring.conftest import RULES, RUNBOOKS, alert_rules

pytestmark = pytest.mark.usefixtures("promtool")

SAMPLES = 41  # 0 .. 20m every 30 s
START = 10  # the condition starts at sample 10 (5m)
BLIP = 2  # samples of a one-minute blip
Value = float | None

SERVER = 'job="fleet-server", instance="server-1:8080"'
DEVICE = 'device="d1", hostname="cam-1"'
SCRAPED = 'job="fleet-devices", instance="10.0.0.5:9101", role="camera", version="1.0.0"'


@dataclass(frozen=True)
class Series:
    selector: str
    healthy: Value
    bad: Value

    def values(self, variant: str) -> str:
        during = {"healthy": 0, "bad": SAMPLES - START, "blip": BLIP}[variant]
        points = [
            self.bad if START <= index < START + during else self.healthy
            for index in range(SAMPLES)
        ]
        words, present = [], False
        for point in points:
            if point is None:
                words.append("stale" if present else "_")
            else:
                words.append(repr(float(point)))
            present = point is not None
        return " ".join(words)


@dataclass(frozen=True)
class Case:
    alert: str
    series: tuple[Series, ...]
    blip: bool = True  # False: an event, not a state; once it happened, it happened
    healthy: bool = True  # False: fires by design whatever the series (the watchdog)

    @property
    def id(self) -> str:
        return self.alert


def server(name: str, healthy: Value, bad: Value, labels: str = "") -> Series:
    return Series(f"{name}{{{SERVER}, {DEVICE}{labels}}}", healthy, bad)


def scraped(name: str, healthy: Value, bad: Value, labels: str = "") -> Series:
    return Series(f"{name}{{{SCRAPED}, {DEVICE}{labels}}}", healthy, bad)


def info(state: str, healthy: Value, bad: Value) -> Series:
    labels = f', role="camera", compatible="metrica-rpi4", version="1.0.0", state="{state}"'
    return server("fleet_device_info", healthy, bad, labels)


def ages(*pairs: tuple[Value, Value]) -> tuple[Series, ...]:
    return tuple(
        Series(
            f'fleet_device_last_seen_age_seconds{{{SERVER}, device="d{i}", hostname="cam-{i}"}}',
            healthy,
            bad,
        )
        for i, (healthy, bad) in enumerate(pairs)
    )


ROLLOUT = ', rollout="3", version="2.0.0"'
FELL_BACK = "fleet_device_outcome_events_total"
MIB = 2**20

CASES = [
    Case("FleetServerDown", (Series(f"up{{{SERVER}}}", 1, 0),)),
    Case("FleetServerUnreachable", ages((30, 400), (30, 400), (30, 400), (30, 30))),
    Case("DeviceServerUnreachable", (scraped("fleet_updater_server_unreachable_seconds", 0, 240),)),
    Case("DeviceOffline", ages((40, 400))),
    Case("NetworkPartition", ages((400, 1000))),  # offline, but not yet 15 minutes
    Case("AgentCrashLoop", (scraped("fleet_updater_crash_loop_restarts", 1, 4),)),
    Case("AgentCrashLoop", (info("idle", 1, None), info("suspended", None, 1))),
    Case("DeviceDiskLow", (server("fleet_device_free_space_bytes", 2048 * MIB, 400 * MIB),)),
    Case(
        "DeviceDiskLow",
        (scraped("fleet_updater_free_space_bytes", 600 * MIB, 499 * MIB, ', path="/data"'),),
    ),
    Case("DeviceOverheating", (server("fleet_device_temperature_celsius", 62, 85),)),
    Case("DeviceOverheating", (scraped("fleet_updater_temperature_celsius", 79.9, 80.5),)),
    Case("DeviceUnderVoltage", (server("fleet_device_under_voltage", 0, 1),)),
    Case("DeviceUnderVoltage", (scraped("fleet_updater_under_voltage", 0, 1),)),
    Case("DeviceUnderVoltage", (scraped("fleet_updater_under_voltage", None, 1),)),  # not a Pi
    Case("DeviceInSafeMode", (info("idle", 1, None), info("safe_mode", None, 1))),
    Case(
        "DeviceFellBack", (server(FELL_BACK, 0, 1, ', event="boot_check.fell_back"'),), blip=False
    ),
    Case("ClockSkew", (server("fleet_device_clock_skew_seconds", 2, -300),)),
    Case("ConfigDrift", (scraped("fleet_updater_config_drift", 0, 1),)),
    Case("ConfigDrift", (scraped("fleet_updater_config_problems", 0, 1),)),
    Case(
        "CanaryFailed",
        (
            Series(
                f'fleet_rollout_devices{{{SERVER}{ROLLOUT}, stage="canary", outcome="failed"}}',
                0,
                1,
            ),
        ),
    ),
    Case(
        "RolloutHalted",
        (
            Series(f'fleet_rollout_state{{{SERVER}{ROLLOUT}, state="running"}}', 1, None),
            Series(f'fleet_rollout_state{{{SERVER}{ROLLOUT}, state="halted"}}', None, 1),
        ),
    ),
    Case("UpdateStuck", (server("fleet_device_update_pending_seconds", 300, 1000, ROLLOUT),)),
    Case(
        "FleetWideFailure",
        tuple(
            series
            for instance in ("server-1:8080", "server-2:8080")  # two processes, one database
            for series in (
                Series(f'fleet_devices{{instance="{instance}", state="idle"}}', 9, 7),
                Series(f'fleet_devices{{instance="{instance}", state="safe_mode"}}', 1, 3),
                Series(f'fleet_devices_unhealthy{{instance="{instance}"}}', 1, 3),
            )
        ),
    ),
    Case("EmergencyStopActive", (Series(f"fleet_emergency_stop{{{SERVER}}}", 0, 1),)),
    Case("Watchdog", (), blip=False, healthy=False),
    Case("MonitoringTargetDown", (Series('up{job="loki", instance="loki:3100"}', 1, 0),)),
]


def firing(alert: str) -> str:
    return f'ALERTS{{alertname="{alert}", alertstate="firing"}}'


def unit_tests(case: Case) -> list[dict[str, Any]]:
    """promtool's test cases for ``case``: bad, and (where they apply) healthy and blip."""
    ever = f"count(count_over_time({firing(case.alert)}[20m]))"
    variants = ["bad"] + ["healthy"] * case.healthy + ["blip"] * case.blip
    tests = []
    for variant in variants:
        checks: list[dict[str, Any]]
        if variant == "bad":
            checks = [{"expr": f"max({firing(case.alert)})", "eval_time": "8m",
                       "exp_samples": [{"labels": "{}", "value": 1}]}]  # fmt: skip
            if case.healthy:
                before = f"count(count_over_time({firing(case.alert)}[5m]))"
                checks.append({"expr": before, "eval_time": "4m30s", "exp_samples": []})
        else:
            checks = [{"expr": ever, "eval_time": "20m", "exp_samples": []}]
        tests.append(
            {
                "name": f"{case.alert} {variant}",
                "interval": "30s",
                "input_series": [
                    {"series": s.selector, "values": s.values(variant)} for s in case.series
                ],
                "promql_expr_test": checks,
            }
        )
    return tests


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", CASES, ids=[f"{c.alert}-{i}" for i, c in enumerate(CASES)])
def test_alert_fires_in_time_and_only_then(case: Case, tmp_path: Path) -> None:
    test_file = tmp_path / "rules.test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(RULES)],
                "evaluation_interval": "30s",
                "tests": unit_tests(case),
            },
            sort_keys=False,
        )
    )
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def samples(*runs: tuple[Value, int]) -> str:
    """promtool's values for runs of (value, samples); None is a missing sample."""
    return " ".join(
        "_" if value is None else repr(float(value)) for value, n in runs for _ in range(n)
    )


@pytest.mark.parametrize(
    ("values", "fires_at"),
    [
        # Prometheus starts afresh (or lost its data) while the server already counts two
        # fallbacks of the device from long ago: nothing happened since, nothing fires
        (samples((None, 10), (2, 31)), None),
        # Prometheus is down for longer than its 5-minute lookback, then scrapes again
        (samples((2, 7), (None, 13), (2, 21)), None),
        # a second server process starts: its series begins at the stored count
        (samples((None, 4), (1, 37)), None),
        # after such a start, a new fallback still fires within 3 minutes
        (samples((None, 10), (2, 10), (3, 21)), "12m30s"),
    ],
    ids=["fresh-prometheus", "prometheus-outage", "new-server-process", "then-a-fallback"],
)
def test_device_fell_back_fires_on_a_new_fallback_only(
    values: str, fires_at: str | None, tmp_path: Path
) -> None:
    counter = f'{FELL_BACK}{{{SERVER}, {DEVICE}, event="boot_check.fell_back"}}'
    checks: list[dict[str, Any]]
    if fires_at is None:
        ever = f"count(count_over_time({firing('DeviceFellBack')}[20m]))"
        checks = [{"expr": ever, "eval_time": "20m", "exp_samples": []}]
    else:
        before = f"count(count_over_time({firing('DeviceFellBack')}[9m30s]))"
        alert = (
            'ALERTS{alertname="DeviceFellBack", alertstate="firing", device="d1", '
            'hostname="cam-1", severity="warning"}'
        )
        checks = [
            {"expr": before, "eval_time": "9m30s", "exp_samples": []},
            {"expr": firing("DeviceFellBack"), "eval_time": fires_at,
             "exp_samples": [{"labels": alert, "value": 1}]},
        ]  # fmt: skip
    test_file = tmp_path / "rules.test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(RULES)],
                "evaluation_interval": "30s",
                "tests": [
                    {
                        "name": "DeviceFellBack after a restart",
                        "interval": "30s",
                        "input_series": [{"series": counter, "values": values}],
                        "promql_expr_test": checks,
                    }
                ],
            },
            sort_keys=False,
        )
    )
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_case() -> None:
    assert {rule["alert"] for rule in alert_rules()} == {case.alert for case in CASES}


def duration_s(text: str) -> int:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", text)
    assert match and text, f"unexpected duration {text!r}"
    return int(match[1] or 0) * 60 + int(match[2] or 0)


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_every_alert_is_documented_and_quick(rule: dict[str, Any]) -> None:
    name = rule["alert"]
    assert rule["labels"]["severity"] in {"critical", "warning", "none"}
    annotations = rule["annotations"]
    assert set(annotations) >= {"summary", "description", "runbook_url"}
    assert annotations["runbook_url"] == f"docs/runbooks/{name}.md"
    runbook = (RUNBOOKS / f"{name}.md").read_text(encoding="utf-8")
    for section in ("## What it means", "## How to confirm", "## What to do", "## How to recover"):
        assert section in runbook, f"{name}.md lacks {section!r}"
    # fires within 3 minutes: "for" plus one evaluation interval (30 s) and one scrape (15 s)
    assert duration_s(rule.get("for", "0s")) + 45 <= 180
