"""Only ``fleet server run`` makes a data directory: the commands that work on one directly
refuse a directory that does not exist (a mistyped --data-dir) and, but for the first admin
token of an installation, one without a server database, creating nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fleet_core.cli import fleet
from tests.conftest import assert_one_line_error

COMMANDS = [
    ["server", "token", "create", "--role", "admin", "--name", "x", "--json"],
    ["server", "token", "list"],
    ["server", "token", "revoke", "1"],
    ["server", "enrollment-token", "create", "--uses", "5"],
    ["server", "enrollment-token", "list"],
    ["server", "enrollment-token", "revoke", "1"],
    ["audit", "verify"],
    ["audit", "head"],
]


def run(*args: str) -> Result:
    return CliRunner().invoke(fleet, list(args), env={"FLEET_DATABASE_URL": None})


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_a_data_dir_that_does_not_exist_is_refused_and_not_made(
    args: list[str], tmp_path: Path
) -> None:
    mistyped = tmp_path / "daat"
    result = run(*args, "--data-dir", str(mistyped))
    assert_one_line_error(result, f"{mistyped}: no such directory")
    assert "'fleet server run --data-dir DIR' creates one" in result.stderr
    assert result.stdout == ""
    assert not mistyped.exists()


@pytest.mark.parametrize("args", COMMANDS[1:], ids=" ".join)
def test_a_data_dir_without_a_database_is_refused_and_left_empty(
    args: list[str], tmp_path: Path
) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    result = run(*args, "--data-dir", str(empty))
    if args[0] == "audit":  # the server key is read first: no key there either
        assert_one_line_error(result, "server-key.pem")
    else:
        assert_one_line_error(result, f"{empty}: no server database in it")
    assert list(empty.iterdir()) == []


def test_the_first_admin_token_initialises_the_directory_an_installation_made(
    tmp_path: Path,
) -> None:
    made = tmp_path / "fleet-server"
    made.mkdir(mode=0o700)
    created = run(*COMMANDS[0], "--data-dir", str(made))
    assert created.exit_code == 0, created.output
    assert (made / "data.db").is_file()
    # from then on, the other commands work on it
    listed = run("server", "token", "list", "--data-dir", str(made))
    assert listed.exit_code == 0, listed.output
    made_token = run("server", "enrollment-token", "create", "--uses", "1", "--data-dir", str(made))
    assert made_token.exit_code == 0, made_token.output
