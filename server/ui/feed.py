"""Live updates of the web console: a fingerprint of the fleet, checked once a second, pushed to
every open page as Server-Sent Events (``GET /ui/events``; ``static/console.js`` listens).

One background task per process (:class:`FleetFeed`) computes :func:`fingerprint` every
``interval_s`` in the thread pool and wakes every open stream when it changed, so the cost per
second is a handful of indexed queries however many devices and browsers there are. A stream
never queries the database after it was admitted: the feed checks for all of them at once.

A stream ends:

- when the server stops: uvicorn waits for every open response to end before the app's
  lifespan ends, so ``fleet server run`` closes the feed first (:class:`StreamClosingServer`);
- when its session ends: by time (its ``expires``, by the server's clock, which
  ``--time-scale`` may run faster than real time: the stream measures the clock's pace and
  waits in real time accordingly); at once when it signs out in this process; and within
  ``keepalive_s`` when it ended any other way (signed out through another process, its
  operator token revoked or expired): every ``keepalive_s`` the feed asks the database, in
  one query for all open streams, which of their sessions are still live
  (:func:`server.ui.sessions.live_keys`); at the latest after :data:`STREAM_LIFETIME_S` the
  browser reconnects (``retry``), which checks the session again;
- when its session opens more than ``max_per_session`` streams: the oldest ends, so a person
  reloading pages is never locked out and one session cannot take every place.

Opening a stream is not use of the session: an open page left alone still ends after the idle
limit. At most ``max_streams`` are open per process; one more is answered 503 (the browser
retries).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import cast

import uvicorn
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from server.api.common import server_state
from server.database import Database, finish_in_thread
from server.errors import UnauthenticatedError
from server.models import AuditRow, Device, FleetControl, Rollout
from server.rollouts import RolloutState
from server.ui import sessions
from server.ui.security import session_secret

log = logging.getLogger("server")

INTERVAL_S = 1.0
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
MAX_STREAMS = 200
MAX_STREAMS_PER_SESSION = 4  # a few tabs; opening one more ends the session's oldest stream
CLOCK_PROBE_S = 1.0  # how soon a stream first re-reads the server's clock to learn its pace
RETRY_MS = 2000  # how long a browser waits before reconnecting a stream that ended
STREAM_LIFETIME_S = 600.0
# Rollouts whose state or stage may still change (the others are counted per state).
_OPEN_ROLLOUTS = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.HALTED)

router = APIRouter(include_in_schema=False)


def fingerprint(db: Database) -> str:
    """An opaque digest of what the console's pages show, which changes whenever the fleet
    does: the newest audit entry (every operator action and device event), the newest
    ``last_seen`` of a device (check-ins and heartbeats), every open rollout's state and stage
    and how many rollouts each state holds, and the emergency stop.

    Every query reads an index or a small table: none grows with the number of devices.
    """
    with db.read() as session:
        audit_seq = session.scalar(select(func.max(AuditRow.seq)))
        last_seen = session.scalar(select(func.max(Device.last_seen)))
        per_state = session.execute(
            select(Rollout.state, func.count(), func.max(Rollout.id))
            .group_by(Rollout.state)
            .order_by(Rollout.state)
        ).all()
        open_rollouts = session.execute(
            select(Rollout.id, Rollout.state, Rollout.stage)
            .where(Rollout.state.in_(_OPEN_ROLLOUTS))
            .order_by(Rollout.id)
        ).all()
        control = session.execute(
            select(FleetControl.emergency_stop, FleetControl.since, FleetControl.reason).where(
                FleetControl.id == 1
            )
        ).first()
    parts = (
        audit_seq,
        last_seen.isoformat() if last_seen else None,
        [tuple(row) for row in per_state],
        [tuple(row) for row in open_rollouts],
        tuple(control) if control else (False, None, None),  # made on first use: "off"
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


class FeedFullError(Exception):
    """Every stream this process allows is open."""


@dataclass(eq=False)
class Stream:
    """One open event stream of a session (``owner``: the session's key); ``ended`` once it
    is closed, or ended early to make room for a newer stream of the same session."""

    owner: str
    ended: bool = False


class FleetFeed:
    """The fleet's fingerprint, checked every ``interval_s`` by one task, and the streams that
    wait for it to change (at most ``max_streams``, at most ``max_per_session`` of one
    session). ``check`` computes the fingerprint (in the thread pool); :func:`fingerprint`
    unless a test counts its calls. Every ``keepalive_s`` the streams of sessions that ended
    (``live``: which of the given session keys are live at ``now()``) are ended."""

    def __init__(
        self,
        db: Database,
        *,
        interval_s: float = INTERVAL_S,
        keepalive_s: float = KEEPALIVE_S,
        max_streams: int = MAX_STREAMS,
        max_per_session: int = MAX_STREAMS_PER_SESSION,
        check: Callable[[Database], str] = fingerprint,
        now: Callable[[], datetime] | None = None,
        live: Callable[[Database, Collection[str], datetime], set[str]] = sessions.live_keys,
    ) -> None:
        self.db = db
        self.now = now or (lambda: datetime.now(UTC))
        self.live = live
        self.interval_s = interval_s
        self.keepalive_s = keepalive_s
        self.max_streams = max_streams
        self.max_per_session = max_per_session
        self.check = check
        self.current = ""
        self.streams = 0
        self._owners: dict[str, list[Stream]] = {}
        self.closed = True
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self) -> None:
        """Compute the first fingerprint and start checking (in the running event loop)."""
        self.closed = False
        self._changed = asyncio.Event()  # bound to this loop: a test may start an app twice
        await self._update()
        self._task = asyncio.create_task(self._run())

    def close(self) -> None:
        """End every stream and admit no more; safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        self._changed.set()
        if self._task is not None:
            self._task.cancel()

    async def stop(self) -> None:
        """:meth:`close`, then wait for the checking task to end."""
        self.close()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        checked = time.monotonic()
        while True:
            await asyncio.sleep(self.interval_s)
            await self._update()
            if self._owners and time.monotonic() - checked >= self.keepalive_s:
                checked = time.monotonic()
                await self._end_ended_sessions()

    async def _end_ended_sessions(self) -> None:
        owners = set(self._owners)
        try:
            alive = await finish_in_thread(self.live, self.db, owners, self.now())
        except Exception:
            # the database is out: _update logs the outage; the next check tries again
            return
        self.end_sessions(owners - alive)

    def end_sessions(self, keys: Collection[str]) -> None:
        """End every open stream of the sessions ``keys`` (signed out, revoked, expired)."""
        ended = [stream for key in keys for stream in self._owners.get(key, [])]
        for stream in ended:
            self.close_stream(stream)
        if ended:
            self._wake()  # the ended streams stop waiting

    async def _update(self) -> None:
        try:
            new = await finish_in_thread(self.check, self.db)
        except Exception:
            # logged once per outage, not once a second; streams keep the last fingerprint
            if not self._failing:
                log.exception("console feed: the fleet's fingerprint could not be read")
            self._failing = True
            return
        if self._failing:
            log.info("console feed: the fleet's fingerprint is read again")
            self._failing = False
        if new != self.current:
            self.current = new
            self._wake()

    def _wake(self) -> None:
        # one Event per generation: setting it wakes every waiting stream at once, and the
        # streams that wait next wait on the new one
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_change(
        self, seen: str, timeout_s: float, stream: Stream | None = None
    ) -> str | None:
        """The fingerprint as soon as it is not ``seen`` (at once if it is not already); None
        after ``timeout_s`` without a change, when the feed closes or when ``stream`` ends."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(timeout_s, 0.0)):
                while not self.closed and self.current == seen:
                    if stream is not None and stream.ended:
                        return None
                    await self._changed.wait()
        return None if self.closed or self.current == seen else self.current

    def open_stream(self, owner: str) -> Stream:
        """One more open stream of the session ``owner``; when that session already has
        ``max_per_session``, its oldest ends first.

        Raises:
            FeedFullError: ``max_streams`` are open, or the feed is closed.
        """
        if self.closed:
            raise FeedFullError("the server is stopping")
        mine = self._owners.get(owner, [])
        if len(mine) >= self.max_per_session:
            self.close_stream(mine[0])
            self._wake()  # the ended stream stops waiting
        if self.streams >= self.max_streams:
            raise FeedFullError(f"{self.streams} live streams open, at most {self.max_streams}")
        stream = Stream(owner)
        self._owners.setdefault(owner, []).append(stream)
        self.streams += 1
        return stream

    def close_stream(self, stream: Stream) -> None:
        """Free the place of ``stream`` (nothing happens if it was freed already)."""
        if stream.ended:
            return
        stream.ended = True
        self.streams -= 1
        mine = self._owners[stream.owner]
        mine.remove(stream)
        if not mine:
            del self._owners[stream.owner]


def feed_of(app: FastAPI) -> FleetFeed:
    return cast(FleetFeed, app.state.feed)


def event(name: str, data: str) -> bytes:
    """One Server-Sent Event (``data`` is one line: a fingerprint)."""
    return f"event: {name}\ndata: {data}\n\n".encode()


def clock_pace(server_s: float, real_s: float) -> float:
    """How many seconds of the server's clock pass per real second, measured over ``real_s``
    real seconds (at least 1: a stopped or unknown clock is taken as real time)."""
    if real_s < CLOCK_PROBE_S / 2:
        return 1.0
    return max(1.0, server_s / real_s)


async def stream_events(
    feed: FleetFeed,
    ends: datetime,
    now: Callable[[], datetime],
    stream: Stream | None = None,
) -> AsyncIterator[bytes]:
    """The body of one stream: ``retry`` and ``hello`` (the current fingerprint), then a
    ``change`` event whenever it changes and a keepalive comment when nothing was sent for
    ``feed.keepalive_s``; it ends when the feed closes, when ``stream`` is ended, when
    ``now()`` reaches ``ends`` (the session's end, by the server's clock, however fast that
    runs) or after :data:`STREAM_LIFETIME_S`."""
    seen = feed.current
    yield f"retry: {RETRY_MS}\n\n".encode() + event("hello", seen)
    started = time.monotonic()
    server_started = now()
    quiet_since = started
    while True:
        server_now = now()
        session_left = (ends - server_now).total_seconds()
        since_start = time.monotonic() - started
        ended = stream is not None and stream.ended
        if feed.closed or ended or session_left <= 0 or since_start >= STREAM_LIFETIME_S:
            return
        keepalive_in = quiet_since + feed.keepalive_s - time.monotonic()
        if keepalive_in <= 0:
            yield b": keepalive\n\n"
            quiet_since = time.monotonic()
            continue
        # the session's remaining lifetime is in server-clock seconds: in real seconds it is
        # shorter when the clock runs fast; until its pace is known, look again soon
        pace = clock_pace((server_now - server_started).total_seconds(), since_start)
        session_wait = session_left / pace
        if since_start < CLOCK_PROBE_S:
            session_wait = min(session_wait, CLOCK_PROBE_S - since_start)
        wait_s = min(keepalive_in, session_wait, STREAM_LIFETIME_S - since_start)
        changed = await feed.wait_change(seen, wait_s, stream)
        if changed is not None:
            seen = changed
            yield event("change", changed)
            quiet_since = time.monotonic()


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` answer that holds one of the feed's stream places until it
    ends, however it ends (finished, client gone, server stopping)."""

    media_type = "text/event-stream"

    def __init__(self, feed: FleetFeed, stream: Stream, body: AsyncIterator[bytes]) -> None:
        super().__init__(body, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self.feed = feed
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.feed.close_stream(self.stream)


@router.get("/ui/events")
async def events(request: Request) -> Response:
    """The live stream of the signed-in console: 401 without a session (the page then reloads
    to the sign-in page), 503 when this process serves as many streams as it allows. Opening
    (or reopening) a stream does not count as use of the session."""
    state = server_state(request)
    secret = session_secret(request)
    if secret is None:
        return PlainTextResponse("no console session: sign in", status_code=401)
    try:
        session = await run_in_threadpool(
            partial(sessions.lookup, state.db, secret, state.now(), touch=False)
        )
    except UnauthenticatedError as err:
        return PlainTextResponse(err.detail, status_code=401)
    feed = feed_of(request.app)
    try:
        stream = feed.open_stream(session.key)
    except FeedFullError as err:
        return PlainTextResponse(str(err), status_code=503, headers={"Retry-After": "30"})
    body = stream_events(feed, session.expires, state.now, stream)
    return EventStreamResponse(feed, stream, body)


class StreamClosingServer(uvicorn.Server):
    """uvicorn's server, closing the console's feed as the first step of its shutdown: uvicorn
    waits for open responses to end before the app's own shutdown runs, and an event stream
    would otherwise hold the process until the browser went away."""

    def __init__(self, config: uvicorn.Config, feed: FleetFeed) -> None:
        super().__init__(config)
        self.feed = feed

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.feed.close()
        await super().shutdown(sockets)
