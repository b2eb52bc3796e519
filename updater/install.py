"""The install pipeline: a signed release streamed into a root slot, verified, then armed.

One pipeline (:meth:`Installer.run`) serves an install and a recovery; a :class:`Route` says
where the release goes and how its slot is armed, the only difference between them:

- an install (:meth:`Installer.install`, :meth:`Installer.install_parts`) runs from a root slot,
  writes the other one and arms it for one trial boot;
- a recovery (:mod:`updater.recovery`) runs from the safe-mode slot, writes a root slot the
  firmware no longer boots and arms it, or, when the boot state is damaged, repairs the boot
  state with that slot committed.

The steps follow RAUC's order, unsafe until proven safe; each is a method and a log event
(``install.*`` or ``recovery.*``), so a log from the field reads as a trace of this file:

1. ``check_preconditions`` (an install's; a recovery has its own): keyring and compatible
   configured, updates not suspended, the device not too hot, its supply not under-voltage
   now, enough free space;
2. ``verify_manifest``: signature against the keyring, ``compatible``, ``security_version`` not
   below the floor, the target chosen by the route, every image fits its slot; nothing has
   been written yet;
3. ``begin_install``: the target slot is ``installing`` in the state store and bad in the
   bootloader before its first byte changes, so a half-written slot is never booted;
4. ``write_images``: stream decompress → hash → write, flushing every ``FLUSH_BYTES``; the image
   stream raises instead of ending if a byte differs from the signed manifest;
5. ``arm``: ``installed``, then ``try_once``, then ``trial`` (or a repaired boot state);
6. reboot (unless told not to).

The booted slot is never written; the bootloader's primary is not changed here (only the boot
check commits). A power cut at any point leaves the old slot primary and bootable; the target
is at worst ``installing`` (ignored, rewritten by the next install).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from bootloader_hooks.base import ROOT_SLOTS, BootSelector, Repairable, other_slot
from bootloader_hooks.errors import BootStateCorruptError
from fleet_core import durable
from fleet_core.errors import FleetError
from image_builder.bundle import BundleImage, BundleReader, SplitBundleReader
from image_builder.chunks import ChunkIndex
from image_builder.errors import BundleCompatibilityError, BundleError, ImageIntegrityError
from image_builder.manifest import ImageEntry, Manifest
from signing.errors import KeyringError
from signing.keyring import Keyring
from updater.config import UpdaterConfig
from updater.delta import (
    Assembler,
    Journal,
    Plan,
    RangeFetcher,
    ReadBackError,
    SlotIndexes,
    plan,
)
from updater.device import run_reboot, under_voltage_now
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
from updater.slotio import SlotWriter as _SlotWriter
from updater.slots import SlotTarget, check_not_mounted_root, slot_targets
from updater.state import DeviceState, StateStore

FLUSH_BYTES = 64 << 20  # bound the data a power cut can lose, and the page cache in use
WRITE_CHUNK = 4 << 20


@dataclass(frozen=True)
class Sensors:
    """Readings the preconditions need, as functions so tests and the lab can supply them."""

    temperature_c: Callable[[], float | None]
    free_space_mb: Callable[[], int]
    # the firmware's get_throttled value (None: unknown, not a Raspberry Pi)
    throttled: Callable[[], int | None] = lambda: None


@dataclass(frozen=True)
class InstallResult:
    slot: str
    version: str
    bytes_written: int
    seconds: float
    rebooting: bool
    armed: str = "trial"  # or "repaired": a fresh boot state with the slot committed
    # what crossed the network (stored bytes, chunk indexes included) and what was found on
    # the device instead; None when the release came as one stream (a bundle file or URL)
    bytes_fetched: int | None = None
    bytes_reused: int | None = None


@dataclass(frozen=True)
class Route:
    """Where a verified release goes and how its slot is armed (see the module docstring).

    ``kind`` names the events (``install.*``, ``recovery.*``) and errors; ``refusal`` says what
    a release below the floor is refused as; ``target`` chooses the root slot (raising
    :class:`SlotError` when there is none to write); ``boot_state_damaged``: the boot state
    names no slot any more, so the slot is committed by a repair instead of armed.
    """

    kind: str
    refusal: str
    target: Callable[[DeviceState], str]
    boot_state_damaged: bool = False


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
        self.clock = clock
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
                hot, under-voltage now, too little free space.
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
        throttled = self.sensors.throttled()
        if under_voltage_now(throttled):
            # a write under brown-out power may tear: the SD card may store garbage
            raise PreconditionError(
                f"supply under-voltage now (get_throttled {throttled:#x}): update deferred"
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
        self,
        reader: BundleReader | SplitBundleReader,
        keyring: Keyring,
        state: DeviceState,
        route: Route | None = None,
    ) -> tuple[Manifest, str, dict[str, SlotTarget]]:
        """Verify the manifest and choose the target slot (by ``route``, an install's by
        default); nothing has been written yet.

        Raises:
            BundleError, VerificationError: not authentic or malformed.
            BundleCompatibilityError: another device type, or a release below the floor.
            SlotError: no usable target, or an image that does not fit.
        """
        route = route or self.install_route()
        manifest = reader.verify(keyring)
        if manifest.compatible != self.config.compatible:
            raise BundleCompatibilityError(
                f"bundle is for {manifest.compatible!r}, this device is {self.config.compatible!r}"
            )
        below = below_floor(state, manifest.security_version)
        if below is not None:
            raise BundleCompatibilityError(f"{below}: {route.refusal}")
        target = route.target(state)
        targets = checked_targets(self.config, manifest, target)
        if manifest.image("rootfs") is None:
            raise SlotError("bundle has no rootfs image")
        return manifest, target, targets

    def install_route(self) -> Route:
        """An install's: from a root slot into the other one, armed for a trial boot."""
        return Route("install", "downgrade refused", self._other_root_slot)

    def _other_root_slot(self, state: DeviceState) -> str:
        booted = self.backend.booted()
        if booted not in ROOT_SLOTS:
            raise SlotError(f"running from slot {booted!r}: install only from a root slot")
        target = other_slot(booted)
        self.lifecycle.check_writable(target)
        return target

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
            watch = _Watch(self.clock() + self.config.limits.update_deadline_s, abandon)
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
        """Stream one image into its slot. Reading (hashing, decompressing) and writing run
        side by side: the next chunk is verified while the previous one is written (two chunks
        in memory at most), and the slot is flushed beside both (:mod:`updater.slotio`).
        Progress reports what has been flushed."""
        durable.boundary("slot:begin", target.path)
        writer = _SlotWriter(target.path, self._flush_bytes, self._write_chunk)
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slot-writer") as pool:
                pending: Future[int | None] | None = None
                while chunk := image.stream.read(self._write_chunk):
                    if pending is not None and (flushed := pending.result()) is not None:
                        self._report_progress(done + flushed, total)
                    self._check(watch)
                    pending = pool.submit(writer.write, chunk)
                if pending is not None:
                    flushed = pending.result()
                    if flushed is not None and flushed < writer.written:
                        self._report_progress(done + flushed, total)
            writer.finish()
        finally:
            writer.close()
        durable.boundary("slot:done", target.path)
        done += writer.written
        self._report_progress(done, total)
        return done

    def _check(self, watch: _Watch) -> None:
        """An update stuck for longer than the deadline is abandoned (and rolled back: the
        target is marked bad, the running slot stays); so is one the caller gives up on."""
        if self.clock() > watch.deadline:
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

    def arm(self, state: DeviceState, target: str, route: Route) -> str:
        """Arm the written ``target``: a trial boot; or, over a damaged boot state, a fresh one
        with ``target`` committed (the damaged one names no slot any more, and the image just
        verified is the only one known to be whole). Returns ``"trial"`` or ``"repaired"``.

        Raises:
            BootStateCorruptError: the boot state is damaged and the backend cannot repair it.
        """
        if not route.boot_state_damaged:
            self.lifecycle.arm_trial(state, target)
            self.log.event(f"{route.kind}.trial_armed", slot=target)
            return "trial"
        if not isinstance(self.backend, Repairable):
            raise BootStateCorruptError(
                f"boot state is damaged and the {self.backend.name} backend cannot repair it"
            )
        self.lifecycle.repair_into(state, target, self.backend.repair)
        self.log.event(f"{route.kind}.boot_state_repaired", slot=target)
        return "repaired"

    # --- the whole install --------------------------------------------------------------

    def install(self, source: str, *, reboot: bool = True) -> InstallResult:
        """Install the bundle at ``source`` (a path or an http(s) URL) into the inactive slot.

        The caller holds the update lock.

        Raises:
            PreconditionError, BundleError, VerificationError, BundleCompatibilityError,
            SlotError, DownloadError: refused or failed before the target was touched.
            InstallError: writing failed; the target slot is marked bad.
        """
        started = self.clock()
        state, keyring = self._prepare()
        self.log.event("install.started", source=source)
        with open_source(source, **self.http(started)) as stream:
            return self.run(
                BundleReader(stream, name=source), keyring, state, started,
                self.install_route(), reboot=reboot,
            )  # fmt: skip

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
        started = self.clock()
        state, keyring = self._prepare()
        self.log.event("install.started", source=name)
        reader = self.parts_reader(manifest_bytes, envelope_bytes, blob_urls, name, started)

        def every_image_has_a_url(manifest: Manifest) -> None:
            check_blob_urls(manifest, blob_urls, name)

        return self.run(
            reader, keyring, state, started, self.install_route(),
            reboot=reboot, preflight=every_image_has_a_url, abandon=abandon, blob_urls=blob_urls,
        )  # fmt: skip

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
        http = self.http(self.clock() if started is None else started)
        return SplitBundleReader(
            manifest_bytes, envelope_bytes,
            lambda entry: cast(
                BinaryIO, MirroredStream(blob_urls[entry.sha256], log=self.log, **http)
            ),
            name=name,
        )  # fmt: skip

    def http(self, started: float) -> dict[str, Any]:
        """HTTP options for this install: the configured ones, the install's deadline, so
        a server that drips bytes cannot keep an update alive past it, and the download rate
        limit (``[bandwidth] rate_limit``, ``rate``: a :class:`updater.bandwidth.RateLimit`,
        present only when one is configured), one bucket for every stream of the install."""
        from updater.bandwidth import from_config

        ca_file = self.config.server_ca_file  # https:// blobs and mirrors are verified with it
        tls = {} if ca_file is None else {"verify": str(ca_file)}
        limited = self.config.rate_limit_bytes_per_s is not None
        rate = {"rate": from_config(self.config)} if limited else {}
        return {"deadline": started + self.config.limits.update_deadline_s, **tls, **rate,
                **self._http_options}  # fmt: skip

    def load_state(self) -> DeviceState:
        """The state store's state; damage found in it is logged (see :meth:`StateStore.load`)."""
        loaded = self.store.load()
        if loaded.problem:
            self.log.event("state.damaged", level="warning", detail=loaded.problem)
        return loaded.state

    def _prepare(self) -> tuple[DeviceState, Keyring]:
        state = self.load_state()
        return state, self.check_preconditions(state)

    def run(
        self,
        reader: BundleReader | SplitBundleReader,
        keyring: Keyring,
        state: DeviceState,
        started: float,
        route: Route,
        *,
        reboot: bool,
        preflight: Callable[[Manifest], None] | None = None,
        abandon: Callable[[], str | None] | None = None,
        blob_urls: Mapping[str, Sequence[str]] | None = None,
    ) -> InstallResult:
        """The pipeline (see the module docstring), from a verified manifest to the reboot.
        ``started``: this installer's clock when the install or recovery began (its deadline
        counts from then); ``preflight``: a last check of the verified manifest;
        ``blob_urls``: a release in parts, which may be installed as a delta
        (:mod:`updater.delta`) when its images are chunked."""
        kind = route.kind
        manifest, target, targets = self.verify_manifest(reader, keyring, state, route)
        if preflight is not None:
            preflight(manifest)
        self.log.event(
            f"{kind}.verified", version=manifest.version,
            security_version=manifest.security_version, slot=target,
            signed_by=list(reader.signed_by), boot_state_damaged=route.boot_state_damaged,
        )  # fmt: skip
        state = self.lifecycle.begin_install(
            state, target, version=manifest.version, bundle_sha256=reader.manifest_sha256,
            security_version=manifest.security_version,
            boot_state_damaged=route.boot_state_damaged,
        )  # fmt: skip
        self.log.event(f"{kind}.slot_marked", slot=target, status="installing")
        watch = _Watch(started + self.config.limits.update_deadline_s, abandon)
        journal = Journal(self.config.data_dir, self.log)
        slot_indexes = SlotIndexes(self.config.data_dir, self.log)
        transfer: tuple[int, int] | None = None
        indexes: dict[str, ChunkIndex] = {}
        try:
            # before the first byte: a journal of another release or slot stops counting
            verified = journal.begin(target, reader.manifest_sha256)
            self._check(watch)
            delta = None
            if blob_urls is not None:
                delta, indexes = self._delta_plans(
                    manifest, targets, blob_urls, verified, started, kind, slot_indexes
                )
                index_bytes = sum(
                    e.chunk_index.size for e in manifest.images
                    if e.chunk_index is not None and e.filename in indexes
                )  # fmt: skip
                transfer = (index_bytes + sum(e.size for e in manifest.images), 0)
            slot_indexes.drop(target)  # what the slot held is about to change
            if delta is not None:
                trusted = {entry.filename: image_plan.trusted for entry, image_plan in delta}
                journal.advance(target, reader.manifest_sha256, trusted)
                written, transfer = self._write_delta(
                    delta, targets, blob_urls or {}, watch, started, journal, target,
                    reader.manifest_sha256, kind,
                )  # fmt: skip
            else:
                journal.advance(target, reader.manifest_sha256, {})  # rewritten from byte 0
                written = self.write_images(reader, targets, watch)
        except (InstallAbandonedError, DownloadError) as err:
            # the bytes written and flushed stay valid: a retry resumes from the journal
            self._fail(state, target, err, event=f"{kind}.{_failure_event(err)}")
            if isinstance(err, InstallAbandonedError):
                raise
            raise InstallError(f"{kind} into slot {target} failed: {err}") from err
        except (FleetError, OSError) as err:
            self._fail(state, target, err, event=f"{kind}.failed")
            if isinstance(err, ReadBackError):
                journal.clear()  # it vouched for bytes the slot does not hold
            raise InstallError(f"{kind} into slot {target} failed: {err}") from err
        armed = self.arm(state, target, route)
        if isinstance(reader, BundleReader):
            indexes = {name: index for name, (_, index) in reader.chunk_indexes.items()}
        for entry in manifest.images:
            if entry.filename in indexes:
                slot_indexes.save(target, entry, indexes[entry.filename])
        if transfer is not None:
            stored = sum(e.size for e in manifest.images)
            cost = {"fetched": transfer[0], "reused": transfer[1], "stored": stored}
            journal.finish(target, reader.manifest_sha256, cost)
        else:
            journal.clear()
        seconds = self.clock() - started
        self.log.event(
            f"{kind}.finished", slot=target, version=manifest.version, armed=armed,
            bytes=written, seconds=round(seconds, 3), reboot=reboot,
        )  # fmt: skip
        if reboot:
            command = list(self.config.reboot_command or self.backend.reboot_command())
            self.log.event(f"{kind}.rebooting", command=command)
            self._reboot(command)
        fetched, reused = transfer if transfer is not None else (None, None)
        return InstallResult(
            target, manifest.version, written, seconds, reboot, armed, fetched, reused
        )

    # --- delta installs (updater.delta) -------------------------------------------------

    def _delta_plans(
        self,
        manifest: Manifest,
        targets: dict[str, SlotTarget],
        blob_urls: Mapping[str, Sequence[str]],
        verified: Mapping[str, int],
        started: float,
        kind: str,
        slot_indexes: SlotIndexes,
    ) -> tuple[list[tuple[ImageEntry, Plan]] | None, dict[str, ChunkIndex]]:
        """Plans to assemble every image from what the device holds, or None for a full
        install: an image without a chunk index or with no URL for it, nothing to reuse (then
        the plain stream is faster: no seeking, no second read of the slot), or planning failed
        before a byte of the slot was written (no host serves the index, or serves it wrong:
        the stream needs neither ranges nor the index); and the chunk indexes fetched to find
        out, by image file name."""
        if not all(e.chunk_index and blob_urls.get(e.chunk_index.sha256) for e in manifest.images):
            return None, {}
        try:
            indexes = [self._fetch_index(entry, blob_urls, started) for entry in manifest.images]
        except (DownloadError, BundleError) as err:
            self.log.event(f"{kind}.delta_unavailable", level="warning", error=str(err))
            return None, {}
        fetched = {
            entry.filename: index for entry, index in zip(manifest.images, indexes, strict=True)
        }
        booted = self.backend.booted()
        seeds = (
            slot_targets(self.config.slots, booted, self.config.partlabel_dir)
            if booted in ROOT_SLOTS
            else {}
        )
        plans = []
        for entry, index in zip(manifest.images, indexes, strict=True):
            seed = seeds.get(entry.slot_class)
            target = targets[entry.slot_class]
            known = {
                path: found
                for path, slot in (
                    (target.path, target.slot),
                    (seed.path if seed else None, booted),
                )
                if path is not None
                and (found := slot_indexes.load(slot, entry.slot_class)) is not None
            }
            plans.append((entry, plan(
                index, target=target.path, booted=seed.path if seed is not None else None,
                verified_through=verified.get(entry.filename, 0), known=known,
            )))  # fmt: skip
        for entry, image_plan in plans:
            self.log.event(
                f"{kind}.delta_planned", image=entry.filename, chunks=len(image_plan.chunks),
                ranges=len(image_plan.ranges()), fetch_bytes=image_plan.fetch_bytes,
                stored_bytes=entry.size, found=image_plan.bytes_by_kind(),
            )  # fmt: skip
        if not any(image_plan.reuse_bytes for _, image_plan in plans):
            return None, fetched
        return plans, fetched

    def _fetch_index(
        self, entry: ImageEntry, blob_urls: Mapping[str, Sequence[str]], started: float
    ) -> ChunkIndex:
        """The chunk index of ``entry``, fetched and checked against the signed manifest.

        Raises:
            DownloadError: it cannot be fetched. ImageIntegrityError, ManifestError: its bytes
                differ from the manifest's, or do not add up to the image.
        """
        ref = entry.chunk_index
        assert ref is not None  # noqa: S101 (_delta_plans checked)
        fetcher = self._fetcher(blob_urls[ref.sha256], started)
        data = b"".join(fetcher.fetch(0, ref.size))
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ImageIntegrityError(f"chunk index of {entry.filename}: bytes do not match")
        return ChunkIndex.from_bytes(
            data, image_size=entry.uncompressed_size, stored_size=entry.size,
            compression=entry.compression, where=f"chunk index of {entry.filename}",
        )  # fmt: skip

    def _fetcher(self, urls: Sequence[str], started: float) -> RangeFetcher:
        options = self.http(started)
        return RangeFetcher(urls, log=self.log, **options)

    def _write_delta(
        self,
        plans: list[tuple[ImageEntry, Plan]],
        targets: dict[str, SlotTarget],
        blob_urls: Mapping[str, Sequence[str]],
        watch: _Watch,
        started: float,
        journal: Journal,
        slot: str,
        release: str,
        kind: str,
    ) -> tuple[int, tuple[int, int]]:
        """Assemble every image; returns the bytes written and (fetched, reused)."""
        total = sum(entry.uncompressed_size for entry, _ in plans)
        moved = _Moved(total, self._progress)
        fetched = sum(entry.chunk_index.size for entry, _ in plans if entry.chunk_index)
        reused = 0
        verified: dict[str, int] = {}
        for entry, image_plan in plans:
            target = targets[entry.slot_class]
            self.log.event(
                f"{kind}.image_started", slot=target.slot, slot_class=entry.slot_class,
                path=str(target.path), bytes=entry.uncompressed_size, delta=True,
            )  # fmt: skip

            def flushed(through: int, name: str = entry.filename) -> None:
                verified[name] = through
                journal.advance(slot, release, verified)
                self.log.event("install.progress", bytes=moved.done, total=total)

            assembler = Assembler(
                entry, image_plan, self._fetcher(blob_urls[entry.sha256], started),
                check=lambda: self._check(watch), progress=moved, flushed=flushed,
                flush_bytes=self._flush_bytes,
            )  # fmt: skip
            assembler.write(target.path)
            counters = assembler.counters
            fetched += counters.fetched
            reused += sum(counters.reused.values())
            self.log.event(f"{kind}.delta_written", image=entry.filename, **counters.to_dict())
        return moved.done, (fetched, reused)

    def _fail(self, state: DeviceState, target: str, err: BaseException, event: str) -> None:
        level = "warning" if event.endswith(".abandoned") else "error"
        self.log.event(event, level=level, slot=target, error=str(err))
        try:
            self.lifecycle.fail_install(state, target)
        except FleetError as save_err:
            self.log.event("state.save_failed", level="error", error=str(save_err))


class _Moved:
    """Counts image bytes placed in the slot (written or found in place) for progress."""

    def __init__(self, total: int, report: Callable[[int, int], None] | None) -> None:
        self.total = total
        self.done = 0
        self._report = report

    def __call__(self, length: int) -> None:
        self.done += length
        if self._report is not None:
            self._report(self.done, self.total)


@dataclass(frozen=True)
class _Watch:
    """What stops an install while it writes: its deadline (monotonic), and the caller's
    ``abandon`` question."""

    deadline: float
    abandon: Callable[[], str | None] | None = None


def _failure_event(err: BaseException) -> str:
    return "abandoned" if isinstance(err, InstallAbandonedError) else "failed"


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
