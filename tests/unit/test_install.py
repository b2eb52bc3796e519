"""The installer's safety rules on plain files: what it refuses before writing a byte, and what
a failed install leaves in the bootloader (the GRUB backend's grubenv, read back through the
backend and the block itself)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from bootloader_hooks import grub, grubenv
from bootloader_hooks.base import BootSelector
from image_builder.bundle import BundleReader, read_bundle_info
from image_builder.errors import BundleError
from signing.keyring import Keyring
from signing.keys import SigningKey
from tests.conftest import raw_bundle, signed_members
from updater import slots as slots_module
from updater.config import UpdaterConfig
from updater.errors import InstallError, PreconditionError, SlotError
from updater.install import Installer, Sensors, checked_targets
from updater.log import EventLog
from updater.state import DeviceState, StateStore

SLOT_SIZE = 64 * 1024
COMPATIBLE = "metrica-rpi4"


class FakeBackend:
    """A boot backend whose answers the test sets and whose actions it records: for rules that
    must hold whatever a firmware reports, in combinations a real backend cannot produce."""

    name = "fake"

    def __init__(self, booted: str = "a", primary: str | None = "a", trial: bool = False) -> None:
        self._booted, self._primary, self._trial = booted, primary, trial
        self.actions: list[tuple[str, str]] = []

    def booted(self) -> str:
        return self._booted

    def primary(self) -> str | None:
        return self._primary

    def is_trial(self) -> bool:
        return self._trial

    def attempts_left(self, slot: str) -> int:
        return 0 if ("mark_bad", slot) in self.actions else 3

    def try_once(self, slot: str) -> None:
        self.actions.append(("try_once", slot))

    def commit(self, slot: str) -> None:
        self.actions.append(("commit", slot))

    def mark_bad(self, slot: str) -> None:
        self.actions.append(("mark_bad", slot))

    def reboot_command(self) -> list[str]:
        return ["reboot"]


class Device:
    """A device on files: two slot files, a data directory, GRUB's grubenv and the kernel
    command line (the backend unless a test gives another)."""

    def __init__(self, root: Path, keyring_dir: Path, slot_size: int = SLOT_SIZE) -> None:
        self.root = root
        self.grubenv = root / "esp" / "grubenv"
        self.cmdline = root / "cmdline"
        self.grubenv.parent.mkdir(parents=True)
        for slot in ("a", "b"):
            self.slot(slot).write_bytes(bytes([ord(slot)]) * slot_size)
        self.config = UpdaterConfig(
            compatible=COMPATIBLE,
            keyring=keyring_dir,
            data_dir=root / "data",
            bootloader={"backend": "grub", "grubenv": str(self.grubenv),
                        "cmdline": str(self.cmdline)},
            slots={s: {"rootfs": str(self.slot(s))} for s in ("a", "b")},
        )  # fmt: skip
        self.grub = grub.GrubBackend(self.grubenv, self.cmdline)
        self.store = StateStore(self.config.data_dir)
        self.log = EventLog(keep=True)
        self.running("a")
        self.grub.repair("a")
        self.store.save(DeviceState().with_slot("a", status="good", version="1.0.0"))

    def slot(self, name: str) -> Path:
        return self.root / f"slot_{name}.img"

    def running(self, slot: str) -> None:
        self.cmdline.write_text(f"BOOT_IMAGE=/vmlinuz ro fleet.slot={slot}\n")

    def updated_once(self) -> None:
        """As after one committed update: 2.0.0 runs from b, 1.0.0 in a is its fallback."""
        self.grub.commit("b")
        self.running("b")
        self.store.save(
            DeviceState(installed_security_version=1)
            .with_slot("a", status="good", version="1.0.0")
            .with_slot("b", status="good", version="2.0.0", security_version=1)
        )
        assert grub.boot_order(self.env()) == ["b", "a"] and self.grub.attempts_left("a") > 0

    def installer(self, backend: BootSelector | None = None) -> Installer:
        return Installer(
            self.config,
            lambda: backend or self.grub,
            self.store,
            self.log,
            Sensors(temperature_c=lambda: None, free_space_mb=lambda: 1 << 20),
            reboot=lambda command: None,
        )

    def env(self) -> dict[str, str]:
        return grubenv.read(self.grubenv).variables()

    def snapshot(self) -> tuple[bytes, bytes, bytes, DeviceState]:
        return (
            self.slot("a").read_bytes(),
            self.slot("b").read_bytes(),
            self.grubenv.read_bytes(),
            self.store.load().state,
        )


@pytest.fixture
def device(tmp_path: Path, keyring_dir: Path) -> Device:
    return Device(tmp_path / "device", keyring_dir)


def image_of(bundle: Path) -> bytes:
    return (bundle.parent / "images" / "rootfs.ext4").read_bytes()


# --- sizes ---------------------------------------------------------------------------------


def test_an_image_exactly_the_size_of_its_slot_is_installed(
    device: Device, make_bundle: Callable[..., Path]
) -> None:
    bundle = make_bundle(size=SLOT_SIZE, compression="zstd")
    result = device.installer().install(str(bundle), reboot=False)
    assert (result.slot, result.bytes_written) == ("b", SLOT_SIZE)
    assert device.slot("b").read_bytes() == image_of(bundle)
    assert grub.trial_in(device.env()) == "b"


def test_an_image_one_byte_larger_than_its_slot_is_refused_before_writing(
    device: Device, make_bundle: Callable[..., Path]
) -> None:
    bundle = make_bundle(size=SLOT_SIZE + 1, compression="zstd")
    before = device.snapshot()
    with pytest.raises(SlotError, match=f"{SLOT_SIZE + 1} bytes does not fit slot b"):
        device.installer().install(str(bundle), reboot=False)
    assert device.snapshot() == before


# --- never the running root filesystem -----------------------------------------------------


def test_the_device_holding_the_mounted_root_is_never_a_target(
    device: Device,
    make_bundle: Callable[..., Path],
    keyring_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever the configuration and the bootloader say, the block device the running root
    file system lives on is refused before anything is written (only the checks run here:
    the node below is the real root device)."""
    node = device.root / "root-device"
    os.mknod(node, stat.S_IFBLK | 0o600, Path("/").stat().st_dev)
    # the size of the real disk does not matter here, and it is not opened
    monkeypatch.setattr(slots_module, "capacity", lambda path: SLOT_SIZE)
    slots = {"a": device.config.slots["a"], "b": {"rootfs": str(node)}}
    config = dataclasses.replace(device.config, slots=slots)
    bundle = make_bundle(size=1000)
    manifest, _ = read_bundle_info(bundle)
    with pytest.raises(SlotError, match="holds the running root filesystem"):
        checked_targets(config, manifest, "b")
    # the installer's verification step goes through it (it writes nothing, refused or not)
    device.config = config
    with bundle.open("rb") as stream, pytest.raises(SlotError, match="running root filesystem"):
        reader = BundleReader(stream, name=str(bundle))
        device.installer().verify_manifest(reader, Keyring.load(keyring_dir), DeviceState())
    # a plain file in the same place is a target like any other
    assert checked_targets(device.config, manifest, "a")["rootfs"].path == device.slot("a")


