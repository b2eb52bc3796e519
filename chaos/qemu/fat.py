"""Read a file from a FAT12/16/32 filesystem image the way GRUB's ``fat`` module does: from its
directory entry's first cluster, following the FAT only as far as the file's size needs.

The lab reads the ESP between boots to give the GRUB model the same files real GRUB will read.
``mtools`` refuses a file whose cluster chain is inconsistent (a power cut can leave a
directory entry whose cluster the FAT still marks free); GRUB reads such a one-cluster file
without looking at the FAT, so the lab must too. Short (8.3) names only: the ESP's paths
are ``EFI/fleet/grub.cfg`` and ``EFI/fleet/grubenv``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fleet_core.errors import FleetError


class FatReadError(FleetError):
    """The file is missing, or its cluster chain breaks before its end."""


@dataclass(frozen=True)
class _Volume:
    handle: BinaryIO
    offset: int
    sector: int
    cluster_size: int
    fat_start: int
    root_start: int  # FAT12/16: the fixed root directory
    root_bytes: int
    data_start: int
    bits: int
    root_cluster: int  # FAT32

    def read(self, position: int, size: int) -> bytes:
        self.handle.seek(self.offset + position)
        return self.handle.read(size)

    def next_cluster(self, cluster: int) -> int:
        if self.bits == 16:
            return int.from_bytes(self.read(self.fat_start + cluster * 2, 2), "little")
        if self.bits == 32:
            return int.from_bytes(self.read(self.fat_start + cluster * 4, 4), "little") & 0x0FFFFFFF
        pair = int.from_bytes(self.read(self.fat_start + cluster * 3 // 2, 2), "little")
        return pair >> 4 if cluster & 1 else pair & 0xFFF

    def chain_read(self, first: int, size: int | None, what: str) -> bytes:
        data = bytearray()
        cluster = first
        end = 0xFF8 if self.bits == 12 else 0xFFF8 if self.bits == 16 else 0x0FFFFFF8
        while size is None or len(data) < size:
            if not 2 <= cluster < end:
                if size is None:
                    break
                raise FatReadError(f"{what}: cluster chain breaks at {cluster:#x}")
            data += self.read(
                self.data_start + (cluster - 2) * self.cluster_size, self.cluster_size
            )
            if size is not None and len(data) >= size:
                break
            cluster = self.next_cluster(cluster)
        return bytes(data if size is None else data[:size])


def _volume(handle: BinaryIO, offset: int) -> _Volume:
    handle.seek(offset)
    boot = handle.read(512)
    sector, per_cluster, reserved, fats, root_entries, total16 = struct.unpack_from(
        "<HBHBHH", boot, 11
    )
    fat16_size, total32, fat32_size, root_cluster = (
        struct.unpack_from("<H", boot, 22)[0],
        struct.unpack_from("<I", boot, 32)[0],
        struct.unpack_from("<I", boot, 36)[0],
        struct.unpack_from("<I", boot, 44)[0],
    )
    fat_size = fat16_size or fat32_size
    root_bytes = root_entries * 32
    root_start = (reserved + fats * fat_size) * sector
    data_start = root_start + root_bytes
    total = total16 or total32
    clusters = (total * sector - data_start) // (per_cluster * sector)
    bits = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
    return _Volume(handle, offset, sector, per_cluster * sector, reserved * sector, root_start,
                   root_bytes, data_start, bits, root_cluster)  # fmt: skip


def _short_name(name: str) -> bytes:
    stem, _, extension = name.upper().partition(".")
    return stem.ljust(8).encode()[:8] + extension.ljust(3).encode()[:3]


def read_file(image: Path, offset: int, path: str) -> bytes:
    """The content of ``path`` (``/``-separated) in the FAT filesystem at ``offset`` of
    ``image``.

    Raises:
        FatReadError: a component is missing, or the file's chain breaks before its size.
    """
    with image.open("rb") as handle:
        volume = _volume(handle, offset)
        if volume.bits == 32:
            directory = volume.chain_read(volume.root_cluster, None, "/")
        else:
            directory = volume.read(volume.root_start, volume.root_bytes)
        parts = [part for part in path.split("/") if part]
        for index, part in enumerate(parts):
            entry = _find(directory, _short_name(part))
            if entry is None:
                raise FatReadError(f"{path}: no {part}")
            attributes, first, size = entry
            is_last = index == len(parts) - 1
            if is_last:
                return volume.chain_read(first, size, path) if size else b""
            if not attributes & 0x10:
                raise FatReadError(f"{path}: {part} is not a directory")
            directory = volume.chain_read(first, None, path)
    raise FatReadError(f"{path}: empty path")


def _find(directory: bytes, name: bytes) -> tuple[int, int, int] | None:
    for start in range(0, len(directory) - 31, 32):
        entry = directory[start : start + 32]
        if entry[0] == 0:
            return None
        attributes = entry[11]
        if entry[0] == 0xE5 or attributes == 0x0F or attributes & 0x08:
            continue
        if entry[:11] == name:
            first = (
                struct.unpack_from("<H", entry, 20)[0] << 16
                | struct.unpack_from("<H", entry, 26)[0]
            )
            return attributes, first, struct.unpack_from("<I", entry, 28)[0]
    return None
