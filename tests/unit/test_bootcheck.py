"""The boot check's table on plain files: GRUB's grubenv and kernel command line, the Raspberry
Pi's autoboot.txt and device tree (the EEPROM bootloader model), the state store. Each row is
asserted whole: the verdict, the state store, the boot environment read back, the events, the
reboot. A trial whose boot check keeps dying is a reboot loop: after ``MAX_TRIAL_BOOTS`` it is
given up without running the checks again."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bootloader_hooks import grub, grubenv
from bootloader_hooks.base import BootCause, BootEvent, provision
from bootloader_hooks.tryboot import TrialResult, TrybootBackend, TrybootConfig
from bootloader_hooks.tryboot_model import BOOT_ID, TrybootFirmware
from updater.bootcheck import MAX_FAILURES, MAX_TRIAL_BOOTS, BootChecker, BootVerdict
from updater.health import CheckResult, HealthReport
from updater.log import EventLog
from updater.state import DeviceState, StateStore


class CheckDied(Exception):
    """The health checks never returned (the process was killed, the board reset)."""


class Device:
    """Slot a committed with 1.0.0; 2.0.0 in slot b armed for a trial and booted."""

    def __init__(self, root: Path) -> None:
        self.grubenv = provision("grub", root / "esp")["EFI/fleet/grubenv"]
        self.cmdline = root / "cmdline"
        self.cmdline.write_text("ro fleet.slot=a\n")
        self.backend = grub.GrubBackend(self.grubenv, self.cmdline)
        self.backend.try_once("b")
        self.cmdline.write_text("ro fleet.slot=b\n")
        self.store = StateStore(root / "data")
        self.store.save(
            DeviceState()
            .with_slot("a", status="good", version="1.0.0")
            .with_slot("b", status="trial", version="2.0.0", security_version=2)
        )
        self.log = EventLog(keep=True)
        self.reboots: list[Sequence[str]] = []
        self.checks_run = 0

    def healthy(self) -> HealthReport:
        self.checks_run += 1
        return HealthReport(True, (CheckResult("app", "command", True, "ok", 0.0),), 0.0)

    def dying(self) -> HealthReport:
        self.checks_run += 1
        raise CheckDied

    def check(self, healthy: bool = True) -> BootVerdict:
        checker = BootChecker(
            self.backend,
            self.store,
            self.log,
            self.healthy if healthy else self.dying,
            reboot=self.reboots.append,
        )
        return checker.run()

    def env(self) -> dict[str, str]:
        return grubenv.read(self.grubenv).variables()


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path)


def test_a_trial_whose_check_keeps_dying_is_given_up_as_a_reboot_loop(device: Device) -> None:
    for boot in range(1, MAX_TRIAL_BOOTS + 1):
        with pytest.raises(CheckDied):
            device.check(healthy=False)
        # the attempt is counted before the checks run, so a dying check still counts
        assert device.store.load().state.slot("b").trial_boots == boot
        assert device.backend.is_trial()
    assert device.checks_run == MAX_TRIAL_BOOTS

    verdict = device.check(healthy=False)
    assert verdict == BootVerdict("trial_loop", "b", "rolled_back", None, reboot=True)
    assert device.checks_run == MAX_TRIAL_BOOTS  # not run again
    assert device.reboots == [["reboot"]]
    # bootloader: b is out of the order with no attempts left; GRUB boots a again
    env = device.env()
    assert grub.boot_order(env) == ["a"] and grub.attempts_in(env, "b") == 0, env
    assert grub.trial_in(env) is None and grub.primary_in(env) == "a"
    assert device.backend.primary() == "a" and device.backend.attempts_left("b") == 0
    state = device.store.load().state
    assert state.slot("b").status == "bad" and state.slot("a").status == "good"
    assert state.installed_security_version == 0  # nothing was committed
    started = [e for e in device.log.events if e["event"] == "boot_check.started"]
    assert started[-1]["situation"] == "trial_loop"
    done = device.log.events[-1]
    assert (done["event"], done["situation"]) == ("boot_check.rolled_back", "trial_loop")
    assert done["level"] == "error"


def test_the_last_allowed_trial_boot_still_runs_the_checks(device: Device) -> None:
    """One boot short of the loop limit the trial is judged as usual, and committed."""
    for _ in range(MAX_TRIAL_BOOTS - 1):
        with pytest.raises(CheckDied):
            device.check(healthy=False)
    verdict = device.check()
    assert (verdict.situation, verdict.action, verdict.healthy) == ("trial", "committed", True)
    assert device.checks_run == MAX_TRIAL_BOOTS
    assert device.backend.primary() == "b" and not device.backend.is_trial()
    state = device.store.load().state
    assert state.slot("b").status == "good" and state.slot("b").trial_boots == 0
    assert state.installed_security_version == 2
    assert device.reboots == []


def test_a_trial_loop_commits_nothing_even_when_the_release_would_pass(device: Device) -> None:
    """At the limit the verdict does not depend on the checks: they are not asked."""
    device.store.save(
        device.store.load().state.with_slot("b", trial_boots=MAX_TRIAL_BOOTS)
    )  # fmt: skip
    verdict = device.check(healthy=True)
    assert (verdict.situation, verdict.action) == ("trial_loop", "rolled_back")
    assert device.checks_run == 0
    assert device.backend.primary() == "a" and device.backend.attempts_left("b") == 0
    assert device.store.load().state.slot("b").status == "bad"


# --- every row of the table, on GRUB -----------------------------------------------------------

SICK = CheckResult("app", "command", False, "exit status 3", 0.0)
SICK_TOO = CheckResult("disk", "disk", False, "92% full", 0.0)
FINE = CheckResult("net", "http", True, "200", 0.0)


def sick_report() -> HealthReport:
    return HealthReport(False, (SICK, FINE, SICK_TOO), 0.0)


def fine_report() -> HealthReport:
    return HealthReport(True, (FINE,), 0.0)


class Board:
    """A GRUB device on plain files with ``running`` booted and committed; the other slot as
    each test arranges it."""

    def __init__(self, root: Path, running: str = "a") -> None:
        self.running = running
        self.other = "b" if running == "a" else "a"
        self.grubenv = provision("grub", root / "esp", primary=running)["EFI/fleet/grubenv"]
        self.cmdline = root / "cmdline"
        self.backend = grub.GrubBackend(self.grubenv, self.cmdline)
        self.boot(running)
        self.store = StateStore(root / "data")
        self.log = EventLog(keep=True)
        self.reboots: list[Sequence[str]] = []
        self.checks_run = 0

    def boot(self, slot: str) -> None:
        self.cmdline.write_text(f"ro fleet.slot={slot}\n")

    def save(self, state: DeviceState) -> DeviceState:
        return self.store.save(state)

    def state(self) -> DeviceState:
        loaded = self.store.load()
        assert loaded.problem is None
        return loaded.state

    def env(self) -> dict[str, str]:
        return grubenv.read(self.grubenv).variables()

    def check(self, healthy: bool = True, **options: Any) -> BootVerdict:
        def checks() -> HealthReport:
            self.checks_run += 1
            return fine_report() if healthy else sick_report()

        checker = BootChecker(
            self.backend, self.store, self.log, checks, reboot=self.reboots.append, **options
        )
        return checker.run()

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.log.events if e["event"] == event]

    def started(self) -> dict[str, Any]:
        (started,) = self.named("boot_check.started")
        return started

    def finished(self) -> dict[str, Any]:
        return self.log.events[-1]


def committed(board: Board, **slot: Any) -> DeviceState:
    """The running slot good at 1.0.0 (plus ``slot``), the other empty."""
    return board.save(
        DeviceState(installed_security_version=1).with_slot(
            board.running, status="good", version="1.0.0", security_version=1, **slot
        )
    )


def assert_finished(
    board: Board, action: str, situation: str, *, level: str, reboot: bool, failed: list[str]
) -> None:
    done = board.finished()
    assert done["event"] == f"boot_check.{action}"
    assert done["level"] == level
    assert (done["slot"], done["situation"]) == (board.running, situation)
    assert done["reboot"] is reboot
    assert done["failed_checks"] == failed


def assert_check_failures_logged(board: Board) -> None:
    failed = board.named("health.check_failed")
    assert [(e["level"], e["check"], e["detail"]) for e in failed] == [
        ("warning", "app", "exit status 3"),
        ("warning", "disk", "92% full"),
    ]


@pytest.fixture(params=["a", "b"])
def board(request: pytest.FixtureRequest, tmp_path: Path) -> Board:
    return Board(tmp_path, running=request.param)


def test_safe_mode_is_reported_without_checks_or_changes(tmp_path: Path) -> None:
    board = Board(tmp_path)
    committed(board)
    board.backend.mark_bad("a")  # a failed too often; GRUB booted the safe-mode slot
    board.boot("safe")
    env_before, state_before = board.env(), board.state()

    verdict = board.check(healthy=False)

    assert verdict == BootVerdict("safe_mode", "safe", "reported", None, reboot=False)
    assert board.checks_run == 0 and board.reboots == []
    assert board.env() == env_before and board.state() == state_before  # nothing saved
    started = board.started()
    assert (started["slot"], started["trial"], started["situation"]) == ("safe", False, "safe_mode")
    done = board.finished()
    assert (done["event"], done["level"], done["slot"]) == ("boot_check.reported", "info", "safe")
    assert (done["situation"], done["reboot"], done["failed_checks"]) == ("safe_mode", False, [])
    assert [e["event"] for e in board.log.events] == ["boot_check.started", "boot_check.reported"]


def test_a_healthy_normal_boot_is_confirmed(board: Board) -> None:
    """Confirm is commit: the slot's count is full again and its failure count starts over."""
    committed(board, failures=MAX_FAILURES - 1)
    board.backend.mark_bad(board.other)
    # GRUB took two of the slot's attempts on the way here
    grubenv.write(board.grubenv, grubenv.read(board.grubenv).set(grub.left_var(board.running), "1"))

    verdict = board.check()

    assert verdict == BootVerdict("normal", board.running, "confirmed", True, reboot=False)
    assert board.checks_run == 1 and board.reboots == []
    env = board.env()
    assert grub.primary_in(env) == board.running and grub.trial_in(env) is None
    assert grub.attempts_in(env, board.running) == board.backend.attempts == 3
    state = board.state()
    slot = state.slot(board.running)
    assert (slot.status, slot.failures, slot.trial_boots) == ("good", 0, 0)
    assert state.slot(board.other).status == "empty"
    assert state.installed_security_version == 1
    started = board.started()
    assert (started["slot"], started["trial"], started["situation"]) == (
        board.running, False, "normal",
    )  # fmt: skip
    assert_finished(board, "confirmed", "normal", level="info", reboot=False, failed=[])
    assert board.named("health.check_failed") == []


