"""``fleet chaos run``: inject each scenario's fault into a monitoring lab, and grade what
happens: was it handled, did its alert reach the on-call receiver and how fast (MTTD), did the
alert resolve after recovery and how fast (MTTR).

For each scenario (``chaos.scenarios``): inject; wait for the scenario's alert to arrive
``firing`` at the lab's receiver (due within :data:`DETECT_LIMIT_S` scenario seconds after the
fault can meet the alert's condition); poll the system's handling; recover; wait for the alert
to arrive ``resolved``. Scenarios on their own devices run at once; those that stop a shared
process run alone afterwards. The report card is a text table and, with ``--report``, JSON.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from chaos.false_positives import false_positives
from chaos.fleet import MemberSpec
from chaos.monitoring_lab import (
    ALERTMANAGER,
    ALERTMANAGER_YML,
    PROMETHEUS,
    ROOT,
    MonitoringLab,
    load_yaml,
    monitoring_lab,
    parse_duration,
    runbook_of,
)
from chaos.receiver import DEADMAN, Notification
from chaos.scenarios import SCENARIOS, Context, MonitoringDown, Scenario
from fleet_core.errors import FleetError
from fleet_core.suggest import unknown_names

DETECT_LIMIT_S = 180.0  # an alert fires 3 minutes after its condition holds (fleet.rules.yml)
RESOLVE_LIMIT_S = 900.0  # ... and resolve within 15 minutes of the recovery
HANDLE_LIMIT_S = 300.0  # the handling is polled this long after the alert
BASELINE_DEVICES = 3  # healthy members no scenario touches (the fleet's ratios stay sane)
DEFAULT_SPEED = 10.0


class ChaosError(FleetError):
    """A chaos run could not start (bad scenario names, a lab that would not come up)."""


@dataclass
class Result:
    """One row of the report card."""

    scenario: str
    alert: str
    runbook: str | None
    passed: bool
    reason: str  # why it failed, or what was seen when it passed
    handled: bool
    mttd_s: float | None  # inject -> firing notification received, scenario seconds
    mttr_s: float | None  # recover -> resolved notification received, scenario seconds
    detect_limit_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def select(names: Sequence[str]) -> list[type[Scenario]]:
    """The scenarios named (``all``: every one), in registry order.

    Raises:
        ChaosError: a name that is no scenario, listing the known ones.
    """
    if not names or "all" in names:
        return list(SCENARIOS.values())
    unknown = unknown_names(names, [*SCENARIOS, "all"])
    if unknown:
        raise ChaosError(
            f"unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)} (or all)"
        )
    return [scenario for name, scenario in SCENARIOS.items() if name in names]


def runbook_path(scenario: type[Scenario]) -> tuple[str | None, str | None]:
    """The runbook of the scenario's alert and a problem with it (None when it exists)."""
    alert = scenario.runbook_alert or scenario.alert
    url = runbook_of(alert)
    if url is None:
        return None, f"no alert rule named {alert} in the committed rules"
    if not (ROOT / url).is_file():
        return url, f"the runbook {url} does not exist"
    return url, None


def group_wait_s(alert: str) -> float:
    """How long the committed Alertmanager configuration holds ``alert``'s first notification
    (group_wait of the first route matching it by name, else the root's)."""
    config = load_yaml(ALERTMANAGER_YML)
    route = config["route"]
    for child in route.get("routes", []):
        if any(f'"{alert}"' in str(matcher) for matcher in child.get("matchers", [])):
            return parse_duration(child.get("group_wait", route.get("group_wait", "30s")))
    return parse_duration(route.get("group_wait", "30s"))


def detect_limit(scenario: type[Scenario]) -> float:
    """Scenario seconds from the inject by which the alert must reach the receiver: the time
    the fault needs before the alert's condition can hold (``condition_s``), the heartbeats
    before the device reports it (``heartbeats``), the 3 minutes the rules promise from
    condition to firing, and the wait Alertmanager adds before a group's first notification.
    The receiver's own dead man's switch incident goes through no Alertmanager route."""
    from updater.config import UpdaterConfig

    limit = scenario.condition_s + DETECT_LIMIT_S
    limit += scenario.heartbeats * UpdaterConfig().heartbeat_interval_s
    if scenario.alert != DEADMAN:
        limit += group_wait_s(scenario.alert)
    return limit


def run_scenario(lab: MonitoringLab, scenario: Scenario, ctx: Context) -> Result:
    """Inject, detect, check the handling, recover, see it resolve: one row."""
    try:
        return _run_scenario(lab, scenario, ctx)
    finally:
        scenario.cleanup(ctx)


