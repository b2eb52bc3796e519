"""Who is calling: operator tokens with roles, device session tokens, and the secrets behind them.

Every secret the server hands out (operator token, enrollment token, device session token) is a
random string shown once; the database keeps only its SHA-256, and looks a presented token up by
that hash. A prefix says what kind of token a string is, for people and secret scanners; it
grants nothing.

Roles are ordered: ``viewer`` reads; ``operator`` also uploads releases, assigns them, creates
enrollment tokens and pre-authorizes device keys; ``admin`` also creates, lists and revokes
operator tokens.

An operator token is valid until its ``expires`` (judged by the server's clock, the expiry
itself excluded) unless it was revoked; tokens from before expiries existed have none. Revoking
takes effect on the token's next request. The last unexpired admin token cannot be revoked, so
the API always keeps a way in for an admin; ``fleet server token create --data-dir`` on the
server's host is the way in when every admin token has expired.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from server import audit
from server.database import AUDIT_CHAIN_LOCK, Database
from server.errors import (
    DeviceDecommissionedError,
    ForbiddenError,
    InvalidRequestError,
    TokenConflictError,
    UnauthenticatedError,
    UnknownTokenError,
)
from server.models import Device, DeviceSession, DeviceStatus, OperatorToken
from server.settings import iso

OPERATOR_TOKEN_PREFIX = "fleet_op_"  # noqa: S105 (a prefix, not a secret)
ENROLLMENT_TOKEN_PREFIX = "fleet_enroll_"  # noqa: S105
SESSION_TOKEN_PREFIX = "fleet_session_"  # noqa: S105
MAX_TOKEN_LENGTH = 256


class Role(enum.IntEnum):
    """Operator roles; a higher role may do everything a lower one may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, label: str) -> Role:
        """The role named ``label`` (``viewer``, ``operator``, ``admin``).

        Raises:
            ValueError: no such role.
        """
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"unknown role {label!r} (viewer, operator, admin)") from None


def new_secret(prefix: str) -> str:
    """A fresh random token: ``prefix`` and 256 bits, URL-safe."""
    return prefix + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    """What the database stores for a secret: its SHA-256, hex."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header.

    Raises:
        UnauthenticatedError: no header, another scheme, or an implausible token.
    """
    if not authorization:
        raise UnauthenticatedError("no Authorization header (expected 'Bearer <token>')")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise UnauthenticatedError("Authorization header is not 'Bearer <token>'")
    if len(token) > MAX_TOKEN_LENGTH or not token.isascii() or not token.isprintable():
        raise UnauthenticatedError("malformed bearer token")
    return token


@dataclass(frozen=True)
class Operator:
    """An authenticated operator: the token's name and role."""

    name: str
    role: Role

    @property
    def actor(self) -> str:
        """How the audit trail names this operator."""
        return f"operator:{self.name}"

    def require(self, role: Role) -> None:
        """Raises ForbiddenError unless this operator's role is at least ``role``."""
        if self.role < role:
            raise ForbiddenError(
                f"operator {self.name!r} has role {self.role.label}; this needs {role.label}"
            )


def live_operator_token(now: datetime) -> Any:
    """The SQL condition of an operator token that is valid at ``now`` (not revoked, not
    expired): the one rule for API requests and console sessions alike."""
    return OperatorToken.revoked.is_(None) & or_(
        OperatorToken.expires.is_(None), OperatorToken.expires > now
    )


def live_operator_token_row(session: Session, token: str, now: datetime) -> OperatorToken:
    """The stored operator token whose secret this is, if it is valid at ``now``.

    Raises:
        UnauthenticatedError: no operator token with this value, or it expired or was revoked.
    """
    row = session.scalars(
        select(OperatorToken).where(
            OperatorToken.token_sha256 == secret_hash(token), live_operator_token(now)
        )
    ).first()
    if row is None:
        raise UnauthenticatedError("unknown, expired or revoked operator token")
    return row


def authenticate_operator(session: Session, token: str, now: datetime) -> Operator:
    """The operator whose token this is, if it is valid at ``now``.

    Raises:
        UnauthenticatedError: no operator token with this value, or it expired or was revoked.
    """
    row = live_operator_token_row(session, token, now)
    return Operator(row.name, Role.parse(row.role))


