"""Whole-device disk images: what a new device is provisioned with.

A disk is a GPT partition table and one filesystem image per partition, found by the
partition's label (DESIGN.md, "Device disk layouts"). Everything is built without root
privileges, loop devices or mounts: ``sfdisk`` writes the table into a plain file, the
filesystems come from :mod:`image_builder.filesystem` and are copied to their offsets.

Two layouts:

- ``grub`` (x86 gateways, the QEMU reference device): ``esp`` (FAT: the GRUB EFI binary at the
  removable-media path ``EFI/BOOT/BOOTX64.EFI`` plus the boot selection files), ``root_a``,
  ``root_b`` (ext4, kernel inside), ``root_safe`` (squashfs), ``data`` (ext4);
- ``rpi`` (Raspberry Pi, tryboot firmware): ``autoboot`` (FAT: ``autoboot.txt``), ``boot_a``,
  ``boot_b``, ``boot_safe`` (FAT), ``root_a``, ``root_b`` (ext4), ``root_safe`` (squashfs),
  ``data`` (ext4).

The boot selection files themselves (``grub.cfg``, ``grubenv``, ``autoboot.txt``) belong to
the boot backends; the caller passes their bytes in (``boot_files``), so that the disk carries
exactly what the backend on the device will read and write.

Slot B starts empty (zeros): the firmware never tries it before the first install writes it.

Reproducibility: the same inputs give the same bytes. The disk GUID and the partition GUIDs are
derived from ``disk_name`` and the labels, never drawn at random.

Power cut or failure: ``output`` keeps its old content (or stays absent) until the finished
disk is renamed over it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from fleet_core.durable import atomic_output
from fleet_core.outputs import sweep_stale_outputs
from image_builder.errors import ImageBuildError
from image_builder.filesystem import build_filesystem_image

__all__ = [
    "GRUB_EFI_MODULES",
    "LAYOUTS",
    "DiskImage",
    "DiskPartition",
    "PartitionSpec",
    "build_disk",
    "build_grub_efi",
    "grub_disk",
    "rpi_disk",
]

SECTOR_SIZE: Final = 512
ALIGNMENT: Final = 1 << 20  # every partition starts and ends on a MiB boundary
_GPT_TAIL: Final = ALIGNMENT  # room for the backup table at the end of the disk
# The largest disk image written: a file on the build host, and 16 TiB is the most a file on
# an ext4 host (4 KiB blocks) can hold; far beyond any device this provisions.
MAX_DISK_SIZE: Final = 16 << 40
_COPY_CHUNK: Final = 16 << 20

ESP_TYPE: Final = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BASIC_DATA_TYPE: Final = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"  # FAT partitions of the Pi
LINUX_TYPE: Final = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"

LAYOUTS: Final = ("grub", "rpi")

# What our grub.cfg needs (bootloader_hooks.grub), plus what finds and reads it.
GRUB_EFI_MODULES: Final = (
    "normal", "test", "loadenv", "linux", "part_gpt", "fat", "ext2", "squash4",
    "echo", "configfile", "search", "efi_gop",
)  # fmt: skip
GRUB_EFI_DIR: Final = Path("/usr/lib/grub/x86_64-efi")
GRUB_EFI_PATH: Final = "EFI/BOOT/BOOTX64.EFI"  # the firmware's default for a removable disk
# GRUB reads grub.cfg from here: the ESP is partition 1 of the first disk.
GRUB_PREFIX: Final = "(hd0,gpt1)/EFI/fleet"

_ID_NAMESPACE: Final = uuid.UUID("0b7c2e54-91a4-4f60-8d2b-6a3f1c9e4d21")


@dataclasses.dataclass(frozen=True)
class PartitionSpec:
    """One partition to create: its GPT name (label), type GUID and size; ``image``, if given,
    is a filesystem image copied to its start (the rest of the partition stays zero)."""

    label: str
    type_guid: str
    size_bytes: int
    image: Path | None = None


@dataclasses.dataclass(frozen=True)
class DiskPartition:
    """A partition of a built disk, numbered as Linux numbers it (``/dev/vda<number>``)."""

    number: int
    label: str
    offset_bytes: int
    size_bytes: int


@dataclasses.dataclass(frozen=True)
class DiskImage:
    """A disk that :func:`build_disk` wrote."""

    path: Path
    size_bytes: int
    partitions: tuple[DiskPartition, ...]

    def partition(self, label: str) -> DiskPartition:
        """The partition named ``label``.

        Raises:
            KeyError: no partition has that label.
        """
        for part in self.partitions:
            if part.label == label:
                return part
        raise KeyError(label)


def _round_up(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def _check_disk_size(prefix: str, sizes: Sequence[int]) -> None:
    """Refuse partitions that add up to more than :data:`MAX_DISK_SIZE`, before any is built."""
    total = ALIGNMENT + sum(_round_up(size) for size in sizes) + _GPT_TAIL
    if total > MAX_DISK_SIZE:
        raise ImageBuildError(
            f"{prefix}: its partitions add up to {total} bytes, more than a disk image can take"
            f" here ({MAX_DISK_SIZE} bytes, {MAX_DISK_SIZE >> 40} TiB)"
        )


def _derived_uuid(disk_name: str, purpose: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, f"{disk_name}\0{purpose}")).upper()


def _check_specs(prefix: str, partitions: Sequence[PartitionSpec]) -> None:
    if not partitions:
        raise ImageBuildError(f"{prefix}: no partitions")
    labels = [spec.label for spec in partitions]
    for label in labels:
        if labels.count(label) > 1:
            raise ImageBuildError(f"{prefix}: label {label!r} is used twice")
        if not label or len(label) > 36 or not label.isascii() or '"' in label:
            raise ImageBuildError(f"{prefix}: {label!r} is not a GPT name (1-36 ASCII)")
    for spec in partitions:
        if spec.size_bytes <= 0:
            raise ImageBuildError(f"{prefix}: partition {spec.label} has no size")
        if spec.image is None:
            continue
        try:
            image_size = spec.image.stat().st_size
        except OSError as err:
            raise ImageBuildError(
                f"{prefix}: image {spec.image} of {spec.label}: {err.strerror}"
            ) from err
        if image_size > spec.size_bytes:
            raise ImageBuildError(
                f"{prefix}: image {spec.image} ({image_size} bytes) does not fit partition "
                f"{spec.label} ({spec.size_bytes} bytes)"
            )


def _sfdisk_script(disk_name: str, parts: Sequence[tuple[PartitionSpec, DiskPartition]]) -> str:
    lines = [
        "label: gpt",
        f"label-id: {_derived_uuid(disk_name, 'disk')}",
        "unit: sectors",
        f"first-lba: {ALIGNMENT // SECTOR_SIZE}",
        "",
    ]
    for spec, part in parts:
        lines.append(
            f"start={part.offset_bytes // SECTOR_SIZE}, size={part.size_bytes // SECTOR_SIZE}, "
            f"type={spec.type_guid}, uuid={_derived_uuid(disk_name, 'part:' + spec.label)}, "
            f'name="{spec.label}"'
        )
    return "\n".join(lines) + "\n"


def build_disk(
    output: Path, partitions: Sequence[PartitionSpec], *, disk_name: str = "metrica-fleet"
) -> DiskImage:
    """Write a GPT disk at ``output`` with ``partitions`` in order, each aligned to 1 MiB and
    rounded up to whole MiB, each ``image`` copied to the start of its partition.

    The file is sparse where nothing was written. See the module docstring for the power-cut
    contract.

    Raises:
        ImageBuildError: a bad label or size, an image that does not fit its partition, or
            ``sfdisk`` missing or failing.
    """
    prefix = f"disk image {output}"
    _check_specs(prefix, partitions)
    placed: list[tuple[PartitionSpec, DiskPartition]] = []
    offset = ALIGNMENT
    for number, spec in enumerate(partitions, start=1):
        size = _round_up(spec.size_bytes)
        placed.append((spec, DiskPartition(number, spec.label, offset, size)))
        offset += size
    total = offset + _GPT_TAIL
    _check_disk_size(prefix, [spec.size_bytes for spec in partitions])
    script = _sfdisk_script(disk_name, placed)
    sweep_stale_outputs(output)
    try:
        with atomic_output(output) as out:
            out.truncate(total)
            out.flush()
            device = Path(f"/proc/self/fd/{out.fileno()}").readlink()
            _run_sfdisk(prefix, device, script)
            for spec, part in placed:
                if spec.image is not None:
                    _copy_into(prefix, spec.image, out.fileno(), part.offset_bytes)
    except OSError as err:
        raise ImageBuildError(f"{prefix}: cannot write: {err.strerror or err}") from err
    return DiskImage(output, total, tuple(part for _, part in placed))


def _run_sfdisk(prefix: str, device: Path, script: str) -> None:
    argv = ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "always"]
    try:
        result = subprocess.run(
            [*argv, str(device)],
            input=script,
            capture_output=True,
            text=True,
            env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"},
            check=False,
        )
    except FileNotFoundError as err:
        raise ImageBuildError(f"{prefix}: sfdisk not found on PATH") from err
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise ImageBuildError(f"{prefix}: sfdisk failed: {lines[-1] if lines else 'no message'}")


def _copy_into(prefix: str, image: Path, fd: int, offset: int) -> None:
    try:
        with image.open("rb") as source:
            position = offset
            while chunk := source.read(_COPY_CHUNK):
                if chunk.count(0) == len(chunk):
                    position += len(chunk)  # keep the disk sparse where the image is
                    continue
                view = memoryview(chunk)
                while view:
                    written = os.pwrite(fd, view, position)
                    view, position = view[written:], position + written
    except OSError as err:
        raise ImageBuildError(f"{prefix}: cannot copy {image}: {err.strerror}") from err


def build_grub_efi(
    output: Path,
    *,
    prefix: str = GRUB_PREFIX,
    modules: Sequence[str] = GRUB_EFI_MODULES,
    grub_dir: Path = GRUB_EFI_DIR,
) -> Path:
    """Build a GRUB EFI binary (x86_64) with ``modules`` built in, that reads
    ``<prefix>/grub.cfg`` at start; needs ``grub-mkimage`` and ``grub_dir``
    (Debian: grub-efi-amd64-bin). The binary needs nothing else from the ESP.

    Raises:
        ImageBuildError: the tool or the module directory is missing, or the tool fails.
    """
    where = f"GRUB EFI image {output}"
    if not (grub_dir / "normal.mod").is_file():
        raise ImageBuildError(f"{where}: no GRUB modules in {grub_dir} (grub-efi-amd64-bin)")
    argv = ["grub-mkimage", "-O", "x86_64-efi", "-d", str(grub_dir), "-p", prefix]
    argv += ["-o", str(output), *modules]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise ImageBuildError(f"{where}: grub-mkimage not found on PATH") from err
    if result.returncode != 0:
        raise ImageBuildError(f"{where}: grub-mkimage failed: {result.stderr.strip()}")
    return output


def _stage(directory: Path, files: Mapping[str, bytes]) -> None:
    for relative, data in files.items():
        path = directory / relative
        if ".." in Path(relative).parts or Path(relative).is_absolute():
            raise ImageBuildError(f"boot file name {relative!r} leaves its partition")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _data_image(scratch: Path, data_dir: Path | None, size: int) -> Path:
    source = data_dir
    if source is None:
        source = scratch / "data-empty"
        source.mkdir()
    image = scratch / "data.ext4"
    build_filesystem_image(source, image, "ext4", size_bytes=size, label="data")
    return image


def grub_disk(
    output: Path,
    *,
    boot_files: Mapping[str, bytes],
    rootfs: Path,
    safe_rootfs: Path,
    root_size: int,
    data_size: int = 64 << 20,
    esp_size: int = 32 << 20,
    data_dir: Path | None = None,
    grub_efi: Path | None = None,
    disk_name: str = "metrica-fleet",
) -> DiskImage:
    """The ``grub`` layout: ESP with GRUB and ``boot_files`` (paths relative to the ESP, e.g.
    ``EFI/fleet/grub.cfg``), ``rootfs`` in root A, root B empty, ``safe_rootfs`` in
    root_safe, a data partition holding ``data_dir`` (empty if None). ``grub_efi`` is a GRUB
    binary to use instead of building one with :func:`build_grub_efi`.

    Raises:
        ImageBuildError: as :func:`build_disk` and :func:`build_grub_efi`.
    """
    sizes = [esp_size, root_size, root_size, _size_of(safe_rootfs), data_size]
    _check_disk_size(f"disk image {output}", sizes)
    with tempfile.TemporaryDirectory(prefix="fleet-disk-") as scratch_name:
        scratch = Path(scratch_name)
        esp_dir = scratch / "esp"
        _stage(esp_dir, boot_files)
        efi = esp_dir / GRUB_EFI_PATH
        efi.parent.mkdir(parents=True, exist_ok=True)
        if grub_efi is None:
            build_grub_efi(efi)
        else:
            shutil.copyfile(grub_efi, efi)
        esp = scratch / "esp.vfat"
        build_filesystem_image(esp_dir, esp, "vfat", size_bytes=esp_size, label="ESP")
        partitions = [
            PartitionSpec("esp", ESP_TYPE, esp_size, esp),
            PartitionSpec("root_a", LINUX_TYPE, root_size, rootfs),
            PartitionSpec("root_b", LINUX_TYPE, root_size),
            PartitionSpec("root_safe", LINUX_TYPE, _size_of(safe_rootfs), safe_rootfs),
            PartitionSpec("data", LINUX_TYPE, data_size, _data_image(scratch, data_dir, data_size)),
        ]
        return build_disk(output, partitions, disk_name=disk_name)


def rpi_disk(
    output: Path,
    *,
    boot_files: Mapping[str, bytes],
    bootfs: Path,
    rootfs: Path,
    safe_bootfs: Path,
    safe_rootfs: Path,
    root_size: int,
    boot_size: int | None = None,
    data_size: int = 64 << 20,
    autoboot_size: int = 4 << 20,
    data_dir: Path | None = None,
    disk_name: str = "metrica-fleet",
) -> DiskImage:
    """The ``rpi`` layout: ``autoboot`` holding ``boot_files`` (``autoboot.txt``), ``bootfs``
    in boot A and an empty boot B of the same size (``boot_size``, default the size of
    ``bootfs``), ``safe_bootfs`` in boot_safe, ``rootfs`` in root A, root B empty,
    ``safe_rootfs`` in root_safe, a data partition. Partition numbers match what
    ``autoboot.txt`` names: boot A is 2, boot B 3, safe mode 4.

    Raises:
        ImageBuildError: as :func:`build_disk`.
    """
    boot = boot_size if boot_size is not None else _size_of(bootfs)
    sizes = [autoboot_size, boot, boot, _size_of(safe_bootfs)]
    sizes += [root_size, root_size, _size_of(safe_rootfs), data_size]
    _check_disk_size(f"disk image {output}", sizes)
    with tempfile.TemporaryDirectory(prefix="fleet-disk-") as scratch_name:
        scratch = Path(scratch_name)
        autoboot_dir = scratch / "autoboot"
        autoboot_dir.mkdir()
        _stage(autoboot_dir, boot_files)
        autoboot = scratch / "autoboot.vfat"
        build_filesystem_image(
            autoboot_dir, autoboot, "vfat", size_bytes=autoboot_size, label="AUTOBOOT"
        )
        partitions = [
            PartitionSpec("autoboot", BASIC_DATA_TYPE, autoboot_size, autoboot),
            PartitionSpec("boot_a", BASIC_DATA_TYPE, boot, bootfs),
            PartitionSpec("boot_b", BASIC_DATA_TYPE, boot),
            PartitionSpec("boot_safe", BASIC_DATA_TYPE, _size_of(safe_bootfs), safe_bootfs),
            PartitionSpec("root_a", LINUX_TYPE, root_size, rootfs),
            PartitionSpec("root_b", LINUX_TYPE, root_size),
            PartitionSpec("root_safe", LINUX_TYPE, _size_of(safe_rootfs), safe_rootfs),
            PartitionSpec("data", LINUX_TYPE, data_size, _data_image(scratch, data_dir, data_size)),
        ]
        return build_disk(output, partitions, disk_name=disk_name)


def _size_of(image: Path) -> int:
    try:
        return image.stat().st_size
    except OSError as err:
        raise ImageBuildError(f"image {image}: {err.strerror}") from err
