"""Which mutants still need a run after the code changed (``make mutation-survivors``).

mutmut mutates functions one at a time (top-level functions and the methods of top-level
classes) and numbers each function's mutants in order, naming them
``<module>.<mangled function>__mutmut_<n>``. So a function whose code is the same as at the last
run has the same mutants, and while the tests only grow, those the last run killed stay killed.
What needs a run is every mutant of a function that is new or changed, and the survivors of the
others; the outcomes of functions that changed or went away are dropped.

"The same code" is compared on the syntax tree (``ast.dump``): comments, blank lines and moving a
function about change nothing; any change to its code, docstring or decorators does. The last
run's source is found in the git history by the SHA-256 its results file recorded.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

CLASS_SEPARATOR = "ǁ"  # mutmut's, between "x", a class name and a method name


def mutated_functions(source: str) -> dict[str, str]:
    """The functions mutmut mutates in ``source``: mangled name → their code, as a tree."""
    functions: dict[str, str] = {}
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.parse(source).body:
        if isinstance(node, kinds):
            functions[f"x_{node.name}"] = ast.dump(node)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, kinds):
                    name = f"x{CLASS_SEPARATOR}{node.name}{CLASS_SEPARATOR}{item.name}"
                    functions[name] = ast.dump(item)
    return functions


def function_of(mutant: str) -> str:
    """``server.rollouts.x_evaluate__mutmut_12`` → ``x_evaluate``."""
    return mutant.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[-1]


def dotted(module: str) -> str:
    """``server/rollouts.py`` → ``server.rollouts``, as mutmut names a module's mutants."""
    return module.removesuffix(".py").replace("/", ".")


def source_at(root: Path, module: str, sha256: str) -> str | None:
    """The text ``module`` had when its SHA-256 was ``sha256``: the working tree's or a committed
    version's; ``None`` when no version in the history has it."""
    path = root / module
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
        return path.read_text("utf-8")
    commits = subprocess.run(
        ["git", "log", "--format=%H", "--", module],
        cwd=root, capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    for commit in commits:
        shown = subprocess.run(
            ["git", "show", f"{commit}:{module}"], cwd=root, capture_output=True, check=False
        )
        if shown.returncode == 0 and hashlib.sha256(shown.stdout).hexdigest() == sha256:
            return shown.stdout.decode("utf-8")
    return None


@dataclass(frozen=True)
class Rerun:
    """What to run again: mutant names and ``<module>.<function>__mutmut_*`` patterns; and the
    functions (``(module, mangled name)``) whose last outcomes no longer hold."""

    names: tuple[str, ...]
    stale: frozenset[tuple[str, str]]

    def selects(self, mutant: str) -> bool:
        return any(fnmatch.fnmatchcase(mutant, name) for name in self.names)

    def dropped(self, module: str, mutant: str) -> bool:
        return (module, function_of(mutant)) in self.stale


def plan(module: str, old_source: str, new_source: str, last: list[dict[str, object]]) -> Rerun:
    """The re-run of ``module`` from its source at the last run, its source now, and the last
    run's outcomes for it (``{"name", "status", ...}``)."""
    old, new = mutated_functions(old_source), mutated_functions(new_source)
    changed = {name for name, code in new.items() if old.get(name) != code}
    stale = changed | (old.keys() - new.keys())
    survivors = [
        str(m["name"])
        for m in last
        if m["status"] != "killed" and function_of(str(m["name"])) not in stale
    ]
    patterns = [f"{dotted(module)}.{name}__mutmut_*" for name in sorted(changed)]
    return Rerun(tuple(survivors + patterns), frozenset((module, name) for name in stale))
