"""The console's record pages: the releases the server holds, and the audit trail with the
verification of its chain.

A release is shown as the API describes it (:func:`server.releases.describe`) with its signers:
the key ids of its stored signature envelope, read by :class:`signing.signature.SignatureEnvelope`
as ``fleet bundle info`` reads a bundle's. The audit page filters as ``fleet audit list`` does
(:class:`server.audit.AuditFilter`), newest first, a page at a time; its verification is
``fleet audit verify``'s (:func:`server.anchor.check_trail`): the stored signed heads checked
with the server key, then the chain walked against them; a page view checks only what was
added since the last view, and the whole walk runs again every few minutes
(server/ui/trail.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from server.api.common import server_state
from server.audit import AuditEntry, AuditFilter, entries
from server.blobs import SHA256_HEX
from server.database import Database
from server.errors import InvalidRequestError
from server.models import Release
from server.releases import describe
from server.ui.common import UiPage, render
from server.ui.trail import FULL_WALK_S, TrailVerifier, Verification
from signing.errors import SignatureFormatError
from signing.signature import SignatureEnvelope

router = APIRouter(prefix="/ui")

AUDIT_PAGE = 50
FILTERS = ("action", "subject", "actor")
MAX_SEQ = 2**63 - 1
_POSITION = re.compile(r"[0-9]{1,19}")  # no more digits than MAX_SEQ's, before int() reads it
# A page view checks only the entries added since the last (server/ui/trail.py); the whole
# chain is walked again this often (on the server's clock) while the page is viewed.
VERIFY_REUSE_S = FULL_WALK_S


def size_text(size: int) -> str:
    """``3000`` as ``2.9 KiB``: binary units, one decimal."""
    value, unit = float(size), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def signers(envelope: bytes) -> list[str] | None:
    """The key ids that signed a release's manifest (``None``: an unreadable envelope)."""
    try:
        return [signature.key_id for signature in SignatureEnvelope.from_bytes(envelope).signatures]
    except SignatureFormatError:
        return None


def release_rows(db: Database) -> list[dict[str, Any]]:
    """Every release, newest first, as the API describes it, with its signers and the total
    size of its images."""
    with db.read() as session:
        rows = session.scalars(
            select(Release).options(selectinload(Release.images)).order_by(Release.id.desc())
        ).all()
        return [
            {
                **describe(release),
                "signers": signers(release.signature),
                "total_size": sum(image.size for image in release.images),
            }
            for release in rows
        ]


@router.get("/releases")
def release_list(request: Request, session: UiPage) -> Response:
    """The releases: version, product, compatible, security version, signers, images."""
    rows = release_rows(server_state(request).db)
    return render(
        request, session, "releases.html", nav="releases", releases=rows, size_text=size_text
    )


@dataclass(frozen=True)
class AuditQuery:
    """The audit page's filters and position, from its URL."""

    action: str | None = None
    subject: str | None = None
    actor: str | None = None
    before: int | None = None  # entries older than this seq (the next page)
    after: int | None = None  # entries newer than this seq (the previous page)

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> AuditQuery:
        """Raises: InvalidRequestError: a filter :meth:`AuditFilter.checked` refuses, or a
        position that is not a whole number."""
        texts = {name: (params.get(name) or "").strip() or None for name in FILTERS}
        checked = AuditFilter.checked(
            (texts["action"],) if texts["action"] else (), texts["subject"], texts["actor"]
        )
        positions: dict[str, int | None] = {}
        for name in ("before", "after"):
            value = (params.get(name) or "").strip()
            if value and not (_POSITION.fullmatch(value) and int(value) <= MAX_SEQ):
                raise InvalidRequestError(f"{name}: give an entry number")
            positions[name] = int(value) if value else None
        return cls(
            action=checked.actions[0] if checked.actions else None,
            subject=checked.subject,
            actor=checked.actor,
            before=positions["before"],
            after=positions["after"],
        )

    def filter(self) -> AuditFilter:
        """The entries this query lets through."""
        return AuditFilter((self.action,) if self.action else (), self.subject, self.actor)

    def params(self, **changes: int | None) -> dict[str, str]:
        """The URL parameters of this query with ``changes`` (for the paging links)."""
        values: dict[str, Any] = {
            "action": self.action, "subject": self.subject, "actor": self.actor,
            "before": self.before, "after": self.after, **changes,
        }  # fmt: skip
        return {name: str(value) for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class AuditPage:
    """One page of matching entries, newest first, and whether older or newer ones exist."""

    entries: list[AuditEntry]
    older: int | None  # the ``before`` of the next page
    newer: int | None  # the ``after`` of the previous page


def audit_page(db: Database, query: AuditQuery, size: int = AUDIT_PAGE) -> AuditPage:
    """The entries matching ``query``'s filters, ``size`` at a time, newest first."""
    match = query.filter()
    with db.read() as session:
        if query.after is not None:
            rows = entries(session, after=query.after, limit=size + 1, match=match)
            newer_exists = len(rows) > size
            found = list(reversed(rows[:size]))
            older_exists = True
        else:
            rows = entries(
                session, before=query.before, limit=size + 1, match=match,
                newest_first=True,
            )  # fmt: skip
            found = rows[:size]
            older_exists, newer_exists = len(rows) > size, query.before is not None
    return AuditPage(
        found,
        older=found[-1].seq if found and older_exists else None,
        newer=found[0].seq if found and newer_exists else None,
    )


def recent_verification(request: Request) -> Verification:
    """The trail's verification for this view, at a bounded cost
    (:class:`server.ui.trail.TrailVerifier`, one per server, kept in the app's state)."""
    state = server_state(request)
    verifier = getattr(request.app.state, "ui_trail_verifier", None)
    if not isinstance(verifier, TrailVerifier):
        verifier = request.app.state.ui_trail_verifier = TrailVerifier()
    return verifier.view(state.db, state.server_key.public_key, state.now())


_ROLLOUT_SUBJECT = re.compile(r"rollout:([1-9][0-9]{0,9})")


def subject_link(subject: str | None) -> str | None:
    """The console page of an entry's subject: a rollout's or a device's (None: no page)."""
    if subject is None:
        return None
    rollout = _ROLLOUT_SUBJECT.fullmatch(subject)
    if rollout is not None:
        return f"/ui/rollouts/{rollout.group(1)}"
    return f"/ui/devices/{subject}" if SHA256_HEX.fullmatch(subject) else None


@router.get("/audit")
def audit_trail(request: Request, session: UiPage) -> Response:
    """The audit trail, filtered and paged, newest first, and the chain's verification."""
    query = AuditQuery.from_params(request.query_params)
    page = audit_page(server_state(request).db, query)
    return render(
        request, session, "audit.html", nav="audit",
        query=query, page=page, verification=recent_verification(request),
        full_walk_s=VERIFY_REUSE_S, subject_link=subject_link,
    )  # fmt: skip
