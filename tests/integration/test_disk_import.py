"""Importing whole-disk images made with the real tools (sfdisk, mkfs.vfat, mtools, mke2fs)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from image_builder.disk_import import ImportedPartition, import_disk_image
from image_builder.errors import DiskImportError

SECTOR = 512
BOOT_START, BOOT_SECTORS = 2048, 4096  # 2 MiB FAT at 1 MiB
ROOT_START, ROOT_SECTORS = 6144, 8192  # 4 MiB ext4 right after it
DISK_BYTES = 8 << 20  # room for the GPT backup at the end
ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
CONFIG_TXT = b"arm_64bit=1\nkernel=kernel8.img\n"
OS_RELEASE = b'PRETTY_NAME="Metrica test OS"\nID=debian\n'
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def run(*argv: str, stdin: bytes | None = None) -> bytes:
    return subprocess.run(argv, input=stdin, check=True, capture_output=True, env=MTOOLS_ENV).stdout


def make_vfat(path: Path) -> Path:
    run("truncate", "-s", str(BOOT_SECTORS * SECTOR), str(path))
    run("mkfs.vfat", "-n", "BOOTFS", str(path))
    config = path.parent / "config.txt"
    config.write_bytes(CONFIG_TXT)
    run("mcopy", "-i", str(path), str(config), "::/config.txt")
    return path


def make_ext4(path: Path) -> Path:
    tree = path.parent / "rootfs-tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_bytes(OS_RELEASE)
    run("truncate", "-s", str(ROOT_SECTORS * SECTOR), str(path))
    run("mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(path))
    return path


def partition_disk(disk: Path, label: str, partitions: list[tuple[int, int, str]]) -> None:
    lines = [f"label: {label}", "unit: sectors", ""]
    lines += [f"start={start}, size={size}, type={kind}" for start, size, kind in partitions]
    run(
        "sfdisk",
        "--no-reread",
        "--no-tell-kernel",
        "-q",
        str(disk),
        stdin="\n".join(lines).encode(),
    )


def write_at(disk: Path, offset: int, data: bytes) -> None:
    fd = os.open(disk, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def read_at(disk: Path, offset: int, size: int) -> bytes:
    with open(disk, "rb") as file:
        file.seek(offset)
        return file.read(size)


class Disks:
    """Partition images and the disks made from them, built once per module."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.vfat = make_vfat(base / "bootfs.img")
        (base / "ext4").mkdir()
        self.ext4 = make_ext4(base / "ext4" / "rootfs.img")
        self.dos = self.make("dos", "c", "83")
        self.gpt = self.make("gpt", ESP_GUID, LINUX_GUID)

    def make(self, label: str, boot_type: str, root_type: str) -> Path:
        disk = self.base / f"{label}.img"
        run("truncate", "-s", str(DISK_BYTES), str(disk))
        partition_disk(
            disk,
            label,
            [(BOOT_START, BOOT_SECTORS, boot_type), (ROOT_START, ROOT_SECTORS, root_type)],
        )
        write_at(disk, BOOT_START * SECTOR, self.vfat.read_bytes())
        write_at(disk, ROOT_START * SECTOR, self.ext4.read_bytes())
        return disk


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> Disks:
    return Disks(tmp_path_factory.mktemp("disks"))


@pytest.fixture
def disk_copy(disks: Disks, tmp_path: Path) -> Callable[[str], Path]:
    def copy(label: str) -> Path:
        target = tmp_path / f"{label}-copy.img"
        shutil.copyfile(getattr(disks, label), target)
        return target

    return copy


def assert_imports_nothing(disk: Path, out_dir: Path, message: str) -> None:
    with pytest.raises(DiskImportError, match=message):
        import_disk_image(disk, out_dir)
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


# --- good disks -----------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_imports_boot_and_root_partitions(label: str, disks: Disks, tmp_path: Path) -> None:
    out_dir = tmp_path / "new" / "slots"  # made by the import
    imported = import_disk_image(getattr(disks, label), out_dir)
    assert imported == [
        ImportedPartition(
            "bootfs", out_dir / "bootfs.vfat", 1, BOOT_START * SECTOR, BOOT_SECTORS * SECTOR, "vfat"
        ),
        ImportedPartition(
            "rootfs", out_dir / "rootfs.ext4", 2, ROOT_START * SECTOR, ROOT_SECTORS * SECTOR, "ext4"
        ),
    ]
    assert sorted(p.name for p in out_dir.iterdir()) == ["bootfs.vfat", "rootfs.ext4"]
    assert (out_dir / "bootfs.vfat").read_bytes() == disks.vfat.read_bytes()
    assert (out_dir / "rootfs.ext4").read_bytes() == disks.ext4.read_bytes()
    assert run("mtype", "-i", str(out_dir / "bootfs.vfat"), "::/config.txt") == CONFIG_TXT
    debugfs = run("debugfs", "-R", "cat /etc/os-release", str(out_dir / "rootfs.ext4"))
    assert debugfs == OS_RELEASE


