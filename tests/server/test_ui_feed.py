"""The console's live feed (server/ui/feed.py): the fleet's fingerprint, one check per interval
however many streams wait, the event stream's framing and limits, and ``fleet server run``
stopping at once with streams open."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from sqlalchemy import select, update

from server import rollouts
from server.app import create_app
from server.auth import Role, create_operator_token
from server.database import Database
from server.models import Device, FleetControl, OperatorToken, Rollout
from server.settings import utc
from server.ui import sessions
from server.ui.feed import (
    RETRY_MS,
    FeedFullError,
    FleetFeed,
    StreamClosingServer,
    feed_of,
    fingerprint,
)
from server.ui.security import PLAIN_COOKIE
from tests.server.conftest import FakeClock, FakeDevice, Harness, make_settings
from tests.server.test_process import ServerProcess, cli

MakeBundle = Callable[..., Path]
Enrolled = Callable[..., FakeDevice]


# --- the fingerprint ---------------------------------------------------------------------------


def test_the_fingerprint_changes_with_the_fleet_and_only_then(
    harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle
) -> None:
    db = harness.db
    seen = [fingerprint(db)]

    def changed() -> bool:
        new = fingerprint(db)
        result = new != seen[-1]
        seen.append(new)
        return result

    def reads() -> None:
        for path in ("/api/v1/devices", "/api/v1/rollouts", "/api/v1/releases"):
            assert harness.client.get(path, headers=harness.viewer).status_code == 200
        assert harness.client.get("/metrics").status_code == 200
        assert not changed(), "reading the fleet changed its fingerprint"

    device = enrolled()
    assert changed()  # enrolled (audit entry, a device)
    reads()
    harness.clock.advance(120)
    assert device.heartbeat().status_code == 204
    assert changed()
    reads()
    assert device.events(("boot_check.committed", 1)).status_code == 204
    assert changed()
    reads()
    assert device.events(("boot_check.committed", 1)).status_code == 204  # a resend
    assert not changed()
    harness.upload(make_bundle(version="2.0.0"))
    assert changed()
    answer = harness.client.post(
        "/api/v1/rollouts", json={"version": "2.0.0", "soak_s": 60}, headers=harness.operator
    )
    assert answer.status_code == 201, answer.text
    assert changed()
    reads()
    steps = 0
    for _ in range(6):  # heartbeats of the new release until the rollout completes
        harness.clock.advance(120)
        committed = {"a": {"status": "good", "version": "2.0.0"}, "b": {"status": "good"}}
        assert device.heartbeat(version="2.0.0", slots=committed).status_code == 204
        assert changed()
        before = rollout_position(db)
        rollouts.evaluate(db, utc(harness.clock))
        if rollout_position(db) != before:  # a step: promoted, or completed
            assert changed()
            steps += 1
    assert rollout_position(db)[0] == "completed"
    assert steps >= 1
    rollouts.emergency_stop(db, "lab", actor="test", now=utc(harness.clock))
    assert changed()
    reads()
    rollouts.clear_emergency_stop(db, actor="test", now=utc(harness.clock))
    assert changed()
    reads()


def rollout_position(db: Database) -> tuple[str, int]:
    with db.read() as session:
        rollout = session.scalars(select(Rollout)).one()
        return rollout.state, rollout.stage


CHANGES = {
    "stage": (update(Rollout).values(stage=Rollout.stage + 1), True),
    "state": (update(Rollout).values(state="aborted"), True),
    "stop reason": (update(FleetControl).values(reason="another"), True),
    "last seen": (update(Device).values(last_seen=datetime(2030, 1, 1, tzinfo=UTC)), True),
    "same last seen": (update(Device).values(last_seen=Device.last_seen), False),
}


@pytest.mark.parametrize("name", CHANGES)
def test_what_the_fingerprint_sees_without_an_audit_entry(
    harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle, name: str
) -> None:
    enrolled()
    harness.upload(make_bundle(version="2.0.0"))
    answer = harness.client.post(
        "/api/v1/rollouts", json={"version": "2.0.0"}, headers=harness.operator
    )
    assert answer.status_code == 201, answer.text
    rollouts.emergency_stop(harness.db, "lab", actor="test", now=utc(harness.clock))
    before = fingerprint(harness.db)
    statement, visible = CHANGES[name]
    with harness.db.write() as session:
        session.execute(statement)
    assert (fingerprint(harness.db) != before) is visible


# --- the broadcaster ---------------------------------------------------------------------------


class CountingCheck:
    """The fingerprint, counting its calls and changing on demand."""

    def __init__(self) -> None:
        self.calls = 0
        self.value = "one"

    def __call__(self, _db: Database) -> str:
        self.calls += 1
        return self.value


def watch(streams: int, seconds: float, interval_s: float) -> tuple[int, int, int]:
    """``streams`` waiters on a feed checking every ``interval_s``; the fingerprint changes
    halfway. Returns (checks made, waiters woken by the change, ticks in ``seconds``)."""
    check = CountingCheck()
    feed = FleetFeed(None, interval_s=interval_s, check=check)  # type: ignore[arg-type]

    async def run() -> int:
        await feed.start()

        async def waiter() -> bool:
            return await feed.wait_change("one", seconds) == "two"

        waiting = [asyncio.create_task(waiter()) for _ in range(streams)]
        await asyncio.sleep(seconds / 2)
        check.value = "two"
        woken = sum(await asyncio.gather(*waiting))
        await feed.stop()
        return woken

    woken = asyncio.run(run())
    return check.calls, woken, round(seconds / interval_s)


def test_one_check_per_interval_wakes_every_stream() -> None:
    calls_alone, woken, ticks = watch(1, 1.0, 0.05)
    assert woken == 1
    calls_many, woken, _ = watch(500, 1.0, 0.05)
    assert woken == 500  # every stream saw the change
    # about one check per interval (and the first at start), whatever the number of streams
    assert calls_alone <= ticks + 2
    assert calls_many <= ticks + 2


def test_a_closed_feed_ends_every_wait_and_admits_no_stream() -> None:
    feed = FleetFeed(None, interval_s=0.05, check=CountingCheck())  # type: ignore[arg-type]

    async def run() -> list[str | None]:
        await feed.start()
        waiting = [asyncio.create_task(feed.wait_change("one", 30)) for _ in range(10)]
        await asyncio.sleep(0.1)
        feed.close()
        async with asyncio.timeout(1):
            results = await asyncio.gather(*waiting)
        await feed.stop()
        return results

    assert asyncio.run(run()) == [None] * 10
    with pytest.raises(FeedFullError, match="stopping"):
        feed.open_stream("a")


def test_streams_are_bounded() -> None:
    feed = FleetFeed(None, max_streams=2)  # type: ignore[arg-type]
    feed.closed = False
    first = feed.open_stream("a")
    feed.open_stream("b")
    with pytest.raises(FeedFullError, match="2 live streams open, at most 2"):
        feed.open_stream("c")
    feed.close_stream(first)
    feed.close_stream(first)  # once freed, freed
    feed.open_stream("c")
    assert feed.streams == 2


def test_a_session_holds_a_few_streams_and_a_new_one_ends_its_oldest() -> None:
    feed = FleetFeed(None, max_streams=5, max_per_session=2)  # type: ignore[arg-type]
    feed.closed = False
    mine = [feed.open_stream("mine") for _ in range(2)]
    theirs = feed.open_stream("theirs")
    newest = feed.open_stream("mine")  # a reload: the oldest of this session makes room
    assert mine[0].ended and not mine[1].ended and not newest.ended and not theirs.ended
    assert feed.streams == 3
    for _ in range(10):
        feed.open_stream("mine")
    assert feed.streams == 3  # one session never holds more than its share
    feed.open_stream("third")
    feed.open_stream("fourth")
    with pytest.raises(FeedFullError):
        feed.open_stream("fifth")


def test_an_ended_stream_stops_waiting_at_once() -> None:
    feed = FleetFeed(None, interval_s=0.05, max_per_session=1, check=CountingCheck())  # type: ignore[arg-type]

    async def run() -> float:
        await feed.start()
        old = feed.open_stream("mine")
        waiting = asyncio.create_task(feed.wait_change("one", 30, old))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        feed.open_stream("mine")
        async with asyncio.timeout(1):
            assert await waiting is None
        await feed.stop()
        return time.monotonic() - started

    assert asyncio.run(run()) < 0.5


def console_cookie(
    harness_db: Database, clock: FakeClock, role: Role = Role.VIEWER, name: str = "feed-test"
) -> str:
    token = create_operator_token(
        harness_db, name=name, role=role, created_by="test", now=utc(clock)
    )
    secret, _ = sessions.create(harness_db, token, utc(clock))
    return secret


def test_events_need_a_session_and_a_free_place(harness: Harness) -> None:
    client = harness.client
    answer = client.get("/ui/events")
    assert answer.status_code == 401
    assert answer.text == "no console session: sign in"
    client.cookies.set(PLAIN_COOKIE, "fleet_ui_" + "0" * 40)
    answer = client.get("/ui/events")
    assert answer.status_code == 401
    assert "sign in again" in answer.text
    client.cookies.set(PLAIN_COOKIE, console_cookie(harness.db, harness.clock))
    feed_of(harness.app).max_streams = 0
    answer = client.get("/ui/events")
    assert answer.status_code == 503
    assert answer.text == "0 live streams open, at most 0"
    assert answer.headers["retry-after"] == "30"


def test_opening_a_stream_is_not_use_of_the_session(harness: Harness) -> None:
    harness.client.cookies.set(PLAIN_COOKIE, console_cookie(harness.db, harness.clock))
    feed_of(harness.app).max_streams = 0  # admitted by its session, then refused: no stream
    for _ in range(sessions.IDLE_TIMEOUT_S // 300 - 1):
        harness.clock.advance(300)
        assert harness.client.get("/ui/events").status_code == 503
    harness.clock.advance(301)
    answer = harness.client.get("/ui/events")
    assert answer.status_code == 401
    assert "expired" in answer.text


# --- the stream over real HTTP -----------------------------------------------------------------


@dataclass
class Served:
    url: str
    db: Database
    clock: FakeClock
    feed: FleetFeed

    def settle(self) -> str:
        """The fingerprint, once the feed has seen it (its check runs once a second)."""
        deadline = time.monotonic() + 5
        while self.feed.current != fingerprint(self.db):
            assert time.monotonic() < deadline, "the feed did not see the change"
            time.sleep(0.05)
        return self.feed.current

    def streams_become(self, count: int) -> None:
        deadline = time.monotonic() + 5
        # the server learns of a disconnect on its next read of the connection
        while self.feed.streams != count:
            assert time.monotonic() < deadline, f"{self.feed.streams} streams, not {count}"
            time.sleep(0.02)

    def stream(self, secret: str) -> requests.Response:
        answer = requests.get(
            self.url + "/ui/events", cookies={PLAIN_COOKIE: secret}, stream=True, timeout=5
        )
        assert answer.status_code == 200, answer.text
        return answer


@pytest.fixture
def served(
    tmp_path: Path, keyring_dir: Path, database_url: str | None, clock: FakeClock
) -> Iterator[Served]:
    """The app with its lifespan (so its feed runs) behind uvicorn in a thread."""
    import uvicorn

    app = create_app(make_settings(tmp_path, keyring_dir, database_url, clock))
    feed = feed_of(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = StreamClosingServer(uvicorn.Config(app, log_level="warning"), feed)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", feed.db, clock, feed)
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "the server did not stop"
        sock.close()
        feed.db.dispose()


def blocks(answer: requests.Response) -> Iterator[dict[str, str]]:
    """The stream's blocks (up to a blank line): field -> value; comments under ":"."""
    block: dict[str, str] = {}
    for line in answer.iter_lines(decode_unicode=True):
        if not line:
            yield block
            block = {}
            continue
        name, _, value = line.partition(":")
        block[name] = value.removeprefix(" ")
    assert not block, f"the stream ended inside a block: {block}"


