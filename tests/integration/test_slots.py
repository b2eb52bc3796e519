"""Slot targets on real block devices: partition labels resolved through by-partlabel links and
udev, capacities of loop devices, and the errors that name what is missing."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tools
from updater import slots
from updater.errors import SlotError


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """A loop device over a 3 MiB + 512 B file (a size no default would produce)."""
    require_tools(losetup=shutil.which("losetup") is not None)
    backing = tmp_path / "disk.img"
    backing.write_bytes(bytes(3 * 1024 * 1024 + 512))
    device = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield Path(device)
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def test_capacity_of_a_block_device_is_its_size(loop_device: Path) -> None:
    assert slots.capacity(loop_device) == 3 * 1024 * 1024 + 512


def test_capacity_of_a_file_is_its_size(tmp_path: Path) -> None:
    image = tmp_path / "slot.img"
    image.write_bytes(bytes(4097))
    assert slots.capacity(image) == 4097


def test_capacity_refuses_what_is_neither_a_file_nor_a_block_device(tmp_path: Path) -> None:
    with pytest.raises(SlotError, match="neither a block device nor a regular file"):
        slots.capacity(tmp_path)
    with pytest.raises(SlotError, match="No such file"):
        slots.capacity(tmp_path / "missing")


def test_a_partition_label_resolves_through_its_link(tmp_path: Path, loop_device: Path) -> None:
    by_partlabel = tmp_path / "by-partlabel"
    by_partlabel.mkdir()
    (by_partlabel / "root_b").symlink_to(loop_device)
    assert slots.resolve("PARTLABEL=root_b", by_partlabel) == loop_device
    targets = slots.slot_targets({"b": {"rootfs": "PARTLABEL=root_b"}}, "b", by_partlabel)
    assert targets["rootfs"] == slots.SlotTarget("b", "rootfs", loop_device, 3 * 1024 * 1024 + 512)


def test_a_path_is_taken_as_it_is(tmp_path: Path) -> None:
    assert slots.resolve("/dev/mmcblk0p6", tmp_path) == Path("/dev/mmcblk0p6")
    # only the exact prefix names a label
    assert slots.resolve("partlabel=root_b", tmp_path) == Path("partlabel=root_b")


def test_an_unknown_label_names_the_label_and_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(SlotError) as raised:
        slots.resolve("PARTLABEL=no_such_label_anywhere", tmp_path)
    assert str(raised.value) == (
        f"no partition labelled 'no_such_label_anywhere' (looked in {tmp_path} and udev)"
    )


def test_udev_is_asked_when_the_link_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def lookup(label: str) -> Path | None:
        asked.append(label)
        return Path("/dev/sda6") if label == "root_b" else None

    monkeypatch.setattr(slots, "_udev_lookup", lookup)
    assert slots.resolve("PARTLABEL=root_b", tmp_path) == Path("/dev/sda6")
    assert asked == ["root_b"]


def test_udev_lookup_finds_no_unknown_label() -> None:
    # the real udev database of this machine: no partition carries this name
    assert slots._udev_lookup("metrica-no-such-partition-label") is None


def test_an_unknown_slot_names_the_configured_ones(tmp_path: Path) -> None:
    with pytest.raises(SlotError) as raised:
        slots.slot_targets({"a": {}, "b": {}}, "c", tmp_path)
    assert str(raised.value) == "unknown slot 'c' (configured: a, b)"


class _UdevDevice:
    def __init__(self, subsystem: str, node: str | None, **properties: str) -> None:
        self.subsystem = subsystem
        self.device_node = node
        self.properties = properties


class _UdevDatabase:
    """Stands in for ``pyudev.Context`` on a machine whose udev knows these devices: it lists
    them the way udev's enumeration does (a subsystem, then every property, matched exactly)."""

    devices = (
        _UdevDevice("block", "/dev/sda", DEVTYPE="disk", ID_PART_TABLE_TYPE="gpt"),
        _UdevDevice("block", "/dev/sda1", DEVTYPE="partition", ID_PART_ENTRY_NAME="boot"),
        _UdevDevice("block", None, DEVTYPE="partition", ID_PART_ENTRY_NAME="root_b"),
        _UdevDevice("block", "/dev/sda6", DEVTYPE="partition", ID_PART_ENTRY_NAME="root_b"),
        _UdevDevice("usb", "/dev/bus/usb/001/002", DEVTYPE="usb_device"),
    )

    def list_devices(self, subsystem: str | None = None, **match: object) -> list[_UdevDevice]:
        return [
            device
            for device in self.devices
            if subsystem in (None, device.subsystem)
            and all(device.properties.get(k) == str(v) for k, v in match.items())
        ]


