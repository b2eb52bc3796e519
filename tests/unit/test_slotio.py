"""The slot writer's rules (updater.slotio): the bytes land as given whichever way they are
written (direct I/O, through the page cache, or switching at the image's tail or when a device
refuses), the data not yet flushed stays bounded while flushes run beside the writing, what is
reported as flushed has been flushed, and every failure names the slot."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_core import durable
from updater import slotio
from updater.errors import InstallError
from updater.slotio import ALIGN, SlotWriter

MIB = 1 << 20


def direct_io_works(directory: Path) -> bool:
    probe = directory / ".direct-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | slotio.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


@pytest.fixture
def slot(tmp_path: Path) -> Path:
    path = tmp_path / "root_b.img"
    path.write_bytes(b"\xee" * (8 * MIB))  # an old release's bytes
    return path


def pattern(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(256)) * (size // 256) + b"t" * (size % 256)


def write_all(writer: SlotWriter, chunks: list[bytes]) -> list[int | None]:
    try:
        reported = [writer.write(chunk) for chunk in chunks]
        writer.finish()
    finally:
        writer.close()
    return reported


def test_an_image_is_written_direct_and_its_unaligned_tail_through_the_cache(
    slot: Path,
) -> None:
    """Aligned chunks go around the page cache; the tail that is no whole block goes through
    it; the slot holds exactly the image, then what it held before."""
    if not direct_io_works(slot.parent):
        pytest.skip(f"{slot.parent} has no direct I/O")
    chunks = [pattern(MIB, 1), pattern(MIB, 2), pattern(5000, 3)]
    writer = SlotWriter(slot, 64 * MIB, MIB)
    modes = [writer.direct]
    writer.write(chunks[0])
    writer.write(chunks[1])
    modes.append(writer.direct)
    write_all(writer, chunks[2:])
    assert [*modes, writer.direct] == [True, True, False]
    image = b"".join(chunks)
    data = slot.read_bytes()
    assert data[: len(image)] == image
    assert data[len(image) :] == b"\xee" * (8 * MIB - len(image))


def test_a_slot_that_refuses_direct_io_at_open_is_written_through_the_cache(
    slot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_direct(path: Any, flags: int, *args: Any) -> int:
        if flags & slotio.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    chunks = [pattern(MIB, 4), pattern(MIB, 5)]
    writer = SlotWriter(slot, 64 * MIB, MIB)
    assert not writer.direct
    write_all(writer, chunks)
    assert slot.read_bytes()[: 2 * MIB] == b"".join(chunks)


def test_a_device_that_refuses_a_direct_write_gets_it_through_the_cache(
    slot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device with a larger block than we align to refuses the first direct write (EINVAL):
    the same bytes are written through the page cache, and everything after them."""
    if not direct_io_works(slot.parent):
        pytest.skip(f"{slot.parent} has no direct I/O")
    real_write = os.write
    refused: list[int] = []

    def picky(fd: int, data: Any) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & slotio.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", picky)
    chunks = [pattern(MIB, 6), pattern(MIB, 7)]
    writer = SlotWriter(slot, 64 * MIB, MIB)
    write_all(writer, chunks)
    assert refused == [MIB]
    assert slot.read_bytes()[: 2 * MIB] == b"".join(chunks)


