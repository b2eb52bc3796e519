"""The updater assembled from its configuration: backend, state store, log, metrics, sensors.

Commands and the lab's virtual device build one :class:`Runtime` and call its parts; nothing
below reaches for a global.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bootloader_hooks.base import ROOT_SLOTS, SAFE_SLOT, BootSelector, StateFiles, create_backend
from bootloader_hooks.errors import BootloaderError
from fleet_core.durable import sweep_temporaries
from fleet_core.errors import FleetError
from updater.bootcheck import BootChecker
from updater.config import LoadedConfig, UpdaterConfig
from updater.config_guard import file_sha256
from updater.device import (
    boot_id,
    free_space_mb,
    read_temperature_c,
    throttled_state,
    uptime_s,
)
from updater.health import HealthReport, run_health_checks
from updater.hostmetrics import HostSampler, filesystem_size_bytes
from updater.install import Installer, InstallResult, Sensors
from updater.lifecycle import SlotLifecycle
from updater.log import EventSink
from updater.state import StateStore

# Where each firmware leaves a trace that tells it apart, for ``backend = "auto"``.
AUTO_DETECT: tuple[tuple[str, Path], ...] = (
    ("tryboot", Path("/proc/device-tree/chosen/bootloader/tryboot")),
    ("grub", Path("/boot/efi/EFI/fleet/grubenv")),
    ("uboot", Path("/etc/fw_env.config")),
)


def _version() -> str:
    try:
        return importlib.metadata.version("metrica-fleet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def update_state(snapshot: Mapping[str, Any]) -> str:
    """``idle``, ``installing``, ``trial``, ``installed`` or ``suspended``, from a
    :meth:`Runtime.snapshot`: the metrics' update state and the heartbeat's ``updater_state``."""
    statuses = {info["status"] for info in snapshot["slots"].values()}
    if snapshot["suspended"]:
        return "suspended"
    if "installing" in statuses:
        return "installing"
    if snapshot["trial"]:
        return "trial"
    if statuses & {"installed", "trial"}:
        return "installed"
    return "idle"


def detect_backend(probes: Sequence[tuple[str, Path]] = AUTO_DETECT) -> str:
    """The backend whose firmware left its trace on this machine.

    Raises:
        BootloaderError: none did.
    """
    for name, path in probes:
        if path.exists():
            return name
    raise BootloaderError(
        "cannot tell the boot firmware (no tryboot device tree, grubenv or fw_env.config): "
        "set [bootloader] backend"
    )


def reporting_log(log: EventSink, config: UpdaterConfig) -> EventSink:
    """``log``, teed into the outbox the daemon sends to the release server when one is
    configured: a boot check's verdict, a rollback, a hand-made install reach the fleet's audit
    trail even though they run in processes of their own."""
    if not config.server_urls:
        return log
    from updater.outbox import OUTBOX_NAME, Outbox, OutboxLog

    if isinstance(log, OutboxLog):
        return log
    return OutboxLog(log, Outbox(config.data_dir / OUTBOX_NAME))


def build_backend(config: UpdaterConfig) -> BootSelector:
    """The configured boot backend, its options being the rest of ``[bootloader]``."""
    options = dict(config.bootloader)
    name = str(options.pop("backend", "auto"))
    if name == "auto":
        name = detect_backend()
    return create_backend(name, options)


@dataclass
class Runtime:
    """One updater, wired from a configuration."""

    loaded: LoadedConfig
    log: EventSink
    backend_factory: Callable[[UpdaterConfig], BootSelector] = build_backend
    reboot: Callable[[Sequence[str]], None] | None = None
    proc: Path = Path("/proc")
    health: Callable[[], HealthReport] | None = None
    # metrics served over HTTP by a long-running process (``[metrics] port``, the daemon);
    # an ``updater.metrics.UpdaterMetrics``, typed loosely to keep prometheus_client lazy
    live_metrics: Any = None
    # SHA-256 of the configuration file as loaded (None: defaults, or unreadable), so the
    # metrics can tell when the file has changed under a running updater (config drift)
    config_sha256: str | None = None
    # the host figures (CPU, memory, network) read for the metrics, always from the machine's
    # own /proc (``proc`` may be a lab's fake boot view); it keeps the previous CPU reading, so
    # one sampler lives as long as the process (dataclasses.replace keeps it)
    host: HostSampler | None = None
    _backend: BootSelector | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.config_sha256 is None:  # dataclasses.replace keeps the one taken at load
            text = self.loaded.text
            self.config_sha256 = (
                hashlib.sha256(text).hexdigest() if text is not None
                else file_sha256(self.loaded.source)
            )  # fmt: skip
        if self.host is None:
            self.host = HostSampler()

    @property
    def config(self) -> UpdaterConfig:
        return self.loaded.config

    @property
    def backend(self) -> BootSelector:
        if self._backend is None:
            self._backend = self.backend_factory(self.config)
        return self._backend

    @property
    def store(self) -> StateStore:
        return StateStore(self.config.data_dir)

    @property
    def lifecycle(self) -> SlotLifecycle:
        """The only way a slot's status, the boot selection or the floor change."""
        return SlotLifecycle(self.backend, self.store, self.log)

    def sensors(self) -> Sensors:
        return Sensors(
            temperature_c=lambda: read_temperature_c(self.config.thermal_dir),
            free_space_mb=lambda: free_space_mb(self.config.data_dir),
            throttled=self.throttled,
        )

    def throttled(self) -> int | None:
        """The firmware's ``get_throttled`` value now (``[paths] throttled_path``, else
        ``vcgencmd``); None: unknown (see ``updater.device.throttled_state``)."""
        return throttled_state(self.config.throttled_path)

    def run_health_checks(self) -> HealthReport:
        if self.health is not None:
            return self.health()
        health = self.config.health
        return run_health_checks(health.checks, health.deadline_s)

    def installer(self, **options: Any) -> Installer:
        return Installer(
            self.config, lambda: self.backend, self.store, self.log, self.sensors(),
            reboot=self.reboot, **options,
        )  # fmt: skip

    def boot_checker(self) -> BootChecker:
        return BootChecker(
            self.backend, self.store, self.log, self.run_health_checks,
            reboot=self.reboot, reboot_command=self.config.reboot_command,
        )  # fmt: skip

    def snapshot(self) -> dict[str, Any]:
        """What ``fleet-updater status --json`` prints: configuration, boot and slot state.

        Never raises for damaged state: a bootloader or state problem is reported in the
        document (``bootloader_problem``, ``state_problem``) instead. Writes nothing.
        """
        loaded = self.store.load(keep_evidence=False)
        state = loaded.state
        document: dict[str, Any] = {
            "config": {"source": self.loaded.source, "problems": list(self.loaded.problems)},
            "state_problem": loaded.problem,
            "installed_security_version": state.installed_security_version,
            "suspended": state.suspended,
            "recent_starts": len(state.restarts),
            "save_count": state.save_count,
            "backend": None,
            "bootloader_problem": None,
        }
        booted = primary = None
        trial = False
        attempts: dict[str, int | None] = dict.fromkeys(ROOT_SLOTS)
        try:
            backend = self.backend
            document["backend"] = backend.name
            booted = backend.booted()  # the kernel's word: known even when the boot state is not
            primary = backend.primary()
            trial = booted != SAFE_SLOT and backend.is_trial()
            attempts = {slot: backend.attempts_left(slot) for slot in ROOT_SLOTS}
        except FleetError as err:
            document["bootloader_problem"] = str(err)
        document.update({"booted": booted, "primary": primary, "trial": trial})
        document["slots"] = {
            slot: {
                **asdict(state.slot(slot)),
                "attempts_left": attempts[slot],
                "booted": slot == booted,
                "primary": slot == primary,
            }
            for slot in ROOT_SLOTS
        }
        return document

    def publish_metrics(self, *, event: str | None = None, install: InstallResult | None = None,
                        failed_checks: Sequence[str] = (),
                        document: Mapping[str, Any] | None = None,
                        server_unreachable_s: float | None = None) -> None:  # fmt: skip
        """Refresh the metrics: the textfile, if one is configured (atomically: node_exporter
        never sees half a file), and the served ones (``live_metrics``). ``event`` is
        ``failed``, ``committed`` or None (derived); ``document`` a :meth:`snapshot` the caller
        already took (not read again); ``server_unreachable_s`` what the daemon knows of the
        server (0: it answers; None: not known here, left as it was)."""
        path = self.config.metrics_textfile
        if path is None and self.live_metrics is None:
            return
        from prometheus_client import CollectorRegistry

        from updater.metrics import SlotView, UpdaterMetrics

        document = document or self.snapshot()
        metrics = self.live_metrics or UpdaterMetrics(CollectorRegistry())
        metrics.set_info(
            version=_version(), backend=str(document["backend"]), compatible=self.config.compatible
        )
        metrics.set_update_state(event or update_state(document))
        metrics.set_slots({
            slot: SlotView(info["status"], info["version"], info["booted"], info["primary"],
                           info["attempts_left"])
            for slot, info in document["slots"].items()
        })  # fmt: skip
        metrics.set_temperature(read_temperature_c(self.config.thermal_dir))
        metrics.set_throttled(self.throttled())
        with contextlib.suppress(OSError):
            metrics.set_free_space(self.config.data_dir, free_space_mb(self.config.data_dir) << 20)
            metrics.set_disk_size(self.config.data_dir, filesystem_size_bytes(self.config.data_dir))
        if self.host is not None:
            metrics.set_host(self.host.sample(self._host_unreadable))
        metrics.set_crash_loop_restarts(document["recent_starts"])
        metrics.set_boot_state_problem(document["bootloader_problem"] is not None)
        metrics.set_config(
            problems=len(self.loaded.problems),
            drift=file_sha256(self.loaded.source) != self.config_sha256,
        )
        if server_unreachable_s is not None:
            metrics.set_server_unreachable(server_unreachable_s)
        if install is not None:
            metrics.observe_install(install.bytes_written, install.seconds)
        if failed_checks:
            metrics.record_health_check_failures(failed_checks)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            metrics.write_textfile(path)
        except OSError as err:
            self.log.event("metrics.write_failed", level="warning", path=str(path), error=str(err))

    def _host_unreadable(self, source: str, problem: str) -> None:
        self.log.event("metrics.host_unreadable", level="warning", source=source, error=problem)

    def scrape_address(self, hostname: str) -> str | None:
        """Where Prometheus reaches the metrics the daemon serves (``host:port``, see
        ``updater.metrics.scrape_address``); None when no ``[metrics] port`` is configured."""
        config = self.config
        if config.metrics_port is None:
            return None
        from updater.metrics import scrape_address

        return scrape_address(
            config.metrics_listen, config.metrics_port, hostname, config.metrics_advertise
        )

    def sweep_temporaries(self) -> None:
        """Remove what atomic writes cut short by a power cut left behind: any temporary in the
        data directory and its identity directory (ours alone), and beside the boot backend's
        and the metrics' files only their own. Run at start-up under the update lock; reports
        what it removed (and what it could not) as events."""
        from updater.identity import identity_dir

        places: dict[Path, set[str] | None] = {
            self.config.data_dir: None,
            identity_dir(self.config.data_dir): None,
        }
        files: list[Path] = []
        with contextlib.suppress(FleetError):  # a backend that cannot be built has no files
            if isinstance(self.backend, StateFiles):
                files += self.backend.state_files()
        if self.config.metrics_textfile is not None:
            files.append(self.config.metrics_textfile)
        if self.loaded.path is not None:  # a config repair cut short (updater.config_guard)
            files.append(Path(os.path.realpath(self.loaded.path)))
        for file in files:
            names = places.setdefault(file.parent, set())
            if names is not None:
                names.add(file.name)
        for directory, names in places.items():
            removed, problems = sweep_temporaries(directory, names)
            if removed:
                self.log.event(
                    "sweep.removed", level="warning", directory=str(directory),
                    files=[path.name for path in removed],
                )  # fmt: skip
            for problem in problems:
                self.log.event("sweep.failed", level="warning", problem=problem)

    def record_start(self) -> None:
        """Count this start for the crash-loop guard (see ``DeviceState.with_start``)."""
        state = self.store.load().state
        updated = state.with_start(boot_id(self.proc), uptime_s(self.proc))
        if updated.suspended and not state.suspended:
            self.log.event("updater.crash_loop", level="error", detail=updated.suspended)
        self.store.save(updated)
