"""The device's Prometheus metrics, published as a textfile for node_exporter or over HTTP.

Every series is prefixed ``fleet_updater_``:

=================================================  ==============================================
``update_state{state}``                            1 for the current state, 0 for the others
``slot_info{slot,status,version,booted,primary}``  1 per root slot
``attempts_left{slot}``                            trial boots left (when the firmware counts)
``install_bytes_total``                            bytes written to slots
``install_duration_seconds``                       duration of the last install
``install_seconds``                                histogram of install durations
``install_throughput_bytes_per_second``            throughput of the last install
``health_check_failures_total{check}``             failed health checks, by check name
``temperature_celsius``                            hottest thermal zone (NaN: unknown)
``free_space_bytes{path}``                         space available to unprivileged users
``throttled``                                      Raspberry Pi get_throttled bits (NaN: unknown)
``under_voltage``                                  1: the supply is under-voltage now (get_throttled
                                                   bit 0; installs wait), 0: not (NaN: unknown)
``cpu_usage_ratio``                                busy share (0-1) of CPU time between the last
                                                   two rounds (NaN: unknown, or the first round)
``memory_total_bytes``                             MemTotal (NaN: unknown)
``memory_available_bytes``                         MemAvailable (NaN: unknown)
``disk_size_bytes{path}``                          size of the filesystem ``free_space_bytes``
                                                   measures
``network_receive_bytes_total{interface}``         bytes received, per interface (/proc/net/dev,
                                                   loopback left out, at most 16 interfaces)
``network_transmit_bytes_total{interface}``        bytes sent, likewise
``last_boot_check_timestamp_seconds``              wall clock of the last boot check
``crash_loop_restarts``                            daemon restarts in the crash-loop window
``server_unreachable_seconds``                     since the daemon last reached the server
                                                   (0 while it does; daemon only)
``config_problems``                                problems met loading the configuration (a
                                                   fallback configuration is running)
``config_drift``                                   1: the configuration file changed since the
                                                   updater loaded it (it runs another one)
``boot_state_problem``                             1: the boot state (grubenv, U-Boot environment,
                                                   autoboot.txt) reads damaged or missing, until
                                                   the boot check or ``repair`` rebuilds it
``info{version,backend,compatible}``               1; describes this updater
=================================================  ==============================================

``update_state`` is a gauge labelled ``state`` rather than a prometheus_client ``Enum``, whose
label would be named like the metric itself; alert rules read
``fleet_updater_update_state{state="failed"} == 1``. The last install's duration is a gauge
(for the device dashboard) and a histogram (for fleet-wide percentiles); they cannot share a
name, and promtool's linter refuses a type word in a name, so the histogram is
``install_seconds``.

Callers use the intent-named setters; the metric objects stay private. Nothing here uses the
default global registry: the registry is passed in.

Where Prometheus finds the served metrics is :func:`scrape_address`: the daemon reports it in
its heartbeat (``metrics_address``) and the release server lists it for Prometheus's HTTP
service discovery.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily

from fleet_core.durable import atomic_write
from updater.device import under_voltage_now

if TYPE_CHECKING:
    from updater.health import HealthReport
    from updater.hostmetrics import HostSample, InterfaceTraffic

PREFIX = "fleet_updater"
# Addresses that mean "every interface": not something a scraper can connect to.
WILDCARDS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 (compared with, never bound)
UPDATE_STATES = (
    "idle", "downloading", "installing", "installed", "trial", "committed", "failed", "suspended",
)  # fmt: skip
# From a small image over a LAN (seconds) to a large one over a cellular link (an hour).
INSTALL_DURATION_BUCKETS_S = (15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0)


@dataclass(frozen=True)
class SlotView:
    """What the metrics show of one root slot. ``attempts_left`` is ``None`` when the boot
    firmware does not count attempts for this slot (its series is then absent)."""

    status: str
    version: str | None
    booted: bool
    primary: bool
    attempts_left: int | None = None


@dataclass(frozen=True)
class MetricsServer:
    """The HTTP server started by :meth:`UpdaterMetrics.serve`, running in a daemon thread."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The port actually bound (useful after asking for port 0)."""
        return int(self.server.server_port)

    def stop(self) -> None:
        """Stop serving, release the port and wait for the thread to end."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _flag(value: bool) -> str:
    return "true" if value else "false"


class _NetworkCollector:
    """The per-interface byte counters of the last host sample, as counters: the kernel
    counts, this only shows its figures (a prometheus_client ``Counter`` can only be added
    to). Both families are always described, with no series while nothing was read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._traffic: dict[str, InterfaceTraffic] = {}

    def set(self, traffic: Mapping[str, InterfaceTraffic]) -> None:
        with self._lock:
            self._traffic = dict(traffic)

    def collect(self) -> Iterable[Any]:
        with self._lock:
            traffic = sorted(self._traffic.items())
        receive = CounterMetricFamily(
            f"{PREFIX}_network_receive_bytes",
            "Bytes received by a network interface since it came up (loopback left out)",
            labels=["interface"],
        )
        transmit = CounterMetricFamily(
            f"{PREFIX}_network_transmit_bytes",
            "Bytes sent by a network interface since it came up (loopback left out)",
            labels=["interface"],
        )
        for name, figures in traffic:
            receive.add_metric([name], figures.receive)
            transmit.add_metric([name], figures.transmit)
        return [receive, transmit]


