"""Filesystem images (ext4, squashfs, vfat) built from a directory, reproducibly.

One call turns a directory into one image file with the real tools (``mke2fs``, ``mksquashfs``,
``mkfs.vfat`` + mtools), without root privileges, loop devices or mounts.

Reproducibility contract: the image depends only on the *content* of the directory (names,
bytes, symlink targets, permission bits, hard links, extended attributes), the filesystem type,
``size_bytes``, ``label`` and ``source_date_epoch``, and on the tool versions. It does not
depend on when or in which order the files were created, on their timestamps, owners or inode
numbers, nor on the caller's environment (locale, time zone, ``/etc/mke2fs.conf``):

- every timestamp in the image is *set* to the epoch, not clamped to it, so a tree recreated
  with older timestamps gives the same bytes;
- every file is owned by root:root (uid/gid 0);
- volume ids, UUIDs and hash seeds are derived from the type, label, size and epoch.

What each tool needed to get there (found by building twice from trees created in a different
order at a different time and comparing the bytes):

- ``mke2fs`` 1.47.0 sorts directory entries itself, and ``E2FSPROGS_FAKE_TIME`` fixes the
  superblock times, the reserved inodes and each inode's crtime. But ``-d`` copies uid, gid,
  atime, mtime *and ctime* from the source tree, and nobody can set a ctime, so a staging copy
  with normalized times would not help. Instead one ``debugfs -w`` pass over the inodes in use
  (read from the ``dumpe2fs`` bitmaps, so no file name needs quoting) sets their times and
  owners. ``-U`` and ``-E hash_seed`` fix the UUID and the directory hash seed, and a pinned
  ``MKE2FS_CONFIG`` profile keeps the build host's ``/etc/mke2fs.conf`` out of the image.
- ``mksquashfs`` 4.5.1 is reproducible by default apart from times and owners:
  ``-all-time``, ``-mkfs-time`` and ``-all-root`` do it. ``SOURCE_DATE_EPOCH`` must then be
  absent from its environment (it refuses both at once).
- ``mkfs.vfat`` 4.2 ignores ``SOURCE_DATE_EPOCH``; ``--invariant`` fixes its time-based values
  and ``-i`` sets the volume id. mtools 4.0.32 stamps new files and directories with
  ``SOURCE_DATE_EPOCH`` (in local time, hence ``TZ=UTC``). ``mcopy -s`` copies in ``readdir``
  order, so files are copied one directory at a time in sorted order instead.

Epochs before 1980-01-01 (:data:`MIN_EPOCH`) are raised to it, for every type: FAT cannot
store earlier times (mtools wraps them to 2098) and mke2fs ignores ``E2FSPROGS_FAKE_TIME=0``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Final

from fleet_core.durable import atomic_output
from fleet_core.outputs import sweep_stale_outputs
from image_builder.errors import ImageBuildError

__all__ = [
    "FILESYSTEM_TYPES",
    "MAX_EPOCH",
    "MAX_SIZES",
    "MIN_EPOCH",
    "FilesystemImage",
    "build_filesystem_image",
    "parse_size",
]


@dataclasses.dataclass(frozen=True)
class FilesystemImage:
    """An image file that :func:`build_filesystem_image` wrote.

    ``size_bytes`` is the size of the file: the requested size for ext4 and vfat, the size
    ``mksquashfs`` produced (a multiple of 4 KiB) for squashfs.
    """

    path: Path
    fs_type: str
    size_bytes: int
    label: str | None


@dataclasses.dataclass(frozen=True)
class _BuildRequest:
    """Everything a builder needs, already checked.

    ``image`` is the temporary file the builder fills (it exists and is empty); ``output`` is
    the path the caller asked for, the one error messages name.
    """

    fs_type: str
    source_dir: Path
    output: Path
    image: Path
    size_bytes: int | None
    label: str | None
    epoch: int

    @property
    def prefix(self) -> str:
        return f"{self.fs_type} image {self.output}"

    @functools.cached_property
    def entries(self) -> tuple[_SourceEntry, ...]:
        """The source tree, parents before children, siblings sorted (scanned on first use)."""
        return tuple(_scan(self.prefix, self.source_dir))

    @functools.cached_property
    def data_bytes(self) -> int:
        """Bytes of regular-file data in the tree, hard links counted once."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for entry in self.entries:
            key = (entry.st.st_dev, entry.st.st_ino)
            if stat.S_ISREG(entry.st.st_mode) and key not in seen:
                seen.add(key)
                total += entry.st.st_size
        return total


