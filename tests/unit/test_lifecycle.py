"""The slot lifecycle (updater/lifecycle.py): every verb's invariants, and the order in which
the bootloader and the state store are changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from updater.errors import PreconditionError, SlotStateError
from updater.lifecycle import (
    TRANSITIONS,
    SlotLifecycle,
    SlotStatus,
    Verb,
    boot_selection,
    committed,
    fallback_vouched,
    transition_table,
    unvouched,
)
from updater.log import EventLog
from updater.state import DeviceState, StateStore

DOCS = Path(__file__).parents[2] / "docs" / "slot-lifecycle.md"


class Recorder:
    """A boot backend that records its calls in ``steps``, beside the state store's saves."""

    name = "recorder"

    def __init__(self, steps: list[Any], booted: str = "a") -> None:
        self.steps = steps
        self._booted = booted
        self.trial = False
        self.primary_slot: str | None = booted

    def booted(self) -> str:
        return self._booted

    def primary(self) -> str | None:
        return self.primary_slot

    def is_trial(self) -> bool:
        return self.trial

    def attempts_left(self, slot: str) -> int:
        return 3

    def try_once(self, slot: str) -> None:
        self.steps.append(("try_once", slot))

    def commit(self, slot: str) -> None:
        self.steps.append(("commit", slot))

    def mark_bad(self, slot: str) -> None:
        self.steps.append(("mark_bad", slot))

    def reboot_command(self) -> list[str]:
        return ["reboot"]


class RecordingStore(StateStore):
    def __init__(self, data_dir: Path, steps: list[Any]) -> None:
        super().__init__(data_dir)
        self.steps = steps

    def save(self, state: DeviceState) -> DeviceState:
        self.steps.append(("save", {name: s.status for name, s in sorted(state.slots.items())}))
        return super().save(state)


class Lab:
    def __init__(self, tmp_path: Path, booted: str = "a") -> None:
        self.steps: list[Any] = []
        self.backend = Recorder(self.steps, booted)
        self.store = RecordingStore(tmp_path / "data", self.steps)
        self.lifecycle = SlotLifecycle(self.backend, self.store, EventLog(keep=True))

    def state(self, **slots: dict[str, Any]) -> DeviceState:
        """Slot a good at 1.0.0 (security version 1, the floor), then ``slots``' changes."""
        state = DeviceState(installed_security_version=1).with_slot(
            "a", status="good", version="1.0.0", security_version=1
        )
        for name, changes in slots.items():
            state = state.with_slot(name, **changes)
        return state

    def saved(self) -> DeviceState:
        return self.store.load().state


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


