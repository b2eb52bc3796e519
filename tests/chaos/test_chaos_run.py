"""``fleet chaos run``: the rule rewriting for compressed time, the alert receiver, the report
card, and every scenario end to end against a real Prometheus and Alertmanager."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests
import yaml  # type: ignore[import-untyped]
from click.testing import CliRunner

from chaos import chaos_run, scenarios
from chaos.chaos_run import Result, detect_limit, report_json, report_table, select
from chaos.fleet import MemberSpec
from chaos.monitoring_lab import (
    ALERTMANAGER,
    PROMETHEUS,
    RULES,
    alertmanager_config,
    check_scaled,
    load_yaml,
    mounts_under,
    parse_duration,
    scale_expr,
    scale_rules,
    wait_until,
)
from chaos.receiver import DEADMAN, AlertReceiver
from fleet_core.cli import fleet
from tests.conftest import require_tools

SPEED = 20.0


# --- time compression ----------------------------------------------------------------------


def test_durations_parse_and_scale() -> None:
    assert parse_duration("1h30m") == 5400
    assert parse_duration("500ms") == 0.5
    with pytest.raises(ValueError, match="not a Prometheus duration"):
        parse_duration("5 minutes")
    assert scale_expr("increase(x[15m])", 10) == "increase(x[90000ms])"
    assert scale_expr("rate(x[5m] offset 1h)", 60) == "rate(x[5000ms] offset 60000ms)"
    assert scale_expr("max_over_time(x[10m:1m])", 10) == "max_over_time(x[60000ms:6000ms])"
    assert scale_expr('x{a="[5m]"} > 300', 10).endswith("> 300")  # thresholds stay


def test_rules_are_scaled_on_the_parsed_file_and_promtool_accepts_them(tmp_path: Path) -> None:
    original = load_yaml(RULES)
    result = scale_rules(original, 10)
    check_scaled(original, result, 10)
    rules = {r["alert"]: r for g in result["groups"] for r in g["rules"] if "alert" in r}
    assert rules["FleetServerDown"]["for"] == "12000ms"
    assert "[90000ms]" in rules["DeviceFellBack"]["expr"]
    assert "> 900" in rules["NetworkPartition"]["expr"]  # scenario seconds, not scaled
    assert original == load_yaml(RULES)  # the committed document is not touched
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(result))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("where", ["for", "range"])
def test_a_duration_left_unscaled_is_caught(where: str) -> None:
    original = load_yaml(RULES)
    result = scale_rules(original, 10)
    rules = [r for g in result["groups"] for r in g["rules"]]
    if where == "for":
        broken = next(r for r in rules if r.get("alert") == "DeviceOffline")
        broken["for"] = "1m"
    else:
        broken = next(r for r in rules if r.get("alert") == "DeviceFellBack")
        broken["expr"] = broken["expr"].replace("[90000ms]", "[15m]")
    with pytest.raises(ValueError, match=str(broken["alert"])):
        check_scaled(original, result, 10)
    missing = copy.deepcopy(result)
    missing["groups"][0]["rules"].pop()
    with pytest.raises(ValueError, match="rules before scaling"):
        check_scaled(original, missing, 10)


def test_alertmanager_config_posts_everything_to_the_receiver(tmp_path: Path) -> None:
    config = alertmanager_config("http://127.0.0.1:9", 10)
    urls = [w["url"] for r in config["receivers"] for w in r["webhook_configs"]]
    assert urls == [f"http://127.0.0.1:9/{r['name']}" for r in config["receivers"]]
    assert all(w["send_resolved"] for r in config["receivers"] for w in r["webhook_configs"])
    route = config["route"]
    assert (route["group_wait"], route["group_interval"]) == ("1000ms", "30000ms")
    watchdog = route["routes"][0]
    assert (watchdog["group_wait"], watchdog["repeat_interval"]) == ("1ms", "6000ms")
    assert config["global"]["resolve_timeout"] == "30000ms"
    if shutil.which("amtool") is None:
        pytest.skip("amtool is not installed")
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(["amtool", "check-config", str(path)], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_detection_limits_follow_the_committed_configuration() -> None:
    # 3 minutes from condition to firing, a heartbeat, Alertmanager's group_wait
    assert detect_limit(scenarios.Overheating) == 180 + 60 + 10
    assert detect_limit(scenarios.ServerUnavailable) == 180 + 10
    assert detect_limit(scenarios.DeviceOffline) == 300 + 180 + 60 + 10
    assert detect_limit(scenarios.ClockSkew) == 180 + 2 * 60 + 10  # measured, then reported
    # Alertmanager's alert lifetime (4 resend delays), then two Watchdog repeat intervals
    assert detect_limit(scenarios.MonitoringDown) == 240 + 120 + 180


# --- the receiver --------------------------------------------------------------------------


def webhook(alertname: str, status: str = "firing", **labels: str) -> dict[str, Any]:
    return {"version": "4", "status": status, "alerts": [
        {"status": status, "labels": {"alertname": alertname, **labels},
         "annotations": {"runbook_url": f"docs/runbooks/{alertname}.md"}}]}  # fmt: skip


def test_receiver_records_each_alert_and_refuses_what_is_not_a_notification() -> None:
    with AlertReceiver() as receiver:
        start = time.time()
        answer = requests.post(receiver.url + "/oncall", json=webhook("DeviceOffline", device="d1"),
                               timeout=5)  # fmt: skip
        assert answer.status_code == 200
        bad = requests.post(receiver.url + "/oncall", data=b"{not json", timeout=5)
        assert bad.status_code == 400
        nameless = requests.post(receiver.url, json={"alerts": [{"status": "firing"}]}, timeout=5)
        assert nameless.status_code == 400
        (seen,) = receiver.notifications()
        assert (seen.alertname, seen.status, seen.receiver) == ("DeviceOffline", "firing", "oncall")
        assert seen.labels["device"] == "d1" and seen.received_at >= start
        assert seen.annotations["runbook_url"] == "docs/runbooks/DeviceOffline.md"
        found = receiver.wait_for("DeviceOffline", "firing", after=start, timeout_s=1,
                                  labels=lambda found: found.get("device") == "d1")  # fmt: skip
        assert found == seen
        other = receiver.wait_for("DeviceOffline", "firing", after=start, timeout_s=0.2,
                                  labels=lambda found: found.get("device") == "d2")  # fmt: skip
        assert other is None
        assert receiver.wait_for("DeviceOffline", "resolved", after=start, timeout_s=0.2) is None


def test_receiver_is_a_dead_mans_switch() -> None:
    with AlertReceiver() as receiver:
        requests.post(receiver.url, json=webhook("Watchdog"), timeout=5)
        receiver.watch_deadman(0.5, check_every_s=0.05)
        start = time.time()
        for _ in range(6):  # Watchdog every 0.2 s: no incident
            time.sleep(0.2)
            requests.post(receiver.url, json=webhook("Watchdog"), timeout=5)
            silent = time.time()
        assert receiver.wait_for(DEADMAN, "firing", after=start, timeout_s=0.1) is None
        incident = receiver.wait_for(DEADMAN, "firing", after=silent, timeout_s=5)
        assert incident is not None and incident.received_at - silent >= 0.5
        assert incident.annotations["runbook_url"] == "docs/runbooks/Watchdog.md"
        assert receiver.wait_for(DEADMAN, "resolved", after=silent, timeout_s=0.3) is None
        requests.post(receiver.url, json=webhook("Watchdog"), timeout=5)
        assert receiver.wait_for(DEADMAN, "resolved", after=silent, timeout_s=2) is not None


# --- the report card -----------------------------------------------------------------------


def test_report_card_table_and_json() -> None:
    rows = [
        Result("overheating", "DeviceOverheating", "docs/runbooks/DeviceOverheating.md", True,
               "handled, alerted, resolved", True, 201.3, 300.0, 270.0),
        Result("bad-release", "CanaryFailed", "docs/runbooks/CanaryFailed.md", False,
               "no firing CanaryFailed within 405 s", False, None, None, 270.0),
    ]  # fmt: skip
    table = report_table(rows).splitlines()
    assert table[0].split() == ["scenario", "alert", "MTTD", "s", "MTTR", "s", "handled",
                                "runbook", "result"]  # fmt: skip
    assert table[1].split()[:6] == ["overheating", "DeviceOverheating", "201", "300", "yes",
                                    "docs/runbooks/DeviceOverheating.md"]  # fmt: skip
    assert table[2].split()[2:5] == ["-", "-", "no"]
    assert table[2].endswith("FAIL: no firing CanaryFailed within 405 s")
    assert table[-1] == "1 of 2 scenarios passed"
    document = report_json(rows, 10)
    assert document["passed"] is False
    assert document["scenarios"][0]["mttd_s"] == 201.3
    assert json.loads(json.dumps(document)) == document


def test_unknown_scenario_names_are_one_error_listing_the_known_ones() -> None:
    result = CliRunner().invoke(fleet, ["chaos", "run", "overheting", "bad-release"])
    assert result.exit_code == 1
    assert "unknown scenario overheting (did you mean overheating?)" in result.output
    assert "known: monitoring-down, server-unavailable" in result.output
    assert [s.name for s in select(["bad-release", "overheating"])] == ["bad-release",
                                                                         "overheating"]  # fmt: skip
    assert select(["all"]) == list(scenarios.SCENARIOS.values())


# --- end to end ----------------------------------------------------------------------------


class MisnamedAlert(scenarios.Overheating):
    """Overheating, expecting an alert the rules do not have: it must be reported failed."""

    name = "misnamed-alert"
    alert = "DeviceOverheatingg"
    specs: ClassVar = (MemberSpec(),)


def test_every_scenario_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tools(prometheus=shutil.which(PROMETHEUS) is not None,
                  alertmanager=shutil.which(ALERTMANAGER) is not None)  # fmt: skip
    monkeypatch.setitem(scenarios.SCENARIOS, MisnamedAlert.name, MisnamedAlert)
    monkeypatch.setattr(chaos_run, "SCENARIOS", scenarios.SCENARIOS)
    report = tmp_path / "report.json"
    started = time.monotonic()
    result = CliRunner().invoke(
        fleet, ["chaos", "run", "all", "--report", str(report), "--json", "--speed", f"{SPEED:g}",
                "--workdir", str(tmp_path / "lab")],
    )  # fmt: skip
    took = time.monotonic() - started
    print(result.output)
    print(f"chaos run took {took:.0f} s")
    assert result.exit_code == 1, result.output  # the misnamed scenario fails the run
    document = json.loads(report.read_text())
    assert json.loads(result.stdout) == document  # --json prints the card the file holds
    rows = {row["scenario"]: row for row in document["scenarios"]}
    assert list(rows) == list(scenarios.SCENARIOS)
    misnamed = rows.pop(MisnamedAlert.name)
    assert not misnamed["passed"] and misnamed["mttd_s"] is None
    assert misnamed["reason"].startswith("no firing DeviceOverheatingg")
    for name, row in rows.items():
        assert row["passed"], (name, row["reason"])
        assert row["handled"], name
        assert row["mttd_s"] is not None and row["mttd_s"] <= row["detect_limit_s"], name
        assert row["mttr_s"] is not None, name
        assert (Path(__file__).parents[2] / row["runbook"]).is_file()
    # everything the run started is stopped: nothing answers on the lab's ports
    lab = tmp_path / "lab"
    config = load_yaml(lab / "prometheus.yml")
    targets = [t for job in config["scrape_configs"] for c in job.get("static_configs", [])
               for t in c["targets"]]  # fmt: skip
    targets += load_yaml(lab / "servers.yml")[0]["targets"]
    assert len(targets) == 4
    for target in targets:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://{target}/", timeout=5)
    assert took < 8 * 60


# --- the runner, on a receiver alone ---------------------------------------------------------


class FakeLab:
    """What run_scenario uses of a lab: the receiver and the time factor (1000: a scenario
    second is a millisecond)."""

    factor = 1000.0

    def __init__(self, receiver: AlertReceiver) -> None:
        self.receiver = receiver

    def real_seconds(self, scenario_seconds: float) -> float:
        return scenario_seconds / self.factor

    def scenario_seconds(self, real_seconds: float) -> float:
        return real_seconds * self.factor


class Posting(scenarios.Scenario):
    """Its inject and recover post the notifications an Alertmanager would (or not)."""

    name = "posting"
    alert = "DeviceOverheating"
    summary = "test"
    fire: ClassVar[str | None] = "DeviceOverheating"
    resolve = True
    handles = True
    restores = True

    def inject(self, ctx: scenarios.Context) -> None:
        if self.fire:
            post(ctx, webhook(self.fire, device="d1"))

    def handled(self, ctx: scenarios.Context) -> str | None:
        return None if self.handles else "never handled"

    def restored(self, ctx: scenarios.Context) -> str | None:
        return None if self.restores else "still broken"

    def recover(self, ctx: scenarios.Context) -> None:
        if self.resolve:
            post(ctx, webhook(str(self.fire), "resolved", device="d1"))

    def matches(self, ctx: scenarios.Context, labels: Any) -> bool:
        return bool(labels.get("device") == "d1")


def post(ctx: scenarios.Context, document: dict[str, Any]) -> None:
    requests.post(ctx.lab.receiver.url + "/oncall", json=document, timeout=5).raise_for_status()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, "handled, alerted, resolved"),
        ({"fire": None}, "no firing DeviceOverheating"),
        ({"fire": "DeviceOffline"}, "no firing DeviceOverheating"),
        ({"resolve": False}, "no resolved DeviceOverheating"),
        ({"handles": False}, "not handled: never handled"),
        ({"restores": False}, "not back to normal: still broken"),
        ({"alert": "NoSuchAlert", "fire": "NoSuchAlert"}, "no alert rule named NoSuchAlert"),
    ],
)
def test_a_scenario_passes_only_when_alerted_handled_and_resolved(
    changes: dict[str, Any], reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chaos_run, "RESOLVE_LIMIT_S", 300.0)  # 0.3 s at this factor
    scenario = type("Changed", (Posting,), changes)()
    with AlertReceiver() as receiver:
        lab: Any = FakeLab(receiver)
        result = chaos_run.run_scenario(lab, scenario, scenarios.Context(lab, []))
    assert result.reason.startswith(reason), result
    assert result.passed == (reason == "handled, alerted, resolved")
    if result.passed:
        assert result.mttd_s is not None and 0 <= result.mttd_s <= result.detect_limit_s
        assert result.mttr_s is not None and result.runbook == "docs/runbooks/DeviceOverheating.md"


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["int", "term"])
def test_an_interrupted_run_leaves_nothing_running(tmp_path: Path, signal_number: int) -> None:
    """Ctrl-C (or SIGTERM) in the middle of disk-full, its small partition mounted: every
    process the run started is stopped and the mount is gone."""
    require_tools(prometheus=shutil.which(PROMETHEUS) is not None,
                  alertmanager=shutil.which(ALERTMANAGER) is not None,
                  root=os.geteuid() == 0)  # fmt: skip
    workdir = tmp_path / "lab"
    command = [sys.executable, "-c", "from fleet_core.cli import main; main()", "chaos", "run",
               "disk-full", "--speed", f"{SPEED:g}", "--workdir", str(workdir)]  # fmt: skip
    run = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        assert run.stderr is not None
        for line in run.stderr:
            if line.startswith("disk-full: inject"):
                break
        wait_until("the partition mounted", lambda: mounts_under(workdir), 30)
        run.send_signal(signal_number)
        run.wait(60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode != 0
    assert mounts_under(workdir) == []
    config = load_yaml(workdir / "prometheus.yml")
    targets = [t for job in config["scrape_configs"] for c in job.get("static_configs", [])
               for t in c["targets"]]  # fmt: skip
    targets += load_yaml(workdir / "servers.yml")[0]["targets"]
    for target in targets:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://{target}/", timeout=5)
