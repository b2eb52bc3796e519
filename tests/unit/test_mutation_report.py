"""The mutation report's parsing and matching (tests/mutation/report.py): mutmut is not needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.mutation.report import (
    Equivalent,
    GroupResult,
    Mutant,
    ReportError,
    changed_lines,
    function_of,
    load_equivalents,
    main,
    parse_equivalents,
    parse_group_result,
    summarise,
)

DIFF = """\
--- signing/keyring.py
+++ signing/keyring.py
@@ -3,7 +3,7 @@
     if not revoked_path.exists():
         return frozenset()
     try:
-        text = revoked_path.read_text("utf-8")
+        text = revoked_path.read_text("UTF-8")
     except (OSError, UnicodeDecodeError) as err:
"""

EQUIVALENTS = """\
[[equivalent]]
module = "signing/keyring.py"
function = "_read_revoked"
original = 'text = revoked_path.read_text("utf-8")'
mutated = 'text = revoked_path.read_text("UTF-8")'
reason = "codec names are case-insensitive"
"""


def mutant(name: str = "signing.keyring.x__read_revoked__mutmut_7", **changes: object) -> Mutant:
    fields: dict[str, object] = {
        "name": name,
        "module": "signing/keyring.py",
        "status": "survived",
        "diff": DIFF,
        "seconds": 1.5,
    }
    fields.update(changes)
    return Mutant(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "function"),
    [
        ("signing.keyring.x__read_revoked__mutmut_19", "_read_revoked"),
        ("signing.keys.x_key_id__mutmut_1", "key_id"),
        ("signing.keyring.x\u01c1Keyring\u01c1verify__mutmut_11", "Keyring.verify"),
        ("signing.keyring.x\u01c1Keyring\u01c1__post_init____mutmut_8", "Keyring.__post_init__"),
        ("server.blobs.x_parse_range__mutmut_120", "parse_range"),
    ],
)
def test_function_of_a_mutant_name(name: str, function: str) -> None:
    assert function_of(name) == function


@pytest.mark.parametrize(
    "name", ["signing.keyring.read", "signing.keyring.y_read__mutmut_1", "m.x___mutmut_1"]
)
def test_function_of_refuses_other_names(name: str) -> None:
    with pytest.raises(ReportError):
        function_of(name)


def test_changed_lines_skip_headers_and_context() -> None:
    assert changed_lines(DIFF) == (
        ('text = revoked_path.read_text("utf-8")',),
        ('text = revoked_path.read_text("UTF-8")',),
    )
    removal = "--- a.py\n+++ a.py\n@@ -1,2 +1,1 @@\n x = 1\n-    y = 2\n"
    assert changed_lines(removal) == (("y = 2",), ())


def test_equivalent_matches_module_function_and_change_only() -> None:
    (eq,) = parse_equivalents(EQUIVALENTS)
    assert eq.reason == "codec names are case-insensitive"
    assert eq.matches(mutant())
    # mutmut's number is not part of the identity: renumbered, it still matches
    assert eq.matches(mutant("signing.keyring.x__read_revoked__mutmut_99"))
    assert not eq.matches(mutant(module="signing/keys.py"))
    assert not eq.matches(mutant("signing.keyring.x_revoke_key__mutmut_7"))
    assert not eq.matches(mutant(diff=DIFF.replace('"UTF-8"', '"latin-1"')))
    assert not eq.matches(mutant(diff=DIFF.replace("-        text = revoked", "-        t = x")))


def test_an_equivalent_may_only_remove_lines() -> None:
    diff = "--- a.py\n+++ a.py\n@@ -1,3 +1,2 @@\n f(\n-    read_size=CHUNK,\n     x=1,\n"
    text = EQUIVALENTS.replace(
        "mutated = 'text = revoked_path.read_text(\"UTF-8\")'", "mutated = ''"
    )
    text = text.replace(
        "original = 'text = revoked_path.read_text(\"utf-8\")'", "original = 'read_size=CHUNK,'"
    )
    (eq,) = parse_equivalents(text)
    assert eq.mutated == ()
    assert eq.matches(mutant(diff=diff))


def test_equivalent_lines_ignore_indentation_and_may_span_lines() -> None:
    text = EQUIVALENTS.replace(
        "mutated = 'text = revoked_path.read_text(\"UTF-8\")'",
        "mutated = '''\n   text = revoked_path.read_text(\"UTF-8\")\n  extra()\n'''",
    )
    (eq,) = parse_equivalents(text)
    assert eq.mutated == ('text = revoked_path.read_text("UTF-8")', "extra()")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            EQUIVALENTS.replace('reason = "codec names are case-insensitive"', 'reason = " "'),
            "reason",
        ),
        (
            EQUIVALENTS.replace('reason = "codec names are case-insensitive"\n', ""),
            "needs the keys",
        ),
        (EQUIVALENTS + 'extra = "x"\n', "needs the keys"),
        (EQUIVALENTS.replace('"UTF-8"', '"utf-8"'), "the same"),
        (EQUIVALENTS + EQUIVALENTS, "listed twice"),
        ("[other]\nx = 1\n", "unknown table"),
        ("[[equivalent]\n", "equivalent.toml"),
        (EQUIVALENTS.replace('function = "_read_revoked"', "function = 3"), "function"),
    ],
)
def test_bad_equivalents_are_refused(text: str, message: str) -> None:
    with pytest.raises(ReportError, match=message):
        parse_equivalents(text)


def test_equivalents_are_read_from_every_file_of_a_directory(tmp_path: Path) -> None:
    other = EQUIVALENTS.replace('"UTF-8"', '"UTF8"')
    (tmp_path / "signing.keyring.toml").write_text(EQUIVALENTS, "utf-8")
    (tmp_path / "signing.more.toml").write_text(other, "utf-8")
    (tmp_path / "README.md").write_text("not an equivalents file", "utf-8")
    assert [eq.mutated for eq in load_equivalents(tmp_path)] == [
        ('text = revoked_path.read_text("UTF-8")',),
        ('text = revoked_path.read_text("UTF8")',),
    ]
    # the same mutant in two files is one entry too many, named with the directory
    (tmp_path / "signing.more.toml").write_text(EQUIVALENTS, "utf-8")
    with pytest.raises(ReportError, match=f"{tmp_path}.*listed twice"):
        load_equivalents(tmp_path)
    (tmp_path / "signing.more.toml").write_text("[[equivalent]\n", "utf-8")
    with pytest.raises(ReportError, match="signing.more.toml"):
        load_equivalents(tmp_path)


def test_the_reviewed_equivalents_of_the_project_are_well_formed() -> None:
    assert load_equivalents(Path(__file__).parents[1] / "mutation" / "equivalent")


def group(*mutants: Mutant) -> GroupResult:
    return GroupResult("signing", ("signing/keyring.py", "signing/keys.py"), 10.0, mutants)


def test_summary_separates_explained_from_unexplained_survivors() -> None:
    equivalents = parse_equivalents(EQUIVALENTS)
    unexplained = mutant("signing.keyring.x_revoke_key__mutmut_4", diff="-    a\n+    b\n")
    no_tests = mutant("signing.keyring.x_trust_key__mutmut_1", status="no tests", diff="-a\n+b\n")
    results = group(
        mutant(),
        unexplained,
        no_tests,
        mutant("signing.keyring.x_trust_key__mutmut_2", status="killed", diff=""),
        mutant("signing.keyring.x_trust_key__mutmut_3", status="timeout", diff=""),
        mutant("signing.keyring.x_trust_key__mutmut_4", status="not checked", diff=""),
    )
    (keyring, keys), stale = summarise([results], equivalents)
    assert keyring.module == "signing/keyring.py"
    assert [m for m, _ in keyring.explained] == [mutant()]
    assert keyring.unexplained == [unexplained, no_tests]
    assert [m.status for m in keyring.unchecked] == ["not checked"]
    assert keyring.total == 6
    assert keyring.detected == 2
    assert keyring.score == round(100 * 2 / 5, 1)  # the equivalent one is left out
    assert keyring.seconds == pytest.approx(9.0)
    assert keys.total == 0 and keys.score is None
    assert stale == []


def test_equivalents_that_match_nothing_are_reported_stale_for_mutated_modules_only() -> None:
    mine = parse_equivalents(EQUIVALENTS)
    elsewhere = Equivalent("server/blobs.py", "f", ("a",), ("b",), "r")
    _, stale = summarise([group()], [*mine, elsewhere])
    assert stale == mine


def test_a_results_file_round_trips() -> None:
    data = {
        "group": "signing",
        "modules": ["signing/keyring.py"],
        "tests": [],
        "run_seconds": 3.5,
        "mutants": [
            {
                "name": mutant().name,
                "module": "signing/keyring.py",
                "status": "survived",
                "seconds": 1.0,
                "diff": DIFF,
            },
        ],
    }
    result = parse_group_result(data, "x.json")
    assert result.mutants[0].function == "_read_revoked"
    with pytest.raises(ReportError, match="x.json"):
        parse_group_result({"group": "g"}, "x.json")


def write_results(directory: Path, *mutants: Mutant) -> None:
    directory.mkdir(parents=True)
    data = {
        "group": "signing",
        "modules": ["signing/keyring.py"],
        "tests": [],
        "run_seconds": 3.0,
        "mutants": [m.__dict__ for m in mutants],
    }
    (directory / "signing.json").write_text(json.dumps(data), "utf-8")


def test_main_fails_while_a_survivor_is_unexplained(tmp_path: Path) -> None:
    equivalents = tmp_path / "equivalent.toml"
    equivalents.write_text(EQUIVALENTS, "utf-8")
    results = tmp_path / "results"
    write_results(
        results,
        mutant(),
        mutant("signing.keyring.x_trust_key__mutmut_2", status="killed", diff=""),
        mutant("signing.keyring.x_revoke_key__mutmut_4", diff="-    a\n+    b\n"),
    )
    args = ["--results", str(results), "--equivalents", str(equivalents), "--out", str(tmp_path)]
    assert main(args) == 1
    report = json.loads((tmp_path / "report.json").read_text("utf-8"))
    keyring = report["modules"]["signing/keyring.py"]
    assert keyring["counts"] == {"killed": 1, "survived": 2}
    assert [m["function"] for m in keyring["unexplained"]] == ["revoke_key"]
    assert keyring["explained"][0]["reason"] == "codec names are case-insensitive"
    text = (tmp_path / "report.txt").read_text("utf-8")
    assert "1 unexplained survivor(s)" in text and "codec names are case-insensitive" in text

    write_results(tmp_path / "clean", mutant())
    args[1] = str(tmp_path / "clean")
    assert main(args) == 0


def test_main_without_results_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "eq.toml").write_text("", "utf-8")
    args = ["--results", str(tmp_path / "results"), "--equivalents", str(tmp_path / "eq.toml")]
    assert main([*args, "--out", str(tmp_path)]) == 2