@pytest.mark.parametrize("before", range(MAX_FAILURES - 1))
def test_a_failing_normal_boot_is_counted_and_retried_below_the_limit(
    board: Board, before: int
) -> None:
    committed(board, failures=before)
    env_before = board.env()

    verdict = board.check(healthy=False)

    assert verdict == BootVerdict(
        "normal", board.running, "retrying", False, reboot=True, failed_checks=("app", "disk")
    )
    assert board.reboots == [["reboot"]]
    assert board.env() == env_before  # the firmware's count runs down on its own
    slot = board.state().slot(board.running)
    assert (slot.status, slot.failures) == ("good", before + 1)
    assert_check_failures_logged(board)
    assert_finished(board, "retrying", "normal", level="error", reboot=True, failed=["app", "disk"])


def test_a_normal_boot_failing_for_the_last_allowed_time_gives_the_slot_up(board: Board) -> None:
    committed(board, failures=MAX_FAILURES - 1)
    board.backend.try_once(board.other)  # the other slot holds an old release, still bootable
    board.backend.commit(board.running)

    verdict = board.check(healthy=False)

    assert verdict == BootVerdict(
        "normal", board.running, "gave_up", False, reboot=True, failed_checks=("app", "disk")
    )
    assert board.reboots == [["reboot"]]
    env = board.env()
    assert grub.boot_order(env) == [board.other] and grub.attempts_in(env, board.running) == 0
    assert grub.primary_in(env) == board.other
    slot = board.state().slot(board.running)
    assert (slot.status, slot.failures) == ("bad", MAX_FAILURES)
    assert_check_failures_logged(board)
    assert_finished(board, "gave_up", "normal", level="error", reboot=True, failed=["app", "disk"])


