"""The virtual device: a disk of plain files, a firmware model, and the real updater code.

Layout under the device's root directory::

    disk/root_a.img, disk/root_b.img   the root slots (fixed-size files)
    boot/                              the firmware's boot state (grubenv, uboot.env, autoboot.txt)
    data/                              the data partition (/var/lib/fleet)
    keyring/                           trusted release keys
    linux/proc/                        what Linux sees of the boot: cmdline or device tree,
                                       boot_id, uptime (rewritten by every boot)
    linux/sys/get_throttled            the firmware's throttling and under-voltage bits
                                       (:meth:`VirtualDevice.set_throttled`; 0 until set)

A boot asks the firmware model which slot starts; the slot's image says how it behaves
(``chaos.lab_image``); if it reaches user space, the real boot check runs. ``settle()`` keeps
booting until the device stays up: through watchdog resets after a hang and through the
reboots the boot check asks for.

A device made with ``plain_images`` also boots ordinary images (an ext4 root filesystem from
``fleet image``, bundled by ``fleet bundle create``), which say nothing about how they behave:
such a slot is healthy (unless the device's fault profile says otherwise), and its release is the
one the updater's state records for it, provided the state says the slot was written to its end
(``installed``, ``trial`` or ``good``); otherwise it hangs like a half-written slot. That takes
the updater's word for the slot, so the power-cut tests, which must catch an updater believing a
slot is whole when its disk says otherwise, use lab images on devices without ``plain_images``.
A slot that starts like a lab image is always judged as one. ``slot_sizes`` gives each slot class
a file of that size (sparse: only written bytes take space); ``bootfs`` lives in
``disk/boot_a.img`` and ``disk/boot_b.img``.

Power cuts: :class:`PowerSwitch` is installed as the write-boundary hook of
``fleet_core.durable``; at the chosen boundary it raises :class:`PowerCut` (a
``BaseException``, so no ``except Exception`` can swallow it), and every boundary after it
raises too: the power stays off. A slot image that was being written when the power went is
overwritten with noise from its start, a superset of what unflushed writes can lose. What this
model does not reproduce: a temporary file left by an interrupted atomic write (Python removes
it while unwinding; such files are ignored by every reader) and torn sectors inside one write
(the formats that write in place keep checksums and second copies for that).
"""

from __future__ import annotations

import io
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootloader_hooks.base import BootCause, BootEvent, BootOutcome, FirmwareModel, create_backend
from chaos.lab_image import LabImage, looks_like_lab_image, read_lab_image
from fleet_core import durable
from updater.config import LoadedConfig, UpdaterConfig
from updater.health import CheckResult, HealthReport
from updater.log import EventLog
from updater.runtime import Runtime, reporting_log
from updater.state import DeviceState, StateStore

SLOT_SIZE = 1 << 20
SLOT_FILES = {"rootfs": "root", "bootfs": "boot"}  # slot class -> file name prefix in disk/
# The slot statuses in which the updater has written a slot to its end.
WRITTEN_STATUSES = ("installed", "trial", "good")
MAX_BOOTS = 16
# Flush slot images every 64 KiB (a device flushes every 64 MiB): lab images are small, and
# every flush is a power-cut point the lab must reach.
LAB_FLUSH_BYTES = 64 * 1024
# What a cut may tear as a whole: a flash page (SD cards and eMMC program 16 KiB and more at
# once, and may lose the whole page, bytes flushed before included, when a write into it is
# cut), as updater.delta.TEAR_BYTES assumes.
BLOCK = 64 * 1024
SNAPSHOT_LIMIT = 16 << 20


class PowerCut(BaseException):
    """The power went off."""


class BoardReset(BaseException):
    """The board reset itself (kernel panic, watchdog) in the middle of user space."""


