"""Whole update cycles on virtual devices, for every firmware: the firmware model decides each
boot, the real updater installs and judges."""

from __future__ import annotations

import pytest

from bootloader_hooks.base import BootCause, BootEvent
from tests.chaos.conftest import FIRMWARES, MakeDevice, Releases

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
    assert device.events("boot_check.fell_back")


def test_a_following_install_after_a_rollback_succeeds(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device(firmware)
    device.install(releases.bundle("2.0.0", "unhealthy"))
    records = device.install(releases.bundle("2.0.1"))
    assert records[-1].action == "committed" and records[-1].image.version == "2.0.1"  # type: ignore[union-attr]


def test_both_root_slots_broken_boot_safe_mode(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device(firmware)
    device.install(releases.bundle("2.0.0", "hang"))  # b: bad
    device.slot_path("a").write_bytes(bytes(device.slot_path("a").stat().st_size))  # a: wiped
    records = device.power_on()
    assert records[-1].slot == "safe", records
    assert records[-1].action == "reported"
    assert device.events("boot_check.reported")


def test_committed_slot_that_stops_booting_falls_back(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device(firmware)
    device.install(releases.bundle("2.0.0"))
    path = device.slot_path("b")
    path.write_bytes(bytes(path.stat().st_size))  # the committed release's disk dies
    records = device.power_on()
    assert records[-1].slot == "a" and records[-1].image.version == "1.0.0", records  # type: ignore[union-attr]


def test_power_on_during_a_trial_keeps_the_device_bootable(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device(firmware)
    device.install(releases.bundle("2.0.0"), reboot=False)
    records = device.settle(BootEvent(BootCause.POWER_ON))
    assert records[-1].action in ("committed", "confirmed")
    assert records[-1].image is not None
