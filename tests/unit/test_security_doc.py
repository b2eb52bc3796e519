"""docs/security.md proves each mitigation by naming a test as ``path::name``: every name cited
must be a test that exists, so the threat model cannot drift from the tests."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"
CITATION = re.compile(r"`(tests/[\w/]+\.py)::([\w:]+)`")


def citations(text: str) -> list[tuple[str, str]]:
    return CITATION.findall(text)


def collected_ids(path: Path) -> set[str]:
    """The ids pytest gives the test functions of ``path``: ``name`` for a module's own,
    ``Class::name`` for a ``Test*`` class's."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    ids: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name.startswith("test"):
                ids.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            ids |= {
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                and item.name.startswith("test")
            }
    return ids


def missing_citations(text: str, root: Path) -> list[str]:
    """Each cited ``path::name`` whose file or test does not exist."""
    missing = []
    known: dict[str, set[str]] = {}
    for path, name in citations(text):
        if path not in known:
            file = root / path
            known[path] = collected_ids(file) if file.is_file() else set()
        if name not in known[path]:
            missing.append(f"{path}::{name}")
    return missing


def test_every_cited_test_exists() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert len(citations(text)) > 50
    assert missing_citations(text, ROOT) == []


def test_each_component_names_its_threats_by_stride() -> None:
    text = DOC.read_text(encoding="utf-8")
    for component in (
        "## Device",
        "## Release server",
        "## Release signing keys",
        "## Operator",
        "## Monitoring",
        "## Residual risks",
    ):
        assert component in text
    sections = re.split(r"^## ", text, flags=re.MULTILINE)
    tables = [s for s in sections if "| STRIDE |" in s]
    assert len(tables) == 5
    for section in tables:
        # every row of a threat table cites at least one test
        rows = [line for line in section.splitlines() if re.match(r"\| [STRIDE] \|", line)]
        assert rows, section.splitlines()[0]
        assert [row for row in rows if not citations(row)] == []


@pytest.mark.parametrize(
    ("cited", "missing"),
    [
        ("`tests/unit/test_keys.py::test_private_key_is_encrypted`", []),
        (
            "`tests/unit/test_keys.py::test_no_such_test`",
            ["tests/unit/test_keys.py::test_no_such_test"],
        ),
        (
            "`tests/unit/no_such_file.py::test_x`",
            ["tests/unit/no_such_file.py::test_x"],
        ),
        # a helper that is not a test is no proof
        (
            "`tests/server/test_api_fuzz.py::fuzz_operation`",
            ["tests/server/test_api_fuzz.py::fuzz_operation"],
        ),
    ],
)
def test_a_citation_of_nothing_is_found(cited: str, missing: list[str]) -> None:
    assert missing_citations(f"| T | x | y | {cited} |", ROOT) == missing