def _run_scenario(lab: MonitoringLab, scenario: Scenario, ctx: Context) -> Result:
    url, problem = runbook_path(type(scenario))
    limit = detect_limit(type(scenario))

    def row(passed: bool, reason: str, handled: bool = False,
            mttd: float | None = None, mttr: float | None = None) -> Result:  # fmt: skip
        return Result(scenario.name, scenario.alert, url, passed, reason, handled,
                      None if mttd is None else round(mttd, 1),
                      None if mttr is None else round(mttr, 1), limit)  # fmt: skip

    def labels(found: Mapping[str, str]) -> bool:
        return scenario.matches(ctx, found)

    injected = time.time()
    scenario.inject(ctx)
    # waited past the limit (a late alert is reported with its time, not as a missing one)
    firing: Notification | None = lab.receiver.wait_for(
        scenario.alert, "firing", after=injected, labels=labels,
        timeout_s=lab.real_seconds(limit * 1.5),
    )  # fmt: skip
    mttd = None if firing is None else lab.scenario_seconds(firing.received_at - injected)
    waiting = _poll(lab, lambda: scenario.handled(ctx))
    handled = waiting is None
    recovered = time.time()
    scenario.recover(ctx)
    resolved: Notification | None = None
    if firing is not None:
        resolved = lab.receiver.wait_for(
            scenario.alert, "resolved", after=recovered, labels=labels,
            timeout_s=lab.real_seconds(RESOLVE_LIMIT_S + scenario.clears_after_s),
        )  # fmt: skip
    mttr = None if resolved is None else lab.scenario_seconds(resolved.received_at - recovered)
    unrestored = _poll(lab, lambda: scenario.restored(ctx)) if resolved is not None else None
    if firing is None:
        return row(False, f"no firing {scenario.alert} within {limit * 1.5:.0f} s", handled)
    if mttd is not None and mttd > limit:
        return row(False, f"{scenario.alert} arrived after {mttd:.0f} s, over {limit:.0f} s",
                   handled, mttd, mttr)  # fmt: skip
    if not handled:
        return row(False, f"not handled: {waiting}", handled, mttd, mttr)
    if resolved is None:
        waited = RESOLVE_LIMIT_S + scenario.clears_after_s
        return row(False, f"no resolved {scenario.alert} within {waited:.0f} s",
                   handled, mttd, mttr)  # fmt: skip
    if unrestored is not None:
        return row(False, f"not back to normal: {unrestored}", handled, mttd, mttr)
    if problem is not None:
        return row(False, problem, handled, mttd, mttr)
    return row(True, "handled, alerted, resolved", handled, mttd, mttr)


def _poll(lab: MonitoringLab, check: Callable[[], str | None]) -> str | None:
    """Call ``check`` until it returns None (what is still missing, otherwise) or
    :data:`HANDLE_LIMIT_S` scenario seconds have passed; its last answer."""
    deadline = time.monotonic() + lab.real_seconds(HANDLE_LIMIT_S)
    while True:
        missing = check()
        if missing is None or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


def _guarded(lab: MonitoringLab, scenario: Scenario, ctx: Context) -> Result:
    try:
        return run_scenario(lab, scenario, ctx)
    except Exception as err:  # one scenario's crash is its own failed row
        detail = "".join(traceback.format_exception_only(type(err), err)).strip()
        return Result(scenario.name, scenario.alert, runbook_path(type(scenario))[0], False,
                      f"crashed: {detail}", False, None, None,
                      detect_limit(type(scenario)))  # fmt: skip


