"""Admitting devices and opening their sessions (docs/device-protocol.md, "Identity", "Sessions").

A device proves it holds the private key of the public key it enrolls with, and is admitted by
an enrollment token (bounded uses, optional expiry) or because an operator pre-authorized its
key. Later it opens sessions by signing single-use server challenges. Every expiry is judged by
the server's clock only.

Operators list enrollment tokens (never their secrets) and revoke them; a revoked token admits
nobody. A decommissioned device (``server/devices.py``) gets no challenge, no session and no
enrollment, not even a repeated one, until an operator reinstates it: pre-authorizing its key
again does not. A session lives ``SESSION_TTL_S`` from its opening and nothing extends it (a
device opens a new one); a device holds at most the server's ``max_device_sessions`` live
sessions, and opening one more ends its oldest.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server import audit
from server.auth import (
    ENROLLMENT_TOKEN_PREFIX,
    SESSION_TOKEN_PREFIX,
    new_secret,
    secret_hash,
)
from server.contacts import record_contact
from server.database import Database
from server.errors import (
    ChallengeInvalidError,
    DeviceDecommissionedError,
    InvalidRequestError,
    NotAuthorizedError,
    SignatureInvalidError,
    TokenConflictError,
    UnknownDeviceError,
    UnknownTokenError,
)
from server.models import (
    Device,
    DeviceChallenge,
    DeviceSession,
    DeviceStatus,
    EnrollmentToken,
    PreauthorizedKey,
)
from server.schemas import EnrollRequest
from server.settings import CHALLENGE_TTL_S, DEFAULT_MAX_DEVICE_SESSIONS, SESSION_TTL_S, iso
from signing.keys import SigningKey, key_id
from signing.points import public_key_problem, signature_problem
from signing.signature import signed_message

log = logging.getLogger("server")
NAMESAKES_NAMED = 5  # devices of the same hostname an enrollment's audit entry names
ENROLL_PURPOSE = "device-enroll"


def enroll_payload(request: EnrollRequest) -> str:
    """What an enrollment proof signs: the key and every detail the server keeps from the
    request, so a replayed request cannot enroll the device under other details."""
    return f"enroll\n{request.public_key}\n{request.compatible}\n{request.hostname}"


SESSION_PURPOSE = "device-session"


def raw_public_key_hex(public_key: Ed25519PublicKey) -> str:
    """The protocol's spelling of a public key: its 32 raw bytes in lowercase hex."""
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def device_public_key(hex_key: str) -> Ed25519PublicKey:
    """The Ed25519 public key spelled as 64 hex digits.

    Raises:
        InvalidRequestError: not 32 bytes of hex.
    """
    try:
        raw = bytes.fromhex(hex_key)
        public_key = Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as err:
        raise InvalidRequestError(f"public_key: not an Ed25519 public key ({err})") from err
    problem = public_key_problem(raw)
    if problem is not None:
        raise InvalidRequestError(f"public_key: unusable Ed25519 public key: {problem}")
    return public_key


def _verify(public_key: Ed25519PublicKey, signature_hex: str, purpose: str, payload: str) -> bool:
    try:
        signature = bytes.fromhex(signature_hex)
        if signature_problem(signature) is not None:
            return False
        public_key.verify(signature, signed_message(purpose, payload.encode()))
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Enrollment:
    """The outcome of an enrollment: the device id, and whether it was new."""

    device_id: str
    new: bool


def enroll(db: Database, request: EnrollRequest, now: datetime) -> Enrollment:
    """Admit the device of ``request``, or confirm it is enrolled already.

    Enrolling an enrolled key changes nothing and uses up no token (the proof is a fixed
    signature, so a replayed request must not be able to change a device's record).

    Raises:
        InvalidRequestError: the public key is not a valid Ed25519 key.
        NotAuthorizedError: the proof does not verify, or no valid token and no
            pre-authorization.
        DeviceDecommissionedError: the key is a decommissioned device's.
    """
    public_key = device_public_key(request.public_key)
    if not _verify(public_key, request.proof, ENROLL_PURPOSE, enroll_payload(request)):
        raise NotAuthorizedError("proof does not verify with this public key")
    device_id = key_id(public_key)
    try:
        return _admit(db, request, device_id, now)
    except IntegrityError:
        # Another request enrolled the same key between our check and our insert (its
        # transaction won; ours, token use included, was rolled back): the key is enrolled.
        return Enrollment(device_id, new=False)


