"""The device's own health figures, read from ``/proc`` and ``statvfs``: CPU use, memory,
the data partition's size, network traffic.

The daemon publishes them on its own metrics (``fleet_updater_cpu_usage_ratio`` and the
others, see :mod:`updater.metrics`), so a device that no node_exporter watches still shows
how loaded it is. Nothing here writes anything or needs a dependency: the kernel's text
formats are parsed directly.

The parsers take text and raise :class:`ValueError` naming what is wrong with it; every file
is read bounded (:data:`MAX_PROC_BYTES`), and every number must fit the kernel's 64-bit
counters. :class:`HostSampler` turns a failed read into an unknown figure and one report per
failure, never an exception: a broken ``/proc`` must not stop the daemon.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

DEFAULT_PROC = Path("/proc")
# /proc/stat and /proc/net/dev of a machine with hundreds of CPUs or interfaces stay far below
MAX_PROC_BYTES = 1 << 20
MAX_COUNTER = 2**64 - 1  # the kernel's counters are unsigned 64-bit
MAX_INTERFACES = 16  # containers add a veth interface each: the label set stays bounded
MAX_INTERFACE_NAME = 15  # the kernel's IFNAMSIZ, less its terminating zero
LOOPBACK = "lo"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:@-]")
_KIB = 1024
_T = TypeVar("_T")


@dataclass(frozen=True)
class CpuTimes:
    """Clock ticks the CPUs spent since boot: in all, and busy (neither idle nor waiting for
    I/O)."""

    busy: int
    total: int


@dataclass(frozen=True)
class Memory:
    """``MemTotal`` and ``MemAvailable`` in bytes; ``available`` is ``None`` on kernels that
    do not estimate it (before 3.14)."""

    total: int
    available: int | None


@dataclass(frozen=True)
class InterfaceTraffic:
    """Bytes an interface received and sent since it came up."""

    receive: int
    transmit: int


@dataclass(frozen=True)
class HostSample:
    """One reading of every figure; ``None`` where it could not be read (for the CPU: also on
    the first sample, which has no earlier one to compare with)."""

    cpu_usage_ratio: float | None
    memory: Memory | None
    network: dict[str, InterfaceTraffic] | None


def _counter(text: str, what: str) -> int:
    """``text`` as a kernel counter (a decimal integer from 0 to :data:`MAX_COUNTER`)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise ValueError(f"{what}: {text[:40]!r} is not a counter")
    value = int(text)
    if value > MAX_COUNTER:
        raise ValueError(f"{what}: {text[:40]!r} is above 2^64")
    return value


def parse_proc_stat(text: str) -> CpuTimes:
    """The aggregate ``cpu`` line of ``/proc/stat``: user, nice, system, idle, iowait, irq,
    softirq, steal (older kernels print fewer, at least four). Guest time is already counted
    in user and nice, so it is not added again.

    Raises:
        ValueError: no ``cpu`` line, or one without four counters.
    """
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [_counter(f, "/proc/stat cpu") for f in fields[1:9]]
            if len(ticks) < 4:
                raise ValueError(f"/proc/stat cpu: {len(ticks)} fields, at least 4 expected")
            total = sum(ticks)
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
            return CpuTimes(busy=total - idle, total=total)
    raise ValueError("/proc/stat: no aggregate cpu line")


def cpu_usage_ratio(earlier: CpuTimes, later: CpuTimes) -> float | None:
    """The fraction (0 to 1) of CPU time that was busy between two readings; ``None`` when no
    time passed between them, or the counters went back (a reboot in between, a wrapped or
    hostile file)."""
    total = later.total - earlier.total
    busy = later.busy - earlier.busy
    if total <= 0 or busy < 0 or busy > total:
        return None
    return busy / total


