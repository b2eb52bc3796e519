"""The installer's safety rules on plain files: what it refuses before writing a byte, and what
a failed install leaves in the bootloader (the GRUB backend's grubenv, read back through the
backend and the block itself)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import os
import re
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from bootloader_hooks import grub, grubenv
from bootloader_hooks.base import BootSelector, provision
from fleet_core import durable
from image_builder.bundle import BundleReader, read_bundle_info
from image_builder.bundle_writer import ImageSource, create_bundle
from image_builder.errors import BundleCompatibilityError, BundleError
from image_builder.manifest import Manifest
from signing.keyring import Keyring
from signing.keys import SigningKey
from tests.conftest import raw_bundle, signed_members
from tests.server_simulator import ServerSimulator, split_bundle
from updater import install as install_module
from updater import slots as slots_module
from updater.config import UpdaterConfig
from updater.device import run_reboot
from updater.errors import (
    DownloadError,
    InstallAbandonedError,
    InstallError,
    PreconditionError,
    SlotError,
    StateError,
)
from updater.install import (
    Installer,
    InstallResult,
    Sensors,
    check_blob_urls,
    checked_targets,
)
from updater.log import EventLog
from updater.slots import PARTLABEL, SlotTarget
from updater.state import DeviceState, SlotState, StateStore

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
        self.grubenv = root / "esp" / "EFI" / "fleet" / "grubenv"
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
        provision("grub", root / "esp")
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


# --- each step, as the log and the device see it ------------------------------------------


class SteppedClock:
    """A monotonic clock for the installer that returns ``values`` in turn, then the last one
    for ever; :meth:`advance` moves it on from wherever it is."""

    def __init__(self, *values: float) -> None:
        self._values = list(values)
        self.now = self._values.pop(0)

    def __call__(self) -> float:
        now = self.now
        if self._values:
            self.now = self._values.pop(0)
        return now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class WatchedBackend(FakeBackend):
    """A committed fake backend that also records what the state store says about the target
    slot at the moment each bootloader action is taken."""

    def __init__(self, store: StateStore) -> None:
        super().__init__(booted="a", primary="a", trial=False)
        self.store = store
        self.seen: list[tuple[str, SlotState]] = []

    def _record(self, action: str, slot: str) -> None:
        self.seen.append((action, self.store.load().state.slot(slot)))

    def try_once(self, slot: str) -> None:
        self._record("try_once", slot)
        super().try_once(slot)

    def mark_bad(self, slot: str) -> None:
        self._record("mark_bad", slot)
        super().mark_bad(slot)


def installer_for(device: Device, backend: BootSelector | None = None, **options: Any) -> Installer:
    """The device's installer with other hooks: ``options`` as :class:`Installer` takes them
    (``sensors`` too)."""
    sensors = options.pop(
        "sensors", Sensors(temperature_c=lambda: None, free_space_mb=lambda: 1 << 20)
    )
    options.setdefault("reboot", lambda command: None)
    return Installer(
        device.config, lambda: backend or device.grub, device.store, device.log, sensors,
        **options,
    )  # fmt: skip


def with_boot_slots(device: Device) -> None:
    """Give both root slots of ``device`` a bootfs partition (a file) beside the rootfs."""
    slots = {}
    for slot in ("a", "b"):
        boot = device.root / f"boot_{slot}.img"
        boot.write_bytes(bytes(SLOT_SIZE))
        slots[slot] = {**device.config.slots[slot], "bootfs": str(boot)}
    device.config = dataclasses.replace(device.config, slots=slots)


def logged(log: EventLog) -> list[dict[str, Any]]:
    """The events as written, without their wall-clock timestamps."""
    return [{k: v for k, v in e.items() if k != "ts"} for e in log.events]


def unstamped(state: SlotState) -> SlotState:
    return dataclasses.replace(state, updated_at=None)


def manifest_bytes_of(bundle: Path) -> bytes:
    return split_bundle(bundle)[0]


@pytest.fixture
def boundaries() -> Iterator[list[tuple[str, Path, str]]]:
    """The write boundaries (where the lab cuts the power) passed during the test: point, file
    and the thread that reached it."""
    seen: list[tuple[str, Path, str]] = []

    def hook(point: str, path: Path) -> None:
        seen.append((point, path, threading.current_thread().name))

    previous = durable.set_boundary_hook(hook)
    try:
        yield seen
    finally:
        durable.set_boundary_hook(previous)


def test_an_install_logs_each_step_with_what_it_did(
    device: Device, make_bundle: Callable[..., Path], key: SigningKey
) -> None:
    """The log of an install reads as its trace: every step, in order, with the slot, sizes
    and versions a query in Loki would look for; progress counts the flushed bytes."""
    bundle = make_bundle(size=5000, version="2.0.0", security_version=3)
    clock = SteppedClock(100.0)
    progress: list[tuple[int, int]] = []
    reboots: list[list[str]] = []

    def report(done: int, total: int) -> None:
        progress.append((done, total))
        if done == total:
            clock.advance(1.23456)

    installer = installer_for(
        device, clock=clock, progress=report, reboot=lambda c: reboots.append(list(c)),
        write_chunk=1000, flush_bytes=2000,
    )  # fmt: skip
    result = installer.install(str(bundle))
    seconds = 101.23456 - 100.0
    assert result == InstallResult("b", "2.0.0", 5000, seconds, True)
    assert progress == [(2000, 5000), (4000, 5000), (5000, 5000)]
    command = list(device.grub.reboot_command())
    assert reboots == [command]
    assert logged(device.log) == [
        {"level": "info", "event": "install.started", "source": str(bundle)},
        {"level": "info", "event": "install.verified", "security_version": 3,
         "signed_by": [key.key_id], "slot": "b", "version": "2.0.0",
         "boot_state_damaged": False},
        {"level": "info", "event": "install.slot_marked", "slot": "b", "status": "installing"},
        {"level": "info", "event": "install.image_started", "bytes": 5000,
         "path": str(device.slot("b")), "slot": "b", "slot_class": "rootfs"},
        {"level": "info", "event": "install.progress", "bytes": 2000, "total": 5000},
        {"level": "info", "event": "install.progress", "bytes": 4000, "total": 5000},
        {"level": "info", "event": "install.progress", "bytes": 5000, "total": 5000},
        {"level": "info", "event": "install.trial_armed", "slot": "b"},
        {"level": "info", "event": "install.finished", "bytes": 5000, "reboot": True,
         "seconds": 1.235, "slot": "b", "version": "2.0.0", "armed": "trial"},
        {"level": "info", "event": "install.rebooting", "command": command},
    ]  # fmt: skip
    assert device.slot("b").read_bytes()[:5000] == image_of(bundle)


@pytest.mark.parametrize(
    ("chunk", "flush", "reported"),
    [
        (1000, 1000, [1000, 2000, 3000, 4000, 5000, 6000]),
        (1000, 2000, [2000, 4000, 6000]),
        (1500, 2000, [3000, 4000, 6000]),
        (4 << 20, 2000, [4000, 6000]),
    ],
    ids=["every-chunk", "every-other-chunk", "after-crossing", "one-chunk"],
)
def test_progress_counts_the_bytes_flushed_into_every_slot(
    device: Device,
    make_bundle: Callable[..., Path],
    chunk: int,
    flush: int,
    reported: list[int],
) -> None:
    """Two images (rootfs 4000 bytes, then bootfs 2000): what is reported while writing is
    what has been flushed (once the next chunk is read), counted across the images; the end
    of each image reports all of it."""
    with_boot_slots(device)
    bundle = make_bundle(size=4000, bootfs=True)
    progress: list[tuple[int, int]] = []
    installer = installer_for(
        device, progress=lambda done, total: progress.append((done, total)),
        write_chunk=chunk, flush_bytes=flush,
    )  # fmt: skip
    result = installer.install(str(bundle), reboot=False)
    assert result.bytes_written == 6000
    assert progress == [(done, 6000) for done in reported]
    assert [e["bytes"] for e in device.log.events if e["event"] == "install.progress"] == [
        done for done, _ in progress
    ]
    images = bundle.parent / "images"
    assert device.slot("b").read_bytes()[:4000] == (images / "rootfs.ext4").read_bytes()
    boot_b = Path(device.config.slots["b"]["bootfs"]).read_bytes()
    assert boot_b[:2000] == (images / "bootfs.vfat").read_bytes()


def test_the_slot_is_flushed_every_flush_bytes_by_the_writer_thread_and_at_the_end(
    device: Device, make_bundle: Callable[..., Path], boundaries: list[tuple[str, Path, str]]
) -> None:
    """The write boundaries of the slot (where the lab's power cuts fall): opened, flushed
    every ``flush_bytes`` beside the reading (on the slot writer's thread), flushed once more
    at the end, done."""
    bundle = make_bundle(size=5000)
    installer_for(device, write_chunk=1000, flush_bytes=2000).install(str(bundle), reboot=False)
    slot = device.slot("b")
    points = [(p, path, thread) for p, path, thread in boundaries if p.startswith("slot:")]
    assert [(p, path) for p, path, _ in points] == [
        ("slot:begin", slot),
        ("slot:before-flush", slot),
        ("slot:before-flush", slot),
        ("slot:before-flush", slot),
        ("slot:done", slot),
    ]
    assert all(thread.startswith("slot-writer") for _, _, thread in points[1:3]), points


def test_the_target_is_installing_before_its_first_byte_and_installed_before_its_trial(
    device: Device, make_bundle: Callable[..., Path]
) -> None:
    """What the state store says about the target at each step: whatever it held before (here
    a bad release with trial boots counted), it is ``installing`` the new release, with no
    trial boots, when the slot is opened; ``installed`` when the bootloader arms the trial;
    ``trial`` at the end."""
    device.store.save(
        device.store.load().state.with_slot(
            "b", status="bad", version="0.9.0", bundle_sha256="0" * 64, security_version=0,
            trial_boots=2,
        )
    )  # fmt: skip
    bundle = make_bundle(version="2.0.0", security_version=4)
    sha = hashlib.sha256(manifest_bytes_of(bundle)).hexdigest()
    backend = WatchedBackend(device.store)
    at_begin: list[SlotState] = []

    def hook(point: str, path: Path) -> None:
        if point == "slot:begin":
            at_begin.append(device.store.load().state.slot("b"))

    previous = durable.set_boundary_hook(hook)
    try:
        installer_for(device, backend).install(str(bundle), reboot=False)
    finally:
        durable.set_boundary_hook(previous)
    installing = SlotState(
        status="installing", version="2.0.0", bundle_sha256=sha, security_version=4
    )
    assert [unstamped(s) for s in at_begin] == [installing]
    assert [(action, s.status) for action, s in backend.seen] == [
        ("mark_bad", "bad"),
        ("try_once", "installed"),
    ]
    assert unstamped(backend.seen[1][1]) == dataclasses.replace(installing, status="installed")
    final = device.store.load().state.slot("b")
    assert unstamped(final) == dataclasses.replace(installing, status="trial")
    assert device.store.load().state.slot("a").status == "good"


def slot_io_failing(
    monkeypatch: pytest.MonkeyPatch, call: str, slot: Path, after: int, errno_: int
) -> None:
    """Make ``os.<call>`` on ``slot`` fail with ``errno_`` once ``after`` bytes have been
    written to it (other files are untouched)."""
    real = getattr(os, call)
    written = 0

    def failing(fd: int, *args: Any) -> Any:
        nonlocal written
        if os.path.samestat(os.fstat(fd), slot.stat()):
            if written >= after:
                raise OSError(errno_, os.strerror(errno_))
            if call == "write":
                written += len(args[0])
        return real(fd, *args)

    monkeypatch.setattr(os, call, failing)


@pytest.mark.parametrize("after", [0, 2000], ids=["the-only-chunk", "halfway"])
def test_a_failing_slot_write_fails_the_install_naming_the_slot_and_marks_it_bad(
    device: Device,
    make_bundle: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    after: int,
) -> None:
    """The error names the slot and the system's reason; the failure is logged as an error
    naming the slot; the slot is bad in the state store and in the bootloader. Failing in the
    only chunk (the one whose write is still pending when the reading ends) too."""
    bundle = make_bundle(size=5000)
    slot = device.slot("b")
    slot_io_failing(monkeypatch, "write", slot, after, errno.ENOSPC)
    chunk = 1000 if after else 4 << 20
    problem = f"slot {slot}: write failed: No space left on device"
    with pytest.raises(InstallError, match=f"^install into slot b failed: {re.escape(problem)}$"):
        installer_for(device, write_chunk=chunk).install(str(bundle), reboot=False)
    assert logged(device.log)[-1] == {
        "level": "error",
        "event": "install.failed",
        "slot": "b",
        "error": problem,
    }
    assert device.store.load().state.slot("b").status == "bad"
    assert device.grub.attempts_left("b") == 0 and device.grub.primary() == "a"


def test_a_failing_slot_flush_fails_the_install_naming_the_slot(
    device: Device, make_bundle: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    slot = device.slot("b")
    slot_io_failing(monkeypatch, "fdatasync", slot, 0, errno.EIO)
    problem = f"slot {slot}: flush failed: Input/output error"
    with pytest.raises(InstallError, match=re.escape(problem)):
        installer_for(device).install(str(make_bundle()), reboot=False)
    assert device.log.events[-1]["error"] == problem
    assert device.store.load().state.slot("b").status == "bad"


def test_a_slot_that_cannot_be_opened_is_named_with_the_reason(
    device: Device, make_bundle: Callable[..., Path], keyring: Keyring
) -> None:
    missing = device.root / "gone.img"
    bundle = make_bundle()
    with bundle.open("rb") as stream:
        reader = BundleReader(stream, name=str(bundle))
        reader.verify(keyring)
        targets = {"rootfs": SlotTarget("b", "rootfs", missing, SLOT_SIZE)}
        message = f"slot {missing}: cannot open: No such file or directory"
        with pytest.raises(InstallError, match=f"^{re.escape(message)}$"):
            installer_for(device).write_images(reader, targets)


class FailingBadMarks(StateStore):
    """A state store whose data partition fails just when a slot is to be marked bad."""

    def save(self, state: DeviceState) -> DeviceState:
        if any(s.status == "bad" for s in state.slots.values()):
            raise StateError(f"state {self.path}: cannot write: Read-only file system")
        return super().save(state)


def test_a_failed_install_whose_bad_mark_cannot_be_saved_logs_both(
    device: Device, make_bundle: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The install's own error is what the caller gets; the state store's failure is logged
    after it, as an error; the bootloader still has the slot bad."""
    device.store = FailingBadMarks(device.config.data_dir)
    slot = device.slot("b")
    slot_io_failing(monkeypatch, "write", slot, 0, errno.EIO)
    with pytest.raises(InstallError, match="write failed: Input/output error"):
        installer_for(device).install(str(make_bundle()), reboot=False)
    failed, save_failed = logged(device.log)[-2:]
    assert failed["event"] == "install.failed" and failed["level"] == "error"
    assert save_failed == {
        "level": "error",
        "event": "state.save_failed",
        "error": f"state {device.store.path}: cannot write: Read-only file system",
    }
    assert device.store.load().state.slot("b").status == "installing"
    assert device.grub.attempts_left("b") == 0


def test_an_install_at_its_deadline_goes_on_and_one_past_it_is_abandoned(
    device: Device, make_bundle: Callable[..., Path]
) -> None:
    bundle = make_bundle()
    deadline = device.config.limits.update_deadline_s
    result = installer_for(device, clock=SteppedClock(0.0, float(deadline))).install(
        str(bundle), reboot=False
    )
    assert result.slot == "b" and result.seconds == deadline
    late = SteppedClock(0.0, deadline + 0.001)
    message = f"install exceeded its {deadline} s deadline: abandoned"
    with pytest.raises(InstallError, match=f"^install into slot b failed: {message}$"):
        installer_for(device, clock=late).install(str(bundle), reboot=False)
    assert logged(device.log)[-1] == {
        "level": "error",
        "event": "install.failed",
        "slot": "b",
        "error": message,
    }
    assert device.store.load().state.slot("b").status == "bad"


def test_a_bundle_from_a_url_gets_the_install_deadline(
    device: Device, make_bundle: Callable[..., Path], server: ServerSimulator
) -> None:
    """A server that drips bytes cannot keep an install alive past its deadline: the download
    itself stops (a download error, before the target is touched)."""
    bundle = make_bundle()
    server.blobs["release.bundle"] = bundle.read_bytes()
    url = f"{server.url}/blobs/release.bundle"
    before = device.snapshot()
    late = {"clock": lambda: device.config.limits.update_deadline_s + 1.0}
    installer = installer_for(device, clock=SteppedClock(0.0), http_options=late)
    with pytest.raises(DownloadError, match="deadline passed at byte 0"):
        installer.install(url, reboot=False)
    assert device.snapshot() == before
    # in time, the same URL installs
    assert installer_for(device).install(url, reboot=False).slot == "b"


def test_the_server_s_ca_file_verifies_every_download_of_an_install(device: Device) -> None:
    """[server] ca_file: blobs and mirrors over https:// are verified with it, as the server is;
    without one, with the system's store (requests' default: no "verify" given)."""
    started = 100.0
    plain = installer_for(device).http(started)
    assert "verify" not in plain
    assert plain["deadline"] == started + device.config.limits.update_deadline_s
    ca = device.root / "fleet-ca.pem"
    device.config = dataclasses.replace(device.config, server_ca_file=ca)
    assert installer_for(device).http(started)["verify"] == str(ca)


def test_install_reboots_unless_told_not_to_and_names_its_source_in_errors(
    device: Device, make_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    bundle = make_bundle()
    reboots: list[list[str]] = []
    result = installer_for(device, reboot=lambda c: reboots.append(list(c))).install(str(bundle))
    assert result.rebooting is True and reboots == [list(device.grub.reboot_command())]
    truncated = tmp_path / "truncated.bundle"
    truncated.write_bytes(bundle.read_bytes()[:700])
    with pytest.raises(BundleError, match=f"^{re.escape(str(truncated))}: truncated"):
        device.installer().install(str(truncated), reboot=False)


def test_a_damaged_state_file_is_logged_and_the_install_goes_on(
    device: Device, make_bundle: Callable[..., Path]
) -> None:
    device.store.path.write_text("{not json")
    problem = device.store.load().problem
    assert problem is not None
    device.installer().install(str(make_bundle()), reboot=False)
    assert logged(device.log)[0] == {
        "level": "warning",
        "event": "state.damaged",
        "detail": problem,
    }
    assert device.store.load().state.slot("b").status == "trial"


# --- a release in parts ----------------------------------------------------------------------


class Mirrors:
    """Stands in for the HTTP mirrors of a release's blobs: serves ``blobs`` (by SHA-256) from
    memory and records what each image stream was opened with."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.opened: list[tuple[list[str], dict[str, Any]]] = []

    def __call__(self, urls: list[str], **options: Any) -> io.BytesIO:
        self.opened.append((list(urls), options))
        return io.BytesIO(self.blobs[urls[0].rsplit("/", 1)[-1]])


def urls_of(blobs: dict[str, bytes]) -> dict[str, list[str]]:
    return {sha: [f"https://fleet.example/blobs/{sha}"] for sha in blobs}


@pytest.fixture
def parts(
    make_bundle: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> tuple[bytes, bytes, Mirrors]:
    """A release in parts (manifest, signatures, blobs) behind :class:`Mirrors`."""
    manifest, signatures, blobs = split_bundle(make_bundle(version="2.0.0", chunked=False))
    mirrors = Mirrors(blobs)
    monkeypatch.setattr(install_module, "MirroredStream", mirrors)
    return manifest, signatures, mirrors


def test_a_release_in_parts_streams_its_images_with_the_install_deadline_and_log(
    device: Device, parts: tuple[bytes, bytes, Mirrors]
) -> None:
    """Every image stream gets the installer's log (for mirror switches), its HTTP options and
    the deadline counted from the install's start; by default the release is called
    ``release`` and the device reboots into it."""
    manifest, signatures, mirrors = parts
    reboots: list[list[str]] = []
    clock = SteppedClock(100.0, 130.0)
    installer = installer_for(
        device, clock=clock, http_options={"timeout_s": 5.0},
        reboot=lambda c: reboots.append(list(c)),
    )  # fmt: skip
    result = installer.install_parts(manifest, signatures, urls_of(mirrors.blobs))
    assert result.rebooting is True and len(reboots) == 1
    assert device.log.events[0]["event"] == "install.started"
    assert device.log.events[0]["source"] == "release"
    deadline = 100.0 + device.config.limits.update_deadline_s
    assert mirrors.opened == [
        (urls, {"log": device.log, "deadline": deadline, "timeout_s": 5.0})
        for urls in urls_of(mirrors.blobs).values()
    ]
    assert device.store.load().state.slot("b").status == "trial"


def test_a_parts_reader_counts_its_deadline_from_the_given_start_or_from_now(
    device: Device, parts: tuple[bytes, bytes, Mirrors], keyring: Keyring
) -> None:
    manifest, signatures, mirrors = parts
    installer = installer_for(device, clock=SteppedClock(130.0))
    limit = device.config.limits.update_deadline_s
    for started, deadline in ((None, 130.0 + limit), (50.0, 50.0 + limit)):
        reader = installer.parts_reader(manifest, signatures, urls_of(mirrors.blobs), "r", started)
        reader.verify(keyring)
        next(reader.images())
        assert mirrors.opened[-1][1]["deadline"] == deadline


def test_a_release_in_parts_is_named_in_its_errors(
    device: Device, parts: tuple[bytes, bytes, Mirrors]
) -> None:
    manifest, signatures, mirrors = parts
    (sha,) = mirrors.blobs
    mirrors.blobs[sha] = bytes(b ^ 1 for b in mirrors.blobs[sha])
    with pytest.raises(InstallError, match=r"install into slot b failed: 2\.0\.0 \(rollout 7\): "):
        device.installer().install_parts(
            manifest, signatures, urls_of(mirrors.blobs), name="2.0.0 (rollout 7)", reboot=False
        )
    assert device.log.events[0]["source"] == "2.0.0 (rollout 7)"
    assert device.store.load().state.slot("b").status == "bad"


def test_a_release_with_an_image_without_url_is_refused_before_writing(
    device: Device, parts: tuple[bytes, bytes, Mirrors]
) -> None:
    manifest, signatures, mirrors = parts
    filename = Manifest.from_bytes(manifest).images[0].filename
    before = device.snapshot()
    with pytest.raises(DownloadError, match=f"^release: no URL for image\\(s\\) {filename}$"):
        device.installer().install_parts(manifest, signatures, {}, reboot=False)
    (sha,) = mirrors.blobs
    with pytest.raises(DownloadError, match=f"^v2: no URL for image\\(s\\) {filename}$"):
        device.installer().install_parts(manifest, signatures, {sha: []}, name="v2")
    assert device.snapshot() == before and mirrors.opened == []


def test_every_image_without_url_is_named(make_bundle: Callable[..., Path]) -> None:
    manifest, _ = read_bundle_info(make_bundle(bootfs=True))
    rootfs, bootfs = manifest.images
    with pytest.raises(
        DownloadError,
        match=f"^r: no URL for image\\(s\\) {rootfs.filename}, {bootfs.filename}$",
    ):
        check_blob_urls(manifest, {}, "r")
    check_blob_urls(manifest, {rootfs.sha256: ["u"], bootfs.sha256: ["v"]}, "r")


def test_an_abandoned_install_is_a_warning_and_leaves_its_slot_bad(
    device: Device, parts: tuple[bytes, bytes, Mirrors]
) -> None:
    """The server withdrew the release while it was being written: the install stops with the
    caller's reason, logged as a warning (nothing broke), and the half-written slot is bad."""
    manifest, signatures, mirrors = parts
    asked: list[int] = []

    def withdrawn() -> str | None:
        asked.append(1)
        return "release withdrawn" if len(asked) > 2 else None

    installer = installer_for(device, write_chunk=1000)
    with pytest.raises(InstallAbandonedError, match="^install abandoned: release withdrawn$"):
        installer.install_parts(
            manifest, signatures, urls_of(mirrors.blobs), reboot=False, abandon=withdrawn
        )
    assert logged(device.log)[-1] == {
        "level": "warning",
        "event": "install.abandoned",
        "slot": "b",
        "error": "install abandoned: release withdrawn",
    }
    assert device.store.load().state.slot("b").status == "bad"
    assert device.grub.attempts_left("b") == 0


def test_writing_images_alone_can_be_abandoned(
    device: Device, make_bundle: Callable[..., Path], keyring: Keyring
) -> None:
    bundle = make_bundle()
    with bundle.open("rb") as stream:
        reader = BundleReader(stream, name=str(bundle))
        manifest = reader.verify(keyring)
        targets = checked_targets(device.config, manifest, "b")
        with pytest.raises(InstallAbandonedError, match="^install abandoned: stop$"):
            installer_for(device).write_images(reader, targets, abandon=lambda: "stop")
    assert device.slot("b").read_bytes() == b"b" * SLOT_SIZE


# --- what is refused, in words that name it ---------------------------------------------------


def test_preconditions_refuse_in_words_that_name_the_problem(
    device: Device, tmp_path: Path
) -> None:
    state = device.store.load().state
    cases: list[tuple[UpdaterConfig, DeviceState, str]] = [
        (dataclasses.replace(device.config, keyring=None), state,
         "no keyring configured: refusing to install anything"),
        (dataclasses.replace(device.config, compatible=""), state,
         "no compatible string configured: refusing to install"),
        (device.config, dataclasses.replace(state, suspended="crash loop"),
         "updates are suspended: crash loop"),
        (dataclasses.replace(device.config, keyring=tmp_path / "nowhere"), state,
         f"cannot install without a usable keyring: keyring {tmp_path / 'nowhere'}: "
         "no such directory"),
    ]  # fmt: skip
    for config, current, message in cases:
        device.config = config
        with pytest.raises(PreconditionError, match=f"^{re.escape(message)}$"):
            device.installer().check_preconditions(current)


@pytest.mark.parametrize(
    ("temperature", "refused"), [(None, False), (79.9, False), (80.0, False), (80.5, True)]
)
def test_a_device_above_its_temperature_limit_defers_the_update(
    device: Device, temperature: float | None, refused: bool
) -> None:
    sensors = Sensors(temperature_c=lambda: temperature, free_space_mb=lambda: 1 << 20)
    installer = installer_for(device, sensors=sensors)
    state = device.store.load().state
    if not refused:
        assert installer.check_preconditions(state).active_key_ids
        return
    with pytest.raises(
        PreconditionError, match="^CPU at 80.5 °C, above the 80.0 °C limit: update deferred$"
    ):
        installer.check_preconditions(state)


@pytest.mark.parametrize(("free", "refused"), [(500, False), (499, True)])
def test_a_device_short_of_free_space_skips_the_update(
    device: Device, free: int, refused: bool
) -> None:
    sensors = Sensors(temperature_c=lambda: 20.0, free_space_mb=lambda: free)
    installer = installer_for(device, sensors=sensors)
    state = device.store.load().state
    if not refused:
        assert installer.check_preconditions(state).active_key_ids
        return
    message = "499 MB free on the data partition, below 500 MB: update skipped"
    with pytest.raises(PreconditionError, match=f"^{message}$"):
        installer.check_preconditions(state)


def test_verification_refusals_name_the_problem(
    device: Device,
    make_bundle: Callable[..., Path],
    key: SigningKey,
    keyring: Keyring,
    tmp_path: Path,
) -> None:
    def verify(bundle: Path, backend: BootSelector | None = None) -> None:
        with bundle.open("rb") as stream:
            reader = BundleReader(stream, name=str(bundle))
            installer_for(device, backend).verify_manifest(
                reader, keyring, device.store.load().state
            )

    device.updated_once()
    with pytest.raises(
        BundleCompatibilityError,
        match="^security version 0 is below the installed 1: downgrade refused$",
    ):
        verify(make_bundle("old.bundle", security_version=0))
    bundle = make_bundle(security_version=1)
    with pytest.raises(
        SlotError, match="^running from slot 'recovery': install only from a root slot$"
    ):
        verify(bundle, FakeBackend(booted="recovery", primary="a"))
    with pytest.raises(
        PreconditionError,
        match="^slot a is running a trial that is not committed yet: "
        "the boot check must decide it before another install$",
    ):
        verify(bundle, FakeBackend(booted="a", primary="a", trial=True))
    boot = tmp_path / "images" / "bootfs.vfat"
    boot.write_bytes(b"boot" * 100)
    boot_only = tmp_path / "boot-only.bundle"
    create_bundle(
        boot_only, images=[ImageSource("bootfs", boot)], keys=[key], compatible=COMPATIBLE,
        version="2.1.0", security_version=1, compression="none", created=1_700_000_000,
    )  # fmt: skip
    with_boot_slots(device)
    with pytest.raises(SlotError, match="^bundle has no rootfs image$"):
        verify(boot_only, FakeBackend(booted="b", primary="b"))


@pytest.mark.parametrize("lose", ["deleted", "garbled"])
def test_a_downgrade_stays_refused_when_the_state_file_is_lost(
    device: Device, make_bundle: Callable[..., Path], lose: str
) -> None:
    device.updated_once()
    if lose == "deleted":
        device.store.path.unlink()
    else:
        device.store.path.write_bytes(b"\x00garbled")
    bundle = make_bundle("old.bundle", security_version=0)
    slot_a = device.slot("a").read_bytes()

    with pytest.raises(
        BundleCompatibilityError,
        match="^security version 0 is below the installed 1: downgrade refused$",
    ):
        device.installer().install(str(bundle), reboot=False)

    assert device.slot("a").read_bytes() == slot_a
    assert grub.boot_order(device.env()) == ["b", "a"]


def test_a_slot_without_the_slot_class_a_bundle_needs_is_refused(
    device: Device, make_bundle: Callable[..., Path]
) -> None:
    manifest, _ = read_bundle_info(make_bundle(bootfs=True))
    with pytest.raises(SlotError, match=r"^slot b has no bootfs \(bundle needs one\)$"):
        checked_targets(device.config, manifest, "b")


def test_slots_named_by_partition_label_are_found_in_the_partlabel_directory(
    device: Device, make_bundle: Callable[..., Path]
) -> None:
    labels = device.root / "by-partlabel"
    labels.mkdir()
    for slot in ("a", "b"):
        (labels / f"rootfs_{slot}").symlink_to(device.slot(slot))
    device.config = dataclasses.replace(
        device.config,
        partlabel_dir=labels,
        slots={s: {"rootfs": f"{PARTLABEL}rootfs_{s}"} for s in ("a", "b")},
    )
    bundle = make_bundle()
    manifest, _ = read_bundle_info(bundle)
    assert checked_targets(device.config, manifest, "b")["rootfs"].path == device.slot("b")
    device.installer().install(str(bundle), reboot=False)
    assert device.slot("b").read_bytes()[:3000] == image_of(bundle)


def test_the_reboot_runs_the_command_and_a_failing_one_is_an_error(tmp_path: Path) -> None:
    marker = tmp_path / "rebooted"
    run_reboot(["touch", str(marker)])
    assert marker.exists()
    with pytest.raises(subprocess.CalledProcessError):
        run_reboot(("false",))