# --- no install while the running slot is undecided ----------------------------------------


@pytest.mark.parametrize(
    ("primary", "trial"),
    [("a", True), ("b", False), (None, False)],
    ids=["on-trial", "not-primary", "no-primary"],
)
def test_no_install_while_the_running_slot_is_not_the_committed_one(
    device: Device, make_bundle: Callable[..., Path], primary: str | None, trial: bool
) -> None:
    """Each half of the rule on its own: a trial boot (even one the firmware already calls
    primary), and a boot of a slot that is not the primary (even without a trial mark)."""
    backend = FakeBackend(booted="a", primary=primary, trial=trial)
    before = device.snapshot()
    with pytest.raises(PreconditionError, match="trial that is not committed"):
        device.installer(backend).install(str(make_bundle()), reboot=False)
    assert backend.actions == []
    assert device.snapshot() == before


def test_a_committed_running_slot_installs_into_the_other(
    device: Device, make_bundle: Callable[..., Path]
) -> None:
    """The same fake backend, committed: the install goes ahead (what the refusals differ by)."""
    backend = FakeBackend(booted="a", primary="a", trial=False)
    bundle = make_bundle()
    device.installer(backend).install(str(bundle), reboot=False)
    assert backend.actions == [("mark_bad", "b"), ("try_once", "b")]
    assert device.slot("b").read_bytes()[: len(image_of(bundle))] == image_of(bundle)