def operator_token_expiry(
    now: datetime, expires_in_s: int | None, *, default_s: int, max_s: int
) -> datetime:
    """When a token created at ``now`` expires: after ``expires_in_s`` seconds, or after the
    default lifetime when none is asked for.

    Raises:
        InvalidRequestError: a lifetime under one second or above the maximum.
    """
    seconds = default_s if expires_in_s is None else expires_in_s
    if not 1 <= seconds <= max_s:
        raise InvalidRequestError(
            f"expires_in: {seconds} seconds; operator tokens live 1 to {max_s} seconds"
        )
    return now + timedelta(seconds=seconds)


def create_operator_token(
    db: Database,
    *,
    name: str,
    role: Role,
    created_by: str,
    now: datetime,
    expires: datetime | None = None,
) -> str:
    """Store a new operator token valid until ``expires`` (None: never expires) and return
    it; it cannot be shown again."""
    token = new_secret(OPERATOR_TOKEN_PREFIX)
    with db.write() as session:
        row = OperatorToken(
            token_sha256=secret_hash(token),
            name=name,
            role=role.label,
            created=now,
            created_by=created_by,
            expires=expires,
        )
        session.add(row)
        session.flush()
        audit.append(
            db,
            session,
            at=now,
            actor=created_by,
            action="operator_token.created",
            subject=name,
            details={
                "id": row.id,
                "role": role.label,
                "expires": iso(expires) if expires is not None else None,
            },
        )
    return token


def _token_status(row: OperatorToken, now: datetime) -> str:
    if row.revoked is not None:
        return "revoked"
    if row.expires is not None and row.expires <= now:
        return "expired"
    return "valid"


def describe_operator_token(row: OperatorToken, now: datetime) -> dict[str, Any]:
    """An operator token as listed: everything but its secret."""
    return {
        "id": row.id,
        "name": row.name,
        "role": row.role,
        "created": iso(row.created),
        "created_by": row.created_by,
        "expires": iso(row.expires) if row.expires is not None else None,
        "revoked": iso(row.revoked) if row.revoked is not None else None,
        "status": _token_status(row, now),
    }


def list_operator_tokens(db: Database, now: datetime) -> list[dict[str, Any]]:
    """Every operator token ever created, oldest first, without secrets."""
    with db.read() as session:
        rows = session.scalars(select(OperatorToken).order_by(OperatorToken.id)).all()
        return [describe_operator_token(row, now) for row in rows]


def revoke_operator_token(
    db: Database, token_id: int, *, actor: str, now: datetime
) -> dict[str, Any]:
    """Revoke the operator token ``token_id`` at once; returns it as listed.

    Raises:
        UnknownTokenError: no such token.
        TokenConflictError: revoked already, or it is the last valid admin token.
    """
    with db.write() as session:
        # Serialized with every audited change: two admins revoking each other's tokens at
        # once cannot both see the other's token as the one that remains.
        db.lock(session, AUDIT_CHAIN_LOCK)
        row = session.get(OperatorToken, token_id)
        if row is None:
            raise UnknownTokenError(f"no operator token {token_id}")
        if row.revoked is not None:
            raise TokenConflictError(f"operator token {token_id} was revoked already")
        if row.role == Role.ADMIN.label and _token_status(row, now) == "valid":
            others = session.scalar(
                select(func.count())
                .select_from(OperatorToken)
                .where(
                    OperatorToken.role == Role.ADMIN.label,
                    OperatorToken.id != row.id,
                    live_operator_token(now),
                )
            )
            if not others:
                raise TokenConflictError(
                    f"operator token {token_id} is the last valid admin token: create another "
                    "admin token first"
                )
        row.revoked = now
        audit.append(
            db,
            session,
            at=now,
            actor=actor,
            action="operator_token.revoked",
            subject=f"operator-token:{row.id}",
            details={"name": row.name, "role": row.role},
        )
        session.flush()
        return describe_operator_token(row, now)


def authenticate_device(session: Session, token: str, device_id: str, now: datetime) -> None:
    """Check that ``token`` is a live session of device ``device_id``, and that the device
    was not decommissioned.

    Raises:
        DeviceDecommissionedError: the device was decommissioned (whatever the token).
        UnauthenticatedError: unknown or expired session token (get a new session).
        ForbiddenError: the session belongs to another device.
    """
    status = session.scalar(select(Device.status).where(Device.id == device_id))
    if status == DeviceStatus.DECOMMISSIONED:
        raise DeviceDecommissionedError(f"device {device_id} was decommissioned")
    row = session.get(DeviceSession, secret_hash(token))
    if row is None or row.expires <= now:
        raise UnauthenticatedError("unknown or expired session token: get a new session")
    if row.device_id != device_id:
        raise ForbiddenError("this session token belongs to another device")
