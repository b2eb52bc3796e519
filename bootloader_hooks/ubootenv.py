"""The U-Boot environment on disk: read and written bit-exact with U-Boot and libubootenv.

Format of one copy (``size`` bytes, the ``CONFIG_ENV_SIZE`` of the board)::

    crc32   4 bytes, little-endian, zlib CRC-32 of the whole data area (padding included)
    flags   1 byte, only in a redundant environment: a serial number, see below
    data    "name=value\\0" entries, then one more "\\0"; the rest of the area is padding

Conventions learnt from U-Boot (``env/common.c``, ``lib/hashtable.c``) and libubootenv
(``src/uboot_env.c``, ``src/common.c``), checked against ``fw_setenv``/``fw_printenv`` 0.3.2 and
``mkenvimage`` 2023.01 in ``tests/integration/test_uboot_interop.py``:

- entries are written sorted by name in byte order (U-Boot's ``hexport_r`` sorts with
  ``strcmp``; libubootenv keeps its list sorted the same way);
- the padding is not part of the format. U-Boot's ``saveenv`` zeroes it, ``mkenvimage`` fills it
  with 0xff by default, and libubootenv 0.3.2 writes whatever ``malloc`` returned (mostly zeroes,
  sometimes not). Readers here stop at the empty entry and never look at the padding; the
  writer zeroes it, like ``saveenv``;
- an entry without ``=`` is skipped and an entry ``name=`` means "no such variable" (U-Boot's
  import deletes it); an empty name makes U-Boot reject the whole copy, so it is corruption here;
- redundant copies: each copy carries a flags byte that is a serial number. A copy whose CRC is
  wrong is ignored. When both are valid the larger serial wins, except that 0 beats 255 (the
  serial wrapped), and copy 0 wins a tie. A write goes to the copy that was *not* read, with the
  serial of the copy that was read plus one (mod 256). This is the "incremental" flag scheme
  both U-Boot and libubootenv use on block devices and files (NOR flash uses a boolean
  active/obsolete flag, which this module does not support);
- with no valid copy U-Boot uses its built-in default environment and its next ``saveenv``
  writes copy 0 with serial 1; :func:`write_env` without a previous state does the same.

Values are bytes to U-Boot; they are decoded here as UTF-8 with ``surrogateescape`` so that any
byte sequence survives a read-modify-write unchanged. U-Boot's import treats a backslash in a
value as an escape while libubootenv writes it as is: values written by our backend never
contain one.

Where a copy lives is an :class:`EnvCopy`: a path (a file such as ``uboot.env`` on the boot
partition, a disk image, or a block device) and a byte offset in it. :func:`parse_fw_env_config`
reads libubootenv's ``fw_env.config`` (device, offset, size, optional sector size, ``#``
comments; MTD and UBI devices are not supported, nor libubootenv's YAML form).

Power cuts. Every write goes through :mod:`fleet_core.durable`:

- a copy that is a whole file (offset 0, and the file is missing or exactly one copy long) is
  replaced with ``atomic_write``: U-Boot finds it by name, so a new inode is fine, and a cut
  leaves the old or the new file;
- a copy at an offset inside a larger file or on a block device is overwritten in place with
  ``write_at``: U-Boot reads fixed offsets, so a rename is not possible there. A cut during the
  write can leave that copy torn (its CRC then fails). With a redundant environment the write
  always targets the copy that was *not* in use, so the copy in use stays intact and wins until
  the new one is complete: a cut leaves the old environment or the new one, never neither.
  A single copy at an offset has no such protection: a cut mid-write leaves a bad CRC and
  U-Boot falls back to its default environment (our boot script then starts afresh; see
  ``bootloader_hooks.uboot``). Use a redundant environment wherever the board allows.

A redundant environment with one bad copy is read from the good one; the next write goes to the
bad one (it is the one not in use), which repairs it.
"""

from __future__ import annotations

import os
import re
import stat
import types
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bootloader_hooks.errors import BootloaderError, BootStateCorruptError
from fleet_core import durable

