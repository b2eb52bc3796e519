"""The firmwares a virtual device can have: where each keeps its boot state, which model
decides its boots. Importing this module fills ``chaos.virtual_device.LAB_FIRMWARES``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bootloader_hooks.autoboot import AutobootConfig, install_file
from bootloader_hooks.base import FirmwareModel
from bootloader_hooks.grub_model import GrubModel
from bootloader_hooks.grub_script import install_files
from bootloader_hooks.tryboot_model import TrybootFirmware
from bootloader_hooks.uboot import UBootBackend
from bootloader_hooks.uboot_model import DEFAULT_ENVIRONMENT, UBootModel
from bootloader_hooks.ubootenv import EnvLayout
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


UBOOT_ENV_SIZE = 0x4000


def _uboot_prepare(root: Path) -> dict[str, Any]:
    boot = root / "boot"
    env, initial = boot / "uboot.env", boot / "u-boot-initial-env"
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
        initial.write_text("".join(f"{k}={v}\n" for k, v in DEFAULT_ENVIRONMENT.items()))
        env.write_bytes(bytes(2 * UBOOT_ENV_SIZE))
        UBootBackend.from_options(options).repair("a")
    return options


def _uboot_model(root: Path, options: Mapping[str, Any]) -> FirmwareModel:
    layout = EnvLayout.redundant_pair(options["env_file"], UBOOT_ENV_SIZE, 0, UBOOT_ENV_SIZE, None)
    return UBootModel(layout)


LAB_FIRMWARES["uboot"] = LabFirmware("uboot", _uboot_prepare, _uboot_model)
