"""Errors of the safe-mode slot."""

from fleet_core.errors import FleetError


class SafeModeBuildError(FleetError):
    """The safe-mode slot could not be built, or would not be able to recover a device."""
