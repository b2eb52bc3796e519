"""A power cut at every write boundary of a delta install (updater.delta), per firmware.

The device runs 1.0.0; 2.0.0 shares most of its bytes, so the install reads most chunks from
the running slot, fetches the rest in ranges from a host on loopback, flushes the target and
advances its journal again and again. After a cut anywhere, the device boots its complete
1.0.0, and the install, tried again, finishes without fetching again what the journal
vouches for; the device then commits 2.0.0.

A sequence may cut the power twice: once during the install, and again at a write boundary of
the install tried again after it (resuming from its journal); the device still boots 1.0.0 or
2.0.0, and a last try finishes. How many sequences run, and which, is FLEET_POWER_CUTS's and
FLEET_POWER_CUT_SEED's choice (tests/chaos/conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootloader_hooks.base import BootCause, BootEvent
from chaos.lab_image import make_lab_image
from chaos.virtual_device import LAB_FLUSH_BYTES, PowerCut, PowerSwitch, VirtualDevice
from image_builder.bundle_writer import ImageSource, create_bundle
from signing.keyring import trust_key
from tests.chaos.conftest import (
    COMPATIBLE,
    FIRMWARES,
    DeviceCopies,
    PowerCutMode,
    Releases,
    boot_view,
    count_cuts,
    second_cuts,
)
from tests.chaos.test_power_cuts import assert_safe_after_cut
from tests.server_simulator import split_bundle
from tests.unit.test_delta import Host, image_bytes
from updater.delta import JOURNAL_NAME

BODY = image_bytes(6_000_000, seed=21)[:900_000]


def new_body() -> bytes:
    body = bytearray(BODY)
    body[500_000:520_000] = random.Random(3).randbytes(20_000)  # noqa: S311 (test data)
    body[100_000:100_000] = random.Random(4).randbytes(3_000)  # noqa: S311 (test data)
    return bytes(body)


IMAGES = {
    "1.0.0": make_lab_image("1.0.0", body=BODY),
    "2.0.0": make_lab_image("2.0.0", body=new_body()),
}


@pytest.fixture(scope="module")
def host() -> Iterator[tuple[Host, str]]:
    state = Host()
    for url in state.serve():
        yield state, url


def template(root: Path, firmware: str, releases: Releases) -> VirtualDevice:
    device = VirtualDevice(root, firmware)
    trust_key(root / "keyring", releases.directory / "release-key.pub")
    device.provision(IMAGES["1.0.0"], "1.0.0")
    assert device.power_on()[-1].action == "confirmed"
    return device


Release = tuple[bytes, bytes, dict[str, list[str]]]  # manifest, signatures, blob URLs


def install(device: VirtualDevice, release: Release) -> int:
    installer = device.runtime().installer(
        http_options={"sleep": lambda s: None, "retries": 1},
        flush_bytes=LAB_FLUSH_BYTES, write_chunk=LAB_FLUSH_BYTES // 4,
    )  # fmt: skip
    result = installer.install_parts(*release, reboot=True)
    assert result.bytes_fetched is not None
    return result.bytes_fetched


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_power_cut_at_every_write_boundary_of_a_delta_install(
    firmware: str,
    releases: Releases,
    host: tuple[Host, str],
    cut_mode: PowerCutMode,
    tmp_path: Path,
) -> None:
    state, url = host
    original = template(tmp_path / "template", firmware, releases)
    image = tmp_path / "2.0.0.img"
    image.write_bytes(IMAGES["2.0.0"])
    bundle = tmp_path / "2.0.0.bundle"
    create_bundle(bundle, images=[ImageSource("rootfs", image)], keys=[releases.key],
                  compatible=COMPATIBLE, version="2.0.0", security_version=1,
                  compression="zstd", created=1_700_000_000)  # fmt: skip
    manifest, signatures, blobs = split_bundle(bundle)
    state.blobs.update(blobs)
    release: Release = (manifest, signatures, {sha: [f"{url}/blobs/{sha}"] for sha in blobs})
    stored = sum(len(data) for data in blobs.values())
    before = boot_view(original)
    copy = DeviceCopies(original.root, tmp_path / "device", firmware)

    with PowerSwitch().installed() as switch:
        full = install(copy(), release)
    points = switch.points
    assert full < 0.6 * stored, (full, stored)  # a delta, not the whole image
    assert sum(1 for p, _ in points if p == "slot:before-flush") >= 5, points
    resumed = 0
    retried: list[int] = []  # first cuts after which the device booted 1.0.0 again
    retries: dict[int, int] = {}  # such a first cut -> boundaries of the install tried again

    def cut_and_power_on(cut_at: int) -> tuple[VirtualDevice, str, str]:
        """A copy with the power cut at ``cut_at`` and switched on again: where, and the
        version it boots."""
        point, path = points[cut_at]
        where = f"cut {cut_at}/{len(points)} at {point} {path.name}"
        device = copy()
        with PowerSwitch(cut_at=cut_at).installed() as cut, contextlib.suppress(PowerCut):
            install(device, release)
        assert cut.off, f"{where}: not reached again"
        assert_safe_after_cut(device, before, "a", "b", IMAGES, where)
        records = device.power_on()
        assert records[-1].image is not None, f"{where}: {records}"
        assert records[-1].action in ("confirmed", "committed"), f"{where}: {records}"
        return device, where, records[-1].image.version

    def retry_boundaries(first: int) -> int:
        if first not in retries:
            device, _, _ = cut_and_power_on(first)
            with PowerSwitch().installed() as counting:
                install(device, release)
            retries[first] = len(counting.points)
        return retries[first]

    def run(cuts: tuple[int, ...]) -> None:
        nonlocal resumed
        device, where, version = cut_and_power_on(cuts[0])
        made = 1
        if version == "2.0.0":
            # the cut came after the trial was armed: it booted and committed
            assert len(cuts) == 1, where
            count_cuts(firmware, "delta install", made)
            return
        if len(cuts) == 1:
            retried.append(cuts[0])
        journal_path = device.root / "data" / JOURNAL_NAME
        journal = json.loads(journal_path.read_text()) if journal_path.exists() else {}
        if len(cuts) > 1:
            # the install tried again is cut too, anywhere
            with PowerSwitch(cut_at=cuts[1]).installed() as again, contextlib.suppress(PowerCut):
                install(device, release)
            assert again.off, f"{where}: the retry's boundary {cuts[1]} was not reached"
            point, path = again.points[-1]
            where += f", then cut {cuts[1]} of the retry at {point} {path.name}"
            made += 1
            assert_safe_after_cut(device, before, "a", "b", IMAGES, where)
            records = device.power_on()
            assert records[-1].image is not None, f"{where}: {records}"
            assert records[-1].action in ("confirmed", "committed"), f"{where}: {records}"
            if records[-1].image.version == "2.0.0":
                count_cuts(firmware, "delta install", made)
                return
        elif any(journal.get("verified", {}).values()):
            # the retry is cut too, at its first flush: the pages its first writes landed in
            # are lost, and with them anything the journal vouched for in those pages
            with (
                PowerSwitch(cut_at_first="slot:before-flush").installed() as again,
                contextlib.suppress(PowerCut),
            ):
                install(device, release)
            if again.off:
                made += 1
                device.power_on()
        fetched = install(device, release)
        planned = device.events("install.delta_planned")[-1]
        if planned["found"]["journal"]:
            resumed += 1
            assert fetched <= full, f"{where}: fetched {fetched} again, {full} in one go"
        assert device.slot_path("b").read_bytes().startswith(IMAGES["2.0.0"]), where
        assert device.pending_reboot is not None, where
        records = device.settle(BootEvent(BootCause.REBOOT, tuple(device.pending_reboot)))
        assert records[-1].action == "committed", f"{where}: {records}"
        assert records[-1].image is not None and records[-1].image.version == "2.0.0", where
        count_cuts(firmware, "delta install", made)

    for cut_at in range(len(points)):
        run((cut_at,))
    assert resumed > 5, resumed
    rng = cut_mode.rng(f"{firmware} delta install")
    for pair in second_cuts(rng, retried, retry_boundaries, cut_mode.second_cuts(len(points))):
        run(pair)
