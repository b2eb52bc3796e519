"""The boot scripts a device needs beside its boot state, for the backend it is configured with.

A backend's ``repair`` writes the boot *state* (``grubenv``, the U-Boot environment,
``autoboot.txt``); the firmware reads that state with a *script* that is a file of its own:
GRUB's ``grub.cfg`` (:mod:`bootloader_hooks.grub_script`) and U-Boot's ``boot.scr``
(:mod:`bootloader_hooks.uboot_script`). Raspberry Pi's firmware needs none: ``autoboot.txt`` is
both the state and what the firmware follows.

:func:`plan` says, for a built backend, where each script belongs and what provisioning does
with it:

- ``grub``: ``grub.cfg`` in the directory of the configured ``grubenv`` (where GRUB's
  ``${config_directory}`` finds the block), with the reference disk's entries
  (:data:`bootloader_hooks.grub_script.DEFAULT_ENTRIES`);
- ``uboot``: ``boot.scr`` in the directory of the environment when the environment is a file
  of its own (its first copy a regular file at offset 0: ``uboot.env`` on the boot partition,
  where U-Boot loads the script from too), for the reference board (:data:`UBOOT_BOARD`). An
  environment on a raw device or at an offset inside a file says nothing about where the boot
  partition is: no script is written, and the plan says why;
- ``tryboot``: nothing.

A script that is already there is kept, byte for byte, whatever it holds: a device imaged with
``fleet image disk`` carries a ``grub.cfg`` with its own kernel options, and a working boot
script is never overwritten. Something there that is not a file (a directory, a FIFO, a
symbolic link to nothing) is no script the firmware can load, and is not replaced either: the
plan refuses it, naming the path and what it is, and the operator decides. :func:`install`
writes the scripts the plan writes, each atomically (``fleet_core.durable``): after a power
cut a script is either absent or whole.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bootloader_hooks.base import BootSelector
from bootloader_hooks.errors import BootloaderError
from bootloader_hooks.grub import CFG_FILE, GrubBackend
from bootloader_hooks.grub_script import DEFAULT_ENTRIES, grub_cfg, write_cfg_file
from bootloader_hooks.uboot import UBootBackend
from bootloader_hooks.uboot_script import boot_script, compile_boot_script
from fleet_core.inputs import kind_of

BOOT_SCR = "boot.scr"
# The board the uboot backend's boot.scr is written for when provisioning writes one: the
# defaults of bootloader_hooks.uboot_script.boot_script, named here so that the plan can say so.
UBOOT_BOARD: dict[str, str] = {
    "devtype": "mmc",
    "devnum": "0",
    "kernel": "Image",
    "boot_command": "booti",
}

Action = Literal["write", "keep", "none"]


@dataclass(frozen=True)
class BootScript:
    """One boot script of a backend: its file name, where it goes (``None``: no sound place is
    known), what provisioning does with it, and in words what it holds or why it is not
    written."""

    name: str
    path: Path | None
    action: Action
    detail: str
    _write: Callable[[Path], object] | None = field(default=None, repr=False, compare=False)

    def to_dict(self, *, written: bool | None = None) -> dict[str, Any]:
        """As a JSON object. ``action`` is ``write``, ``kept`` or ``none`` in the plan
        (``written`` is ``None``); once :func:`install` ran, ``written`` says whether this
        script was, and a planned ``write`` becomes ``written`` (or ``kept``: one appeared
        since the plan)."""
        action: str = {"write": "write", "keep": "kept", "none": "none"}[self.action]
        if written is not None and self.action == "write":
            action = "written" if written else "kept"
        return {
            "name": self.name,
            "path": None if self.path is None else str(self.path),
            "action": action,
            "detail": self.detail,
        }


def _planned(name: str, path: Path, detail: str, write: Callable[[Path], object]) -> BootScript:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return BootScript(name, path, "write", detail, write)
    except OSError as err:
        raise BootloaderError(
            f"boot script {name}: {path} cannot be looked at: {err.strerror}"
        ) from err
    if stat.S_ISLNK(mode):
        try:
            mode = path.stat().st_mode
        except OSError:
            raise BootloaderError(
                f"boot script {name}: {path} exists but is not a file (a dangling symbolic "
                "link): the firmware cannot load it; remove it, or put the board's script there"
            ) from None
    if not stat.S_ISREG(mode):
        raise BootloaderError(
            f"boot script {name}: {path} exists but is not a file ({kind_of(mode)}): the firmware "
            "cannot load it; remove it, or put the board's script there"
        )
    return BootScript(name, path, "keep", "already there: never overwritten")


def _grub(backend: GrubBackend) -> tuple[BootScript, ...]:
    cfg_path = backend.grubenv_path.parent / CFG_FILE
    env_file = f"${{config_directory}}/{backend.grubenv_path.name}"
    grub_cfg(DEFAULT_ENTRIES, env_file=env_file)  # an env file GRUB cannot name fails the plan

    def write(path: Path) -> object:
        return write_cfg_file(path, DEFAULT_ENTRIES, env_file=env_file)

    return (_planned(CFG_FILE, cfg_path, "the reference disk's entries", write),)


def _uboot(backend: UBootBackend) -> tuple[BootScript, ...]:
    first = backend.layout.copies[0]
    try:
        mode = first.path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        return (_no_boot_scr(f"{first.path} cannot be looked at ({err.strerror})"),)
    if mode is None and not first.path.parent.is_dir():
        return (_no_boot_scr(f"the directory of {first.path} does not exist"),)
    if first.offset != 0 or (mode is not None and not stat.S_ISREG(mode)):
        return (
            _no_boot_scr(
                f"the U-Boot environment is not a file of its own ({first.describe()}), so "
                "where the boot partition is is not known; install boot.scr with the board's "
                "image"
            ),
        )
    text = boot_script(attempts=backend.attempts, **UBOOT_BOARD)
    board = ", ".join(f"{key} {value}" for key, value in UBOOT_BOARD.items())
    detail = f"the scheme's script for the reference board ({board})"
    return (
        _planned(BOOT_SCR, first.path.parent / BOOT_SCR, detail,
                 lambda path: compile_boot_script(text, path)),
    )  # fmt: skip


def _no_boot_scr(reason: str) -> BootScript:
    return BootScript(BOOT_SCR, None, "none", f"not written: {reason}")


# backend class -> where its scripts go; tryboot's firmware has none (autoboot.txt is both)
_PLANNERS: dict[type, Callable[[Any], tuple[BootScript, ...]]] = {
    GrubBackend: _grub,
    UBootBackend: _uboot,
}


def plan(backend: BootSelector) -> tuple[BootScript, ...]:
    """The boot scripts of ``backend``'s firmware and what provisioning does with each (see
    the module docstring); reads, never writes. Empty for a backend whose firmware reads its
    boot state without a script of ours (``tryboot``).

    Raises:
        BootloaderError: the script cannot be rendered for this configuration (a ``grubenv``
            name GRUB's parser would interpret), or something that is not a file is where a
            script goes.
    """
    for kind, planner in _PLANNERS.items():
        if isinstance(backend, kind):
            return planner(backend)
    return ()


def install(scripts: Iterable[BootScript]) -> tuple[Path, ...]:
    """Write the scripts :func:`plan` writes, each atomically; return the paths written. One
    that has appeared since the plan is kept.

    Power cut: each script is absent or whole; running the provisioning again writes what is
    missing.

    Raises:
        BootloaderError: a script cannot be written.
    """
    written = []
    for script in scripts:
        if script.action != "write" or script.path is None or script._write is None:
            continue
        if script.path.exists() or script.path.is_symlink():
            continue
        script._write(script.path)
        written.append(script.path)
    return tuple(written)
