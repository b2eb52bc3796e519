"""The systemd units in deploy/systemd: each parses, and each ExecStart names one of our
commands with options that command accepts (an option renamed in the code must not leave a unit
that fails at boot)."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fleet_core.cli import fleet
from updater.cli import main as fleet_updater

UNITS = sorted((Path(__file__).parents[2] / "deploy" / "systemd").glob("*.service"))
COMMANDS: dict[str, click.Command] = {"fleet": fleet, "fleet-updater": fleet_updater}


def test_there_are_units() -> None:
    assert {u.name for u in UNITS} >= {
        "fleet-boot-check.service",
        "fleet-updater.service",
        "fleet-server.service",
    }


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_a_unit_parses_and_starts_one_of_our_commands(unit: Path) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    argv = shlex.split(parser["Service"]["ExecStart"])
    assert argv[0].startswith("/usr/bin/")
    command = COMMANDS[Path(argv[0]).name]
    # --help after the unit's arguments: click rejects an unknown option or command first
    result = CliRunner().invoke(command, [*argv[1:], "--help"])
    assert result.exit_code == 0, result.output