def test_the_stream_says_hello_then_each_change(served: Served) -> None:
    secret = console_cookie(served.db, served.clock)  # signing in is audited: a change
    served.settle()
    answer = served.stream(secret)
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.headers["cache-control"] == "no-store"
    events = blocks(answer)
    assert next(events) == {"retry": str(RETRY_MS)}
    hello = next(events)
    assert hello == {"event": "hello", "data": fingerprint(served.db)}
    for action in ("stop", "clear"):
        if action == "stop":
            rollouts.emergency_stop(served.db, "lab", actor="test", now=utc(served.clock))
        else:
            rollouts.clear_emergency_stop(served.db, actor="test", now=utc(served.clock))
        changed_at = time.monotonic()
        change = next(events)
        assert time.monotonic() - changed_at < 2.0
        assert change == {"event": "change", "data": fingerprint(served.db)}
    answer.close()


def test_a_quiet_stream_keeps_alive_and_ends_with_its_session(served: Served) -> None:
    served.feed.keepalive_s = 0.2
    secret = console_cookie(served.db, served.clock)
    served.settle()
    answer = served.stream(secret)
    events = blocks(answer)
    assert next(events)["retry"] == str(RETRY_MS)
    assert next(events)["event"] == "hello"
    assert next(events) == {"": "keepalive"}
    assert next(events) == {"": "keepalive"}
    served.clock.advance(sessions.IDLE_TIMEOUT_S + 1)
    ended_at = time.monotonic()
    rest = list(events)
    assert time.monotonic() - ended_at < 2.0
    assert all(block == {"": "keepalive"} for block in rest)
    served.streams_become(0)
    # the browser's reconnection is refused: the session ended
    again = requests.get(
        served.url + "/ui/events", cookies={PLAIN_COOKIE: "x"}, stream=True, timeout=5
    )
    assert again.status_code == 401


