"""One run of ``qemu-system-x86_64``: the reference machine from power-on to reset or power cut.

The machine: q35, OVMF (Debian's ``ovmf``) as UEFI firmware with a per-device variable store,
the reference disk on virtio-blk, the host shares on virtio-9p, an i6300esb watchdog, the
serial port as the console, no network. ``-no-reboot``: any reset (a reboot from Linux, a
kernel panic, the watchdog) ends the QEMU process, so that the lab can read the disk between
two boots and ask the GRUB model what the next one will do. A reset is therefore a new process
starting with the same disk, which is all a warm reset keeps: GRUB's state is on the disk.

Acceleration: TCG unless ``FLEET_QEMU_ACCEL=kvm``. KVM is not probed: on the machines this
runs on ``/dev/kvm`` exists but a guest hangs in it, and a probe that hangs is worse than a
slower emulator (docs/qemu.md).

Cutting the power is ``SIGKILL``: what QEMU had written to the disk file stays, what the guest
still held in its page cache is lost, as on real hardware.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from chaos.qemu.guest import MARKER, Share
from fleet_core.errors import FleetError

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
MEMORY_MB = 768
_MARKER_LINE = re.compile(rf"{MARKER} (\S+)(.*)")


class MachineError(FleetError):
    """The machine did not do what the lab waited for (timeout, unexpected exit)."""


@dataclass(frozen=True)
class Marker:
    """A report from the guest: a ``FLEET-QEMU <event> key=value ...`` line from its init, or
    one of the updater's JSON log lines (``event`` is then the log event, ``install.started``:
    updater events always hold a dot, the init's never do)."""

    event: str
    fields: dict[str, str]
    line: int  # index in the console transcript
    at: float = field(default_factory=time.monotonic)  # when the lab read it (host clock)


def parse_marker(text: str, index: int) -> Marker | None:
    match = _MARKER_LINE.search(text)
    if match is not None:
        fields = dict(word.split("=", 1) for word in match.group(2).split() if "=" in word)
        return Marker(match.group(1), fields, index)
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None  # not a log line, or one the kernel's messages broke up
    if not isinstance(record, dict) or not isinstance(record.get("event"), str):
        return None
    fields = {key: str(value) for key, value in record.items() if key != "event"}
    return Marker(record["event"], fields, index)


def accelerator() -> str:
    return "kvm" if os.environ.get("FLEET_QEMU_ACCEL") == "kvm" else "tcg"


def qemu_argv(disk: Path, vars_file: Path, shares: Sequence[Share]) -> list[str]:
    argv = [QEMU, "-machine", f"q35,accel={accelerator()}", "-m", str(MEMORY_MB), "-smp", "1"]
    argv += ["-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio"]
    argv += ["-action", "watchdog=reset", "-device", "i6300esb"]
    argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"]
    argv += ["-drive", f"if=pflash,format=raw,unit=1,file={vars_file}"]
    argv += ["-drive", f"if=none,id=disk,format=raw,cache=unsafe,file={disk}"]
    argv += ["-device", "virtio-blk-pci,drive=disk,bootindex=0"]
    for share in shares:
        argv += ["-virtfs", f"local,path={share.path},mount_tag={share.tag},"
                 "security_model=none,readonly=on"]  # fmt: skip
    return argv


@dataclass
class Machine:
    """A running QEMU; its console transcript grows in ``lines`` (and in ``log``)."""

    process: subprocess.Popen[bytes]
    log: IO[str]
    lines: list[str] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, disk: Path, vars_file: Path, shares: Sequence[Share], log: IO[str]) -> Machine:
        process = subprocess.Popen(
            qemu_argv(disk, vars_file, shares),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        machine = cls(process, log)
        machine._reader = threading.Thread(target=machine._read, daemon=True)
        machine._reader.start()
        return machine

    def _read(self) -> None:
        stdout = self.process.stdout
        if stdout is None:
            return
        pending = b""
        while chunk := os.read(stdout.fileno(), 65536):
            pending += chunk
            *complete, pending = re.split(rb"\r?\n|\r", pending)
            self._add(complete)
        self._add([pending] if pending else [])
        with self._changed:
            self._changed.notify_all()

    def _add(self, raw_lines: list[bytes]) -> None:
        with self._changed:
            for raw in raw_lines:
                text = raw.decode("utf-8", "replace")
                index = len(self.lines)
                self.lines.append(text)
                self.log.write(text + "\n")
                marker = parse_marker(text, index)
                if marker is not None:
                    self.markers.append(marker)
            self.log.flush()
            self._changed.notify_all()

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def wait_marker(self, event: str, timeout_s: float, after: int = 0) -> Marker | None:
        """The first marker ``event`` at or after console line ``after``; None if the machine
        stopped (reset, power cut) without printing it.

        Raises:
            MachineError: still running and silent about it after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for marker in self.markers:
                    if marker.event == event and marker.line >= after:
                        return marker
                reader_done = self._reader is not None and not self._reader.is_alive()
                if reader_done:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MachineError(f"no '{event}' from the guest within {timeout_s:.0f} s")
                self._changed.wait(min(remaining, 1.0))

    def wait_exit(self, timeout_s: float) -> int:
        """Wait for QEMU to end (the guest reset or powered off); its exit status.

        Raises:
            MachineError: still running after ``timeout_s``.
        """
        try:
            status = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired as err:
            raise MachineError(f"the machine did not reset within {timeout_s:.0f} s") from err
        if self._reader is not None:
            self._reader.join(10)
        return status

    def send(self, line: str) -> None:
        """Type ``line`` on the serial console."""
        stdin = self.process.stdin
        if stdin is None:
            raise MachineError("the console of this machine is not connected")
        try:
            stdin.write(line.encode() + b"\n")
            stdin.flush()
        except BrokenPipeError as err:
            raise MachineError("the machine stopped before the command was typed") from err

    def cut_power(self) -> None:
        """Kill QEMU at once: the power cut."""
        if self.running:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        if self._reader is not None:
            self._reader.join(10)
