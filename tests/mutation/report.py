"""The mutation report: per-module counts and score, and every survivor explained or not.

Reads the results tests/mutation/run.py wrote (``build/mutation/results/<group>.json``) and the
reviewed equivalent mutants (every ``*.toml`` in tests/mutation/equivalent/), writes
``build/mutation/report.txt`` and ``report.json``, and exits non-zero while any survivor is
unexplained (or a mutant was left unchecked).

An equivalent mutant is identified by what it changes, never by mutmut's number for it (numbers
shift whenever the function changes): the module, the function (``Class.method`` for a method),
and the source lines the mutation removes and adds, compared with surrounding whitespace stripped.

Only the standard library here: the unit tests (tests/unit/test_mutation_report.py) run without
mutmut installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "build" / "mutation" / "results"
REPORT_DIR = ROOT / "build" / "mutation"
EQUIVALENTS_DIR = ROOT / "tests" / "mutation" / "equivalent"

# mutmut's separator between a class and its method in a mutant's name ("xǁKeyringǁverify").
CLASS_SEPARATOR = "\u01c1"
# Statuses that mean the tests did not notice the mutant.
UNDETECTED = frozenset({"survived", "no tests"})
# Statuses that mean the tests noticed it (a mutant that hangs the tests is caught by the timeout).
DETECTED = frozenset({"killed", "timeout", "caught by type check"})


class ReportError(Exception):
    """A results or equivalents file that cannot be read as one."""


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str
    status: str
    diff: str = ""
    seconds: float | None = None

    @property
    def function(self) -> str:
        return function_of(self.name)

    @property
    def change(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return changed_lines(self.diff)


@dataclass(frozen=True)
class Equivalent:
    module: str
    function: str
    original: tuple[str, ...]
    mutated: tuple[str, ...]
    reason: str

    def matches(self, mutant: Mutant) -> bool:
        return (
            self.module == mutant.module
            and self.function == mutant.function
            and (self.original, self.mutated) == mutant.change
        )


@dataclass(frozen=True)
class GroupResult:
    group: str
    modules: tuple[str, ...]
    run_seconds: float
    mutants: tuple[Mutant, ...]


@dataclass
class ModuleSummary:
    module: str
    group: str
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    explained: list[tuple[Mutant, Equivalent]] = field(default_factory=list)
    unexplained: list[Mutant] = field(default_factory=list)
    unchecked: list[Mutant] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def detected(self) -> int:
        return sum(n for status, n in self.counts.items() if status in DETECTED)

    @property
    def score(self) -> float | None:
        """Detected mutants among those that could be detected (equivalents left out), in %."""
        relevant = self.total - len(self.explained)
        return None if relevant <= 0 else round(100.0 * self.detected / relevant, 1)


def function_of(mutant_name: str) -> str:
    """``signing.keyring.xǁKeyringǁverify__mutmut_3`` -> ``Keyring.verify``;
    ``signing.keys.x_key_id__mutmut_1`` -> ``key_id``."""
    if "__mutmut_" not in mutant_name:
        raise ReportError(f"not a mutmut mutant name: {mutant_name!r}")
    mangled = mutant_name.partition("__mutmut_")[0].rpartition(".")[2]
    if mangled.startswith("x" + CLASS_SEPARATOR):
        parts = mangled.split(CLASS_SEPARATOR)
        if len(parts) != 3 or not all(parts[1:]):
            raise ReportError(f"cannot read the method in mutant name {mutant_name!r}")
        return f"{parts[1]}.{parts[2]}"
    if not mangled.startswith("x_") or len(mangled) == 2:
        raise ReportError(f"cannot read the function in mutant name {mutant_name!r}")
    return mangled[2:]


def changed_lines(diff: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The removed and the added lines of a unified diff, each stripped of surrounding space."""
    removed: list[str] = []
    added: list[str] = []
    for line in diff.splitlines():
        if line.startswith(("---", "+++", "@@")):
            continue
        if line.startswith("-"):
            removed.append(line[1:].strip())
        elif line.startswith("+"):
            added.append(line[1:].strip())
    return tuple(removed), tuple(added)


def _lines(value: object, where: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, str):
        raise ReportError(f"{where}: {key} must be a string")
    if not value.strip():
        return ()  # a mutation that only removes lines adds none
    return tuple(line.strip() for line in value.strip("\n").split("\n"))


