"""The virtual fleet: many virtual devices, each running the real daemon, on one clock.

Every member is a :class:`~chaos.virtual_device.VirtualDevice` (a copy of one provisioned
template, so a hundred devices take a second to make) with its own identity, a role, and an
optional fault profile: releases it hangs on or fails its health checks on, windows in which it
is offline, a wall clock that is years off. The fleet's clock is simulated: :meth:`step` moves
it and lets every online member do what is due, so a day of check-ins runs in seconds. The
server is whatever the members are pointed at (a real ``fleet server run`` process in tests and
in the demo).

Members leave the factory running a lab image of ``base_version``. With ``plain_images`` they
also install and boot ordinary bundles (``chaos.virtual_device``) for their ``compatible``
string, into slots of ``slot_sizes`` (sparse files: a slot costs only the bytes written to it).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bootloader_hooks.base import BootCause, BootEvent
from chaos.lab_image import make_lab_image
from chaos.virtual_device import BootRecord, FaultProfile, PowerCut, VirtualDevice
from signing.keyring import CONFIG_FILE, REVOKED_FILE, Keyring, trust_key
from updater.client import ServerClient
from updater.daemon import Daemon
from updater.identity import load_or_create_identity

ROLES = ("camera", "sensor", "gateway")
# Slots for ordinary images: room for a Raspberry Pi OS root and boot partition.
PLAIN_SLOT_SIZES = {"rootfs": 8 << 30, "bootfs": 1 << 30}


def copy_sparse(source: str, target: str) -> str:
    """``shutil.copy2`` that leaves holes as holes (a slot file of gigabytes that holds a
    small image costs the image); where the file system cannot tell holes, a plain copy."""
    with open(source, "rb") as reader, open(target, "wb") as writer:
        size = os.fstat(reader.fileno()).st_size
        writer.truncate(size)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(reader.fileno(), offset, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:
                    break  # only a hole is left
                reader.seek(0)
                writer.seek(0)
                shutil.copyfileobj(reader, writer)
                break
            end = os.lseek(reader.fileno(), start, os.SEEK_HOLE)
            reader.seek(start)
            writer.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = reader.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                writer.write(chunk)
                remaining -= len(chunk)
            offset = end
    shutil.copystat(source, target)
    return target


class LabClock:
    """The fleet's monotonic clock, in simulated seconds."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


@dataclass(frozen=True)
class MemberSpec:
    """One member of the fleet and what goes wrong with it."""

    role: str = "camera"
    tags: tuple[str, ...] = ()
    profile: FaultProfile = field(default_factory=FaultProfile)
    offline: tuple[tuple[float, float], ...] = ()  # (from, to) in fleet seconds since start
    clock_offset_s: float = 0.0  # its wall clock against the true time (no real-time clock)


@dataclass
class Member:
    spec: MemberSpec
    device: VirtualDevice
    daemon: Daemon
    device_id: str
    hostname: str
    boots: list[BootRecord] = field(default_factory=list)
    # False from a power cut in the middle of its daemon's work (chaos.virtual_device.PowerCut)
    # until VirtualFleet.power_on: the device is dark, doing and answering nothing
    powered: bool = True

    @property
    def version(self) -> str | None:
        running = self.device.running
        return running.image.version if running and running.image else None


def _trust(keyring: Path, source: Path) -> None:
    """Make ``keyring`` trust ``source``: a public key (``.pub``), or a keyring directory
    (its keys, revocations and threshold)."""
    if not source.is_dir():
        trust_key(keyring, source)
        return
    keyring.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.suffix == ".pub" or path.name in (REVOKED_FILE, CONFIG_FILE):
            shutil.copyfile(path, keyring / path.name)


