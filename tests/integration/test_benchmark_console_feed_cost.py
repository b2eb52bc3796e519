"""benchmarks/console_feed_cost.py works: a short run holds every stream it says it measures
open (more than one session's and one token's worth), the streams of a changing fleet are sent
its changes, each row is printed with its ratio to the run's own row of no stream, and the
data directory is removed. The figures themselves are not judged here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from server.ui.feed import MAX_STREAMS_PER_SESSION
from server.ui.sessions import MAX_SESSIONS_PER_TOKEN

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "console_feed_cost.py"


def test_a_short_run_keeps_every_stream_open_and_prints_ratios(tmp_path: Path) -> None:
    streams = MAX_STREAMS_PER_SESSION * MAX_SESSIONS_PER_TOKEN + 3  # two tokens' sessions
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--streams", str(streams), "--seconds", "4"],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=300,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(done.stdout.splitlines()[-1])["rows"]
    assert [(row["streams"], row["fleet"]) for row in rows] == [
        (0, "quiet"), (0, "changing"), (streams, "quiet"), (streams, "changing"),
    ]  # fmt: skip
    by = {(row["streams"], row["fleet"]): row for row in rows}
    assert by[(0, "changing")]["kib_per_s_out"] == 0
    # each of the streams was sent the fleet's changes: at least one event line of each
    assert by[(streams, "changing")]["kib_per_s_out"] * 1024 * 4 >= streams * len("event: ")
    assert all(row["queries_per_s"] > 0 for row in rows)
    table = done.stdout.splitlines()[1:5]
    assert all(line.count("x)") == 2 or "(-)" in line for line in table), table
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_usage_errors() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--streams", "0"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--streams must be at least 1" in done.stderr