@dataclasses.dataclass(frozen=True)
class _SourceEntry:
    """One file, directory, symlink or special file below the source directory."""

    relative: str  # "etc/hosts"; "/"-separated, never empty, never starting with "/"
    st: os.stat_result


_Builder = Callable[[_BuildRequest], None]

# 1980-01-01T00:00:00Z: FAT cannot store anything earlier (mtools wraps it to 2098), and
# mke2fs ignores E2FSPROGS_FAKE_TIME=0. Nix uses the same floor for the same reasons.
MIN_EPOCH: Final = 315_532_800
# 2**32 - 1 is the last second squashfs (unsigned 32-bit times) and FAT (until 2107) can hold.
MAX_EPOCH: Final = 2**32 - 1
_EXT4_BLOCK_SIZE: Final = 4096
_SECTOR_SIZE: Final = 512
# The largest image of each type built here: an ext4 image is a file on the build host, and
# 16 TiB is the most a file on an ext4 host (4 KiB blocks) can hold; FAT32 counts its 512-byte
# sectors in 32 bits, 2 TiB. squashfs takes the size of its content, and a size given for it
# is only a most it may take, so any size is a valid bound.
MAX_SIZES: Final[Mapping[str, int]] = MappingProxyType({"ext4": 16 << 40, "vfat": 2 << 40})

# The namespace of every id derived from the build arguments; changing it changes every image.
_ID_NAMESPACE: Final = uuid.UUID("6f1d0a52-2b8e-4c43-9a53-5d0e3c1b7a10")

# Pinned so that the image never depends on the build host's /etc/mke2fs.conf. These are the
# Debian 12 defaults, minus the "small"/"floppy" usage types: a Raspberry Pi root slot is grown
# later, and 1 KiB blocks would cap how far it can grow.
_MKE2FS_PROFILE: Final = """\
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
"""

_EXT4_ROOT_INODE: Final = 2
_EXT4_FIRST_INODE: Final = 11  # lost+found; everything mke2fs -d copies comes after it
_EXT4_INODE_TIMES: Final = ("atime", "mtime", "ctime", "crtime")

_FAT_DEFAULT_ROOT_ENTRIES: Final = 512  # what mkfs.vfat reserves unless told otherwise
_FAT_FORBIDDEN_CHARS: Final = frozenset('"*/:<>?\\|')
_FAT_LABEL_FORBIDDEN: Final = frozenset('"*+,./:;<=>?[\\]|')
_TOOL_ARGS_PER_CALL: Final = 256


def parse_size(text: str) -> int:
    """Parse a size such as ``4096``, ``64K``, ``512M``, ``1G``, ``2GiB`` or ``100MB`` into bytes,
    as written: ``KiB``, ``MiB``, ``GiB``, ``TiB`` are binary (1024**n), and so is a bare ``K``,
    ``M``, ``G``, ``T`` (as in ``dd`` and ``mke2fs``); ``KB``, ``MB``, ``GB``, ``TB`` are decimal
    (1000**n), as disk makers write them. Case does not matter; only whole numbers are accepted.

    Raises:
        ValueError: the text is not a size, or the size is zero or negative.
    """
    match = re.fullmatch(
        r"\s*([+-]?\d+)\s*(?:([KMGT])(I)?(B)?|B)?\s*", text, re.IGNORECASE | re.ASCII
    )
    if match is None:
        raise ValueError(
            f"not a size: {text!r} (expected e.g. 4096, 64K, 512M or 512MiB, 100MB, 2GiB)"
        )
    number, unit, binary, byte = match.groups()
    power = "KMGT".index(unit.upper()) + 1 if unit else 0
    decimal = bool(byte) and not binary
    size: int = int(number) * (1000 if decimal else 1024) ** power
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size


