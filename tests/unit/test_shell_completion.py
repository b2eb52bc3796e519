"""Shell completion of `fleet` and `fleet-updater` (click's, documented in docs/install.md):
commands load lazily, so completion must reach into the groups as they load."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from fleet_core.cli import fleet
from updater.cli import main as fleet_updater


@pytest.mark.parametrize(
    ("command", "name", "words", "expected"),
    [
        (fleet, "fleet", "fleet dev", {"device"}),
        (fleet, "fleet", "fleet device re", {"reinstate", "release", "remove", "rename"}),
        (fleet, "fleet", "fleet rollout status --wa", {"--watch"}),
        (fleet_updater, "fleet-updater", "fleet-updater st", {"status"}),
    ],
)
def test_completion_offers_the_commands_and_options(
    command: click.Command, name: str, words: str, expected: set[str]
) -> None:
    variable = f"_{name.replace('-', '_').upper()}_COMPLETE"
    env = {
        variable: "bash_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - 1),
    }
    result = CliRunner().invoke(command, [], prog_name=name, env=env)
    assert result.exit_code == 0, result.output
    offered = {line.split(",", 1)[1] for line in result.output.splitlines() if "," in line}
    assert offered == expected


def test_the_bash_script_names_the_command() -> None:
    env = {"_FLEET_COMPLETE": "bash_source"}
    script = CliRunner().invoke(fleet, [], prog_name="fleet", env=env).output
    assert "_fleet_completion" in script and "complete " in script