def test_the_custom_reboot_command_is_used(board: Board) -> None:
    committed(board)
    board.check(healthy=False, reboot_command=("systemctl", "reboot"))
    assert board.reboots == [["systemctl", "reboot"]]


def arm_trial(board: Board, *, security_version: int | None = 2) -> None:
    """Install into the other slot and arm its trial, as the installer leaves it."""
    board.backend.try_once(board.other)
    board.save(
        board.state().with_slot(
            board.other, status="trial", version="2.0.0", security_version=security_version
        )
    )


@pytest.mark.parametrize(
    ("floor", "security_version", "expected"),
    [(1, 2, 2), (2, 2, 2), (0, 3, 3), (0, None, 0), (1, 1, 1)],  # None: no security version
)
def test_a_healthy_trial_is_committed_and_raises_the_floor(
    board: Board, floor: int, security_version: int | None, expected: int
) -> None:
    committed(board)
    arm_trial(board, security_version=security_version)
    board.save(replace(board.state(), installed_security_version=floor))
    board.store.floor_path.write_text(f"{floor}\n")  # the scenario's floor, in both copies
    trial, old = board.other, board.running
    board.boot(trial)

    verdict = board.check()

    assert verdict == BootVerdict("trial", trial, "committed", True, reboot=False)
    assert board.reboots == []
    env = board.env()
    assert grub.primary_in(env) == trial and grub.trial_in(env) is None
    state = board.state()
    slot = state.slot(trial)
    assert (slot.status, slot.trial_boots, slot.failures) == ("good", 0, 0)
    assert state.installed_security_version == expected
    # the old release (security version 1) stays the fallback only while not below the floor
    if expected <= 1:
        assert grub.boot_order(env) == [trial, old] and state.slot(old).status == "good"
    else:
        assert grub.boot_order(env) == [trial] and state.slot(old).status == "bad"
    started = board.started()
    assert (started["slot"], started["trial"], started["situation"]) == (trial, True, "trial")
    done = board.finished()
    assert (done["event"], done["level"], done["slot"]) == ("boot_check.committed", "info", trial)
    assert (done["situation"], done["reboot"], done["failed_checks"]) == ("trial", False, [])


