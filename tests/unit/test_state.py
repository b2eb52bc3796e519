"""The state store: atomic saves, damage tolerated, the crash-loop guard, the update lock."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_core.durable import atomic_write as real_atomic_write
from updater.errors import LockedError, StateError
from updater.state import SLOT_STATUSES, DeviceState, SlotState, StateStore, update_lock


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


# --- what a state file holds, and what a hand-edited or corrupted one is told -------------------

SLOT_STATES = st.builds(
    SlotState,
    status=st.sampled_from(SLOT_STATUSES),
    version=st.none() | st.text(max_size=12),
    bundle_sha256=st.none() | st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    security_version=st.none() | st.integers(min_value=0, max_value=2**40),
    updated_at=st.none() | st.text(max_size=20),
    trial_boots=st.integers(min_value=0, max_value=10),
    failures=st.integers(min_value=0, max_value=10),
)
DEVICE_STATES = st.builds(
    DeviceState,
    slots=st.fixed_dictionaries({"a": SLOT_STATES, "b": SLOT_STATES}),
    installed_security_version=st.integers(min_value=0, max_value=2**40),
    save_count=st.integers(min_value=0, max_value=2**40),
    restarts=st.lists(
        st.tuples(st.text(max_size=36), st.floats(allow_nan=False, allow_infinity=False)),
        max_size=4,
    ).map(tuple),
    suspended=st.none() | st.text(max_size=40),
)


@settings(max_examples=100, deadline=None)
@given(DEVICE_STATES)
def test_every_state_survives_a_trip_through_json(state: DeviceState) -> None:
    assert DeviceState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_a_suspended_state_with_its_starts_is_saved_and_loaded_whole(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = DeviceState(
        slots={"a": SlotState(status="good", version="1.0.0"), "b": SlotState(status="bad")},
        installed_security_version=3,
        restarts=(("boot-1", 12.5), ("boot-1", 40.0)),
        suspended="crash loop: 4 updater starts within 5 minutes",
    )
    saved = store.save(state)
    document = json.loads((tmp_path / "state.json").read_bytes())
    assert document["suspended"] == "crash loop: 4 updater starts within 5 minutes"
    assert document["restarts"] == [["boot-1", 12.5], ["boot-1", 40.0]]
    loaded = store.load()
    assert loaded.problem is None
    assert loaded.state == saved
    assert loaded.state.suspended == "crash loop: 4 updater starts within 5 minutes"
    assert loaded.state.restarts == (("boot-1", 12.5), ("boot-1", 40.0))


def test_the_state_file_is_sorted_one_field_a_line(tmp_path: Path) -> None:
    # the layout an operator reads (and diffs) on the device; the same state, the same bytes
    StateStore(tmp_path).save(
        DeviceState(slots={"a": SlotState(status="good", version="1.0.0"), "b": SlotState()})
    )
    assert (tmp_path / "state.json").read_text() == (
        "{\n"
        ' "format": 1,\n'
        ' "installed_security_version": 0,\n'
        ' "restarts": [],\n'
        ' "save_count": 1,\n'
        ' "slots": {\n'
        '  "a": {\n'
        '   "bundle_sha256": null,\n'
        '   "failures": 0,\n'
        '   "security_version": null,\n'
        '   "status": "good",\n'
        '   "trial_boots": 0,\n'
        '   "updated_at": null,\n'
        '   "version": "1.0.0"\n'
        "  },\n"
        '  "b": {\n'
        '   "bundle_sha256": null,\n'
        '   "failures": 0,\n'
        '   "security_version": null,\n'
        '   "status": "empty",\n'
        '   "trial_boots": 0,\n'
        '   "updated_at": null,\n'
        '   "version": null\n'
        "  }\n"
        " },\n"
        ' "suspended": null\n'
        "}\n"
    )


@pytest.mark.parametrize(
    "document",
    [
        {"format": 1, "slots": {"a": {}, "b": {}}},
        {
            "format": 1,
            "slots": {"a": {}, "b": {}},
            "installed_security_version": 0,
            "save_count": 0,
            "restarts": [],
            "suspended": None,
        },
    ],
)
def test_a_minimal_hand_written_state_is_the_empty_state(document: dict[str, object]) -> None:
    assert DeviceState.from_dict(document) == DeviceState()


def _with(**top: object) -> dict[str, object]:
    return {"format": 1, "slots": {"a": {}, "b": {}}, **top}


def _with_slot_a(**fields: object) -> dict[str, object]:
    return _with(slots={"a": fields, "b": {}})


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ([], r"^state: must be a JSON object"),
        ({"format": 2, "slots": {"a": {}, "b": {}}}, r"^state: unknown format 2$"),
        ({"format": "1", "slots": {"a": {}, "b": {}}}, r"^state: unknown format '1'$"),
        (_with(slots={"a": {}}), r"^state: slots must hold exactly a and b"),
        (_with(slots=[{}, {}]), r"^state: slots must hold exactly a and b"),
        (_with(restarts="boot-1"), r"^state: restarts must be a list of \[boot id, seconds\]"),
        (_with(restarts=[[1, 2.0]]), r"^state: restarts must be a list of \[boot id, seconds\]"),
        (_with(restarts=None), r"^state: restarts must be a list of \[boot id, seconds\]"),
        (_with(installed_security_version=-1), r"^state: counters must be non-negative integers"),
        (_with(installed_security_version=True), r"^state: counters must be non-negative integ"),
        (_with(installed_security_version=1.5), r"^state: counters must be non-negative integers"),
        (_with(installed_security_version="2"), r"^state: counters must be non-negative integers"),
        (_with(save_count=-1), r"^state: counters must be non-negative integers"),
        (_with(save_count=None), r"^state: counters must be non-negative integers"),
        (_with(suspended=5), r"^state: suspended must be a string or null"),
        (_with(slots={"a": [], "b": {}}), r"^slot a: must be an object$"),
        (_with_slot_a(colour=1, size=2), r"^slot a: unknown field\(s\) \['colour', 'size'\]$"),
        (_with(slots={"a": {}, "b": {"status": "golden"}}), r"^slot b: unknown status 'golden'$"),
        (_with_slot_a(version=5), r"^slot a: version must be a string$"),
        (_with_slot_a(bundle_sha256=["ab"]), r"^slot a: bundle_sha256 must be a string$"),
        (_with_slot_a(updated_at=0), r"^slot a: updated_at must be a string$"),
        (_with_slot_a(trial_boots="x"), r"^slot a: trial_boots must be a non-negative integer$"),
        (_with_slot_a(trial_boots=True), r"^slot a: trial_boots must be a non-negative integer$"),
        (_with_slot_a(failures=-1), r"^slot a: failures must be a non-negative integer$"),
        (_with_slot_a(trial_boots=None), r"^slot a: trial_boots must be a non-negative integer$"),
        (_with_slot_a(failures=None), r"^slot a: failures must be a non-negative integer$"),
        (
            _with_slot_a(security_version=1.5),
            r"^slot a: security_version must be a non-negative integer$",
        ),
    ],
)
def test_a_bad_state_document_is_refused_naming_the_field(document: object, problem: str) -> None:
    with pytest.raises(StateError, match=problem):
        DeviceState.from_dict(document)


def test_a_hand_edited_state_file_is_reported_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(_with_slot_a(status="good", version=2)))
    loaded = StateStore(tmp_path).load()
    assert loaded.state == DeviceState()
    assert loaded.problem == (
        f"state {path}: damaged (slot a: version must be a string); starting afresh"
    )


def test_an_unreadable_state_file_starts_afresh_and_says_why(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.mkdir()
    loaded = StateStore(tmp_path).load()
    assert loaded.state == DeviceState()
    assert loaded.problem == f"state {path}: cannot read: Is a directory"


def test_damage_is_reported_even_when_the_evidence_cannot_be_kept(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_bytes(b"{not json")
    (tmp_path / "state.json.damaged").mkdir()  # a rename onto it fails
    loaded = StateStore(tmp_path).load()
    assert loaded.state == DeviceState()
    assert loaded.problem is not None and "damaged" in loaded.problem
    assert (tmp_path / "state.json").read_bytes() == b"{not json"


def test_save_creates_the_missing_data_directories(tmp_path: Path) -> None:
    data_dir = tmp_path / "var" / "lib" / "fleet"
    saved = StateStore(data_dir).save(DeviceState())
    assert StateStore(data_dir).load().state == saved


# --- the wall-clock stamp of a slot change ----------------------------------------------------


@pytest.fixture
def far_from_utc() -> Iterator[None]:
    """The local time zone 14 hours ahead of UTC (as on Kiritimati)."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC-14"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


