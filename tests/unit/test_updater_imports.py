"""Importing any module of the ``updater`` package runs nothing: the Debian package's test
(tests/integration/test_packages.py) imports every module it ships, ``updater.cli.__main__``
included, to find what the updater loads at run time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# as test_packages.py imports them; a command that ran would print and exit before the last line
IMPORT_ALL = """
import importlib, pkgutil, updater
names = [info.name for info in pkgutil.walk_packages(updater.__path__, "updater.")]
for name in names:
    importlib.import_module(name)
print("imported", *sorted(names))
"""


def test_importing_every_updater_module_runs_no_command() -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, "--version"], cwd=ROOT, capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    assert words[0] == "imported" and "updater.cli.__main__" in words[1:], result.stdout
    assert len(result.stdout.splitlines()) == 1, result.stdout
