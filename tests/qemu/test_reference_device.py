"""The reference device under QEMU: real OVMF, real GRUB, a Debian kernel, the real updater.

Each scenario asserts on the console (what the guest reports), on the disk afterwards (which
release image each slot holds, the boot variables), and on the GRUB firmware model: before
every boot the model ran the same grub.cfg on a copy of the ESP, and the slot it predicted and
the variables it left must be those real GRUB booted and left.
"""

from __future__ import annotations

import os
import random

import pytest

from bootloader_hooks.grub import primary_in, trial_in
from chaos.qemu.device import ATTEMPTS, QemuLab, ReferenceDevice
from tests.qemu.conftest import FIGURES

POWER_CUTS = int(os.environ.get("FLEET_QEMU_POWER_CUTS", "10"))


def assert_model_agreed(device: ReferenceDevice) -> int:
    """Every boot the guest reported went as the model predicted; the number compared. A boot
    whose power was cut before Linux reported has nothing to compare (the next boot's
    prediction starts again from the disk as the cut left it)."""
    compared = 0
    for number, boot in enumerate(device.boots, start=1):
        if boot.slot is None and boot.outcome == "cut":
            continue
        assert boot.slot is not None, f"boot {number}: the guest never reported ({boot})"
        compared += 1
        assert boot.agrees, (
            f"boot {number}: GRUB booted {boot.slot} leaving {boot.env}, the model predicted "
            f"{boot.predicted_slot} leaving {boot.predicted_env}"
        )
    return compared


def test_install_trial_commit_then_b_is_primary(device: ReferenceDevice, qemu_lab: QemuLab) -> None:
    first = device.settle()
    assert (first.slot, first.version, first.boot_check_rc) == ("a", "1.0.0", "0")

    device.install(qemu_lab.release("2.0.0"))
    trial = device.settle()
    assert (trial.slot, trial.version) == ("b", "2.0.0")
    assert trial.env.get("FLEET_TRIAL") == "B", "GRUB did not boot B as a trial"
    assert trial.boot_check_rc == "0"
    status = device.status()
    assert (status["booted"], status["primary"], status["trial"]) == ("b", "b", False)
    assert status["slots"]["b"]["status"] == "good"
    assert status["slots"]["b"]["version"] == "2.0.0"

    device.reboot()
    after = device.settle()
    assert (after.slot, after.version) == ("b", "2.0.0")
    assert "FLEET_TRIAL" not in after.env, "the committed slot booted as a trial again"
    release = device.slot_release("b")
    assert release is not None and release.version == "2.0.0"
    assert_model_agreed(device)


def test_failing_health_check_marks_bad_and_returns_to_a(
    device: ReferenceDevice, qemu_lab: QemuLab
) -> None:
    device.settle()
    device.install(qemu_lab.release("2.0.0", "unhealthy"))
    final = device.settle()
    trial = device.boots[-2]
    assert (trial.slot, trial.env.get("FLEET_TRIAL"), trial.outcome) == ("b", "B", "reset")
    assert (final.slot, final.version, final.boot_check_rc) == ("a", "1.0.0", "0")
    assert final.env["BOOT_ORDER"] == "A", "B is still in GRUB's order after it was marked bad"
    status = device.status()
    assert (status["booted"], status["primary"]) == ("a", "a")
    assert status["slots"]["b"]["status"] == "bad"
    assert_model_agreed(device)


@pytest.mark.parametrize("behaviour", ["hang", "panic"])
def test_broken_release_grub_counter_falls_back(
    device: ReferenceDevice, qemu_lab: QemuLab, behaviour: str
) -> None:
    device.settle()
    device.install(qemu_lab.release("2.0.0", behaviour))
    final = device.settle()
    tries = device.boots[1:-1]
    # Linux never judged these boots: init hung with the watchdog armed, or died and the
    # kernel panicked; GRUB took one attempt per boot until none was left.
    assert [b.slot for b in tries] == ["b"] * ATTEMPTS
    assert all(b.outcome == "reset" and b.boot_check_rc is None for b in tries)
    counts = [b.env.get("BOOT_B_LEFT") for b in tries]
    assert counts == [str(n) for n in reversed(range(ATTEMPTS))]
    assert (final.slot, final.version, final.boot_check_rc) == ("a", "1.0.0", "0")
    status = device.status()
    assert (status["booted"], status["primary"]) == ("a", "a")
    assert status["slots"]["b"]["status"] == "bad"
    assert_model_agreed(device)