WHO = "uboot backend"
CRC_SIZE = 4
FLAGS_SIZE = 1
FIRST_SERIAL = 1  # what U-Boot's saveenv writes after starting from its default environment
MIN_ENV_SIZE = CRC_SIZE + FLAGS_SIZE + 1


@dataclass(frozen=True)
class EnvCopy:
    """Where one copy of the environment lives: ``path`` and a byte ``offset`` in it.

    A negative offset counts back from the end of the file or device (as in libubootenv).
    """

    path: Path
    offset: int = 0

    def describe(self) -> str:
        return f"{self.path}" if self.offset == 0 else f"{self.path}@{self.offset:#x}"


@dataclass(frozen=True)
class EnvLayout:
    """The environment's location: one copy, or two for a redundant environment, of ``size``.

    ``sector_size`` is kept from ``fw_env.config`` for reference; block devices and files do
    not need it.
    """

    size: int
    copies: tuple[EnvCopy, ...]
    sector_size: int = 0

    def __post_init__(self) -> None:
        if len(self.copies) not in (1, 2):
            raise BootloaderError(
                f"{WHO}: an environment has one or two copies, not {len(self.copies)}"
            )
        if self.size < MIN_ENV_SIZE:
            raise BootloaderError(f"{WHO}: environment size {self.size} is too small")

    @property
    def redundant(self) -> bool:
        return len(self.copies) == 2

    @property
    def header_size(self) -> int:
        return CRC_SIZE + (FLAGS_SIZE if self.redundant else 0)

    @classmethod
    def single(cls, path: str | os.PathLike[str], size: int, offset: int = 0) -> EnvLayout:
        return cls(size, (EnvCopy(Path(path), offset),))

    @classmethod
    def redundant_pair(
        cls,
        path: str | os.PathLike[str],
        size: int,
        offset: int,
        redundant_offset: int,
        redundant_path: str | os.PathLike[str] | None = None,
    ) -> EnvLayout:
        second = Path(redundant_path) if redundant_path is not None else Path(path)
        return cls(size, (EnvCopy(Path(path), offset), EnvCopy(second, redundant_offset)))


@dataclass(frozen=True)
class EnvState:
    """An environment as read: its variables and where they came from.

    ``active`` is the index of the copy the variables were read from (the copy U-Boot would use),
    ``serial`` its flags byte (``None`` for a single-copy environment), and ``problems`` one line
    per copy that could not be used (bad CRC, missing, too short).
    """

    variables: Mapping[str, str]
    active: int
    serial: int | None = None
    problems: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "variables", types.MappingProxyType(dict(self.variables)))

    @property
    def damaged(self) -> bool:
        """Whether a copy is unusable (the next write repairs a redundant environment)."""
        return bool(self.problems)


# --- one copy: bytes <-> variables -------------------------------------------------------------


