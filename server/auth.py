"""Who is calling: operator tokens with roles, device session tokens, and the secrets behind them.

Every secret the server hands out (operator token, enrollment token, device session token) is a
random string shown once; the database keeps only its SHA-256, and looks a presented token up by
that hash. A prefix says what kind of token a string is, for people and secret scanners; it
grants nothing.

Roles are ordered: ``viewer`` reads; ``operator`` also uploads releases, assigns them, creates
enrollment tokens and pre-authorizes device keys; ``admin`` also creates operator tokens.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from server import audit
from server.database import Database
from server.errors import ForbiddenError, UnauthenticatedError
from server.models import DeviceSession, OperatorToken

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


def authenticate_operator(session: Session, token: str) -> Operator:
    """The operator whose token this is.

    Raises:
        UnauthenticatedError: no operator token with this value.
    """
    row = session.scalars(
        select(OperatorToken).where(OperatorToken.token_sha256 == secret_hash(token))
    ).first()
    if row is None:
        raise UnauthenticatedError("unknown operator token")
    return Operator(row.name, Role.parse(row.role))


def create_operator_token(
    db: Database, *, name: str, role: Role, created_by: str, now: datetime
) -> str:
    """Store a new operator token and return it; it cannot be shown again."""
    token = new_secret(OPERATOR_TOKEN_PREFIX)
    with db.write() as session:
        session.add(
            OperatorToken(
                token_sha256=secret_hash(token),
                name=name,
                role=role.label,
                created=now,
                created_by=created_by,
            )
        )
        audit.append(
            db,
            session,
            at=now,
            actor=created_by,
            action="operator_token.created",
            subject=name,
            details={"role": role.label},
        )
    return token


def authenticate_device(session: Session, token: str, device_id: str, now: datetime) -> None:
    """Check that ``token`` is a live session of device ``device_id``.

    Raises:
        UnauthenticatedError: unknown or expired session token (get a new session).
        ForbiddenError: the session belongs to another device.
    """
    row = session.get(DeviceSession, secret_hash(token))
    if row is None or row.expires <= now:
        raise UnauthenticatedError("unknown or expired session token: get a new session")
    if row.device_id != device_id:
        raise ForbiddenError("this session token belongs to another device")
