"""``fleet-updater provision`` keeps an existing boot script only when it is a file: a
directory, a FIFO or a symbolic link to nothing where ``grub.cfg`` or ``boot.scr`` goes is no
script the firmware can load, so the plan refuses it with one line naming the path and what it
is, and nothing is recorded or written (a dry run neither)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from chaos.virtual_device import VirtualDevice
from tests.chaos.conftest import MakeDevice
from updater.cli import main

KINDS: dict[str, tuple[Callable[[Path], None], str]] = {
    "directory": (lambda path: path.mkdir(), "a directory"),
    "fifo": (lambda path: os.mkfifo(path), "a FIFO"),
    "dangling link": (lambda path: path.symlink_to("/nowhere/x"), "a dangling symbolic link"),
}


def script_path(device: VirtualDevice, firmware: str) -> Path:
    if firmware == "grub":
        return Path(device.config.bootloader["grubenv"]).parent / "grub.cfg"
    return Path(device.config.bootloader["env_file"]).parent / "boot.scr"


def recorded(device: VirtualDevice) -> list[str]:
    """The updater's records of a provisioned device that are there."""
    names = ("state.json", "security-floor")
    return [name for name in names if (device.config.data_dir / name).exists()]


@pytest.mark.parametrize("firmware", ["grub", "uboot"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_boot_script_that_is_not_a_file_is_refused_naming_it(
    make_device: MakeDevice, firmware: str, kind: str
) -> None:
    device = make_device(firmware)
    for name in ("state.json", "security-floor"):  # as it leaves the factory
        (device.config.data_dir / name).unlink(missing_ok=True)
    script = script_path(device, firmware)
    if script.exists():
        script.unlink()
    make, what = KINDS[kind]
    make(script)
    config = device.root / "updater.toml"
    config.write_text(device.config_toml())
    args = ["--config", str(config), "provision", "--version", "1.0.0", "--security-version", "1"]
    for more in (["--dry-run"], ["--json"], []):
        result = CliRunner().invoke(main, [*args, *more])
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert lines[-1] == (
            f"Error: boot script {script.name}: {script} exists but is not a file ({what}): "
            "the firmware cannot load it; remove it, or put the board's script there"
        ), lines
    assert recorded(device) == []
    assert os.path.lexists(script) and not script.is_file()