def test_only_einval_means_no_direct_io(slot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any other refusal of a direct write is the install's failure, naming the slot."""
    if not direct_io_works(slot.parent):
        pytest.skip(f"{slot.parent} has no direct I/O")

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    writer = SlotWriter(slot, 64 * MIB, MIB)
    message = f"slot {slot}: write failed: No space left on device"
    with pytest.raises(InstallError, match=f"^{re.escape(message)}$"):
        write_all(writer, [pattern(MIB)])


class Timeline:
    """Watches ``os.write`` and ``os.fdatasync`` on one slot: the bytes written, and how many
    of them each flush covered (those written before the flush began), once it has ended. The
    flushes are slow, so the writing runs ahead of them unless the writer waits."""

    def __init__(self, slot: Path, monkeypatch: pytest.MonkeyPatch, flush_s: float) -> None:
        self.slot = slot
        self.written = 0
        self.covered = 0  # bytes covered by the flushes that have ended
        self.worst = 0  # the most bytes written and not covered, at any write
        self._lock = threading.Lock()
        real_write, real_sync = os.write, os.fdatasync

        def write(fd: int, data: Any) -> int:
            if not self._ours(fd):
                return real_write(fd, data)
            done = real_write(fd, data)
            with self._lock:
                self.written += done
                self.worst = max(self.worst, self.written - self.covered)
            return done

        def fdatasync(fd: int) -> None:
            if not self._ours(fd):
                return real_sync(fd)
            with self._lock:
                start = self.written
            time.sleep(flush_s)
            real_sync(fd)
            with self._lock:
                self.covered = max(self.covered, start)
            return None

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fdatasync", fdatasync)

    def _ours(self, fd: int) -> bool:
        return os.path.samestat(os.fstat(fd), self.slot.stat())


@pytest.mark.parametrize("chunk", [64 * 1024, 96 * 1024, 256 * 1024])
def test_data_not_yet_flushed_stays_within_one_and_a_half_windows_and_two_writes(
    slot: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Flushes run beside the writing, but the writer waits for each before it has written
    half a window more: at any write, the bytes a power cut could lose (written, not covered
    by a finished flush) are at most 1.5 windows plus two writes; and what a write reports as
    flushed had been flushed."""
    flush_bytes = 512 * 1024
    timeline = Timeline(slot, monkeypatch, flush_s=0.02)
    writer = SlotWriter(slot, flush_bytes, chunk)
    reported: list[tuple[int, int]] = []
    try:
        for i in range(4 * MIB // chunk):
            flushed = writer.write(pattern(chunk, i))
            if flushed is not None:
                reported.append((flushed, timeline.covered))
        writer.finish()
    finally:
        writer.close()
    assert timeline.covered == timeline.written == 4 * MIB // chunk * chunk
    assert timeline.worst <= flush_bytes * 3 // 2 + 2 * chunk, timeline.worst
    assert reported, "no write waited for a flush"
    assert all(flushed <= covered for flushed, covered in reported), reported
    assert [flushed for flushed, _ in reported] == sorted({f for f, _ in reported})


def test_flushes_run_beside_the_writing(slot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writing does not stop for every flush: with slow flushes, a write is made while
    a flush is under way."""
    overlapped = threading.Event()
    flushing = threading.Event()
    real_write, real_sync = os.write, os.fdatasync

    def write(fd: int, data: Any) -> int:
        if flushing.is_set():
            overlapped.set()
        return real_write(fd, data)

    def fdatasync(fd: int) -> None:
        flushing.set()
        time.sleep(0.05)
        real_sync(fd)
        flushing.clear()

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    write_all(SlotWriter(slot, 256 * 1024, 64 * 1024), [pattern(64 * 1024)] * 16)
    assert overlapped.is_set()


@pytest.fixture
def boundaries() -> Iterator[list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []

    def hook(point: str, path: Path) -> None:
        seen.append((point, threading.current_thread().name))

    previous = durable.set_boundary_hook(hook)
    try:
        yield seen
    finally:
        durable.set_boundary_hook(previous)


def test_every_flush_is_a_write_boundary_passed_before_it_starts(
    slot: Path, boundaries: list[tuple[str, str]]
) -> None:
    """Where the lab cuts the power: before each flush, on the thread that writes (a cut there
    stops the writing), and before the last one."""
    writer = SlotWriter(slot, 2 * ALIGN, ALIGN)
    thread = threading.current_thread().name
    write_all(writer, [pattern(ALIGN)] * 5)
    assert boundaries == [("slot:before-flush", thread)] * 3


def test_a_failed_background_flush_fails_the_install_naming_the_slot(
    slot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", failing)
    writer = SlotWriter(slot, 2 * ALIGN, ALIGN)
    message = f"slot {slot}: flush failed: Input/output error"
    with pytest.raises(InstallError, match=f"^{re.escape(message)}$"):
        write_all(writer, [pattern(ALIGN)] * 4)  # the first flush's error, at the fourth write


def test_a_slot_that_cannot_be_opened_is_named_with_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "gone.img"
    message = f"slot {missing}: cannot open: No such file or directory"
    with pytest.raises(InstallError, match=f"^{re.escape(message)}$"):
        SlotWriter(missing, MIB, MIB)