def test_a_failing_trial_is_rolled_back(board: Board) -> None:
    committed(board)
    arm_trial(board)
    trial, old = board.other, board.running
    board.boot(trial)

    verdict = board.check(healthy=False)

    assert verdict == BootVerdict(
        "trial", trial, "rolled_back", False, reboot=True, failed_checks=("app", "disk")
    )
    assert board.reboots == [["reboot"]]
    env = board.env()
    assert grub.boot_order(env) == [old] and grub.attempts_in(env, trial) == 0
    assert grub.trial_in(env) is None and grub.primary_in(env) == old
    state = board.state()
    assert state.slot(trial).status == "bad" and state.slot(trial).trial_boots == 1
    assert state.slot(old).status == "good" and state.installed_security_version == 1
    done = board.finished()
    assert (done["event"], done["level"], done["slot"]) == (
        "boot_check.rolled_back",
        "error",
        trial,
    )
    assert (done["situation"], done["reboot"]) == ("trial", True)
    assert done["failed_checks"] == ["app", "disk"]


def fall_back(board: Board) -> None:
    """The other slot's trial used up GRUB's attempts without a verdict; the old slot booted."""
    arm_trial(board)
    grubenv.write(board.grubenv, grubenv.read(board.grubenv).set(grub.left_var(board.other), "0"))


def test_a_fall_back_from_a_trial_gives_the_trial_up_and_confirms_the_old_slot(
    board: Board,
) -> None:
    committed(board, failures=MAX_FAILURES - 1)
    fall_back(board)

    verdict = board.check()

    assert verdict == BootVerdict("fell_back", board.running, "confirmed", True, reboot=False)
    assert board.reboots == [] and board.checks_run == 1
    env = board.env()
    assert grub.boot_order(env) == [board.running] and grub.trial_in(env) is None
    assert grub.attempts_in(env, board.other) == 0 and grub.primary_in(env) == board.running
    assert grub.attempts_in(env, board.running) == 3
    state = board.state()
    assert state.slot(board.other).status == "bad"
    running = state.slot(board.running)
    assert (running.status, running.failures) == ("good", 0)
    assert state.installed_security_version == 1  # the trial was never committed
    assert board.started()["situation"] == "fell_back"
    (fell,) = board.named("boot_check.fell_back")
    assert (fell["level"], fell["slot"], fell["running"]) == ("error", board.other, board.running)
    assert_finished(board, "confirmed", "fell_back", level="info", reboot=False, failed=[])


@pytest.mark.parametrize(
    ("before", "action"), [(MAX_FAILURES - 2, "retrying"), (MAX_FAILURES - 1, "gave_up")]
)
def test_a_fall_back_onto_a_failing_slot_counts_its_failure(
    board: Board, before: int, action: str
) -> None:
    committed(board, failures=before)
    fall_back(board)

    verdict = board.check(healthy=False)

    assert verdict == BootVerdict(
        "fell_back", board.running, action, False, reboot=True, failed_checks=("app", "disk")
    )
    assert board.reboots == [["reboot"]]
    state = board.state()
    assert state.slot(board.other).status == "bad"
    running = state.slot(board.running)
    assert running.failures == before + 1
    assert running.status == ("bad" if action == "gave_up" else "good")
    env = board.env()
    assert grub.attempts_in(env, board.other) == 0 and board.other not in grub.boot_order(env)
    assert (board.running in grub.boot_order(env)) is (action == "retrying")
    assert_check_failures_logged(board)
    assert_finished(board, action, "fell_back", level="error", reboot=True, failed=["app", "disk"])


