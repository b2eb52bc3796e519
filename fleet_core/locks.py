"""Exclusive locks between processes: ``flock`` on a file, released by the kernel when the holder
dies, so a crash or a power cut never leaves a stale lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from fleet_core.text import printable


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is its process id as it recorded it."""

    def __init__(self, holder: str) -> None:
        super().__init__(f"held by pid {holder}")
        self.holder = holder


@contextlib.contextmanager
def holding(path: Path) -> Iterator[None]:
    """Hold the lock file ``path`` (made if missing) for the block, without waiting, and record
    this process's id in it for whoever finds it held.

    Raises:
        LockHeld: another process holds it (its recorded id, inert, or ``unknown``).
        OSError: the lock file cannot be opened.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise LockHeld(printable(holder) or "unknown") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
