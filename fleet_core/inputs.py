"""The check every command makes on a file it is about to read.

Opening a FIFO for reading blocks until something writes to it, and a directory or a device
node is no input a command understands: a path named as an input file that exists and is not a
regular file is refused before it is opened, naming it and what it is.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fleet_core.errors import FleetError


class InputPathError(FleetError):
    """A path named as an input file that is not a regular file (``kind`` says what it is)."""

    def __init__(self, message: str, kind: str = "not a regular file") -> None:
        super().__init__(message)
        self.kind = kind


def kind_of(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words: ``a directory``, ``a FIFO``..."""
    for test, kind in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def refuse_non_regular_input(path: str | os.PathLike[str], what: str = "") -> None:
    """Refuse ``path`` (named ``what``, e.g. ``--faults``, in the message) when it exists and is
    not a regular file, following symbolic links. A missing path is left to the caller, whose
    own open says so in its words.

    Raises:
        InputPathError: ``WHAT PATH: not a regular file (a FIFO)``.
    """
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        prefix = f"{what} {path}" if what else str(path)
        raise InputPathError(f"{prefix}: not a regular file ({kind_of(mode)})", kind_of(mode))


def read_regular_file(path: str | os.PathLike[str], max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file at ``path``: the one way a file that may have been replaced
    by a FIFO or a device (a key, a keyring's records, a configuration) is read. The name is
    checked, then the file is opened without blocking and checked again by its descriptor (the
    name may have been replaced in between), so a FIFO no process writes to never blocks. With
    ``max_bytes``, at most one byte more than that is ever read, however the file grows.

    Raises:
        InputPathError: ``path`` is not a regular file.
        OSError: it cannot be opened or read (``FileNotFoundError`` when it is missing).
        ValueError: it holds more than ``max_bytes``.
    """
    refuse_non_regular_input(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise InputPathError(f"{path}: not a regular file ({kind_of(mode)})", kind_of(mode))
        if max_bytes is None:
            return file.read()
        data = file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ValueError(f"{path}: larger than {max_bytes} bytes")
        return data