@pytest.mark.parametrize("status", ["installing", "installed"])
def test_an_interrupted_install_gives_its_slot_up_and_confirms_the_running_one(
    board: Board, status: str
) -> None:
    committed(board, failures=1)
    board.backend.try_once(board.other)  # an older release, then the install began
    board.backend.commit(board.running)
    board.save(board.state().with_slot(board.other, status=status, version="2.0.0"))

    verdict = board.check()

    assert verdict == BootVerdict("interrupted", board.running, "confirmed", True, reboot=False)
    assert board.reboots == [] and board.checks_run == 1
    env = board.env()
    assert grub.boot_order(env) == [board.running] and grub.attempts_in(env, board.other) == 0
    state = board.state()
    assert state.slot(board.other).status == "bad"
    assert (state.slot(board.running).status, state.slot(board.running).failures) == ("good", 0)
    assert board.started()["situation"] == "interrupted"
    (interrupted,) = board.named("boot_check.install_interrupted")
    assert (interrupted["level"], interrupted["slot"]) == ("warning", board.other)
    assert board.named("boot_check.fell_back") == []
    assert_finished(board, "confirmed", "interrupted", level="info", reboot=False, failed=[])


@pytest.mark.parametrize(
    ("before", "action"), [(MAX_FAILURES - 2, "retrying"), (MAX_FAILURES - 1, "gave_up")]
)
def test_an_interrupted_install_on_a_failing_slot_counts_its_failure(
    board: Board, before: int, action: str
) -> None:
    committed(board, failures=before)
    board.save(board.state().with_slot(board.other, status="installing"))

    verdict = board.check(healthy=False)

    assert verdict == BootVerdict(
        "interrupted", board.running, action, False, reboot=True, failed_checks=("app", "disk")
    )
    assert board.reboots == [["reboot"]]
    state = board.state()
    assert state.slot(board.other).status == "bad"
    assert state.slot(board.running).failures == before + 1
    assert state.slot(board.running).status == ("bad" if action == "gave_up" else "good")
    assert_finished(
        board, action, "interrupted", level="error", reboot=True, failed=["app", "disk"]
    )


@pytest.mark.parametrize("status", ["empty", "good", "bad"])
def test_the_other_slot_at_rest_leaves_a_normal_boot(board: Board, status: str) -> None:
    committed(board)
    board.save(board.state().with_slot(board.other, status=status))
    verdict = board.check()
    assert (verdict.situation, verdict.action) == ("normal", "confirmed")
    assert board.state().slot(board.other).status == status
    assert board.named("boot_check.install_interrupted") == []


def test_a_damaged_state_store_is_logged_and_the_boot_check_goes_on(board: Board) -> None:
    committed(board)
    board.store.path.write_text("{not json")

    verdict = board.check()

    assert verdict == BootVerdict("normal", board.running, "confirmed", True, reboot=False)
    first = board.log.events[0]
    assert (first["event"], first["level"]) == ("state.damaged", "warning")
    assert str(board.store.path) in first["detail"] and "damaged" in first["detail"]
    assert board.store.path.with_name("state.json.damaged").read_text() == "{not json"
    slot = board.state().slot(board.running)  # started afresh: the running slot is confirmed
    assert (slot.status, slot.failures) == ("good", 0)


def test_an_intact_state_store_logs_no_damage(board: Board) -> None:
    committed(board)
    board.check()
    assert board.named("state.damaged") == []
    assert board.log.events[0]["event"] == "boot_check.started"


# --- fall-backs on firmware with one boot per trial (Raspberry Pi tryboot) ---------------------

TRYBOOT = ["reboot", "0 tryboot"]


