"""``autoboot.txt``: the Raspberry Pi EEPROM bootloader's choice of boot partition, as we write it.

The file lives alone on partition 1 (FAT32). The bootloader reads it at every boot; we write
exactly one shape of it, always :data:`AUTOBOOT_SIZE` bytes long::

    # Metrica Fleet autoboot.txt v1 crc32=<8 hex digits> (rewritten in place: keep the size)
    [all]
    tryboot_a_b=1
    boot_partition=<primary partition>
    [tryboot]
    boot_partition=<partition to try once>
    [all]
    ################################...   (padding comment up to the fixed size)

Why this shape:

- **Fixed size, rewritten in place.** A commit overwrites the file's bytes with
  :func:`fleet_core.durable.rewrite_in_place`: same length, same FAT directory entry and
  cluster, no rename, so the FAT tables and directory never change. The file is far below the
  bootloader's 512-byte limit and fits one sector.
- **One byte per setting.** Partition numbers are single digits (1-9), so any two renderings
  differ only in the two partition digits and in the checksum comment. A write torn at any
  byte therefore leaves the bootloader (which ignores comments) reading each of ``[all]`` and
  ``[tryboot]`` as either the old or the new value, never a third one.
- **A checksum the firmware ignores.** The CRC-32 in the first line covers everything after
  it, so a torn mixture of two renderings is detected by :func:`parse` even when every line
  looks valid.
- **A shadow copy on the data partition** (:class:`AutobootFile`), written with
  :func:`fleet_core.durable.atomic_write` *before* each in-place rewrite: if ``autoboot.txt``
  is found damaged (torn write, bit rot, a hand edit), it is repaired from the shadow, which
  holds the last state we meant to write.

:func:`parse` is strict: anything but an exact rendering naming known partitions raises
:class:`~bootloader_hooks.errors.BootStateCorruptError` naming the file. How the *firmware*
reads a damaged file is modelled separately, in :mod:`bootloader_hooks.tryboot_model`.
"""

from __future__ import annotations

import contextlib
import os
import re
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from bootloader_hooks.errors import BootloaderError, BootStateCorruptError
from fleet_core import durable

BACKEND = "tryboot backend"
AUTOBOOT_SIZE = 256  # bytes; the bootloader reads at most 512
MIN_PARTITION = 1
MAX_PARTITION = 9  # single digits keep every rendering the same length, byte for byte

_HEADER = "# Metrica Fleet autoboot.txt v1 crc32={crc:08x} (rewritten in place: keep the size)\n"
_BODY = "[all]\ntryboot_a_b=1\nboot_partition={primary}\n[tryboot]\nboot_partition={trial}\n[all]\n"
_PATTERN = re.compile(
    rb"# Metrica Fleet autoboot\.txt v1 crc32=(?P<crc>[0-9a-f]{8})"
    rb" \(rewritten in place: keep the size\)\n"
    rb"(?P<body>\[all\]\ntryboot_a_b=1\nboot_partition=(?P<primary>[0-9])\n"
    rb"\[tryboot\]\nboot_partition=(?P<trial>[0-9])\n\[all\]\n#+\n)"
)


@dataclass(frozen=True)
class AutobootConfig:
    """The two settings we keep in ``autoboot.txt``.

    ``boot_partition`` is what every normal boot (power-on, reset, plain reboot) starts;
    ``tryboot_partition`` is what a ``reboot "0 tryboot"`` starts, once.
    """

    boot_partition: int
    tryboot_partition: int

    def __post_init__(self) -> None:
        for name in ("boot_partition", "tryboot_partition"):
            value = getattr(self, name)
            if type(value) is not int or not MIN_PARTITION <= value <= MAX_PARTITION:
                raise ValueError(
                    f"{name} must be a partition number {MIN_PARTITION}-{MAX_PARTITION}, "
                    f"got {value!r}"
                )


# Every rendering has the same length (single-digit partitions), so the padding is a constant.
_PADDING = AUTOBOOT_SIZE - len(_HEADER.format(crc=0)) - len(_BODY.format(primary=1, trial=1)) - 1


def render(config: AutobootConfig) -> bytes:
    """The exact :data:`AUTOBOOT_SIZE` bytes of ``autoboot.txt`` for ``config``."""
    text = _BODY.format(primary=config.boot_partition, trial=config.tryboot_partition)
    body = (text + "#" * _PADDING + "\n").encode("ascii")
    return _HEADER.format(crc=zlib.crc32(body)).encode("ascii") + body


def parse(data: bytes, known_partitions: Collection[int], source: str) -> AutobootConfig:
    """The settings of an ``autoboot.txt`` we rendered, checked strictly.

    Raises:
        BootStateCorruptError: ``data`` is not exactly a rendering of ours (wrong size, other
            content, a checksum that does not match: a torn write), or names a partition not in
            ``known_partitions``. The message names ``source``.
    """
    if len(data) != AUTOBOOT_SIZE:
        raise BootStateCorruptError(
            f"{BACKEND}: {source} has {len(data)} bytes, expected {AUTOBOOT_SIZE}"
        )
    match = _PATTERN.fullmatch(data)
    if match is None:
        raise BootStateCorruptError(
            f"{BACKEND}: {source} is not an autoboot.txt written by Metrica Fleet "
            "(missing or altered [all]/[tryboot] sections)"
        )
    if int(match["crc"], 16) != zlib.crc32(match["body"]):
        raise BootStateCorruptError(f"{BACKEND}: {source} fails its checksum (torn write?)")
    settings = {"[all]": int(match["primary"]), "[tryboot]": int(match["trial"])}
    for section, partition in settings.items():
        if partition not in known_partitions:
            known = ", ".join(str(p) for p in sorted(known_partitions))
            raise BootStateCorruptError(
                f"{BACKEND}: {source}: {section} boot_partition={partition} is no slot's boot "
                f"partition (known: {known})"
            )
    # With the size fixed and the checksum matching, ``data`` is exactly ``render(config)``.
    return AutobootConfig(settings["[all]"], settings["[tryboot]"])