# --- a failed install leaves its slot bad in the bootloader --------------------------------


def forged_bundle(
    path: Path, make_bundle: Callable[..., Path], key: SigningKey, compression: str
) -> Path:
    """A correctly signed bundle whose stored bytes match the manifest but whose image, once
    decompressed, does not: the manifest names the uncompressed SHA-256 of another image of
    the same size."""
    genuine = make_bundle("genuine.bundle", size=5000, compression=compression)
    manifest, _ = read_bundle_info(genuine)
    entry = manifest.images[0]
    image = image_of(genuine)
    other = bytes(b ^ 0x5A for b in image)  # same size, other bytes
    stored = zstandard.ZstdCompressor().compress(other) if compression == "zstd" else other
    forged_entry = dataclasses.replace(
        entry,
        size=len(stored),
        sha256=hashlib.sha256(stored).hexdigest(),
        uncompressed_size=len(other),
        uncompressed_sha256=entry.uncompressed_sha256,  # of ``image``, not of ``other``
    )
    forged = dataclasses.replace(manifest, images=(forged_entry,))
    members = [*signed_members(forged.to_bytes(), key), (entry.filename, stored)]
    path.write_bytes(raw_bundle(members))
    return path


def test_decompressed_bytes_differing_from_the_manifest_fail_the_install(
    device: Device, make_bundle: Callable[..., Path], key: SigningKey, tmp_path: Path
) -> None:
    """Stored bytes that match the manifest are not enough: the uncompressed image written
    into the slot must match it too. The failed slot (here the committed fallback of the
    running one) is left bad in the bootloader, not only in the state store."""
    device.updated_once()
    bundle = forged_bundle(tmp_path / "forged.bundle", make_bundle, key, "zstd")
    running = device.slot("b").read_bytes()
    with pytest.raises(InstallError, match="SHA-256 of image does not match"):
        device.installer().install(str(bundle), reboot=False)
    assert device.slot("b").read_bytes() == running
    env = device.env()
    assert "a" not in grub.boot_order(env) and grub.attempts_in(env, "a") == 0, env
    assert grub.primary_in(env) == "b" and grub.trial_in(env) is None
    assert device.grub.attempts_left("a") == 0 and device.grub.primary() == "b"
    assert device.store.load().state.slot("a").status == "bad"
    assert device.log.events[-1]["event"] == "install.failed"


def test_an_uncompressed_image_with_two_different_hashes_is_refused_before_writing(
    device: Device, make_bundle: Callable[..., Path], key: SigningKey, tmp_path: Path
) -> None:
    """Uncompressed, the stored bytes are the image: a manifest naming another image hash for
    them is refused outright."""
    bundle = forged_bundle(tmp_path / "forged.bundle", make_bundle, key, "none")
    before = device.snapshot()
    with pytest.raises(BundleError, match="uncompressed image with differing stored size or hash"):
        device.installer().install(str(bundle), reboot=False)
    assert device.snapshot() == before


def test_a_write_failing_halfway_leaves_the_fallback_slot_bad_in_the_bootloader(
    device: Device, make_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    """A second install (the target is the previous release, the running slot's fallback)
    that stops halfway: GRUB must never fall back into the half-written slot."""
    device.updated_once()
    bundle = make_bundle(size=SLOT_SIZE, compression="none")
    data = bytearray(bundle.read_bytes())
    data[data.find(image_of(bundle)) + SLOT_SIZE - 1000] ^= 0xFF  # most of it gets written
    damaged = tmp_path / "damaged.bundle"
    damaged.write_bytes(bytes(data))
    with pytest.raises(InstallError, match="install into slot a failed"):
        device.installer().install(str(damaged), reboot=False)
    assert device.slot("a").read_bytes() != bytes([ord("a")]) * SLOT_SIZE  # half written
    env = device.env()
    assert grub.boot_order(env) == ["b"] and grub.attempts_in(env, "a") == 0, env
    assert device.grub.primary() == "b" and device.grub.attempts_left("a") == 0
    assert device.store.load().state.slot("a").status == "bad"
