"""A power cut at every write boundary of an install, a commit and a fallback, per firmware.

Each scenario runs once to enumerate its write boundaries (every durable write of the updater,
of the backend and of the firmware model, and every flush of a slot image). Then, for each
boundary, a fresh copy of the device runs the scenario with the power cut there; the device is
powered on again and must boot a slot holding a complete image of a release it was given,
committed and healthy, and a following install must succeed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from chaos.virtual_device import PowerCut, PowerSwitch, VirtualDevice
from tests.chaos.conftest import CUT_COUNTS, FIRMWARES, MakeDevice, Releases

# scenario -> the behaviour of the release installed: what happens after the reboot
SCENARIOS = {
    "install+commit": "healthy",
    "install+rollback": "unhealthy",
    "install+firmware fallback": "hang",
}


def boundaries(device: VirtualDevice, bundle: Path) -> list[tuple[str, Path]]:
    with PowerSwitch().installed() as switch:
        device.install(bundle)
    return switch.points


@pytest.mark.parametrize("firmware", FIRMWARES)
@pytest.mark.parametrize("scenario_name", sorted(SCENARIOS))
def test_power_cut_at_every_write_boundary(
    firmware: str, scenario_name: str, make_device: MakeDevice, releases: Releases
) -> None:
    bundle = releases.bundle("2.0.0", SCENARIOS[scenario_name])
    follow_up = releases.bundle("3.0.0", security_version=2)
    points = boundaries(make_device(firmware), bundle)
    assert len(points) > 10, points
    for cut_at, (point, path) in enumerate(points):
        device = make_device(firmware)
        with PowerSwitch(cut_at=cut_at).installed() as switch, contextlib.suppress(PowerCut):
            device.install(bundle)
        assert switch.off, f"boundary {cut_at} ({point} {path.name}) was not reached again"
        where = f"cut {cut_at}/{len(points)} at {point} {path.name}"
        records = device.power_on()
        final = records[-1]
        assert final.image is not None, f"{where}: booted {final}"
        assert final.image.version in ("1.0.0", "2.0.0"), where
        assert final.action in ("confirmed", "committed"), f"{where}: {records}"
        backend = device.runtime().backend
        assert backend.primary() == final.slot, where
        assert not backend.is_trial(), where
        after = device.install(follow_up)
        assert after[-1].action == "committed", f"{where}: follow-up install {after}"
        assert after[-1].image is not None and after[-1].image.version == "3.0.0", where
    CUT_COUNTS[f"{firmware:<8} {scenario_name}"] = len(points)
