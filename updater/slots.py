"""Where each slot's images go: partition labels resolved to devices, or plain files.

A slot class is configured as ``PARTLABEL=<label>`` (the GPT partition name, found through the
``/dev/disk/by-partlabel`` links udev maintains, or by asking udev directly) or as a path (a
block device, or a regular file standing in for one in tests and labs). A slot's capacity is
the size of its device or file: an image is never written into a slot smaller than itself.

Before anything is written, a target must be itself alone: no other slot class of any slot
resolves to the same device or file (a configuration that names one partition twice, a label
typo, two links to one device), and a block device must not be in use: mounted anywhere (the
running root among them), or held by another device (device-mapper, md, a loop device over it).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from updater.errors import SlotError

PARTLABEL = "PARTLABEL="
MOUNTINFO = Path("/proc/self/mountinfo")
SYS_DEV_BLOCK = Path("/sys/dev/block")


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
    """Every slot class of ``slot``, resolved, each one a device or file of its own.

    Raises:
        SlotError: an unknown slot, an unresolvable label, a missing device, or a target that
            is also another slot class of this slot or of another slot.
    """
    if slot not in slots:
        raise SlotError(f"unknown slot {slot!r} (configured: {', '.join(sorted(slots))})")
    targets = {}
    for slot_class, spec in slots[slot].items():
        path = resolve(spec, partlabel_dir)
        targets[slot_class] = SlotTarget(slot, slot_class, path, capacity(path))
    _check_distinct(slots, targets, partlabel_dir)
    return targets


def identity(path: Path) -> tuple[str, int, int] | None:
    """What makes ``path`` one device or file: a block device's number, a file's inode (every
    name and link of one device or file has the same); ``None`` when it cannot be read."""
    try:
        found = path.stat()
    except OSError:
        return None
    if stat.S_ISBLK(found.st_mode):
        return ("device", os.major(found.st_rdev), os.minor(found.st_rdev))
    return ("file", found.st_dev, found.st_ino)


def _check_distinct(
    slots: Mapping[str, Mapping[str, str]], targets: Mapping[str, SlotTarget], partlabel_dir: Path
) -> None:
    """Refuse a target that any other configured slot class resolves to as well. Another
    slot's class that cannot be resolved now is no danger to this write and is left out."""
    for slot_class, target in targets.items():
        mine = identity(target.path)
        for other_slot, classes in sorted(slots.items()):
            for other_class, spec in sorted(classes.items()):
                if (other_slot, other_class) == (target.slot, slot_class):
                    continue
                try:
                    other = resolve(spec, partlabel_dir)
                except SlotError:
                    continue
                if mine is not None and identity(other) == mine:
                    raise SlotError(
                        f"slot {target.slot} {slot_class} ({target.path}) is also slot "
                        f"{other_slot} {other_class} ({spec}): refusing to write it"
                    )


def check_not_mounted_root(
    target: Path,
    root: Path = Path("/"),
    *,
    mountinfo: Path = MOUNTINFO,
    sys_dev_block: Path = SYS_DEV_BLOCK,
) -> None:
    """Refuse a block device in use, whatever the bootloader says: a second line of defence
    against writing the booted slot. In use: it holds the running root filesystem, it is
    mounted anywhere (``/proc/self/mountinfo``), or another device is built on it
    (``/sys/dev/block/<major>:<minor>/holders``: device-mapper, md, a loop device), as under a
    root on dm-verity or an overlay.

    Raises:
        SlotError: ``target`` is in use, naming how.
    """
    try:
        target_stat = target.stat()
    except OSError:
        return
    if not stat.S_ISBLK(target_stat.st_mode):
        return
    if target_stat.st_rdev == root.stat().st_dev:
        raise SlotError(f"slot {target}: holds the running root filesystem")
    number = f"{os.major(target_stat.st_rdev)}:{os.minor(target_stat.st_rdev)}"
    where = _mounted_at(number, mountinfo)
    if where is not None:
        raise SlotError(f"slot {target}: mounted at {where}")
    try:
        holders = sorted(entry.name for entry in (sys_dev_block / number / "holders").iterdir())
    except OSError:
        holders = []
    if holders:
        raise SlotError(f"slot {target}: in use by {', '.join(holders)}")


def _mounted_at(number: str, mountinfo: Path) -> str | None:
    """The first mount point of the device ``major:minor`` (None: not mounted, or no table)."""
    try:
        lines = mountinfo.read_text("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # mount ID, parent ID, major:minor, root, mount point, ... (proc(5))
        if len(fields) > 4 and fields[2] == number:
            return fields[4].replace("\\040", " ")
    return None
