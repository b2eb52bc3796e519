"""Whole update cycles on virtual devices, for every firmware: the firmware model decides each
boot, the real updater installs and judges."""

from __future__ import annotations

import pytest

from chaos.lab_image import LabImage, make_lab_image
from chaos.virtual_device import MAX_BOOTS, VirtualDevice
from tests.chaos.conftest import FIRMWARES, MakeDevice, Releases
from updater.bootcheck import MAX_TRIAL_BOOTS

pytestmark = pytest.mark.parametrize("firmware", FIRMWARES)


def test_healthy_release_is_committed(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device(firmware)
    records = device.install(releases.bundle("2.0.0"))
    assert [(r.slot, r.trial, r.action) for r in records] == [("b", True, "committed")]
    backend = device.runtime().backend
    assert backend.primary() == "b" and backend.booted() == "b" and not backend.is_trial()
    state = device.state()
    assert state.slot("b").status == "good" and state.slot("b").version == "2.0.0"
    assert state.slot("a").status == "good"  # the previous release stays, for a rollback
    assert device.events("boot_check.committed")
    # the next power-on keeps running the committed release
    assert device.power_on()[-1].slot == "b"


def test_unhealthy_release_is_rolled_back(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device(firmware)
    records = device.install(releases.bundle("2.0.0", "unhealthy"))
    assert [(r.slot, r.action) for r in records] == [("b", "rolled_back"), ("a", "confirmed")]
    assert device.state().slot("b").status == "bad"
    backend = device.runtime().backend
    assert backend.primary() == "a" and backend.booted() == "a"
    assert device.power_on()[-1].image.version == "1.0.0"  # type: ignore[union-attr]


def test_hanging_release_falls_back_by_firmware_alone(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device(firmware)
    records = device.install(releases.bundle("2.0.0", "hang"))
    assert records[0].action == "hang" and records[0].slot == "b"
    assert records[-1].slot == "a" and records[-1].action == "confirmed"
    assert device.state().slot("b").status == "bad"
    if firmware == "tryboot":
        # one try per trial from the firmware, re-armed in software: attempts trial boots,
        # each reported as never started (the hang comes before user space)
        trials = [r for r in records if r.slot == "b"]
        assert len(trials) == 3 and all(r.trial for r in trials)
        assert len(device.events("boot_check.trial_never_started")) == 3
        assert len(device.events("boot_check.trial_rearmed")) == 2
    else:
        assert device.events("boot_check.fell_back")


def test_release_that_crashes_during_its_trial_is_given_up(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device(firmware)
    records = device.install(releases.bundle("2.0.0", "crash"))
    assert records[0].slot == "b" and records[0].action == "crash"
    assert records[-1].slot == "a" and records[-1].action == "confirmed", records
    assert device.state().slot("b").status == "bad"
    if firmware == "tryboot":
        assert device.events("boot_check.trial_died")
        assert not device.events("boot_check.trial_never_started")


def test_a_following_install_after_a_rollback_succeeds(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device(firmware)
    device.install(releases.bundle("2.0.0", "unhealthy"))
    records = device.install(releases.bundle("2.0.1"))
    assert records[-1].action == "committed" and records[-1].image.version == "2.0.1"  # type: ignore[union-attr]


def put_image(device: VirtualDevice, slot: str, version: str, behaviour: str) -> None:
    """Change a slot's content behind the updater's back (a disk going bad, a broken app)."""
    with device.slot_path(slot).open("r+b") as handle:
        handle.write(make_lab_image(version, behaviour))


def test_both_root_slots_failing_boot_safe_mode(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device(firmware)
    device.install(releases.bundle("2.0.0", "hang"))  # b: bad
    put_image(device, "a", "1.0.0", "unhealthy")  # a: its application stops working
    records = device.power_on()
    assert [r.action for r in records[:-1]] == ["retrying"] * 2 + ["gave_up"], records
    assert records[-1].slot == "safe", records
    assert records[-1].action == "reported"
    assert device.events("boot_check.reported")


def test_committed_slot_failing_in_user_space_falls_back(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device(firmware)
    device.install(releases.bundle("2.0.0"))
    put_image(device, "b", "2.0.0", "unhealthy")
    records = device.power_on()
    assert records[-1].slot == "a" and records[-1].action == "confirmed", records
    assert records[-1].image == LabImage("1.0.0", "healthy")
    assert device.state().slot("b").status == "bad"


def test_committed_slot_whose_kernel_hangs(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    """GRUB and U-Boot count every boot, so they notice a kernel that never reaches user
    space. The Raspberry Pi firmware gives only a trial boot one try: a committed kernel that
    hangs keeps the board in a reset loop unless a watchdog outside Linux (U-Boot arming the
    SoC watchdog) is set up; see bootloader_hooks/tryboot.py."""
    device = make_device(firmware)
    device.install(releases.bundle("2.0.0"))
    device.slot_path("b").write_bytes(bytes(device.slot_path("b").stat().st_size))
    if firmware == "tryboot":
        with pytest.raises(RuntimeError, match="no stable boot"):
            device.power_on()
        assert {r.slot for r in device.boots[-MAX_BOOTS:]} == {"b"}
        return
    records = device.power_on()
    assert records[-1].slot == "a" and records[-1].image == LabImage("1.0.0", "healthy"), records


def test_power_cut_instead_of_the_trial_reboot_keeps_the_device_bootable(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device(firmware)
    device.install(releases.bundle("2.0.0"), reboot=False)
    records = device.power_cut()
    assert records[-1].action in ("committed", "confirmed")
    assert records[-1].image is not None
    if firmware == "tryboot":
        # the trial flag lives in the SoC and dies with the power: the old slot boots, the
        # trial is reported as never started and re-armed, then runs on the next reboot
        assert records[0].slot == "a" and records[0].action == "rearmed"
        assert records[-1].image.version == "2.0.0"


def test_reboot_after_arming_runs_the_trial(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device(firmware)
    device.install(releases.bundle("2.0.0"), reboot=False)
    records = device.reboot()
    assert [(r.slot, r.trial, r.action) for r in records] == [("b", True, "committed")]


def test_a_trial_whose_boot_check_keeps_dying_is_given_up_as_a_reboot_loop(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    """The firmware allows more trial boots than the boot check's own limit: the release crashes
    the board in every boot check, and at ``MAX_TRIAL_BOOTS`` the boot check gives the trial up
    by itself, without running the checks again, before the firmware would."""
    device = make_device(firmware)
    device.options["attempts"] = MAX_TRIAL_BOOTS + 2
    records = device.install(releases.bundle("2.0.0", "crash"))
    trials = [r for r in records if r.slot == "b"]
    assert [r.action for r in trials] == ["crash"] * MAX_TRIAL_BOOTS + ["rolled_back"], records
    assert all(r.trial for r in trials)
    assert records[-1].slot == "a" and records[-1].action == "confirmed", records
    loops = [e for e in device.events("boot_check.started") if e["situation"] == "trial_loop"]
    assert len(loops) == 1 and loops[0]["slot"] == "b"
    assert [e["situation"] for e in device.events("boot_check.rolled_back")] == ["trial_loop"]
    assert device.state().slot("b").status == "bad"
    backend = device.runtime().backend
    assert backend.primary() == "a" and backend.attempts_left("b") == 0
    assert device.power_on()[-1].image == LabImage("1.0.0", "healthy")