def test_existing_images_are_replaced(disks: Disks, tmp_path: Path) -> None:
    (tmp_path / "bootfs.vfat").write_bytes(b"old boot")
    (tmp_path / "rootfs.ext4").write_bytes(b"old root")
    import_disk_image(disks.dos, tmp_path)
    assert (tmp_path / "bootfs.vfat").read_bytes() == disks.vfat.read_bytes()
    assert (tmp_path / "rootfs.ext4").read_bytes() == disks.ext4.read_bytes()


def test_holes_in_the_disk_stay_holes(disk_copy: Callable[[str], Path], tmp_path: Path) -> None:
    disk = disk_copy("gpt")
    run("fallocate", "--dig-holes", str(disk))
    imported = import_disk_image(disk, tmp_path / "out")
    root = imported[1].path
    assert root.stat().st_blocks * 512 < root.stat().st_size // 2
    assert run("debugfs", "-R", "cat /etc/os-release", str(root)) == OS_RELEASE


# --- bad disks ------------------------------------------------------------------------------


def test_missing_disk(tmp_path: Path) -> None:
    assert_imports_nothing(tmp_path / "nope.img", tmp_path / "out", "does not exist")


def test_directory_is_not_a_disk(tmp_path: Path) -> None:
    assert_imports_nothing(tmp_path, tmp_path / "out", "not a regular file")


def test_tiny_file_is_too_small(tmp_path: Path) -> None:
    disk = tmp_path / "tiny.img"
    disk.write_bytes(b"\0" * 300)
    assert_imports_nothing(disk, tmp_path / "out", r"too small to be a disk image \(300 bytes")


@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_truncated_disk(label: str, disk_copy: Callable[[str], Path], tmp_path: Path) -> None:
    disk = disk_copy(label)
    os.truncate(disk, 5 << 20)  # inside the ext4 partition
    assert_imports_nothing(
        disk,
        tmp_path / "out",
        r"partition 2 extends beyond end of file \(ends at byte 7340032, the file has 5242880\)",
    )


def test_corrupted_gpt_header(disk_copy: Callable[[str], Path], tmp_path: Path) -> None:
    disk = disk_copy("gpt")
    write_at(disk, SECTOR + 60, b"\xff")  # inside the disk GUID
    assert_imports_nothing(disk, tmp_path / "out", "GPT header CRC mismatch")


def test_corrupted_gpt_entries(disk_copy: Callable[[str], Path], tmp_path: Path) -> None:
    disk = disk_copy("gpt")
    write_at(disk, 2 * SECTOR + 128 + 56, b"X")  # the second partition's name
    assert_imports_nothing(disk, tmp_path / "out", "GPT entry array CRC mismatch")


def test_mbr_without_linux_partition(disk_copy: Callable[[str], Path], tmp_path: Path) -> None:
    disk = disk_copy("dos")
    write_at(disk, 446 + 16 + 4, b"\x07")  # partition 2: 0x83 -> 0x07 (NTFS/exFAT)
    assert_imports_nothing(disk, tmp_path / "out", "no ext4 partition found for rootfs$")


def test_linux_partition_without_ext4(disk_copy: Callable[[str], Path], tmp_path: Path) -> None:
    disk = disk_copy("dos")
    write_at(disk, ROOT_START * SECTOR + 1080, b"\0\0")  # the ext4 magic
    assert_imports_nothing(
        disk, tmp_path / "out", r"partition 2 has type 0x83 but no ext4 filesystem"
    )


def test_mbr_without_signature(disk_copy: Callable[[str], Path], tmp_path: Path) -> None:
    disk = disk_copy("dos")
    write_at(disk, 510, b"\0\0")
    assert_imports_nothing(disk, tmp_path / "out", "no partition table")


def test_bare_filesystems_are_not_disks(disks: Disks, tmp_path: Path) -> None:
    assert_imports_nothing(disks.vfat, tmp_path / "out", "FAT boot sector: a bare filesystem")
    assert_imports_nothing(disks.ext4, tmp_path / "out", "bare ext4 filesystem")


def test_overlapping_partitions(disk_copy: Callable[[str], Path], tmp_path: Path) -> None:
    disk = disk_copy("dos")
    write_at(disk, 446 + 16 + 8, struct.pack("<I", BOOT_START + 100))  # partition 2 start
    assert_imports_nothing(disk, tmp_path / "out", "partitions 1 and 2 overlap")


