"""How `make mutation-survivors` merges a re-run into the last results (tests/mutation/run.py).

mutmut is not needed: only the bookkeeping around it runs here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.mutation import run
from tests.mutation.run import Group, merge_results, previous_survivors, source_hash

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
    result = merge_results(last_run(), narrowed, GROUP.tests, fresh, 5.0, rerun=True)
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
    result = merge_results(last_run(), narrowed, GROUP.tests, fresh, 7.0, rerun=False)
    assert statuses(result) == {
        "keyring_1": "killed",
        "keyring_2": "survived",
        "keys_1": "survived",
    }
    assert result["run_seconds"] == 107.0  # the kept module's run and this one


def test_outcomes_of_a_module_changed_since_are_dropped() -> None:
    narrowed = Group("signing", ["signing/keys.py"], GROUP.tests)
    previous = last_run(keyring="0" * 64)
    result = merge_results(previous, narrowed, GROUP.tests, [], 1.0, rerun=False)
    assert result["modules"] == ["signing/keys.py"]
    assert result["mutants"] == []
    assert result["run_seconds"] == 1.0  # nothing kept: this run's time alone
    assert result["sources"] == {"signing/keys.py": source_hash("signing/keys.py")}


def test_survivors_are_what_the_last_run_did_not_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run, "RESULTS_DIR", tmp_path)
    with pytest.raises(SystemExit, match="no earlier results"):
        previous_survivors(GROUP)
    (tmp_path / "signing.json").write_text(json.dumps(last_run()), "utf-8")
    assert previous_survivors(GROUP) == ["keyring_2", "keys_2"]
    assert previous_survivors(Group("signing", ["signing/keys.py"], [])) == ["keys_2"]


def test_survivors_of_a_changed_module_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run, "RESULTS_DIR", tmp_path)
    (tmp_path / "signing.json").write_text(json.dumps(last_run(keys="0" * 64)), "utf-8")
    with pytest.raises(SystemExit, match="signing/keys.py changed"):
        previous_survivors(GROUP)
    # a module the last run never mutated has no recorded source: refused the same way
    (tmp_path / "signing.json").write_text(json.dumps({**last_run(), "sources": {}}), "utf-8")
    with pytest.raises(SystemExit, match="signing/keyring.py changed"):
        previous_survivors(GROUP)
