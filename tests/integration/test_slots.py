"""Slot targets on real block devices: partition labels resolved through by-partlabel links and
udev, capacities of loop devices, and the errors that name what is missing."""

from __future__ import annotations

import shutil
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