def test_a_stream_ends_when_its_session_ends_elsewhere(served: Served) -> None:
    """Signed out through another process or its operator token revoked: the session ends
    without this process hearing of it; the feed's periodic check of its streams' sessions
    ends the stream within a keepalive period."""
    served.feed.keepalive_s = 0.2
    kept = console_cookie(served.db, served.clock)
    revoked = console_cookie(served.db, served.clock, name="feed-revoked")
    served.settle()  # the tokens' audit entries are seen: no change event follows the hello
    kept_events, revoked_events = blocks(served.stream(kept)), blocks(served.stream(revoked))
    for events in (kept_events, revoked_events):
        assert next(events)["retry"] == str(RETRY_MS)
        assert next(events)["event"] == "hello"
    served.streams_become(2)
    with served.db.write() as session:
        session.execute(
            update(OperatorToken)
            .where(OperatorToken.name == "feed-revoked")
            .values(revoked=utc(served.clock))
        )
    deadline = time.monotonic() + 3.0
    for block in revoked_events:  # keepalives every 0.2 s until the stream ends
        assert block == {"": "keepalive"}
        assert time.monotonic() < deadline, "the revoked session's stream goes on"
    served.streams_become(1)
    assert next(kept_events) == {"": "keepalive"}  # the live session's stream goes on