def test_udev_names_the_partition_carrying_the_label(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyudev

    monkeypatch.setattr(pyudev, "Context", _UdevDatabase)
    assert slots._udev_lookup("root_b") == Path("/dev/sda6")
    assert slots._udev_lookup("boot") == Path("/dev/sda1")
    assert slots._udev_lookup("root_a") is None


def test_an_unreadable_udev_database_finds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyudev

    def unreadable() -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pyudev, "Context", unreadable)
    assert slots._udev_lookup("root_b") is None


def test_a_block_device_that_does_not_hold_the_root_filesystem_may_be_written(
    loop_device: Path,
) -> None:
    slots.check_not_mounted_root(loop_device)


def test_a_file_standing_in_for_a_slot_may_be_written(tmp_path: Path) -> None:
    image = tmp_path / "slot.img"
    image.write_bytes(bytes(512))
    slots.check_not_mounted_root(image)
    slots.check_not_mounted_root(tmp_path / "missing")


# --- a target is itself alone, and not in use ----------------------------------------------


def image(path: Path, size: int = 4096) -> str:
    path.write_bytes(bytes(size))
    return str(path)


def test_two_slots_naming_one_file_are_refused_whichever_name_it_has(tmp_path: Path) -> None:
    root_a = image(tmp_path / "root_a.img")
    (tmp_path / "link.img").symlink_to(root_a)
    (tmp_path / "hard.img").hardlink_to(root_a)
    for alias in (root_a, str(tmp_path / "link.img"), str(tmp_path / "hard.img")):
        config = {"a": {"rootfs": root_a}, "b": {"rootfs": alias}}
        with pytest.raises(SlotError) as raised:
            slots.slot_targets(config, "b", tmp_path)
        assert str(raised.value) == (
            f"slot b rootfs ({alias}) is also slot a rootfs ({root_a}): refusing to write it"
        )


def test_a_label_typo_that_names_the_other_slots_partition_is_refused(
    tmp_path: Path, loop_device: Path
) -> None:
    by_partlabel = tmp_path / "by-partlabel"
    by_partlabel.mkdir()
    (by_partlabel / "boot_a").symlink_to(loop_device)
    config = {
        "a": {"rootfs": image(tmp_path / "root_a.img"), "bootfs": "PARTLABEL=boot_a"},
        "b": {"rootfs": image(tmp_path / "root_b.img"), "bootfs": "PARTLABEL=boot_a"},
    }
    with pytest.raises(SlotError, match=r"slot b bootfs \(.*\) is also slot a bootfs"):
        slots.slot_targets(config, "b", by_partlabel)


def test_one_slots_classes_on_one_device_are_refused(tmp_path: Path, loop_device: Path) -> None:
    # a second device node of the same device (another /dev, a container's): same number
    node = tmp_path / "same-device"
    os.mknod(node, 0o600 | stat.S_IFBLK, loop_device.stat().st_rdev)
    config = {"b": {"rootfs": str(loop_device), "bootfs": str(node)}}
    with pytest.raises(SlotError, match=r"slot b rootfs \(.*\) is also slot b bootfs"):
        slots.slot_targets(config, "b", tmp_path)


