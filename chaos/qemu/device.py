"""The reference device under QEMU, booted one reset at a time, each boot checked against the
GRUB firmware model.

:class:`QemuLab` builds what every device of a test session shares: a signing key and keyring,
the Debian kernel and an initramfs, release images and bundles, the safe-mode image, and a
pristine disk (``fleet image disk --layout grub``'s layout, slot A holding release 1.0.0).
:class:`ReferenceDevice` is one device: a copy of that disk, its own UEFI variable store and an
inbox of bundles shared with the guest.

Before every boot the lab copies the ESP out of the disk and lets
:class:`bootloader_hooks.grub_model.GrubModel` run the same ``grub.cfg`` on it: the slot it
predicts, and the boot variables it leaves, are compared with what the guest reports (the
``fleet.slot=`` real GRUB put on the kernel command line, and ``grubenv`` as Linux reads it).
Every comparison is kept in :attr:`ReferenceDevice.boots`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from bootloader_hooks import grubenv
from bootloader_hooks.base import BootCause, BootEvent, provisioned_files
from bootloader_hooks.grub import ESP_DIRECTORY
from bootloader_hooks.grub_model import GrubModel
from chaos.qemu.fat import FatReadError, read_file
from chaos.qemu.guest import (
    COMPATIBLE,
    Share,
    compiled_checkout,
    host_shares,
    populate_slot_tree,
    updater_toml,
)
from chaos.qemu.initramfs import build_initramfs
from chaos.qemu.kernel import DebianKernel, fetch_kernel
from chaos.qemu.machine import OVMF_VARS, Machine, MachineError, Marker
from image_builder.bundle_writer import ImageSource, create_bundle
from image_builder.disk import DiskImage, grub_disk
from image_builder.filesystem import build_filesystem_image
from safe_mode_partition.slot import SafeModeContents, build_safe_mode_image
from signing.keyring import trust_key
from signing.keys import SigningKey, generate_key
from updater.state import DeviceState, StateStore

BUSYBOX = Path("/bin/busybox")
ROOT_IMAGE_SIZE = 24 << 20
ROOT_SLOT_SIZE = 32 << 20
KERNEL_OPTIONS = "ro console=ttyS0 panic=1 quiet"
ATTEMPTS = 3
BOOT_TIMEOUT_S = 300.0  # from power-on to the guest's first report, under a loaded emulator
RUN_TIMEOUT_S = 600.0  # a boot check, an install
_GRUB_FILE = re.compile(r"\(hd0,gpt(\d+)\)(/.*)")
VARIABLES = ("BOOT_ORDER", "BOOT_A_LEFT", "BOOT_B_LEFT", "FLEET_TRIAL")
# fsck.fat -n lines that report nothing wrong: its banner, the dirty bit, the summary.
_FSCK_BENIGN = re.compile(
    r"fsck\.fat \d|Dirty bit is set|Automatically removing dirty bit|"
    r"Leaving filesystem unchanged|\S+: \d+ files, \d+/\d+ clusters$"
)


@dataclass(frozen=True)
class Release:
    version: str
    behaviour: str
    image: Path  # the rootfs image (ext4)
    bundle: Path


class QemuLab:
    """What the devices of a test session share; built under ``workdir``."""

    def __init__(self, workdir: Path, kernel: DebianKernel | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.kernel = kernel or fetch_kernel()
        self.keyring = workdir / "keyring"
        key_base = workdir / "release-key"
        if not key_base.with_suffix(".pem").exists():
            generate_key(key_base)
            trust_key(self.keyring, key_base.with_suffix(".pub"))
        from signing.keys import load_private_key

        self.key: SigningKey = load_private_key(key_base.with_suffix(".pem"))
        self.initrd = build_initramfs(self.kernel, BUSYBOX)
        self.checkout = compiled_checkout(workdir / "checkout")
        self.inbox_root = workdir / "inboxes"
        self.releases: dict[tuple[str, str], Release] = {}
        self._pristine: DiskImage | None = None

    def shares(self, inbox: Path) -> list[Share]:
        return host_shares(inbox, self.checkout)

    def _tree(self, name: str, version: str, behaviour: str, role: str) -> Path:
        tree = self.workdir / "trees" / name
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        populate_slot_tree(
            tree,
            vmlinuz=self.kernel.vmlinuz,
            initrd=self.initrd,
            busybox=BUSYBOX,
            keyring=self.keyring,
            shares=self.shares(Path("/nonexistent")),
            version=version,
            behaviour=behaviour,
            role=role,
            attempts=ATTEMPTS,
        )
        return tree

    def release(
        self, version: str, behaviour: str = "healthy", security_version: int = 1
    ) -> Release:
        """A release image and its signed bundle (built once per session)."""
        key = (version, behaviour)
        if key not in self.releases:
            name = f"{version}-{behaviour}"
            tree = self._tree(name, version, behaviour, "root")
            image = self.workdir / f"{name}.ext4"
            build_filesystem_image(tree, image, "ext4", size_bytes=ROOT_IMAGE_SIZE, label="root")
            bundle = self.workdir / f"{name}.bundle"
            create_bundle(
                bundle,
                images=[ImageSource("rootfs", image)],
                keys=[self.key],
                compatible=COMPATIBLE,
                version=version,
                security_version=security_version,
            )
            self.releases[key] = Release(version, behaviour, image, bundle)
        return self.releases[key]

    def safe_image(self) -> Path:
        """The safe-mode slot, built by safe_mode_partition on the lab's busybox root (which
        runs recovery from its own init, and the updater from the host's share)."""
        image = self.workdir / "safe.squashfs"
        if not image.exists():
            tree = self._tree("safe", "safe", "healthy", "safe")
            contents = SafeModeContents(
                keyring=self.keyring, updater_config=updater_toml(attempts=ATTEMPTS), systemd=False
            )
            build_safe_mode_image(tree, contents, image, updater_paths=())
        return image

    def pristine_disk(self) -> DiskImage:
        """The factory disk: release 1.0.0 in slot A, committed; B empty."""
        if self._pristine is None:
            first = self.release("1.0.0")
            data = self.workdir / "trees" / "data"
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir(parents=True)
            factory = DeviceState(installed_security_version=1).with_slot(
                "a", status="good", version="1.0.0", security_version=1
            )
            StateStore(data).save(factory)
            boot_files = provisioned_files(
                "grub", primary="a", attempts=ATTEMPTS, kernel_options=KERNEL_OPTIONS
            )
            self._pristine = grub_disk(
                self.workdir / "pristine.img",
                boot_files=boot_files,
                rootfs=first.image,
                safe_rootfs=self.safe_image(),
                root_size=ROOT_SLOT_SIZE,
                data_dir=data,
                data_size=32 << 20,
            )
        return self._pristine

    def device(self, name: str) -> ReferenceDevice:
        pristine = self.pristine_disk()
        directory = self.workdir / "devices" / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        disk = directory / "disk.img"
        subprocess.run(["cp", "--sparse=always", str(pristine.path), str(disk)], check=True)
        shutil.copyfile(OVMF_VARS, directory / "vars.fd")
        inbox = directory / "inbox"
        inbox.mkdir()
        return ReferenceDevice(self, directory, dataclasses.replace(pristine, path=disk), inbox)


