"""Run the ``fleet`` console entry point with its standard error on a pseudo-terminal.

``click.testing`` never gives a command a terminal, so what is drawn only for a person (the
progress bars of ``fleet_core.progress``) is checked here: a subprocess whose stderr is the
slave side of a pty, read from the master side until the process has closed it.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ENTRY_POINT = "from fleet_core.cli import main; main()"


@dataclass(frozen=True)
class TerminalRun:
    returncode: int
    stdout: str
    terminal: str  # what the command wrote to its standard error, the terminal


def run_on_terminal(args: Sequence[str | Path], *, timeout: float = 120.0) -> TerminalRun:
    """Run ``fleet ARGS`` with stdout on a pipe and stderr on a pty; wait at most ``timeout``."""
    master, slave = os.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", ENTRY_POINT, *(str(a) for a in args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
        )
        os.close(slave)
        slave = -1
        deadline = time.monotonic() + timeout
        received = bytearray()
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([master], [], [], max(left, 0))
            if not ready:
                process.kill()
                raise AssertionError(f"fleet {args} still running after {timeout} s")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every handle on the slave side is closed
                break
            if not data:
                break
            received += data
        stdout, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return TerminalRun(process.returncode, stdout.decode(), received.decode(errors="replace"))
