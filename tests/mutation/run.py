"""Run mutmut over the safety-critical modules, one group at a time (``make mutation``).

Each group of tests/mutation/groups.toml is one mutmut run in its own process, from a fresh
``./mutants`` copy, mutating only that group's modules and running only that group's tests. The
outcome of every mutant (and the diff of every one that was not killed) goes to
``build/mutation/results/<group>.json``, which tests/mutation/report.py reads.

Run as a script from the checkout (``.venv/bin/python tests/mutation/run.py``), never as
``-m tests.mutation.run``: the tests must import the mutated copy in ./mutants, so this process
imports neither the product packages nor the ``tests`` package before mutmut has put ./mutants
first on ``sys.path``.

``MUTATION_MODULES`` (space or comma separated paths such as ``signing/keys.py``, or group names)
selects a subset for a quick run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GROUPS_FILE = ROOT / "tests" / "mutation" / "groups.toml"
RESULTS_DIR = ROOT / "build" / "mutation" / "results"
MUTANTS_DIR = ROOT / "mutants"


@dataclasses.dataclass(frozen=True)
class Group:
    name: str
    modules: list[str]
    tests: list[str]
    deselect: list[str] = dataclasses.field(default_factory=list)


def load_groups(path: Path = GROUPS_FILE) -> list[Group]:
    data = tomllib.loads(path.read_text("utf-8"))
    return [
        Group(name, list(group["modules"]), list(group["tests"]), list(group.get("deselect", [])))
        for name, group in data["groups"].items()
    ]


def select(groups: list[Group], selection: str) -> list[Group]:
    """The groups to run, each narrowed to the selected modules (all of them when empty)."""
    wanted = {word for word in selection.replace(",", " ").split() if word}
    if not wanted:
        return groups
    known = {module for group in groups for module in group.modules} | {g.name for g in groups}
    unknown = wanted - known
    if unknown:
        raise SystemExit(f"unknown modules or groups in the selection: {sorted(unknown)}")
    chosen = []
    for group in groups:
        if group.name in wanted:
            chosen.append(group)
            continue
        modules = [module for module in group.modules if module in wanted]
        if modules:
            chosen.append(dataclasses.replace(group, modules=modules))
    return chosen


def run_group_here(group: Group, max_children: int) -> None:
    """Run mutmut for one group in this process and write its results file."""
    os.chdir(ROOT)
    from mutmut import configuration
    from mutmut.__main__ import _run

    tests = [test for test in group.tests if (ROOT / test).exists()]
    deselect = [arg for nodeid in group.deselect for arg in ("--deselect", nodeid)]
    config = configuration._load_config()
    configuration._config = dataclasses.replace(
        config,
        only_mutate=list(group.modules),
        pytest_add_cli_args_test_selection=[*tests, *deselect],
        # the tests are chosen above; pytest's cache and random plugins only add noise
        pytest_add_cli_args=["-p", "no:cacheprovider", *config.pytest_add_cli_args],
    )
    started = time.monotonic()
    _run([], max_children)
    elapsed = time.monotonic() - started
    write_results(group, tests, elapsed)


def write_results(group: Group, tests: list[str], elapsed: float) -> None:
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    mutants: list[dict[str, Any]] = []
    for module in group.modules:
        data = SourceFileMutationData(path=Path(module))
        data.load()
        for name, exit_code in sorted(data.exit_code_by_key.items()):
            status = status_by_exit_code[exit_code]
            mutants.append(
                {
                    "name": name,
                    "module": module,
                    "status": status,
                    "seconds": data.durations_by_key.get(name),
                    "diff": "" if status == "killed" else get_diff_for_mutant(name, path=module),
                }
            )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    result = {
        "group": group.name,
        "modules": group.modules,
        "tests": tests,
        "run_seconds": round(elapsed, 1),
        "mutants": mutants,
    }
    (RESULTS_DIR / f"{group.name}.json").write_text(json.dumps(result, indent=2) + "\n", "utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default=os.environ.get("MUTATION_MODULES", ""))
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--group", help=argparse.SUPPRESS)  # one group, in this process
    args = parser.parse_args(argv)

    groups = select(load_groups(), args.modules)
    if args.group:
        (group,) = (g for g in groups if g.name == args.group)
        run_group_here(group, args.max_children)
        return 0

    for group in groups:
        print(f"== mutation: {group.name}: {' '.join(group.modules)}", flush=True)
        shutil.rmtree(MUTANTS_DIR, ignore_errors=True)
        (RESULTS_DIR / f"{group.name}.json").unlink(missing_ok=True)
        command = [sys.executable, __file__, "--group", group.name]
        command += ["--modules", " ".join(group.modules), "--max-children", str(args.max_children)]
        returncode = subprocess.run(command, cwd=ROOT, check=False).returncode
        if returncode != 0:
            print(f"mutmut failed for {group.name} (exit {returncode})", file=sys.stderr)
            return returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
