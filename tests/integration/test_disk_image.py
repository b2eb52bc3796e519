"""Whole-device disks (``fleet image disk``) built without root, checked with the real tools:
sfdisk reads the table, mtools the FAT partitions, the bytes of each slot are the images."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from bootloader_hooks import autoboot, grub, grub_script, grubenv
from fleet_core.cli import fleet
from image_builder.disk import (
    ESP_TYPE,
    GRUB_EFI_DIR,
    LINUX_TYPE,
    PartitionSpec,
    build_disk,
)
from image_builder.errors import ImageBuildError
from image_builder.filesystem import build_filesystem_image
from tests.conftest import assert_one_line_error, require_tools

MIB = 1 << 20
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


@pytest.fixture
def grub_tools() -> None:
    require_tools(**{
        "grub-mkimage": shutil.which("grub-mkimage") is not None,
        "grub-efi-amd64-bin": (GRUB_EFI_DIR / "normal.mod").is_file(),
        "grub-fstest": shutil.which("grub-fstest") is not None,
    })  # fmt: skip


needs_grub = pytest.mark.usefixtures("grub_tools")


@pytest.fixture
def images(tmp_path: Path) -> Callable[[str], Path]:
    """Small filesystem images by kind: root.ext4, safe.squashfs, boot.vfat, safe-boot.vfat."""

    def make(name: str) -> Path:
        source = tmp_path / "trees" / name
        source.mkdir(parents=True, exist_ok=True)
        (source / "release").write_text(f"{name}\n")
        output = tmp_path / name
        if name.endswith(".ext4"):
            build_filesystem_image(source, output, "ext4", size_bytes=4 * MIB, label="root")
        elif name.endswith(".squashfs"):
            build_filesystem_image(source, output, "squashfs")
        else:
            build_filesystem_image(source, output, "vfat", size_bytes=2 * MIB, label="BOOT")
        return output

    return make


def table(disk: Path) -> list[dict[str, object]]:
    dump = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, check=True)
    partitions: list[dict[str, object]] = json.loads(dump.stdout)["partitiontable"]["partitions"]
    return partitions


def read_fat(disk: Path, offset: int, path: str) -> bytes:
    return subprocess.run(
        ["mtype", "-i", f"{disk}@@{offset}", f"::/{path}"],
        capture_output=True, check=True, env=MTOOLS_ENV,
    ).stdout  # fmt: skip


def region(disk: Path, offset: int, size: int) -> bytes:
    with disk.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


@needs_grub
def test_grub_disk_has_the_reference_layout_and_the_backends_files(
    tmp_path: Path, images: Callable[[str], Path]
) -> None:
    rootfs, safe = images("root.ext4"), images("safe.squashfs")
    disk = tmp_path / "disk.img"
    content = tmp_path / "data-content"
    (content / "fleet").mkdir(parents=True)
    (content / "fleet" / "factory.txt").write_text("provisioned\n")
    result = CliRunner().invoke(fleet, [
        "image", "disk", "--layout", "grub", "--rootfs", str(rootfs), "--safe", str(safe),
        "--root-size", "8M", "--data-size", "8M", "--kernel-options", "ro console=ttyS0",
        "--data-content", str(content), "-o", str(disk),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    parts = table(disk)
    assert [p["name"] for p in parts] == ["esp", "root_a", "root_b", "root_safe", "data"]
    assert [p["type"] for p in parts] == [ESP_TYPE] + [LINUX_TYPE] * 4
    offsets = [int(str(p["start"])) * 512 for p in parts]
    assert all(offset % MIB == 0 for offset in offsets)
    sizes = [int(str(p["size"])) * 512 for p in parts]
    assert sizes[1] == sizes[2] == 8 * MIB

    esp = offsets[0]
    efi = read_fat(disk, esp, "EFI/BOOT/BOOTX64.EFI")
    assert efi[:2] == b"MZ", "not a PE/COFF EFI binary"
    entries = {slot: grub_script.SlotEntry(e.kernel, e.initrd, e.root, "ro console=ttyS0")
               for slot, e in grub_script.DEFAULT_ENTRIES.items()}  # fmt: skip
    assert read_fat(disk, esp, "EFI/fleet/grub.cfg").decode() == grub_script.grub_cfg(entries)
    env = tmp_path / "grubenv"
    env.write_bytes(read_fat(disk, esp, "EFI/fleet/grubenv"))
    variables = grubenv.read(env).variables()
    assert grub.primary_in(variables) == "a"
    assert grub.attempts_in(variables, "b") == 0

    assert region(disk, offsets[1], rootfs.stat().st_size) == rootfs.read_bytes()
    assert region(disk, offsets[2], sizes[2]) == bytes(sizes[2]), "slot B must start empty"
    assert region(disk, offsets[3], safe.stat().st_size) == safe.read_bytes()
    data = subprocess.run(
        ["dumpe2fs", "-h", f"{disk}?offset={offsets[4]}"], capture_output=True, text=True
    )
    assert "Filesystem volume name:   data" in data.stdout
    copied = subprocess.run(  # --data-content: its files, in the data partition
        ["debugfs", "-R", "cat /fleet/factory.txt", f"{disk}?offset={offsets[4]}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert copied.stdout == "provisioned\n", copied.stderr


@needs_grub
def test_grub_reads_every_entrys_kernel_where_grub_cfg_names_it(
    tmp_path: Path, images: Callable[[str], Path]
) -> None:
    """The partitions grub.cfg names ((hd0,gpt2) for A, (hd0,gpt4) for safe mode) are where the
    disk puts those slots, in filesystems GRUB's own code reads (ext2, squash4)."""
    for name in ("root.ext4", "safe.squashfs"):
        tree = tmp_path / "trees" / name
        tree.mkdir(parents=True)
        (tree / "vmlinuz").write_bytes(f"kernel of {name}\n".encode())
        (tree / "initrd.img").write_bytes(f"initrd of {name}\n".encode())
    rootfs, safe = images("root.ext4"), images("safe.squashfs")
    disk = tmp_path / "disk.img"
    result = CliRunner().invoke(fleet, [
        "image", "disk", "--layout", "grub", "--rootfs", str(rootfs), "--safe", str(safe),
        "--data-size", "8M", "-o", str(disk),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    for slot, image in (("a", "root.ext4"), ("safe", "safe.squashfs")):
        entry = grub_script.DEFAULT_ENTRIES[slot]
        for file, what in ((entry.kernel, "kernel"), (entry.initrd, "initrd")):
            # grub-fstest calls the disk it is given loop0; grub.cfg calls it hd0.
            name = file.replace("(hd0,", "(loop0,")
            read = subprocess.run(
                ["grub-fstest", str(disk), "cat", name], capture_output=True, check=False
            )
            assert read.returncode == 0, f"{slot}: {name}: {read.stderr.decode().strip()}"
            assert read.stdout == f"{what} of {image}\n".encode()


def test_the_same_inputs_give_the_same_disk(tmp_path: Path, images: Callable[[str], Path]) -> None:
    digests = []
    for name in ("one.img", "two.img"):
        result = CliRunner().invoke(fleet, [
            "image", "disk", "--layout", "grub", "--rootfs", str(images("root.ext4")),
            "--safe", str(images("safe.squashfs")), "--data-size", "8M",
            "-o", str(tmp_path / name),
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_rpi_disk_boots_boot_a_from_autoboot(tmp_path: Path, images: Callable[[str], Path]) -> None:
    disk = tmp_path / "rpi.img"
    bootfs, safe_bootfs = images("boot.vfat"), images("safe-boot.vfat")
    result = CliRunner().invoke(fleet, [
        "image", "disk", "--layout", "rpi", "--rootfs", str(images("root.ext4")),
        "--safe", str(images("safe.squashfs")), "--bootfs", str(bootfs),
        "--safe-bootfs", str(safe_bootfs), "--data-size", "8M", "-o", str(disk),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    parts = table(disk)
    assert [p["name"] for p in parts] == [
        "autoboot",
        "boot_a",
        "boot_b",
        "boot_safe",
        "root_a",
        "root_b",
        "root_safe",
        "data",
    ]
    offsets = [int(str(p["start"])) * 512 for p in parts]
    config = autoboot.parse(
        read_fat(disk, offsets[0], "autoboot.txt"), known_partitions=(2, 3, 4), source="disk"
    )
    assert (config.boot_partition, config.tryboot_partition) == (2, 2)
    assert region(disk, offsets[1], bootfs.stat().st_size) == bootfs.read_bytes()
    assert region(disk, offsets[3], safe_bootfs.stat().st_size) == safe_bootfs.read_bytes()
    assert read_fat(disk, offsets[1], "release") == b"boot.vfat\n"


def test_rpi_layout_needs_its_boot_images(tmp_path: Path, images: Callable[[str], Path]) -> None:
    result = CliRunner().invoke(fleet, [
        "image", "disk", "--layout", "rpi", "--rootfs", str(images("root.ext4")),
        "--safe", str(images("safe.squashfs")), "-o", str(tmp_path / "rpi.img"),
    ])  # fmt: skip
    assert result.exit_code == 2
    assert "--bootfs and --safe-bootfs" in result.output


def test_an_image_larger_than_its_slot_is_refused(
    tmp_path: Path, images: Callable[[str], Path]
) -> None:
    result = CliRunner().invoke(fleet, [
        "image", "disk", "--layout", "grub", "--rootfs", str(images("root.ext4")),
        "--safe", str(images("safe.squashfs")), "--root-size", "2M",
        "--grub-efi", str(images("safe.squashfs")), "-o", str(tmp_path / "disk.img"),
    ])  # fmt: skip
    assert_one_line_error(result, "does not fit partition root_a")
    assert not (tmp_path / "disk.img").exists()


def test_build_disk_refuses_a_label_twice_and_names_the_partition(tmp_path: Path) -> None:
    specs = [PartitionSpec("data", LINUX_TYPE, MIB), PartitionSpec("data", LINUX_TYPE, MIB)]
    with pytest.raises(ImageBuildError, match="label 'data' is used twice"):
        build_disk(tmp_path / "disk.img", specs)


def test_build_disk_rounds_partitions_to_whole_mib_and_keeps_the_disk_sparse(
    tmp_path: Path,
) -> None:
    image = tmp_path / "small.img"
    image.write_bytes(b"\xff" * 1000)
    built = build_disk(
        tmp_path / "disk.img",
        [PartitionSpec("one", LINUX_TYPE, 1000, image), PartitionSpec("two", LINUX_TYPE, 64 * MIB)],
    )
    assert [(p.number, p.offset_bytes, p.size_bytes) for p in built.partitions] == [
        (1, MIB, MIB), (2, 2 * MIB, 64 * MIB),
    ]  # fmt: skip
    assert built.size_bytes == (built.path.stat().st_size)
    assert built.path.stat().st_blocks * 512 < 8 * MIB
    assert region(built.path, MIB, 1000) == b"\xff" * 1000
    assert [p["name"] for p in table(built.path)] == ["one", "two"]