@dataclass
class PowerSwitch:
    """Counts write boundaries and cuts the power at boundary number ``cut_at`` (0-based).

    A cut while a slot image is being written loses what was not flushed: every flash page
    (:data:`BLOCK`) that differs from the slot as of its last completed flush becomes garbage,
    the bytes in it that were flushed before included (a disk may have written it, half of
    it, or nothing). What a flush made durable elsewhere survives, as on a real disk. A flush
    is complete once the boundary after its ``slot:before-flush`` is reached.
    Slots above :data:`SNAPSHOT_LIMIT` are not copied at each flush: there, a cut turns the
    whole slot into garbage (harsher than any disk, never kinder).
    """

    cut_at: int | None = None
    cut_at_first: str | None = None  # or: cut at the first boundary of this name
    points: list[tuple[str, Path]] = field(default_factory=list)
    off: bool = False
    writing: Path | None = None  # a slot image being written, not yet flushed to its end
    durable: bytes | None = None  # the slot being written, as of its last completed flush
    flushing: bytes | None = None  # its bytes at a ``slot:before-flush`` not yet completed

    def __call__(self, point: str, path: Path) -> None:
        if self.off:
            raise PowerCut(point)
        if point == self.cut_at_first and self.cut_at is None:
            self.cut_at = len(self.points)
        if self.flushing is not None:  # reaching any boundary: the flush before it completed
            self.durable, self.flushing = self.flushing, None
        if point == "slot:begin":
            self.writing = path
            self.durable = self._snapshot(path)
        elif point == "slot:done":
            self.writing = None
            self.durable = None
        if self.cut_at is not None and len(self.points) == self.cut_at:
            self.off = True
            self.points.append((point, path))
            self._lose_unflushed()
            raise PowerCut(point)
        if point == "slot:before-flush" and self.writing is not None:
            self.flushing = self._snapshot(self.writing)
        self.points.append((point, path))

    @staticmethod
    def _snapshot(path: Path) -> bytes | None:
        try:
            if path.stat().st_size > SNAPSHOT_LIMIT:
                return None
            return path.read_bytes()
        except OSError:
            return None

    def _lose_unflushed(self) -> None:
        if self.writing is None:
            return
        if self.durable is None:
            remaining = self.writing.stat().st_size
            with self.writing.open("r+b") as handle:
                while remaining > 0:
                    remaining -= handle.write(os.urandom(min(remaining, 1 << 16)))
            return
        current = self.writing.read_bytes()
        with self.writing.open("r+b") as handle:
            for offset in range(0, max(len(current), len(self.durable)), BLOCK):
                if current[offset : offset + BLOCK] != self.durable[offset : offset + BLOCK]:
                    handle.seek(offset)
                    handle.write(os.urandom(len(current[offset : offset + BLOCK])))

    @contextmanager
    def installed(self) -> Iterator[PowerSwitch]:
        previous = durable.set_boundary_hook(self)
        try:
            yield self
        finally:
            durable.set_boundary_hook(previous)


@dataclass(frozen=True)
class FaultProfile:
    """What goes wrong on one device, whatever the release says: releases it hangs on at boot,
    releases whose health checks fail on it (its camera model, its sensor wiring)."""

    hang_on: frozenset[str] = frozenset()
    unhealthy_on: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LabFirmware:
    """How one firmware's boot state is laid out in a virtual device."""

    backend: str
    prepare: Callable[[Path], dict[str, Any]]  # device root -> backend options (files made)
    model: Callable[[Path, Mapping[str, Any]], FirmwareModel]  # device root, options -> model


# The security version of the release a device leaves the factory with.
FACTORY_SECURITY_VERSION = 1
LAB_FIRMWARES: dict[str, LabFirmware] = {}


@dataclass(frozen=True)
class BootRecord:
    """One boot: what the firmware chose and how far it got."""

    slot: str
    trial: bool
    image: LabImage | None
    action: str  # hang, safe_mode, or the boot check's action (committed, rolled_back, ...)


