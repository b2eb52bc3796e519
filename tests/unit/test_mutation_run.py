"""How `make mutation-survivors` picks what to run again and merges it into the last results
(tests/mutation/run.py, tests/mutation/changed.py).

mutmut is not needed: only the bookkeeping around it runs here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.mutation import run
from tests.mutation.changed import Rerun, function_of, mutated_functions, plan, source_at
from tests.mutation.run import Group, merge_results, rerun_plan, source_hash

GROUP = Group("signing", ["signing/keyring.py", "signing/keys.py"], ["tests/unit/test_keys.py"])


def outcome(name: str, module: str, status: str) -> dict[str, Any]:
    return {"name": name, "module": module, "status": status, "seconds": 0.1, "diff": ""}


def last_run(**sources: str) -> dict[str, Any]:
    return {
        "group": "signing",
        "modules": ["signing/keyring.py", "signing/keys.py"],
        "sources": {
            "signing/keyring.py": sources.get("keyring", source_hash("signing/keyring.py")),
            "signing/keys.py": sources.get("keys", source_hash("signing/keys.py")),
        },
        "tests": [],
        "run_seconds": 100.0,
        "mutants": [
            outcome("keyring_1", "signing/keyring.py", "killed"),
            outcome("keyring_2", "signing/keyring.py", "survived"),
            outcome("keys_1", "signing/keys.py", "killed"),
            outcome("keys_2", "signing/keys.py", "no tests"),
        ],
    }


def statuses(result: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["status"] for m in result["mutants"]}


def test_a_survivors_run_replaces_only_the_mutants_it_ran() -> None:
    narrowed = Group("signing", ["signing/keys.py"], GROUP.tests)
    fresh = [outcome("keys_2", "signing/keys.py", "killed")]
    result = merge_results(
        last_run(), narrowed, GROUP.tests, fresh, 5.0, Rerun(("keys_2",), frozenset())
    )
    assert statuses(result) == {
        "keyring_1": "killed",
        "keyring_2": "survived",
        "keys_1": "killed",
        "keys_2": "killed",
    }
    assert result["modules"] == ["signing/keyring.py", "signing/keys.py"]
    assert set(result["sources"]) == {"signing/keyring.py", "signing/keys.py"}
    assert result["run_seconds"] == 105.0


def test_a_full_run_of_one_module_keeps_the_unchanged_other_modules() -> None:
    narrowed = Group("signing", ["signing/keys.py"], GROUP.tests)
    fresh = [outcome("keys_1", "signing/keys.py", "survived")]  # numbering after a change
    result = merge_results(
        last_run(),
        narrowed,
        GROUP.tests,
        fresh,
        7.0,
    )
    assert statuses(result) == {
        "keyring_1": "killed",
        "keyring_2": "survived",
        "keys_1": "survived",
    }
    assert result["run_seconds"] == 107.0  # the kept module's run and this one


def test_outcomes_of_a_module_changed_since_are_dropped() -> None:
    narrowed = Group("signing", ["signing/keys.py"], GROUP.tests)
    previous = last_run(keyring="0" * 64)
    result = merge_results(
        previous,
        narrowed,
        GROUP.tests,
        [],
        1.0,
    )
    assert result["modules"] == ["signing/keys.py"]
    assert result["mutants"] == []
    assert result["run_seconds"] == 1.0  # nothing kept: this run's time alone
    assert result["sources"] == {"signing/keys.py": source_hash("signing/keys.py")}


def test_survivors_are_what_the_last_run_did_not_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run, "RESULTS_DIR", tmp_path)
    with pytest.raises(SystemExit, match="no earlier results"):
        rerun_plan(GROUP)
    (tmp_path / "signing.json").write_text(json.dumps(last_run()), "utf-8")
    plan_ = rerun_plan(GROUP)  # (its Rerun class is loaded by path: compare the fields)
    assert (plan_.names, plan_.stale) == (("keyring_2", "keys_2"), frozenset())
    narrowed = Group("signing", ["signing/keys.py"], [])
    assert rerun_plan(narrowed).names == ("keys_2",)


def test_a_last_run_whose_source_is_lost_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run, "RESULTS_DIR", tmp_path)
    (tmp_path / "signing.json").write_text(json.dumps(last_run(keys="0" * 64)), "utf-8")
    with pytest.raises(SystemExit, match="signing/keys.py: its source at the last run"):
        rerun_plan(GROUP)
    # a module the last run never mutated has no recorded source: refused the same way
    (tmp_path / "signing.json").write_text(json.dumps({**last_run(), "sources": {}}), "utf-8")
    with pytest.raises(SystemExit, match="signing/keyring.py: its source at the last run"):
        rerun_plan(GROUP)


OLD = """
def kept(x):
    return x + 1  # a comment


