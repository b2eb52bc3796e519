"""Errors of boot selection."""

from fleet_core.errors import FleetError


class BootloaderError(FleetError):
    """Boot selection state could not be read or changed. Messages start with the backend name."""


class BootStateCorruptError(BootloaderError):
    """The on-disk boot state (grubenv, U-Boot environment, autoboot.txt) is damaged."""


class UnknownSlotError(BootloaderError):
    """A slot name that this backend does not know."""


class UnknownBackendError(BootloaderError):
    """No backend of that name is registered."""
