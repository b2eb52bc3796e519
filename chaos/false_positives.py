"""How often the alert rules fire on a healthy fleet: the false-positive rate, measured.

A healthy fleet with ordinary noise (:mod:`chaos.noise`) is fed to promtool's own rule
evaluation (``promtool test rules``: the Prometheus rule manager, with ``for:``, staleness and
look-back exactly as a real Prometheus evaluates them), 30 s apart as in prometheus.yml. The
days are cut into chunks of a few hours, one promtool run each; a chunk begins with the last
``WARMUP_S`` of the one before, so every ``for:`` and range vector has its history, and only
alerts that start firing after the warm-up count (the one before already counted the rest).

Each chunk asks promtool, at its last evaluation, for every alert series that started firing
in the chunk (``ONSET``): how many times, first and last. The expected answer is "nothing", so
promtool prints what it got; :func:`parse_promtool_output` reads that. A probe alert that
always fires runs beside the rules and must have fired at every evaluation of the chunk, so an
output that lost the answers (or a promtool that evaluated nothing) is an error, never a zero.

The figures (docs/chaos.md, "False positives"): alerts fired per alert-day (firings divided by
alert rules times days), per alert, and the share of device-days with any alert, whose aim is
below 5 % (the roadmap's "alert false positives < 5 %").
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml  # type: ignore[import-untyped]

from chaos.noise import DAY_S, STEP_S, HealthyFleet, NoiseParameters, Sample, Window
from fleet_core.cli import exits
from fleet_core.durable import atomic_write
from fleet_core.errors import FleetError
from fleet_core.params import FiniteFloatRange

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "monitoring" / "prometheus" / "rules" / "fleet.rules.yml"
AIM = 0.05  # the roadmap: alert false positives < 5 % (of device-days)
# The longest history a rule needs: increase(...[15m]) plus the longest "for" (2m), plus the
# 5-minute look-back of an instant selector, rounded up.
WARMUP_S = 30 * 60
PROMTOOL_TIMEOUT_S = 1800.0
PROBE = "FalsePositivesProbe"
# Alerts that fire by design whatever the fleet does: not false positives
ALWAYS_FIRING = {"Watchdog": "fires always, to prove the alerting pipeline works end to end"}
FIRING = 'ALERTS{alertstate="firing"}'
# An alert series at the evaluation where it starts firing: it did not fire 30 s before
# (an alert that stops firing gets a staleness marker, so it is absent then)
ONSET = f"{FIRING} unless {FIRING} offset {STEP_S}s"
_DURATION_UNITS = {"y": 365 * DAY_S, "w": 7 * DAY_S, "d": DAY_S, "h": 3600, "m": 60, "s": 1,
                   "ms": 0.001}  # fmt: skip
_DURATION = re.compile(
    r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?"
)


class PromtoolError(FleetError):
    """promtool could not run the rules over the series (missing, a bad rules file, a crash)."""


class PromtoolOutputError(FleetError):
    """promtool's output is not what the measurement asked for: nothing is concluded from it."""


# --- promtool's input -----------------------------------------------------------------------


def _number(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def encode_values(values: Sequence[Sample]) -> str:
    """promtool's ``values`` for ``values``: runs of an arithmetic sequence as ``a+bxn``, a
    missing sample after a value as ``stale`` (Prometheus's staleness marker), ``_`` for
    one with nothing before it.

    Raises:
        ValueError: a value that is not finite.
    """
    for index, value in enumerate(values):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"sample {index} is {value!r}: only finite numbers are series values")
    words: list[str] = []
    index, present = 0, False
    while index < len(values):
        value = values[index]
        if value is None:
            words.append("stale" if present else "_")
            present, index = False, index + 1
            continue
        end = index + 1
        if end < len(values) and values[end] is not None:
            step = round(float(values[end]) - value, 9)  # type: ignore[arg-type]
            while end < len(values):
                following = values[end]
                if following is None or abs(following - (value + step * (end - index))) > 1e-6:
                    break
                end += 1
        if end - index >= 3:
            sign = "-" if step < 0 else "+"
            words.append(f"{_number(value)}{sign}{_number(abs(step))}x{end - index - 1}")
        else:
            words.extend(_number(v) for v in values[index:end] if v is not None)
        present, index = True, end
    return " ".join(words)


