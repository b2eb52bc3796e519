"""Errors of the device updater, named after what went wrong."""

from fleet_core.errors import FleetError


class UpdaterError(FleetError):
    """Base of every error raised by ``updater``."""


class ConfigError(UpdaterError):
    """The configuration file is missing, unreadable or invalid."""


class StateError(UpdaterError):
    """The state store cannot be read or written."""


class LockedError(UpdaterError):
    """Another update holds the update lock."""


class PreconditionError(UpdaterError):
    """An install was refused before writing anything: wrong device, downgrade, too hot, too
    little space, no keyring, crash loop."""


class SlotStateError(PreconditionError):
    """A slot change the lifecycle refuses: it would write the running slot, arm or commit a
    bad slot or one below the anti-rollback floor, or leave no root slot to boot."""


class SlotError(UpdaterError):
    """A slot cannot be resolved, is too small, or is the booted one."""


class DownloadError(UpdaterError):
    """A bundle could not be fetched, after every retry."""


class InstallError(UpdaterError):
    """Writing or verifying an image failed; the target slot is marked bad."""


class InstallAbandonedError(InstallError):
    """The install was given up on purpose while writing (the server withdrew the release):
    the half-written slot is marked bad, the running slot stays; not the release's fault."""


class DaemonError(UpdaterError):
    """The daemon cannot start: no server URL, or its files cannot be written."""
