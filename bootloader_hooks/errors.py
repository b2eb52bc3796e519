"""Errors of boot selection."""

from fleet_core.errors import FleetError


class BootloaderError(FleetError):
    """Boot selection state could not be read or changed. Messages start with the backend name."""


class BootStateCorruptError(BootloaderError):
    """The on-disk boot state (grubenv, U-Boot environment, autoboot.txt) is damaged."""


class BootStateMissingError(BootStateCorruptError):
    """The boot state is missing (no ``grubenv``, a U-Boot environment without our variables):
    reads never make one up; an explicit repair rebuilds it from what the updater knows."""


class UnknownSlotError(BootloaderError):
    """A slot name that this backend does not know."""


class UnknownBackendError(BootloaderError):
    """No backend of that name is registered."""