class Pi:
    """A Raspberry Pi with slot a committed, the EEPROM bootloader model starting it."""

    def __init__(self, root: Path) -> None:
        autoboot_txt = root / "p1" / "autoboot.txt"
        provision("tryboot", autoboot_txt.parent)
        self.linux = root / "root"
        self.firmware = TrybootFirmware(autoboot_txt)
        self.backend = TrybootBackend(
            TrybootConfig(
                autoboot_txt=autoboot_txt,
                device_tree=self.linux / "proc" / "device-tree",
                state_dir=root / "data" / "boot",
                boot_id=self.linux / BOOT_ID,
                attempts=3,
            )
        )
        self.store = StateStore(root / "data")
        self.store.save(
            DeviceState(installed_security_version=1).with_slot(
                "a", status="good", version="1.0.0", security_version=1
            )
        )
        self.log = EventLog(keep=True)
        self.reboots: list[Sequence[str]] = []
        self.boot(BootCause.POWER_ON)

    def boot(self, cause: BootCause, command: Sequence[str] = ()) -> str:
        outcome = self.firmware.boot(BootEvent(cause, tuple(command)))
        for relative, data in outcome.linux_view.items():
            path = self.linux / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return outcome.slot

    def reboot(self) -> str:
        """Carry out the reboot the boot check asked for."""
        command = self.reboots.pop()
        assert self.reboots == []
        return self.boot(BootCause.REBOOT, command)

    def install_b(self) -> None:
        self.backend.mark_bad("b")
        self.backend.try_once("b")
        state = self.store.load().state
        self.store.save(state.with_slot("b", status="trial", version="2.0.0", security_version=2))

    def check(self, report: Callable[[], HealthReport] = fine_report) -> BootVerdict:
        self.log = EventLog(keep=True)
        return BootChecker(
            self.backend, self.store, self.log, report, reboot=self.reboots.append
        ).run()

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.log.events if e["event"] == event]


def dies() -> HealthReport:
    raise CheckDied


@pytest.fixture
def pi(tmp_path: Path) -> Pi:
    return Pi(tmp_path)


def test_a_trial_that_never_started_is_rearmed_and_the_old_slot_confirmed(pi: Pi) -> None:
    pi.install_b()
    assert pi.boot(BootCause.POWER_ON) == "a"  # the power went before the trial reboot

    verdict = pi.check()

    assert verdict == BootVerdict("fell_back", "a", "rearmed", True, reboot=True)
    assert pi.reboots == [TRYBOOT]  # into the trial again
    assert pi.backend.attempts_left("b") == 2 and pi.backend.primary() == "a"
    state = pi.store.load().state
    assert state.slot("b").status == "trial"  # not given up: it is tried again
    assert (state.slot("a").status, state.slot("a").failures) == ("good", 0)
    (started,) = pi.named("boot_check.started")
    assert (started["slot"], started["trial"], started["situation"]) == ("a", False, "fell_back")
    (why,) = pi.named("boot_check.trial_never_started")
    assert (why["level"], why["slot"], why["running"]) == ("error", "b", "a")
    assert why["result"] == "never-started"
    (rearmed,) = pi.named("boot_check.trial_rearmed")
    assert rearmed["slot"] == "b"
    assert pi.named("boot_check.trial_died") == pi.named("boot_check.fell_back") == []
    done = pi.log.events[-1]
    assert (done["event"], done["level"], done["slot"]) == ("boot_check.rearmed", "info", "a")
    assert (done["situation"], done["reboot"], done["failed_checks"]) == ("fell_back", True, [])

    assert pi.reboot() == "b"  # the re-armed trial is booted, and passes
    verdict = pi.check()
    assert verdict == BootVerdict("trial", "b", "committed", True, reboot=False)
    assert pi.backend.primary() == "b"
    assert pi.store.load().state.installed_security_version == 2


def test_a_trial_that_keeps_dying_is_rearmed_until_its_attempts_are_used_up(pi: Pi) -> None:
    pi.install_b()
    pi.reboots.append(pi.backend.reboot_command())
    for left in (2, 1, 0):
        assert pi.reboot() == "b"
        with pytest.raises(CheckDied):
            pi.check(dies)  # the boot check marks the trial started before the checks
        assert pi.boot(BootCause.RESET) == "a"  # the watchdog resets the board

        verdict = pi.check()

        (died,) = pi.named("boot_check.trial_died")
        assert (died["level"], died["slot"], died["running"]) == ("error", "b", "a")
        assert died["result"] == "started-and-died"
        assert pi.named("boot_check.trial_never_started") == []
        assert pi.backend.attempts_left("b") == left
        state = pi.store.load().state
        if left:
            assert verdict == BootVerdict("fell_back", "a", "rearmed", True, reboot=True)
            assert pi.reboots == [TRYBOOT]
            assert state.slot("b").status == "trial"
            assert len(pi.named("boot_check.trial_rearmed")) == 1
        else:
            assert verdict == BootVerdict("fell_back", "a", "confirmed", True, reboot=False)
            assert pi.reboots == []
            assert state.slot("b").status == "bad"
            assert pi.named("boot_check.trial_rearmed") == []
        assert (state.slot("a").status, state.slot("a").failures) == ("good", 0)
    assert pi.backend.primary() == "a"
    assert pi.backend.reboot_command() == ["reboot"]


