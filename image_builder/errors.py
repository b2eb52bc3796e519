"""Errors of image building and of the release bundle format."""

from fleet_core.errors import FleetError


class ImageBuildError(FleetError):
    """A filesystem or disk image could not be built (bad input, tool missing or failing)."""


class DiskImportError(FleetError):
    """An existing disk image could not be split into slot images."""


class BundleError(FleetError):
    """A bundle could not be written or read."""


class BundleFormatError(BundleError):
    """The bytes are not a well-formed bundle: truncated, padded, reordered or malformed."""


class ManifestError(BundleFormatError):
    """The manifest is not valid: not UTF-8, not JSON, a field missing or out of range."""


class ImageIntegrityError(BundleError):
    """An image's bytes do not match the size or SHA-256 the signed manifest declares."""


class BundleCompatibilityError(BundleError):
    """The bundle is authentic but not meant for this device (compatible, security version)."""
