"""Signed heads of the audit trail: what makes the hash chain keyed.

The hash chain (:mod:`server.audit`) shows any change to an entry, and any removal, except two
that need no secret at all: rewriting the chain whole (recomputing every hash), and dropping or
re-hashing its tail. Both are caught by a *signed head*: ``seq``, ``hash`` and the time, signed
with the server key (``anchor_head``). The server anchors its head as it runs (every
``ANCHOR_INTERVAL_S`` while entries are added) and on request (``GET /api/v1/audit/head``,
``fleet audit head``), keeping every anchor in the ``audit_anchors`` table:

- someone who can write the database but does not hold the server key cannot make an anchor
  for a rewritten chain: ``fleet audit verify`` checks every stored anchor's signature and that
  the chain still holds the entry it names (a rewrite at or below the newest anchor, and the
  removal of entries up to it, are named);
- anchors are in the same database, so deleting them is possible: a signed head exported
  elsewhere (``fleet audit head --out FILE`` from a scheduled job, kept off the server) and
  given back to ``fleet audit verify --expect-head FILE`` catches that too, and anything
  done to the entries it covers.

Entries added after the newest anchor are protected by the hash chain alone until the next one;
someone holding the server key can forge anchors (keep it on the server only, readable by the
server alone).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.audit import GENESIS_HASH, AuditEntry, audit_time, verify_chain
from server.database import AUDIT_CHAIN_LOCK, Database, finish_in_thread
from server.errors import ServerError
from server.models import AuditAnchorRow, AuditRow
from signing.keys import SigningKey, key_id
from signing.points import signature_problem
from signing.signature import signed_message

ANCHOR_PURPOSE = "audit-head"
log = logging.getLogger("server")
ANCHOR_INTERVAL_S = 60.0
_HEX = frozenset("0123456789abcdef")


class AnchorError(ServerError):
    """A signed head that cannot be read (a malformed file or API answer)."""


@dataclass(frozen=True)
class SignedHead:
    """The audit trail's head (``seq``, ``hash``) at ``at``, signed by the key ``key_id``."""

    seq: int
    hash: str
    at: str
    key_id: str
    signature: str  # hex, Ed25519 over signed_message(ANCHOR_PURPOSE, payload())

    def payload(self) -> bytes:
        return f"{self.seq}\n{self.hash}\n{self.at}".encode()

    def problem(self, public_key: Ed25519PublicKey) -> str | None:
        """Why this head does not hold under ``public_key`` (``None``: it holds)."""
        if self.key_id != key_id(public_key):
            return f"signed head {self.seq} is by key {self.key_id}, not the server key"
        try:
            signature = bytes.fromhex(self.signature)
        except ValueError:
            signature = b""
        if signature_problem(signature) is not None:
            return f"signed head {self.seq}: malformed signature"
        try:
            public_key.verify(signature, signed_message(ANCHOR_PURPOSE, self.payload()))
        except InvalidSignature:
            return f"signed head {self.seq}: the signature does not verify with the server key"
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, document: Any) -> SignedHead:
        """Raises: AnchorError: not a signed head (naming the field)."""
        if not isinstance(document, Mapping):
            raise AnchorError("signed head: not a JSON object")
        unknown = set(document) - set(cls.__dataclass_fields__)
        if unknown:
            raise AnchorError(f"signed head: unknown field(s) {', '.join(sorted(unknown))}")
        seq = document.get("seq")
        if type(seq) is not int or seq < 1:
            raise AnchorError("signed head: seq must be a positive integer")
        for name, length in (("hash", 64), ("key_id", 64), ("signature", 128)):
            value = document.get(name)
            if not isinstance(value, str) or len(value) != length or not set(value) <= _HEX:
                raise AnchorError(f"signed head: {name} must be {length} lowercase hex digits")
        at = document.get("at")
        if not isinstance(at, str) or not at.isascii() or not 0 < len(at) <= 32:
            raise AnchorError("signed head: at must be a time stamp")
        return cls(seq, document["hash"], at, document["key_id"], document["signature"])

    @classmethod
    def from_row(cls, row: AuditAnchorRow) -> SignedHead:
        return cls(row.seq, row.hash, row.at, row.key_id, row.signature)


def sign_head(seq: int, hash_: str, at: datetime, key: SigningKey) -> SignedHead:
    unsigned = SignedHead(seq, hash_, audit_time(at), key.key_id, "0" * 128)
    signature = key.private_key.sign(signed_message(ANCHOR_PURPOSE, unsigned.payload()))
    return SignedHead(unsigned.seq, unsigned.hash, unsigned.at, key.key_id, signature.hex())