def install_file(path: Path, config: AutobootConfig) -> None:
    """Create ``autoboot.txt`` at provisioning (a new file; later writes are in place).

    Raises:
        BootloaderError: the file cannot be written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.atomic_write(path, render(config))
    except OSError as err:
        raise BootloaderError(f"{BACKEND}: cannot write {path}: {err.strerror}") from err


def _read(path: Path) -> bytes | None:
    """The file's bytes, or ``None`` if it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise BootloaderError(f"{BACKEND}: cannot read {path}: {err.strerror}") from err


def _read_from_device(path: Path) -> bytes:
    """Read ``path`` after dropping its cached pages, so the bytes come from the medium.

    The pages are clean after the ``fsync`` of the write, so the kernel can drop them; a
    filesystem that silently lost the write (remounted read-only after an error, a failing
    card) then shows it here.
    """
    try:
        with open(path, "rb") as file:
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            return file.read()
    except OSError as err:
        raise BootloaderError(f"{BACKEND}: cannot read back {path}: {err.strerror}") from err


class AutobootFile:
    """``autoboot.txt`` on partition 1 and its shadow copy on the data partition.

    Power cut, per write of :meth:`store` (shadow first, then the file in place):

    - before or during the shadow write: both files as before (``atomic_write``);
    - after the shadow, before the in-place write: ``autoboot.txt`` still holds the old,
      valid state, which the bootloader and :meth:`load` both use; the next :meth:`store`
      brings the two together;
    - during the in-place write: the bootloader reads each setting as old or new (see the
      module docstring); :meth:`load` finds the checksum broken and says so, and the next
      :meth:`store` (the boot check's repair) writes the file whole again.
    """

    def __init__(self, path: Path, shadow: Path, known_partitions: Collection[int]) -> None:
        self.path = path
        self.shadow = shadow
        self.known_partitions = frozenset(known_partitions)

    def load(self) -> AutobootConfig:
        """The settings in force. Never writes: a damaged ``autoboot.txt`` (a write cut short)
        is reported, and :meth:`store` of the settings the caller knows to be right completes
        or replaces it (the shadow copy holds the ones that were being written).

        Raises:
            BootStateCorruptError: ``autoboot.txt`` is missing or damaged (naming whether the
                shadow copy still holds the settings that were being written).
            BootloaderError: a file cannot be read.
        """
        data = _read(self.path)
        try:
            if data is None:
                raise BootStateCorruptError(f"{BACKEND}: {self.path} does not exist")
            return parse(data, self.known_partitions, str(self.path))
        except BootStateCorruptError as damage:
            pending = self._shadow_config()
            if pending is None:
                raise damage from None
            raise BootStateCorruptError(
                f"{damage} (its shadow {self.shadow} holds the settings being written: "
                f"boot_partition={pending.boot_partition}, "
                f"tryboot_partition={pending.tryboot_partition})"
            ) from None

    def store(self, config: AutobootConfig) -> None:
        """Make ``config`` the settings in force: shadow copy, in-place rewrite, read-back.

        Nothing is written when the files already hold ``config``.

        Raises:
            BootloaderError: a write fails, or the bytes read back differ from those written.
        """
        new = render(config)
        if _read(self.shadow) != new:
            self._write_shadow(new)
        current = _read(self.path)
        if current != new:
            self._write_file(new, current)

    def _shadow_config(self) -> AutobootConfig | None:
        data = _read(self.shadow)
        if data is None:
            return None
        try:
            return parse(data, self.known_partitions, str(self.shadow))
        except BootStateCorruptError:
            return None

    def _write_shadow(self, data: bytes) -> None:
        try:
            self.shadow.parent.mkdir(parents=True, exist_ok=True)
            durable.atomic_write(self.shadow, data)
        except OSError as err:
            raise BootloaderError(f"{BACKEND}: cannot write {self.shadow}: {err.strerror}") from err

    def _write_file(self, data: bytes, current: bytes | None) -> None:
        """Write ``autoboot.txt`` in place; create it (rename) only if missing or mis-sized."""
        try:
            if current is not None and len(current) == len(data):
                durable.rewrite_in_place(self.path, data)
            else:
                # The one case where clusters move: there is no same-sized file to overwrite.
                durable.atomic_write(self.path, data)
        except OSError as err:
            raise BootloaderError(f"{BACKEND}: cannot write {self.path}: {err.strerror}") from err
        if _read_from_device(self.path) != data:
            raise BootloaderError(
                f"{BACKEND}: {self.path} reads back differently from what was written"
            )
