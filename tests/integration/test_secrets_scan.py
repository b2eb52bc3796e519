"""No tracked file holds a secret that is not in the reviewed baseline (.secrets.baseline).

detect-secrets-hook scans every file git tracks; each finding of the baseline was reviewed and
is no secret (``"is_secret": false``: test vectors, made-up test values, the throwaway test
database's password; docs/security.md lists them). A new finding fails the test: remove the
secret, or, if it is none, review it and add it with ``detect-secrets scan --baseline
.secrets.baseline`` then ``detect-secrets audit .secrets.baseline``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ROOT / ".secrets.baseline"
HOOK = Path(sys.executable).with_name("detect-secrets-hook")


def tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    # a tracked file deleted in the working tree has nothing left to scan; the baseline holds
    # only the SHA-1 of each reviewed finding, which looks like a secret to the scan itself
    return [
        name
        for name in listed.split("\0")
        if name and name != BASELINE.name and (ROOT / name).is_file()
    ]


def scan(baseline: Path, files: list[str]) -> subprocess.CompletedProcess[str]:
    """The hook over ``files`` against a copy of ``baseline`` (the hook rewrites the baseline it
    is given when line numbers moved: the checkout's stays as committed)."""
    return subprocess.run(
        [str(HOOK), "--baseline", str(baseline), *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_no_tracked_file_holds_an_unreviewed_secret(tmp_path: Path) -> None:
    copy = tmp_path / "baseline.json"
    shutil.copyfile(BASELINE, copy)
    files = tracked_files()
    assert "server/app.py" in files and len(files) > 100
    result = scan(copy, files)
    # 0: nothing new; 3: nothing new, only known findings moved or gone (the copy was updated)
    assert result.returncode in (0, 3), result.stdout + result.stderr


def test_every_baseline_finding_was_reviewed_as_no_secret() -> None:
    results = json.loads(BASELINE.read_text())["results"]
    findings = [(name, entry) for name, entries in results.items() for entry in entries]
    assert findings
    unreviewed = [
        (name, entry["line_number"])
        for name, entry in findings
        if entry.get("is_secret") is not False
    ]
    assert unreviewed == []


def test_the_scan_refuses_a_new_secret(tmp_path: Path) -> None:
    """The same scan, over a file holding a key it has never seen, fails (the plugins of the
    baseline are live, not an empty list)."""
    copy = tmp_path / "baseline.json"
    shutil.copyfile(BASELINE, copy)
    leaked = tmp_path / "leaked.py"
    # assembled here so that this file itself holds no finding
    leaked.write_text('AWS_KEY = "' + "AKIA" + "QX7B2LMN4RT5WZ8C" + '"\n')
    result = scan(copy, [str(leaked)])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "AWS" in result.stdout
