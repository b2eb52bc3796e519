"""Files that must survive a power cut.

Every durable file in Metrica Fleet is written through :func:`atomic_write` or
:func:`atomic_output`: the bytes go to a temporary file in the same directory, are flushed with
``fsync``, renamed over the destination with ``os.replace`` and the directory is ``fsync``-ed so
the rename itself is on disk. A power cut at any instant leaves either the old file or the new
one, never a mixture and never a missing file. A failure before the rename removes the
temporary file, so no half-written output is ever left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

# The temporary file of an atomic write of ``<name>``: ``.<name>.<8 characters of
# mkstemp>.tmp`` in the same directory (see atomic_output); its own name group is the target's.
TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")
# A temporary file untouched for this long belongs to no running write: each atomic write is
# one small file, written and renamed within milliseconds.
SWEEP_MIN_AGE_S = 60.0

BoundaryHook = Callable[[str, Path], None]
# The lab's power-cut injector (chaos/): called at every point where a power cut would leave a
# different state on disk, with the point's name and the file. None outside the lab.
_boundary_hook: BoundaryHook | None = None


def set_boundary_hook(hook: BoundaryHook | None) -> BoundaryHook | None:
    """Install ``hook`` to be called at every write boundary; returns the previous hook."""
    global _boundary_hook
    previous, _boundary_hook = _boundary_hook, hook
    return previous


def boundary(point: str, path: str | os.PathLike[str]) -> None:
    """Mark a write boundary: the hook, if any, may simulate a power cut here by raising."""
    if _boundary_hook is not None:
        _boundary_hook(point, Path(path))


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str], mode: int = 0o644, *, exclusive: bool = False
) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only if the block finishes without error.

    The file is created with permission bits ``mode`` before any byte is written, so a secret
    is never readable by others, not even for an instant.

    ``exclusive``: ``path`` is created, never replaced: when another writer got there first
    (content-addressed files written at once by two processes), :class:`FileExistsError` is
    raised and what it wrote stays.

    Power cut: ``path`` holds its old content (or does not exist) until the rename, and the new
    content after it. A stray ``.tmp`` file in the directory is the only possible leftover.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as tmp:
            boundary("atomic:begin", target)
            yield tmp
            tmp.flush()
            os.fsync(tmp.fileno())
        boundary("atomic:before-rename", target)
        if exclusive:
            os.link(tmp_name, target)  # fails if it exists: the first file stays
            Path(tmp_name).unlink()
        else:
            Path(tmp_name).replace(target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    boundary("atomic:done", target)


def atomic_write(
    path: str | os.PathLike[str], data: bytes, mode: int = 0o644, *, exclusive: bool = False
) -> None:
    """Replace (or with ``exclusive``, create) ``path`` with ``data`` durably; see
    :func:`atomic_output` for the guarantees."""
    with atomic_output(path, mode, exclusive=exclusive) as out:
        out.write(data)


def write_at(path: str | os.PathLike[str], offset: int, data: bytes) -> None:
    """Overwrite ``len(data)`` bytes of an existing file or block device at ``offset``, durably.

    For state that must stay where the firmware looks for it (a U-Boot environment at a raw
    offset, a boot file whose clusters must not move). The file keeps its size unless the write
    extends it. Power cut: the region may hold old bytes, new bytes, or (at worst, on a torn
    sector write) a mixture; callers that need atomicity keep a checksum and a second copy.
    """
    boundary("write-at:begin", path)
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        position = offset
        while view:
            written = os.pwrite(fd, view, position)
            view = view[written:]
            position += written
        os.fsync(fd)
    finally:
        os.close(fd)
    boundary("write-at:done", path)


def rewrite_in_place(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace the whole content of ``path`` with ``data`` of exactly the same length, in place.

    No rename and no change of size: on FAT the directory entry and cluster chain stay as
    they are, only the data sectors change. See :func:`write_at` for the power-cut contract.

    Raises:
        ValueError: ``data`` is not exactly as long as the file.
    """
    size = Path(path).stat().st_size
    if len(data) != size:
        raise ValueError(f"{path}: in-place rewrite needs {size} bytes, got {len(data)}")
    write_at(path, 0, data)


def sweep_temporaries(
    directory: str | os.PathLike[str],
    names: Iterable[str] | None = None,
    *,
    min_age_s: float = SWEEP_MIN_AGE_S,
    now: float | None = None,
) -> tuple[list[Path], list[str]]:
    """Remove what atomic writes cut short left in ``directory``: temporary files (the
    :data:`TEMPORARY` pattern, nothing else) of the files ``names`` (of any file when ``None``,
    for a directory of our own), unchanged for ``min_age_s`` by the file's own time, so a write
    in flight is never touched, and a clock set back leaves everything in place.

    Returns the files removed and one problem line per file that could not be (a read-only
    boot partition, say); a missing directory has nothing to sweep.
    """
    wanted = None if names is None else set(names)
    current = time.time() if now is None else now
    removed: list[Path] = []
    problems: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed, problems
    except OSError as err:
        return removed, [f"{directory}: cannot list: {err.strerror}"]
    for entry in sorted(entries, key=lambda e: e.name):
        match = TEMPORARY.fullmatch(entry.name)
        if match is None or (wanted is not None and match["name"] not in wanted):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if current - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                continue
            Path(entry.path).unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            problems.append(f"{entry.path}: cannot remove: {err.strerror}")
            continue
        removed.append(Path(entry.path))
    return removed, problems


def sweep_shards(
    root: str | os.PathLike[str], *, min_age_s: float = SWEEP_MIN_AGE_S, now: float | None = None
) -> tuple[list[Path], list[str]]:
    """:func:`sweep_temporaries` in every directory right below ``root`` (a content-addressed
    store's shards, of our own): what writes cut short left there, nothing else."""
    removed: list[Path] = []
    problems: list[str] = []
    try:
        shards = sorted(entry for entry in Path(root).iterdir() if entry.is_dir())
    except FileNotFoundError:
        return removed, problems
    for shard in shards:
        gone, failed = sweep_temporaries(shard, min_age_s=min_age_s, now=now)
        removed += gone
        problems += failed
    return removed, problems