def test_signing_out_ends_the_sessions_streams_at_once(served: Served) -> None:
    secret = console_cookie(served.db, served.clock)
    served.settle()
    events = blocks(served.stream(secret))
    assert next(events)["retry"] == str(RETRY_MS)
    served.streams_become(1)
    csrf = sessions.lookup(served.db, secret, utc(served.clock), touch=False).csrf
    out = requests.post(
        served.url + "/ui/logout",
        data={"csrf": csrf},
        cookies={PLAIN_COOKIE: secret},
        allow_redirects=False,
        timeout=5,
    )
    assert out.status_code == 303, out.text
    ended_at = time.monotonic()
    assert all(block.get("event") != "change" for block in events)
    assert time.monotonic() - ended_at < 1.0  # not after a keepalive period (15 s)
    served.streams_become(0)


def test_a_stream_that_goes_away_frees_its_place(served: Served) -> None:
    secret = console_cookie(served.db, served.clock)

    for _ in range(3):
        answers = [served.stream(secret) for _ in range(2)]
        readers = [blocks(answer) for answer in answers]  # closing a reader closes its stream
        for reader in readers:
            assert next(reader) == {"retry": str(RETRY_MS)}
        served.streams_become(2)
        for answer in answers:
            answer.close()
        served.streams_become(0)


