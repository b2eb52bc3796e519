"""``fleet-updater`` in process: what it says about itself and about a device it cannot read."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from click.testing import CliRunner

from fleet_core.cli import fleet
from updater.cli import main


def test_version_is_the_package_version_as_fleet_prints_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such.toml"  # --version reads no configuration
    result = CliRunner().invoke(main, ["--config", str(missing), "--version"], prog_name="x")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"x, version {version('metrica-fleet')}\n"
    assert CliRunner().invoke(fleet, ["--version"], prog_name="x").stdout == result.stdout
    assert not list(tmp_path.iterdir())
