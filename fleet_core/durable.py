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
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only if the block finishes without error.

    The file is created with permission bits ``mode`` before any byte is written, so a secret
    is never readable by others, not even for an instant.

    Power cut: ``path`` holds its old content (or does not exist) until the rename, and the new
    content after it. A stray ``.tmp`` file in the directory is the only possible leftover.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as tmp:
            yield tmp
            tmp.flush()
            os.fsync(tmp.fileno())
        Path(tmp_name).replace(target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(directory)


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` durably; see :func:`atomic_output` for the guarantees."""
    with atomic_output(path, mode) as out:
        out.write(data)
