"""Web console sessions: what a signed-in browser's cookie stands for.

Signing in exchanges an operator token for a session: a random secret handed to the browser
once (in its cookie), of which the database keeps only the SHA-256 (``ui_sessions``). A
session acts with its operator token's name and role and ends when that token is revoked or
expires (the same validity rule as a bearer token, :func:`server.auth.live_operator_token`),
after :data:`IDLE_TIMEOUT_S` without use, :data:`ABSOLUTE_LIFETIME_S` after signing in, or on
signing out.

Using a session records its ``last_used`` at most once per :data:`LAST_USED_RESOLUTION_S`, so
reading pages costs no write per request; the idle limit is therefore kept to within that. Only
what a person does counts as use: the console's own background requests (its live refresh and
event stream) look a session up without recording use, so an unattended open page still ends
after the idle limit.

An operator token holds at most :data:`MAX_SESSIONS_PER_TOKEN` live sessions: signing in once
more ends the oldest beyond that, so a script signing in over and over cannot grow the table.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update

from server.auth import (
    MAX_TOKEN_LENGTH,
    Operator,
    Role,
    live_operator_token,
    live_operator_token_row,
    new_secret,
    secret_hash,
)
from server.database import Database
from server.errors import UnauthenticatedError
from server.models import OperatorToken, UiSessionRow

log = logging.getLogger("server")

UI_SESSION_PREFIX = "fleet_ui_"
IDLE_TIMEOUT_S = 30 * 60
ABSOLUTE_LIFETIME_S = 12 * 3600
LAST_USED_RESOLUTION_S = 60
# Ended sessions removed per sign-in: the table stays small without a sweeper, and a sign-in
# never waits on a large delete.
MAX_SWEPT_PER_LOGIN = 100
MAX_SESSIONS_PER_TOKEN = 20
MAX_NOTICE_CHARS = 500


@dataclass(frozen=True)
class UiSession:
    """A live console session: who acts, the CSRF token of its forms, when it ends unless used
    again (the earlier of its idle and absolute limits), and the notice waiting to be shown."""

    operator: Operator
    csrf: str
    expires: datetime
    key: str = field(repr=False)  # the secret's SHA-256: names the row, admits nobody
    notice: str | None = None
    # where the session is kept (for its notice); not part of what a session is
    store: Database | None = field(default=None, repr=False, compare=False)


def _idle_cutoff(now: datetime) -> datetime:
    return now - timedelta(seconds=IDLE_TIMEOUT_S)


def create(db: Database, operator_token: str, now: datetime) -> tuple[str, UiSession]:
    """Sign in with ``operator_token``: a new session and its secret (shown only here).
    Sessions that ended are removed on the way (at most :data:`MAX_SWEPT_PER_LOGIN`), and so
    are the token's oldest live sessions beyond :data:`MAX_SESSIONS_PER_TOKEN` with this one.

    Raises:
        UnauthenticatedError: the token is unknown, expired or revoked.
    """
    token = operator_token.strip()
    if not token or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        raise UnauthenticatedError("unknown, expired or revoked operator token")
    secret = new_secret(UI_SESSION_PREFIX)
    csrf = secrets.token_hex(32)
    expires = now + timedelta(seconds=ABSOLUTE_LIFETIME_S)
    with db.write() as session:
        row = live_operator_token_row(session, token, now)
        operator, token_id = Operator(row.name, Role.parse(row.role)), row.id
        ended = (
            select(UiSessionRow.secret_sha256)
            .where(or_(UiSessionRow.expires <= now, UiSessionRow.last_used <= _idle_cutoff(now)))
            .limit(MAX_SWEPT_PER_LOGIN)
        )
        session.execute(delete(UiSessionRow).where(UiSessionRow.secret_sha256.in_(ended)))
        oldest = (
            select(UiSessionRow.secret_sha256)
            .where(UiSessionRow.operator_token_id == token_id)
            .order_by(UiSessionRow.created.desc(), UiSessionRow.secret_sha256)
            .offset(MAX_SESSIONS_PER_TOKEN - 1)
        )
        session.execute(delete(UiSessionRow).where(UiSessionRow.secret_sha256.in_(oldest)))
        session.add(
            UiSessionRow(
                secret_sha256=secret_hash(secret),
                operator_token_id=token_id,
                csrf=csrf,
                created=now,
                last_used=now,
                expires=expires,
            )
        )
    ui_session = UiSession(operator, csrf, _ends(expires, now), secret_hash(secret), store=db)
    return secret, ui_session


def _ends(expires: datetime, last_used: datetime) -> datetime:
    return min(expires, last_used + timedelta(seconds=IDLE_TIMEOUT_S))


def _over(row: UiSessionRow, now: datetime) -> bool:
    """Whether the session ``row`` ended by time at ``now``: idle too long or past its limit."""
    return row.expires <= now or row.last_used <= _idle_cutoff(now)


def live_keys(db: Database, keys: Collection[str], now: datetime) -> set[str]:
    """Which of the sessions ``keys`` (their secrets' SHA-256) are live at ``now``, by the rule
    of :func:`lookup`, in one query and without recording use: the event streams' check that
    their sessions did not end elsewhere (signed out, token revoked, expired)."""
    if not keys:
        return set()
    with db.read() as session:
        rows = session.scalars(
            select(UiSessionRow)
            .join(OperatorToken, OperatorToken.id == UiSessionRow.operator_token_id)
            .where(UiSessionRow.secret_sha256.in_(list(keys)), live_operator_token(now))
        ).all()
    return {row.secret_sha256 for row in rows if not _over(row, now)}


def _plausible(secret: str) -> bool:
    return (
        secret.startswith(UI_SESSION_PREFIX)
        and len(secret) <= MAX_TOKEN_LENGTH
        and secret.isascii()
        and secret.isprintable()
    )


def lookup(db: Database, secret: str, now: datetime, *, touch: bool = True) -> UiSession:
    """The live session whose secret this is, its use recorded (at most once a minute) unless
    ``touch`` is false: a background request (live refresh, event stream) is not use.

    Raises:
        UnauthenticatedError: no such session, or it ended: idle too long, past its absolute
            limit, or its operator token was revoked or expired since signing in.
    """
    if not _plausible(secret):
        raise UnauthenticatedError("no console session: sign in")
    key = secret_hash(secret)
    with db.read() as session:
        found = session.execute(
            select(UiSessionRow, OperatorToken)
            .join(OperatorToken, OperatorToken.id == UiSessionRow.operator_token_id)
            .where(UiSessionRow.secret_sha256 == key, live_operator_token(now))
        ).first()
    if found is None:
        raise UnauthenticatedError("the console session ended: sign in again")
    row, token = found
    if _over(row, now):
        raise UnauthenticatedError("the console session expired: sign in again")
    last_used = row.last_used
    if touch and now - last_used >= timedelta(seconds=LAST_USED_RESOLUTION_S):
        with db.write() as session:
            session.execute(
                update(UiSessionRow).where(UiSessionRow.secret_sha256 == key).values(last_used=now)
            )
        last_used = now
    operator = Operator(token.name, Role.parse(token.role))
    return UiSession(operator, row.csrf, _ends(row.expires, last_used), key, row.notice, store=db)


def end(db: Database, secret: str) -> None:
    """Sign out: the session is removed (nothing happens if there is none)."""
    with db.write() as session:
        session.execute(
            delete(UiSessionRow).where(UiSessionRow.secret_sha256 == secret_hash(secret))
        )


def _store(ui_session: UiSession) -> Database:
    if ui_session.store is None:
        raise ValueError("a session made outside sessions.create or sessions.lookup")
    return ui_session.store


def set_notice(ui_session: UiSession, notice: str) -> None:
    """Keep ``notice`` (one line, shortened to :data:`MAX_NOTICE_CHARS`) for the session's next
    page, which shows it once (:func:`take_notice`)."""
    line = " ".join(notice.split())[:MAX_NOTICE_CHARS]
    with _store(ui_session).write() as session:
        session.execute(
            update(UiSessionRow)
            .where(UiSessionRow.secret_sha256 == ui_session.key)
            .values(notice=line)
        )


def take_notice(ui_session: UiSession) -> str | None:
    """The session's waiting notice, removed so it is shown once; None (and no write) when
    there is none."""
    if ui_session.notice is None:
        return None
    with _store(ui_session).write() as session:
        session.execute(
            update(UiSessionRow)
            .where(UiSessionRow.secret_sha256 == ui_session.key)
            .values(notice=None)
        )
    return ui_session.notice
