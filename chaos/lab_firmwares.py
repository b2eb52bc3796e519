"""The firmwares a virtual device can have: where each keeps its boot state, which model
decides its boots. Importing this module fills ``chaos.virtual_device.LAB_FIRMWARES``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bootloader_hooks import grub, tryboot, uboot
from bootloader_hooks.base import FirmwareModel, provision
from bootloader_hooks.grub_model import GrubModel
from bootloader_hooks.tryboot_model import TrybootFirmware
from bootloader_hooks.uboot_model import DEFAULT_ENVIRONMENT, UBootModel
from bootloader_hooks.ubootenv import EnvLayout
from chaos.virtual_device import LAB_FIRMWARES, LabFirmware


def _cmdline(root: Path) -> str:
    return str(root / "linux" / "proc" / "cmdline")


def _grub_prepare(root: Path) -> dict[str, Any]:
    esp = root / "boot" / "esp"
    grubenv = esp / grub.ESP_DIRECTORY / grub.ENV_FILE
    if not grubenv.exists():
        provision("grub", esp)
    return {"grubenv": str(grubenv), "cmdline": _cmdline(root)}


def _grub_model(root: Path, options: Mapping[str, Any]) -> FirmwareModel:
    return GrubModel(root / "boot" / "esp")


LAB_FIRMWARES["grub"] = LabFirmware("grub", _grub_prepare, _grub_model)


def _tryboot_prepare(root: Path) -> dict[str, Any]:
    autoboot = root / "boot" / "autoboot" / tryboot.AUTOBOOT_FILE
    state_dir = root / "data" / "boot"
    if not autoboot.exists():
        provision("tryboot", autoboot.parent, state_dir=state_dir)
    proc = root / "linux" / "proc"
    return {
        "autoboot_txt": str(autoboot),
        "device_tree": str(proc / "device-tree"),
        "state_dir": str(state_dir),
        "boot_id": str(proc / "sys" / "kernel" / "random" / "boot_id"),
    }


def _tryboot_model(root: Path, options: Mapping[str, Any]) -> FirmwareModel:
    return TrybootFirmware(Path(options["autoboot_txt"]))


LAB_FIRMWARES["tryboot"] = LabFirmware("tryboot", _tryboot_prepare, _tryboot_model)


UBOOT_ENV_SIZE = 0x4000


def _uboot_prepare(root: Path) -> dict[str, Any]:
    boot = root / "boot"
    env, initial = boot / uboot.ENV_FILE, boot / uboot.INITIAL_ENV_FILE
    options: dict[str, Any] = {
        "env_file": str(env),
        "env_size": UBOOT_ENV_SIZE,
        "env_offset": 0,
        "redundant_offset": UBOOT_ENV_SIZE,
        "cmdline": _cmdline(root),
        "initial_env": str(initial),
    }
    if not env.exists():
        # a board fresh from the factory: the default environment in its flash, our script
        provision("uboot", boot, initial_env=DEFAULT_ENVIRONMENT, env_size=UBOOT_ENV_SIZE)
    return options


def _uboot_model(root: Path, options: Mapping[str, Any]) -> FirmwareModel:
    layout = EnvLayout.redundant_pair(options["env_file"], UBOOT_ENV_SIZE, 0, UBOOT_ENV_SIZE, None)
    return UBootModel(layout)


LAB_FIRMWARES["uboot"] = LabFirmware("uboot", _uboot_prepare, _uboot_model)