def test_a_rearm_onto_a_failing_old_slot_counts_its_failure_and_reboots(pi: Pi) -> None:
    pi.install_b()
    pi.boot(BootCause.POWER_ON)

    verdict = pi.check(sick_report)

    assert verdict == BootVerdict(
        "fell_back", "a", "rearmed", False, reboot=True, failed_checks=("app", "disk")
    )
    assert pi.reboots == [TRYBOOT]
    state = pi.store.load().state
    assert (state.slot("a").status, state.slot("a").failures) == ("good", 1)
    assert state.slot("b").status == "trial"
    done = pi.log.events[-1]
    assert (done["event"], done["level"]) == ("boot_check.rearmed", "error")
    assert done["failed_checks"] == ["app", "disk"]


class ScriptedRetry(grub.GrubBackend):
    """GRUB with a scripted :class:`TrialRetry` answer, for results no real firmware gives
    after a fall-back."""

    def __init__(self, grubenv_path: Path, cmdline: Path, result: TrialResult, rearm: bool):
        super().__init__(grubenv_path, cmdline)
        self.result, self.rearm_answer = result, rearm
        self.started: list[str] = []

    def mark_trial_started(self) -> bool:
        self.started.append(self.booted())
        return True

    def last_trial_result(self) -> TrialResult:
        return self.result

    def rearm(self) -> bool:
        return self.rearm_answer


@pytest.mark.parametrize("rearm", [True, False])
def test_an_unexplained_fall_back_is_reported_as_such(board: Board, rearm: bool) -> None:
    board.backend = ScriptedRetry(board.grubenv, board.cmdline, TrialResult.REJECTED, rearm)
    committed(board)
    fall_back(board)

    verdict = board.check()

    action = "rearmed" if rearm else "confirmed"
    assert verdict == BootVerdict("fell_back", board.running, action, True, reboot=rearm)
    (fell,) = board.named("boot_check.fell_back")
    assert (fell["level"], fell["slot"], fell["running"]) == ("error", board.other, board.running)
    assert fell["result"] == "rejected"
    assert board.backend.started == []  # no trial boot, nothing marked
    assert board.state().slot(board.other).status == ("trial" if rearm else "bad")
    assert len(board.named("boot_check.trial_rearmed")) == int(rearm)


def test_a_trial_boot_is_marked_started_only_on_a_trial(board: Board) -> None:
    backend = ScriptedRetry(board.grubenv, board.cmdline, TrialResult.RUNNING, False)
    board.backend = backend
    committed(board)
    board.check()
    assert backend.started == []
    arm_trial(board)
    board.boot(board.other)
    board.check()
    assert backend.started == [board.other]


# --- disowned: a slot the state store does not vouch for is never confirmed ---------------


@pytest.mark.parametrize(
    ("status", "security_version", "trial"),
    [
        ("bad", 1, False),  # marked bad, yet booted: the boot environment was lost or reset
        ("installing", 1, False),  # half written
        ("good", 0, False),  # a fall-back into a release below one committed since
        ("trial", 0, True),  # a trial below the floor
    ],
)
def test_a_disowned_slot_is_given_up_without_checks(
    board: Board, status: str, security_version: int | None, trial: bool
) -> None:
    state = committed(board)
    state = board.save(
        state.with_slot(board.running, status=status, security_version=security_version)
    )
    board.backend.repair(board.other)  # the other slot: committed, the way out
    board.save(board.state().with_slot(board.other, status="good", security_version=1))
    if trial:
        board.backend.try_once(board.running)
    board.boot(board.running)

    verdict = board.check(healthy=True)

    assert verdict == BootVerdict("disowned", board.running, "rolled_back", None, reboot=True)
    assert board.checks_run == 0 and board.reboots == [["reboot"]]
    env = board.env()
    assert grub.attempts_in(env, board.running) == 0 and grub.primary_in(env) == board.other
    after = board.state()
    assert after.slot(board.running).status == "bad"
    assert after.installed_security_version == 1  # the floor never moves down
    (disowned,) = board.named("boot_check.disowned")
    assert disowned["level"] == "error" and disowned["floor"] == 1
    assert disowned["slot"] == board.running
    assert disowned["reason"].startswith(f"slot {board.running} ")
    assert (disowned["status"], disowned["security_version"]) == (status, security_version)
    assert_finished(board, "rolled_back", "disowned", level="error", reboot=True, failed=[])