def edited(x):
    return x * 2


def gone():
    pass


class Box:
    def method(self):
        return 1
"""

NEW = """
class Box:
    def method(self):
        return 2


def edited(x):
    return x * 3


def kept(x):
    # another comment, and the function moved
    return x + 1


async def added():
    pass
"""


def test_only_the_mutants_of_changed_functions_and_the_survivors_run_again() -> None:
    assert set(mutated_functions(NEW)) == {"x_kept", "x_edited", "xǁBoxǁmethod", "x_added"}
    last = [
        outcome("m.x_kept__mutmut_1", "m.py", "killed"),
        outcome("m.x_kept__mutmut_2", "m.py", "survived"),
        outcome("m.x_edited__mutmut_1", "m.py", "survived"),
        outcome("m.x_gone__mutmut_1", "m.py", "killed"),
        outcome("m.xǁBoxǁmethod__mutmut_1", "m.py", "killed"),
    ]
    rerun = plan("m.py", OLD, NEW, last)
    assert rerun.names == (
        "m.x_kept__mutmut_2",
        "m.x_added__mutmut_*",
        "m.x_edited__mutmut_*",
        "m.xǁBoxǁmethod__mutmut_*",
    )
    assert rerun.stale == {("m.py", n) for n in ("x_added", "x_edited", "x_gone", "xǁBoxǁmethod")}
    assert rerun.selects("m.x_edited__mutmut_12") and rerun.selects("m.x_kept__mutmut_2")
    assert not rerun.selects("m.x_kept__mutmut_1") and not rerun.selects("m.x_kept__mutmut_21")
    assert function_of("server.rollouts.xǁBoxǁmethod__mutmut_3") == "xǁBoxǁmethod"


def test_a_re_run_drops_the_outcomes_of_changed_and_removed_functions() -> None:
    module = "signing/keys.py"  # merge_results hashes the group's modules: a real one
    last = [
        outcome(f"signing.keys.{name}", module, status)
        for name, status in [
            ("x_kept__mutmut_1", "killed"),
            ("x_kept__mutmut_2", "survived"),
            ("x_edited__mutmut_1", "killed"),
            ("x_edited__mutmut_2", "killed"),
            ("x_gone__mutmut_1", "killed"),
        ]
    ]
    previous = {"modules": [module], "sources": {}, "run_seconds": 10.0, "mutants": last}
    rerun = Rerun(
        ("signing.keys.x_kept__mutmut_2", "signing.keys.x_edited__mutmut_*"),
        frozenset({(module, "x_edited"), (module, "x_gone")}),
    )
    fresh = [outcome("signing.keys.x_edited__mutmut_1", module, "survived")]
    group = Group("signing", [module], [])
    result = merge_results(previous, group, [], fresh, 1.0, rerun)
    assert statuses(result) == {
        "signing.keys.x_kept__mutmut_1": "killed",  # its function is unchanged
        "signing.keys.x_kept__mutmut_2": "survived",
        "signing.keys.x_edited__mutmut_1": "survived",  # the new outcome; _2 is no more
    }
    assert result["run_seconds"] == 11.0


def test_the_last_run_s_source_is_found_in_the_history() -> None:
    root = Path(__file__).resolve().parents[2]
    module = "signing/keys.py"
    now = (root / module).read_bytes()
    assert source_at(root, module, source_hash(module)) == now.decode()
    assert source_at(root, module, "0" * 64) is None
