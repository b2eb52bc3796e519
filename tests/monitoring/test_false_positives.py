"""The false-positive rate of the alert rules on a healthy fleet (chaos/false_positives.py).

The measurement runs the real rules in promtool over simulated days of a healthy fleet; these
tests hold it to the roadmap's aim, prove it can fail (a twitchy rule is caught), and keep its
two halves honest: the noise is the same for a seed, and promtool's output is read exactly or
refused, never taken for "no alerts".
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from chaos.false_positives import (
    AIM,
    PROBE,
    RULES,
    ChunkQueries,
    PromtoolOutputError,
    Report,
    encode_values,
    false_positives,
    firings_from_output,
    measure,
    parse_duration,
    parse_promtool_output,
)
from chaos.noise import STEP_S, HealthyFleet, NoiseParameters, Sample
from tests.conftest import require_tools

# The default run: 50 devices for a day, as `fleet chaos false-positives` runs without options
DEVICES, DAYS, SEED = 50, 1.0, 1


@pytest.fixture(scope="module")
def default_report() -> Report:
    """The default run, measured once for the tests that compare with it."""
    require_tools(promtool=shutil.which("promtool") is not None)
    return measure(DEVICES, DAYS, SEED)


def twitchy_rules(tmp_path: Path) -> Path:
    """A copy of the rules whose DeviceOffline fires on a single late contact: no "for", and
    a threshold of one and a half contact intervals instead of five minutes."""
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    for group in document["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "DeviceOffline":
                assert "> 300" in rule["expr"]
                rule["expr"] = rule["expr"].replace("> 300", "> 90")
                del rule["for"]
    path = tmp_path / "twitchy.rules.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


# --- the measurement ------------------------------------------------------------------------


def test_a_healthy_fleet_stays_within_the_aim(default_report: Report) -> None:
    report = default_report
    assert report.chunks == 4  # a day in 6-hour chunks: promtool really ran each
    assert report.device_day_share < AIM, "\n".join(report.lines())


def test_a_twitchy_rule_is_caught(default_report: Report, tmp_path: Path) -> None:
    twitchy = measure(DEVICES, DAYS, SEED, rules=twitchy_rules(tmp_path))
    offline = twitchy.per_alert().get("DeviceOffline", 0)
    assert offline > 10 * max(1, default_report.per_alert().get("DeviceOffline", 0))
    assert twitchy.device_day_share > AIM, "\n".join(twitchy.lines())
    assert not twitchy.within_aim
    # the same noise: every other alert fired exactly as with the real rules
    others = {name: n for name, n in twitchy.per_alert().items() if name != "DeviceOffline"}
    real = {name: n for name, n in default_report.per_alert().items() if name != "DeviceOffline"}
    assert others == real


@pytest.mark.usefixtures("promtool")
def test_the_command_reports_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        false_positives,
        ["--devices", "3", "--days", "0.25", "--seed", "5", "--json", str(out),
         "--rules", str(twitchy_rules(tmp_path))],
    )  # fmt: skip
    assert result.exit_code == 3, result.output  # the twitchy rule is above the aim
    assert "device-days with any alert" in result.output
    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["devices"] == 3 and document["days"] == 0.25 and document["chunks"] == 1
    assert document["device_days"] == 3  # a part of a day counts as a day
    assert 0 < document["device_day_share"] <= 1
    assert document["per_alert"]["DeviceOffline"] == sum(
        alert["count"] for alert in document["alerts"] if alert["alert"] == "DeviceOffline"
    )
    assert "Watchdog" not in document["alert_rules"]


def test_the_command_refuses_a_fleet_of_none() -> None:
    result = CliRunner().invoke(false_positives, ["--devices", "0"])
    assert result.exit_code == 2
    assert "--devices" in result.output


# --- the noise ------------------------------------------------------------------------------


def test_the_noise_is_the_same_for_a_seed_whatever_the_windows() -> None:
    whole = HealthyFleet(4, seed=9).window(240)
    split = HealthyFleet(4, seed=9)
    first, second = split.window(100), split.window(140)
    assert whole.keys() == first.keys() == second.keys()
    for key, values in whole.items():
        assert values == first[key] + second[key], key
    other = HealthyFleet(4, seed=10).window(240)
    assert other != whole


def test_a_healthy_device_contacts_the_server_every_minute_or_so() -> None:
    """Without blips and lost requests, ages stay below one jittered interval plus a step."""
    quiet = NoiseParameters(lost_request_probability=0.0, blips_per_device_day=0.0,
                            server_scrape_failure_probability=0.0)  # fmt: skip
    window = HealthyFleet(5, seed=3, params=quiet).window(2 * 60 * 24)
    age = "fleet_device_last_seen_age_seconds"
    ages = [value for key, values in window.items() if key.startswith(age) for value in values]
    assert len(ages) == 5 * 2880
    assert all(value is not None and 0 <= value <= 66 for value in ages)
    temperatures = [value for key, values in window.items()
                    if "temperature" in key for value in values if value is not None]  # fmt: skip
    assert min(temperatures) > 30
    assert max(temperatures) < 80


def test_parameters_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="lost_request_probability"):
        NoiseParameters(lost_request_probability=1.5)
    with pytest.raises(ValueError, match="blip_min_s"):
        NoiseParameters(blip_min_s=200.0, blip_max_s=100.0)
    with pytest.raises(ValueError, match="at least one device"):
        HealthyFleet(0, seed=1)


# --- promtool's input -----------------------------------------------------------------------


def expand(text: str) -> list[Sample]:
    """promtool's expansion of ``values`` (the subset encode_values writes)."""
    out: list[Sample] = []
    for word in text.split():
        if word in ("_", "stale"):
            out.append(None)
            continue
        match = re.fullmatch(r"(-?[0-9.e+-]+?)([+-])([0-9.e+-]+)x(\d+)", word)
        if match:
            start, step = float(match[1]), float(match[3]) * (1 if match[2] == "+" else -1)
            out.extend(start + step * i for i in range(int(match[4]) + 1))
        else:
            out.append(float(word))
    return out


