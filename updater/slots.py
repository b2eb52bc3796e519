"""Where each slot's images go: partition labels resolved to devices, or plain files.

A slot class is configured as ``PARTLABEL=<label>`` (the GPT partition name, found through the
``/dev/disk/by-partlabel`` links udev maintains, or by asking udev directly) or as a path (a
block device, or a regular file standing in for one in tests and labs). A slot's capacity is
the size of its device or file: an image is never written into a slot smaller than itself.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from updater.errors import SlotError

PARTLABEL = "PARTLABEL="


@dataclass(frozen=True)
class SlotTarget:
    """One slot class of one slot, resolved: where to write and how much fits."""

    slot: str
    slot_class: str
    path: Path
    capacity: int  # bytes


def _udev_lookup(label: str) -> Path | None:
    """Ask udev for the partition named ``label``, for systems without by-partlabel links."""
    try:
        import pyudev
    except ImportError:
        return None
    try:
        context = pyudev.Context()
        for device in context.list_devices(subsystem="block", DEVTYPE="partition"):
            if device.properties.get("ID_PART_ENTRY_NAME") == label and device.device_node:
                return Path(device.device_node)
    except (OSError, pyudev.DeviceNotFoundError):
        return None
    return None


def resolve(spec: str, partlabel_dir: Path) -> Path:
    """The device or file behind a slot specification.

    Raises:
        SlotError: a partition label that no device carries.
    """
    if not spec.startswith(PARTLABEL):
        return Path(spec)
    label = spec.removeprefix(PARTLABEL)
    link = partlabel_dir / label
    if link.exists():
        return link.resolve()
    found = _udev_lookup(label)
    if found is None:
        raise SlotError(f"no partition labelled {label!r} (looked in {partlabel_dir} and udev)")
    return found


def capacity(path: Path) -> int:
    """Bytes that fit into a block device or an existing regular file.

    Raises:
        SlotError: missing, or neither a block device nor a regular file.
    """
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise SlotError(f"slot {path}: {err.strerror}") from err
    if stat.S_ISREG(mode):
        return path.stat().st_size
    if not stat.S_ISBLK(mode):
        raise SlotError(f"slot {path}: neither a block device nor a regular file")
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def slot_targets(
    slots: Mapping[str, Mapping[str, str]], slot: str, partlabel_dir: Path
) -> dict[str, SlotTarget]:
    """Every slot class of ``slot``, resolved.

    Raises:
        SlotError: an unknown slot, an unresolvable label, a missing device.
    """
    if slot not in slots:
        raise SlotError(f"unknown slot {slot!r} (configured: {', '.join(sorted(slots))})")
    targets = {}
    for slot_class, spec in slots[slot].items():
        path = resolve(spec, partlabel_dir)
        targets[slot_class] = SlotTarget(slot, slot_class, path, capacity(path))
    return targets


def check_not_mounted_root(target: Path, root: Path = Path("/")) -> None:
    """Refuse a block device that holds the running root filesystem, whatever the bootloader
    says: a second line of defence against writing the booted slot.

    Raises:
        SlotError: ``target`` is the device the root filesystem lives on.
    """
    try:
        target_stat = target.stat()
    except OSError:
        return
    if stat.S_ISBLK(target_stat.st_mode) and target_stat.st_rdev == root.stat().st_dev:
        raise SlotError(f"slot {target}: holds the running root filesystem")
