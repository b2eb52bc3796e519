"""The answers of the credential lifecycle: withdrawn tokens and devices (see ``server/auth.py``,
``server/enrollment.py`` and ``server/devices.py``). They are :class:`ApiError` answers like those
of ``server/errors.py``."""

from __future__ import annotations

from server.errors import ApiError


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