def anchor_head(db: Database, key: SigningKey, now: datetime) -> SignedHead | None:
    """Sign the trail's head with ``key`` and keep it (unless the newest anchor names it
    already); the head as signed, or ``None`` for an empty trail.

    A head already anchored is answered from a read: the write transaction and the chain lock
    (which every audited change waits on) are taken only when there is something to sign."""
    with db.read() as session:
        head = _head_or_anchor(session, key)
    if not isinstance(head, tuple):
        return head
    with db.write() as session:
        db.lock(session, AUDIT_CHAIN_LOCK)  # the head cannot move while it is signed
        head = _head_or_anchor(session, key)
        if not isinstance(head, tuple):
            return head
        signed = sign_head(head[0], head[1], now, key)
        session.merge(AuditAnchorRow(**signed.to_dict()))
        return signed


def _head_or_anchor(session: Session, key: SigningKey) -> SignedHead | tuple[int, str] | None:
    """The newest anchor when it names the trail's head under ``key``; otherwise the head
    (``seq``, ``hash``) still to be signed; ``None`` for an empty trail."""
    last = session.execute(
        select(AuditRow.seq, AuditRow.hash).order_by(AuditRow.seq.desc()).limit(1)
    ).first()
    if last is None:
        return None
    newest = session.scalars(
        select(AuditAnchorRow).order_by(AuditAnchorRow.seq.desc()).limit(1)
    ).first()
    if newest is not None and newest.seq == last[0] and newest.key_id == key.key_id:
        return SignedHead.from_row(newest)
    return (last[0], last[1])


def stored_anchors(db: Database) -> list[SignedHead]:
    """Every anchor kept, oldest first."""
    with db.read() as session:
        rows = session.scalars(select(AuditAnchorRow).order_by(AuditAnchorRow.seq))
        return [SignedHead.from_row(row) for row in rows]


def check_anchors(
    anchors: Iterable[SignedHead], public_key: Ed25519PublicKey
) -> tuple[dict[int, str], str | None]:
    """The ``{seq: hash}`` the chain must hold, from anchors whose signatures verify; and the
    first anchor that does not (someone without the key made or changed it)."""
    expected: dict[int, str] = {}
    for anchor in anchors:
        problem = anchor.problem(public_key)
        if problem is not None:
            return expected, problem
        if anchor.hash == GENESIS_HASH:
            return expected, f"signed head {anchor.seq}: names no entry"
        expected[anchor.seq] = anchor.hash
    return expected, None


@dataclass(frozen=True)
class TrailCheck:
    """Whether the audit trail holds: its signed heads checked with the server key, then its
    chain walked against them (``fleet audit verify``, and the console's audit page)."""

    problem: str | None  # the first signed head or entry that does not hold
    entries: int | None  # the entries that hold before ``problem`` (None: chain not walked)
    head: str | None  # SEQ:HASH of the chain's head, when the trail holds
    signed_heads: int | None  # the signed heads that hold (None: one does not)
    unchecked: int  # stored signed heads left unchecked: no server key was given

    @property
    def intact(self) -> bool:
        return self.problem is None


def check_trail(
    chain: Iterable[AuditEntry],
    anchors: Sequence[SignedHead],
    public_key: Ed25519PublicKey | None,
    *,
    exported: SignedHead | None = None,
    expect_head: tuple[int, str] | None = None,
) -> TrailCheck:
    """Check ``anchors`` (the stored signed heads) and ``exported`` (one kept elsewhere) with
    ``public_key``, then walk ``chain`` (oldest first) against them and ``expect_head``: the
    first signed head that does not verify stops the check before the chain is walked.

    Without ``public_key`` no signed head is checked (``exported`` then must be ``None``) and the
    chain is walked against ``expect_head`` alone."""
    anchored: dict[int, str] = {}
    problem: str | None = None
    if public_key is not None:
        anchored, problem = check_anchors([*anchors, *filter(None, [exported])], public_key)
    report = (
        None
        if problem is not None
        else verify_chain(chain, expect_head=expect_head, anchored=anchored)
    )
    if report is not None and not report.intact:
        problem = f"{report.problem} ({report.checked} entries before it hold)"
    return TrailCheck(
        problem=problem,
        entries=None if report is None else report.checked,
        head=None if report is None or problem else f"{report.head_seq}:{report.head_hash}",
        signed_heads=len(anchored) if problem is None else None,
        unchecked=len(anchors) if anchors and public_key is None else 0,
    )


def read_head_file(path: Path) -> SignedHead:
    """A signed head exported by ``fleet audit head --out``.

    Raises:
        AnchorError: unreadable, or not a signed head.
    """
    try:
        document = json.loads(path.read_bytes())
    except OSError as err:
        raise AnchorError(f"{path}: cannot read: {err.strerror}") from err
    except ValueError as err:
        raise AnchorError(f"{path}: not JSON ({err})") from err
    try:
        return SignedHead.from_dict(document)
    except AnchorError as err:
        raise AnchorError(f"{path}: {err}") from err


async def anchor_every(
    db: Database, key: SigningKey, now: Callable[[], datetime], interval_s: float
) -> None:
    """Anchor the head every ``interval_s`` seconds while the server runs (a background task
    of the app); a failed round (the database busy or away) is logged and tried again."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await finish_in_thread(anchor_head, db, key, now())
        except Exception:  # the task must outlive a bad moment of the database
            log.exception("signing the audit head failed")