@given(st.lists(st.one_of(st.none(), st.integers(-5, 5).map(float),
                          st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: round(v, 3))),
                max_size=60))  # fmt: skip
def test_encoded_values_expand_to_the_samples(values: list[Sample]) -> None:
    expanded = expand(encode_values(values))
    assert len(expanded) == len(values)
    for got, want in zip(expanded, values, strict=True):
        assert (got is None) == (want is None)
        if got is not None and want is not None:
            assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-5)


def test_a_sawtooth_is_written_as_runs() -> None:
    assert encode_values([0.0, 30.0, 60.0, None, None, 5.0, 5.0, 5.0]) == "0+30x2 stale _ 5+0x2"
    with pytest.raises(ValueError, match="finite"):
        encode_values([1.0, math.nan])


# --- promtool's output ----------------------------------------------------------------------


def go_quote(text: str) -> str:
    """A string as Go's strconv.Quote writes it."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif not char.isprintable():
            out.append(f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def go_labels(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f"{name}={go_quote(value)}" for name, value in labels.items()) + "}"


def go_float(value: float) -> str:
    """strconv.FormatFloat(value, 'E', -1, 64): the shortest mantissa that reads back."""
    for precision in range(17):
        text = f"{value:.{precision}E}"
        if float(text) == value:
            mantissa, exponent = text.split("E")
            sign, digits = exponent[0], exponent[1:].lstrip("0").rjust(2, "0")
            return f"{mantissa}E{sign}{digits}"
    raise AssertionError(value)


def failure(expr: str, time: str, samples: list[tuple[dict[str, str], float]]) -> str:
    got = ", ".join(f"{go_labels(labels)} {go_float(value)}" for labels, value in samples)
    return (f"    expr: {go_quote(expr)}, time: {time},\n        exp: nil\n"
            f"        got: {got or 'nil'}\n")  # fmt: skip


QUERIES = ChunkQueries(count_steps=720, eval_s=(60 + 720 - 1) * STEP_S)
PROBE_LABELS = {"alertname": PROBE, "alertstate": "firing", "severity": "none"}


def output(*blocks: str) -> str:
    return "Unit Testing:  chunk.test.json\n  FAILED:\n" + "".join(blocks)


def answers(
    labels: dict[str, str], count: float, first_s: float, last_s: float, *, first: bool = True
) -> str:
    """The output of a chunk where one alert series started firing ``count`` times."""
    blocks = [probe_block(), failure(QUERIES.onsets, "6h29m30s", [(labels, count)])]
    if first:
        blocks.append(failure(QUERIES.first, "6h29m30s", [(labels, first_s)]))
    blocks.append(failure(QUERIES.last, "6h29m30s", [(labels, last_s)]))
    return output(*blocks)


def probe_block(count: float = 720) -> str:
    return failure(QUERIES.probe, "6h29m30s", [(PROBE_LABELS, count)])


label_values = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(label_values, st.integers(1, 720), st.integers(60, 779), st.integers(0, 719)),
        max_size=5,
        unique_by=lambda item: item[0],
    )
)
def test_firings_are_read_back_exactly(series: list[tuple[str, int, int, int]]) -> None:
    counts, firsts, lasts = [], [], []
    for device, count, first_step, extra in series:
        last_step = min(779, first_step + extra)
        labels = {"alertname": "DeviceOffline", "alertstate": "firing", "device": device,
                  "severity": "warning"}  # fmt: skip
        counts.append((labels, float(count)))
        firsts.append((labels, float(first_step * STEP_S)))
        lasts.append((labels, float(last_step * STEP_S)))
    text = output(
        probe_block(),
        failure(QUERIES.onsets, "6h29m30s", counts) if counts else "",
        failure(QUERIES.first, "6h29m30s", firsts) if firsts else "",
        failure(QUERIES.last, "6h29m30s", lasts) if lasts else "",
    )
    firings = firings_from_output(text, QUERIES, offset_s=1000.0)
    got = sorted((f.device or "", f.count, f.first_s, f.last_s) for f in firings)
    want = sorted(
        (device, count, first * STEP_S + 1000.0, min(779, first + extra) * STEP_S + 1000.0)
        for device, count, first, extra in series
    )
    assert got == want
    assert all(f.alert == "DeviceOffline" for f in firings)


def test_no_alerts_is_read_as_none_only_beside_the_probe() -> None:
    assert firings_from_output(output(probe_block()), QUERIES, 0.0) == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "probe"),  # nothing at all: never a silent zero
        ("Unit Testing:  chunk.test.json\n  SUCCESS\n", "probe"),
        (output(probe_block(719)), "probe"),  # an evaluation missing
        (output(probe_block().replace("6h29m30s", "6h")), "not at"),
        (output(probe_block(), probe_block()), "twice"),
        (output(failure("up == 0", "6h29m30s", [])), "not asked"),
        (output(probe_block().replace("got: {", "got: {{")), "label name"),
        (output(probe_block().replace('"none"}', '"none}')), "never ends"),
        (output(probe_block().replace("7.2E+02", "seven")), "number"),
        (output(probe_block().replace("7.2E+02", "7.2E+02 trailing")), "unexpected"),
        (output(probe_block().replace("6h29m30s", "6 hours")), "duration"),
        (output(probe_block().replace("exp: nil", "expected: nil")), "exp:"),
        (output(probe_block().rsplit("\n", 2)[0]), "exp:"),  # cut short
        (output(f"    expr: {go_quote(QUERIES.probe)}, time: 6h29m30s, err: boom\n"), "boom"),
        (
            answers({"alertname": "X", "alertstate": "firing"}, 2, 19980, 19980, first=False),
            "different series",
        ),  # a count without a first onset
        (answers({"alertstate": "firing"}, 1, 19980, 19980), "alert name"),
        (answers({"alertname": "X"}, 1.5, 19980, 19980), "1.5 times"),
        (answers({"alertname": "X"}, 1, 10, 10), "outside"),  # in the warm-up
        (answers({"alertname": "X"}, 1, 20015, 20015), "outside"),  # between evaluations
        (output(probe_block().replace('"none"', '"n\\q"')), "escape"),
        (output(probe_block().replace('severity="none"', 'alertname="x"')), "twice"),
    ],
)
def test_odd_output_is_one_clear_error(text: str, problem: str) -> None:
    with pytest.raises(PromtoolOutputError, match=re.escape(problem)):
        firings_from_output(text, QUERIES, 0.0)


@given(st.text(max_size=300))
def test_arbitrary_output_never_reads_as_no_alerts(text: str) -> None:
    with pytest.raises(PromtoolOutputError):
        firings_from_output(text, QUERIES, 0.0)


@given(st.text(max_size=200))
def test_the_parser_raises_only_its_own_error(text: str) -> None:
    with contextlib.suppress(PromtoolOutputError):
        parse_promtool_output("    expr: " + text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0s", 0), ("30s", 30), ("6h29m30s", 23370), ("1d", 86400), ("1w2d3h", 788400),
     ("500ms", 0.5)],
)  # fmt: skip
def test_durations_as_promtool_prints_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    with pytest.raises(PromtoolOutputError):
        parse_duration(text + "x")
