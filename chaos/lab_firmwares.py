"""The firmwares a virtual device can have: where each keeps its boot state, which model
decides its boots. Importing this module fills ``chaos.virtual_device.LAB_FIRMWARES``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bootloader_hooks.autoboot import AutobootConfig, install_file
from bootloader_hooks.base import FirmwareModel
from bootloader_hooks.grub import install_files
from bootloader_hooks.grub_model import GrubModel
from bootloader_hooks.tryboot_model import TrybootFirmware
from chaos.virtual_device import LAB_FIRMWARES, LabFirmware


def _cmdline(root: Path) -> str:
    return str(root / "linux" / "proc" / "cmdline")


def _grub_prepare(root: Path) -> dict[str, Any]:
    _, grubenv = install_files(root / "boot" / "esp")
    return {"grubenv": str(grubenv), "cmdline": _cmdline(root)}


def _grub_model(root: Path, options: Mapping[str, Any]) -> FirmwareModel:
    return GrubModel(root / "boot" / "esp")


LAB_FIRMWARES["grub"] = LabFirmware("grub", _grub_prepare, _grub_model)


def _tryboot_prepare(root: Path) -> dict[str, Any]:
    autoboot = root / "boot" / "autoboot" / "autoboot.txt"
    if not autoboot.exists():
        install_file(autoboot, AutobootConfig(boot_partition=2, tryboot_partition=2))
    proc = root / "linux" / "proc"
    return {
        "autoboot_txt": str(autoboot),
        "device_tree": str(proc / "device-tree"),
        "state_dir": str(root / "data" / "boot"),
        "boot_id": str(proc / "sys" / "kernel" / "random" / "boot_id"),
    }


def _tryboot_model(root: Path, options: Mapping[str, Any]) -> FirmwareModel:
    return TrybootFirmware(Path(options["autoboot_txt"]))


LAB_FIRMWARES["tryboot"] = LabFirmware("tryboot", _tryboot_prepare, _tryboot_model)