def test_filesystem_larger_than_its_partition(
    disk_copy: Callable[[str], Path], tmp_path: Path
) -> None:
    disk = disk_copy("dos")
    write_at(disk, 446 + 12, struct.pack("<I", BOOT_SECTORS // 2))  # partition 1 size
    assert_imports_nothing(
        disk, tmp_path / "out", "the vfat filesystem in partition 1 claims 2097152 bytes"
    )


def test_two_fat_partitions_are_ambiguous(disks: Disks, tmp_path: Path) -> None:
    disk = tmp_path / "three.img"
    run("truncate", "-s", str(12 << 20), str(disk))
    second_boot = ROOT_START + ROOT_SECTORS
    partition_disk(
        disk,
        "dos",
        [
            (BOOT_START, BOOT_SECTORS, "c"),
            (ROOT_START, ROOT_SECTORS, "83"),
            (second_boot, BOOT_SECTORS, "c"),
        ],
    )
    for start in (BOOT_START, second_boot):
        write_at(disk, start * SECTOR, disks.vfat.read_bytes())
    write_at(disk, ROOT_START * SECTOR, disks.ext4.read_bytes())
    assert_imports_nothing(
        disk, tmp_path / "out", r"2 FAT partitions \(1, 3\); cannot tell which one is bootfs"
    )


def test_gpt_without_its_backup_still_imports(
    disk_copy: Callable[[str], Path], disks: Disks, tmp_path: Path
) -> None:
    # Shrinking tools cut a disk right after its last partition, backup GPT and all.
    disk = disk_copy("gpt")
    os.truncate(disk, (ROOT_START + ROOT_SECTORS) * SECTOR)
    imported = import_disk_image(disk, tmp_path / "out")
    assert imported[1].path.read_bytes() == disks.ext4.read_bytes()


# --- properties -----------------------------------------------------------------------------

TABLE_BYTES = 34 * SECTOR  # MBR, GPT header and a 128-entry array


def import_outcome(disk: Path) -> str:
    """Import into a fresh directory; check the all-or-nothing rule; say what happened."""
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = Path(scratch) / "out"
        try:
            imported = import_disk_image(disk, out_dir)
        except DiskImportError as err:
            assert str(err).startswith(f"disk image {disk}: ")
            assert "\n" not in str(err)
            assert not out_dir.exists() or list(out_dir.iterdir()) == []
            return "rejected"
        assert sorted(p.name for p in out_dir.iterdir()) == ["bootfs.vfat", "rootfs.ext4"]
        for partition in imported:
            assert partition.path.stat().st_size == partition.size_bytes
            assert read_at(partition.path, 0, 4096) == read_at(
                disk, partition.offset_bytes, min(4096, partition.size_bytes)
            )
        return "imported"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    label=st.sampled_from(["dos", "gpt"]),
    # Weighted towards the bytes that matter: the MBR entries in use and its signature, the GPT
    # header, the GPT entries in use.
    offset=st.one_of(
        st.integers(min_value=446, max_value=446 + 2 * 16 - 1),
        st.sampled_from([510, 511]),
        st.integers(min_value=SECTOR, max_value=SECTOR + 91),
        st.integers(min_value=2 * SECTOR, max_value=2 * SECTOR + 255),
        st.integers(min_value=0, max_value=TABLE_BYTES - 1),
    ),
    flip=st.integers(min_value=1, max_value=255),
)
def test_any_single_byte_corruption_is_rejected_cleanly_or_harmless(
    disks: Disks, label: str, offset: int, flip: int
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        disk = Path(scratch) / "disk.img"
        shutil.copyfile(getattr(disks, label), disk)
        write_at(disk, offset, bytes([read_at(disk, offset, 1)[0] ^ flip]))
        event(f"{label}: {import_outcome(disk)}")


@settings(max_examples=150, deadline=None)
@given(
    garbage=st.binary(min_size=0, max_size=6 * SECTOR),
    mbr_signature=st.booleans(),
    gpt_signature=st.booleans(),
    padding=st.integers(min_value=0, max_value=64 * 1024),
)
def test_random_garbage_is_only_ever_a_disk_import_error(
    garbage: bytes, mbr_signature: bool, gpt_signature: bool, padding: int
) -> None:
    data = bytearray(garbage + bytes(padding))
    # Signatures get the garbage past the first checks, into the table parsers.
    if mbr_signature and len(data) >= SECTOR:
        data[510:512] = b"\x55\xaa"
    if gpt_signature and len(data) >= 2 * SECTOR:
        data[SECTOR : SECTOR + 8] = b"EFI PART"
    with tempfile.TemporaryDirectory() as scratch:
        disk = Path(scratch) / "garbage.img"
        disk.write_bytes(bytes(data))
        assert import_outcome(disk) == "rejected"
