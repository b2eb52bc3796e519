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

``--survivors`` (``make mutation-survivors``) runs again only the mutants the last run did not
kill, and every mutant of a function changed since: a mutant already killed stays killed while
its function is unchanged and the tests only grow. The results file records each module's
SHA-256, which finds its source at that run in the git history (tests/mutation/changed.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
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


def source_hash(module: str) -> str:
    return hashlib.sha256((ROOT / module).read_bytes()).hexdigest()


def _changed() -> Any:
    """tests/mutation/changed.py, loaded by path: importing the ``tests`` package from here
    would shadow the copy in ./mutants that the mutated runs must import."""
    name = "mutation_changed"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("changed.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def rerun_plan(group: Group) -> Any:
    """What the group's last results leave to run: the survivors, and every mutant of a function
    new or changed since (see tests/mutation/changed.py); a ``Rerun``.

    Refuses when there is no earlier result, or a module's source at the last run cannot be
    found in the git history (a full run is needed then).
    """
    changed = _changed()
    path = RESULTS_DIR / f"{group.name}.json"
    try:
        previous = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as err:
        message = f"{group.name}: no earlier results to re-run ({err}): run make mutation"
        raise SystemExit(message) from err
    recorded = previous.get("sources", {})
    names: list[str] = []
    stale: set[tuple[str, str]] = set()
    for module in group.modules:
        old = changed.source_at(ROOT, module, recorded.get(module, ""))
        if old is None:
            raise SystemExit(
                f"{module}: its source at the last run is not in the git history (or it was "
                f"not in that run): run make mutation MODULES={module}"
            )
        last = [m for m in previous["mutants"] if m["module"] == module]
        rerun = changed.plan(module, old, (ROOT / module).read_text("utf-8"), last)
        names += rerun.names
        stale |= rerun.stale
    return changed.Rerun(tuple(names), frozenset(stale))


def run_group_here(group: Group, max_children: int, survivors: bool = False) -> None:
    """Run mutmut for one group in this process and write its results file.

    With ``survivors``, only the mutants the last run did not kill run, and their new outcomes
    are merged into the last results.
    """
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
    rerun = rerun_plan(group) if survivors else None
    if rerun is not None and not rerun.names:
        print(f"{group.name}: nothing to re-run", flush=True)
        if rerun.stale:  # functions went away: their outcomes go too
            write_results(group, tests, 0.0, rerun=rerun)
        return
    started = time.monotonic()
    _run(list(rerun.names) if rerun is not None else [], max_children)
    elapsed = time.monotonic() - started
    write_results(group, tests, elapsed, rerun=rerun)


def write_results(group: Group, tests: list[str], elapsed: float, rerun: Any = None) -> None:
    """Write the group's results file; with ``rerun`` (a ``Rerun``), merge the outcomes of the
    mutants it selects into the last one."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    mutants: list[dict[str, Any]] = []
    for module in group.modules if rerun is None or rerun.names else []:
        data = SourceFileMutationData(path=Path(module))
        data.load()
        for name, exit_code in sorted(data.exit_code_by_key.items()):
            if rerun is not None and not rerun.selects(name):
                continue
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
    path = RESULTS_DIR / f"{group.name}.json"
    previous = json.loads(path.read_text("utf-8")) if path.exists() else None
    result = merge_results(previous, group, tests, mutants, elapsed, rerun=rerun)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", "utf-8")


def merge_results(
    previous: dict[str, Any] | None,
    group: Group,
    tests: list[str],
    mutants: list[dict[str, Any]],
    elapsed: float,
    rerun: Any = None,
) -> dict[str, Any]:
    """The group's new results file: this run's outcomes over the last file's.

    The group's other modules keep their last outcomes while their source is unchanged (a run
    narrowed by MODULES leaves them be); after a re-run (``rerun``, a ``Rerun``), the mutants of
    this run's modules that were not run again keep theirs too, unless their function changed or
    went away since (``rerun.dropped``).
    """
    sources = {module: source_hash(module) for module in group.modules}
    run_seconds = round(elapsed, 1)
    modules = list(group.modules)
    if previous is not None:
        old_sources = previous.get("sources", {})
        kept = {
            module
            for module in previous["modules"]
            if module not in group.modules and old_sources.get(module) == source_hash(module)
        }
        fresh = {m["name"]: m for m in mutants}
        mutants = [
            fresh.pop(m["name"], m)
            for m in previous["mutants"]
            if m["module"] in kept
            or (
                rerun is not None
                and m["module"] in group.modules
                and not rerun.dropped(m["module"], m["name"])
            )
        ] + list(fresh.values())
        sources = {**{module: old_sources[module] for module in kept}, **sources}
        modules = [m for m in dict.fromkeys([*previous["modules"], *modules]) if m in sources]
        if rerun is not None or kept:  # the time these results took: every run merged into them
            run_seconds = round(previous["run_seconds"] + elapsed, 1)
    return {
        "group": group.name,
        "modules": modules,
        "sources": sources,
        "tests": tests,
        "run_seconds": run_seconds,
        "mutants": mutants,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", default=os.environ.get("MUTATION_MODULES", ""))
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="re-run only what the last run did not kill, and the mutants of changed functions",
    )
    parser.add_argument("--group", help=argparse.SUPPRESS)  # one group, in this process
    args = parser.parse_args(argv)

    groups = select(load_groups(), args.modules)
    if args.group:
        (group,) = (g for g in groups if g.name == args.group)
        run_group_here(group, args.max_children, args.survivors)
        return 0

    for group in groups:
        print(f"== mutation: {group.name}: {' '.join(group.modules)}", flush=True)
        if args.survivors:
            rerun_plan(group)  # refuse before any work when a last run's source is lost
        shutil.rmtree(MUTANTS_DIR, ignore_errors=True)
        command = [sys.executable, __file__, "--group", group.name]
        command += ["--modules", " ".join(group.modules), "--max-children", str(args.max_children)]
        command += ["--survivors"] if args.survivors else []
        returncode = subprocess.run(command, cwd=ROOT, check=False).returncode
        if returncode != 0:
            print(f"mutmut failed for {group.name} (exit {returncode})", file=sys.stderr)
            return returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
