"""benchmarks/console_load.py works: the fleet it seeds is the one it describes, and a run on a
tiny fleet (a real server, Chromium) prints figures that make sense and exits 0. The figures
themselves are not judged here: a missed aim is the benchmark's finding, not a failure."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import func, select

from server.database import Database
from server.models import Device, Rollout, RolloutDevice
from server.schemas import Heartbeat
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "console_load.py"
CHROMIUM = Path("/usr/bin/chromium")


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("console_load", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("rollout", ["running", "paused"])
def test_seeded_fleet_has_the_spread_and_the_rollout_described(
    tmp_path: Path, rollout: str
) -> None:
    bench = load_benchmark()
    bench.seed(tmp_path / "data", 400, rollout)
    db = Database(Settings.create(tmp_path / "data").database_url)
    with db.read() as session:
        assert session.scalar(select(func.count()).select_from(Device)) == 400
        states = set(session.scalars(select(Device.state).distinct()))
        assert {"idle", "safe_mode", None} <= states
        assert len(set(session.scalars(select(Device.version).distinct()))) >= 5
        assert len(set(session.scalars(select(Device.role).distinct()))) >= 4
        assert set(session.scalars(select(Device.status).distinct())) >= {"active"}
        (only,) = session.scalars(select(Rollout)).all()
        assert only.state == rollout
        outcomes = session.scalars(
            select(RolloutDevice.outcome).where(RolloutDevice.rollout_id == only.id)
        ).all()
        assert "pending" in outcomes and "succeeded" in outcomes
        heartbeats = [
            json.loads(text)
            for text in session.scalars(select(Device.last_heartbeat))
            if text is not None
        ]
    assert heartbeats
    for beat in heartbeats:  # what a device sends, as the server validates it
        Heartbeat.model_validate(beat)
    db.engine.dispose()


def test_bad_sizes_are_usage_errors() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--devices", "0"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--devices, --runs and --requests must be at least 1" in done.stderr


def test_a_tiny_run_measures_every_page_and_states_the_aims(tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("FLEET_SKIP_BROWSER") == "1":
            pytest.skip("FLEET_SKIP_BROWSER=1: no browser benchmark")
        pytest.fail(f"{CHROMIUM} is missing: `make deps` installs Debian's chromium")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--devices", "200", "--runs", "1", "--requests", "10",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = json.loads(done.stdout.splitlines()[-1])["results"]
    assert result["devices"] == 200
    assert len(result["load_average"]) == 2  # before and after: how far to trust the run
    assert set(result["browser"]) == {
        "static file", "overview", "device list", "filtered", "deep page"
    }  # fmt: skip
    for name, figures in result["browser"].items():
        assert 0 < figures["response_end"] <= figures["dom_content_loaded"], name
        assert figures["dom_content_loaded"] <= figures["load"], name
        assert figures["usable"] > 0, name
    assert {"device list", "filtered", "search", "sorted", "deep page", "all pages",
            "static file"} == set(result["server"])  # fmt: skip
    for name, figures in result["server"].items():
        assert 0 < figures["p50"] <= figures["p95"], name
    assert result["server"]["all pages"]["cpu"] > 0
    usable, render = result["aims"]
    assert usable["met"] == (usable["figure_ms"] < 2000)
    assert render["met"] == (render["figure_ms"] < 150)
    assert render["figure_ms"] == pytest.approx(result["server"]["all pages"]["p95"], abs=0.1)
    assert done.stdout.count("aim: ") == 2
    # the figures with their ratios to the static file measured the same way in the same run
    lines = done.stdout.splitlines()
    table = [line for line in lines if line[:14].strip() in {*result["browser"], *result["server"]}]
    assert len(table) == len(result["browser"]) + len(result["server"]), table
    assert all(line.count("x)") >= 2 for line in table), table
    static = [line for line in table if line.startswith("static file")]
    assert len(static) == 2 and all(line.count("(1.0x)") >= 2 for line in static), static
    assert list(tmp_path.iterdir()) == []  # the data directory is removed
