"""A power cut at every write boundary of an install, a commit and a fallback, per firmware.

Each scenario runs once to enumerate its write boundaries (every durable write of the updater,
of the backend and of the firmware model, and every flush of a slot image). Then, for each
boundary, a fresh copy of the device runs the scenario with the power cut there; the device is
powered on again and must boot a slot holding a complete image of a release it was given,
committed and healthy, and a following install must succeed.

The first install writes a slot the firmware never booted. Later installs write the previous
release, the running slot's fallback: there, right after the cut and before any boot, the boot
state (read by the firmware's own tools) must not let the firmware fall back into the
half-written slot.

A sequence may cut the power twice: once during the install, and again at a write boundary of
the power-on after it (a fallback, a rollback or a commit interrupted in turn); the same checks
hold after each cut. How many sequences run, and which, is FLEET_POWER_CUTS's and
FLEET_POWER_CUT_SEED's choice (tests/chaos/conftest.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from chaos.lab_image import make_lab_image
from chaos.virtual_device import (
    FACTORY_SECURITY_VERSION,
    BootRecord,
    PowerCut,
    PowerSwitch,
    VirtualDevice,
)
from tests.chaos.conftest import (
    FIRMWARES,
    BootView,
    DeviceCopies,
    MakeDevice,
    PowerCutMode,
    Releases,
    boot_view,
    count_cuts,
    second_cuts,
)

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


def cut_twice(
    device: VirtualDevice, cuts: tuple[int, ...], action: Callable[[], object], where: str
) -> str:
    """Run ``action`` (an install) with the power cut at boundary ``cuts[0]``; with a second
    cut, power the device on with the power cut again at its boundary ``cuts[1]``. Returns
    ``where`` told how far the second cut got."""
    with PowerSwitch(cut_at=cuts[0]).installed() as switch, contextlib.suppress(PowerCut):
        action()
    assert switch.off, f"{where}: not reached again"
    if len(cuts) == 1:
        return where
    with PowerSwitch(cut_at=cuts[1]).installed() as again, contextlib.suppress(PowerCut):
        device.power_on()
    assert again.off, f"{where}: the power-on's boundary {cuts[1]} was not reached"
    point, path = again.points[-1]
    return f"{where}, then cut {cuts[1]} of the power-on at {point} {path.name}"


def recovering(device: VirtualDevice) -> tuple[list[BootRecord], int]:
    """Power ``device`` on; returns the boots and the number of write boundaries reached."""
    with PowerSwitch().installed() as counting:
        records = device.power_on()
    return records, len(counting.points)


@pytest.mark.parametrize("firmware", FIRMWARES)
@pytest.mark.parametrize("scenario_name", sorted(SCENARIOS))
def test_power_cut_at_every_write_boundary(
    firmware: str,
    scenario_name: str,
    device_templates: dict[str, Path],
    releases: Releases,
    cut_mode: PowerCutMode,
    tmp_path: Path,
) -> None:
    behaviour = SCENARIOS[scenario_name]
    bundle = releases.bundle("2.0.0", behaviour)
    follow_up = releases.bundle("3.0.0", security_version=2)
    copy = DeviceCopies(device_templates[firmware], tmp_path / "device", firmware)
    points = boundaries(copy(), bundle)
    assert len(points) > 10, points
    before = boot_view(copy())
    images = {"1.0.0": make_lab_image("1.0.0"), "2.0.0": make_lab_image("2.0.0", behaviour)}
    recovery: dict[int, int] = {}  # first cut -> boundaries the power-on after it reached

    def run(cuts: tuple[int, ...]) -> None:
        point, path = points[cuts[0]]
        device = copy()
        where = f"cut {cuts[0]}/{len(points)} at {point} {path.name}"
        where = cut_twice(device, cuts, lambda: device.install(bundle), where)
        assert_safe_after_cut(device, before, "a", "b", images, where)
        records, reached = recovering(device)
        if len(cuts) == 1:
            recovery[cuts[0]] = reached
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
        count_cuts(firmware, scenario_name, len(cuts))

    for cut_at in range(len(points)):
        run((cut_at,))
    rng = cut_mode.rng(f"{firmware} {scenario_name}")
    for pair in second_cuts(rng, list(recovery), recovery.__getitem__,
                            cut_mode.second_cuts(len(points))):  # fmt: skip
        run(pair)


# The updates a device takes in turn: (version, security version). The later-install scenarios
# commit the first one or two, then cut the power during the next.
UPDATES = [("2.0.0", 1), ("3.0.0", 2), ("4.0.0", 3)]
SECURITY = {"1.0.0": FACTORY_SECURITY_VERSION, **dict(UPDATES)}
CUTS_PER_SCENARIO = 16  # sampled in ci mode, beside every boundary of the target slot's writing


def complete_release(device: VirtualDevice, slot: str, images: Mapping[str, bytes]) -> str | None:
    """The version whose whole image (of ``images``, by version) ``slot`` holds, if any."""
    data = device.slot_path(slot).read_bytes()
    return next((v for v, image in images.items() if data.startswith(image)), None)


def assert_safe_after_cut(
    device: VirtualDevice,
    before: BootView,
    booted: str,
    target: str,
    images: Mapping[str, bytes],
    where: str,
) -> None:
    """Right after the cut, before anything boots: the running slot's bytes are untouched, the
    firmware still boots a complete committed release at or above the floor, and it can never
    start the target slot unless that holds a whole image (its old one, or the new one, the
    last of ``images``)."""
    version = list(images)[-1]
    view = boot_view(device)
    assert view.slots[booted] == before.slots[booted], f"{where}: the running slot was written"
    floor = device.state().installed_security_version
    committed = view.committed
    assert committed in (booted, target), f"{where}: {view.env}"
    release = complete_release(device, committed, images)
    assert release is not None, f"{where}: slot {committed} is committed but incomplete"
    assert SECURITY[release] >= floor, f"{where}: {release} is below the floor {floor}"
    if committed == target:
        assert release == version, f"{where}: {release} committed in slot {target}"
    for slot in view.bootable:
        untouched = view.slots[slot] == before.slots[slot]
        assert untouched or complete_release(device, slot, images) == version, (
            f"{where}: the firmware may start slot {slot}, which holds a partial image "
            f"({view.env}, bootable {sorted(view.bootable)})"
        )


@pytest.mark.parametrize("firmware", FIRMWARES)
@pytest.mark.parametrize("earlier", [1, 2], ids=["second install", "third install"])
def test_power_cut_during_a_later_install(
    firmware: str,
    earlier: int,
    make_device: MakeDevice,
    releases: Releases,
    cut_mode: PowerCutMode,
    tmp_path: Path,
) -> None:
    """The slots have swapped roles and the anti-rollback floor has moved: a cut at any write
    boundary of the next install (every one of the target slot's writing, and a seeded sample
    of the others, or all of them in long mode) keeps the device on a committed release."""
    template = make_device(firmware)
    for version, security in UPDATES[:earlier]:
        records = template.install(releases.bundle(version, security_version=security))
        assert records[-1].action == "committed", records
    assert template.state().installed_security_version == UPDATES[earlier - 1][1]
    booted = template.runtime().backend.booted()
    target = "a" if booted == "b" else "b"
    before = boot_view(template)
    # the target is the running slot's fallback while its release is not below the floor; a
    # commit that raised the floor above it withdrew it
    state = template.state()
    fallback = (state.slot(target).security_version or 0) >= state.installed_security_version
    assert before.committed == booted and (target in before.bootable) == fallback
    version, security = UPDATES[earlier]
    bundle = releases.bundle(version, security_version=security)
    images = {v: make_lab_image(v) for v in SECURITY if SECURITY[v] <= security}
    copy = DeviceCopies(template.root, tmp_path / "device", firmware)

    points = boundaries(copy(), bundle)
    writing = {i for i, (_, path) in enumerate(points) if path.name.startswith("root_")}
    assert writing, points
    rng = cut_mode.rng(f"{firmware} {earlier}")
    others = sorted(set(range(len(points))) - writing)
    sample = len(others) if cut_mode.name == "long" else CUTS_PER_SCENARIO
    chosen = sorted(writing | set(rng.sample(others, min(sample, len(others)))))
    recovery: dict[int, int] = {}  # first cut -> boundaries the power-on after it reached
    scenario = f"install #{earlier + 1}"

    def run(cuts: tuple[int, ...]) -> None:
        point, path = points[cuts[0]]
        device = copy()
        where = f"cut {cuts[0]}/{len(points)} at {point} {path.name}"
        where = cut_twice(device, cuts, lambda: device.install(bundle), where)
        assert_safe_after_cut(device, before, booted, target, images, where)
        records, reached = recovering(device)
        if len(cuts) == 1:
            recovery[cuts[0]] = reached
        final = records[-1]
        assert final.action in ("confirmed", "committed"), f"{where}: {records}"
        release = complete_release(device, final.slot, images)
        assert release in (UPDATES[earlier - 1][0], version), f"{where}: booted {final}"
        assert SECURITY[release] >= device.state().installed_security_version, where
        after = boot_view(device)
        assert after.committed == final.slot and after.trial is None, f"{where}: {after.env}"
        count_cuts(firmware, scenario, len(cuts))

    for cut_at in chosen:
        run((cut_at,))
    for pair in second_cuts(rng, chosen, recovery.__getitem__, cut_mode.second_cuts(len(chosen))):
        run(pair)