@pytest.mark.usefixtures("far_from_utc")
def test_a_slot_change_is_stamped_with_the_utc_time() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    state = DeviceState().with_slot("b", status="installing", version="2.0.0")
    after = datetime.now(UTC)
    stamp = state.slot("b").updated_at
    assert stamp is not None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    assert before <= datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) <= after
    assert state.slot("b").status == "installing" and state.slot("b").version == "2.0.0"
    assert state.slot("a") == SlotState()


# --- the crash-loop guard's window --------------------------------------------------------------


def _starts(boot_id: str, *uptimes: float, state: DeviceState | None = None) -> DeviceState:
    state = state or DeviceState()
    for uptime in uptimes:
        state = state.with_start(boot_id, uptime)
    return state


def test_a_crash_loop_is_named_in_the_suspension() -> None:
    state = _starts("boot-1", 10.0, 50.0, 100.0, 200.0)
    assert state.suspended == "crash loop: 4 updater starts within 5 minutes"


def test_starts_exactly_five_minutes_apart_are_in_one_window() -> None:
    assert _starts("boot-1", 1000.0, 1100.0, 1200.0, 1299.0).suspended is not None
    assert _starts("boot-1", 1000.0, 1100.0, 1200.0, 1300.0).suspended is not None
    assert _starts("boot-1", 1000.0, 1100.0, 1200.0, 1300.5).suspended is None


