"""Lab commands empty their work directory at each run, and never a directory they did not
make (chaos.workdir)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from chaos.workdir import WorkdirError, fresh_directory, marker_name
from fleet_core.cli import fleet


def test_a_directory_with_files_of_its_own_is_refused_and_kept(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(WorkdirError, match="holds files fleet demo did not make"):
        fresh_directory(home, "fleet demo")
    assert (home / "thesis.tex").read_text() == "years of work"


def test_another_commands_directory_is_refused(tmp_path: Path) -> None:
    made = fresh_directory(tmp_path / "lab", "fleet simulate")
    (made / "devices").mkdir()
    with pytest.raises(WorkdirError, match=marker_name("fleet chaos run")):
        fresh_directory(made, "fleet chaos run")
    assert (made / "devices").is_dir()


def test_its_own_directory_is_emptied_and_a_new_or_empty_one_is_used(tmp_path: Path) -> None:
    made = fresh_directory(tmp_path / "new" / "lab", "fleet demo")
    (made / "old-run.log").write_text("x")
    again = fresh_directory(made, "fleet demo")
    assert [p.name for p in again.iterdir()] == [marker_name("fleet demo")]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fresh_directory(empty, "fleet demo") == empty


def test_a_symlink_or_a_file_in_its_place_is_refused(tmp_path: Path) -> None:
    target = fresh_directory(tmp_path / "real", "fleet demo")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(WorkdirError, match="not a directory"):
        fresh_directory(link, "fleet demo")
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(WorkdirError, match="not a directory"):
        fresh_directory(plain, "fleet demo")
    assert plain.read_text() == "x" and target.is_dir()


def test_the_path_comes_back_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    made = fresh_directory(Path("build/lab"), "fleet chaos run")
    assert made.is_absolute() and made == tmp_path / "build" / "lab"


@pytest.mark.parametrize("command", [["demo"], ["chaos", "run", "overheating"]])
def test_the_commands_refuse_a_directory_of_someone_elses(
    tmp_path: Path, command: list[str]
) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(fleet, [*command, "--workdir", str(tmp_path)])
    assert result.exit_code != 0
    assert "did not make" in result.output, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
