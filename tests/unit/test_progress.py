"""fleet_core.progress: a bar on standard error when it is a terminal, nothing otherwise."""

from __future__ import annotations

import io
import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from fleet_core.progress import progress

END = "<end of output>"


def terminal_text(master: int) -> str:
    """What was written to the pty up to the END marker (read with a deadline)."""
    received = ""
    deadline = time.monotonic() + 10
    while END not in received:
        ready, _, _ = select.select([master], [], [], max(deadline - time.monotonic(), 0))
        assert ready, f"no {END!r} on the terminal, got {received!r}"
        received += os.read(master, 65536).decode(errors="replace")
    return received[: received.index(END)]


@contextmanager
def on_terminal() -> Iterator[Callable[[], str]]:
    """Standard error on a pseudo-terminal for the block (set inside the test: pytest's own
    capture replaces ``sys.stderr`` when each phase starts); yields a reader of what it got."""
    master, slave = os.openpty()
    stream = os.fdopen(slave, "w", encoding="utf-8")
    saved = sys.stderr
    sys.stderr = stream
    try:

        def shown() -> str:
            print(END, file=stream, flush=True)
            return terminal_text(master)

        yield shown
    finally:
        sys.stderr = saved
        stream.close()
        os.close(master)


def test_a_bar_is_drawn_on_a_terminal_and_reaches_the_total() -> None:
    with on_terminal() as terminal:
        with progress(3 * 1000, "copying image.ext4") as update:
            for _ in range(3):
                update(1000)
        shown = terminal()
    assert "copying image.ext4" in shown
    assert "100%" in shown


def test_a_bar_short_of_its_total_does_not_claim_it() -> None:
    with on_terminal() as terminal:
        with progress(3 * 1000, "copying image.ext4") as update:
            update(1000)
        shown = terminal()
    assert "copying image.ext4" in shown
    assert "33%" in shown and "100%" not in shown


def test_nothing_on_a_terminal_when_disabled() -> None:
    with on_terminal() as terminal:
        with progress(1000, "copying image.ext4", enabled=False) as update:
            update(1000)
        assert terminal() == ""


def test_nothing_at_all_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    with progress(1000, "copying image.ext4") as update:
        update(400)
        update(600)
    assert captured.getvalue() == ""
