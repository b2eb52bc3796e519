"""Errors of the release server and of the operator commands that talk to it.

Two families, both :class:`~fleet_core.errors.FleetError`:

- :class:`ApiError` and its subclasses are answers: each names what went wrong with a request
  and carries the HTTP status and the machine-readable ``error`` code of the
  ``{"error": ..., "detail": ...}`` body (docs/device-protocol.md). Only problems of the server
  itself (its keyring, its database, its stored files) map to a 5xx; nothing a client sends does.
- The others are failures of the server's own setup or of the ``fleet`` commands (no server
  URL, server unreachable, a request refused, a broken audit chain): one line, exit status 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from fleet_core.errors import FleetError


class ServerError(FleetError):
    """Base of every error raised by ``server``."""


# --- answers to requests ----------------------------------------------------------------------


class ApiError(ServerError):
    """A request the server answers with ``status`` and ``{"error": code, "detail": ...}``."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, detail: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})


class InvalidRequestError(ApiError):
    """The body is not JSON, has unknown fields, or a field of the wrong type or range."""

    status = 422
    code = "invalid_request"


class BodyTooLargeError(ApiError):
    """The request body is larger than the endpoint accepts."""

    status = 413
    code = "body_too_large"


class UnauthenticatedError(ApiError):
    """No bearer token, or one the server does not know (or that expired)."""

    status = 401
    code = "unauthenticated"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class ChallengeInvalidError(ApiError):
    """A session was asked for with a challenge that is unknown, used up or expired."""

    status = 401
    code = "challenge_invalid"


class SignatureInvalidError(ApiError):
    """A device's signature over a challenge does not verify with its enrolled key."""

    status = 401
    code = "signature_invalid"


class ForbiddenError(ApiError):
    """Authenticated, but not allowed: a role too low, or another device's data."""

    status = 403
    code = "forbidden"


class NotAuthorizedError(ApiError):
    """An enrollment without a valid token or pre-authorization, or without a valid proof."""

    status = 403
    code = "not_authorized"


class UnknownDeviceError(ApiError):
    """No device with that id is enrolled."""

    status = 404
    code = "unknown_device"


class UnknownReleaseError(ApiError):
    """No release with that version was uploaded."""

    status = 404
    code = "unknown_release"


class UnknownBlobError(ApiError):
    """No blob with that SHA-256 is stored."""

    status = 404
    code = "unknown_blob"


class DuplicateVersionError(ApiError):
    """A release with that version exists already; versions are never reused."""

    status = 409
    code = "duplicate_version"


class IncompatibleReleaseError(ApiError):
    """The release's ``compatible`` differs from the device's."""

    status = 409
    code = "incompatible_release"


class BundleMalformedError(ApiError):
    """The uploaded bytes are not a well-formed bundle, or an image differs from the manifest."""

    status = 422
    code = "bundle_malformed"


class BundleSignatureError(ApiError):
    """The bundle's manifest signatures do not satisfy the fleet's release keyring."""

    status = 422
    code = "bundle_signature_invalid"


class RangeNotSatisfiableError(ApiError):
    """A ``Range`` that starts at or beyond the end of the blob."""

    status = 416
    code = "range_not_satisfiable"


class UnknownRolloutError(ApiError):
    """No rollout with that id."""

    status = 404
    code = "unknown_rollout"


class RolloutConflictError(ApiError):
    """The transition is not allowed now (another rollout is active, the emergency stop is
    on, or the rollout is in a state the transition does not start from)."""

    status = 409
    code = "rollout_conflict"


class InvalidRolloutError(ApiError):
    """The rollout's plan is inconsistent (stages, canaries, selection, rates)."""

    status = 422
    code = "invalid_rollout"


class KeyringUnusableError(ApiError):
    """The server's release keyring is missing or holds no usable key: a setup problem."""

    status = 503
    code = "keyring_unusable"


class StorageFullError(ApiError):
    """The server's disk is full: an upload cannot be received or its blobs stored."""

    status = 507
    code = "insufficient_storage"


class DatabaseUnavailableError(ApiError):
    """The database cannot be reached."""

    status = 503
    code = "database_unavailable"


class StorageDamagedError(ApiError):
    """A file of the server's own store (a blob, a stored chunk, a recipe, a chunk index) is
    missing, unreadable or does not hold what its name says: the server's disk, never the
    client's request. Its detail names the store file."""

    status = 500
    code = "storage_damaged"


# --- setup and operator commands --------------------------------------------------------------


class SettingsError(ServerError):
    """A server setting is invalid: the data directory, the database URL, a size limit."""


class ServerKeyError(ServerError):
    """The server's signing key cannot be created or loaded."""


class MigrationError(ServerError):
    """The database schema could not be brought up to date."""


# The credential lifecycle: withdrawn tokens and devices (server/auth.py, server/enrollment.py,
# server/devices.py).


class UnknownTokenError(ApiError):
    """No operator or enrollment token with that id."""

    status = 404
    code = "unknown_token"


class TokenConflictError(ApiError):
    """The token was revoked already, or revoking it would leave no unexpired admin token."""

    status = 409
    code = "token_conflict"


class DeviceDecommissionedError(ApiError):
    """The device was decommissioned: its key opens no session, checks in and enrolls no more
    until an operator reinstates it."""

    status = 403
    code = "device_decommissioned"


class DeviceStatusConflictError(ApiError):
    """The device is not in a status the change starts from (releasing a device that is not
    quarantined, reinstating one that is not decommissioned, quarantining a decommissioned one)."""

    status = 409
    code = "device_status_conflict"


class HostnameTakenError(ApiError):
    """Another device has that hostname already: a rename would make references ambiguous."""

    status = 409
    code = "hostname_taken"


class ClientConfigError(ServerError):
    """A ``fleet`` command lacks the server URL or token, or its config file is malformed."""


class ServerUnreachableError(ServerError):
    """The server did not answer (connection refused, timeout, reset)."""


class RequestRejectedError(ServerError):
    """The server answered a ``fleet`` command's request with an error."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class AuditChainBrokenError(ServerError):
    """The audit trail's hash chain does not hold: a row was changed or removed."""