def test_an_alias_is_found_whatever_comes_before_it(tmp_path: Path) -> None:
    shared = image(tmp_path / "shared.img")
    # an unresolvable class of the other slot, before the one that aliases
    config = {
        "a": {"bootfs": "PARTLABEL=nowhere_to_be_found", "rootfs": shared},
        "b": {"bootfs": image(tmp_path / "boot_b.img"), "rootfs": shared},
    }
    with pytest.raises(SlotError, match=r"^slot b rootfs \(.*\) is also slot a rootfs"):
        slots.slot_targets(config, "b", tmp_path)
    # this slot's own class first, then the one that aliases it
    config = {"b": {"bootfs": shared, "rootfs": shared}}
    with pytest.raises(SlotError, match=r"^slot b bootfs \(.*\) is also slot b rootfs"):
        slots.slot_targets(config, "b", tmp_path)


def test_distinct_targets_pass_and_an_unresolvable_other_slot_is_no_obstacle(
    tmp_path: Path,
) -> None:
    config = {
        "a": {"rootfs": "PARTLABEL=nowhere_to_be_found"},
        "b": {"rootfs": image(tmp_path / "root_b.img")},
    }
    assert set(slots.slot_targets(config, "b", tmp_path)) == {"rootfs"}


def test_a_mounted_block_device_is_in_use(tmp_path: Path, loop_device: Path) -> None:
    require_tools(mke2fs=shutil.which("mke2fs") is not None)
    subprocess.run(["mke2fs", "-q", "-F", str(loop_device)], check=True)
    mount_point = tmp_path / "mounted here"
    mount_point.mkdir()
    subprocess.run(["mount", str(loop_device), str(mount_point)], check=True)
    try:
        with pytest.raises(SlotError) as raised:
            slots.check_not_mounted_root(loop_device)
        assert str(raised.value) == f"slot {loop_device}: mounted at {mount_point}"
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
    slots.check_not_mounted_root(loop_device)


def test_a_block_device_another_device_is_built_on_is_in_use(
    tmp_path: Path, loop_device: Path
) -> None:
    # device-mapper (a dm-verity or dm-crypt root) lists itself among the holders in sysfs
    number = loop_device.stat().st_rdev
    holders = tmp_path / "sys" / f"{os.major(number)}:{os.minor(number)}" / "holders"
    holders.mkdir(parents=True)
    slots.check_not_mounted_root(loop_device, sys_dev_block=tmp_path / "sys")
    (holders / "dm-0").mkdir()
    with pytest.raises(SlotError) as raised:
        slots.check_not_mounted_root(loop_device, sys_dev_block=tmp_path / "sys")
    assert str(raised.value) == f"slot {loop_device}: in use by dm-0"
    (holders / "md127").mkdir()
    with pytest.raises(SlotError, match=r"in use by dm-0, md127$"):
        slots.check_not_mounted_root(loop_device, sys_dev_block=tmp_path / "sys")


def test_the_mount_table_is_read_as_the_kernel_writes_it(tmp_path: Path, loop_device: Path) -> None:
    number = loop_device.stat().st_rdev
    table = tmp_path / "mountinfo"
    table.write_text(
        "22 1 0:21 / /proc rw - proc proc rw\n"
        f"36 22 {os.major(number)}:{os.minor(number) + 1} / /elsewhere rw - ext4 x rw\n"
        f"37 22 {os.major(number)}:{os.minor(number)} / /mnt/with\\040space rw - ext4 y rw\n"
    )
    with pytest.raises(SlotError, match=r"mounted at /mnt/with space$"):
        slots.check_not_mounted_root(loop_device, mountinfo=table)
    slots.check_not_mounted_root(loop_device, mountinfo=tmp_path / "no-table")
    # a torn line names no mount point; a mount point that is not UTF-8 is read all the same
    major, minor = os.major(number), os.minor(number)
    table.write_bytes(
        f"36 22 {major}:{minor} /\n".encode()
        + b"40 22 0:50 / /mnt/\xff\xfe rw - tmpfs t rw\n"
        + f"37 22 {major}:{minor} / /srv\n".encode()
    )
    with pytest.raises(SlotError, match=r"mounted at /srv$"):
        slots.check_not_mounted_root(loop_device, mountinfo=table)