def parse_meminfo(text: str) -> Memory:
    """``MemTotal`` and ``MemAvailable`` of ``/proc/meminfo`` (``MemTotal:  16318772 kB``).

    Raises:
        ValueError: no usable ``MemTotal``, or an available figure above the total.
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, colon, rest = line.partition(":")
        if not colon or key not in ("MemTotal", "MemAvailable") or key in values:
            continue
        fields = rest.split()
        if len(fields) != 2 or fields[1] != "kB":
            raise ValueError(f"/proc/meminfo {key}: {rest.strip()[:40]!r} is not '<n> kB'")
        kib = _counter(fields[0], f"/proc/meminfo {key}")
        if kib > MAX_COUNTER // _KIB:
            raise ValueError(f"/proc/meminfo {key}: {fields[0][:40]!r} kB is above 2^64 bytes")
        values[key] = kib * _KIB
    if "MemTotal" not in values:
        raise ValueError("/proc/meminfo: no MemTotal")
    available = values.get("MemAvailable")
    if available is not None and available > values["MemTotal"]:
        raise ValueError("/proc/meminfo: MemAvailable above MemTotal")
    return Memory(values["MemTotal"], available)


def interface_label(name: str) -> str:
    """``name`` as a bounded, printable label value: characters outside letters, digits and
    ``_.:@-`` become ``_``, and it is cut to :data:`MAX_INTERFACE_NAME` characters (the
    kernel's own limit: a longer name does not come from the kernel)."""
    return _UNSAFE.sub("_", name)[:MAX_INTERFACE_NAME]


def parse_net_dev(text: str, limit: int = MAX_INTERFACES) -> dict[str, InterfaceTraffic]:
    """Received and sent bytes per interface from ``/proc/net/dev``, loopback left out.

    Names pass through :func:`interface_label`; when two names come out the same, the first
    one counts. At most ``limit`` interfaces, in the file's order (the kernel lists physical
    interfaces before the ones added later). Lines that are not an interface's (the two
    header lines) are skipped.

    Raises:
        ValueError: an interface line without 16 counters, or with a counter that is not one.
    """
    traffic: dict[str, InterfaceTraffic] = {}
    for line in text.splitlines():
        name, colon, rest = line.rpartition(":")
        name = name.strip()
        if not colon or not name or "|" in line:
            continue
        fields = rest.split()
        if len(fields) < 16:
            raise ValueError(f"/proc/net/dev {interface_label(name)!r}: {len(fields)} fields")
        what = f"/proc/net/dev {interface_label(name)!r}"
        receive, transmit = _counter(fields[0], what), _counter(fields[8], what)
        if name == LOOPBACK:
            continue
        label = interface_label(name)
        if label in traffic:
            continue
        if len(traffic) >= limit:
            break
        traffic[label] = InterfaceTraffic(receive, transmit)
    return traffic


def filesystem_size_bytes(path: Path) -> int:
    """Size of the filesystem holding ``path`` (what ``df`` calls its size).

    Raises:
        OSError: ``path`` does not exist or cannot be examined.
    """
    stats = os.statvfs(path)
    return stats.f_blocks * stats.f_frsize


def _read(path: Path) -> str:
    """At most :data:`MAX_PROC_BYTES` of ``path``, as text.

    Raises:
        OSError: it cannot be read.
        ValueError: it is longer than the bound.
    """
    with path.open("rb") as handle:
        data = handle.read(MAX_PROC_BYTES + 1)
    if len(data) > MAX_PROC_BYTES:
        raise ValueError(f"{path}: longer than {MAX_PROC_BYTES} bytes")
    # bytes outside ASCII turn into U+FFFD rather than failing the whole file: an interface
    # may be named in UTF-8 (interface_label makes it "_"), and a number holding one is
    # refused by the parser as any other bad number
    return data.decode("ascii", errors="replace")


@dataclass
class HostSampler:
    """Reads the figures of one :class:`HostSample` at a time from ``proc``, keeping the last
    CPU reading to compare the next with, and which figures could not be read."""

    proc: Path = DEFAULT_PROC
    _cpu: CpuTimes | None = field(default=None, init=False)
    _failing: set[str] = field(default_factory=set, init=False)
    _report: Callable[[str, str], None] | None = field(default=None, init=False)

    def sample(self, report: Callable[[str, str], None] | None = None) -> HostSample:
        """Read every figure now; never raises. ``report(source, problem)`` is told about a
        figure (``cpu``, ``memory``, ``network``) that cannot be read, once until it can be
        read again: a device whose ``/proc/net/dev`` is unreadable does not log it every
        round."""
        self._report = report
        cpu = self._attempt("cpu", lambda: parse_proc_stat(_read(self.proc / "stat")))
        ratio = None
        if cpu is not None and self._cpu is not None:
            ratio = cpu_usage_ratio(self._cpu, cpu)
        self._cpu = cpu
        memory = self._attempt("memory", lambda: parse_meminfo(_read(self.proc / "meminfo")))
        network = self._attempt("network", lambda: parse_net_dev(_read(self.proc / "net" / "dev")))
        return HostSample(ratio, memory, network)

    def _attempt(self, source: str, read: Callable[[], _T]) -> _T | None:
        try:
            value = read()
        except (OSError, ValueError) as err:
            if source not in self._failing:
                self._failing.add(source)
                if self._report is not None:
                    self._report(source, str(err))
            return None
        self._failing.discard(source)
        return value
