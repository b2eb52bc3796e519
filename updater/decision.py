"""What the daemon does with an assignment: a table (Mender-style), from the situation (the
assigned release, what each slot holds, what the release history says) to one action.

- ``none``: no assignment, or the booted slot already runs the release;
- ``skip`` (reported once as ``daemon.install_skipped``): updates suspended by the crash-loop
  guard, safe mode, an undecided trial, the release already armed for its trial boot, or a
  release that failed here before (never retried);
- ``flip``: the other slot holds the release intact and committed before: a trial boot of it,
  no download (a rollback);
- ``install``: :meth:`updater.install.Installer.install_parts` under the update lock, with a
  reboot into the trial when it is armed;
- ``recover``: in safe mode, the release is installed into a root slot (``updater.recovery``).
"""

from __future__ import annotations

from dataclasses import dataclass

from bootloader_hooks.base import ROOT_SLOTS, SAFE_SLOT, other_slot
from updater.client import (
    Assignment,
)
from updater.history import MAX_INTERRUPTED, ReleaseHistory
from updater.lifecycle import fallback_vouched
from updater.state import DeviceState


@dataclass(frozen=True)
class Decision:
    """``action``: ``none``, ``skip``, ``flip``, ``install`` or ``recover``; ``fail``: the
    release is to be recorded as failed (never retried)."""

    action: str
    reason: str
    fail: bool = False


def decide(
    assignment: Assignment | None,
    state: DeviceState,
    booted: str | None,
    undecided_trial: bool,
    history: ReleaseHistory,
) -> Decision:
    """What to do about ``assignment`` (see the module docstring). Pure: reads, never acts."""
    if assignment is None:
        return Decision("none", "no assignment")
    sha = assignment.manifest_sha256
    if booted in ROOT_SLOTS and state.slot(booted).bundle_sha256 == sha:
        return Decision("none", "running")
    record = history.get(sha)
    if record is not None and record.outcome == "failed":
        return Decision("skip", f"failed on this device before: {record.detail}")
    if booted == SAFE_SLOT:
        # safe mode: put the assigned (last known-good) release back into a root slot, even
        # with updates suspended (a crash loop is one way to get here); once, not in a loop
        if record is not None and record.outcome == "armed":
            return Decision("skip", "recovered into a root slot before, safe mode again", fail=True)
        return Decision("recover", "safe mode: recovering into a root slot")
    if state.suspended:
        return Decision("skip", f"updates are suspended: {state.suspended}")
    if booted not in ROOT_SLOTS:
        return Decision("skip", f"running from slot {booted!r}: installs only from a root slot")
    if undecided_trial:
        return Decision("skip", "the running slot's trial is undecided")
    other = state.slot(other_slot(booted))
    if other.bundle_sha256 != sha or other.status == "empty":
        return Decision("install", "assigned")
    if other.status in ("installed", "trial"):
        return Decision("skip", "armed for its trial boot: waiting for the reboot")
    if other.status == "good":
        if not fallback_vouched(state, other_slot(booted)):
            return Decision("skip", "below the installed security version", fail=True)
        return Decision("flip", "intact in the other slot")
    # installing or bad: did our own install stop for a reason that is not the release's?
    retry = ("installing", "interrupted", "download_failed", "abandoned")
    if record is not None and record.outcome in retry:
        if record.interrupted >= MAX_INTERRUPTED:
            return Decision("skip", f"install interrupted {record.interrupted} times", fail=True)
        return Decision("install", f"again after: {record.outcome}")
    why = "its trial boot failed" if record and record.outcome == "armed" else "slot marked bad"
    return Decision("skip", why, fail=True)