def _admit(db: Database, request: EnrollRequest, device_id: str, now: datetime) -> Enrollment:
    with db.write() as session:
        existing = session.get(Device, device_id)
        if existing is not None:
            _refuse_decommissioned(existing)
            return Enrollment(device_id, new=False)
        if session.get(PreauthorizedKey, device_id) is not None:
            via = "preauthorized key"
        elif request.enrollment_token is not None and _use_token(
            session, request.enrollment_token, now
        ):
            via = "enrollment token"
        else:
            raise NotAuthorizedError(
                "no valid enrollment token (unknown, used up or expired) and the key is not "
                "pre-authorized"
            )
        namesakes = session.scalars(  # a few are named; how many there are is counted
            select(Device.id)
            .where(func.lower(Device.hostname) == request.hostname.lower())
            .order_by(Device.id)
            .limit(NAMESAKES_NAMED)
        ).all()
        shared = (
            session.scalar(
                select(func.count()).select_from(Device)
                .where(func.lower(Device.hostname) == request.hostname.lower())
            )
            if len(namesakes) == NAMESAKES_NAMED
            else len(namesakes)
        )  # fmt: skip
        session.add(
            Device(
                id=device_id,
                public_key=request.public_key,
                compatible=request.compatible,
                hostname=request.hostname,
                enrolled=now,
                last_seen=now,
                event_seq=-1,
            )
        )
        session.flush()
        audit.append(
            db,
            session,
            at=now,
            actor=f"device:{device_id}",
            action="device.enrolled",
            subject=device_id,
            details={
                "hostname": request.hostname,
                "compatible": request.compatible,
                "via": via,
                # devices are found by hostname too: a namesake makes that ambiguous (a few
                # named, all counted: a thousand devices built as "raspberrypi" must not make
                # each entry longer than the last)
                **(
                    {"hostname_also_used_by": list(namesakes), "hostname_shared_with": shared}
                    if namesakes
                    else {}
                ),
            },
        )
    if namesakes:
        log.warning(
            "device %s enrolled as %r, the hostname of %d other device(s): refer to them by id "
            "or rename one",
            device_id, request.hostname, shared,
        )  # fmt: skip
    return Enrollment(device_id, new=True)


