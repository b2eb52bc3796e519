"""The audit page's verification of the trail, at a bounded cost per page view.

Walking the whole chain reads every entry: seconds for a large trail, so never on a page view.
Each process remembers how far the chain was verified (the last entry that holds, and the
signed heads checked). A page view (:meth:`TrailVerifier.view`) checks only what was added
since, at most :data:`STEP_ENTRIES` entries with the stored signed heads added since; the
page then says how far verification reached and that checking continues. One view checks at
a time: another view meanwhile shows the last outcome instead of waiting.

An entry changed after it was verified is not seen by these steps, so the whole chain is also
walked again, :func:`server.anchor.check_trail` as ``fleet audit verify`` walks it, every
:data:`FULL_WALK_S` seconds while the page is viewed: in the view itself when the trail is no
longer than a step, else in a background thread. The page says when the last whole walk ran.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select

from server.anchor import SignedHead, check_anchors, check_trail, stored_anchors
from server.audit import GENESIS_HASH, AuditEntry, all_entries, check_entry, entries
from server.database import Database
from server.models import AuditAnchorRow, AuditRow

log = logging.getLogger("server")

STEP_ENTRIES = 20_000  # entries one page view checks at most
FULL_WALK_S = 600  # the whole chain is walked again this often (server clock) while viewed
READ_PAGE = 2000


@dataclass(frozen=True)
class Verification:
    """What the audit page says of the trail: whether it holds as far as it was checked."""

    intact: bool
    problem: str | None
    entries: int  # entries verified (the chain holds from entry 1 to here)
    head: str | None  # SEQ:HASH of the last verified entry
    signed_heads: int  # stored signed heads that hold
    latest_anchor: SignedHead | None
    checked_at: datetime
    pending: int = 0  # entries added and not yet checked: checking continues
    full_walk_at: datetime | None = None  # when the whole chain was last walked
    full_walk_running: bool = False


@dataclass
class _Progress:
    seq: int = 0
    hash: str = GENESIS_HASH
    previous: AuditEntry | None = None
    anchor_seq: int = 0  # stored signed heads up to this seq were checked
    anchored: dict[int, str] | None = None  # their (seq, hash) not yet reached by the chain
    signed_heads: int = 0
    latest_anchor: SignedHead | None = None
    problem: str | None = None


class TrailVerifier:
    """One process's verification of its audit trail (kept in the app's state).

    ``background`` runs a whole walk (a callable), by default in a daemon thread; a test
    passes one that runs it at once, or never."""

    def __init__(
        self,
        *,
        step_entries: int = STEP_ENTRIES,
        full_walk_s: float = FULL_WALK_S,
        background: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self.step_entries = step_entries
        self.full_walk_s = full_walk_s
        self.background = background or _in_thread
        self.checked_last = 0  # entries the last step checked (for tests and logs)
        self._progress = _Progress(anchored={})
        self._last: Verification | None = None
        self._stepping = threading.Lock()
        self._state = threading.Lock()  # guards the fields below and _progress swaps
        self._walk_started: datetime | None = None
        self._walk_at: datetime | None = None
        self._walking = False

    def view(self, db: Database, public_key: Ed25519PublicKey, now: datetime) -> Verification:
        """The trail's verification for a page view: at most ``step_entries`` entries checked
        (the last outcome at once if another view is checking)."""
        if not self._stepping.acquire(blocking=False):
            last = self._last
            if last is not None:
                return last
            self._stepping.acquire()
        try:
            head_seq = _head_seq(db)
            walk = self._walk_due(now)
            if walk and head_seq <= self.step_entries:
                self._walk(db, public_key, now)
            else:
                if walk:
                    self.background(lambda: self._walk(db, public_key, now))
                self._step(db, public_key, head_seq)
            self._last = self._outcome(head_seq, now)
            return self._last
        finally:
            self._stepping.release()

    def _walk_due(self, now: datetime) -> bool:
        with self._state:
            if self._walking:
                return False
            started = self._walk_started
            due = started is None or not (
                timedelta(0) <= now - started < timedelta(seconds=self.full_walk_s)
            )
            if due:
                self._walking, self._walk_started = True, now
            return due

    def _walk(self, db: Database, public_key: Ed25519PublicKey, now: datetime) -> None:
        """Walk the whole chain (``fleet audit verify``'s check) and start the steps again
        from where it ended."""
        try:
            anchors = stored_anchors(db)
            check = check_trail(all_entries(db), anchors, public_key)
        except Exception:  # a background walk must not die silently; the next is due later
            log.exception("walking the audit trail failed")
            with self._state:
                self._walking = False
            return
        progress = _Progress(anchored={}, latest_anchor=anchors[-1] if anchors else None)
        progress.anchor_seq = anchors[-1].seq if anchors else 0
        progress.signed_heads = check.signed_heads or 0
        if check.problem is not None:
            progress.problem = check.problem
            progress.seq = check.entries or 0
        elif check.head is not None:
            seq, _, hash_ = check.head.partition(":")
            progress.seq, progress.hash = int(seq), hash_
        with self._state:
            # what steps checked beyond the walk's end is kept; entries and heads added
            # during the walk are checked by the next steps
            current = self._progress
            ahead = current.problem is None and current.seq > progress.seq
            if progress.problem is not None or not ahead:
                self._progress = progress
            self._walking, self._walk_at = False, now

    def _step(self, db: Database, public_key: Ed25519PublicKey, head_seq: int) -> None:
        with self._state:
            progress = replace(self._progress, anchored=dict(self._progress.anchored or {}))
        if progress.problem is None:
            self.checked_last = _advance(db, public_key, progress, head_seq, self.step_entries)
        with self._state:
            if self._progress.problem is None and (
                progress.problem is not None or progress.seq >= self._progress.seq
            ):
                self._progress = progress

    def _outcome(self, head_seq: int, now: datetime) -> Verification:
        with self._state:
            p = self._progress
            return Verification(
                intact=p.problem is None,
                problem=p.problem,
                entries=p.seq,
                head=f"{p.seq}:{p.hash}" if p.seq and p.problem is None else None,
                signed_heads=p.signed_heads,
                latest_anchor=p.latest_anchor,
                checked_at=now,
                pending=max(0, head_seq - p.seq) if p.problem is None else 0,
                full_walk_at=self._walk_at,
                full_walk_running=self._walking,
            )


def _in_thread(walk: Callable[[], None]) -> None:
    threading.Thread(target=walk, name="audit-trail-walk", daemon=True).start()


def _head_seq(db: Database) -> int:
    with db.read() as session:
        return int(session.scalar(select(func.max(AuditRow.seq))) or 0)


def _advance(
    db: Database, public_key: Ed25519PublicKey, progress: _Progress, head_seq: int, limit: int
) -> int:
    """Check the signed heads stored since ``progress`` and up to ``limit`` entries after it,
    moving it forward (or setting its problem); the number of entries checked."""
    anchored = progress.anchored if progress.anchored is not None else {}
    with db.read() as session:
        rows = session.scalars(
            select(AuditAnchorRow)
            .where(AuditAnchorRow.seq > progress.anchor_seq)
            .order_by(AuditAnchorRow.seq)
        ).all()
        new_anchors = [SignedHead.from_row(row) for row in rows]
    if new_anchors:
        held, problem = check_anchors(new_anchors, public_key)
        if problem is not None:
            progress.problem = problem
            return 0
        reached = [seq for seq in held if seq <= progress.seq]
        with db.read() as session:
            found = session.execute(
                select(AuditRow.seq, AuditRow.hash).where(AuditRow.seq.in_(reached))
            )
            stored = {seq: hash_ for seq, hash_ in found}
        for seq, hash_ in held.items():
            if seq > progress.seq:
                anchored[seq] = hash_
            elif stored.get(seq) != hash_:
                progress.problem = _rewritten(seq)
                return 0
        progress.anchor_seq = new_anchors[-1].seq
        progress.signed_heads += len(held)
        progress.latest_anchor = new_anchors[-1]
    if head_seq < progress.seq:
        progress.problem = (
            f"entries {head_seq + 1} to {progress.seq} were removed from the end "
            f"(entry {progress.seq} was verified)"
        )
        return 0
    checked = 0
    while checked < limit:
        wanted = min(READ_PAGE, limit - checked)
        with db.read() as session:
            page = entries(session, after=progress.seq, limit=wanted)
        for entry in page:
            problem = check_entry(entry, progress.seq + 1, progress.hash, progress.previous)
            if problem is None and anchored.get(entry.seq, entry.hash) != entry.hash:
                problem = _rewritten(entry.seq)
            if problem is not None:
                progress.problem = f"{problem} ({progress.seq} entries before it hold)"
                return checked
            anchored.pop(entry.seq, None)
            progress.seq, progress.hash, progress.previous = entry.seq, entry.hash, entry
            checked += 1
        if len(page) < wanted:
            break
    if progress.seq >= head_seq and anchored and max(anchored) > progress.seq:
        progress.problem = (
            f"entries {progress.seq + 1} to {max(anchored)} were removed from the end "
            f"(the recorded head is entry {max(anchored)})"
        )
    progress.anchored = anchored
    return checked


def _rewritten(seq: int) -> str:
    return (
        f"entry {seq} differs from the recorded head: the trail was rewritten "
        f"from entry {seq} or earlier"
    )