@pytest.mark.parametrize("lose", ["deleted", "garbled"])
def test_a_lost_state_store_keeps_the_running_release_running(board: Board, lose: str) -> None:
    # the store knows nothing of the running slot any more, but the floor is kept beside it:
    # the firmware's word decides the running slot, boot after boot; the other slot, whose
    # release nobody knows now, is no fallback
    committed(board)
    board.backend.try_once(board.other)
    board.backend.commit(board.running)  # the other slot bootable behind it
    if lose == "deleted":
        board.store.path.unlink()
    else:
        board.store.path.write_bytes(b"\x00garbled")
    for _ in range(3):
        board.boot(board.running)
        verdict = board.check()
        assert (verdict.action, verdict.reboot) == ("confirmed", False), verdict
    state = board.store.load().state
    assert state.installed_security_version == 1
    assert state.slot(board.running).status == "good"
    assert state.slot(board.running).security_version is None
    assert state.slot(board.other).status == "bad"
    env = board.env()
    assert grub.primary_in(env) == board.running
    assert grub.boot_order(env) == [board.running]  # the unknown other slot withdrawn


def test_a_fall_back_below_the_floor_ends_in_safe_mode_not_in_the_old_release(
    board: Board,
) -> None:
    # 3.0.0 (security version 2) committed in the other slot and given up after failing:
    # the firmware falls back to 2.0.0 (security version 1), which the floor of 2 disowns.
    board.save(
        DeviceState(installed_security_version=2)
        .with_slot(board.running, status="good", version="2.0.0", security_version=1)
        .with_slot(board.other, status="bad", version="3.0.0", security_version=2)
    )
    board.backend.mark_bad(board.other)

    verdict = board.check(healthy=True)

    assert (verdict.situation, verdict.action, verdict.reboot) == ("disowned", "rolled_back", True)
    assert grub.primary_in(board.env()) is None  # no root slot left: GRUB boots safe mode
    assert {s.status for s in board.state().slots.values()} == {"bad"}


# --- a lost boot state: rebuilt from the store before anything else --------------------------


def test_safe_mode_caused_by_a_lost_grubenv_is_repaired_and_left(tmp_path: Path) -> None:
    board = Board(tmp_path)
    board.save(committed(board).with_slot("b", status="good", version="0.9.0", security_version=1))
    board.grubenv.unlink()  # GRUB boots the safe-mode slot without it
    board.boot("safe")

    verdict = board.check(healthy=False)

    assert verdict == BootVerdict("safe_mode", "safe", "repaired", None, reboot=True)
    assert board.reboots == [["reboot"]] and board.checks_run == 0
    env = board.env()
    assert grub.primary_in(env) == "a" and grub.boot_order(env) == ["a", "b"]
    assert grub.attempts_in(env, "b") == 3  # the other good slot is the fallback again
    (repaired,) = board.named("boot_state.repaired")
    assert (repaired["primary"], repaired["fallback"]) == ("a", "b")
    assert repaired["level"] == "warning" and repaired["reason"].endswith("grubenv is missing")
    assert board.finished()["event"] == "boot_check.repaired"


def test_a_repair_that_names_no_root_slot_stays_in_safe_mode(tmp_path: Path) -> None:
    board = Board(tmp_path)
    board.save(DeviceState().with_slot("a", status="bad").with_slot("b", status="bad"))
    board.grubenv.unlink()
    board.boot("safe")

    verdict = board.check()

    assert verdict == BootVerdict("safe_mode", "safe", "reported", None, reboot=False)
    assert board.reboots == [] and grub.primary_in(board.env()) is None
    (repaired,) = board.named("boot_state.repaired")
    assert (repaired["primary"], repaired["fallback"]) == (None, None)


def test_a_root_slot_running_on_a_lost_boot_state_is_judged_after_the_repair(
    tmp_path: Path,
) -> None:
    board = Board(tmp_path)
    committed(board)
    board.grubenv.write_bytes(b"\0" * 1024)  # damaged under the running system

    verdict = board.check()

    assert verdict == BootVerdict("normal", "a", "confirmed", True, reboot=False)
    assert board.reboots == [] and grub.primary_in(board.env()) == "a"
    assert [e["event"] for e in board.log.events][:2] == [
        "boot_state.repaired",
        "boot_check.started",
    ]