def test_starts_within_one_second_all_count() -> None:
    # a unit restarting at once; the uptime clock may even read the same twice
    assert _starts("boot-1", 20.0, 20.5, 20.5, 21.0).suspended is not None
    assert _starts("boot-1", 20.0, 20.0, 20.0, 20.0).suspended is not None


def test_only_the_last_four_starts_are_kept() -> None:
    state = _starts("boot-1", 10.0, 20.0, 30.0, 40.0, 50.0, 60.0)
    assert state.restarts == (
        ("boot-1", 30.0),
        ("boot-1", 40.0),
        ("boot-1", 50.0),
        ("boot-1", 60.0),
    )


def test_a_suspension_outlasts_later_starts_and_keeps_its_first_reason() -> None:
    state = _starts("boot-1", 10.0, 20.0, 30.0, 40.0)
    reason = state.suspended
    assert reason == "crash loop: 4 updater starts within 5 minutes"
    assert _starts("boot-1", 50.0, state=state).suspended == reason
    assert _starts("boot-2", 10.0, state=state).suspended == reason


# --- the floor, kept twice --------------------------------------------------------------------


def saved_with_floor(store: StateStore, floor: int) -> DeviceState:
    return store.save(
        DeviceState(installed_security_version=floor).with_slot(
            "a", status="good", version="1.0.0", security_version=floor
        )
    )


def test_a_rising_floor_is_kept_beside_the_state(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    saved_with_floor(store, 3)
    assert (tmp_path / "security-floor").read_text() == "3\n"
    saved_with_floor(store, 1)  # a state naming a lower floor never lowers the kept one
    assert (tmp_path / "security-floor").read_text() == "3\n"


@pytest.mark.parametrize(
    ("lose", "problem"),
    [
        (lambda path: path.unlink(), "missing; security floor 7 kept in"),
        (lambda path: path.write_bytes(b"{not json"), "damaged"),
        (lambda path: path.write_bytes(b""), "damaged"),
        (
            lambda path: path.write_text(path.read_text().replace(": 7", ": 2")),
            "names security floor 2, below the 7 kept",
        ),
    ],
    ids=["deleted", "garbled", "emptied", "floor-edited-down"],
)
def test_a_lost_or_edited_state_file_never_lowers_the_floor(
    tmp_path: Path, lose: Any, problem: str
) -> None:
    store = StateStore(tmp_path)
    saved_with_floor(store, 7)

    lose(store.path)
    loaded = store.load()

    assert loaded.state.installed_security_version == 7
    assert loaded.problem is not None and problem in loaded.problem
    store.save(loaded.state)  # what the updater saves next keeps it too
    assert json.loads(store.path.read_text())["installed_security_version"] == 7


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "not a whole number"),
        (b"seven\n", "not a whole number"),
        (b"-1\n", "not a whole number"),
        (b"\xff", "not a whole number"),
        (b"1e9\n", "not a whole number"),
        ("\u0663".encode(), "not a whole number"),  # a digit, but not an ASCII one
        (b"9" * 40, "not a whole number"),
        (b"99999999999", "not a whole number"),  # 11 digits: never read as a number
        (b"4294967296\n", "above 4294967295"),
    ],
)
def test_a_damaged_floor_copy_is_named_and_the_state_decides(
    tmp_path: Path, content: bytes, why: str
) -> None:
    store = StateStore(tmp_path)
    saved_with_floor(store, 4)
    store.floor_path.write_bytes(content)

    loaded = store.load()

    assert loaded.state.installed_security_version == 4
    assert loaded.problem == f"security floor {store.floor_path}: damaged ({why})"
    store.save(loaded.state)  # rewritten whole from the state's floor
    assert store.floor_path.read_text() == "4\n"