def test_a_fifth_stream_of_a_session_ends_its_oldest(served: Served) -> None:
    served.feed.max_per_session = 4
    secret = console_cookie(served.db, served.clock)
    served.settle()  # the session's own rows seen: no change event races the ending
    answers = [served.stream(secret) for _ in range(4)]
    readers = [blocks(answer) for answer in answers]
    for reader in readers:
        assert next(reader) == {"retry": str(RETRY_MS)}
        assert next(reader)["event"] == "hello"
    served.streams_become(4)
    newest = served.stream(secret)
    ended_at = time.monotonic()
    assert list(readers[0]) == []  # the oldest ended, cleanly
    assert time.monotonic() - ended_at < 2.0
    served.streams_become(4)
    newest.close()
    for answer in answers:
        answer.close()
    served.streams_become(0)


def test_a_stream_ends_with_its_session_on_a_fast_clock(served: Served) -> None:
    """Under ``--time-scale`` the server's clock runs faster than real time: the session's
    end, in server seconds, comes sooner in real ones."""
    secret = console_cookie(served.db, served.clock)
    served.settle()
    answer = served.stream(secret)
    events = blocks(answer)
    assert next(events)["retry"] == str(RETRY_MS)
    assert next(events)["event"] == "hello"
    running = threading.Event()
    running.set()

    def run_fast() -> None:  # 600 server seconds a real second
        while running.is_set():
            time.sleep(0.05)
            served.clock.advance(30)

    fast = threading.Thread(target=run_fast, daemon=True)
    fast.start()
    started = time.monotonic()
    try:
        rest = list(events)  # a read would time out (5 s) if the stream waited for keepalive
    finally:
        running.clear()
        fast.join()
    assert all(block == {"": "keepalive"} for block in rest)
    # the session ends 1800 server seconds after signing in: about 3 real seconds here
    assert time.monotonic() - started < sessions.IDLE_TIMEOUT_S / 600 + 1.5
    served.streams_become(0)


# --- fleet server run -------------------------------------------------------------------------


@pytest.fixture
def server_run(
    tmp_path: Path, keyring_dir: Path, database_url: str | None
) -> Iterator[tuple[ServerProcess, list[str]]]:
    """``fleet server run`` in a child process (not yet started), and its database options."""
    data_dir = tmp_path / "data"
    shutil.copytree(keyring_dir, data_dir / "keyring")
    db_args = ["--data-dir", str(data_dir)]
    if database_url is not None:
        db_args += ["--database-url", database_url]
    process = ServerProcess(["server", "run", "--log-format", "text", *db_args],
                            tmp_path / "server.log")  # fmt: skip
    try:
        yield process, db_args
    finally:
        process.stop()


def test_the_server_stops_at_once_with_streams_open(
    server_run: tuple[ServerProcess, list[str]],
) -> None:
    process, db_args = server_run
    token = cli("server", "token", "create", "--role", "viewer", "--name", "ci", *db_args)
    process.start()
    browser = requests.Session()
    signed_in = browser.post(
        process.url + "/ui/login", data={"token": token, "next": "/ui/"}, allow_redirects=False
    )
    assert signed_in.status_code == 303, signed_in.text
    streams = [browser.get(process.url + "/ui/events", stream=True, timeout=10) for _ in range(3)]
    readers = [blocks(answer) for answer in streams]
    for answer, reader in zip(streams, readers, strict=True):
        assert answer.status_code == 200, answer.text
        assert next(reader) == {"retry": str(RETRY_MS)}
        assert next(reader)["event"] == "hello"
    assert process.process is not None
    stopped_at = time.monotonic()
    process.process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then ends by the signal it caught (as systemd expects)
    assert process.process.wait(10) == -signal.SIGTERM
    assert time.monotonic() - stopped_at < 2.5, process.log.read_text()
    log = process.log.read_text()
    assert "Application shutdown complete" in log, log
    assert "Waiting for connections to close" not in log, log
    for reader in readers:
        rest = list(reader)  # each stream ended, cleanly between two blocks
        assert all(block.get("event") in (None, "change") for block in rest)
