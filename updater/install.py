"""The install: a signed bundle streamed into the slot that is not running, then armed for one
trial boot.

The steps follow RAUC's order, unsafe until proven safe; each is a method and a log event, so
a log from the field reads as a trace of this file:

1. ``check_preconditions``: keyring and compatible configured, updates not suspended, the device
   not too hot, enough free space on the data partition;
2. ``verify_manifest``: signature against the keyring, ``compatible``, ``security_version`` not
   below the installed one, every image fits its slot; nothing has been written yet;
3. ``mark_installing``: the target slot is ``installing`` in the state store and bad in the
   bootloader before its first byte changes, so a half-written slot is never booted;
4. ``write_images``: stream decompress → hash → write, flushing every ``FLUSH_BYTES``; the image
   stream raises instead of ending if a byte differs from the signed manifest;
5. ``mark_installed`` and ``arm_trial``: ``installed``, then ``try_once``, then ``trial``;
6. reboot (unless told not to).

The booted slot is never written; the bootloader's primary is not changed here (only the boot
check commits). A power cut at any point leaves the old slot primary and bootable; the target
is at worst ``installing`` (ignored, rewritten by the next install).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from bootloader_hooks.base import BootSelector, other_slot
from fleet_core import durable
from fleet_core.errors import FleetError
from image_builder.bundle import BundleImage, BundleReader, SplitBundleReader
from image_builder.errors import BundleCompatibilityError
from image_builder.manifest import Manifest
from signing.errors import KeyringError
from signing.keyring import Keyring
from updater.config import UpdaterConfig
from updater.device import run_reboot
from updater.errors import (
    DownloadError,
    InstallAbandonedError,
    InstallError,
    PreconditionError,
    SlotError,
)
from updater.fetch import MirroredStream, open_source
from updater.lifecycle import SlotLifecycle, below_floor
from updater.log import EventSink
from updater.slots import SlotTarget, check_not_mounted_root, slot_targets
from updater.state import DeviceState, StateStore

FLUSH_BYTES = 64 << 20  # bound the data a power cut can lose, and the page cache in use
WRITE_CHUNK = 4 << 20


@dataclass(frozen=True)
class Sensors:
    """Readings the preconditions need, as functions so tests and the lab can supply them."""

    temperature_c: Callable[[], float | None]
    free_space_mb: Callable[[], int]


@dataclass(frozen=True)
class InstallResult:
    slot: str
    version: str
    bytes_written: int
    seconds: float
    rebooting: bool


class Installer:
    """Installs bundles on this device. See the module docstring for the steps."""

    def __init__(
        self,
        config: UpdaterConfig,
        backend: Callable[[], BootSelector],
        store: StateStore,
        log: EventSink,
        sensors: Sensors,
        *,
        reboot: Callable[[Sequence[str]], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        http_options: dict[str, Any] | None = None,
        flush_bytes: int = FLUSH_BYTES,
        write_chunk: int = WRITE_CHUNK,
    ) -> None:
        self.config = config
        self._backend_factory = backend
        self._backend: BootSelector | None = None
        self.store = store
        self.log = log
        self.sensors = sensors
        self._reboot = reboot or run_reboot
        self._progress = progress
        self._clock = clock
        self._http_options = http_options or {}
        self._flush_bytes = flush_bytes
        self._write_chunk = write_chunk

    @property
    def backend(self) -> BootSelector:
        """The boot backend, built on first use: an install refused by its preconditions
        never needs to know the firmware."""
        if self._backend is None:
            self._backend = self._backend_factory()
        return self._backend

    @property
    def lifecycle(self) -> SlotLifecycle:
        """Every change of a slot's status goes through it (:mod:`updater.lifecycle`)."""
        return SlotLifecycle(self.backend, self.store, self.log)

    # --- the steps ---------------------------------------------------------------------

    def check_preconditions(self, state: DeviceState) -> Keyring:
        """Refuse early, before any download, what can be refused early.

        Raises:
            PreconditionError: no keyring or compatible configured, updates suspended, too
                hot, too little free space.
        """
        if self.config.keyring is None:
            raise PreconditionError("no keyring configured: refusing to install anything")
        if not self.config.compatible:
            raise PreconditionError("no compatible string configured: refusing to install")
        if state.suspended:
            raise PreconditionError(f"updates are suspended: {state.suspended}")
        temperature = self.sensors.temperature_c()
        limit = self.config.limits.max_temperature_c
        if temperature is not None and temperature > limit:
            raise PreconditionError(
                f"CPU at {temperature:.1f} °C, above the {limit:.1f} °C limit: update deferred"
            )
        free = self.sensors.free_space_mb()
        if free < self.config.limits.min_free_mb:
            raise PreconditionError(
                f"{free} MB free on the data partition, below {self.config.limits.min_free_mb} "
                "MB: update skipped"
            )
        try:
            return Keyring.load(self.config.keyring)
        except KeyringError as err:
            raise PreconditionError(f"cannot install without a usable keyring: {err}") from err

    def verify_manifest(
        self, reader: BundleReader | SplitBundleReader, keyring: Keyring, state: DeviceState
    ) -> tuple[Manifest, str, dict[str, SlotTarget]]:
        """Verify the manifest and decide the target slot; nothing has been written yet.

        Raises:
            BundleError, VerificationError: not authentic or malformed.
            BundleCompatibilityError: another device type, or a downgrade.
            SlotError: no usable target, or an image that does not fit.
        """
        manifest = reader.verify(keyring)
        if manifest.compatible != self.config.compatible:
            raise BundleCompatibilityError(
                f"bundle is for {manifest.compatible!r}, this device is {self.config.compatible!r}"
            )
        below = below_floor(state, manifest.security_version)
        if below is not None:
            raise BundleCompatibilityError(f"{below}: downgrade refused")
        booted = self.backend.booted()
        if booted not in ("a", "b"):
            raise SlotError(f"running from slot {booted!r}: install only from a root slot")
        target = other_slot(booted)
        self.lifecycle.check_writable(target)
        targets = checked_targets(self.config, manifest, target)
        if manifest.image("rootfs") is None:
            raise SlotError("bundle has no rootfs image")
        return manifest, target, targets

    def mark_installing(
        self, state: DeviceState, target: str, manifest: Manifest, sha: str
    ) -> DeviceState:
        state = self.lifecycle.begin_install(
            state, target, version=manifest.version, bundle_sha256=sha,
            security_version=manifest.security_version,
        )  # fmt: skip
        self.log.event("install.slot_marked", slot=target, status="installing")
        return state

    def write_images(
        self,
        reader: BundleReader | SplitBundleReader,
        targets: dict[str, SlotTarget],
        watch: _Watch | None = None,
        *,
        abandon: Callable[[], str | None] | None = None,
    ) -> int:
        """Stream every image of ``reader`` into its slot of ``targets``; the bytes written.
        Without ``watch``, the install deadline counts from now and ``abandon`` (see
        :meth:`install_parts`) may stop it."""
        if watch is None:
            watch = _Watch(self._clock() + self.config.limits.update_deadline_s, abandon)
        total = sum(e.uncompressed_size for e in reader.manifest.images)
        written = 0
        for image in reader.images():
            target = targets[image.entry.slot_class]
            self.log.event(
                "install.image_started",
                slot=target.slot,
                slot_class=target.slot_class,
                path=str(target.path),
                bytes=image.entry.uncompressed_size,
            )
            written = self._write_image(image, target, written, total, watch)
        return written

    def _write_image(
        self, image: BundleImage, target: SlotTarget, done: int, total: int, watch: _Watch
    ) -> int:
        """Stream one image into its slot. Reading (hashing, decompressing) and writing
        (copying into the page cache, flushing) run side by side on two cores: the next chunk
        is verified while the previous one is written, with two chunks in memory at most."""
        durable.boundary("slot:begin", target.path)
        try:
            fd = os.open(target.path, os.O_WRONLY)
        except OSError as err:
            raise InstallError(f"slot {target.path}: cannot open: {err.strerror}") from err
        writer = _SlotWriter(fd, target.path, self._flush_bytes)
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slot-writer") as pool:
                pending: Future[bool] | None = None
                while chunk := image.stream.read(self._write_chunk):
                    if pending is not None and pending.result():
                        self._report_progress(done + writer.flushed, total)
                    self._check(watch)
                    pending = pool.submit(writer.write, chunk)
                if pending is not None:
                    pending.result()
            writer.flush()
        finally:
            os.close(fd)
        durable.boundary("slot:done", target.path)
        done += writer.written
        self._report_progress(done, total)
        return done

    def _check(self, watch: _Watch) -> None:
        """An update stuck for longer than the deadline is abandoned (and rolled back: the
        target is marked bad, the running slot stays); so is one the caller gives up on."""
        if self._clock() > watch.deadline:
            raise InstallError(
                f"install exceeded its {self.config.limits.update_deadline_s} s deadline: abandoned"
            )
        reason = watch.abandon() if watch.abandon is not None else None
        if reason:
            raise InstallAbandonedError(f"install abandoned: {reason}")

    def _report_progress(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress(done, total)
        self.log.event("install.progress", bytes=done, total=total)

    def arm_trial(self, state: DeviceState, target: str) -> DeviceState:
        state = self.lifecycle.arm_trial(state, target)
        self.log.event("install.trial_armed", slot=target)
        return state

    # --- the whole install --------------------------------------------------------------

    def install(self, source: str, *, reboot: bool = True) -> InstallResult:
        """Install the bundle at ``source`` (a path or an http(s) URL) into the inactive slot.

        The caller holds the update lock.

        Raises:
            PreconditionError, BundleError, VerificationError, BundleCompatibilityError,
            SlotError, DownloadError: refused or failed before the target was touched.
            InstallError: writing failed; the target slot is marked bad.
        """
        started = self._clock()
        state, keyring = self._prepare()
        self.log.event("install.started", source=source)
        with open_source(source, **self._http(started)) as stream:
            return self._install(BundleReader(stream, name=source), keyring, state, started, reboot)

    def install_parts(
        self,
        manifest_bytes: bytes,
        envelope_bytes: bytes,
        blob_urls: Mapping[str, Sequence[str]],
        *,
        name: str = "release",
        reboot: bool = True,
        abandon: Callable[[], str | None] | None = None,
    ) -> InstallResult:
        """Install a release delivered in parts (a server assignment): the manifest, its
        signatures, and for each image (by stored SHA-256) the URLs to fetch it from, tried in
        order (server, then mirrors). Same steps, guarantees and errors as :meth:`install`.

        ``abandon`` is asked between chunks while writing; a reason it returns stops the
        install with :class:`InstallAbandonedError` (the daemon's: the server withdrew the
        release).
        """
        started = self._clock()
        state, keyring = self._prepare()
        self.log.event("install.started", source=name)
        reader = self.parts_reader(manifest_bytes, envelope_bytes, blob_urls, name, started)

        def every_image_has_a_url(manifest: Manifest) -> None:
            check_blob_urls(manifest, blob_urls, name)

        return self._install(
            reader, keyring, state, started, reboot, every_image_has_a_url, abandon
        )

    def parts_reader(
        self,
        manifest_bytes: bytes,
        envelope_bytes: bytes,
        blob_urls: Mapping[str, Sequence[str]],
        name: str,
        started: float | None = None,
    ) -> SplitBundleReader:
        """A reader of a release in parts whose images stream from ``blob_urls`` (by stored
        SHA-256, tried in order), with this installer's HTTP options and a deadline counted
        from ``started`` (this installer's clock; default now)."""
        http = self._http(self._clock() if started is None else started)
        return SplitBundleReader(
            manifest_bytes, envelope_bytes,
            lambda entry: cast(
                BinaryIO, MirroredStream(blob_urls[entry.sha256], log=self.log, **http)
            ),
            name=name,
        )  # fmt: skip

    def _http(self, started: float) -> dict[str, Any]:
        """HTTP options for this install: the configured ones, and the install's deadline, so
        a server that drips bytes cannot keep an update alive past it."""
        return {"deadline": started + self.config.limits.update_deadline_s, **self._http_options}

    def _prepare(self) -> tuple[DeviceState, Keyring]:
        loaded = self.store.load()
        if loaded.problem:
            self.log.event("state.damaged", level="warning", detail=loaded.problem)
        return loaded.state, self.check_preconditions(loaded.state)

    def _install(
        self,
        reader: BundleReader | SplitBundleReader,
        keyring: Keyring,
        state: DeviceState,
        started: float,
        reboot: bool,
        preflight: Callable[[Manifest], None] | None = None,
        abandon: Callable[[], str | None] | None = None,
    ) -> InstallResult:
        manifest, target, targets = self.verify_manifest(reader, keyring, state)
        if preflight is not None:
            preflight(manifest)
        self.log.event(
            "install.verified", version=manifest.version,
            security_version=manifest.security_version, slot=target,
            signed_by=list(reader.signed_by),
        )  # fmt: skip
        state = self.mark_installing(state, target, manifest, reader.manifest_sha256)
        watch = _Watch(started + self.config.limits.update_deadline_s, abandon)
        try:
            self._check(watch)
            written = self.write_images(reader, targets, watch)
        except InstallAbandonedError as err:
            self._fail(state, target, err, event="install.abandoned")
            raise
        except (FleetError, OSError) as err:
            self._fail(state, target, err)
            raise InstallError(f"install into slot {target} failed: {err}") from err
        state = self.arm_trial(state, target)
        seconds = self._clock() - started
        self.log.event(
            "install.finished", slot=target, version=manifest.version, bytes=written,
            seconds=round(seconds, 3), reboot=reboot,
        )  # fmt: skip
        if reboot:
            command = list(self.config.reboot_command or self.backend.reboot_command())
            self.log.event("install.rebooting", command=command)
            self._reboot(command)
        return InstallResult(target, manifest.version, written, seconds, reboot)

    def _fail(
        self, state: DeviceState, target: str, err: BaseException, event: str = "install.failed"
    ) -> None:
        level = "warning" if event == "install.abandoned" else "error"
        self.log.event(event, level=level, slot=target, error=str(err))
        try:
            self.lifecycle.fail_install(state, target)
        except FleetError as save_err:
            self.log.event("state.save_failed", level="error", error=str(save_err))


@dataclass(frozen=True)
class _Watch:
    """What stops an install while it writes: its deadline (monotonic), and the caller's
    ``abandon`` question."""

    deadline: float
    abandon: Callable[[], str | None] | None = None


class _SlotWriter:
    """Writes a slot sequentially, flushing every ``FLUSH_BYTES``; used from one thread."""

    def __init__(self, fd: int, path: Path, flush_bytes: int) -> None:
        self.fd = fd
        self.path = path
        self.flush_bytes = flush_bytes
        self.written = 0
        self.flushed = 0

    def write(self, data: bytes) -> bool:
        """Write ``data``; return whether this write ended with a flush."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as err:
            raise InstallError(f"slot {self.path}: write failed: {err.strerror}") from err
        self.written += len(data)
        if self.written - self.flushed >= self.flush_bytes:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        durable.boundary("slot:before-flush", self.path)
        try:
            os.fdatasync(self.fd)
        except OSError as err:
            raise InstallError(f"slot {self.path}: flush failed: {err.strerror}") from err
        self.flushed = self.written


def checked_targets(config: UpdaterConfig, manifest: Manifest, slot: str) -> dict[str, SlotTarget]:
    """Where each image of ``manifest`` goes in root slot ``slot``, checked before anything is
    written: the slot has every slot class the bundle needs, each image fits, and no target is
    the root file system mounted now.

    Raises:
        SlotError: any of these fails, naming the slot class and the sizes.
    """
    targets = slot_targets(config.slots, slot, config.partlabel_dir)
    for entry in manifest.images:
        slot_target = targets.get(entry.slot_class)
        if slot_target is None:
            raise SlotError(f"slot {slot} has no {entry.slot_class} (bundle needs one)")
        if entry.uncompressed_size > slot_target.capacity:
            raise SlotError(
                f"{entry.slot_class} image of {entry.uncompressed_size} bytes does not fit "
                f"slot {slot} ({slot_target.path}, {slot_target.capacity} bytes)"
            )
        check_not_mounted_root(slot_target.path)
    return targets


def check_blob_urls(manifest: Manifest, blob_urls: Mapping[str, Sequence[str]], name: str) -> None:
    """Raises: DownloadError: an image of ``manifest`` has no URL to fetch it from."""
    missing = [e.filename for e in manifest.images if not blob_urls.get(e.sha256)]
    if missing:
        raise DownloadError(f"{name}: no URL for image(s) {', '.join(missing)}")
