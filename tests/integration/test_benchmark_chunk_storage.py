"""benchmarks/chunk_storage.py works: similar releases uploaded to a real server cost the disk
their new chunks, and the figures it prints add up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_similar_releases_cost_the_disk_only_their_new_chunks(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "chunk_storage.py"), "--size-mib", "8",
         "--patches", "2", "--workdir", str(tmp_path), "--json"],
        capture_output=True, text=True, check=False, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    first, *patches = result["releases"]
    assert len(patches) == 2
    assert first["disk_growth_bytes"] <= first["bundle_bytes"]
    for row in patches:  # a patch release stores a few chunks, not its image
        assert row["disk_growth_bytes"] < row["bundle_bytes"] / 4, row
    bundles = sum(row["bundle_bytes"] for row in result["releases"])
    assert result["bundles_bytes"] == bundles
    assert result["disk_to_bundles"] < 0.5
    assert result["disk_to_bundles"] == round(result["disk_bytes"] / bundles, 3)
    assert result["mirror_bytes"] > result["disk_bytes"]  # every image whole, for static hosts