def parse_equivalents(text: str, source: str = "equivalent.toml") -> list[Equivalent]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ReportError(f"{source}: {err}") from err
    unknown = set(data) - {"equivalent"}
    if unknown:
        raise ReportError(f"{source}: unknown table(s) {sorted(unknown)}")
    entries = data.get("equivalent", [])
    if not isinstance(entries, list):
        raise ReportError(f"{source}: [[equivalent]] must be an array of tables")
    result = []
    keys = {"module", "function", "original", "mutated", "reason"}
    for index, entry in enumerate(entries, start=1):
        where = f"{source}: entry {index}"
        if set(entry) != keys:
            raise ReportError(f"{where}: needs the keys {sorted(keys)}, has {sorted(entry)}")
        for key in ("module", "function", "reason"):
            if not isinstance(entry[key], str) or not entry[key].strip():
                raise ReportError(f"{where}: {key} must be a non-empty string")
        original = _lines(entry["original"], where, "original")
        mutated = _lines(entry["mutated"], where, "mutated")
        if original == mutated:
            raise ReportError(f"{where}: original and mutated are the same")
        result.append(
            Equivalent(
                entry["module"], entry["function"], original, mutated, entry["reason"].strip()
            )
        )
    _refuse_duplicates(result, source)
    return result


def _refuse_duplicates(equivalents: Sequence[Equivalent], source: str) -> None:
    seen: set[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = set()
    for eq in equivalents:
        identity = (eq.module, eq.function, eq.original, eq.mutated)
        if identity in seen:
            raise ReportError(f"{source}: {eq.module} {eq.function} is listed twice: {eq.mutated}")
        seen.add(identity)


def load_equivalents(path: Path) -> list[Equivalent]:
    """The equivalents of one file, or of every ``*.toml`` in a directory (sorted by name)."""
    files = sorted(path.glob("*.toml")) if path.is_dir() else [path]
    result: list[Equivalent] = []
    for file in files:
        try:
            text = file.read_text("utf-8")
        except OSError as err:
            raise ReportError(f"{file}: {err}") from err
        result += parse_equivalents(text, str(file))
    _refuse_duplicates(result, str(path))
    return result


def parse_group_result(data: Any, source: str) -> GroupResult:
    try:
        mutants = tuple(
            Mutant(
                name=m["name"],
                module=m["module"],
                status=m["status"],
                diff=m.get("diff", ""),
                seconds=m.get("seconds"),
            )
            for m in data["mutants"]
        )
        return GroupResult(
            group=data["group"],
            modules=tuple(data["modules"]),
            run_seconds=float(data["run_seconds"]),
            mutants=mutants,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ReportError(f"{source}: not a mutation results file ({err!r})") from err


def load_results(directory: Path) -> list[GroupResult]:
    results = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as err:
            raise ReportError(f"{path}: {err}") from err
        results.append(parse_group_result(data, str(path)))
    return results


def summarise(
    groups: Iterable[GroupResult], equivalents: Sequence[Equivalent]
) -> tuple[list[ModuleSummary], list[Equivalent]]:
    """Per-module summaries, and the equivalents of mutated modules that matched no mutant."""
    summaries: dict[str, ModuleSummary] = {}
    used: set[int] = set()
    for group in groups:
        for module in group.modules:
            summaries.setdefault(module, ModuleSummary(module, group.group))
        for mutant in group.mutants:
            summary = summaries.setdefault(mutant.module, ModuleSummary(mutant.module, group.group))
            summary.counts[mutant.status] = summary.counts.get(mutant.status, 0) + 1
            summary.seconds += mutant.seconds or 0.0
            if mutant.status in UNDETECTED:
                match = next((i for i, eq in enumerate(equivalents) if eq.matches(mutant)), None)
                if match is None:
                    summary.unexplained.append(mutant)
                else:
                    used.add(match)
                    summary.explained.append((mutant, equivalents[match]))
            elif mutant.status not in DETECTED:
                summary.unchecked.append(mutant)
    stale = [eq for i, eq in enumerate(equivalents) if i not in used and eq.module in summaries]
    return list(summaries.values()), stale


def to_json(summaries: Sequence[ModuleSummary], groups: Sequence[GroupResult]) -> dict[str, Any]:
    def mutant(m: Mutant) -> dict[str, Any]:
        return {"name": m.name, "function": m.function, "status": m.status, "diff": m.diff}

    return {
        "groups": {
            g.group: {"run_seconds": g.run_seconds, "modules": list(g.modules)} for g in groups
        },
        "modules": {
            s.module: {
                "group": s.group,
                "total": s.total,
                "counts": dict(sorted(s.counts.items())),
                "score": s.score,
                "seconds": round(s.seconds, 1),
                "explained": [{**mutant(m), "reason": eq.reason} for m, eq in s.explained],
                "unexplained": [mutant(m) for m in s.unexplained],
                "unchecked": [mutant(m) for m in s.unchecked],
            }
            for s in summaries
        },
    }


def render_text(
    summaries: Sequence[ModuleSummary], groups: Sequence[GroupResult], stale: Sequence[Equivalent]
) -> str:
    out = ["Mutation testing (mutmut) of the safety-critical modules", ""]
    header = (
        f"{'module':<28}{'mutants':>8}{'killed':>8}{'survived':>9}{'timeout':>8}"
        f"{'no tests':>9}{'equiv.':>7}{'unexpl.':>8}{'score':>7}{'time':>8}"
    )
    out += [header, "-" * len(header)]
    for s in summaries:
        score = "-" if s.score is None else f"{s.score:.1f}%"
        out.append(
            f"{s.module:<28}{s.total:>8}{s.counts.get('killed', 0):>8}"
            f"{s.counts.get('survived', 0):>9}{s.counts.get('timeout', 0):>8}"
            f"{s.counts.get('no tests', 0):>9}{len(s.explained):>7}{len(s.unexplained):>8}"
            f"{score:>7}{s.seconds:>7.0f}s"
        )
    out.append("")
    for g in groups:
        out.append(f"group {g.group}: {len(g.mutants)} mutants in {g.run_seconds:.0f} s wall time")
    out.append("")
    out.append("(score: killed or timed out, among the mutants not explained as equivalent;")
    out.append(" time: the test time mutmut spent on the module's mutants, both workers added up)")
    for s in summaries:
        if s.unchecked:
            out += ["", f"== {s.module}: {len(s.unchecked)} mutant(s) not checked to the end"]
            out += [f"  {m.name}: {m.status}" for m in s.unchecked]
    for s in summaries:
        if s.unexplained:
            out += ["", f"== {s.module}: {len(s.unexplained)} unexplained survivor(s)"]
            for m in s.unexplained:
                out += ["", f"-- {m.function} ({m.status}; {m.name})", m.diff]
    for s in summaries:
        if s.explained:
            out += ["", f"== {s.module}: {len(s.explained)} explained (equivalent) survivor(s)"]
            for m, eq in s.explained:
                change = " / ".join(m.change[1]) or "(line removed)"
                out.append(f"  {m.function}: {change}\n      because {eq.reason}")
    if stale:
        out += ["", "== equivalents that matched no surviving mutant (stale? review them)"]
        out += [f"  {eq.module} {eq.function}: {' / '.join(eq.mutated)}" for eq in stale]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the mutation report.")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--equivalents", type=Path, default=EQUIVALENTS_DIR)
    parser.add_argument("--out", type=Path, default=REPORT_DIR)
    args = parser.parse_args(argv)
    try:
        groups = load_results(args.results)
        equivalents = load_equivalents(args.equivalents)
    except ReportError as err:
        print(f"mutation report: {err}", file=sys.stderr)
        return 2
    if not groups:
        print(f"mutation report: no results in {args.results}", file=sys.stderr)
        return 2
    summaries, stale = summarise(groups, equivalents)
    text = render_text(summaries, groups, stale)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.txt").write_text(text, "utf-8")
    (args.out / "report.json").write_text(
        json.dumps(to_json(summaries, groups), indent=2, ensure_ascii=False) + "\n", "utf-8"
    )
    print(text, end="")
    unexplained = sum(len(s.unexplained) for s in summaries)
    unchecked = sum(len(s.unchecked) for s in summaries)
    if unexplained or unchecked:
        print(
            f"mutation report: {unexplained} unexplained survivor(s), {unchecked} unchecked "
            f"mutant(s); see {args.out / 'report.txt'}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
