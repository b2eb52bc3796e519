"""The slot lifecycle: the one place that changes a root slot's status, the boot selection
and the anti-rollback floor.

A slot's status (:class:`SlotStatus`) moves only through the verbs of :class:`SlotLifecycle`;
the install, the boot check, recovery, the daemon and the command line call them and write no
slot status of their own. Each verb checks its invariants before anything is written, then
changes the bootloader and the state store in the order the table says, so that a power cut
between the two never lets the firmware boot a slot the store does not vouch for:

- never write the booted slot, nor arm, commit or confirm a slot the store marks bad or whose
  security version is below the floor (the highest security version ever committed);
- never leave the device without a root slot to boot, unless asked to (``force``: the firmware
  then boots the safe-mode slot);
- the floor rises in one place, :meth:`SlotLifecycle.commit` (and a recovery's repair, which
  commits through it).

:data:`TRANSITIONS` is the table; :func:`transition_table` renders it for the docs
(docs/slot-lifecycle.md, which a test keeps equal to it).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from bootloader_hooks.base import ROOT_SLOTS, SAFE_SLOT, BootSelector, Repairable, other_slot
from bootloader_hooks.errors import BootStateCorruptError
from updater.errors import SlotStateError
from updater.log import EventSink
from updater.state import DeviceState, StateStore


class SlotStatus(enum.StrEnum):
    """What a root slot holds, as the state store records it (RAUC's "unsafe until proven")."""

    EMPTY = "empty"  # nothing installed by us (or not known)
    INSTALLING = "installing"  # being written; bad in the bootloader from before the first byte
    INSTALLED = "installed"  # every byte written and verified; not armed
    TRIAL = "trial"  # armed for a trial boot (or booted in one), not committed
    GOOD = "good"  # committed: booted healthy at least once
    BAD = "bad"  # never booted again until rewritten


class Verb(enum.StrEnum):
    BEGIN_INSTALL = "begin install"
    ARM_TRIAL = "arm trial"
    COMMIT = "commit"
    MARK_BAD = "mark bad"
    FAIL_INSTALL = "fail install"
    REPAIR_INTO = "repair into"


@dataclass(frozen=True)
class Transition:
    """``next``: the status after; ``bootloader``: the backend call; ``order``: which of the
    two is persisted first (the bootloader, or the state store)."""

    next: SlotStatus
    bootloader: str
    order: str


_BOOTLOADER_FIRST = "bootloader, then state store"
_STORE_FIRST = "state store (installed), bootloader, state store"
_STORE_ONLY = "state store (the bootloader has it bad already)"
_ANY = tuple(SlotStatus)
_NOT_BAD = tuple(s for s in SlotStatus if s is not SlotStatus.BAD)

TRANSITIONS: Mapping[tuple[SlotStatus, Verb], Transition] = {
    **{
        (status, Verb.BEGIN_INSTALL): Transition(
            SlotStatus.INSTALLING, "mark_bad", _BOOTLOADER_FIRST
        )
        for status in _ANY
    },
    **{
        (status, Verb.ARM_TRIAL): Transition(SlotStatus.TRIAL, "try_once", _STORE_FIRST)
        for status in (SlotStatus.INSTALLING, SlotStatus.INSTALLED, SlotStatus.GOOD)
    },
    **{
        (status, Verb.COMMIT): Transition(SlotStatus.GOOD, "commit", _BOOTLOADER_FIRST)
        for status in _NOT_BAD
    },
    **{
        (status, Verb.MARK_BAD): Transition(SlotStatus.BAD, "mark_bad", _BOOTLOADER_FIRST)
        for status in _ANY
    },
    (SlotStatus.INSTALLING, Verb.FAIL_INSTALL): Transition(SlotStatus.BAD, "-", _STORE_ONLY),
    (SlotStatus.INSTALLED, Verb.FAIL_INSTALL): Transition(
        SlotStatus.BAD, "mark_bad", _BOOTLOADER_FIRST
    ),
    **{
        (status, Verb.REPAIR_INTO): Transition(SlotStatus.GOOD, "repair", _STORE_FIRST)
        for status in (SlotStatus.INSTALLING, SlotStatus.INSTALLED)
    },
}


def transition_table() -> str:
    """:data:`TRANSITIONS` as a Markdown table, one row per verb and status it accepts."""
    rows = [
        "| verb | from | to | bootloader | persisted |",
        "|---|---|---|---|---|",
    ]
    for verb in Verb:
        for status in SlotStatus:
            step = TRANSITIONS.get((status, verb))
            if step is not None:
                rows.append(
                    f"| {verb} | {status} | {step.next} | {step.bootloader} | {step.order} |"
                )
    return "\n".join(rows) + "\n"


def status_of(state: DeviceState, slot: str) -> SlotStatus:
    return SlotStatus(state.slot(slot).status)


def unvouched(state: DeviceState, slot: str) -> str | None:
    """Why the store does not vouch for running ``slot`` (``None``: it does): marked bad, half
    written, or a release below the anti-rollback floor. Such a slot is never committed.

    A slot whose release the store does not know (no security version recorded: a factory
    device, a state store lost) is judged by the firmware's word alone, as before any install;
    the floor, kept even when the store is lost (:mod:`updater.state`), still bars installing
    anything below it, and such a slot is never another's fallback (:func:`fallback_vouched`)."""
    status = status_of(state, slot)
    if status in (SlotStatus.BAD, SlotStatus.INSTALLING):
        return f"slot {slot} is {status}"
    security_version = state.slot(slot).security_version
    if security_version is None:
        return None
    below = below_floor(state, security_version)
    return None if below is None else f"slot {slot} holds a release whose {below}"


def below_floor(state: DeviceState, security_version: int | None) -> str | None:
    """``security version N is below the installed F`` when a release of ``security_version``
    (``None``: not known, so 0) is below the anti-rollback floor, else ``None``. The one
    comparison with the floor: installs, recovery, rollbacks and commits all ask this."""
    floor = state.installed_security_version
    if (security_version or 0) < floor:
        return f"security version {security_version or 0} is below the installed {floor}"
    return None


class SlotLifecycle:
    """The verbs; see the module docstring. Every verb returns the state as saved."""

    def __init__(self, backend: BootSelector, store: StateStore, log: EventSink) -> None:
        self.backend = backend
        self.store = store
        self.log = log

    # --- invariants --------------------------------------------------------------------------

    def _step(self, state: DeviceState, slot: str, verb: Verb) -> Transition:
        if slot not in ROOT_SLOTS:
            raise SlotStateError(f"{verb}: {slot!r} is not a root slot")
        status = status_of(state, slot)
        step = TRANSITIONS.get((status, verb))
        if step is None:
            raise SlotStateError(f"slot {slot} is {status}: {verb} refused")
        return step

    def check_writable(self, slot: str) -> None:
        """Refuse to write ``slot`` while it is the booted slot, or while the booted slot runs
        an undecided trial (the other slot is its fallback until the trial is committed)."""
        booted = self.backend.booted()
        if booted == SAFE_SLOT:
            return
        if slot == booted:
            raise SlotStateError(f"slot {slot} is the running slot: it is never written")
        if self.backend.is_trial() or self.backend.primary() != booted:
            raise SlotStateError(
                f"slot {booted} is running a trial that is not committed yet: "
                "the boot check must decide it before another install"
            )

    @staticmethod
    def check_floor(state: DeviceState, security_version: int | None, what: str) -> None:
        below = below_floor(state, security_version)
        if below is not None:
            raise SlotStateError(f"{below}: {what} refused")

    def boot_state_problem(self) -> str | None:
        """What is wrong with the boot state (damaged, or missing), or ``None`` when it reads
        intact. Reads only: :meth:`repair_boot_state` is what rebuilds it."""
        try:
            self.backend.primary()
        except BootStateCorruptError as damage:
            return str(damage)
        return None

    # --- verbs -------------------------------------------------------------------------------

    def begin_install(
        self,
        state: DeviceState,
        slot: str,
        *,
        version: str,
        bundle_sha256: str,
        security_version: int,
        boot_state_damaged: bool = False,
    ) -> DeviceState:
        """Before the first byte: bad in the bootloader (the firmware can never fall back into
        a slot being written), then ``installing`` with the release it will hold. A damaged
        boot state (a recovery's) boots no root slot and cannot be written: left as it is."""
        self._step(state, slot, Verb.BEGIN_INSTALL)
        self.check_writable(slot)
        self.check_floor(state, security_version, "install")
        if not boot_state_damaged:
            self.backend.mark_bad(slot)
        return self.store.save(
            state.with_slot(
                slot,
                status=SlotStatus.INSTALLING.value,
                version=version,
                bundle_sha256=bundle_sha256,
                security_version=security_version,
                trial_boots=0,
                failures=0,
            )
        )

    def fail_install(self, state: DeviceState, slot: str) -> DeviceState:
        """An install that did not finish: ``bad`` in the store too (a new install rewrites
        it). Once ``installed`` its trial may have been armed, so the bootloader is told first."""
        step = self._step(state, slot, Verb.FAIL_INSTALL)
        if step.bootloader == "mark_bad":
            self.backend.mark_bad(slot)
        return self.store.save(state.with_slot(slot, status=SlotStatus.BAD.value))

    def repair_into(
        self, state: DeviceState, slot: str, repair: Callable[[str], None]
    ) -> DeviceState:
        """Recovery over a damaged boot state: ``repair`` (the backend's) writes a fresh one
        with the just verified ``slot`` committed; the store then commits it too (the floor
        included), as a healthy boot would."""
        self._step(state, slot, Verb.REPAIR_INTO)
        self.check_floor(state, state.slot(slot).security_version, "recovery")
        state = self.store.save(state.with_slot(slot, status=SlotStatus.INSTALLED.value))
        repair(slot)
        return self.store.save(committed(state, slot))

    def arm_trial(
        self, state: DeviceState, slot: str, *, purpose: str = "trial boot"
    ) -> DeviceState:
        """A trial boot of ``slot`` at the next reboot: a verified install, or the intact
        previous release (``purpose``: a rollback). ``installed`` is persisted before the
        bootloader is told, ``trial`` after."""
        self._step(state, slot, Verb.ARM_TRIAL)
        if slot == self.backend.booted():
            raise SlotStateError(f"slot {slot} is the running slot: there is nothing to try")
        self.check_floor(state, state.slot(slot).security_version, purpose)
        if status_of(state, slot) is SlotStatus.INSTALLING:
            state = self.store.save(state.with_slot(slot, status=SlotStatus.INSTALLED.value))
        self.backend.try_once(slot)
        return self.store.save(state.with_slot(slot, status=SlotStatus.TRIAL.value, trial_boots=0))

    def commit(self, state: DeviceState, slot: str) -> DeviceState:
        """Make the booted ``slot`` the primary (the boot check's commit and confirm, and
        ``mark-good``): bootloader first, then ``good`` with its counters reset and the floor
        raised to its security version."""
        if slot != self.backend.booted():
            raise SlotStateError(f"slot {slot} is not the running slot: only that is committed")
        reason = unvouched(state, slot)
        if reason is not None:
            raise SlotStateError(f"{reason}: commit refused")
        self._step(state, slot, Verb.COMMIT)
        self.backend.commit(slot)
        state = self.store.save(committed(state, slot))
        return self._withdraw_unvouched_fallback(state, other_slot(slot))

    def _withdraw_unvouched_fallback(self, state: DeviceState, other: str) -> DeviceState:
        """After a commit, the firmware falls back to ``other`` when the committed slot fails:
        only a good slot at or above the floor (or an armed trial) may be that fallback. A
        boot state the firmware reset (U-Boot's script starting afresh) can have made a slot
        the store gave up, an empty one or an old release bootable again: marked bad here."""
        if status_of(state, other) is SlotStatus.TRIAL or fallback_vouched(state, other):
            return state
        if self.backend.attempts_left(other) <= 0:
            return state
        status = status_of(state, other)
        self.log.event(
            "slot.fallback_withdrawn", level="warning", slot=other, status=status.value,
            reason=unvouched(state, other) or f"slot {other} is {status}, not good",
        )  # fmt: skip
        self.backend.mark_bad(other)
        return self.store.save(state.with_slot(other, status=SlotStatus.BAD.value))

    def mark_bad(self, state: DeviceState, slot: str, *, force: bool = False) -> DeviceState:
        """Never boot ``slot`` again until it is rewritten. Refused, unless ``force``, when no
        other root slot would be left to boot (the firmware would boot safe mode)."""
        self._step(state, slot, Verb.MARK_BAD)
        if not force and not fallback_vouched(state, other_slot(slot)):
            raise SlotStateError(
                f"slot {slot} is the only good root slot at or above the floor: marking it bad "
                "leaves the device to boot the safe-mode slot (use --force to do so)"
            )
        self.backend.mark_bad(slot)
        return self.store.save(state.with_slot(slot, status=SlotStatus.BAD.value))

    def repair_boot_state(self, state: DeviceState, reason: str) -> tuple[str | None, str | None]:
        """Rebuild a damaged or missing boot state from the state store, never from defaults:
        the primary is the booted slot if the store vouches for it (else the other good one,
        else none: safe mode), the fallback the other slot if it is good and not below the
        floor. An explicit step (the boot check, ``fleet-updater repair``), never a read.

        Raises:
            SlotStateError: the backend cannot repair.
        """
        if not isinstance(self.backend, Repairable):
            raise SlotStateError(f"{reason}; the {self.backend.name} backend cannot repair it")
        primary, fallback = boot_selection(state, self.backend.booted())
        self.backend.repair(primary, fallback)
        self.log.event(
            "boot_state.repaired", level="warning", reason=reason, primary=primary,
            fallback=fallback,
        )  # fmt: skip
        return primary, fallback

    def count_trial_boot(self, state: DeviceState, slot: str) -> DeviceState:
        """Persist, before the checks run, that one more boot of this trial is being judged."""
        return self.store.save(state.with_slot(slot, trial_boots=state.slot(slot).trial_boots + 1))

    def count_failure(self, state: DeviceState, slot: str) -> DeviceState:
        """Persist, before the checks run, one more boot of a committed slot being judged."""
        return self.store.save(state.with_slot(slot, failures=state.slot(slot).failures + 1))


def fallback_vouched(state: DeviceState, slot: str) -> bool:
    """Whether the firmware may boot ``slot`` when the other one fails: good, holding a
    release the store knows, not below the floor."""
    return (
        status_of(state, slot) is SlotStatus.GOOD
        and state.slot(slot).security_version is not None
        and unvouched(state, slot) is None
    )


def boot_selection(state: DeviceState, booted: str) -> tuple[str | None, str | None]:
    """The primary and the fallback the state store vouches for, ``booted`` preferred: what a
    repaired boot state names (see :meth:`SlotLifecycle.repair_boot_state`)."""
    good = [slot for slot in ROOT_SLOTS if fallback_vouched(state, slot)]
    if booted in good:
        primary: str | None = booted
    elif good:
        primary = good[0]
    elif booted in ROOT_SLOTS and unvouched(state, booted) is None:
        primary = booted  # a release the store knows nothing against (a factory device)
    else:
        primary = None
    fallback = None
    if primary is not None and other_slot(primary) in good:
        fallback = other_slot(primary)
    return primary, fallback


def committed(state: DeviceState, slot: str) -> DeviceState:
    """``state`` with ``slot`` committed: ``good``, counters reset, and the floor raised to its
    security version. The one place the floor moves."""
    floor = max(state.installed_security_version, state.slot(slot).security_version or 0)
    good = state.with_slot(slot, status=SlotStatus.GOOD.value, trial_boots=0, failures=0)
    return replace(good, installed_security_version=floor)


if __name__ == "__main__":  # the table of docs/slot-lifecycle.md
    print(transition_table(), end="")
