"""Writing a slot: one image, front to back, at the speed of the disk.

:class:`SlotWriter` is what :mod:`updater.install` writes a slot with. Two things make it fast
while keeping an install's guarantees:

- **Direct I/O.** The slot is opened with ``O_DIRECT`` when its file system or block device
  accepts it: the bytes go from one page-aligned buffer to the device, not through the page
  cache, so the install neither pays for the cache nor evicts the running system's files from
  it, and a flush has only the device's own cache to empty. A slot that refuses direct I/O (a
  tmpfs file, an odd block size) is written through the page cache instead, and so is the last,
  partial block of an image: the same bytes either way.
- **Flushes beside the writing.** Every ``flush_bytes`` the slot is flushed (``fdatasync``) on
  a thread of its own while writing goes on; the writer waits for that flush once it has
  written half a window more. So a power cut loses at most one and a half ``flush_bytes`` plus two
  writes' worth of data, and what is reported as flushed has been flushed.

A power cut while a slot is written leaves it ``installing`` (never booted, rewritten by the
next install): the flushes bound the page cache and the data in flight, they do not make a half
written slot usable. The write boundaries (``slot:before-flush``) are where the lab's power
cuts fall; the boundary of every flush but the last is passed on the writing thread.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from fleet_core import durable
from updater.errors import InstallError

# Offsets and lengths of direct writes are multiples of this (the largest logical block size
# of the devices we write; a device that wants more refuses a write, and the writer falls back).
ALIGN = 4096
O_DIRECT: int = getattr(os, "O_DIRECT", 0)


class SlotWriter:
    """Writes one slot sequentially from its first byte; see the module docstring.

    :meth:`write` is called from one thread (the slot writer's), :meth:`finish` and
    :meth:`close` after the last write, from any one thread.

    Raises (from the constructor): InstallError: the slot cannot be opened.
    """

    def __init__(self, path: Path, flush_bytes: int, chunk_bytes: int) -> None:
        self.path = path
        self.flush_bytes = flush_bytes
        self.written = 0  # bytes handed to the slot
        self.flushed = 0  # bytes known to be on stable storage
        self._fd = _open(path)
        self._direct = O_DIRECT != 0 and bool(fcntl.fcntl(self._fd, fcntl.F_GETFL) & O_DIRECT)
        self._buffer = mmap.mmap(-1, -(-chunk_bytes // ALIGN) * ALIGN) if self._direct else None
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slot-flusher")
        self._flush: Future[int] | None = None  # the flush under way: to the offset it returns
        self._flush_started = 0  # the offset the last flush started at

    @property
    def direct(self) -> bool:
        """Whether the next write bypasses the page cache."""
        return self._direct

    def write(self, data: bytes) -> int | None:
        """Write ``data`` after what was written. Returns the bytes flushed when this write
        waited for a flush to end (the progress to report), else ``None``.

        Raises:
            InstallError: the write or a flush failed, naming the slot and the reason.
        """
        self._write_all(data)
        self.written += len(data)
        done = None
        if self._flush is not None and self.written - self._flush_started >= self.flush_bytes // 2:
            done = self._wait_for_flush()
        if self.written - self._flush_started >= self.flush_bytes:  # (no flush under way now)
            durable.boundary("slot:before-flush", self.path)
            self._flush_started = self.written
            self._flush = self._flusher.submit(self._fdatasync, self.written)
        return done

    def finish(self) -> None:
        """Flush everything written; returns once it is on stable storage.

        Raises:
            InstallError: a flush failed.
        """
        if self._flush is not None:
            self._wait_for_flush()
        durable.boundary("slot:before-flush", self.path)
        self.flushed = self._fdatasync(self.written)

    def close(self) -> None:
        """Release the slot (after any flush under way has ended; its error is not raised)."""
        self._flusher.shutdown(wait=True)
        os.close(self._fd)
        if self._buffer is not None:
            self._buffer.close()

    def _wait_for_flush(self) -> int:
        flush, self._flush = self._flush, None
        if flush is not None:
            self.flushed = flush.result()
        return self.flushed

    def _fdatasync(self, offset: int) -> int:
        try:
            os.fdatasync(self._fd)
        except OSError as err:
            raise InstallError(f"slot {self.path}: flush failed: {err.strerror}") from err
        return offset

    def _write_all(self, data: bytes) -> None:
        if self._direct and len(data) % ALIGN:
            self._go_through_the_cache()  # the image's tail, or writes too small to align
        if self._direct and self._buffer is not None:
            view = memoryview(self._buffer)[: len(data)]
            view[:] = data  # direct I/O needs an aligned buffer
        else:
            view = memoryview(data)
        try:
            while view:
                try:
                    view = view[os.write(self._fd, view) :]
                except OSError as err:
                    if err.errno != errno.EINVAL or not self._direct:
                        raise
                    self._go_through_the_cache()  # the device wants another alignment
        except OSError as err:
            raise InstallError(f"slot {self.path}: write failed: {err.strerror}") from err
        finally:
            view.release()

    def _go_through_the_cache(self) -> None:
        """Write through the page cache from now on (the bytes are the same)."""
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~O_DIRECT)
        self._direct = False


def _open(path: Path) -> int:
    """Open ``path`` for writing, for direct I/O if it allows it."""
    try:
        if O_DIRECT:
            try:
                return os.open(path, os.O_WRONLY | O_DIRECT)
            except OSError as err:
                if err.errno != errno.EINVAL:  # EINVAL: no direct I/O here (tmpfs)
                    raise
        return os.open(path, os.O_WRONLY)
    except OSError as err:
        raise InstallError(f"slot {path}: cannot open: {err.strerror}") from err
