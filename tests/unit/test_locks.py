"""fleet_core.locks: one holder at a time, the other told who holds it, in inert text."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from fleet_core.locks import LockHeld, holding


def _hold(path: Path, ready: Any, done: Any) -> None:
    with holding(path):
        ready.set()
        done.wait(30)


def test_a_held_lock_names_its_holder_and_is_free_once_the_holder_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    ready, done = multiprocessing.Event(), multiprocessing.Event()
    other = multiprocessing.Process(target=_hold, args=(path, ready, done))
    other.start()
    try:
        assert ready.wait(30)
        with pytest.raises(LockHeld) as held, holding(path):
            pass
        assert held.value.holder == str(other.pid)
    finally:
        done.set()
        other.join(30)
    with holding(path):
        assert path.read_text() == f"{os.getpid()}\n"


def test_a_recorded_holder_is_shown_inert(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    ready, done = multiprocessing.Event(), multiprocessing.Event()
    other = multiprocessing.Process(target=_hold, args=(path, ready, done))
    other.start()
    try:
        assert ready.wait(30)
        path.write_bytes(b"\x1b[2J12\n")  # what a hostile writer could leave in the file
        with pytest.raises(LockHeld) as held, holding(path):
            pass
        assert "\x1b" not in held.value.holder and "12" in held.value.holder
    finally:
        done.set()
        other.join(30)
