"""A model of U-Boot's boot decision running Metrica Fleet's ``boot.cmd``.

Written from U-Boot's documented behaviour, not from our backend (this module does not import
``bootloader_hooks.uboot``):

- environment load (``env/common.c``: ``env_import``, ``env_import_redund``; ``env/mmc.c``):
  a copy is valid when the CRC-32 of its data area matches. With two valid copies the larger
  flags serial wins (0 beats 255, copy 0 wins a tie); with one, that one; with none U-Boot
  prints "bad CRC" and uses its built-in default environment. A copy that passes its CRC but
  cannot be imported (an entry with an empty name, no end marker) also gives the default
  environment;
- ``saveenv`` (``env_export``, ``env_mmc_save``): entries sorted by name, zero padding, serial
  = serial of the copy loaded + 1; the copy written is the redundant one (1) when copy 0 was
  loaded, else copy 0, and the "current" copy toggles after each save, exactly as
  ``gd->env_valid`` does (so after starting from the default environment two saves in the same
  boot both land in copy 0);
- boot count limit (``doc/api/bootcount.rst`` "Boot Count Limit", ``drivers/bootcount/
  bootcount_env.c``, ``bootcount_inc``/``bootcount_error`` in ``include/bootcount.h``): before
  autoboot ``bootcount`` is loaded (0 unless ``upgrade_available`` is non-zero), incremented,
  stored with ``saveenv`` only when ``upgrade_available`` is non-zero, and always set in the
  RAM environment (so a later ``saveenv`` of the boot script stores it too). If ``bootlimit``
  is set and non-zero and ``bootcount`` exceeds it, ``altbootcmd`` runs instead of ``bootcmd``;
  without ``altbootcmd`` U-Boot stays at its prompt (the model raises :class:`BootloaderError`);
- ``setexpr`` computes in hexadecimal and stores the result in hex (``doc/usage/cmd/
  setexpr.rst``); ``test -gt`` compares decimal ``simple_strtol`` values; ``setenv name`` with no
  value deletes the variable; ``env_get_ulong(name, 10, 0)`` reads leading decimal digits.

Modelled board: ``CONFIG_BOOTCOUNT_LIMIT`` with ``CONFIG_BOOTCOUNT_ENV`` (the count lives in the
environment on disk). Boards whose count lives in RAM or an RTC register lose it at power-on
(the documentation: "After a power-on reset, the bootcount variable will be initialized to 1");
that is not modelled, so a power-on counts like any other boot here. ``bootcmd`` is assumed to
load and run our ``boot.scr``, and ``altbootcmd`` must be ours (``setenv fleet_altboot 1; run
bootcmd``); any other ``altbootcmd`` is outside the model and raises.

The boot script part follows the scheme described in ``bootloader_hooks.uboot``: start afresh
without ``FLEET_ENV=1``; after ``altbootcmd`` zero the trial slot and clear
``upgrade_available``/``bootcount``; take the first slot of ``BOOT_ORDER`` whose counter is
above 0, decrement it with ``setexpr``, ``saveenv`` if anything changed, boot it with
``root=PARTLABEL=root_x fleet.slot=x``; with no slot, boot ``safe``.
"""

from __future__ import annotations

import enum
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from bootloader_hooks.base import BootEvent, BootOutcome
from bootloader_hooks.errors import BootloaderError, BootStateCorruptError
from bootloader_hooks.ubootenv import EnvLayout, decode_data, encode_copy, write_copy

WHO = "uboot model"
OUR_ALTBOOTCMD = "setenv fleet_altboot 1; run bootcmd"
DEFAULT_ENVIRONMENT: Mapping[str, str] = {
    "bootcmd": "load mmc 0:1 ${scriptaddr} boot.scr; source ${scriptaddr}",
    "altbootcmd": OUR_ALTBOOTCMD,
    "bootdelay": "0",
}
_SLOTS = {"A": "a", "B": "b"}


class _EnvValid(enum.Enum):
    """``gd->env_valid``: which copy U-Boot considers current."""

    INVALID = 0
    VALID = 1  # copy 0
    REDUND = 2  # copy 1


def _strtoul(text: str | None, base: int) -> int:
    """U-Boot's ``simple_strtoul``: the leading digits of ``base``, 0 if none."""
    digits = "0123456789abcdef"[:base]
    value = text or ""
    if base == 16 and value[:2].lower() == "0x":
        value = value[2:]
    number = 0
    for char in value.lower():
        if char not in digits:
            break
        number = number * base + digits.index(char)
    return number


def _strtol(text: str | None) -> int:
    """U-Boot's ``simple_strtol(text, NULL, 10)``, as ``test -gt`` uses it."""
    value = text or ""
    if value.startswith("-"):
        return -_strtoul(value[1:], 10)
    return _strtoul(value, 10)


@dataclass
class _Ram:
    """What U-Boot holds in memory during one boot; gone at the next."""

    env: dict[str, str]
    valid: _EnvValid
    serial: int  # the static env_flags of env/common.c


