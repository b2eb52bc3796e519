"""The audit page's verification at a bounded cost (server/ui/trail.py): a view checks at most a
step of new entries, a change after the verified point shows on the next view, a change before
it on the next whole walk, and a view never waits for another."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import timedelta

from sqlalchemy import delete, func, insert, select, update

from server import audit
from server.anchor import anchor_head
from server.audit import GENESIS_HASH, AuditEntry, audit_time, canonical_json
from server.database import Database
from server.models import AuditRow
from server.settings import utc
from server.ui.trail import STEP_ENTRIES, TrailVerifier, Verification
from tests.server.conftest import Harness
from tests.server.test_ui_rollout_pages import browser

Walk = Callable[[], None]


def bulk_trail(db: Database, count: int, at: str = "2026-01-01T00:00:00Z") -> None:
    """``count`` chained entries added at once (as audit.append would chain them, faster)."""
    with db.write() as session:
        last = session.execute(
            select(AuditRow.seq, AuditRow.hash).order_by(AuditRow.seq.desc()).limit(1)
        ).first()
        seq, prev = (last[0], last[1]) if last else (0, GENESIS_HASH)
        rows = []
        for n in range(count):
            draft = AuditEntry(
                seq=seq + n + 1, at=at, actor="tester", action="test.bulk", subject=None,
                details=canonical_json({"n": n}), prev_hash=prev, hash="",
            )  # fmt: skip
            entry = replace(draft, hash=draft.expected_hash(prev))
            rows.append(asdict(entry))
            prev = entry.hash
        session.execute(insert(AuditRow), rows)


def never(_walk: Walk) -> None:
    """A whole walk that does not run (the test looks at the steps alone)."""


def at_once(walk: Walk) -> None:
    walk()


def view(harness: Harness, verifier: TrailVerifier) -> Verification:
    key = harness.app.state.fleet.server_key
    return verifier.view(harness.db, key.public_key, utc(harness.clock))


def tamper(db: Database, seq: int) -> None:
    with db.write() as session:
        session.execute(update(AuditRow).where(AuditRow.seq == seq).values(actor="forged"))


def test_a_view_of_a_large_trail_checks_at_most_a_step(harness: Harness) -> None:
    bulk_trail(harness.db, 50_000)
    with harness.db.read() as session:
        total = session.scalar(select(func.count()).select_from(AuditRow))
    assert total is not None and total >= 50_000
    verifier = TrailVerifier(background=never)
    harness.app.state.ui_trail_verifier = verifier
    viewer = browser(harness, "viewer")
    page = viewer.get("/ui/audit")
    assert page.status_code == 200
    assert verifier.checked_last == STEP_ENTRIES
    assert f"Verified up to entry {STEP_ENTRIES}, checking continues" in page.text
    assert f"{total - STEP_ENTRIES} newer entries not checked yet" in page.text
    seen = [view(harness, verifier) for _ in range(2)]
    assert verifier.checked_last == total - 2 * STEP_ENTRIES
    assert seen[-1].intact and seen[-1].pending == 0 and seen[-1].entries == total
    again = view(harness, verifier)
    assert verifier.checked_last == 0 and again.entries == total


def test_a_change_after_the_verified_point_shows_on_the_next_view(harness: Harness) -> None:
    verifier = TrailVerifier(step_entries=100, background=never)
    bulk_trail(harness.db, 50)
    first = view(harness, verifier)
    assert first.intact and first.entries >= 50
    bulk_trail(harness.db, 10)
    tamper(harness.db, first.entries + 5)
    harness.clock.advance(1)  # the whole walk is not due: the step finds it
    broken = view(harness, verifier)
    assert not broken.intact
    assert broken.problem is not None and f"entry {first.entries + 5} changed" in broken.problem
    assert not view(harness, verifier).intact  # and it stays broken


def test_a_change_before_it_shows_on_the_next_whole_walk(harness: Harness) -> None:
    walks: list[Walk] = []
    verifier = TrailVerifier(step_entries=10, full_walk_s=600, background=walks.append)
    bulk_trail(harness.db, 25)
    first = view(harness, verifier)  # the trail is longer than a step: walked in background
    assert len(walks) == 1 and first.full_walk_at is None and first.full_walk_running
    walks.pop()()
    assert view(harness, verifier).entries >= 25
    tamper(harness.db, 3)
    harness.clock.advance(300)
    still = view(harness, verifier)
    assert still.intact and still.full_walk_at is not None  # the page says when it walked
    assert walks == []
    harness.clock.advance(301)
    view(harness, verifier)
    assert len(walks) == 1
    walks.pop()()
    broken = view(harness, verifier)
    assert not broken.intact and broken.problem is not None
    assert "entry 3 changed" in broken.problem


def test_a_short_trail_is_walked_whole_in_the_view(harness: Harness) -> None:
    verifier = TrailVerifier(step_entries=100, full_walk_s=600, background=never)
    bulk_trail(harness.db, 20)
    assert view(harness, verifier).full_walk_at == utc(harness.clock)
    tamper(harness.db, 2)
    harness.clock.advance(601)
    broken = view(harness, verifier)
    assert broken.problem is not None and "entry 2 changed" in broken.problem


def test_signed_heads_added_later_are_checked_by_the_steps(harness: Harness) -> None:
    verifier = TrailVerifier(step_entries=100, background=never)
    bulk_trail(harness.db, 10)
    view(harness, verifier)
    key = harness.app.state.fleet.server_key
    with harness.db.write() as session:
        audit.append(harness.db, session, at=utc(harness.clock), actor="t", action="test.more")
    anchor_head(harness.db, key, utc(harness.clock))
    held = view(harness, verifier)
    assert held.intact and held.signed_heads == 1 and held.latest_anchor is not None
    # entries removed from the end, below the signed head
    with harness.db.write() as session:
        newest = session.scalar(select(func.max(AuditRow.seq)))
        session.execute(delete(AuditRow).where(AuditRow.seq == newest))
    removed = view(harness, verifier)
    assert not removed.intact and removed.problem is not None
    assert "removed from the end" in removed.problem


def test_a_view_never_waits_for_another(harness: Harness) -> None:
    verifier = TrailVerifier(step_entries=100, background=never)
    bulk_trail(harness.db, 5)
    first = view(harness, verifier)
    verifier._stepping.acquire()  # another view is checking
    try:
        answered: list[Verification] = []
        other = threading.Thread(target=lambda: answered.append(view(harness, verifier)))
        started = time.monotonic()
        other.start()
        other.join(2)
        assert answered == [first]
        assert time.monotonic() - started < 1
    finally:
        verifier._stepping.release()


def test_the_page_says_when_the_whole_chain_was_walked(harness: Harness) -> None:
    bulk_trail(harness.db, 5, at=audit_time(utc(harness.clock) - timedelta(hours=1)))
    page = browser(harness, "viewer").get("/ui/audit").text
    assert 'data-testid="verification-status">verified<' in page
    assert "The whole chain was last walked" in page and "every 10 minutes" in page