class UpdaterMetrics:
    """The updater's metrics, registered in ``registry`` (one instance per registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._lock = threading.Lock()  # set_slots replaces a whole label set at once
        self._update_state = Gauge(
            f"{PREFIX}_update_state",
            "1 for the update state the updater is in, 0 for the others",
            ["state"],
            registry=registry,
        )
        self._slot_info = Gauge(
            f"{PREFIX}_slot_info",
            "1 per root slot, labelled with what it holds and how the firmware sees it",
            ["slot", "status", "version", "booted", "primary"],
            registry=registry,
        )
        self._attempts_left = Gauge(
            f"{PREFIX}_attempts_left",
            "Trial boots the firmware will still make of a slot",
            ["slot"],
            registry=registry,
        )
        self._install_bytes = Counter(
            f"{PREFIX}_install_bytes",
            "Bytes written to slots by installs",
            registry=registry,
        )
        self._install_duration = Gauge(
            f"{PREFIX}_install_duration_seconds",
            "Duration of the last install",
            registry=registry,
        )
        self._install_durations = Histogram(
            f"{PREFIX}_install_seconds",
            "Durations of installs",
            buckets=INSTALL_DURATION_BUCKETS_S,
            registry=registry,
        )
        self._install_throughput = Gauge(
            f"{PREFIX}_install_throughput_bytes_per_second",
            "Write throughput of the last install",
            registry=registry,
        )
        self._health_failures = Counter(
            f"{PREFIX}_health_check_failures",
            "Health checks that failed, by check name",
            ["check"],
            registry=registry,
        )
        self._temperature = Gauge(
            f"{PREFIX}_temperature_celsius",
            "Hottest plausible thermal zone reading; NaN when none could be read",
            registry=registry,
        )
        self._free_space = Gauge(
            f"{PREFIX}_free_space_bytes",
            "Space available to unprivileged users on the filesystem holding path",
            ["path"],
            registry=registry,
        )
        self._throttled = Gauge(
            f"{PREFIX}_throttled",
            "Raspberry Pi firmware get_throttled bits; NaN when not available",
            registry=registry,
        )
        self._under_voltage = Gauge(
            f"{PREFIX}_under_voltage",
            "1 while the firmware flags the supply under-voltage now (installs wait), 0 when "
            "not; NaN when not available",
            registry=registry,
        )
        self._cpu_usage = Gauge(
            f"{PREFIX}_cpu_usage_ratio",
            "Share of CPU time spent busy (not idle, not waiting for I/O) between the last two "
            "metric rounds; NaN when unknown",
            registry=registry,
        )
        self._memory_total = Gauge(
            f"{PREFIX}_memory_total_bytes",
            "Memory the kernel manages (MemTotal); NaN when unknown",
            registry=registry,
        )
        self._memory_available = Gauge(
            f"{PREFIX}_memory_available_bytes",
            "Memory available to new work without swapping (MemAvailable); NaN when unknown",
            registry=registry,
        )
        self._disk_size = Gauge(
            f"{PREFIX}_disk_size_bytes",
            "Size of the filesystem holding path (the one free_space_bytes measures)",
            ["path"],
            registry=registry,
        )
        self._network = _NetworkCollector()
        registry.register(self._network)
        self._last_boot_check = Gauge(
            f"{PREFIX}_last_boot_check_timestamp_seconds",
            "Wall-clock time of the last boot check (the device clock may be off)",
            registry=registry,
        )
        self._crash_loop_restarts = Gauge(
            f"{PREFIX}_crash_loop_restarts",
            "Daemon restarts counted in the crash-loop window",
            registry=registry,
        )
        self._server_unreachable = Gauge(
            f"{PREFIX}_server_unreachable_seconds",
            "Seconds since the daemon last reached the release server; 0 while it does",
            registry=registry,
        )
        self._config_problems = Gauge(
            f"{PREFIX}_config_problems",
            "Problems met loading the configuration; above 0 a fallback configuration runs",
            registry=registry,
        )
        self._config_drift = Gauge(
            f"{PREFIX}_config_drift",
            "1 when the configuration file no longer matches the one the updater runs",
            registry=registry,
        )
        self._boot_state_problem = Gauge(
            f"{PREFIX}_boot_state_problem",
            "1 while the boot state reads damaged or missing (rebuilt from the state store by "
            "the boot check or fleet-updater repair)",
            registry=registry,
        )
        self._info = Info(PREFIX, "The updater on this device", registry=registry)
        self.set_update_state("idle")
        for gauge in (self._temperature, self._throttled, self._under_voltage,
                      self._cpu_usage, self._memory_total, self._memory_available):  # fmt: skip
            gauge.set(math.nan)

    # --- state ------------------------------------------------------------------------

    def set_update_state(self, state: str) -> None:
        """Make ``state`` (one of :data:`UPDATE_STATES`) the current one.

        Raises:
            ValueError: ``state`` is not one of :data:`UPDATE_STATES`.
        """
        if state not in UPDATE_STATES:
            raise ValueError(f"unknown update state {state!r}")
        for name in UPDATE_STATES:
            self._update_state.labels(state=name).set(1 if name == state else 0)

    def set_slots(self, slots: Mapping[str, SlotView]) -> None:
        """Show exactly ``slots`` (slot name → view); series of slots or labels no longer
        present disappear, so a status change never leaves two ``slot_info`` series behind."""
        with self._lock:
            self._slot_info.clear()
            self._attempts_left.clear()
            for slot, view in sorted(slots.items()):
                self._slot_info.labels(
                    slot=slot,
                    status=view.status,
                    version=view.version or "",
                    booted=_flag(view.booted),
                    primary=_flag(view.primary),
                ).set(1)
                if view.attempts_left is not None:
                    self._attempts_left.labels(slot=slot).set(view.attempts_left)

    def set_info(self, *, version: str, backend: str, compatible: str | None) -> None:
        """Describe this updater: its own version, the boot backend, the compatible string
        (empty when the configuration names none)."""
        self._info.info({"version": version, "backend": backend, "compatible": compatible or ""})

    # --- installs ---------------------------------------------------------------------

    def observe_install(self, written_bytes: int, seconds: float) -> None:
        """Record a finished install that wrote ``written_bytes`` in ``seconds``.

        Raises:
            ValueError: a negative byte count or duration.
        """
        if written_bytes < 0 or seconds < 0:
            raise ValueError("install bytes and duration must not be negative")
        self._install_bytes.inc(written_bytes)
        self._install_duration.set(seconds)
        self._install_durations.observe(seconds)
        self._install_throughput.set(written_bytes / seconds if seconds > 0 else math.nan)

    # --- health -----------------------------------------------------------------------

    def record_health_check_failures(self, checks: Iterable[str]) -> None:
        """Count one failure for each check name in ``checks``."""
        for check in checks:
            self._health_failures.labels(check=check).inc()

    def observe_health_report(self, report: HealthReport) -> None:
        """Count the failed checks of ``report``."""
        self.record_health_check_failures(result.name for result in report.failures)

    def set_last_boot_check(self, timestamp_s: float) -> None:
        """The wall-clock time (seconds since the epoch) the last boot check finished."""
        self._last_boot_check.set(timestamp_s)

    # --- device -----------------------------------------------------------------------

    def set_temperature(self, celsius: float | None) -> None:
        """The hottest thermal zone; ``None`` (no readable sensor) shows as NaN, which no
        threshold alert fires on."""
        self._temperature.set(math.nan if celsius is None else celsius)

    def set_free_space(self, path: Path | str, available_bytes: int) -> None:
        """Space available to unprivileged users on the filesystem holding ``path``."""
        self._free_space.labels(path=str(path)).set(available_bytes)

    def set_throttled(self, value: int | None) -> None:
        """The firmware's ``get_throttled`` value, and whether it flags under-voltage now
        (bit 0); ``None`` (not a Pi, an unreadable answer) shows both as NaN."""
        self._throttled.set(math.nan if value is None else value)
        under_voltage = under_voltage_now(value)
        self._under_voltage.set(math.nan if under_voltage is None else int(under_voltage))

    def set_disk_size(self, path: Path | str, size_bytes: int) -> None:
        """Size of the filesystem holding ``path`` (labelled as in :meth:`set_free_space`)."""
        self._disk_size.labels(path=str(path)).set(size_bytes)

    def set_host(self, sample: HostSample) -> None:
        """CPU use, memory and network traffic from ``sample``: an unknown figure shows as
        NaN, unknown network traffic as no series."""
        ratio = sample.cpu_usage_ratio
        self._cpu_usage.set(math.nan if ratio is None else ratio)
        memory = sample.memory
        self._memory_total.set(math.nan if memory is None else memory.total)
        available = None if memory is None else memory.available
        self._memory_available.set(math.nan if available is None else available)
        self._network.set(sample.network or {})

    def set_crash_loop_restarts(self, restarts: int) -> None:
        """Daemon restarts counted in the crash-loop window."""
        self._crash_loop_restarts.set(restarts)

    def set_server_unreachable(self, seconds: float) -> None:
        """Seconds since the daemon last reached the release server (0: it answers now)."""
        self._server_unreachable.set(max(0.0, seconds))

    def set_config(self, *, problems: int, drift: bool) -> None:
        """How the configuration was loaded: ``problems`` met on the way (a fallback runs),
        and whether the file now differs from the configuration in use."""
        self._config_problems.set(problems)
        self._config_drift.set(1 if drift else 0)

    def set_boot_state_problem(self, problem: bool) -> None:
        """Whether the boot state reads damaged or missing now."""
        self._boot_state_problem.set(1 if problem else 0)

    # --- publishing -------------------------------------------------------------------

    def exposition(self) -> bytes:
        """Every series of the registry in the Prometheus text format."""
        return generate_latest(self._registry)

    def write_textfile(self, path: Path) -> None:
        """Write :meth:`exposition` to ``path`` for node_exporter's textfile collector.

        Written through :func:`fleet_core.durable.atomic_write`: the collector (and a power
        cut) sees the old file or the new one, never half of one. The temporary file is a dot
        file not ending in ``.prom``, which the collector ignores.

        Raises:
            OSError: the directory does not exist or cannot be written.
        """
        atomic_write(path, self.exposition())

    def serve(self, port: int, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread; port 0 picks a free port.

        Loopback by default: a device exposes its metrics to the network only when the
        configuration says so.

        Raises:
            OSError: the address cannot be bound.
        """
        server, thread = start_http_server(port, addr=addr, registry=self._registry)
        return MetricsServer(server, thread)


def scrape_address(
    listen: str, port: int, hostname: str, advertise: str | None = None
) -> str | None:
    """Where a scraper reaches metrics served on ``listen:port``, as ``host:port``; ``None``
    when no other machine can (a loopback or link-local address, the default ``127.0.0.1``
    included: the node_exporter textfile is then the way out).

    ``advertise`` wins when configured (a name or address the scraper can resolve, such as a
    NAT mapping, or a loopback address in a lab on one machine). Otherwise the listening
    address, unless it means "every interface", in which case the device's host name stands
    for it. IPv6 addresses are bracketed.
    """
    if advertise:
        return advertise
    if listen not in WILDCARDS:
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(listen)
            if address.is_loopback or address.is_link_local:
                return None
    host = hostname if listen in WILDCARDS else listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
