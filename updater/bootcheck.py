"""The boot check: after every boot, decide whether the running slot is kept.

Runs once per boot (``fleet-boot-check.service``) before anything else of ours. It does its
work and names the situation; a table picks the verdict (Mender's state machine, ten rows
rather than a call graph):

Situations:

- ``safe_mode``: the firmware booted the safe-mode slot. No checks; report. When the boot
  state was lost (the reason the firmware booted safe mode) and its repair names a root slot,
  reboot into that slot.
- ``trial``: a slot we installed is on its trial boot. Run the checks: pass → commit;
  fail → mark it bad and reboot into the old slot.
- ``trial_loop``: the same trial came back ``MAX_TRIAL_BOOTS`` times without a verdict (the
  check itself keeps dying): mark it bad and reboot, without running the checks again.
- ``fell_back``: a trial was armed but the firmware booted the old slot: mark the trial slot
  bad, then handle the running slot as ``normal``. Firmware that gives a trial a single boot
  (tryboot, see ``TrialRetry``) first reports whether the trial never started or started and
  died, and re-arms it while attempts remain (``rearmed``: confirm this slot, reboot into the
  trial).
- ``interrupted``: an install into the other slot never reached its trial (power cut, crash):
  mark that slot bad (a new install rewrites it), then handle the running slot as ``normal``.
- ``normal``: a committed slot. Run the checks: pass → confirm; fail → count the failure and
  reboot (so the firmware's attempt counters run down); after ``MAX_FAILURES`` consecutive
  failures mark the slot bad, so the firmware boots the other slot, or safe mode.
- ``disowned``: the firmware booted a slot the state store does not vouch for: marked bad, half
  written, or holding a release below the anti-rollback floor (a lost or reset boot
  environment, or a fall-back into a release older than one committed since). No checks, never
  confirmed: mark it bad again and reboot; the firmware boots the other slot, or safe mode,
  which recovers the assigned release. A device never runs a release below the floor.

*Commit* and *confirm* are the same bootloader call, ``commit(booted)``: it makes the slot
primary and resets its attempts, so a committed slot that later stops booting falls back too.
Persist before acting: the attempt about to be judged (``trial_boots``, ``failures``) is saved
before the checks run. A verdict then changes the bootloader first and the state store second:
a power cut between the two leaves the bootloader's decision in force, and the next boot check
finds a situation (``normal`` or ``fell_back``) that brings the state store in line.
A damaged or missing boot state is rebuilt from the state store first (``repair_boot_state``):
never from defaults, which could make a slot given up bootable again. Never commit from the
safe-mode slot, and never commit a slot the firmware did not boot. Every
slot change is a verb of :mod:`updater.lifecycle`, which checks these rules again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from bootloader_hooks.base import SAFE_SLOT, BootSelector, TrialRetry
from updater.device import run_reboot
from updater.lifecycle import SlotLifecycle, unvouched
from updater.log import EventSink
from updater.state import DeviceState, StateStore

MAX_TRIAL_BOOTS = 3  # a trial that keeps coming back without a verdict is a reboot loop
MAX_FAILURES = 3  # consecutive failed boots of a committed slot before it is given up


class CheckResultView(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def ok(self) -> bool: ...
    @property
    def detail(self) -> str: ...


class HealthReportView(Protocol):
    @property
    def ok(self) -> bool: ...
    @property
    def results(self) -> Sequence[CheckResultView]: ...


@dataclass(frozen=True)
class BootVerdict:
    """What the boot check found and did."""

    situation: str
    slot: str
    action: str  # committed, confirmed, rolled_back, retrying, gave_up, reported
    healthy: bool | None  # None when no checks ran
    reboot: bool
    failed_checks: tuple[str, ...] = ()  # names of the health checks that failed


def _classify(booted: str, trial: bool, state: DeviceState) -> str:
    if booted == SAFE_SLOT:
        return "safe_mode"
    if unvouched(state, booted) is not None:
        return "disowned"
    slot_state = state.slot(booted)
    if trial:
        return "trial_loop" if slot_state.trial_boots >= MAX_TRIAL_BOOTS else "trial"
    other = state.slot("b" if booted == "a" else "a")
    if other.status == "trial":
        return "fell_back"
    if other.status in ("installing", "installed"):
        return "interrupted"
    return "normal"


class BootChecker:
    """Runs the boot check; see the module docstring for the table."""

    def __init__(
        self,
        backend: BootSelector,
        store: StateStore,
        log: EventSink,
        run_checks: Callable[[], HealthReportView],
        *,
        reboot: Callable[[Sequence[str]], None] | None = None,
        reboot_command: Sequence[str] | None = None,
    ) -> None:
        self.backend = backend
        self.store = store
        self.log = log
        self._run_checks = run_checks
        self._reboot = reboot or run_reboot
        self._reboot_command = reboot_command
        self.lifecycle = SlotLifecycle(backend, store, log)

    def run(self) -> BootVerdict:
        loaded = self.store.load()
        if loaded.problem:
            self.log.event("state.damaged", level="warning", detail=loaded.problem)
        state = loaded.state
        booted = self.backend.booted()
        repaired_primary: str | None = None
        problem = self.lifecycle.boot_state_problem()
        if problem is not None:
            repaired_primary, _ = self.lifecycle.repair_boot_state(state, problem)
        trial = booted != SAFE_SLOT and self.backend.is_trial()
        if trial and isinstance(self.backend, TrialRetry):
            self.backend.mark_trial_started()
        situation = _classify(booted, trial, state)
        self.log.event("boot_check.started", slot=booted, trial=trial, situation=situation)
        handler = {
            "safe_mode": self._safe_mode,
            "trial": self._trial,
            "trial_loop": self._trial_loop,
            "fell_back": self._fell_back,
            "interrupted": self._interrupted,
            "normal": self._normal,
            "disowned": self._disowned,
        }[situation]
        verdict = handler(state, booted)
        if situation == "safe_mode" and repaired_primary is not None:
            # safe mode only because the boot state was lost: boot the slot it names now
            verdict = replace(verdict, action="repaired", reboot=True)
        # a slot given up is an error even when no check ran (a trial loop, a disowned slot)
        failed = verdict.healthy is False or verdict.action == "rolled_back"
        self.log.event(
            f"boot_check.{verdict.action}",
            level="error" if failed else "info",
            slot=booted, situation=situation, reboot=verdict.reboot,
            failed_checks=list(verdict.failed_checks),
        )  # fmt: skip
        if verdict.reboot:
            self._reboot(list(self._reboot_command or self.backend.reboot_command()))
        return verdict

    # --- one method per row ---------------------------------------------------------------

    def _checks(self) -> tuple[bool, tuple[str, ...]]:
        """Run the health checks; log each failure; return the verdict and the failed names."""
        report = self._run_checks()
        failed = tuple(r for r in report.results if not r.ok)
        for result in failed:
            self.log.event("health.check_failed", level="warning", check=result.name,
                           detail=result.detail)  # fmt: skip
        return report.ok, tuple(r.name for r in failed)

    def _safe_mode(self, state: DeviceState, booted: str) -> BootVerdict:
        return BootVerdict("safe_mode", booted, "reported", None, reboot=False)

    def _trial(self, state: DeviceState, booted: str) -> BootVerdict:
        state = self.lifecycle.count_trial_boot(state, booted)
        ok, failed = self._checks()
        if ok:
            return self._commit(state, booted, "trial", "committed")
        self._give_up(state, booted)
        return BootVerdict("trial", booted, "rolled_back", False, reboot=True, failed_checks=failed)

    def _trial_loop(self, state: DeviceState, booted: str) -> BootVerdict:
        self._give_up(state, booted)
        return BootVerdict("trial_loop", booted, "rolled_back", None, reboot=True)

    def _fell_back(self, state: DeviceState, booted: str) -> BootVerdict:
        other = "b" if booted == "a" else "a"
        if isinstance(self.backend, TrialRetry):
            return self._retry_trial(self.backend, state, booted, other)
        self.log.event("boot_check.fell_back", level="error", slot=other, running=booted)
        state = self._give_up(state, other)
        return self._normal(state, booted, situation="fell_back")

    def _retry_trial(
        self, backend: TrialRetry, state: DeviceState, booted: str, other: str
    ) -> BootVerdict:
        """A firmware with one try per trial: tell why it fell back, and try again while
        attempts remain (the backend counts them)."""
        result = backend.last_trial_result().value
        event = {
            "never-started": "boot_check.trial_never_started",
            "started-and-died": "boot_check.trial_died",
        }.get(str(result), "boot_check.fell_back")
        self.log.event(event, level="error", slot=other, running=booted, result=result)
        if not backend.rearm():
            state = self._give_up(state, other)
            return self._normal(state, booted, situation="fell_back")
        self.log.event("boot_check.trial_rearmed", slot=other)
        verdict = self._normal(state, booted, situation="fell_back")
        return replace(verdict, action="rearmed", reboot=True)

    def _interrupted(self, state: DeviceState, booted: str) -> BootVerdict:
        other = "b" if booted == "a" else "a"
        self.log.event("boot_check.install_interrupted", level="warning", slot=other)
        state = self._give_up(state, other)
        return self._normal(state, booted, situation="interrupted")

    def _normal(self, state: DeviceState, booted: str, situation: str = "normal") -> BootVerdict:
        state = self.lifecycle.count_failure(state, booted)
        ok, failed = self._checks()
        if ok:
            return self._commit(state, booted, situation, "confirmed")
        if state.slot(booted).failures >= MAX_FAILURES:
            self._give_up(state, booted)
            return BootVerdict(
                situation, booted, "gave_up", False, reboot=True, failed_checks=failed
            )
        return BootVerdict(situation, booted, "retrying", False, reboot=True, failed_checks=failed)

    # --- verdicts: bootloader first, then the state store ---------------------------------

    def _disowned(self, state: DeviceState, booted: str) -> BootVerdict:
        slot = state.slot(booted)
        self.log.event(
            "boot_check.disowned", level="error", slot=booted, status=slot.status,
            security_version=slot.security_version, floor=state.installed_security_version,
            reason=unvouched(state, booted),
        )  # fmt: skip
        self._give_up(state, booted)
        return BootVerdict("disowned", booted, "rolled_back", None, reboot=True)

    def _give_up(self, state: DeviceState, slot: str) -> DeviceState:
        # the firmware's own fallback (the other slot, else safe mode) is the way out here
        return self.lifecycle.mark_bad(state, slot, force=True)

    def _commit(self, state: DeviceState, booted: str, situation: str, action: str) -> BootVerdict:
        self.lifecycle.commit(state, booted)
        return BootVerdict(situation, booted, action, True, reboot=False)