@dataclass
class UBootModel:
    """U-Boot with our boot script, on the environment at ``layout``.

    ``attempts`` and ``bootargs`` are what our ``boot.cmd`` was generated with;
    ``default_environment`` is the board's built-in environment.
    """

    layout: EnvLayout
    attempts: int = 3
    bootargs: str = "rootwait"
    default_environment: Mapping[str, str] = field(
        default_factory=lambda: dict(DEFAULT_ENVIRONMENT)
    )

    def boot(self, event: BootEvent) -> BootOutcome:
        """One start of U-Boot: load the environment, count the boot, run the boot script.

        ``event`` does not change the decision: with the count in the environment, power-on,
        reset and reboot are all the same to U-Boot.

        Raises:
            BootloaderError: U-Boot would stop at its prompt, or cannot write its environment.
        """
        del event
        ram = self._load()
        if self._count_boot(ram):
            altbootcmd = ram.env.get("altbootcmd")
            if altbootcmd is None:
                raise BootloaderError(
                    f"{WHO}: bootcount exceeds bootlimit and there is no altbootcmd: "
                    "U-Boot stays at its prompt"
                )
            if altbootcmd != OUR_ALTBOOTCMD:
                raise BootloaderError(f"{WHO}: altbootcmd {altbootcmd!r} is not modelled")
            ram.env["fleet_altboot"] = "1"
        return self._run_script(ram)

    # --- U-Boot ---------------------------------------------------------------------------------

    def _load(self) -> _Ram:
        copies: dict[int, tuple[bytes, int]] = {}
        for index, copy in enumerate(self.layout.copies):
            block = _read(copy.path, copy.offset, self.layout.size)
            header = self.layout.header_size
            if len(block) == self.layout.size and zlib.crc32(block[header:]) == int.from_bytes(
                block[:4], "little"
            ):
                copies[index] = (block[header:], block[4] if self.layout.redundant else 0)
        if not copies:
            return self._default()
        if len(copies) == 2:
            chosen = _newer(copies[0][1], copies[1][1])
        else:
            (chosen,) = copies
        data, serial = copies[chosen]
        try:
            env = decode_data(data)
        except BootStateCorruptError:
            return self._default()  # "import failed": U-Boot does not try the other copy
        return _Ram(env, _EnvValid.VALID if chosen == 0 else _EnvValid.REDUND, serial)

    def _default(self) -> _Ram:
        return _Ram(dict(self.default_environment), _EnvValid.INVALID, 0)

    def _saveenv(self, ram: _Ram) -> None:
        if not self.layout.redundant:
            write_copy(self.layout.copies[0], encode_copy(ram.env, self.layout.size))
            return
        ram.serial = (ram.serial + 1) & 0xFF
        target = 1 if ram.valid is _EnvValid.VALID else 0
        write_copy(self.layout.copies[target], encode_copy(ram.env, self.layout.size, ram.serial))
        ram.valid = _EnvValid.VALID if ram.valid is _EnvValid.REDUND else _EnvValid.REDUND

    def _count_boot(self, ram: _Ram) -> bool:
        """``bootcount_inc`` then ``bootcount_error``: whether ``altbootcmd`` runs."""
        upgrade_available = _strtoul(ram.env.get("upgrade_available"), 10) != 0
        count = _strtoul(ram.env.get("bootcount"), 10) if upgrade_available else 0
        count += 1
        ram.env["bootcount"] = str(count)
        if upgrade_available:
            self._saveenv(ram)
        limit = _strtoul(ram.env.get("bootlimit"), 10)
        return limit != 0 and count > limit

    # --- our boot.scr ---------------------------------------------------------------------------

    def _run_script(self, ram: _Ram) -> BootOutcome:
        env = ram.env
        save = False
        if env.get("FLEET_ENV") != "1":
            env.update(
                FLEET_ENV="1",
                BOOT_ORDER="A B",
                BOOT_A_LEFT=str(self.attempts),
                BOOT_B_LEFT=str(self.attempts),
                upgrade_available="0",
                bootcount="0",
                bootlimit=str(self.attempts),
                altbootcmd=OUR_ALTBOOTCMD,
            )
            env.pop("FLEET_TRIAL", None)
            save = True
        if env.get("fleet_altboot") == "1":
            del env["fleet_altboot"]
            ended = env.get("FLEET_TRIAL")
            if ended in _SLOTS:
                env[f"BOOT_{ended}_LEFT"] = "0"
            env.update(upgrade_available="0", bootcount="0")
            save = True
        slot = self._choose(env)
        if save or slot is not None:
            self._saveenv(ram)
        booted = slot or "safe"
        trial = slot is not None and _SLOTS.get(env.get("FLEET_TRIAL", "")) == slot
        cmdline = f"{self.bootargs} root=PARTLABEL=root_{booted} fleet.slot={booted}\n"
        return BootOutcome(booted, trial, {"proc/cmdline": cmdline.encode()})

    @staticmethod
    def _choose(env: dict[str, str]) -> str | None:
        for letter in env.get("BOOT_ORDER", "").split():
            if letter not in _SLOTS:
                continue
            name = f"BOOT_{letter}_LEFT"
            if _strtol(env.get(name)) > 0:
                left = (_strtoul(env.get(name), 16) - 1) & 0xFFFFFFFFFFFFFFFF
                env[name] = f"{left:x}"
                return _SLOTS[letter]
        return None


def _newer(serial0: int, serial1: int) -> int:
    if serial0 == 0xFF and serial1 == 0:
        return 1
    if serial1 == 0xFF and serial0 == 0:
        return 0
    return 1 if serial1 > serial0 else 0


def _read(path: os.PathLike[str], offset: int, size: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (negative: from the end); empty if unreadable."""
    try:
        with open(path, "rb") as device:
            device.seek(offset, os.SEEK_SET if offset >= 0 else os.SEEK_END)
            return device.read(size)
    except OSError:
        return b""
