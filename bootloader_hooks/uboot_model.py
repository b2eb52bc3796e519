"""A model of U-Boot's boot decision running Metrica Fleet's ``boot.cmd``.

Written from U-Boot's documented behaviour, not from our backend (this module does not import
``bootloader_hooks.uboot``):

- the environment on disk (``include/env.h`` ``env_t``, ``env/common.c``, ``lib/hashtable.c``;
  the format ``fw_printenv``/``fw_setenv`` also read and write, which the integration tests
  compare this model with): each copy is ``CONFIG_ENV_SIZE`` bytes, a CRC-32 (little-endian)
  of the data area, for a redundant environment one flags byte (a serial number), then the
  data area: ``name=value`` entries each ended by a NUL, an empty entry after the last, the
  rest padding, all of it under the CRC. The copy is written in place where it lives; a copy
  that is a whole file of its own is replaced whole;
- environment load (``env_import``, ``env_import_redund``; ``env/mmc.c``): a copy is valid
  when the CRC-32 of its data area matches. With two valid copies the larger flags serial wins
  (255 then 0 counts as a wrap-around: the copy with 0 wins; copy 0 wins a tie); with one,
  that one; with none U-Boot prints "bad CRC" and uses its built-in default environment. The
  copy is imported as ``himport_r`` does with the NUL separator: leading blanks are skipped,
  an entry starting with ``#`` is a comment, an entry ``name`` or ``name=`` deletes the name,
  a backslash in a value makes the next byte literal, and the data ends at an empty entry or
  at the end of the area. An entry with an empty name makes the import fail: U-Boot then uses
  the default environment too;
- ``saveenv`` (``env_export``/``hexport_r``, ``env_mmc_save``): entries sorted by name, a
  backslash in a value written with a backslash before it, zero padding, serial = serial of
  the copy loaded + 1; the copy written is the redundant one (1) when copy 0 was loaded, else
  copy 0, and the "current" copy toggles after each save, exactly as ``gd->env_valid`` does
  (so after starting from the default environment two saves in the same boot both land in
  copy 0). An environment that does not fit is not saved ("Env export buffer too small");
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

The environment layout is given as the backend describes it (``size`` and ``copies``, each
with a ``path`` and an ``offset``, negative from the end), read by attribute only: this model
reads and writes the bytes with its own code and imports neither the backend
(``bootloader_hooks.uboot``) nor its environment codec (``bootloader_hooks.ubootenv``), so a
mistake there cannot be mirrored here.

The boot script part follows the scheme described in ``bootloader_hooks.uboot``: start afresh
without ``FLEET_ENV=1``; after ``altbootcmd`` zero the trial slot and clear
``upgrade_available``/``bootcount``; take the first slot of ``BOOT_ORDER`` whose counter is
above 0, decrement it with ``setexpr``, ``saveenv`` if anything changed, boot it with
``root=PARTLABEL=root_x fleet.slot=x``; with no slot, boot ``safe``.
"""

from __future__ import annotations

import enum
import os
import stat
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bootloader_hooks.base import BootEvent, BootOutcome
from bootloader_hooks.errors import BootloaderError
from fleet_core import durable

WHO = "uboot model"
OUR_ALTBOOTCMD = "setenv fleet_altboot 1; run bootcmd"
DEFAULT_ENVIRONMENT: Mapping[str, str] = {
    "bootcmd": "load mmc 0:1 ${scriptaddr} boot.scr; source ${scriptaddr}",
    "altbootcmd": OUR_ALTBOOTCMD,
    "bootdelay": "0",
}
_SLOTS = {"A": "a", "B": "b"}
CRC_SIZE, FLAGS_SIZE = 4, 1
_TEXT = ("utf-8", "surrogateescape")


class EnvCopyLike(Protocol):
    """Where one copy lives: a file or device and a byte offset (negative: from the end)."""

    @property
    def path(self) -> os.PathLike[str]: ...

    @property
    def offset(self) -> int: ...