def _use_token(session: Session, token: str, now: datetime) -> bool:
    # One conditional UPDATE: two devices racing for the last use cannot both get it.
    result = session.execute(
        update(EnrollmentToken)
        .where(
            EnrollmentToken.token_sha256 == secret_hash(token),
            EnrollmentToken.uses_left > 0,
            EnrollmentToken.revoked.is_(None),
            or_(EnrollmentToken.expires.is_(None), EnrollmentToken.expires > now),
        )
        .values(uses_left=EnrollmentToken.uses_left - 1)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class NewEnrollmentToken:
    token: str
    uses: int
    expires: datetime | None


def create_enrollment_token(
    db: Database, *, uses: int, expires_in_s: int | None, actor: str, now: datetime
) -> NewEnrollmentToken:
    """Store a token that admits at most ``uses`` devices; return it (shown only once)."""
    token = new_secret(ENROLLMENT_TOKEN_PREFIX)
    expires = now + timedelta(seconds=expires_in_s) if expires_in_s is not None else None
    with db.write() as session:
        row = EnrollmentToken(
            token_sha256=secret_hash(token),
            uses_left=uses,
            expires=expires,
            created=now,
            created_by=actor,
        )
        session.add(row)
        session.flush()
        audit.append(
            db,
            session,
            at=now,
            actor=actor,
            action="enrollment_token.created",
            subject=f"enrollment-token:{row.id}",
            details={"uses": uses, "expires": expires.isoformat() if expires else None},
        )
    return NewEnrollmentToken(token, uses, expires)


def describe_enrollment_token(row: EnrollmentToken) -> dict[str, Any]:
    """An enrollment token as listed: everything but its secret."""
    return {
        "id": row.id,
        "uses_left": row.uses_left,
        "expires": iso(row.expires) if row.expires is not None else None,
        "created": iso(row.created),
        "created_by": row.created_by,
        "revoked": iso(row.revoked) if row.revoked is not None else None,
    }


def list_enrollment_tokens(db: Database) -> list[dict[str, Any]]:
    """Every enrollment token ever created, oldest first, without secrets."""
    with db.read() as session:
        rows = session.scalars(select(EnrollmentToken).order_by(EnrollmentToken.id)).all()
        return [describe_enrollment_token(row) for row in rows]


def revoke_enrollment_token(
    db: Database, token_id: int, *, actor: str, now: datetime
) -> dict[str, Any]:
    """Revoke the enrollment token ``token_id`` at once: it admits nobody from now on.

    Raises:
        UnknownTokenError: no such token.
        TokenConflictError: it was revoked already.
    """
    with db.write() as session:
        row = session.get(EnrollmentToken, token_id)
        if row is None:
            raise UnknownTokenError(f"no enrollment token {token_id}")
        if row.revoked is not None:
            raise TokenConflictError(f"enrollment token {token_id} was revoked already")
        row.revoked = now
        audit.append(
            db,
            session,
            at=now,
            actor=actor,
            action="enrollment_token.revoked",
            subject=f"enrollment-token:{row.id}",
            details={"uses_left": row.uses_left},
        )
        session.flush()
        return describe_enrollment_token(row)


def preauthorize(db: Database, public_key_hex: str, *, actor: str, now: datetime) -> str:
    """Let the device with this public key enroll without a token; returns its device id.

    Pre-authorizing a key twice is harmless.

    Raises:
        InvalidRequestError: not an Ed25519 public key.
    """
    device_id = key_id(device_public_key(public_key_hex))
    with db.write() as session:
        if session.get(PreauthorizedKey, device_id) is None:
            session.add(
                PreauthorizedKey(
                    key_id=device_id, public_key=public_key_hex, created=now, created_by=actor
                )
            )
            session.flush()
            audit.append(
                db,
                session,
                at=now,
                actor=actor,
                action="device.preauthorized",
                subject=device_id,
            )
    return device_id


def challenge_key(server_key: SigningKey) -> bytes:
    """The key that authenticates challenges: derived from the server's signing key, so every
    server process sharing the data directory issues and accepts the same challenges."""
    raw = server_key.private_key.private_bytes(
        Encoding.Raw, PrivateFormat.Raw, NoEncryption()
    )  # fmt: skip
    return hashlib.sha256(b"metrica-fleet challenge key v1\n" + raw).digest()


def _challenge_mac(key: bytes, device_id: str, body: str) -> str:
    return hmac.new(key, f"{device_id}\n{body}".encode(), hashlib.sha256).hexdigest()[:32]


def issue_challenge(db: Database, device_id: str, now: datetime, key: bytes) -> str:
    """A fresh single-use challenge for the device, valid for ``CHALLENGE_TTL_S``.

    Stateless: 16 hex of randomness, the expiry (16 hex, seconds), and a MAC over both and
    the device id (32 hex). Issuing stores nothing, so nobody can crowd out a device's
    challenges by asking for many; only a used challenge is stored, until it expires.

    Raises:
        UnknownDeviceError: no such device.
        DeviceDecommissionedError: the device was decommissioned.
    """
    with db.read() as session:
        device = session.get(Device, device_id)
        if device is None:
            raise UnknownDeviceError(f"device {device_id} is not enrolled")
        _refuse_decommissioned(device)
    expiry = int(now.timestamp()) + CHALLENGE_TTL_S
    body = secrets.token_hex(8) + f"{expiry:016x}"
    return body + _challenge_mac(key, device_id, body)


def _challenge_expiry(key: bytes, device_id: str, challenge: str, now: datetime) -> datetime:
    body, mac = challenge[:32], challenge[32:]
    if len(challenge) != 64 or not hmac.compare_digest(mac, _challenge_mac(key, device_id, body)):
        raise ChallengeInvalidError("unknown, already used or expired challenge")
    expiry = datetime.fromtimestamp(int(body[16:], 16), tz=now.tzinfo)
    if expiry <= now:
        raise ChallengeInvalidError("unknown, already used or expired challenge")
    return expiry


def _refuse_decommissioned(device: Device) -> None:
    if device.status == DeviceStatus.DECOMMISSIONED:
        raise DeviceDecommissionedError(
            f"device {device.id} was decommissioned: an operator must reinstate it"
        )


def open_session(
    db: Database,
    device_id: str,
    challenge: str,
    signature: str,
    now: datetime,
    key: bytes,
    max_sessions: int = DEFAULT_MAX_DEVICE_SESSIONS,
) -> str:
    """Exchange a signed challenge for a session token valid for ``SESSION_TTL_S``; the
    device's oldest sessions end so that it holds at most ``max_sessions``.

    Raises:
        UnknownDeviceError: no such device.
        DeviceDecommissionedError: the device was decommissioned.
        ChallengeInvalidError: the challenge is unknown, was used already, or expired.
        SignatureInvalidError: the signature does not verify with the device's key.
    """
    token = new_secret(SESSION_TOKEN_PREFIX)
    challenge_hash = secret_hash(challenge)
    expiry = _challenge_expiry(key, device_id, challenge, now)
    try:
        with db.write() as session:
            device = session.get(Device, device_id)
            if device is None:
                raise UnknownDeviceError(f"device {device_id} is not enrolled")
            _refuse_decommissioned(device)
            payload = f"session\n{device_id}\n{challenge}"
            public_key = device_public_key(device.public_key)
            if not _verify(public_key, signature, SESSION_PURPOSE, payload):
                raise SignatureInvalidError("the challenge signature does not verify")
            # A used challenge is remembered until it expires: single use. Two requests racing
            # with the same signature collide on the primary key; only one commits.
            session.execute(delete(DeviceChallenge).where(DeviceChallenge.expires <= now))
            if session.get(DeviceChallenge, challenge_hash) is not None:
                raise ChallengeInvalidError("unknown, already used or expired challenge")
            session.add(
                DeviceChallenge(
                    challenge_sha256=challenge_hash, device_id=device_id, expires=expiry
                )
            )
            session.flush()
            _add_session(session, device, token, now, max_sessions)
    except IntegrityError as err:
        raise ChallengeInvalidError("unknown, already used or expired challenge") from err
    return token


def _add_session(
    session: Session, device: Device, token: str, now: datetime, max_sessions: int
) -> None:
    session.execute(
        delete(DeviceSession).where(
            DeviceSession.device_id == device.id, DeviceSession.expires <= now
        )
    )
    # Ending the oldest rather than refusing the new one: a device that lost its token (a
    # reboot, a crash) must get back in, and a stolen token is ended by the device's next ones.
    kept = session.scalars(
        select(DeviceSession.token_sha256)
        .where(DeviceSession.device_id == device.id)
        .order_by(DeviceSession.created.desc(), DeviceSession.token_sha256)
        .limit(max_sessions - 1)
    ).all()
    session.execute(
        delete(DeviceSession).where(
            DeviceSession.device_id == device.id, DeviceSession.token_sha256.not_in(kept)
        )
    )
    session.add(
        DeviceSession(
            token_sha256=secret_hash(token),
            device_id=device.id,
            created=now,
            expires=now + timedelta(seconds=SESSION_TTL_S),
        )
    )
    record_contact(session, device, now)  # a device back from a silence opens a session first