def test_a_state_written_before_the_floor_copy_existed_keeps_its_floor(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    saved_with_floor(store, 5)
    store.floor_path.unlink()
    loaded = store.load()
    assert (loaded.state.installed_security_version, loaded.problem) == (5, None)


def test_a_floor_copy_lost_after_the_load_is_rewritten_by_the_next_save(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    saved_with_floor(store, 6)
    loaded = store.load()
    store.floor_path.unlink()  # between this process's load and its save
    store.save(loaded.state)
    assert store.floor_path.read_text() == "6\n"


def test_a_power_cut_between_the_two_copies_keeps_the_higher_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path)
    saved_with_floor(store, 2)
    writes: list[Path] = []

    def cut_after_the_first(path: Path, data: bytes) -> None:
        if writes:
            raise OSError(5, "Input/output error")
        writes.append(path)
        real_atomic_write(path, data)

    monkeypatch.setattr("updater.state.atomic_write", cut_after_the_first)
    with pytest.raises(StateError):
        saved_with_floor(store, 6)
    monkeypatch.undo()

    assert writes == [store.floor_path]  # the floor copy is written first
    loaded = store.load()
    assert loaded.state.installed_security_version == 6
    assert loaded.state.slot("a").security_version == 2  # the state itself is the previous one


@settings(max_examples=40, deadline=None)
@given(
    floors=st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=1, max_size=6),
    lose=st.sampled_from(["keep", "delete", "garble"]),
)
def test_the_floor_read_back_is_the_highest_ever_saved(
    tmp_path_factory: pytest.TempPathFactory, floors: list[int], lose: str
) -> None:
    store = StateStore(tmp_path_factory.mktemp("floor"))
    for floor in floors:
        store.save(DeviceState(installed_security_version=floor))
    if lose == "delete":
        store.path.unlink()
    elif lose == "garble":
        store.path.write_bytes(b"\x00garbled")
    assert store.load().state.installed_security_version == max(floors)


@pytest.mark.parametrize("content", [b"seven\n", b"4294967296\n"])
def test_a_damaged_floor_copy_adds_nothing_to_a_floor_of_zero(
    tmp_path: Path, content: bytes
) -> None:
    store = StateStore(tmp_path)
    store.save(DeviceState())
    store.floor_path.write_bytes(content)
    assert store.load().state.installed_security_version == 0


def test_an_unreadable_floor_copy_is_named_and_adds_nothing(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(DeviceState())
    store.floor_path.mkdir()  # not a file: reading it fails
    loaded = store.load()
    assert loaded.state.installed_security_version == 0
    assert loaded.problem is not None
    assert loaded.problem.startswith(f"security floor {store.floor_path}: cannot read: ")


def test_the_highest_security_version_is_a_valid_floor(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(DeviceState())
    store.floor_path.write_text("4294967295\n")
    loaded = store.load()
    assert (loaded.state.installed_security_version, loaded.problem) == (
        4294967295,
        f"state {store.path}: names security floor 0, below the 4294967295 kept in "
        f"{store.floor_path}: the higher one holds",
    )


def test_every_problem_of_a_load_is_named_in_one_line(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path.write_bytes(b"{not json")
    store.floor_path.write_bytes(b"garbage")
    problem = store.load().problem
    assert problem is not None
    damaged, _, floor = problem.rpartition("; ")
    assert damaged.startswith(f"state {store.path}: damaged (")
    assert damaged.endswith("); starting afresh")
    assert floor == f"security floor {store.floor_path}: damaged (not a whole number)"


def test_an_unchanged_floor_is_not_written_again(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    saved = saved_with_floor(store, 3)
    before = store.floor_path.stat().st_ino
    store.save(saved)  # every save of the state; the floor did not move: no write wears flash
    assert store.floor_path.stat().st_ino == before