def build_filesystem_image(
    source_dir: Path,
    output: Path,
    fs_type: str,
    *,
    size_bytes: int | None = None,
    label: str | None = None,
    source_date_epoch: int | None = None,
) -> FilesystemImage:
    """Build an ``fs_type`` image of ``source_dir``'s content at ``output``.

    ``fs_type`` is a key of :data:`FILESYSTEM_TYPES`. ``size_bytes`` is the size of the image
    and is required for ext4 (a multiple of 4096) and vfat (a multiple of 512); for squashfs,
    whose size follows from the content, it is optional and, when given, is the most the image
    may take. ``label`` is the volume label (ext4: up to 16 bytes; vfat: up to 11 ASCII
    characters); squashfs has none. ``source_date_epoch`` is the time, in seconds since
    1970-01-01 UTC, given to every timestamp in the image; when ``None`` it is taken from the
    ``SOURCE_DATE_EPOCH`` environment variable, and is :data:`MIN_EPOCH` (1980-01-01) if that
    is unset, so that a plain call is reproducible too; earlier epochs are raised to it.

    The same content and arguments always give a byte-identical image (see the module
    docstring). Everything in the image is owned by root:root. The source tree is only read.

    Power cut or failure: ``output`` keeps its old content (or stays absent) until the finished
    image is renamed over it; a stray temporary file in its directory is the only leftover.

    Raises:
        ImageBuildError: bad arguments (unknown type, missing or misaligned size, bad label,
            ``output`` inside ``source_dir``), a source tree the filesystem cannot hold
            (vfat: symlinks, device nodes, names FAT forbids), content that does not fit, or a
            tool missing or failing.
    """
    builder = FILESYSTEM_TYPES.get(fs_type)
    if builder is None:
        known = ", ".join(sorted(FILESYSTEM_TYPES))
        raise ImageBuildError(f"unknown filesystem type {fs_type!r} (known: {known})")
    prefix = f"{fs_type} image {output}"
    source = _check_source_dir(prefix, source_dir)
    _check_output(prefix, source, output)
    if size_bytes is not None and size_bytes <= 0:
        raise ImageBuildError(f"{prefix}: size must be positive, got {size_bytes}")
    limit = MAX_SIZES.get(fs_type)
    if size_bytes is not None and limit is not None and size_bytes > limit:
        raise ImageBuildError(
            f"{prefix}: size {size_bytes} bytes is beyond the largest {fs_type} image built here"
            f" ({limit} bytes, {limit >> 40} TiB)"
        )
    epoch = _resolve_epoch(prefix, source_date_epoch)
    sweep_stale_outputs(output)
    try:
        with atomic_output(output) as out:
            request = _BuildRequest(
                fs_type=fs_type,
                source_dir=source,
                output=output,
                image=_path_of_open_file(out.fileno()),
                size_bytes=size_bytes,
                label=label,
                epoch=epoch,
            )
            builder(request)
            final_size = os.fstat(out.fileno()).st_size
    except OSError as err:
        raise ImageBuildError(f"{prefix}: cannot write: {err.strerror or err}") from err
    return FilesystemImage(path=output, fs_type=fs_type, size_bytes=final_size, label=label)


# --- checks shared by all types -------------------------------------------------------------


def _check_source_dir(prefix: str, source_dir: Path) -> Path:
    if not source_dir.exists():
        raise ImageBuildError(f"{prefix}: source directory {source_dir} does not exist")
    if not source_dir.is_dir():
        raise ImageBuildError(f"{prefix}: source {source_dir} is not a directory")
    return source_dir.resolve()


def _check_output(prefix: str, source: Path, output: Path) -> None:
    parent = output.parent.resolve()
    if not parent.is_dir():
        raise ImageBuildError(f"{prefix}: directory {output.parent} does not exist")
    if output.is_dir():
        raise ImageBuildError(f"{prefix}: {output} is a directory")
    # The tools would copy the half-written image into itself.
    if (parent / output.name).is_relative_to(source):
        raise ImageBuildError(f"{prefix}: output is inside the source directory {source}")


def _resolve_epoch(prefix: str, source_date_epoch: int | None) -> int:
    if source_date_epoch is None:
        text = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
        if not text:
            return MIN_EPOCH
        if not text.isdigit():
            raise ImageBuildError(f"{prefix}: SOURCE_DATE_EPOCH is not a number: {text!r}")
        source_date_epoch = int(text)
    if not 0 <= source_date_epoch <= MAX_EPOCH:
        raise ImageBuildError(
            f"{prefix}: source date epoch {source_date_epoch} is outside 0..{MAX_EPOCH}"
        )
    return max(source_date_epoch, MIN_EPOCH)


