"""The updater assembled from its configuration: backend, state store, log, metrics, sensors.

Commands and the lab's virtual device build one :class:`Runtime` and call its parts; nothing
below reaches for a global.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootloader_hooks.base import BootSelector, create_backend
from bootloader_hooks.errors import BootloaderError
from updater.bootcheck import BootChecker
from updater.config import LoadedConfig, UpdaterConfig
from updater.device import boot_id, free_space_mb, read_temperature_c, uptime_s
from updater.health import HealthReport, run_health_checks
from updater.install import EventSink, Installer, Sensors
from updater.state import StateStore

# Where each firmware leaves a trace that tells it apart, for ``backend = "auto"``.
AUTO_DETECT: tuple[tuple[str, Path], ...] = (
    ("tryboot", Path("/proc/device-tree/chosen/bootloader/tryboot")),
    ("grub", Path("/boot/efi/EFI/fleet/grubenv")),
    ("uboot", Path("/etc/fw_env.config")),
)


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
    _backend: BootSelector | None = field(default=None, init=False)

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

    def sensors(self) -> Sensors:
        return Sensors(
            temperature_c=lambda: read_temperature_c(self.config.thermal_dir),
            free_space_mb=lambda: free_space_mb(self.config.data_dir),
        )

    def run_health_checks(self) -> HealthReport:
        if self.health is not None:
            return self.health()
        health = self.config.health
        return run_health_checks(health.checks, health.deadline_s)

    def installer(self, **options: Any) -> Installer:
        return Installer(
            self.config, self.backend, self.store, self.log, self.sensors(),
            reboot=self.reboot, **options,
        )  # fmt: skip

    def boot_checker(self) -> BootChecker:
        return BootChecker(
            self.backend, self.store, self.log, self.run_health_checks,
            reboot=self.reboot, reboot_command=self.config.reboot_command,
        )  # fmt: skip

    def record_start(self) -> None:
        """Count this start for the crash-loop guard (see ``DeviceState.with_start``)."""
        state = self.store.load().state
        updated = state.with_start(boot_id(self.proc), uptime_s(self.proc))
        if updated.suspended and not state.suspended:
            self.log.event("updater.crash_loop", level="error", detail=updated.suspended)
        self.store.save(updated)