class VirtualDevice:
    """See the module docstring."""

    def __init__(
        self,
        root: Path,
        firmware: str,
        *,
        compatible: str = "lab-device",
        profile: FaultProfile | None = None,
        plain_images: bool = False,
        slot_sizes: Mapping[str, int] | None = None,
    ) -> None:
        self.root = root
        self.profile = profile or FaultProfile()
        self.plain_images = plain_images
        self.slot_sizes = dict(slot_sizes or {"rootfs": SLOT_SIZE})
        self.lab = LAB_FIRMWARES[firmware]
        for directory in ("disk", "boot", "data", "keyring", "linux/proc"):
            (root / directory).mkdir(parents=True, exist_ok=True)
        for slot in ("a", "b"):
            for slot_class, size in self.slot_sizes.items():
                path = self.slot_file(slot, slot_class)
                if not path.exists():
                    with path.open("wb") as handle:
                        handle.truncate(size)  # zeros; sparse where the file system can
        self.options = self.lab.prepare(root)
        self.model = self.lab.model(root, self.options)
        throttled = root / "linux" / "sys" / "get_throttled"
        if not throttled.exists():  # never the host's own (a lab on a Raspberry Pi)
            throttled.parent.mkdir(parents=True, exist_ok=True)
            throttled.write_text("0\n")
        self.config = UpdaterConfig(
            compatible=compatible,
            keyring=root / "keyring",
            data_dir=root / "data",
            bootloader={"backend": self.lab.backend, **self.options},
            slots={s: {c: str(self.slot_file(s, c)) for c in self.slot_sizes} for s in ("a", "b")},
            throttled_path=throttled,
        )
        self.log_stream = io.StringIO()
        self.log = EventLog(self.log_stream, keep=True)
        self.pending_reboot: list[str] | None = None
        self.running: BootRecord | None = None
        self.boots: list[BootRecord] = []

    # --- the disk ------------------------------------------------------------------------

    def slot_path(self, slot: str) -> Path:
        """The root file system of ``slot`` (``rootfs``)."""
        return self.slot_file(slot, "rootfs")

    def slot_file(self, slot: str, slot_class: str) -> Path:
        return self.root / "disk" / f"{SLOT_FILES[slot_class]}_{slot}.img"

    def image(self, slot: str) -> LabImage | None:
        """What ``slot`` holds, if it can boot: a complete lab image, or (with
        ``plain_images``) an ordinary image the updater wrote to its end (module docstring)."""
        path = self.slot_path(slot)
        lab = read_lab_image(path)
        if lab is not None or not self.plain_images or looks_like_lab_image(path):
            return lab
        recorded = self.store.load(keep_evidence=False).state.slot(slot)  # reads only
        if recorded.status not in WRITTEN_STATUSES or recorded.version is None:
            return None
        return LabImage(recorded.version, "healthy")

    @property
    def store(self) -> StateStore:
        return StateStore(self.config.data_dir)

    def state(self) -> DeviceState:
        return self.store.load().state

    def set_throttled(self, value: int) -> None:
        """What the firmware's ``get_throttled`` node reads from now on (``updater.device.
        Throttled`` bits: ``0x1`` under-voltage now, ``0x50000`` under-voltage and throttling
        seen since boot, 0 normal)."""
        self.config.throttled_path.write_text(f"{value:x}\n")

    def runtime(self) -> Runtime:
        return Runtime(
            LoadedConfig(self.config, "lab"),
            reporting_log(self.log, self.config),
            backend_factory=lambda c: create_backend(self.lab.backend, self.options),
            reboot=self._reboot,
            proc=self.root / "linux" / "proc",
            health=self._health,
        )

    def config_toml(self, *, reboot_command: Sequence[str] = ("true",), extra: str = "") -> str:
        """This device's configuration as ``fleet-updater --config`` reads it. The reboot
        command defaults to ``true``: a test must never reboot the machine it runs on. A
        ``[server]`` table in ``extra`` is given ``allow_plain_http = true``: the lab's servers
        speak plain HTTP on loopback; the ``[paths]`` table (``extra``'s, else one of its
        own) the device's ``throttled_path``, unless ``extra`` names one."""

        def value(item: Any) -> str:
            if isinstance(item, str | Path):
                return '"' + str(item).replace("\\", "\\\\").replace('"', '\\"') + '"'
            if isinstance(item, bool):
                return "true" if item else "false"
            if isinstance(item, list | tuple):
                return "[" + ", ".join(value(i) for i in item) + "]"
            if isinstance(item, dict):
                return "{" + ", ".join(f"{k} = {value(v)}" for k, v in item.items()) + "}"
            return str(item)

        lines = [
            f"compatible = {value(self.config.compatible)}",
            *([f"role = {value(self.config.role)}"] if self.config.role else []),
            *([f"tags = {value(list(self.config.tags))}"] if self.config.tags else []),
            f"keyring = {value(self.config.keyring)}",
            f"data_dir = {value(self.config.data_dir)}",
            f"reboot_command = {value(list(reboot_command))}",
            "[bootloader]",
            *(f"{k} = {value(v)}" for k, v in self.config.bootloader.items()),
            *(f"[slots.{s}]\n" + "\n".join(f"{c} = {value(p)}" for c, p in
                                             self.config.slots[s].items()) for s in "ab"),
            "[limits]",
            "min_free_mb = 0",
            re.sub(r"^\[server\][ \t]*$", "[server]\nallow_plain_http = true", extra, count=1,
                   flags=re.MULTILINE),
        ]  # fmt: skip
        if "throttled_path" not in extra:
            paths = f"[paths]\nthrottled_path = {value(self.config.throttled_path)}"
            lines[-1], found = re.subn(r"^\[paths\][ \t]*$", paths.replace("\\", "\\\\"),
                                       lines[-1], count=1, flags=re.MULTILINE)  # fmt: skip
            if not found:
                lines.append(paths)
        return "\n".join(lines) + "\n"

    def provision(
        self, image: bytes, version: str, security_version: int = FACTORY_SECURITY_VERSION
    ) -> None:
        """Factory provisioning: ``image`` in slot a, committed, slot b empty. The factory
        release has a security version like any other (the floor's first value)."""
        with self.slot_path("a").open("r+b") as handle:
            handle.write(image)
        self.boot(BootEvent(BootCause.POWER_ON), run_boot_check=False)
        backend = self.runtime().backend
        backend.commit("a")
        state = DeviceState(installed_security_version=security_version).with_slot(
            "a", status="good", version=version, security_version=security_version
        )
        self.store.save(state)

    # --- booting -------------------------------------------------------------------------

    def _reboot(self, command: Sequence[str]) -> None:
        self.pending_reboot = list(command)

    def behaviour(self, image: LabImage | None) -> str:
        """How ``image`` behaves on this device: as the image says, unless this device's
        fault profile makes it hang or fail its health checks on that release."""
        if image is None:
            return "hang"
        if image.version in self.profile.hang_on:
            return "hang"
        if image.version in self.profile.unhealthy_on and image.behaviour == "healthy":
            return "unhealthy"
        return image.behaviour

    def _health(self) -> HealthReport:
        image = self.running.image if self.running else None
        behaviour = self.behaviour(image)
        if behaviour == "crash":
            raise BoardReset("the release crashed the board during its health checks")
        ok = behaviour == "healthy"
        detail = "release healthy" if ok else "release reports unhealthy"
        return HealthReport(ok, (CheckResult("lab:release", "command", ok, detail, 0.0),), 0.0)

    def _expose(self, outcome: BootOutcome) -> None:
        linux = self.root / "linux"
        for relative, data in outcome.linux_view.items():
            path = linux / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        proc = linux / "proc"
        if "proc/sys/kernel/random/boot_id" not in outcome.linux_view:
            (proc / "sys/kernel/random").mkdir(parents=True, exist_ok=True)
            (proc / "sys/kernel/random/boot_id").write_text(f"{uuid.uuid4()}\n")
        (proc / "uptime").write_text("5.00 4.00\n")

    def boot(self, event: BootEvent, *, run_boot_check: bool = True) -> BootRecord:
        """One start of the firmware, and of the boot check if the slot reaches user space."""
        self.pending_reboot = None
        outcome = self.model.boot(event)
        self._expose(outcome)
        image = None if outcome.slot == "safe" else self.image(outcome.slot)
        if outcome.slot != "safe" and self.behaviour(image) == "hang":
            record = BootRecord(outcome.slot, outcome.trial, image, "hang")
        elif not run_boot_check:
            record = BootRecord(outcome.slot, outcome.trial, image, "booted")
        else:
            self.running = BootRecord(outcome.slot, outcome.trial, image, "running")
            try:
                action = self.runtime().boot_checker().run().action
            except BoardReset:
                action = "crash"
            record = BootRecord(outcome.slot, outcome.trial, image, action)
        self.running = record
        self.boots.append(record)
        return record

    def settle(self, event: BootEvent | None = None) -> list[BootRecord]:
        """Boot until the device stays up; returns every boot on the way.

        Raises:
            RuntimeError: still rebooting after ``MAX_BOOTS`` boots (a reboot loop: a bug).
        """
        event = event or BootEvent(BootCause.POWER_ON)
        records = []
        for _ in range(MAX_BOOTS):
            record = self.boot(event)
            records.append(record)
            if record.action in ("hang", "crash"):
                event = BootEvent(BootCause.RESET)  # the watchdog resets the board
            elif self.pending_reboot is not None:
                event = BootEvent(BootCause.REBOOT, tuple(self.pending_reboot))
            else:
                return records
        raise RuntimeError(f"no stable boot after {MAX_BOOTS} boots: {records}")

    def power_on(self) -> list[BootRecord]:
        """Switch on a device that is off; settle."""
        return self.settle(BootEvent(BootCause.POWER_ON))

    def power_cut(self) -> list[BootRecord]:
        """Cut the power of a running device, then switch it on again; settle. (A cut in the
        middle of a write is :class:`PowerSwitch`'s job.)"""
        self.running = None
        return self.power_on()

    def reboot(self) -> list[BootRecord]:
        """Reboot from Linux with the backend's reboot command (a trial, if one is armed)."""
        command = tuple(self.runtime().backend.reboot_command())
        return self.settle(BootEvent(BootCause.REBOOT, command))

    def install(self, bundle: Path, *, reboot: bool = True) -> list[BootRecord]:
        """Install ``bundle`` with the real installer and, unless told not to, reboot and
        settle."""
        self.runtime().installer(
            flush_bytes=LAB_FLUSH_BYTES, write_chunk=LAB_FLUSH_BYTES // 4
        ).install(str(bundle), reboot=reboot)
        if not reboot or self.pending_reboot is None:
            return []
        return self.settle(BootEvent(BootCause.REBOOT, tuple(self.pending_reboot)))

    def install_url(self, url: str) -> list[BootRecord]:
        """Install from a URL (fast retries: the lab's network faults are instant)."""
        installer = self.runtime().installer(
            http_options={"backoff_s": 0.01, "timeout_s": 5},
            flush_bytes=LAB_FLUSH_BYTES,
            write_chunk=LAB_FLUSH_BYTES // 4,
        )
        installer.install(url, reboot=True)
        if self.pending_reboot is None:
            return []
        return self.settle(BootEvent(BootCause.REBOOT, tuple(self.pending_reboot)))

    def install_parts(
        self, manifest: bytes, signatures: bytes, blob_urls: Mapping[str, Sequence[str]]
    ) -> list[BootRecord]:
        """Install a release delivered in parts (as a server assignment delivers it)."""
        installer = self.runtime().installer(
            http_options={"backoff_s": 0.01, "timeout_s": 5, "retries": 2},
            flush_bytes=LAB_FLUSH_BYTES,
            write_chunk=LAB_FLUSH_BYTES // 4,
        )
        installer.install_parts(manifest, signatures, blob_urls, reboot=True)
        if self.pending_reboot is None:
            return []
        return self.settle(BootEvent(BootCause.REBOOT, tuple(self.pending_reboot)))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log.events if e["event"] == name]