@dataclass(frozen=True)
class ChunkQueries:
    """The four questions a chunk asks promtool at its last evaluation, ``eval_s``, about the
    ``count_steps`` evaluations that end there. Their ranges are a second short of the
    chunk: Prometheus 2 includes both ends of a range, 3 only the last, and either way the
    range holds exactly the chunk's evaluations."""

    count_steps: int
    eval_s: int

    @property
    def window(self) -> str:
        return f"[{self.count_steps * STEP_S - 1}s:{STEP_S}s]"

    @property
    def onsets(self) -> str:
        return f"sum_over_time(({ONSET}){self.window})"

    @property
    def first(self) -> str:
        return f"min_over_time(timestamp({ONSET}){self.window})"

    @property
    def last(self) -> str:
        return f"max_over_time(timestamp({ONSET}){self.window})"

    @property
    def probe(self) -> str:
        probe = f'ALERTS{{alertname="{PROBE}", alertstate="firing"}}'
        return f"count_over_time({probe}[{self.count_steps * STEP_S - 1}s])"

    def all(self) -> tuple[str, str, str, str]:
        return (self.onsets, self.first, self.last, self.probe)


def probe_rules() -> dict[str, Any]:
    """A rules file of one alert that always fires: it proves that promtool evaluated."""
    rule = {"alert": PROBE, "expr": "vector(1)", "labels": {"severity": "none"}}
    return {"groups": [{"name": "false-positives-probe", "rules": [rule]}]}


def chunk_test(window: Window, rule_files: Sequence[Path], queries: ChunkQueries) -> str:
    """A promtool test file that evaluates ``rule_files`` over ``window`` (one sample per
    evaluation) and asks ``queries``, expecting no answer (so promtool prints every answer).
    JSON is YAML, and much quicker to write for a large window."""
    series = [{"series": selector, "values": encode_values(values)}
              for selector, values in window.items()]  # fmt: skip
    checks = [{"expr": expr, "eval_time": f"{queries.eval_s}s", "exp_samples": []}
              for expr in queries.all()]  # fmt: skip
    document = {
        "rule_files": [str(path) for path in rule_files],
        "evaluation_interval": f"{STEP_S}s",
        "tests": [{"interval": f"{STEP_S}s", "input_series": series, "promql_expr_test": checks}],
    }
    return json.dumps(document)


