"""The audit trail: every operator action and device event, append-only and hash-chained.

Each entry's ``hash`` is ``sha256(prev_hash + canonical JSON of the entry)``, where the entry is
``{"action", "actor", "at", "details", "seq", "subject"}`` (``details`` as its stored JSON text)
and ``prev_hash`` is the previous entry's hash (64 zeros before the first). ``seq`` counts from 1
without gaps. Changing any stored byte of an entry, or removing one, breaks the chain at that
entry, and :func:`verify_chain` names it. Removing entries at the *end* leaves a shorter valid
chain, and a chain rewritten whole is valid too: heads signed with the server key
(:mod:`server.anchor`), kept in the database and exported elsewhere, catch both.

Appends from several server processes are serialized (a database lock), so the chain never
forks; an append is part of the transaction of the change it records, so a rolled-back change
leaves no entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session

from fleet_core.text import refused_character
from server.database import AUDIT_CHAIN_LOCK, Database
from server.errors import InvalidRequestError
from server.models import AuditRow

GENESIS_HASH = "0" * 64
PAGE = 1000
MAX_FILTER_LENGTH = 160  # the longest actor or subject the trail stores
MAX_FILTER_ACTIONS = 20


def canonical_json(value: Any) -> str:
    """The one spelling of a JSON value: sorted keys, no spaces, non-ASCII kept as UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def audit_time(moment: datetime) -> str:
    """The trail's spelling of a time: UTC with microseconds, fixed width, so it sorts."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class AuditEntry:
    """One entry as stored and as hashed."""

    seq: int
    at: str
    actor: str
    action: str
    subject: str | None
    details: str  # canonical JSON text of an object
    prev_hash: str
    hash: str

    def content(self) -> bytes:
        """The canonical JSON of the entry, the part of the hash input after ``prev_hash``."""
        return canonical_json(
            {
                "action": self.action,
                "actor": self.actor,
                "at": self.at,
                "details": self.details,
                "seq": self.seq,
                "subject": self.subject,
            }
        ).encode("utf-8")

    def expected_hash(self, prev_hash: str) -> str:
        """What ``hash`` must be if this entry follows an entry whose hash is ``prev_hash``."""
        return hashlib.sha256(prev_hash.encode("ascii") + self.content()).hexdigest()

    @classmethod
    def from_row(cls, row: AuditRow) -> AuditEntry:
        return cls(
            row.seq,
            row.at,
            row.actor,
            row.action,
            row.subject,
            row.details,
            row.prev_hash,
            row.hash,
        )

    def to_dict(self) -> dict[str, Any]:
        """The API's view: ``details`` as an object (its canonical text is what is hashed)."""
        return {
            "seq": self.seq,
            "at": self.at,
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "details": json.loads(self.details),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> AuditEntry:
        """Rebuild an entry from :meth:`to_dict` output (``details`` re-encoded canonically).

        Raises:
            ValueError: a field is missing or of the wrong type.
        """
        try:
            entry = cls(
                seq=document["seq"],
                at=document["at"],
                actor=document["actor"],
                action=document["action"],
                subject=document["subject"],
                details=canonical_json(document["details"]),
                prev_hash=document["prev_hash"],
                hash=document["hash"],
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"audit entry: missing or malformed field ({err})") from err
        if type(entry.seq) is not int or not all(
            isinstance(v, str) for v in (entry.at, entry.actor, entry.action, entry.hash)
        ):
            raise ValueError(f"audit entry {document.get('seq')!r}: fields of the wrong type")
        return entry


def append(
    db: Database,
    session: Session,
    *,
    at: datetime,
    actor: str,
    action: str,
    subject: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> AuditEntry:
    """Append an entry in ``session``'s transaction (a :meth:`Database.write` session).

    The entry becomes durable with the transaction, and only with it.
    """
    db.lock(session, AUDIT_CHAIN_LOCK)
    last = session.execute(
        select(AuditRow.seq, AuditRow.hash).order_by(AuditRow.seq.desc()).limit(1)
    ).first()
    seq, prev_hash = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
    draft = AuditEntry(
        seq=seq,
        at=audit_time(at),
        actor=actor,
        action=action,
        subject=subject,
        details=canonical_json(dict(details or {})),
        prev_hash=prev_hash,
        hash="",
    )
    entry = replace(draft, hash=draft.expected_hash(prev_hash))
    session.add(AuditRow(**asdict(entry)))
    session.flush()
    return entry


@dataclass(frozen=True)
class AuditFilter:
    """Which entries to list: an action matches itself and the actions under it (``rollout``
    matches ``rollout.halted``; any of ``actions``), ``subject`` and ``actor`` match exactly.
    Nothing given: every entry."""

    actions: tuple[str, ...] = ()
    subject: str | None = None
    actor: str | None = None

    @classmethod
    def checked(
        cls, actions: Iterable[str] = (), subject: str | None = None, actor: str | None = None
    ) -> AuditFilter:
        """Raises: InvalidRequestError: too many actions, or a value too long or holding a
        character not allowed in text (naming the filter)."""
        actions = tuple(actions)
        if len(actions) > MAX_FILTER_ACTIONS:
            raise InvalidRequestError(f"action: at most {MAX_FILTER_ACTIONS} actions")
        for name, values in (("action", actions), ("subject", (subject,)), ("actor", (actor,))):
            for value in values:
                if value is not None and len(value) > MAX_FILTER_LENGTH:
                    raise InvalidRequestError(f"{name}: at most {MAX_FILTER_LENGTH} characters")
                if value is not None and refused_character(value) is not None:
                    raise InvalidRequestError(f"{name}: a character not allowed in text")
        return cls(actions, subject, actor)

    def conditions(self) -> list[ColumnElement[bool]]:
        """The filter as SQL conditions on :class:`AuditRow` (all must hold)."""
        conditions: list[ColumnElement[bool]] = []
        if self.actions:
            by_action = [
                (AuditRow.action == action)
                | AuditRow.action.startswith(action + ".", autoescape=True)
                for action in self.actions
            ]
            conditions.append(or_(*by_action))
        if self.subject is not None:
            conditions.append(AuditRow.subject == self.subject)
        if self.actor is not None:
            conditions.append(AuditRow.actor == self.actor)
        return conditions


def entries(
    session: Session,
    *,
    after: int = 0,
    before: int | None = None,
    limit: int | None = None,
    match: AuditFilter | None = None,
    newest_first: bool = False,
) -> list[AuditEntry]:
    """Entries with ``after < seq < before`` that ``match`` lets through, oldest first (or
    newest first), at most ``limit``."""
    where = [AuditRow.seq > after, *(match.conditions() if match is not None else [])]
    if before is not None:
        where.append(AuditRow.seq < before)
    order = AuditRow.seq.desc() if newest_first else AuditRow.seq
    query = select(AuditRow).where(*where).order_by(order)
    if limit is not None:
        query = query.limit(limit)
    return [AuditEntry.from_row(row) for row in session.scalars(query)]


def all_entries(db: Database) -> Iterator[AuditEntry]:
    """Every entry, oldest first, read a page at a time."""
    after = 0
    while True:
        with db.read() as session:
            page = entries(session, after=after, limit=PAGE)
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1].seq


@dataclass(frozen=True)
class ChainReport:
    """The outcome of walking the chain: how far it holds, and the first break if any."""

    checked: int
    head_seq: int
    head_hash: str
    problem: str | None = None

    @property
    def intact(self) -> bool:
        return self.problem is None


def verify_chain(
    chain: Iterable[AuditEntry],
    *,
    expect_head: tuple[int, str] | None = None,
    anchored: Mapping[int, str] | None = None,
) -> ChainReport:
    """Walk ``chain`` (ordered by ``seq``) and report the first entry that was changed or removed.

    ``expect_head`` is a ``(seq, hash)`` recorded earlier, ``anchored`` more of them (the signed
    heads of :mod:`server.anchor`): the chain must still contain each, which catches entries
    removed from the end and a chain rewritten whole.
    """
    recorded = dict(anchored or {})
    if expect_head is not None:
        recorded[expect_head[0]] = expect_head[1]
    expected_seq, prev_hash, checked = 1, GENESIS_HASH, 0
    head_seq, head_hash = 0, GENESIS_HASH
    previous: AuditEntry | None = None
    for entry in chain:
        problem = check_entry(entry, expected_seq, prev_hash, previous)
        if problem is not None:
            return ChainReport(checked, head_seq, head_hash, problem)
        if entry.seq in recorded and entry.hash != recorded[entry.seq]:
            return ChainReport(
                checked,
                head_seq,
                head_hash,
                f"entry {entry.seq} differs from the recorded head: the trail was rewritten "
                f"from entry {entry.seq} or earlier",
            )
        checked += 1
        expected_seq, prev_hash, previous = entry.seq + 1, entry.hash, entry
        head_seq, head_hash = entry.seq, entry.hash
    last_recorded = max(recorded, default=0)
    if head_seq < last_recorded:
        first_missing = head_seq + 1
        return ChainReport(
            checked,
            head_seq,
            head_hash,
            f"entries {first_missing} to {last_recorded} were removed from the end "
            f"(the recorded head is entry {last_recorded})",
        )
    return ChainReport(checked, head_seq, head_hash)


def check_entry(
    entry: AuditEntry, expected_seq: int, prev_hash: str, previous: AuditEntry | None
) -> str | None:
    """What is wrong with ``entry`` as the trail's entry ``expected_seq`` after ``previous``
    (whose hash is ``prev_hash``), or None: the one rule of a whole walk and an incremental one."""
    if entry.seq > expected_seq:
        last = entry.seq - 1
        span = f"entry {expected_seq}" if last == expected_seq else f"entries {expected_seq}-{last}"
        return f"{span} removed (the trail jumps from entry {expected_seq - 1} to {entry.seq})"
    if entry.seq != expected_seq:
        return f"entry {entry.seq} out of order (expected entry {expected_seq})"
    if entry.prev_hash != prev_hash:
        # Either this entry's prev_hash was edited, or the previous entry was rewritten together
        # with its hash (which then looks consistent on its own): tell them apart.
        if previous is not None and entry.hash == entry.expected_hash(entry.prev_hash):
            return (
                f"entry {previous.seq} changed (its hash was recomputed, but entry {entry.seq} "
                "still chains to the original)"
            )
        return f"entry {entry.seq} changed (its prev_hash does not match entry {entry.seq - 1})"
    if entry.hash != entry.expected_hash(prev_hash):
        return f"entry {entry.seq} changed (its content does not match its hash)"
    return None