class EnvLayoutLike(Protocol):
    """One copy, or two for a redundant environment, each ``size`` bytes."""

    @property
    def size(self) -> int: ...

    @property
    def copies(self) -> Sequence[EnvCopyLike]: ...


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

    layout: EnvLayoutLike
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

    @property
    def _redundant(self) -> bool:
        return len(self.layout.copies) == 2

    def _load(self) -> _Ram:
        header = CRC_SIZE + (FLAGS_SIZE if self._redundant else 0)
        copies: dict[int, tuple[bytes, int]] = {}
        for index, copy in enumerate(self.layout.copies):
            block = _read(copy.path, copy.offset, self.layout.size)
            if len(block) == self.layout.size and zlib.crc32(block[header:]) == int.from_bytes(
                block[:CRC_SIZE], "little"
            ):
                copies[index] = (block[header:], block[CRC_SIZE] if self._redundant else 0)
        if not copies:
            return self._default()  # "bad CRC"
        if len(copies) == 2:
            chosen = _newer(copies[0][1], copies[1][1])
        else:
            (chosen,) = copies
        data, serial = copies[chosen]
        env = himport(data)
        if env is None:
            return self._default()  # "import failed": U-Boot does not try the other copy
        return _Ram(env, _EnvValid.VALID if chosen == 0 else _EnvValid.REDUND, serial)

    def _default(self) -> _Ram:
        return _Ram(dict(self.default_environment), _EnvValid.INVALID, 0)

    def _saveenv(self, ram: _Ram) -> None:
        if not self._redundant:
            data = hexport(ram.env, self.layout.size - CRC_SIZE)
            _write(self.layout.copies[0], _crc(data) + data)
            return
        data = hexport(ram.env, self.layout.size - CRC_SIZE - FLAGS_SIZE)
        ram.serial = (ram.serial + 1) & 0xFF
        target = 1 if ram.valid is _EnvValid.VALID else 0
        _write(self.layout.copies[target], _crc(data) + bytes([ram.serial]) + data)
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
    """``env_import_redund``: which of two valid copies U-Boot takes, from their flags."""
    if serial0 == 0xFF and serial1 == 0:
        return 1
    if serial1 == 0xFF and serial0 == 0:
        return 0
    return 1 if serial1 > serial0 else 0


def himport(data: bytes) -> dict[str, str] | None:
    """The variables ``himport_r`` makes of a data area (separator NUL), or None where it
    fails ("import failed": an entry with an empty name)."""
    buf = bytes(data) + b"\0"  # himport_r's copy ends with a NUL past the area
    size = len(data)
    env: dict[str, str] = {}
    position = 0
    while True:
        while buf[position] in b" \t":
            position += 1
        if buf[position] == ord("#"):  # a comment, up to the next NUL
            position = buf.index(b"\0", position) + 1
        else:
            name_end = position
            while buf[name_end] not in b"=\0":
                name_end += 1
            name = buf[position:name_end]
            if buf[name_end] == 0 or buf[name_end + 1] == 0:  # "name" or "name=": delete
                position = name_end + (2 if buf[name_end] == ord("=") else 1)
                env.pop(name.decode(*_TEXT), None)
            else:
                value = bytearray()
                cursor = name_end + 1
                while buf[cursor] != 0:
                    if buf[cursor] == ord("\\") and buf[cursor + 1] != 0:
                        cursor += 1
                    value.append(buf[cursor])
                    cursor += 1
                position = cursor + 1
                if not name:
                    return None
                env[name.decode(*_TEXT)] = value.decode(*_TEXT)
        if position >= size or buf[position] == 0:
            return env


def hexport(env: Mapping[str, str], data_size: int) -> bytes:
    """The data area ``saveenv`` writes for ``env`` (``hexport_r``, separator NUL).

    Raises:
        BootloaderError: the entries do not fit ("Env export buffer too small").
    """
    entries = []
    for name, value in env.items():
        if not value:
            continue  # U-Boot holds no empty variable: setting one deletes it
        raw = bytearray()
        for byte in value.encode(*_TEXT):
            if byte in (0, ord("\\")):
                raw.append(ord("\\"))
            raw.append(byte)
        entries.append((name.encode(*_TEXT), bytes(raw)))
    entries.sort()
    body = b"".join(name + b"=" + value + b"\0" for name, value in entries)
    if len(body) + 1 > data_size:
        raise BootloaderError(
            f"{WHO}: Env export buffer too small: {data_size}, but need {len(body) + 1}"
        )
    return body + bytes(data_size - len(body))


def _crc(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(CRC_SIZE, "little")


def _read(path: os.PathLike[str], offset: int, size: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (negative: from the end); empty if unreadable."""
    try:
        with open(path, "rb") as device:
            device.seek(offset, os.SEEK_SET if offset >= 0 else os.SEEK_END)
            return device.read(size)
    except OSError:
        return b""


def _write(copy: EnvCopyLike, block: bytes) -> None:
    """Write one copy where U-Boot keeps it: a copy that is a file of its own (offset 0, one
    copy long or missing) is replaced whole, any other is overwritten in place.

    Raises:
        BootloaderError: the write failed.
    """
    path = Path(copy.path)
    try:
        if copy.offset == 0:
            try:
                info = path.stat()
            except FileNotFoundError:
                info = None
            if info is None or (stat.S_ISREG(info.st_mode) and info.st_size == len(block)):
                durable.atomic_write(path, block)
                return
        offset = copy.offset
        if offset < 0:  # from the end; a block device's size is where seeking to its end lands
            with path.open("rb") as device:
                offset += device.seek(0, os.SEEK_END)
            if offset < 0:
                raise BootloaderError(f"{WHO}: {path}: offset before the start")
        durable.write_at(path, offset, block)
    except OSError as err:
        raise BootloaderError(f"{WHO}: cannot write {path}: {err.strerror}") from err