# Where the cuts fall, in turn: (phase, the guest report the span starts at, the one it ends at).
# The install writes the state store, the boot state and the image; the reboot includes GRUB
# taking an attempt (save_env); the boot check commits.
CUT_PHASES = (
    ("install", "install.started", "install.rebooting"),
    ("commit", "boot_check.started", "ready"),
    ("reboot", "install.rebooting", "boot_check.started"),
)


def test_power_cuts_during_install_and_commit(device: ReferenceDevice, qemu_lab: QemuLab) -> None:
    seed = int(os.environ.get("FLEET_QEMU_SEED", str(random.SystemRandom().randrange(1 << 32))))
    rng = random.Random(seed)  # noqa: S311 (the moments of the cuts, not a secret)
    releases = [qemu_lab.release("2.0.0"), qemu_lab.release("3.0.0")]
    device.settle()
    # One undisturbed install and commit measures each phase: every cut falls at a random
    # moment of its phase, timed from the guest's report that starts it.
    device.begin_install(releases[0])
    seen: dict[str, float] = {}
    report = None
    for event in ("install.started", "install.rebooting", "boot_check.started", "ready"):
        report = device.wait_through_resets(event, after=report)
        seen[event] = report.at
    assert device.settle().boot_check_rc == "0"
    spans = {phase: seen[end] - seen[start] for phase, start, end in CUT_PHASES}
    phases = []
    for cut in range(POWER_CUTS):
        running = device.boots[-1]
        release = releases[1] if running.version == releases[0].version else releases[0]
        phase, start, _ = CUT_PHASES[cut % len(CUT_PHASES)]
        delay = rng.uniform(0, spans[phase])
        device.begin_install(release)
        fell = device.run_for(delay, after=start)
        phases.append(f"{phase}, {delay:.2f} s after {start} ({fell})")
        where = f"cut {cut + 1} (seed {seed}) in {phases[-1]}"
        # No FAT damage either: the ESP is only ever changed by rewriting grubenv in place.
        assert device.esp_problems() == [], f"{where}: fsck.fat -n on the ESP"
        boots = len(device.boots)
        final = device.settle()
        assert len(device.boots) == boots + 1, f"{where}: the first boot after the cut reset"
        assert final.boot_check_rc == "0", f"{where}: boot check failed on {final}"
        holding = device.slot_release(final.slot or "?")
        assert holding is not None, f"{where}: slot {final.slot} holds no complete image"
        assert holding.version == final.version
        assert holding.version in (running.version, release.version), where
        variables = device.grub_variables()
        assert primary_in(variables) == final.slot, f"{where}: {variables}"
        assert trial_in(variables) is None, f"{where}: {variables}"
    compared = assert_model_agreed(device)
    assert len(phases) == POWER_CUTS
    FIGURES["power cuts (kill QEMU)"] = (
        f"{len(phases)}, seed {seed}; {len(device.boots)} boots, {compared} compared with the "
        "GRUB model (the others were cut before Linux reported)"
    )
    FIGURES["  phases (s)"] = ", ".join(f"{name} {span:.2f}" for name, span in spans.items())
    for number, phase in enumerate(phases, start=1):
        FIGURES[f"  cut {number}"] = phase


def test_both_root_slots_broken_safe_mode_recovers(
    device: ReferenceDevice, qemu_lab: QemuLab
) -> None:
    good = qemu_lab.release("1.0.0")
    device.settle()
    device.cut_power()
    # Storage damage took both root slots: GRUB cannot load either kernel.
    device.write_slot("a", bytes(4 << 20))
    device.write_slot("b", bytes(4 << 20))
    device.put(good, "recovery.bundle")  # the last known-good release, left for safe mode

    safe = device.start()
    assert safe.slot == "safe"
    device.wait_for("status-end")
    # The boot check reports safe mode (it commits nothing and runs no checks there).
    verdicts = device.log_events("boot_check.reported")
    assert [v.fields.get("situation") for v in verdicts] == ["safe_mode"], verdicts
    status = device.last_status()
    assert (status["booted"], status["trial"]) == ("safe", False)
    assert status["bootloader_problem"] is None
    final = device.settle()  # the recovery runs, and reboots into the slot it wrote
    assert (final.slot, final.version, final.boot_check_rc) == ("b", "1.0.0", "0")
    assert final.env.get("FLEET_TRIAL") == "B", "the recovered slot was not booted as a trial"
    recovered = device.slot_release("b")
    assert recovered is not None and recovered.version == "1.0.0"
    variables = device.grub_variables()
    assert primary_in(variables) == "b"
    assert trial_in(variables) is None
    assert_model_agreed(device)