def run_all(
    chosen: Sequence[type[Scenario]],
    workdir: Path,
    speed: float,
    progress: Callable[[str], None] = lambda _line: None,
) -> list[Result]:
    """Build a lab for ``chosen``, run them and return the report card's rows (registry
    order); the lab is gone when this returns, however it returns."""
    specs: list[MemberSpec] = [MemberSpec(role="gateway") for _ in range(BASELINE_DEVICES)]
    owned: list[tuple[type[Scenario], range]] = []
    fixed = sum(len(scenario.specs) for scenario in chosen)
    for scenario in chosen:
        start = len(specs)
        # a scenario that sizes itself to the fleet sees every other device
        specs += scenario.specs_for(BASELINE_DEVICES + fixed - len(scenario.specs))
        owned.append((scenario, range(start, len(specs))))
    progress(f"starting the lab in {workdir} (time x{speed:g})")
    with monitoring_lab(workdir, specs, speed) as lab:
        if any(s is MonitoringDown for s in chosen):
            lab.receiver.watch_deadman(lab.real_seconds(MonitoringDown.grace_s()))
        members = lab.fleet.members
        jobs = [(cls(), Context(lab, [members[i] for i in indexes])) for cls, indexes in owned]
        results: dict[str, Result] = {}

        def run_group(group: list[tuple[Scenario, Context]]) -> None:
            for scenario, ctx in group:
                progress(f"{scenario.name}: inject")
                results[scenario.name] = _guarded(lab, scenario, ctx)
                result = results[scenario.name]
                progress(f"{scenario.name}: {'pass' if result.passed else 'FAIL'} "
                         f"({result.reason})")  # fmt: skip

        groups: dict[str, list[tuple[Scenario, Context]]] = {}
        for job in jobs:
            if not job[0].exclusive:
                groups.setdefault(job[0].serial or job[0].name, []).append(job)
        threads = [
            threading.Thread(target=run_group, args=(group,), name=f"chaos-{key}", daemon=True)
            for key, group in groups.items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        alone = [(s, c) for s, c in jobs if s.exclusive]
        run_group(sorted(alone, key=lambda job: job[0].restarts_server))  # see Scenario
        if lab.pacer.errors:
            progress(f"the fleet reported {len(lab.pacer.errors)} error(s); first: "
                     f"{lab.pacer.errors[0]}")  # fmt: skip
    return [results[cls.name] for cls in chosen]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def report_table(results: Sequence[Result]) -> str:
    """The report card as a text table."""
    header = ("scenario", "alert", "MTTD s", "MTTR s", "handled", "runbook", "result")
    rows = [
        (r.scenario, r.alert, _cell(r.mttd_s), _cell(r.mttr_s), "yes" if r.handled else "no",
         r.runbook or "-", "pass" if r.passed else f"FAIL: {r.reason}")
        for r in results
    ]  # fmt: skip
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for cells in (header, *rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)))
    passed = sum(r.passed for r in results)
    lines.append(f"{passed} of {len(results)} scenarios passed")
    return "\n".join(line.rstrip() for line in lines)


def report_json(results: Sequence[Result], speed: float) -> dict[str, Any]:
    """The report card as a JSON document."""
    return {
        "speed": speed,
        "time_unit": "scenario seconds (real seconds times speed)",
        "passed": all(r.passed for r in results),
        "scenarios": [r.as_dict() for r in results],
    }


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@click.group()
def chaos() -> None:
    """Chaos scenarios against a lab fleet, its release servers and its monitoring."""


@chaos.command("run")
@click.argument("scenarios", nargs=-1, metavar="[SCENARIO]... | all")
@click.option("--report", "report", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the report card to this JSON file.")  # fmt: skip
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the report card as JSON (the --report document) instead of the table.",
)
@click.option("--speed", type=click.FloatRange(1, 60), default=DEFAULT_SPEED, show_default=True,
              help="Time compression: scenario seconds per real second.")  # fmt: skip
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("build/chaos"), show_default=True,
              help="Where the lab lives (emptied first).")  # fmt: skip
def run(
    scenarios: tuple[str, ...], report: Path | None, as_json: bool, speed: float, workdir: Path
) -> None:
    """Run chaos SCENARIOs (default: all) and print the report card; exit 1 when one fails.

    Each one injects a fault into a lab (two release servers, a virtual fleet, Prometheus and
    Alertmanager with the committed rules, on compressed time), checks that the system handles
    it, that its alert reaches the receiver and resolves after recovery. See docs/chaos.md."""
    import signal

    from fleet_core import durable

    chosen = select(scenarios)
    missing = [tool for tool in (PROMETHEUS, ALERTMANAGER) if shutil.which(tool) is None]
    if missing:
        raise ChaosError(f"fleet chaos run needs {' and '.join(missing)} (Debian: apt install "
                         "prometheus prometheus-alertmanager)")  # fmt: skip
    if report is not None and not report.parent.is_dir():
        raise ChaosError(f"cannot write the report to {report}: no directory {report.parent}")
    main = threading.current_thread() is threading.main_thread()
    # SIGTERM unwinds like Ctrl-C, so the lab's processes and mounts go with the run
    previous = signal.signal(signal.SIGTERM, _terminated) if main else None
    try:
        results = run_all(chosen, workdir, speed, lambda line: click.echo(line, err=True))
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    document = json.dumps(report_json(results, speed), indent=2) + "\n"
    if as_json:
        click.echo(document, nl=False)
    else:
        click.echo(report_table(results))
    if report is not None:
        durable.atomic_write(report, document.encode())
    if not all(r.passed for r in results):
        raise ChaosError(f"{sum(not r.passed for r in results)} scenario(s) failed")


chaos.add_command(false_positives)  # fleet chaos false-positives (chaos/false_positives.py)