def _scan(prefix: str, source: Path) -> Iterator[_SourceEntry]:
    """Yield every entry below ``source``, parents before children, siblings sorted by bytes."""
    stack = [""]
    while stack:
        relative_dir = stack.pop()
        directory = source / relative_dir if relative_dir else source
        try:
            with os.scandir(directory) as listing:
                names = sorted((entry.name for entry in listing), key=os.fsencode)
        except OSError as err:
            raise ImageBuildError(f"{prefix}: cannot read {directory}: {err.strerror}") from err
        subdirs = []
        for name in names:
            relative = f"{relative_dir}/{name}" if relative_dir else name
            try:
                st = os.lstat(source / relative)
            except OSError as err:
                raise ImageBuildError(
                    f"{prefix}: cannot read {source / relative}: {err.strerror}"
                ) from err
            yield _SourceEntry(relative=relative, st=st)
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(relative)
        stack.extend(reversed(subdirs))


def _path_of_open_file(fd: int) -> Path:
    # atomic_output hands out an open file, but the tools want a path to write to; the kernel
    # knows the temporary file's name, so the tools write straight into it (no second copy).
    return Path(f"/proc/self/fd/{fd}").readlink()


def _check_size(prefix: str, request: _BuildRequest, alignment: int) -> int:
    size = request.size_bytes
    if size is None:
        raise ImageBuildError(f"{prefix}: a size is required")
    if size % alignment:
        raise ImageBuildError(f"{prefix}: size {size} is not a multiple of {alignment} bytes")
    return size


def _does_not_fit(prefix: str, request: _BuildRequest) -> str:
    return (
        f"{prefix}: content of {request.source_dir} ({request.data_bytes} bytes of file data"
        f" plus metadata) does not fit in {request.size_bytes} bytes"
    )


def _derived_id(request: _BuildRequest, purpose: str) -> uuid.UUID:
    """A UUID that depends only on the build arguments, never on the clock or randomness."""
    fields = (request.fs_type, purpose, request.label or "", request.size_bytes, request.epoch)
    return uuid.uuid5(_ID_NAMESPACE, "\0".join(map(str, fields)))


def _tool_env(**extra: str) -> dict[str, str]:
    # A clean environment: the caller's locale, time zone or tool variables must not leak
    # into the image bytes.
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    env.update(LC_ALL="C.UTF-8", TZ="UTC")
    env.update(extra)
    return env