def test_the_documented_table_is_the_table_of_the_code() -> None:
    text = DOCS.read_text("utf-8")
    assert transition_table() in text, "regenerate: python -m updater.lifecycle"
    # every verb and every status a verb accepts has its row
    rows = [line for line in transition_table().splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(TRANSITIONS)


def test_slot_errors_of_the_lifecycle_are_refusals_before_any_write() -> None:
    assert issubclass(SlotStateError, PreconditionError)


# --- begin install -----------------------------------------------------------------------


def test_begin_install_marks_the_slot_bad_before_the_store_says_installing(lab: Lab) -> None:
    state = lab.state(b={"status": "good", "failures": 2, "trial_boots": 1})
    saved = lab.lifecycle.begin_install(
        state, "b", version="2.0.0", bundle_sha256="ab" * 32, security_version=2
    )
    assert lab.steps == [("mark_bad", "b"), ("save", {"a": "good", "b": "installing"})]
    slot = saved.slot("b")
    assert (slot.status, slot.version, slot.bundle_sha256) == ("installing", "2.0.0", "ab" * 32)
    assert (slot.security_version, slot.trial_boots, slot.failures) == (2, 0, 0)
    assert lab.saved() == saved


def test_a_damaged_boot_state_is_left_alone_by_a_recovery(tmp_path: Path) -> None:
    lab = Lab(tmp_path, booted="safe")
    lab.lifecycle.begin_install(
        lab.state(), "b", version="2.0.0", bundle_sha256="ab" * 32, security_version=1,
        boot_state_damaged=True,
    )  # fmt: skip
    assert lab.steps == [("save", {"a": "good", "b": "installing"})]


@pytest.mark.parametrize(
    ("arrange", "slot", "message"),
    [
        ({}, "a", "^slot a is the running slot: it is never written$"),
        ({"trial": True}, "b", "^slot a is running a trial that is not committed yet: "),
        ({"primary_slot": "b"}, "b", "^slot a is running a trial that is not committed yet"),
        ({"primary_slot": None}, "b", "^slot a is running a trial that is not committed yet"),
        ({}, "safe", "^begin install: 'safe' is not a root slot$"),
    ],
)
def test_begin_install_never_writes_the_running_slot_nor_its_fallback(
    lab: Lab, arrange: dict[str, Any], slot: str, message: str
) -> None:
    for name, value in arrange.items():
        setattr(lab.backend, name, value)
    with pytest.raises(SlotStateError, match=message):
        lab.lifecycle.begin_install(
            lab.state(), slot, version="2.0.0", bundle_sha256="ab" * 32, security_version=1
        )
    assert lab.steps == []


def test_from_safe_mode_any_root_slot_may_be_written(tmp_path: Path) -> None:
    lab = Lab(tmp_path, booted="safe")
    lab.backend.primary_slot = None
    for slot in ("a", "b"):
        lab.lifecycle.check_writable(slot)


def test_begin_install_refuses_a_release_below_the_floor(lab: Lab) -> None:
    with pytest.raises(
        SlotStateError, match="^security version 0 is below the installed 1: install refused$"
    ):
        lab.lifecycle.begin_install(
            lab.state(), "b", version="0.9.0", bundle_sha256="ab" * 32, security_version=0
        )
    assert lab.steps == []


# --- arm a trial -------------------------------------------------------------------------


def test_arming_a_written_slot_persists_installed_first_then_trial(lab: Lab) -> None:
    state = lab.state(b={"status": "installing", "security_version": 2, "trial_boots": 2})
    saved = lab.lifecycle.arm_trial(state, "b")
    assert lab.steps == [
        ("save", {"a": "good", "b": "installed"}),
        ("try_once", "b"),
        ("save", {"a": "good", "b": "trial"}),
    ]
    assert saved.slot("b").trial_boots == 0 and saved.installed_security_version == 1


def test_a_rollback_arms_the_intact_previous_release_directly(lab: Lab) -> None:
    state = lab.state(b={"status": "good", "security_version": 1})
    lab.lifecycle.arm_trial(state, "b", purpose="rollback")
    assert lab.steps == [("try_once", "b"), ("save", {"a": "good", "b": "trial"})]


@pytest.mark.parametrize(
    ("changes", "slot", "message"),
    [
        ({"status": "bad", "security_version": 1}, "b", "^slot b is bad: arm trial refused$"),
        ({"status": "empty"}, "b", "^slot b is empty: arm trial refused$"),
        ({"status": "trial", "security_version": 1}, "b", "^slot b is trial: arm trial refused"),
        ({"status": "good"}, "b", "^security version 0 is below the installed 1: rollback"),
        ({"status": "good", "security_version": 0}, "b", "below the installed 1: rollback"),
    ],
)
def test_a_bad_empty_armed_or_outdated_slot_is_never_armed(
    lab: Lab, changes: dict[str, Any], slot: str, message: str
) -> None:
    with pytest.raises(SlotStateError, match=message):
        lab.lifecycle.arm_trial(lab.state(b=changes), slot, purpose="rollback")
    assert lab.steps == []


def test_an_install_below_the_floor_is_never_armed_for_its_trial(lab: Lab) -> None:
    state = lab.state(b={"status": "installed", "security_version": 0})
    with pytest.raises(SlotStateError, match="^security version 0 is below the installed 1: "
                       "trial boot refused$"):  # fmt: skip
        lab.lifecycle.arm_trial(state, "b")
    assert lab.steps == []


def test_the_running_slot_is_never_armed(tmp_path: Path) -> None:
    lab = Lab(tmp_path, booted="b")
    state = lab.state(b={"status": "good", "security_version": 1})
    with pytest.raises(SlotStateError, match="^slot b is the running slot: there is nothing"):
        lab.lifecycle.arm_trial(state, "b")
    assert lab.steps == []


# --- commit ------------------------------------------------------------------------------


def test_commit_tells_the_bootloader_first_and_raises_the_floor(tmp_path: Path) -> None:
    lab = Lab(tmp_path, booted="b")
    state = lab.state(b={"status": "trial", "security_version": 4, "trial_boots": 2})
    state = state.with_slot("b", failures=1)
    saved = lab.lifecycle.commit(state, "b")
    assert lab.steps[:2] == [("commit", "b"), ("save", {"a": "good", "b": "good"})]
    # slot a's 1.0.0 (security version 1) is below the new floor: no longer a fallback
    assert lab.steps[2:] == [("mark_bad", "a"), ("save", {"a": "bad", "b": "good"})]
    slot = saved.slot("b")
    assert (slot.status, slot.trial_boots, slot.failures) == ("good", 0, 0)
    assert saved.installed_security_version == 4


@pytest.mark.parametrize(
    ("floor", "security_version", "expected"), [(3, 3, 3), (0, 2, 2), (0, None, 0)]
)
def test_the_floor_only_ever_rises(floor: int, security_version: int | None, expected: int) -> None:
    state = DeviceState(installed_security_version=floor).with_slot(
        "a", status="trial", security_version=security_version
    )
    assert committed(state, "a").installed_security_version == expected


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"status": "bad", "security_version": 5}, "^slot b is bad: commit refused$"),
        ({"status": "installing", "security_version": 5}, "^slot b is installing: commit"),
        (
            {"status": "good", "security_version": 0},
            "^slot b holds a release whose security version 0 is below the installed 1: "
            "commit refused$",
        ),
        (
            {"status": "trial", "security_version": 0},
            "^slot b holds a release whose security version 0 is below the installed 1",
        ),
    ],
)
def test_a_slot_the_store_does_not_vouch_for_is_never_committed(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    lab = Lab(tmp_path, booted="b")
    with pytest.raises(SlotStateError, match=message):
        lab.lifecycle.commit(lab.state(b=changes), "b")
    assert lab.steps == []


def test_only_the_running_slot_is_committed(lab: Lab) -> None:
    state = lab.state(b={"status": "trial", "security_version": 2})
    with pytest.raises(SlotStateError, match="^slot b is not the running slot: only that"):
        lab.lifecycle.commit(state, "b")
    assert lab.steps == []


def test_what_the_store_vouches_for() -> None:
    state = DeviceState(installed_security_version=2)
    for status in ("empty", "installed", "trial", "good"):
        assert unvouched(state.with_slot("a", status=status, security_version=2), "a") is None
    assert unvouched(state.with_slot("a", status="good", security_version=3), "a") is None
    # no security version: the store does not know the release (a factory device, a state
    # file lost), so nothing against it either; the floor, kept beside the store, still bars
    # installs below it, and such a slot is never a fallback
    for status in ("empty", "installed", "trial", "good"):
        unknown = state.with_slot("a", status=status, security_version=None)
        assert unvouched(unknown, "a") is None
        assert not fallback_vouched(unknown, "a")
    for status in ("installed", "trial", "good"):
        below = state.with_slot("a", status=status, security_version=0)
        assert unvouched(below, "a") == (
            "slot a holds a release whose security version 0 is below the installed 2"
        )
    assert fallback_vouched(state.with_slot("a", status="good", security_version=2), "a")


def test_a_running_slot_the_store_lost_is_committed_without_lowering_the_floor(lab: Lab) -> None:
    saved = lab.lifecycle.commit(DeviceState(installed_security_version=3), "a")
    assert saved.slot("a").status == "good" and saved.installed_security_version == 3


# --- mark bad ----------------------------------------------------------------------------


def test_mark_bad_tells_the_bootloader_first(lab: Lab) -> None:
    state = lab.state(b={"status": "good", "security_version": 1})
    saved = lab.lifecycle.mark_bad(state, "a")
    assert lab.steps == [("mark_bad", "a"), ("save", {"a": "bad", "b": "good"})]
    assert saved.slot("a").status == "bad"


@pytest.mark.parametrize(
    "other",
    [
        {"status": "empty"},
        {"status": "bad"},
        {"status": "trial", "security_version": 1},
        {"status": "installed", "security_version": 1},
        {"status": "installing"},
        {"status": "good", "security_version": 0},  # good, but below the floor
        {"status": "good"},  # good, of an unknown security version
    ],
)
def test_the_last_good_slot_is_marked_bad_only_by_force(lab: Lab, other: dict[str, Any]) -> None:
    state = lab.state(b=other)
    with pytest.raises(SlotStateError) as raised:
        lab.lifecycle.mark_bad(state, "a")
    assert str(raised.value) == (
        "slot a is the only good root slot at or above the floor: marking it bad leaves the "
        "device to boot the safe-mode slot (use --force to do so)"
    )
    assert lab.steps == []
    lab.lifecycle.mark_bad(state, "a", force=True)
    assert lab.steps == [("mark_bad", "a"), ("save", {"a": "bad", "b": other["status"]})]


# --- a failed install, and recovery's repair ----------------------------------------------


def test_a_failed_write_is_bad_in_the_store_the_bootloader_has_it_bad_already(lab: Lab) -> None:
    state = lab.state(b={"status": "installing"})
    assert lab.lifecycle.fail_install(state, "b").slot("b").status == "bad"
    assert lab.steps == [("save", {"a": "good", "b": "bad"})]


def test_a_failure_once_installed_tells_the_bootloader_too(lab: Lab) -> None:
    # the trial may have been armed when the store could not record it
    lab.lifecycle.fail_install(lab.state(b={"status": "installed"}), "b")
    assert lab.steps == [("mark_bad", "b"), ("save", {"a": "good", "b": "bad"})]


@pytest.mark.parametrize("status", ["good", "empty", "trial", "bad"])
def test_only_an_unfinished_install_can_fail(lab: Lab, status: str) -> None:
    with pytest.raises(SlotStateError, match=f"^slot b is {status}: fail install refused$"):
        lab.lifecycle.fail_install(lab.state(b={"status": status}), "b")


def test_a_repair_commits_the_recovered_slot_as_a_healthy_boot_would(tmp_path: Path) -> None:
    lab = Lab(tmp_path, booted="safe")
    state = lab.state(
        a={"status": "bad"}, b={"status": "installing", "security_version": 3, "failures": 2}
    )
    saved = lab.lifecycle.repair_into(state, "b", lambda slot: lab.steps.append(("repair", slot)))
    assert lab.steps == [
        ("save", {"a": "bad", "b": "installed"}),
        ("repair", "b"),
        ("save", {"a": "bad", "b": "good"}),
    ]
    assert saved.installed_security_version == 3 and saved.slot("b").failures == 0


def test_a_repair_never_commits_a_release_below_the_floor(tmp_path: Path) -> None:
    lab = Lab(tmp_path, booted="safe")
    state = lab.state(b={"status": "installed", "security_version": 0})
    with pytest.raises(SlotStateError, match="below the installed 1: recovery refused"):
        lab.lifecycle.repair_into(state, "b", lambda slot: lab.steps.append(("repair", slot)))
    assert lab.steps == []


def test_counters_are_persisted_before_the_checks(lab: Lab) -> None:
    state = lab.lifecycle.count_trial_boot(lab.state(), "a")
    state = lab.lifecycle.count_failure(state, "a")
    assert (state.slot("a").trial_boots, state.slot("a").failures) == (1, 1)
    assert lab.saved().slot("a").failures == 1


def test_every_verb_and_status_has_a_word() -> None:
    assert {verb.value for verb in Verb} >= {"begin install", "arm trial", "commit", "mark bad"}
    assert [s.value for s in SlotStatus] == [
        "empty", "installing", "installed", "trial", "good", "bad"
    ]  # fmt: skip


# --- rebuilding a lost boot state from the store ------------------------------------------


@pytest.mark.parametrize(
    ("slots", "booted", "expected"),
    [
        ({"b": {"status": "good", "security_version": 1}}, "a", ("a", "b")),
        ({"b": {"status": "good", "security_version": 1}}, "b", ("b", "a")),
        ({"b": {"status": "good", "security_version": 1}}, "safe", ("a", "b")),
        ({"b": {"status": "bad", "security_version": 1}}, "a", ("a", None)),
        ({"b": {"status": "good", "security_version": 0}}, "b", ("a", None)),  # below the floor
        ({"b": {"status": "trial", "security_version": 1}}, "b", ("a", None)),
        ({"a": {"status": "bad"}, "b": {"status": "trial", "security_version": 1}}, "b",
         ("b", None)),
        ({"a": {"status": "bad"}, "b": {"status": "installing"}}, "b", (None, None)),
        ({"a": {"status": "bad"}}, "safe", (None, None)),
    ],
)  # fmt: skip
def test_a_rebuilt_boot_state_names_only_what_the_store_vouches_for(
    lab: Lab, slots: dict[str, dict[str, Any]], booted: str, expected: tuple[Any, Any]
) -> None:
    assert boot_selection(lab.state(**slots), booted) == expected


def test_a_repair_writes_what_the_store_vouches_for_and_says_so(tmp_path: Path) -> None:
    lab = Lab(tmp_path, booted="b")
    repairs: list[tuple[str | None, str | None]] = []
    lab.backend.repair = lambda primary, fallback=None: repairs.append((primary, fallback))  # type: ignore[attr-defined]
    state = lab.state(b={"status": "good", "security_version": 1})
    assert lab.lifecycle.repair_boot_state(state, "grubenv is missing") == ("b", "a")
    assert repairs == [("b", "a")]
    (event,) = [e for e in lab.lifecycle.log.events if e["event"] == "boot_state.repaired"]  # type: ignore[attr-defined]
    assert (event["level"], event["reason"]) == ("warning", "grubenv is missing")
    assert (event["primary"], event["fallback"]) == ("b", "a")


def test_a_backend_that_cannot_repair_says_so(lab: Lab) -> None:
    with pytest.raises(SlotStateError, match="^grubenv is missing; the recorder backend cannot"):
        lab.lifecycle.repair_boot_state(lab.state(), "grubenv is missing")


# --- a commit withdraws a fallback the store does not vouch for ---------------------------


@pytest.mark.parametrize(
    ("other", "reason"),
    [
        ({"status": "bad", "security_version": 1}, "slot a is bad"),
        ({"status": "empty"}, "slot a is empty, not good"),  # nothing known to boot there
        ({"status": "installed", "security_version": 1}, "slot a is installed, not good"),
        ({"status": "installing", "security_version": 1}, "slot a is installing"),
        (
            {"status": "good", "security_version": 0},
            "slot a holds a release whose security version 0 is below the installed 1",
        ),
    ],
)
def test_a_commit_withdraws_a_fallback_the_store_does_not_vouch_for(
    tmp_path: Path, other: dict[str, Any], reason: str
) -> None:
    # a U-Boot script that started afresh made both slots bootable again, one attempt left
    lab = Lab(tmp_path, booted="b")
    lab.backend.attempts_left = lambda slot: 1  # type: ignore[method-assign]
    state = lab.state(b={"status": "trial", "security_version": 1}).with_slot("a", **other)
    saved = lab.lifecycle.commit(state, "b")
    assert lab.steps == [
        ("commit", "b"),
        ("save", {"a": other["status"], "b": "good"}),
        ("mark_bad", "a"),
        ("save", {"a": "bad", "b": "good"}),
    ]
    assert saved.slot("a").status == "bad"
    (event,) = [e for e in lab.lifecycle.log.events if e["event"] == "slot.fallback_withdrawn"]  # type: ignore[attr-defined]
    assert (event["level"], event["slot"], event["status"]) == ("warning", "a", other["status"])
    assert event["reason"] == reason


@pytest.mark.parametrize(
    "other", [{"status": "good", "security_version": 1}, {"status": "trial", "security_version": 1}]
)
def test_a_vouched_fallback_or_an_armed_trial_stays(tmp_path: Path, other: dict[str, Any]) -> None:
    lab = Lab(tmp_path, booted="b")
    state = lab.state(b={"status": "good", "security_version": 1}).with_slot("a", **other)
    lab.lifecycle.commit(state, "b")
    assert lab.steps == [("commit", "b"), ("save", {"a": other["status"], "b": "good"})]


def test_a_fallback_the_firmware_cannot_boot_is_left_as_the_store_has_it(tmp_path: Path) -> None:
    lab = Lab(tmp_path, booted="b")
    lab.backend.attempts_left = lambda slot: 0  # type: ignore[method-assign]
    state = lab.state(b={"status": "trial", "security_version": 1}).with_slot("a", status="empty")
    assert lab.lifecycle.commit(state, "b").slot("a").status == "empty"
    assert lab.steps == [("commit", "b"), ("save", {"a": "empty", "b": "good"})]
