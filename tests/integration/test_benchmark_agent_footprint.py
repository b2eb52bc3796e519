"""benchmarks/agent_footprint.py works: a quick run (a real daemon process on a virtual
device, a real server behind the counting relay, a 1 MiB release) prints figures that are
there and sane, and the verdicts follow them. The figures are not judged against the aims
here: a missed aim is the benchmark's finding, not a failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "agent_footprint.py"
MiB = 1 << 20


def test_a_quick_run_measures_the_idle_day_and_an_install(tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(figures), "--workdir", str(work)],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(figures.read_text())
    floor, imports = result["baselines"]
    assert 0 < floor["peak_rss_kib"] < imports["peak_rss_kib"]
    assert 0 < floor["cpu_s"] <= imports["cpu_s"]
    idle, install = result["idle"], result["install"]
    # a compressed day: the shipped intervals divided by the factor
    assert result["intervals"]["checkin_interval_s"] == 60.0
    assert idle["window"]["device_s"] == pytest.approx(5 * 60.0, rel=0.2)
    for row in (idle, install):
        assert 0 < row["cpu_percent"] < 100
        assert imports["peak_rss_kib"] <= row["peak_rss_kib"] < 500 * 1024
        assert row["bytes_per_day"] > 0
    # about one check-in and one heartbeat a minute (a 5-minute window: a duty more or less)
    for kind in ("checkin", "heartbeat"):
        assert 1440 * 3 / 5 <= idle["requests_per_day"][kind] <= 1440 * 7 / 5, idle
        assert 0 < idle["window"]["heads_by_kind"][kind] < idle["window"]["bytes_by_kind"][kind]
    assert "blobs" not in idle["window"]["bytes_by_kind"]
    assert idle["session_bytes"] > 0 and idle["bytes_per_day_by_kind"]["session"] > 0
    assert sum(idle["bytes_per_day_by_kind"].values()) == pytest.approx(idle["bytes_per_day"])
    assert idle["rss_anon_kib"] > 0 and idle["rss_file_kib"] > 0
    # the release is random bytes: downloaded whole, once
    assert install["image_bytes"] == MiB
    assert MiB <= install["window"]["bytes_by_kind"]["blobs"] < 2 * MiB
    assert install["bytes"] >= MiB
    assert install["bytes_per_day"] == pytest.approx(idle["bytes_per_day"] + install["bytes"])
    assert install["cpu_s"] > 0 and install["cpu_s_after_reboot"] > 0
    # the verdicts follow the figures
    cpu = max(idle["cpu_percent"], install["cpu_percent"])
    rss_mb = max(idle["peak_rss_kib"], install["peak_rss_kib"]) * 1024 / 1e6
    assert [a["met"] for a in result["aims"]] == [
        cpu < 1.0,
        rss_mb <= 40.0,
        idle["bytes_per_day"] < 1e6,
    ]
    assert done.stdout.count("aim: ") == 3
    assert "interpreter floor" in done.stdout and "one install" in done.stdout
    assert list(work.iterdir()) == []  # the lab is removed


def test_bad_options_are_usage_errors() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--factor", "0"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--factor: give 1 to 120, not 0" in done.stderr