class VirtualFleet:
    """See the module docstring. ``server_key`` and ``release_key``: a public key (``.pub``)
    or a keyring directory each."""

    def __init__(
        self,
        root: Path,
        specs: Sequence[MemberSpec],
        *,
        server_urls: Sequence[str],
        server_key: Path,
        release_key: Path,
        enrollment_token: str,
        firmware: str = "grub",
        base_version: str = "1.0.0",
        clock: LabClock | None = None,
        wall_clock: Callable[[], float] | None = None,
        workers: int = 1,
        compatible: str = "lab-device",
        plain_images: bool = False,
        slot_sizes: Mapping[str, int] | None = None,
    ) -> None:
        import time

        import chaos.lab_firmwares  # noqa: F401 (fills LAB_FIRMWARES)

        self.clock = clock or LabClock()
        self.workers = workers
        self.started = self.clock()
        self._wall = wall_clock or time.time
        self.compatible = compatible
        self.plain_images = plain_images
        self.slot_sizes = slot_sizes
        template = root / "template"
        device = self._device(template, firmware)
        _trust(template / "keyring", release_key)
        _trust(template / "server-keyring", server_key)
        device.provision(make_lab_image(base_version), base_version)
        device.power_on()
        self.members: list[Member] = []
        for index, spec in enumerate(specs):
            member_root = root / f"{spec.role}-{index:04d}"
            shutil.copytree(template, member_root, copy_function=copy_sparse)
            self.members.append(
                self._member(member_root, firmware, spec, index, server_urls, enrollment_token)
            )

    def _device(
        self, root: Path, firmware: str, profile: FaultProfile | None = None
    ) -> VirtualDevice:
        return VirtualDevice(
            root, firmware, compatible=self.compatible, profile=profile,
            plain_images=self.plain_images, slot_sizes=self.slot_sizes,
        )  # fmt: skip

    def _member(
        self,
        root: Path,
        firmware: str,
        spec: MemberSpec,
        index: int,
        server_urls: Sequence[str],
        enrollment_token: str,
    ) -> Member:
        device = self._device(root, firmware, spec.profile)
        device.config = dataclasses.replace(
            device.config, server_urls=tuple(server_urls),
            server_keyring=root / "server-keyring", enrollment_token=enrollment_token,
            role=spec.role, tags=tuple(sorted(set(spec.tags))),
        )  # fmt: skip
        device.boot(BootEvent(BootCause.POWER_ON), run_boot_check=False)
        identity = load_or_create_identity(device.config.data_dir)[0]
        keyring = Keyring.load(root / "server-keyring")
        client = ServerClient(
            server_urls, identity.key, keyring, clock=self.clock, timeout_s=5.0,
            wall_clock=lambda: self._wall() + spec.clock_offset_s,
        )  # fmt: skip
        hostname = f"{spec.role}-{index:04d}"
        daemon = Daemon(
            device.runtime(), client, self.clock, self.clock.sleep, hostname=hostname,
            wall_clock=lambda: self._wall() + spec.clock_offset_s,
        )  # fmt: skip
        return Member(spec, device, daemon, identity.device_id, hostname)

    def online(self, member: Member) -> bool:
        if not member.powered:
            return False
        elapsed = self.clock() - self.started
        return not any(start <= elapsed < end for start, end in member.spec.offline)

    def power_on(self, member: Member) -> None:
        """Switch on a member whose power was cut: its firmware boots what it finds on the
        disk, then its updater daemon starts as a new process does, knowing only what its
        files hold (the same client: sessions are the server's to keep)."""
        member.device.running = None
        member.boots += member.device.power_on()
        old = member.daemon
        runtime = dataclasses.replace(old.runtime)  # nothing cached from before the cut
        member.daemon = Daemon(
            runtime, old.client, self.clock, self.clock.sleep, hostname=member.hostname,
            wall_clock=lambda: self._wall() + member.spec.clock_offset_s,
        )  # fmt: skip
        member.daemon.runtime.record_start()
        member.powered = True

    def step(self, seconds: float = 5.0) -> None:
        """Move the clock by ``seconds``; every online member does what is due, reboots
        included. With ``workers`` above 1, that many members at a time (each member has its
        own files and daemon; they share only the clock, which does not move meanwhile), so
        many requests reach the server at once, as from a real fleet."""
        self.clock.sleep(seconds)
        online = [member for member in self.members if self.online(member)]
        if self.workers <= 1:
            for member in online:
                self._run(member)
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="fleet") as pool:
            list(pool.map(self._run, online))  # a member's exception is raised here

    @staticmethod
    def _run(member: Member) -> None:
        try:
            member.daemon.run_once()
        except PowerCut:  # a scenario cut its power in the middle of a write
            member.powered = False
            return
        device = member.device
        if device.pending_reboot is not None:
            command = tuple(device.pending_reboot)
            member.boots += device.settle(BootEvent(BootCause.REBOOT, command))

    def run_until(self, done: Callable[[], bool], *, limit_s: float, step_s: float = 5.0) -> float:
        """Step until ``done``; return the simulated seconds it took.

        Raises:
            TimeoutError: not done within ``limit_s`` simulated seconds.
        """
        start = self.clock()
        while not done():
            if self.clock() - start > limit_s:
                raise TimeoutError(f"fleet not done after {limit_s:.0f} simulated seconds")
            self.step(step_s)
        return self.clock() - start

    def versions(self) -> Counter[str | None]:
        """How many members run each version."""
        return Counter(member.version for member in self.members)

    def installs_started(self) -> int:
        """Installs the members' updaters began, in all."""
        return sum(len(m.device.events("install.started")) for m in self.members)