def _run(
    prefix: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    full_markers: Sequence[str] = (),
    request: _BuildRequest | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a tool and return its result; a failure becomes an :class:`ImageBuildError`.

    When the tool's error output contains one of ``full_markers`` the error says that the
    content does not fit, naming the sizes, rather than quoting the tool.
    """
    try:
        result = subprocess.run(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            check=False,
        )
    except FileNotFoundError as err:
        raise ImageBuildError(f"{prefix}: {argv[0]} not found on PATH") from err
    if result.returncode != 0:
        output = f"{result.stderr}\n{result.stdout}"
        error = subprocess.CalledProcessError(result.returncode, argv, result.stdout, result.stderr)
        if request is not None and any(marker in output for marker in full_markers):
            raise ImageBuildError(_does_not_fit(prefix, request)) from error
        raise ImageBuildError(f"{prefix}: {argv[0]} failed: {_last_line(output)}") from error
    return result


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no error message"


# --- ext4 -----------------------------------------------------------------------------------


def _build_ext4(request: _BuildRequest) -> None:
    prefix = request.prefix
    size = _check_size(prefix, request, _EXT4_BLOCK_SIZE)
    if request.label is not None and len(request.label.encode()) > 16:
        raise ImageBuildError(f"{prefix}: label {request.label!r} is longer than 16 bytes")
    os.truncate(request.image, size)
    with tempfile.TemporaryDirectory(prefix="fleet-ext4-") as scratch:
        profile = Path(scratch) / "mke2fs.conf"
        profile.write_text(_MKE2FS_PROFILE)
        # E2FSPROGS_FAKE_TIME stamps the superblock, the reserved inodes and each new inode's
        # crtime; mke2fs ignores it when it is 0, one reason why the epoch is at least 1980.
        env = _tool_env(MKE2FS_CONFIG=str(profile), E2FSPROGS_FAKE_TIME=str(request.epoch))
        fs_uuid = _derived_id(request, "uuid")
        hash_seed = _derived_id(request, "hash_seed")
        argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-T", "default", "-b", str(_EXT4_BLOCK_SIZE)]
        argv += ["-U", str(fs_uuid), "-E", f"hash_seed={hash_seed},root_owner=0:0"]
        if request.label is not None:
            argv += ["-L", request.label]
        argv += ["-d", str(request.source_dir), str(request.image)]
        _run(prefix, argv, env, full_markers=("Could not allocate",), request=request)
        dumpe2fs = _run(prefix, ["dumpe2fs", str(request.image)], env).stdout
        script = Path(scratch) / "normalize.debugfs"
        script.write_text(_ext4_normalize_script(_ext4_inodes_in_use(prefix, dumpe2fs), request))
        debugfs = _run(prefix, ["debugfs", "-w", "-f", str(script), str(request.image)], env)
        # debugfs exits 0 even when a command fails; apart from its version banner, anything
        # on stderr is the error message of a failed command.
        errors = [line for line in debugfs.stderr.splitlines()[1:] if line.strip()]
        if errors:
            raise ImageBuildError(f"{prefix}: debugfs failed: {errors[0].strip()}")


def _ext4_inodes_in_use(prefix: str, dumpe2fs_output: str) -> list[int]:
    """Inode numbers marked in use in the inode bitmaps that ``dumpe2fs`` prints."""
    per_group = re.search(r"^Inodes per group:\s+(\d+)$", dumpe2fs_output, re.MULTILINE)
    free_lists = re.findall(r"^\s+Free inodes: ?(.*)$", dumpe2fs_output, re.MULTILINE)
    if per_group is None or not free_lists:
        raise ImageBuildError(f"{prefix}: cannot read the inode bitmaps from dumpe2fs")
    inodes_per_group = int(per_group.group(1))
    in_use: list[int] = []
    for group, free_text in enumerate(free_lists):
        free: set[int] = set()
        for item in filter(None, (part.strip() for part in free_text.split(","))):
            first, _, last = item.partition("-")
            free.update(range(int(first), int(last or first) + 1))
        start = group * inodes_per_group + 1
        in_use.extend(ino for ino in range(start, start + inodes_per_group) if ino not in free)
    return in_use


def _ext4_normalize_script(inodes: Sequence[int], request: _BuildRequest) -> str:
    """debugfs commands that give every file's inode the epoch as times and root as owner."""
    when = f"@{request.epoch}"
    lines: list[str] = []
    for ino in inodes:
        if ino < _EXT4_FIRST_INODE and ino != _EXT4_ROOT_INODE:
            continue  # reserved inodes: mke2fs already stamped them with E2FSPROGS_FAKE_TIME
        # The *_extra words hold nanoseconds and the epoch's high bits; clear them first so
        # that setting the time afterwards leaves no stray nanoseconds behind.
        lines += [f"sif <{ino}> {field}_extra 0" for field in _EXT4_INODE_TIMES]
        lines += [f"sif <{ino}> {field} {when}" for field in _EXT4_INODE_TIMES]
        lines += [f"sif <{ino}> uid 0", f"sif <{ino}> gid 0"]
    return "\n".join(lines) + "\n"


# --- squashfs -------------------------------------------------------------------------------


def _build_squashfs(request: _BuildRequest) -> None:
    prefix = request.prefix
    if request.label is not None:
        raise ImageBuildError(f"{prefix}: squashfs has no volume label (got {request.label!r})")
    epoch = str(request.epoch)
    # xz rather than zstd: the squashfs slot is the safe-mode root, the slot of last resort, so
    # its codec must be one that every kernel we may boot has built in. xz has been in squashfs
    # since Linux 2.6.38 and is enabled in Debian's and the Raspberry Pi kernels; zstd needs
    # 4.14+ and CONFIG_SQUASHFS_ZSTD, which some vendor kernels leave out. xz also gives the
    # smaller image; its slower decompression matters little for a rarely booted slot.
    argv = ["mksquashfs", str(request.source_dir), str(request.image), "-noappend"]
    argv += ["-comp", "xz", "-all-root", "-all-time", epoch, "-mkfs-time", epoch]
    argv += ["-quiet", "-no-progress"]
    _run(prefix, argv, _tool_env())
    size = request.image.stat().st_size
    if request.size_bytes is not None and size > request.size_bytes:
        raise ImageBuildError(
            f"{prefix}: content of {request.source_dir} compresses to {size} bytes,"
            f" more than the {request.size_bytes} bytes allowed"
        )


# --- vfat -----------------------------------------------------------------------------------


def _build_vfat(request: _BuildRequest) -> None:
    prefix = request.prefix
    for entry in request.entries:
        _check_fat_entry(prefix, request.source_dir, entry)
    _check_fat_case_clashes(prefix, request.source_dir, request.entries)
    size = _check_size(prefix, request, _SECTOR_SIZE)
    if request.data_bytes > size:
        raise ImageBuildError(_does_not_fit(prefix, request))
    label = request.label
    if label is not None and (
        not label.isascii()
        or len(label) > 11
        or any(char in _FAT_LABEL_FORBIDDEN or not char.isprintable() for char in label)
    ):
        raise ImageBuildError(
            f"{prefix}: label {label!r} is not a FAT label (up to 11 ASCII characters,"
            ' none of "*+,./:;<=>?[\\]|)'
        )
    os.truncate(request.image, size)
    volume_id = _derived_id(request, "volume_id").hex[:8]
    # mtools stamps new entries with SOURCE_DATE_EPOCH; the other variables pin the mtools
    # options that shape the directory entries, whatever /etc/mtools.conf says.
    env = _tool_env(
        SOURCE_DATE_EPOCH=str(request.epoch),
        MTOOLS_SKIP_CHECK="1",
        MTOOLS_NO_VFAT="0",
        MTOOLS_LOWER_CASE="0",
        MTOOLS_NAME_NUMERIC_TAIL="1",
    )
    argv = ["mkfs.vfat", "--invariant", "-i", volume_id, "-r", str(_fat_root_entries(request))]
    if label is not None:
        argv += ["-n", label]
    _run(prefix, [*argv, str(request.image)], env)
    image = str(request.image)
    directories = [e.relative for e in request.entries if stat.S_ISDIR(e.st.st_mode)]
    for chunk in _chunks([f"::/{relative}" for relative in directories]):
        _run(prefix, ["mmd", "-i", image, *chunk], env)
    files_by_dir: dict[str, list[str]] = {}
    for entry in request.entries:
        if stat.S_ISREG(entry.st.st_mode):
            parent, _, _ = entry.relative.rpartition("/")
            files_by_dir.setdefault(parent, []).append(str(request.source_dir / entry.relative))
    for parent, files in files_by_dir.items():
        target = f"::/{parent}/" if parent else "::/"
        for chunk in _chunks(files):
            _run(
                prefix,
                ["mcopy", "-i", image, "-Q", *chunk, target],
                env,
                full_markers=("Disk full", "No free cluster", "No directory slots"),
                request=request,
            )


def _fat_root_entries(request: _BuildRequest) -> int:
    """Root directory entries to reserve: FAT12/16 cannot grow the root directory later."""
    needed = 1  # the volume label
    for entry in request.entries:
        if "/" not in entry.relative:
            # A short entry plus long-name entries of 13 UTF-16 units each; an upper bound.
            needed += 1 + -(-len(entry.relative.encode("utf-16-le")) // 26)
    return max(_FAT_DEFAULT_ROOT_ENTRIES, -(-needed // 16) * 16)


def _check_fat_entry(prefix: str, source: Path, entry: _SourceEntry) -> None:
    path = source / entry.relative
    mode = entry.st.st_mode
    if stat.S_ISLNK(mode):
        raise ImageBuildError(f"{prefix}: FAT cannot hold the symlink {path}")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise ImageBuildError(f"{prefix}: FAT cannot hold the special file {path}")
    name = entry.relative.rpartition("/")[2]
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ImageBuildError(f"{prefix}: file name is not valid UTF-8: {path}") from err
    if (
        any(char in _FAT_FORBIDDEN_CHARS or ord(char) < 0x20 for char in name)
        or name.endswith((".", " "))
        or len(name.encode("utf-16-le")) > 255 * 2
    ):
        raise ImageBuildError(f"{prefix}: FAT cannot hold the file name of {path}")


def _check_fat_case_clashes(prefix: str, source: Path, entries: Sequence[_SourceEntry]) -> None:
    seen: dict[str, str] = {}
    for entry in entries:
        key = entry.relative.casefold()
        if key in seen:
            raise ImageBuildError(
                f"{prefix}: FAT is case-insensitive, {source / seen[key]} and"
                f" {source / entry.relative} would be the same file"
            )
        seen[key] = entry.relative


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _TOOL_ARGS_PER_CALL):
        yield items[start : start + _TOOL_ARGS_PER_CALL]


FILESYSTEM_TYPES: Final[Mapping[str, _Builder]] = MappingProxyType(
    {
        "ext4": _build_ext4,
        "squashfs": _build_squashfs,
        "vfat": _build_vfat,
    }
)
"""The filesystem types :func:`build_filesystem_image` can build, each with its builder."""