@dataclass
class Boot:
    """One boot: what the GRUB model predicted and what the guest reported."""

    cause: BootCause
    predicted_slot: str
    predicted_env: dict[str, str]
    slot: str | None = None  # None: the guest never reported (died before user space)
    env: dict[str, str] = field(default_factory=dict)
    version: str | None = None
    outcome: str = "running"  # reset, ready, cut
    boot_check_rc: str | None = None
    seconds: float | None = None  # from QEMU's start to the guest serving commands

    @property
    def agrees(self) -> bool:
        return self.slot == self.predicted_slot and self.env == self.predicted_env


class ReferenceDevice:
    """One device; see the module docstring."""

    def __init__(self, lab: QemuLab, directory: Path, disk: DiskImage, inbox: Path) -> None:
        self.lab = lab
        self.directory = directory
        self.disk = disk
        self.inbox = inbox
        self.boots: list[Boot] = []
        self.machine: Machine | None = None
        self.console: TextIO = (directory / "console.log").open("a")
        self._next_cause = BootCause.POWER_ON

    # --- the disk, read from the host between boots ----------------------------------------

    def _offset(self, label: str) -> int:
        return self.disk.partition(label).offset_bytes

    @contextmanager
    def esp_copy(self) -> Iterator[Path]:
        """The boot selection files of the ESP (``EFI/fleet``), read out of the disk as GRUB
        reads them (:mod:`chaos.qemu.fat`), in a temporary directory."""
        with tempfile.TemporaryDirectory(prefix="fleet-esp-") as name:
            esp = Path(name)
            (esp / ESP_DIRECTORY).mkdir(parents=True)
            for file in ("grub.cfg", "grubenv"):
                try:
                    data = read_file(self.disk.path, self._offset("esp"), f"{ESP_DIRECTORY}/{file}")
                except FatReadError:
                    continue  # GRUB finds no such file either
                (esp / ESP_DIRECTORY / file).write_bytes(data)
            yield esp

    def grub_variables(self) -> dict[str, str]:
        with self.esp_copy() as esp:
            return _variables(esp / ESP_DIRECTORY / "grubenv")

    def kernel_present(self, grub_file: str) -> bool:
        """Whether GRUB would find ``(hd0,gptN)/file``: asked of the filesystem in the disk."""
        match = _GRUB_FILE.fullmatch(grub_file)
        if match is None:
            return False
        number, path = int(match.group(1)), match.group(2)
        part = next((p for p in self.disk.partitions if p.number == number), None)
        if part is None:
            return False
        if part.label == "root_safe":
            argv = ["unsquashfs", "-o", str(part.offset_bytes), "-l", str(self.disk.path), path]
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
            return f"squashfs-root{path}" in result.stdout.split()
        argv = ["debugfs", "-R", f"stat {path}", f"{self.disk.path}?offset={part.offset_bytes}"]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        return "Type: regular" in result.stdout

    def esp_problems(self) -> list[str]:
        """What ``fsck.fat -n`` finds wrong with the ESP, read out of the disk (the machine
        must be off). The dirty bit is not a problem: Linux sets it while the ESP is mounted
        read-write, so every power cut leaves it, and the next mount clears it."""
        part = self.disk.partition("esp")
        with tempfile.NamedTemporaryFile(prefix="fleet-esp-", suffix=".vfat") as copy:
            with self.disk.path.open("rb") as handle:
                handle.seek(part.offset_bytes)
                copy.write(handle.read(part.size_bytes))
            copy.flush()
            result = subprocess.run(
                ["fsck.fat", "-n", copy.name], capture_output=True, text=True, check=False
            )
        if result.returncode not in (0, 1):
            return [f"fsck.fat failed ({result.returncode}): {result.stderr.strip()}"]
        return [
            line.strip()
            for line in (result.stdout + result.stderr).splitlines()
            if line.strip() and not _FSCK_BENIGN.match(line.strip())
        ]

    def slot_bytes(self, slot: str, length: int) -> bytes:
        with self.disk.path.open("rb") as handle:
            handle.seek(self._offset(f"root_{slot}"))
            return handle.read(length)

    def slot_release(self, slot: str) -> Release | None:
        """The release whose complete image slot ``slot`` holds, if any."""
        for release in self.lab.releases.values():
            size = release.image.stat().st_size
            if self.slot_bytes(slot, size) == release.image.read_bytes():
                return release
        return None

    def predict(self) -> tuple[str, dict[str, str]]:
        """The GRUB model's boot on a copy of the ESP: the slot, the variables it leaves."""
        with self.esp_copy() as esp:
            model = GrubModel(esp, kernel_present=self.kernel_present)
            outcome = model.boot(BootEvent(self._next_cause))
            return outcome.slot, _variables(esp / ESP_DIRECTORY / "grubenv")

    # --- booting ---------------------------------------------------------------------------

    def _launch(self) -> Boot:
        """Predict the boot with the model, then start QEMU."""
        slot, env = self.predict()
        boot = Boot(self._next_cause, slot, env)
        self.boots.append(boot)
        self.console.write(f"\n===== boot {len(self.boots)} ({boot.cause.value}) =====\n")
        self.machine = Machine.start(
            self.disk.path, self.directory / "vars.fd", self.lab.shares(self.inbox), self.console
        )
        return boot

    def _observe(self, boot: Boot) -> None:
        """Fill in what the guest reported of this boot so far."""
        marker = self._last_marker("booted")
        if marker is not None and boot.slot is None:
            boot.slot = marker.fields.get("slot")
            boot.version = marker.fields.get("version")
            boot.env = {k: v.replace(",", " ") for k, v in marker.fields.items() if k in VARIABLES}

    def start(self) -> Boot:
        """Power on (or come out of a reset); return once the guest reports its slot, or the
        machine reset before it could."""
        boot = self._launch()
        machine = self._machine()
        machine.wait_marker("booted", BOOT_TIMEOUT_S)
        self._observe(boot)
        return boot

    def _follow_reset(self) -> None:
        """The machine reset on its own: record it, and power on the next boot."""
        self.boots[-1].outcome = "reset"
        self._observe(self.boots[-1])
        self._next_cause = BootCause.REBOOT
        self._launch()

    def wait_through_resets(
        self, event: str, after: Marker | None = None, max_boots: int = 4
    ) -> Marker:
        """Let the device run, through the reboots and resets it makes on its own, until the
        guest reports ``event`` (a marker or an updater log event): after the report ``after``
        of the running boot, or else after this call.

        Raises:
            MachineError: not reported within ``max_boots`` boots or in time.
        """
        start = len(self._machine().lines) if after is None else after.line + 1
        for _ in range(max_boots):
            marker = self._machine().wait_marker(event, RUN_TIMEOUT_S, start)
            if marker is not None:
                return marker
            self._machine().wait_exit(60)
            self._follow_reset()
            start = 0
        raise MachineError(f"no '{event}' from the guest in {max_boots} boots")

    def run_for(self, seconds: float, after: str | None = None) -> str:
        """Let the device run for ``seconds`` (through the reboots and resets it makes on its
        own), counted from now or from the guest's next report of ``after``, then cut the
        power. Returns the last thing the guest reported before the cut."""
        if after is not None:
            self.wait_through_resets(after)
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                self._machine().wait_exit(remaining)
            except MachineError:
                break  # still running at the deadline
            self._follow_reset()
        self._observe(self.boots[-1])
        markers = self._machine().markers
        last = markers[-1].event if markers else "firmware or kernel"
        phase = f"boot {len(self.boots)}: {last}"
        self.cut_power()
        return phase

    def _finish(self, boot: Boot) -> bool:
        """Follow a started boot to its end: ``True`` once the guest is up and serving
        commands, ``False`` if it reset first."""
        machine = self._machine()
        ready = machine.wait_marker("ready", RUN_TIMEOUT_S)
        if ready is None:
            machine.wait_exit(60)
            boot.outcome = "reset"
            self._next_cause = BootCause.RESET
            return False
        check = self._last_marker("boot-check")
        boot.boot_check_rc = check.fields.get("rc") if check else None
        boot.outcome = "ready"
        boot.seconds = time.monotonic() - machine.started
        return True

    def settle(self, max_boots: int = 12) -> Boot:
        """Boot until the guest is up and serving commands; the last boot.

        Raises:
            MachineError: still resetting after ``max_boots`` boots.
        """
        running = self.machine is not None and self.machine.running
        unfinished = running and self.boots and self.boots[-1].outcome == "running"
        if unfinished and self._finish(self.boots[-1]):
            return self.boots[-1]
        for _ in range(max_boots):
            boot = self.start()
            if self._finish(boot):
                return boot
        raise MachineError(f"no stable boot after {max_boots} boots: {self.boots[-max_boots:]}")

    def _machine(self) -> Machine:
        if self.machine is None:
            raise MachineError("the device has not been powered on")
        return self.machine

    def _last_marker(self, event: str) -> Marker | None:
        machine = self._machine()
        found = [m for m in machine.markers if m.event == event]
        return found[-1] if found else None

    def status(self) -> dict[str, Any]:
        """``fleet-updater status --json`` in the running guest."""
        machine = self._machine()
        after = len(machine.lines)
        machine.send("status")
        begin = machine.wait_marker("status-begin", RUN_TIMEOUT_S, after)
        end = machine.wait_marker("status-end", RUN_TIMEOUT_S, after)
        if begin is None or end is None:
            raise MachineError("the guest stopped while printing its status")
        return _json_between(machine.lines, begin.line, end.line)

    def wait_for(self, event: str) -> Marker:
        """Wait for the guest to report ``event`` in this boot.

        Raises:
            MachineError: the machine stopped, or stayed silent, first.
        """
        machine = self._machine()
        marker = machine.wait_marker(event, RUN_TIMEOUT_S)
        if marker is None:
            raise MachineError(f"the machine stopped before reporting '{event}'")
        return marker

    def last_status(self) -> dict[str, Any]:
        """The status the guest printed after its boot check."""
        machine = self._machine()
        begin = self._last_marker("status-begin")
        end = self._last_marker("status-end")
        if begin is None or end is None:
            raise MachineError("the guest printed no status this boot")
        return _json_between(machine.lines, begin.line, end.line)

    def last_marker(self, event: str) -> Marker | None:
        """The guest's last report ``event`` (a marker or an updater log event) this boot."""
        return self._last_marker(event)

    def log_events(self, event: str) -> list[Marker]:
        """Every report ``event`` (a marker or an updater log event) of this boot."""
        return [m for m in self._machine().markers if m.event == event]

    def put(self, release: Release, name: str | None = None) -> str:
        """Put a bundle in the inbox; its path in the guest."""
        target = self.inbox / (name or release.bundle.name)
        shutil.copyfile(release.bundle, target)
        return f"/srv/inbox/{target.name}"

    def install(self, release: Release) -> None:
        """Run ``fleet-updater install`` in the guest; it reboots the machine when done."""
        machine = self._machine()
        path = self.put(release)
        machine.send(f"install {path}")
        machine.wait_exit(RUN_TIMEOUT_S)
        self._next_cause = BootCause.REBOOT

    def reboot(self) -> None:
        """Reboot from Linux (``reboot -f``), as an operator would."""
        machine = self._machine()
        machine.send("reboot")
        machine.wait_exit(RUN_TIMEOUT_S)
        self._next_cause = BootCause.REBOOT

    def write_slot(self, slot: str, data: bytes) -> None:
        """Overwrite the start of a root slot from the host (the machine must be off): a
        damaged slot, or a release put there by other means than the updater."""
        if self.machine is not None and self.machine.running:
            raise MachineError("the machine is running: cut the power first")
        with self.disk.path.open("r+b") as handle:
            handle.seek(self._offset(f"root_{slot}"))
            handle.write(data)

    def begin_install(self, release: Release) -> None:
        """Start an install and return at once (to cut the power in the middle of it)."""
        machine = self._machine()
        machine.send(f"install {self.put(release)}")

    def cut_power(self) -> None:
        if self.machine is not None:
            self.machine.cut_power()
            if self.boots and self.boots[-1].outcome == "running":
                self.boots[-1].outcome = "cut"
        self._next_cause = BootCause.POWER_ON

    def shut_down(self) -> None:
        self.cut_power()
        self.console.close()


def _variables(path: Path) -> dict[str, str]:
    try:
        found = grubenv.read(path).variables()
    except (OSError, ValueError):
        return {}
    except Exception:  # a damaged block: GRUB would read nothing either
        return {}
    return {name: value for name, value in found.items() if name in VARIABLES}


def _json_between(lines: list[str], begin: int, end: int) -> dict[str, Any]:
    text = "\n".join(line for line in lines[begin + 1 : end] if not line.startswith("["))
    document = json.loads(text[text.index("{") : text.rindex("}") + 1])
    if not isinstance(document, dict):
        raise MachineError("status is not a JSON object")
    return document
