"""benchmarks/install_throughput.py works: a tiny run installs both bundles (stored and zstd)
into a file slot, and into a loop device when it may make one (root), next to dd of the same
bytes and the reading alone; prints a row for each with its ratio to dd and its peak RSS, and a
line per install saying whether it meets its aim; removes what it made. The figures themselves
are not judged here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "install_throughput.py"


def test_a_tiny_run_prints_every_row_and_whether_each_install_meets_its_aim(
    tmp_path: Path,
) -> None:
    loop = os.geteuid() == 0 and shutil.which("losetup") is not None
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--size-mib", "8", "--rounds", "1",
         "--workdir", str(tmp_path), *([] if loop else ["--no-loop"])],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    kinds = ["file", "loop"] if loop else ["file"]
    rows = {line.split("  ")[0]: line for line in done.stdout.splitlines()[2:] if "aim" not in line}
    expected = ["verify none", "verify zstd"]
    for kind in kinds:
        expected += [f"dd -> {kind}", f"install none -> {kind}", f"install zstd -> {kind}"]
    assert [name.strip() for name in rows] == expected, done.stdout
    number = r"\d+(\.\d+)?"
    for name, line in rows.items():
        if name.startswith("install"):
            assert re.search(rf" {number} +{number} +{number}$", line), line
    aims = [line for line in done.stdout.splitlines() if line.startswith("aim ")]
    assert len(aims) == 2 * len(kinds), done.stdout
    for line in aims:
        assert re.match(
            rf"aim install (none|zstd) -> \w+: >= 0\.[89]0x dd and <= 64 MiB: (met|NOT met) "
            rf"\({number}x, {number} MiB; the reading alone: \d+ MB/s\)$",
            line,
        ), line
    assert list(tmp_path.iterdir()) == []
