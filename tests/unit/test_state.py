"""The state store: atomic saves, damage tolerated, the crash-loop guard, the update lock."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from updater.errors import LockedError, StateError
from updater.state import DeviceState, StateStore, update_lock


def test_round_trip_and_save_counter(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load().state == DeviceState()
    saved = store.save(DeviceState().with_slot("b", status="installing", version="2.0.0"))
    assert saved.save_count == 1
    loaded = store.load()
    assert loaded.problem is None
    assert loaded.state == saved
    assert store.save(loaded.state).save_count == 2


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"format": 1, "slots": {"a": {}, "b": {',
        b"\xff\xfe",
        b'{"format": 2}',
        b'{"format": 1, "slots": {"a": {"status": "golden"}, "b": {}}}',
        b'{"format": 1, "slots": {"a": {}, "b": {}, "c": {}}}',
        b'{"format": 1, "slots": {"a": {"colour": 1}, "b": {}}}',
        b'{"format": 1, "slots": {"a": {}, "b": {}}, "save_count": -1}',
        b'{"format": 1, "slots": {"a": {"trial_boots": "x"}, "b": {}}}',
    ],
)
def test_damaged_state_starts_afresh_and_keeps_the_evidence(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "state.json").write_bytes(content)
    loaded = StateStore(tmp_path).load()
    assert loaded.state == DeviceState()
    assert loaded.problem is not None and "damaged" in loaded.problem
    assert (tmp_path / "state.json.damaged").read_bytes() == content


def test_truncated_state_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(DeviceState().with_slot("a", status="good", version="1.0.0"))
    data = (tmp_path / "state.json").read_bytes()
    (tmp_path / "state.json").write_bytes(data[: len(data) // 2])
    assert store.load().problem is not None


def test_save_to_unwritable_data_dir_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match="cannot write"):
        StateStore(tmp_path / "file" / "data").save(DeviceState())


def test_unknown_slot() -> None:
    with pytest.raises(StateError, match="unknown slot"):
        DeviceState().slot("c")


def test_crash_loop_guard_counts_starts_within_five_minutes_of_one_boot() -> None:
    state = DeviceState()
    for uptime in (10.0, 50.0, 100.0):
        state = state.with_start("boot-1", uptime)
    assert state.suspended is None
    state = state.with_start("boot-1", 200.0)
    assert state.suspended is not None and "4 updater starts" in state.suspended


def test_crash_loop_guard_forgets_old_starts_and_other_boots() -> None:
    state = DeviceState()
    for uptime in (10.0, 400.0, 800.0, 1200.0, 1600.0):
        state = state.with_start("boot-1", uptime)
    assert state.suspended is None
    for boot in ("b2", "b3", "b4", "b5"):
        state = state.with_start(boot, 10.0)
    assert state.suspended is None
    assert len(state.restarts) == 1
    assert json.loads(json.dumps(state.to_dict()))["restarts"] == [["b5", 10.0]]


def _hold_lock(
    data_dir: Path,
    ready: multiprocessing.synchronize.Event,
    done: multiprocessing.synchronize.Event,
) -> None:  # type: ignore[name-defined]
    with update_lock(data_dir):
        ready.set()
        done.wait(10)


def test_update_lock_excludes_a_second_holder_and_names_it(tmp_path: Path) -> None:
    ready, done = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_lock, args=(tmp_path, ready, done))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(LockedError, match=f"pid {holder.pid}"), update_lock(tmp_path):
            pass
    finally:
        done.set()
        holder.join(10)
    with update_lock(tmp_path):
        pass


@pytest.mark.parametrize(
    "content",
    [
        b'{"format": 1, "slots": {"a": {}, "b": {}}, "restarts": [["x", 1e400]]}',
        b'{"format": 1, "slots": {"a": {}, "b": {}}, "restarts": [["x", ' + b"9" * 5000 + b"]]}",
        b"[" * 100_000,
    ],
)
def test_hostile_state_file_starts_afresh(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "state.json").write_bytes(content)
    loaded = StateStore(tmp_path).load()
    assert loaded.state == DeviceState() and loaded.problem is not None