# --- promtool's output ----------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What promtool got for one query: each sample's labels and value."""

    expr: str
    time_s: float
    samples: tuple[tuple[tuple[tuple[str, str], ...], float], ...]


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration as promtool prints it (``6h30m``, ``1d``, ``0s``).

    Raises:
        PromtoolOutputError: not such a duration.
    """
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise PromtoolOutputError(f"promtool printed {text!r} where a duration belongs")
    units = ("y", "w", "d", "h", "m", "s", "ms")
    return sum(int(group) * _DURATION_UNITS[unit]
               for group, unit in zip(match.groups(), units, strict=True) if group)  # fmt: skip


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
            "\\": "\\", '"': '"', "'": "'"}  # fmt: skip


class _Reader:
    """A cursor over one line of promtool's output, for Go's quoted strings and label sets."""

    def __init__(self, text: str, line: int) -> None:
        self.text, self.at, self.line = text, 0, line

    def fail(self, what: str) -> PromtoolOutputError:
        near = self.text[self.at : self.at + 40]
        return PromtoolOutputError(f"promtool output line {self.line}: {what} at {near!r}")

    def take(self, literal: str) -> None:
        if not self.text.startswith(literal, self.at):
            raise self.fail(f"expected {literal!r}")
        self.at += len(literal)

    def peek(self, literal: str) -> bool:
        return self.text.startswith(literal, self.at)

    def quoted(self) -> str:
        """A string as Go's strconv.Quote writes it."""
        self.take('"')
        out: list[str] = []
        while True:
            if self.at >= len(self.text):
                raise self.fail("a quoted string that never ends")
            char = self.text[self.at]
            self.at += 1
            if char == '"':
                return "".join(out)
            if char != "\\":
                out.append(char)
                continue
            code = self.text[self.at : self.at + 1]
            self.at += 1
            if code in _ESCAPES:
                out.append(_ESCAPES[code])
            elif code in ("x", "u", "U"):
                width = {"x": 2, "u": 4, "U": 8}[code]
                digits = self.text[self.at : self.at + width]
                if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
                    raise self.fail(f"a bad \\{code} escape")
                self.at += width
                if int(digits, 16) > 0x10FFFF:
                    raise self.fail("an escape beyond Unicode")
                out.append(chr(int(digits, 16)))
            else:
                raise self.fail(f"an unknown escape \\{code}")

    def labels(self) -> tuple[tuple[str, str], ...]:
        """A label set as Prometheus prints one: ``{name="value", ...}``."""
        self.take("{")
        pairs: list[tuple[str, str]] = []
        while not self.peek("}"):
            if pairs:
                self.take(", ")
            match = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*").match(self.text, self.at)
            if match is None:
                raise self.fail("expected a label name")
            self.at = match.end()
            self.take("=")
            pairs.append((match[0], self.quoted()))
        self.take("}")
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise self.fail("a label set naming a label twice")
        return tuple(pairs)

    def number(self) -> float:
        match = re.compile(r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf|NaN)").match(
            self.text, self.at
        )
        if match is None:
            raise self.fail("expected a number")
        self.at = match.end()
        return float(match[0])

    def end(self) -> None:
        if self.at != len(self.text):
            raise self.fail("unexpected text")


def parse_promtool_output(text: str) -> list[Answer]:
    """Every query answer in the output of a failed ``promtool test rules``.

    A failing ``promql_expr_test`` reads (promtool 2.x)::

        expr: "<query>", time: <duration>,
            exp: nil
            got: {<labels>} <value>, {<labels>} <value>

    Raises:
        PromtoolOutputError: a query line that does not read so, or one whose evaluation
            failed (``err:``).
    """
    lines = text.splitlines()
    answers: list[Answer] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line.lstrip().startswith("expr:"):
            continue
        head = _Reader(line.lstrip(), index)
        head.take("expr: ")
        expr = head.quoted()
        head.take(", time: ")
        rest = head.text[head.at :]
        duration, _, after = rest.partition(",")
        time_s = parse_duration(duration)
        if after.strip().startswith("err:"):
            raise PromtoolOutputError(f"promtool could not evaluate {expr!r}: {after.strip()}")
        if after.strip():
            raise head.fail("unexpected text after the time")
        if index + 1 >= len(lines) or not lines[index].strip().startswith("exp: "):
            raise PromtoolOutputError(
                f"promtool output line {index + 1}: expected 'exp: …' and 'got: …' after the "
                f"query {expr!r}"
            )
        got = _Reader(lines[index + 1].strip(), index + 2)
        index += 2
        got.take("got: ")
        samples: list[tuple[tuple[tuple[str, str], ...], float]] = []
        if got.peek("nil"):
            got.take("nil")
        else:
            while True:
                labels = got.labels()
                got.take(" ")
                samples.append((labels, got.number()))
                if not got.peek(", "):
                    break
                got.take(", ")
        got.end()
        answers.append(Answer(expr, time_s, tuple(samples)))
    return answers


# --- one chunk ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Firing:
    """An alert series that started firing ``count`` times in a chunk, first and last at
    ``first_s`` and ``last_s`` (seconds from the start of the measurement)."""

    alert: str
    labels: tuple[tuple[str, str], ...]
    count: int
    first_s: float
    last_s: float

    @property
    def device(self) -> str | None:
        return dict(self.labels).get("device")

    def as_dict(self) -> dict[str, Any]:
        return {"alert": self.alert, "labels": dict(self.labels), "count": self.count,
                "first_s": self.first_s, "last_s": self.last_s}  # fmt: skip