def _encode_text(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _decode_text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def check_name(name: str) -> None:
    """Raise :class:`BootloaderError` unless U-Boot would import ``name=...`` as that name."""
    if not name or "=" in name or "\0" in name or name[0] in " \t#":
        raise BootloaderError(f"{WHO}: invalid environment variable name {name!r}")


def _check_value(name: str, value: str) -> None:
    if "\0" in value:
        raise BootloaderError(f"{WHO}: value of {name} contains a NUL byte")


def encode_data(variables: Mapping[str, str], data_size: int) -> bytes:
    """The data area for ``variables``: sorted entries, the end marker, zero padding.

    Variables with an empty value are left out (U-Boot reads ``name=`` as "unset").

    Raises:
        BootloaderError: a name or value cannot be stored, or the variables do not fit.
    """
    entries: list[bytes] = []
    for name, value in variables.items():
        check_name(name)
        _check_value(name, value)
        if not value:
            continue
        try:
            entries.append(_encode_text(name) + b"=" + _encode_text(value) + b"\0")
        except UnicodeEncodeError as err:
            raise BootloaderError(f"{WHO}: {name!r}: text that has no bytes: {err.reason}") from err
    entries.sort()
    body = b"".join(entries) + b"\0"
    if len(body) > data_size:
        raise BootloaderError(
            f"{WHO}: environment needs {len(body)} bytes, only {data_size} available"
        )
    return body + bytes(data_size - len(body))


def encode_copy(variables: Mapping[str, str], size: int, serial: int | None = None) -> bytes:
    """One copy of ``size`` bytes; ``serial`` is the flags byte of a redundant environment."""
    header = CRC_SIZE + (0 if serial is None else FLAGS_SIZE)
    data = encode_data(variables, size - header)
    flags = b"" if serial is None else bytes([serial & 0xFF])
    return zlib.crc32(data).to_bytes(CRC_SIZE, "little") + flags + data


def decode_data(data: bytes) -> dict[str, str]:
    """The variables of a data area whose CRC was already checked.

    Raises:
        BootStateCorruptError: no end marker, or an entry with an empty name.
    """
    variables: dict[str, str] = {}
    position = 0
    while True:
        end = data.find(b"\0", position)
        if end < 0:
            raise BootStateCorruptError(f"{WHO}: environment data has no end marker")
        if end == position:
            return variables
        name, sep, value = data[position:end].partition(b"=")
        position = end + 1
        if not sep:
            continue  # U-Boot and libubootenv skip an entry without "="
        if not name:
            raise BootStateCorruptError(f"{WHO}: environment has an entry with an empty name")
        if value:
            variables[_decode_text(name)] = _decode_text(value)
        else:
            variables.pop(_decode_text(name), None)


def decode_copy(block: bytes, redundant: bool) -> tuple[dict[str, str], int | None]:
    """The variables and flags byte (``None`` unless ``redundant``) of one copy.

    Raises:
        BootStateCorruptError: the CRC does not match or the data is malformed.
    """
    header = CRC_SIZE + (FLAGS_SIZE if redundant else 0)
    if len(block) <= header:
        raise BootStateCorruptError(f"{WHO}: environment copy of {len(block)} bytes is too short")
    stored = int.from_bytes(block[:CRC_SIZE], "little")
    data = block[header:]
    if zlib.crc32(data) != stored:
        raise BootStateCorruptError(f"{WHO}: environment CRC mismatch")
    serial = block[CRC_SIZE] if redundant else None
    return decode_data(data), serial


def newer_copy(serial0: int, serial1: int) -> int:
    """Which of two valid copies U-Boot and libubootenv use (0 or 1), from their serials."""
    if serial0 == 0xFF and serial1 == 0:
        return 1
    if serial1 == 0xFF and serial0 == 0:
        return 0
    return 1 if serial1 > serial0 else 0


# --- I/O -----------------------------------------------------------------------------------------


def _resolve_offset(fd: int, offset: int) -> int:
    return offset if offset >= 0 else os.lseek(fd, 0, os.SEEK_END) + offset


def _read_block(copy: EnvCopy, size: int) -> bytes:
    fd = os.open(copy.path, os.O_RDONLY)
    try:
        position = _resolve_offset(fd, copy.offset)
        if position < 0:
            return b""
        chunks: list[bytes] = []
        remaining = size
        while remaining:
            chunk = os.pread(fd, remaining, position)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
            position += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_copy(layout: EnvLayout, index: int) -> tuple[dict[str, str], int | None]:
    """Read and decode copy ``index`` of ``layout``.

    Raises:
        BootStateCorruptError: the copy is missing, short, or fails its CRC.
        BootloaderError: the file or device cannot be read (permissions, I/O error).
    """
    copy = layout.copies[index]
    try:
        block = _read_block(copy, layout.size)
    except FileNotFoundError as err:
        raise BootStateCorruptError(f"{WHO}: {copy.describe()}: missing") from err
    except OSError as err:
        raise BootloaderError(f"{WHO}: cannot read {copy.describe()}: {err.strerror}") from err
    if len(block) != layout.size:
        raise BootStateCorruptError(
            f"{WHO}: {copy.describe()}: {len(block)} of {layout.size} bytes"
        )
    try:
        return decode_copy(block, layout.redundant)
    except BootStateCorruptError as err:
        raise BootStateCorruptError(f"{err} in {copy.describe()}") from err


def read_env(layout: EnvLayout) -> EnvState:
    """The environment U-Boot would load from ``layout``.

    Raises:
        BootStateCorruptError: no copy is valid (U-Boot would use its default environment).
        BootloaderError: a copy cannot be read for another reason than corruption.
    """
    good: dict[int, tuple[dict[str, str], int | None]] = {}
    problems: list[str] = []
    for index in range(len(layout.copies)):
        try:
            good[index] = read_copy(layout, index)
        except BootStateCorruptError as err:
            problems.append(str(err))
    if not good:
        raise BootStateCorruptError(f"{WHO}: no valid environment ({'; '.join(problems)})")
    if len(good) == 2:
        active = newer_copy(good[0][1] or 0, good[1][1] or 0)
    else:
        (active,) = good
    variables, serial = good[active]
    return EnvState(variables, active, serial, tuple(problems))


def _is_whole_file(copy: EnvCopy, size: int) -> bool:
    if copy.offset != 0:
        return False
    try:
        info = copy.path.stat()
    except FileNotFoundError:
        return True
    return stat.S_ISREG(info.st_mode) and info.st_size == size


def write_copy(copy: EnvCopy, block: bytes) -> None:
    """Write one encoded copy durably (see the module docstring for the power-cut story).

    Raises:
        BootloaderError: the write failed; the message names the path and the reason.
    """
    try:
        if _is_whole_file(copy, len(block)):
            durable.atomic_write(copy.path, block)
            return
        offset = copy.offset
        if offset < 0:
            fd = os.open(copy.path, os.O_RDONLY)
            try:
                offset = _resolve_offset(fd, offset)
            finally:
                os.close(fd)
            if offset < 0:
                raise BootloaderError(f"{WHO}: {copy.describe()} is before the start of the file")
        durable.write_at(copy.path, offset, block)
    except OSError as err:
        raise BootloaderError(f"{WHO}: cannot write {copy.describe()}: {err.strerror}") from err


def write_env(
    layout: EnvLayout, variables: Mapping[str, str], previous: EnvState | None
) -> EnvState:
    """Write ``variables`` the way U-Boot's ``saveenv`` and ``fw_setenv`` do.

    ``previous`` is the state read just before (``None`` when no copy was valid). A redundant
    environment gets the copy that was not in use, with the next serial, so the copy in use
    survives a cut; with no previous state copy 0 gets serial 1. Everything is encoded before
    the first byte is written: a variable that cannot be stored fails with nothing changed.

    Raises:
        BootloaderError: the variables do not fit or cannot be stored, or the write failed.
    """
    if not layout.redundant:
        target, serial = 0, None
    elif previous is None:
        target, serial = 0, FIRST_SERIAL
    else:
        target, serial = 1 - previous.active, ((previous.serial or 0) + 1) & 0xFF
    block = encode_copy(variables, layout.size, serial)
    write_copy(layout.copies[target], block)
    return EnvState(variables, target, serial)


def update_env(layout: EnvLayout, changes: Mapping[str, str | None]) -> EnvState:
    """Read, set each name in ``changes`` (``None`` or ``""`` unsets it), write: one write.

    Raises:
        BootStateCorruptError: no valid copy to start from.
        BootloaderError: see :func:`write_env`.
    """
    previous = read_env(layout)
    variables = dict(previous.variables)
    for name, value in changes.items():
        if value:
            variables[name] = value
        else:
            variables.pop(name, None)
    return write_env(layout, variables, previous)


# --- fw_env.config -------------------------------------------------------------------------------

_C_INTEGER = re.compile(r"[+-]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")
_HEX_INTEGER = re.compile(r"[+-]?(0[xX])?[0-9a-fA-F]+\Z")
_UNSUPPORTED_DEVICES = ("/dev/mtd", "/dev/ubi")


def _c_integer(token: str) -> int | None:
    """``strtoll(token, 0)`` as libubootenv's ``%lli`` reads an offset: 0x.. hex, 0.. octal."""
    if not _C_INTEGER.match(token):
        return None
    sign = -1 if token[0] == "-" else 1
    digits = token.lstrip("+-")
    if digits[:2].lower() == "0x":
        return sign * int(digits[2:], 16)
    if len(digits) > 1 and digits[0] == "0":
        return sign * int(digits[1:], 8)
    return sign * int(digits)


def _hex_integer(token: str) -> int | None:
    """``%zx`` as libubootenv reads a size: hexadecimal whether or not it starts with 0x."""
    if not _HEX_INTEGER.match(token):
        return None
    return int(token, 16)


def _parse_config_line(number: int, line: str) -> tuple[EnvCopy, int, int]:
    words = line.split()
    where = f"fw_env.config line {number}"
    if len(words) < 3:
        raise BootloaderError(f"{WHO}: {where}: need device, offset and size")
    device = words[0]
    if device.startswith(_UNSUPPORTED_DEVICES):
        raise BootloaderError(f"{WHO}: {where}: MTD/UBI device {device} is not supported")
    offset = _c_integer(words[1])
    size = _hex_integer(words[2])
    if offset is None:
        raise BootloaderError(f"{WHO}: {where}: bad offset {words[1]!r}")
    if not size:
        raise BootloaderError(f"{WHO}: {where}: bad size {words[2]!r}")
    sector = _hex_integer(words[3]) if len(words) > 3 else 0
    return EnvCopy(Path(device), offset), size, sector or 0


def parse_fw_env_config(text: str) -> EnvLayout:
    """The layout described by the text of a ``fw_env.config``.

    Lines whose first non-blank character is ``#`` and blank lines are skipped; each other line
    is ``device offset size [sector-size [sectors]]``, the offset a C integer (``0x`` hex, a
    leading ``0`` octal, or decimal), sizes hexadecimal with or without ``0x``, as libubootenv
    reads them. The first two entries are used; two entries make a redundant environment.
    Unlike libubootenv, a malformed line is an error rather than silently skipped.

    Raises:
        BootloaderError: no entry, a malformed line, or two entries of different sizes.
    """
    entries: list[tuple[EnvCopy, int, int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        entries.append(_parse_config_line(number, stripped))
        if len(entries) == 2:
            break
    if not entries:
        raise BootloaderError(f"{WHO}: fw_env.config has no environment entry")
    sizes = {size for _, size, _ in entries}
    if len(sizes) != 1:
        raise BootloaderError(f"{WHO}: fw_env.config copies differ in size")
    return EnvLayout(entries[0][1], tuple(copy for copy, _, _ in entries), entries[0][2])


def read_fw_env_config(path: str | os.PathLike[str]) -> EnvLayout:
    """:func:`parse_fw_env_config` of the file at ``path``.

    Raises:
        BootloaderError: the file cannot be read or is malformed.
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not text"
        raise BootloaderError(f"{WHO}: cannot read {path}: {reason}") from err
    return parse_fw_env_config(text)


def format_fw_env_config(layout: EnvLayout) -> str:
    """A ``fw_env.config`` text for ``layout`` that libubootenv and :func:`parse_fw_env_config`
    both read back as the same layout."""
    lines = ["# device offset size"]
    for copy in layout.copies:
        offset = f"{copy.offset:#x}" if copy.offset >= 0 else f"-{-copy.offset:#x}"
        lines.append(f"{copy.path} {offset} {layout.size:#x}")
    return "\n".join(lines) + "\n"


def parse_initial_env(text: str) -> dict[str, str]:
    """The variables of a ``u-boot-initial-env`` text: the board's default environment as
    ``make u-boot-initial-env`` writes it and ``fw_setenv -f`` reads it. ``name=value`` lines;
    blank lines, ``#`` comments and lines without ``=`` are skipped, an empty value unsets."""
    variables: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if not sep or not name or line.startswith("#"):
            continue
        if value:
            variables[name] = value
        else:
            variables.pop(name, None)
    return variables


def read_initial_env(path: str | os.PathLike[str]) -> dict[str, str]:
    """:func:`parse_initial_env` of the file at ``path``.

    Raises:
        BootloaderError: the file cannot be read.
    """
    try:
        text = Path(path).read_text(errors="surrogateescape")
    except OSError as err:
        raise BootloaderError(f"{WHO}: cannot read {path}: {err.strerror}") from err
    return parse_initial_env(text)
