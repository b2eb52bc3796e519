"""Split an existing whole-disk image (Raspberry Pi OS style) into slot images.

A Raspberry Pi OS image is a disk: a partition table (MBR, sometimes GPT), a FAT boot partition
and an ext4 root partition. :func:`import_disk_image` finds those two and copies them out as
``bootfs.vfat`` and ``rootfs.ext4``, the images a bundle carries for the ``bootfs`` and
``rootfs`` slot classes. It needs no root privileges and no loop devices: the partition table
is parsed here, in three layers as elsewhere in the project:

- model: :class:`_TableEntry`, plain data read from the table;
- rules: pure functions over bytes (parse the MBR or GPT, check the layout, recognize a
  filesystem), each raising :class:`DiskImportError` with the disk's path in the message;
- I/O: :func:`import_disk_image` reads the disk and writes the images.

A partition is taken only if both its type in the table *and* the filesystem inside agree, and
only if that filesystem fits inside its partition: copying a truncated filesystem into a slot
would give a device that fails to boot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import struct
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Final

from fleet_core.durable import atomic_output
from fleet_core.outputs import sweep_stale_outputs
from image_builder.errors import DiskImportError

__all__ = ["ImportedPartition", "import_disk_image"]

SECTOR_SIZE: Final = 512

_MBR_SIGNATURE: Final = b"\x55\xaa"
_MBR_ENTRIES_OFFSET: Final = 446
_MBR_PROTECTIVE: Final = 0xEE
# Partition kinds by MBR type byte; any other type (extended ones included) is "other".
_MBR_KINDS: Final = {0x0B: "fat", 0x0C: "fat", 0x0E: "fat", 0x83: "linux"}

_GPT_SIGNATURE: Final = b"EFI PART"
_GPT_HEADER: Final = struct.Struct("<8sIIIIQQQQ16sQIII")  # the 92 bytes the spec defines
_GPT_ENTRY: Final = struct.Struct("<16s16sQQQ72s")
_GPT_MAX_ENTRY_ARRAY: Final = 1 << 20  # 8192 entries of 128 bytes; real disks have 128
# Partition kinds by GPT type GUID; any other type is "other".
_GPT_KINDS: Final = {
    uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b"): "fat",  # EFI system partition
    uuid.UUID("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7"): "fat",  # Microsoft basic data
    uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4"): "linux",  # Linux filesystem data
    uuid.UUID("b921b045-1df0-41c3-af44-4c6f280d3fae"): "linux",  # Linux root (ARM-64)
    uuid.UUID("69dad710-2ce4-4e3c-b16c-21a1d49abed3"): "linux",  # Linux root (ARM)
    uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709"): "linux",  # Linux root (x86-64)
}

_EXT4_SUPERBLOCK_OFFSET: Final = 1024
_EXT4_SUPERBLOCK_SIZE: Final = 1024
_EXT4_MAGIC: Final = 0xEF53
_EXT4_INCOMPAT_64BIT: Final = 0x80
_EXT4_MAX_LOG_BLOCK_SIZE: Final = 6  # 64 KiB blocks
_FAT_SECTOR_SIZES: Final = frozenset({512, 1024, 2048, 4096})
_PROBE_BYTES: Final = _EXT4_SUPERBLOCK_OFFSET + _EXT4_SUPERBLOCK_SIZE

_COPY_CHUNK: Final = 64 << 20

# Reads ``size`` bytes at ``offset`` of the disk (fewer at its end).
_Reader = Callable[[int, int], bytes]


@dataclasses.dataclass(frozen=True)
class ImportedPartition:
    """One partition copied out of a disk image.

    ``number`` is the partition's number as Linux counts it (``/dev/sdX<number>``); the offset
    and size are those of the partition in the disk image, and ``path`` holds exactly those
    bytes.
    """

    slot_class: str  # "bootfs" or "rootfs"
    path: Path
    number: int
    offset_bytes: int
    size_bytes: int
    fs_type: str  # "vfat" or "ext4"


@dataclasses.dataclass(frozen=True)
class _TableEntry:
    """A partition as the table describes it; ``kind`` is "fat", "linux" or "other"."""

    number: int
    first_sector: int
    sector_count: int
    kind: str
    type_name: str  # "0x0c" for MBR, the type GUID for GPT, for messages

    @property
    def offset_bytes(self) -> int:
        return self.first_sector * SECTOR_SIZE

    @property
    def size_bytes(self) -> int:
        return self.sector_count * SECTOR_SIZE

    @property
    def end_bytes(self) -> int:
        return self.offset_bytes + self.size_bytes


@dataclasses.dataclass(frozen=True)
class _SlotRule:
    """How one slot class is found and stored.

    ``kind`` is the partition kind the table must give; ``probe`` reads the first
    :data:`_PROBE_BYTES` of a partition and returns the size the filesystem there claims, or
    None if there is no such filesystem.
    """

    slot_class: str
    kind: str
    fs_type: str
    fs_name: str
    probe: Callable[[bytes], int | None]
    file_name: str


def import_disk_image(disk: Path, out_dir: Path) -> list[ImportedPartition]:
    """Copy the FAT boot partition and the ext4 root partition of ``disk`` into ``out_dir``.

    ``disk`` is a whole-disk image with an MBR (DOS) or GPT partition table and 512-byte
    sectors. The boot partition is the one FAT partition (MBR type 0x0b/0x0c/0x0e, GPT EFI
    system or Microsoft basic data) that holds a FAT filesystem; the root partition is the one
    Linux partition (MBR type 0x83, GPT Linux filesystem data or a Linux root type) that holds
    an ext4 superblock. They become ``out_dir/bootfs.vfat`` and ``out_dir/rootfs.ext4``,
    byte-identical to the partitions, sparse where the disk image is. ``out_dir`` is created if
    missing. Returns the bootfs partition, then the rootfs one.

    Everything is checked before the first byte is written. On any error nothing is left in
    ``out_dir``; an existing ``bootfs.vfat`` or ``rootfs.ext4`` is replaced only when both
    new images are complete. Power cut: each file is replaced atomically, so a cut between the
    two renames can leave a new ``rootfs.ext4`` beside an old ``bootfs.vfat``; rerun the import.

    Raises:
        DiskImportError: ``disk`` is not a regular file or too small; it has no partition
            table; the GPT fails its CRC checks; a partition extends beyond the end of the file
            or overlaps another; no (or more than one) FAT or ext4 partition is found; a
            filesystem is larger than its partition; or reading or writing fails.
    """
    prefix = f"disk image {disk}"
    # Checked before opening: opening a FIFO would block, a directory would fail obscurely.
    if not disk.exists():
        raise DiskImportError(f"{prefix}: does not exist")
    if not disk.is_file():
        raise DiskImportError(f"{prefix}: not a regular file")
    try:
        source = open(disk, "rb")  # noqa: SIM115 - closed below, after the copy
    except OSError as err:
        raise DiskImportError(f"{prefix}: cannot open: {err.strerror}") from err
    with source:
        try:
            file_size = _check_disk_size(prefix, source)
            entries = _read_partition_table(prefix, source, file_size)
            _check_layout(prefix, entries, file_size)
            chosen = [(rule, _choose(prefix, source, entries, rule)) for rule in _SLOT_RULES]
        except OSError as err:
            raise DiskImportError(f"{prefix}: cannot read: {err.strerror}") from err
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            return _copy_out(source, out_dir, chosen)
        except OSError as err:
            raise DiskImportError(
                f"{prefix}: copying into {out_dir} failed: {err.strerror}"
            ) from err


# --- rules: the partition table -------------------------------------------------------------


def _check_disk_size(prefix: str, source: BinaryIO) -> int:
    size = os.fstat(source.fileno()).st_size
    if size < 2 * SECTOR_SIZE:
        raise DiskImportError(
            f"{prefix}: too small to be a disk image ({size} bytes, at least"
            f" {2 * SECTOR_SIZE} needed)"
        )
    return size


def _read_partition_table(prefix: str, source: BinaryIO, file_size: int) -> list[_TableEntry]:
    # Four sectors: enough to recognize a bare ext4 filesystem given by mistake.
    head = _read_at(source, 0, 4 * SECTOR_SIZE)
    lba0, lba1 = head[:SECTOR_SIZE], head[SECTOR_SIZE : 2 * SECTOR_SIZE]
    if lba1.startswith(_GPT_SIGNATURE):
        return _parse_gpt(
            prefix, lba1, file_size, lambda offset, size: _read_at(source, offset, size)
        )
    if lba0[510:512] != _MBR_SIGNATURE:
        hint = " (it looks like a bare ext4 filesystem)" if _has_ext4_magic(head) else ""
        raise DiskImportError(f"{prefix}: no partition table (no MBR signature 0x55AA){hint}")
    if _looks_like_fat_boot_sector(lba0):
        raise DiskImportError(
            f"{prefix}: no partition table (sector 0 is a FAT boot sector: a bare filesystem,"
            " not a whole disk)"
        )
    entries = _parse_mbr(lba0)
    if any(entry.type_name == f"{_MBR_PROTECTIVE:#04x}" for entry in entries):
        raise DiskImportError(f"{prefix}: protective MBR but no GPT header at sector 1")
    return entries


def _parse_mbr(lba0: bytes) -> list[_TableEntry]:
    """The primary partitions of an MBR; extended partitions are listed, never followed."""
    entries = []
    for index in range(4):
        offset = _MBR_ENTRIES_OFFSET + 16 * index
        type_code = lba0[offset + 4]
        first, count = struct.unpack_from("<II", lba0, offset + 8)
        if type_code == 0 or count == 0:
            continue
        kind = _MBR_KINDS.get(type_code, "other")
        entries.append(_TableEntry(index + 1, first, count, kind, f"{type_code:#04x}"))
    return entries


def _parse_gpt(
    prefix: str, header_sector: bytes, file_size: int, read: _Reader
) -> list[_TableEntry]:
    """The partitions of a GPT whose header (LBA 1) is ``header_sector``; CRCs are checked."""
    (
        _signature,
        _revision,
        header_size,
        header_crc,
        _reserved,
        current_lba,
        _backup_lba,
        first_usable,
        last_usable,
        _disk_guid,
        entries_lba,
        entry_count,
        entry_size,
        entries_crc,
    ) = _GPT_HEADER.unpack_from(header_sector)
    if not _GPT_HEADER.size <= header_size <= SECTOR_SIZE:
        raise DiskImportError(f"{prefix}: GPT header size {header_size} is invalid")
    zeroed = header_sector[:16] + b"\0\0\0\0" + header_sector[20:header_size]
    if zlib.crc32(zeroed) != header_crc:
        raise DiskImportError(
            f"{prefix}: GPT header CRC mismatch (stored {header_crc:#010x},"
            f" computed {zlib.crc32(zeroed):#010x})"
        )
    if current_lba != 1:
        raise DiskImportError(f"{prefix}: GPT header at sector 1 says it is at {current_lba}")
    if entry_size < _GPT_ENTRY.size or entry_size % _GPT_ENTRY.size:
        raise DiskImportError(f"{prefix}: GPT entry size {entry_size} is invalid")
    array_size = entry_count * entry_size
    if array_size > _GPT_MAX_ENTRY_ARRAY:
        raise DiskImportError(f"{prefix}: GPT entry array of {array_size} bytes is implausible")
    if (entries_lba * SECTOR_SIZE) + array_size > file_size:
        raise DiskImportError(f"{prefix}: GPT entry array extends beyond end of file")
    array = read(entries_lba * SECTOR_SIZE, array_size)
    if zlib.crc32(array) != entries_crc:
        raise DiskImportError(
            f"{prefix}: GPT entry array CRC mismatch (stored {entries_crc:#010x},"
            f" computed {zlib.crc32(array):#010x})"
        )
    entries = []
    for index in range(entry_count):
        type_bytes, _unique, first, last, _attributes, _name = _GPT_ENTRY.unpack_from(
            array, index * entry_size
        )
        if type_bytes == bytes(16):
            continue
        number = index + 1
        if last < first:
            raise DiskImportError(f"{prefix}: partition {number} ends before it starts")
        if first < first_usable or last > last_usable:
            raise DiskImportError(
                f"{prefix}: partition {number} (sectors {first}-{last}) lies outside the"
                f" usable sectors {first_usable}-{last_usable}"
            )
        type_guid = uuid.UUID(bytes_le=type_bytes)
        kind = _GPT_KINDS.get(type_guid, "other")
        entries.append(_TableEntry(number, first, last - first + 1, kind, str(type_guid)))
    return entries


def _check_layout(prefix: str, entries: Sequence[_TableEntry], file_size: int) -> None:
    """Every partition starts after the table, ends within the file and overlaps no other."""
    for entry in entries:
        if entry.first_sector == 0:
            raise DiskImportError(
                f"{prefix}: partition {entry.number} starts at sector 0, over the partition table"
            )
        if entry.end_bytes > file_size:
            raise DiskImportError(
                f"{prefix}: partition {entry.number} extends beyond end of file (ends at byte"
                f" {entry.end_bytes}, the file has {file_size})"
            )
    ordered = sorted(entries, key=lambda entry: entry.first_sector)
    for before, after in itertools.pairwise(ordered):
        if after.offset_bytes < before.end_bytes:
            low, high = sorted((before.number, after.number))
            raise DiskImportError(f"{prefix}: partitions {low} and {high} overlap")


# --- rules: what is inside a partition ------------------------------------------------------


def _looks_like_fat_boot_sector(sector: bytes) -> bool:
    if len(sector) < SECTOR_SIZE or sector[510:512] != _MBR_SIGNATURE:
        return False
    bytes_per_sector = int.from_bytes(sector[11:13], "little")
    # FAT12/16 keep the type string at 54, FAT32 at 82 (after its longer BPB).
    has_type = sector[54:57] == b"FAT" or sector[82:87] == b"FAT32"
    return has_type and bytes_per_sector in _FAT_SECTOR_SIZES


def _probe_fat(head: bytes) -> int | None:
    """The size a FAT boot sector at the start of ``head`` claims, or None if there is none."""
    if not _looks_like_fat_boot_sector(head):
        return None
    bytes_per_sector = int.from_bytes(head[11:13], "little")
    total_sectors = int.from_bytes(head[19:21], "little") or int.from_bytes(head[32:36], "little")
    return bytes_per_sector * total_sectors or None


def _has_ext4_magic(partition_head: bytes) -> bool:
    offset = _EXT4_SUPERBLOCK_OFFSET + 56
    return partition_head[offset : offset + 2] == _EXT4_MAGIC.to_bytes(2, "little")


def _probe_ext4(head: bytes) -> int | None:
    """The size the ext2/3/4 superblock in ``head`` claims, or None if there is none."""
    if not _has_ext4_magic(head):
        return None
    superblock = head[_EXT4_SUPERBLOCK_OFFSET:]
    blocks_lo = int.from_bytes(superblock[4:8], "little")
    log_block_size = int.from_bytes(superblock[24:28], "little")
    incompat = int.from_bytes(superblock[96:100], "little")
    blocks_hi = (
        int.from_bytes(superblock[0x150:0x154], "little") if incompat & _EXT4_INCOMPAT_64BIT else 0
    )
    if log_block_size > _EXT4_MAX_LOG_BLOCK_SIZE:
        return None  # not a superblock that any kernel would mount
    return ((blocks_hi << 32) | blocks_lo) * (1024 << log_block_size) or None


_SLOT_RULES: Final = (
    _SlotRule("bootfs", "fat", "vfat", "FAT", _probe_fat, "bootfs.vfat"),
    _SlotRule("rootfs", "linux", "ext4", "ext4", _probe_ext4, "rootfs.ext4"),
)
# The files an import may write in its output directory.
OUTPUT_NAMES: Final = tuple(rule.file_name for rule in _SLOT_RULES)


def _choose(
    prefix: str, source: BinaryIO, entries: Sequence[_TableEntry], rule: _SlotRule
) -> _TableEntry:
    candidates = [entry for entry in entries if entry.kind == rule.kind]
    confirmed = []
    for entry in candidates:
        fs_size = rule.probe(_read_at(source, entry.offset_bytes, _PROBE_BYTES))
        if fs_size is None:
            continue
        if fs_size > entry.size_bytes:
            raise DiskImportError(
                f"{prefix}: the {rule.fs_type} filesystem in partition {entry.number} claims"
                f" {fs_size} bytes, its partition has {entry.size_bytes}"
            )
        confirmed.append(entry)
    what = rule.fs_name
    if not confirmed:
        detail = ", ".join(
            f"partition {entry.number} has type {entry.type_name} but no {what} filesystem"
            for entry in candidates
        )
        raise DiskImportError(
            f"{prefix}: no {what} partition found for {rule.slot_class}"
            + (f" ({detail})" if detail else "")
        )
    if len(confirmed) > 1:
        numbers = ", ".join(str(entry.number) for entry in confirmed)
        raise DiskImportError(
            f"{prefix}: {len(confirmed)} {what} partitions ({numbers}); cannot tell which one"
            f" is {rule.slot_class}"
        )
    return confirmed[0]


# --- I/O ------------------------------------------------------------------------------------


def _read_at(source: BinaryIO, offset: int, size: int) -> bytes:
    return os.pread(source.fileno(), size, offset)


def _copy_out(
    source: BinaryIO,
    out_dir: Path,
    chosen: Sequence[tuple[_SlotRule, _TableEntry]],
) -> list[ImportedPartition]:
    targets = [out_dir / rule.file_name for rule, _ in chosen]
    existed = {target: target.exists() for target in targets}
    for target in targets:
        sweep_stale_outputs(target)
    try:
        with contextlib.ExitStack() as stack:
            for target, (_, entry) in zip(targets, chosen, strict=True):
                out = stack.enter_context(atomic_output(target))
                _copy_range(source.fileno(), out.fileno(), entry.offset_bytes, entry.size_bytes)
    except BaseException:
        # ExitStack renames the files one by one; undo a rename that happened before a later
        # step failed, so that a failed import leaves nothing new behind.
        for target in targets:
            if not existed[target]:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
        raise
    return [
        ImportedPartition(
            slot_class=rule.slot_class,
            path=target,
            number=entry.number,
            offset_bytes=entry.offset_bytes,
            size_bytes=entry.size_bytes,
            fs_type=rule.fs_type,
        )
        for target, (rule, entry) in zip(targets, chosen, strict=True)
    ]


def _copy_range(src_fd: int, dst_fd: int, offset: int, size: int) -> None:
    """Copy ``size`` bytes at ``offset`` of ``src_fd`` to the start of ``dst_fd``.

    Holes in the source stay holes (the destination is extended with ``ftruncate``), and data
    moves inside the kernel with ``copy_file_range`` where the filesystem allows it.
    """
    for data_start, data_end in _data_segments(src_fd, offset, offset + size):
        _copy_segment(src_fd, dst_fd, data_start, data_start - offset, data_end - data_start)
    os.ftruncate(dst_fd, size)


def _data_segments(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The parts of ``[start, end)`` that hold data, per SEEK_DATA/SEEK_HOLE."""
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole remains
                return
            if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all data
                yield position, end
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        position = hole


def _copy_segment(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, size: int) -> None:
    copied = 0
    use_kernel_copy = True
    while copied < size:
        count = min(_COPY_CHUNK, size - copied)
        if use_kernel_copy:
            try:
                done = os.copy_file_range(
                    src_fd, dst_fd, count, src_offset + copied, dst_offset + copied
                )
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                use_kernel_copy = False
                continue
        else:
            data = os.pread(src_fd, count, src_offset + copied)
            done = os.pwrite(dst_fd, data, dst_offset + copied)
        if done == 0:
            raise OSError(errno.EIO, "disk image shrank while it was being copied")
        copied += done