def firings_from_output(text: str, queries: ChunkQueries, offset_s: float) -> list[Firing]:
    """The alerts that started firing in a chunk, read from promtool's output of the chunk
    test; ``offset_s`` is when the chunk's time 0 is in the measurement.

    Raises:
        PromtoolOutputError: an answer missing, twice, at the wrong time or inconsistent; the
            probe alert not firing at every evaluation (so nothing was evaluated as asked).
    """
    answers: dict[str, Answer] = {}
    for answer in parse_promtool_output(text):
        if answer.expr not in queries.all():
            raise PromtoolOutputError(
                f"promtool answered a query it was not asked: {answer.expr!r}"
            )
        if answer.expr in answers:
            raise PromtoolOutputError(f"promtool answered {answer.expr!r} twice")
        if answer.time_s != queries.eval_s:
            raise PromtoolOutputError(
                f"promtool answered at {answer.time_s:g} s, not at {queries.eval_s} s as asked"
            )
        answers[answer.expr] = answer
    probe = answers.get(queries.probe)
    probe_counts = [value for _, value in probe.samples] if probe else []
    if probe_counts != [queries.count_steps]:
        raise PromtoolOutputError(
            f"the probe alert fired at {probe_counts or 'no'} evaluations, not at each of the "
            f"{queries.count_steps} of the chunk: promtool did not evaluate the rules as asked"
        )

    def by_labels(expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        answer = answers.get(expr)
        found: dict[tuple[tuple[str, str], ...], float] = {}
        for labels, value in answer.samples if answer else ():
            if labels in found:
                raise PromtoolOutputError(f"promtool gave the series {dict(labels)} twice")
            found[labels] = value
        return found

    counts, firsts, lasts = (
        by_labels(queries.onsets),
        by_labels(queries.first),
        by_labels(queries.last),
    )
    if not set(counts) == set(firsts) == set(lasts):
        raise PromtoolOutputError("promtool's counts and times of alerts name different series")
    first_step = (queries.eval_s // STEP_S - queries.count_steps + 1) * STEP_S
    firings = []
    for labels, count in sorted(counts.items()):
        alert = dict(labels).get("alertname")
        first, last = firsts[labels], lasts[labels]
        if alert is None:
            raise PromtoolOutputError(f"an alert series without an alert name: {dict(labels)}")
        if count != int(count) or not 1 <= count <= queries.count_steps:
            raise PromtoolOutputError(f"{alert} started firing {count:g} times in a chunk")
        if not first_step <= first <= last <= queries.eval_s or first % STEP_S or last % STEP_S:
            raise PromtoolOutputError(f"{alert} started firing at {first:g} s and {last:g} s, "
                                      f"outside the chunk's evaluations")  # fmt: skip
        if alert == PROBE or alert in ALWAYS_FIRING:
            continue
        kept = tuple((name, value) for name, value in labels if name not in ("alertstate",))
        firings.append(Firing(alert, kept, int(count), first + offset_s, last + offset_s))
    return firings


def run_promtool(test_file: Path) -> str:
    """Run ``promtool test rules`` on ``test_file``; its output (stderr after stdout).

    Raises:
        PromtoolError: no promtool, or it did not finish in time.
    """
    promtool = shutil.which("promtool")
    if promtool is None:
        raise PromtoolError("promtool is not installed (Debian: apt install prometheus)")
    try:
        result = subprocess.run(
            [promtool, "test", "rules", str(test_file)],
            capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        raise PromtoolError(f"promtool took over {PROMTOOL_TIMEOUT_S:g} s on one chunk") from err
    output = result.stdout + "\n" + result.stderr
    if result.returncode == 0:
        raise PromtoolOutputError("promtool found nothing to report, not even the probe alert")
    if "expr:" not in output:
        tail = " ".join(output.split())[-500:]
        raise PromtoolError(f"promtool failed (exit status {result.returncode}): {tail}")
    return output


# --- the measurement ------------------------------------------------------------------------


@dataclass
class Report:
    """What one measurement found."""

    devices: int
    days: float
    seed: int
    rules: list[str]  # the alert rules that count (those that can be false positives)
    firings: list[Firing] = field(default_factory=list)
    seconds: float = 0.0
    promtool_seconds: float = 0.0
    chunks: int = 0

    @property
    def alert_days(self) -> float:
        return len(self.rules) * self.days

    @property
    def total_firings(self) -> int:
        return sum(firing.count for firing in self.firings)

    @property
    def per_alert_day(self) -> float:
        """Firings per alert rule per day."""
        return self.total_firings / self.alert_days

    def per_alert(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for firing in self.firings:
            counts[firing.alert] += firing.count
        return {rule: counts[rule] for rule in self.rules if counts[rule]}

    def device_days_with_alert(self) -> int:
        """Device-days on which at least one alert about that device started firing (a
        chunk never spans midnight, so a firing's first onset names its day)."""
        return len({(firing.device, int(firing.first_s // DAY_S))
                    for firing in self.firings if firing.device is not None})  # fmt: skip

    @property
    def device_days(self) -> int:
        """The device-days measured; a part of a day counts as a day."""
        return self.devices * math.ceil(self.days)

    @property
    def device_day_share(self) -> float:
        return self.device_days_with_alert() / self.device_days

    def fleet_firings(self) -> int:
        """Firings of alerts about the whole fleet or the server, not one device."""
        return sum(firing.count for firing in self.firings if firing.device is None)

    @property
    def within_aim(self) -> bool:
        return self.device_day_share < AIM

    def as_dict(self) -> dict[str, Any]:
        return {
            "devices": self.devices, "days": self.days, "seed": self.seed,
            "alert_rules": self.rules, "excluded": ALWAYS_FIRING,
            "firings": self.total_firings, "alert_days": self.alert_days,
            "firings_per_alert_day": self.per_alert_day, "per_alert": self.per_alert(),
            "device_days": self.device_days,
            "device_days_with_alert": self.device_days_with_alert(),
            "device_day_share": self.device_day_share, "fleet_firings": self.fleet_firings(),
            "aim": AIM, "within_aim": self.within_aim, "seconds": round(self.seconds, 1),
            "promtool_seconds": round(self.promtool_seconds, 1), "chunks": self.chunks,
            "alerts": [firing.as_dict() for firing in self.firings],
        }  # fmt: skip

    def lines(self) -> list[str]:
        """The report for a terminal."""
        out = [
            f"{self.devices} healthy devices, {self.days:g} days, seed {self.seed}: "
            f"{self.chunks} promtool runs, {self.seconds:.1f} s ({self.promtool_seconds:.1f} s "
            f"in promtool)",
            f"alert rules counted: {len(self.rules)} (not counted: "
            + ", ".join(f"{name}, {why}" for name, why in ALWAYS_FIRING.items())
            + ")",
            f"firings: {self.total_firings}, {self.per_alert_day:.4f} per alert-day "
            f"({self.fleet_firings()} about the fleet or server)",
        ]
        for alert, count in sorted(self.per_alert().items(), key=lambda item: -item[1]):
            out.append(f"  {alert}: {count} ({count / self.days:.2f} a day)")
        verdict = "within" if self.within_aim else "NOT within"
        out.append(
            f"device-days with any alert: {self.device_days_with_alert()} of "
            f"{self.device_days} = {self.device_day_share:.2%} ({verdict} the aim "
            f"of < {AIM:.0%})"
        )
        return out


def alert_names(rules: Path) -> list[str]:
    """The alerts of a rules file, in order.

    Raises:
        PromtoolError: the file cannot be read as a Prometheus rules file.
    """
    try:
        groups = yaml.safe_load(rules.read_text(encoding="utf-8"))["groups"]
        return [
            str(rule["alert"]) for group in groups for rule in group["rules"] if "alert" in rule
        ]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise PromtoolError(f"{rules}: not a readable Prometheus rules file ({err})") from err


def measure(
    devices: int,
    days: float,
    seed: int,
    *,
    rules: Path = RULES,
    params: NoiseParameters | None = None,
    chunk_hours: int = 6,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Measure how often the alerts of ``rules`` fire on ``devices`` healthy devices over
    ``days`` simulated days (``seed`` decides the noise).

    Raises:
        ValueError: a fleet, a duration or a chunk size that cannot be measured.
        PromtoolError, PromtoolOutputError: promtool could not give an answer to trust.
    """
    if chunk_hours not in (1, 2, 3, 4, 6, 8, 12, 24):
        raise ValueError(f"chunk_hours must divide a day, not {chunk_hours}")
    total_steps = round(days * DAY_S / STEP_S)
    if total_steps < 1 or not math.isfinite(days):
        raise ValueError(f"days must be at least one evaluation ({STEP_S} s), not {days!r}")
    chunk_steps = chunk_hours * 3600 // STEP_S
    warm_steps = WARMUP_S // STEP_S
    names = alert_names(rules)
    report = Report(devices, days, seed, [name for name in names if name not in ALWAYS_FIRING])
    started = time.monotonic()
    fleet = HealthyFleet(devices, seed, params)
    tail: Window = {}
    with tempfile.TemporaryDirectory(prefix="fleet-false-positives-") as work:
        probe = Path(work) / "probe.rules.yml"
        probe.write_text(yaml.safe_dump(probe_rules()), encoding="utf-8")
        done = 0
        while done < total_steps:
            steps = min(chunk_steps, total_steps - done)
            window = fleet.window(steps)
            warm = len(next(iter(tail.values()))) if tail else 0
            joined = {key: tail.get(key, [None] * warm) + values for key, values in window.items()}
            queries = ChunkQueries(count_steps=steps, eval_s=(warm + steps - 1) * STEP_S)
            test_file = Path(work) / "chunk.test.json"
            test_file.write_text(chunk_test(joined, [rules, probe], queries), encoding="utf-8")
            before = time.monotonic()
            output = run_promtool(test_file)
            report.promtool_seconds += time.monotonic() - before
            firings = firings_from_output(output, queries, (done - warm) * STEP_S)
            report.firings.extend(firings)
            report.chunks += 1
            if progress is not None:
                progress(
                    f"{done * STEP_S / 3600:7.1f} h to {(done + steps) * STEP_S / 3600:7.1f} h: "
                    f"{sum(f.count for f in firings)} firings ({time.monotonic() - before:.1f} s)"
                )
            tail = {key: values[-warm_steps:] for key, values in joined.items()}
            done += steps
    report.seconds = time.monotonic() - started
    return report


# --- the command ----------------------------------------------------------------------------


@exits(3, "the share of device-days with an alert is not below the aim (5 %)")
@click.command("false-positives")
@click.option(
    "--devices",
    type=click.IntRange(1, 100_000),
    default=50,
    show_default=True,
    help="Healthy devices in the simulated fleet.",
)
@click.option(
    "--days",
    type=FiniteFloatRange(min=0, min_open=True, max=366),
    default=1.0,
    show_default=True,
    help="Simulated days (evaluated 30 s apart).",
)
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the noise.")
@click.option(
    "--rules",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=RULES,
    show_default="deploy/monitoring/prometheus/rules/fleet.rules.yml",
    help="The alert rules file.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the report, with every alert that fired, as JSON here.",
)
def false_positives(devices: int, days: float, seed: int, rules: Path,
                    json_path: Path | None) -> None:  # fmt: skip
    """Measure how often the alert rules fire on a healthy fleet with ordinary noise.

    The rules run in promtool over simulated series of DEVICES devices for DAYS days; the
    report gives firings per alert-day, per alert, and the share of device-days with any
    alert (docs/chaos.md, "False positives").
    """
    try:
        report = measure(devices, days, seed, rules=rules,
                         progress=lambda line: click.echo(line, err=True))  # fmt: skip
    except ValueError as err:
        raise click.BadParameter(str(err)) from err
    for line in report.lines():
        click.echo(line)
    if json_path is not None:
        atomic_write(json_path, (json.dumps(report.as_dict(), indent=2) + "\n").encode())
    if not report.within_aim:
        sys.exit(3)
