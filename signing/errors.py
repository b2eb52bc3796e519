"""Errors of keys, signatures and keyrings, each named after what went wrong."""

from fleet_core.errors import FleetError


class SigningError(FleetError):
    """Base of every error raised by ``signing``."""


class KeyFileError(SigningError):
    """A key file is missing, unreadable, of the wrong kind, or its passphrase is wrong."""


class KeyringError(SigningError):
    """A keyring directory is missing or malformed (bad key file, revocation list, threshold)."""


class SignatureFormatError(SigningError):
    """A signature envelope is not well-formed (not canonical JSON, bad hex, duplicate key)."""


class VerificationError(SigningError):
    """The signed bytes cannot be trusted. Subclasses say why."""


class BadSignatureError(VerificationError):
    """A signature by a trusted key does not match the bytes: they or it were altered."""


class UnknownKeyError(VerificationError):
    """No signature is by a key the keyring trusts."""


class RevokedKeyError(VerificationError):
    """The only signatures that would count are by revoked keys."""


class ThresholdError(VerificationError):
    """Fewer valid signatures by distinct trusted keys than the keyring's threshold."""
