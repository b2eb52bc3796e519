"""A model of the Raspberry Pi 4/5/CM4 EEPROM bootloader's choice of boot partition.

Written from Raspberry Pi's documentation, not from our backend (this module does not import
:mod:`bootloader_hooks.tryboot`), so that tests driving the backend against it check the
backend against the firmware, not against itself.

What the documentation says, and what the model does with it:

1. **The tryboot flag** is one-shot and volatile. ``reboot "0 tryboot"`` (the partition number
   first, then ``tryboot``: "the partition number defaults to zero but it must be specified if
   extra arguments are added") sets it; the bootloader clears it before starting the firmware,
   "a crash or reset will cause the original [configuration] to be loaded on the next reboot".
   So in the model the flag is set only for a boot whose cause is :attr:`BootCause.REBOOT` with
   such a command; ``POWER_ON`` and ``RESET`` never carry it, and every boot consumes it. (On a
   Pi 4B rev 1.0/1.1 the flag is kept in the EEPROM across the power-supply reset of a reboot;
   it is still consumed by the boot.) A command naming ``tryboot`` without a partition number
   first does not set the flag in the model: the documentation calls that form invalid, and
   not trying is the safe reading.
2. **Which partition.** A partition number given to ``reboot`` (``reboot 3``) wins. Otherwise
   ``autoboot.txt`` on partition 1 is evaluated like ``config.txt``: ``[all]`` applies to every
   boot, ``[tryboot]`` only when the flag is set, ``[none]`` to nothing, and a later
   ``boot_partition`` overrides an earlier one, so in tryboot mode the ``[tryboot]`` value
   wins. Without a ``boot_partition``, the EEPROM ``PARTITION`` property applies; partition
   ``0`` means "the first bootable FAT partition". ``tryboot_a_b=1`` makes the chosen partition
   load its ordinary ``config.txt``; without it a tryboot would need ``tryboot.txt`` in the
   partition, which our boot partitions do not carry, so the model then treats that partition
   as not bootable (undocumented; the conservative choice).
3. **A partition that is not bootable** (no ``start4.elf`` on a Pi 4, no ``config.txt`` and
   device tree on a Pi 5: here, not in :attr:`TrybootFirmware.bootable`). With
   ``PARTITION_WALK=1`` (the default since the 2025-08-13 "latest" EEPROM) the bootloader
   "will check each partition in turn (up to 8 and wrapping to 0)", "starting from the
   specified partition", without reading ``autoboot.txt`` again. The model walks from the next
   partition up to :attr:`TrybootFirmware.max_partition`, then wraps to partition 1, and boots
   the first bootable one. (Issue rpi-eeprom#738 shows a Pi 4 probing 2, 1, 2, 3: the walk
   order is not fully pinned down, which is why the backend never relies on it.) With the walk
   off, or when nothing is bootable, the bootloader advances ``BOOT_ORDER`` and, with only the
   SD card or NVMe to boot from, never starts Linux: the model raises
   :class:`NoBootablePartitionError`.
4. **What Linux sees** (``/proc/device-tree/chosen/bootloader``): ``partition``, "the
   partition number used during boot", and ``tryboot``, "set to 1 if the tryboot flag was set
   at boot", each a 32-bit integer (device-tree cells are big-endian). After a partition
   walk the model still reports ``tryboot`` 1, since the flag *was* set (undocumented; the
   backend does not depend on it). The model also supplies
   ``proc/sys/kernel/random/boot_id``: Linux, not the firmware, makes it, but a view of a fresh
   boot without it would not be one.
5. **Things the model leaves out**: ``BOOT_WATCHDOG_TIMEOUT`` (a watchdog that resets the board
   if the firmware does not start the Arm CPU in time; cancelled at the hand-over to Linux,
   so it never sees a kernel hang) and ``BOOT_WATCHDOG_PARTITION`` (the partition to boot after
   that reset; ``0``, the default, goes through ``autoboot.txt`` again). A firmware-stage hang
   is a :attr:`BootCause.RESET` here, which the model already treats as a normal boot.
   Conditional filters other than ``[all]``/``[none]``/``[tryboot]`` (unsupported in
   ``autoboot.txt``) are taken as not matching. Only the first 512 bytes of ``autoboot.txt``
   count ("limited to 512 bytes").

Sources (raspberrypi/documentation, as published on raspberrypi.com/documentation/computers):

- config_txt/autoboot.adoc, "autoboot.txt": ``boot_partition``, the ``[tryboot]`` filter,
  ``tryboot_a_b``, the 512-byte limit, "Example update flow for A/B booting"
  (https://www.raspberrypi.com/documentation/computers/config_txt.html#autoboot-txt);
- raspberry-pi/bootflow-2711.adoc, "Fail-safe OS updates (TRYBOOT)" and "TRYBOOT_A_B mode"
  (https://www.raspberrypi.com/documentation/computers/raspberry-pi.html#fail-safe-os-updates-tryboot);
- config_txt/conditional.adoc, "Conditional filters": ``[all]``, ``[none]``, ``[tryboot]``;
- configuration/device-tree.adoc, "Firmware parameters", "Common bootloader properties
  /chosen/bootloader": ``partition``, ``tryboot``, ``pm_rsts``;
- raspberry-pi/eeprom-bootloader.adoc, "Raspberry Pi bootloader configuration":
  ``PARTITION``, ``PARTITION_WALK``, ``BOOT_WATCHDOG_TIMEOUT``, ``BOOT_WATCHDOG_PARTITION``,
  ``REBOOT_ON_FATAL_ERROR``;
- rpi-eeprom release notes (pull requests #659, #663: "check each partition in turn starting
  from the specified partition"; #736: ``PARTITION_WALK`` on by default) and issue #738.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from bootloader_hooks.base import BootCause, BootEvent, BootOutcome
from bootloader_hooks.errors import BootloaderError

AUTOBOOT_LIMIT = 512  # bytes of autoboot.txt the bootloader reads
DEFAULT_PARTITIONS: Mapping[str, int] = {"a": 2, "b": 3, "safe": 4}
DT_BOOTLOADER = "proc/device-tree/chosen/bootloader"
BOOT_ID = "proc/sys/kernel/random/boot_id"


class NoBootablePartitionError(BootloaderError):
    """The bootloader found nothing to boot: on a real board, Linux never starts."""


def parse_reboot_argument(command: Sequence[str]) -> tuple[int, bool]:
    """The partition number and tryboot flag a ``reboot`` command passes to the firmware.

    ``["reboot", "0 tryboot"]`` gives ``(0, True)``; ``["reboot"]`` gives ``(0, False)``;
    ``["reboot", "3"]`` gives ``(3, False)``. The argument is what follows the word
    ``reboot`` (``systemctl reboot "0 tryboot"`` works too).
    """
    words = list(command)
    if "reboot" in words:
        words = words[words.index("reboot") + 1 :]
    tokens = " ".join(words).split()
    if not tokens or not tokens[0].isdecimal():
        return 0, False
    return int(tokens[0]), "tryboot" in tokens[1:]


def evaluate_autoboot(data: bytes | None, tryboot: bool) -> dict[str, str]:
    """The settings the bootloader takes from ``autoboot.txt`` (``None``: no file).

    Lenient like the firmware: unknown lines are skipped, a later assignment wins, and the
    checksum comment we write means nothing here.
    """
    settings: dict[str, str] = {}
    if data is None:
        return settings
    active = True
    for raw in data[:AUTOBOOT_LIMIT].decode("latin-1").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            active = {"[all]": True, "[tryboot]": tryboot}.get(line.lower(), False)
            continue
        key, sep, value = line.partition("=")
        if sep and active:
            settings[key.strip()] = value.strip()
    return settings


class TrybootFirmware:
    """The EEPROM bootloader of one device, booting from a disk whose partition 1 holds
    ``autoboot.txt`` (at ``autoboot_txt``, a plain file in tests).

    ``bootable`` is the set of partitions whose boot files are present and valid; tests remove
    a partition from it to break a slot's boot files. ``partitions`` maps slot names to boot
    partitions, to name the slot in each :class:`BootOutcome`.
    """

    def __init__(
        self,
        autoboot_txt: Path,
        *,
        partitions: Mapping[str, int] = DEFAULT_PARTITIONS,
        bootable: Iterable[int] | None = None,
        partition_walk: bool = True,
        eeprom_partition: int = 0,
        max_partition: int = 8,
    ) -> None:
        self.autoboot_txt = autoboot_txt
        self.slots = {partition: slot for slot, partition in partitions.items()}
        self.bootable = set(self.slots if bootable is None else bootable)
        self.partition_walk = partition_walk
        self.eeprom_partition = eeprom_partition
        self.max_partition = max_partition
        self.last_partition: int | None = None

    def boot(self, event: BootEvent) -> BootOutcome:
        """Start the board for ``event`` and report what booted.

        Raises:
            NoBootablePartitionError: nothing bootable was found (the board would not boot).
        """
        reboot_partition, tryboot = 0, False
        if event.cause is BootCause.REBOOT:
            reboot_partition, tryboot = parse_reboot_argument(event.command)
        settings = evaluate_autoboot(self._read_autoboot(), tryboot)
        requested = reboot_partition or _number(settings.get("boot_partition"))
        requested = requested or self.eeprom_partition
        needs_tryboot_txt = tryboot and settings.get("tryboot_a_b") != "1"
        partition = self._choose(requested, needs_tryboot_txt)
        normal = evaluate_autoboot(self._read_autoboot(), tryboot=False)
        normal_partition = _number(normal.get("boot_partition")) or self.eeprom_partition
        self.last_partition = partition
        return BootOutcome(
            slot=self.slots[partition],
            trial=tryboot and partition == requested != normal_partition,
            linux_view={
                f"{DT_BOOTLOADER}/partition": struct.pack(">I", partition),
                f"{DT_BOOTLOADER}/tryboot": struct.pack(">I", 1 if tryboot else 0),
                BOOT_ID: f"{uuid.uuid4()}\n".encode(),
            },
        )

    def _read_autoboot(self) -> bytes | None:
        try:
            return self.autoboot_txt.read_bytes()
        except OSError:
            return None  # a missing or unreadable file sets nothing

    def _is_bootable(self, partition: int) -> bool:
        return partition in self.bootable and partition in self.slots

    def _choose(self, requested: int, needs_tryboot_txt: bool) -> int:
        if requested == 0:
            return self._first_bootable(range(1, self.max_partition + 1))
        if self._is_bootable(requested) and not needs_tryboot_txt:
            return requested
        if not self.partition_walk:
            raise NoBootablePartitionError(
                f"tryboot firmware: partition {requested} is not bootable and PARTITION_WALK=0"
            )
        after = range(requested + 1, self.max_partition + 1)
        return self._first_bootable([*after, *range(1, requested)])

    def _first_bootable(self, order: Iterable[int]) -> int:
        for partition in order:
            if self._is_bootable(partition):
                return partition
        raise NoBootablePartitionError("tryboot firmware: no bootable partition")


def _number(value: str | None) -> int:
    """A partition number setting, or 0 (unset) when absent or not a plain decimal."""
    if value is None or not value.isdecimal():
        return 0
    return int(value)
