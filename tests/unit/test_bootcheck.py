"""The boot check's trial rows on plain files: GRUB's grubenv and kernel command line, the state
store. A trial whose boot check keeps dying is a reboot loop: after ``MAX_TRIAL_BOOTS`` it is
given up without running the checks again."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from bootloader_hooks import grub, grubenv
from updater.bootcheck import MAX_TRIAL_BOOTS, BootChecker, BootVerdict
from updater.health import CheckResult, HealthReport
from updater.log import EventLog
from updater.state import DeviceState, StateStore


class CheckDied(Exception):
    """The health checks never returned (the process was killed, the board reset)."""


class Device:
    """Slot a committed with 1.0.0; 2.0.0 in slot b armed for a trial and booted."""

    def __init__(self, root: Path) -> None:
        self.grubenv = root / "grubenv"
        self.cmdline = root / "cmdline"
        self.cmdline.write_text("ro fleet.slot=a\n")
        self.backend = grub.GrubBackend(self.grubenv, self.cmdline)
        self.backend.repair("a")
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
