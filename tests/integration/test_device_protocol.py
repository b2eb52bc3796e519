"""The device's protocol client and daemon against the real release server.

The server is ``server.app.create_app`` on SQLite, served by uvicorn on 127.0.0.1 in a thread of
this process; operators' steps (enrollment tokens, uploads, assignments, pre-authorized keys)
go through its API with the operator client. Between the device and the server sits
:class:`Wire`, an ASGI layer that records every exchange and, when a test asks, does what a
proxy on the path can do: add a header the device did not send, answer with a response it
recorded earlier, drop a request, or let the server handle one and lose its answer. Everything
else is the server's own behaviour: sessions that expire on its clock, single-use challenges,
ETags and ``304``, signed answers echoing the nonce, events stored once by ``seq``.

Faults the server cannot be made to produce stay with ``tests/server_simulator.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn
from fastapi import FastAPI

import chaos.lab_firmwares  # noqa: F401 (fills LAB_FIRMWARES)
from bootloader_hooks.base import BootCause, BootEvent
from chaos.lab_image import make_lab_image
from chaos.virtual_device import BootRecord, PowerCut, VirtualDevice
from fleet_core import durable
from server.app import create_app
from server.auth import Role, create_operator_token
from server.client import ApiClient, ClientConfig
from server.settings import SESSION_TTL_S, utc
from signing.keyring import Keyring, trust_key
from signing.keys import SigningKey, generate_key, public_key_pem
from tests.chaos.conftest import COMPATIBLE, Releases, provision_template
from tests.server.conftest import FakeClock, make_settings
from tests.server_simulator import FakeClock as Clock  # the device's monotonic clock
from updater.client import (
    AnswerRejectedError,
    NotEnrolledError,
    ServerClient,
    ServerError,
    ServerRejectedError,
    ServerUnavailableError,
)
from updater.daemon import DECOMMISSIONED_RETRY_S, Daemon
from updater.history import MAX_INTERRUPTED, ReleaseHistoryStore
from updater.identity import DeviceIdentity, load_or_create_identity
from updater.log import EventLog
from updater.state import SlotState

NONCE = "ab" * 16
API = "/api/v1"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# --- the wire between the device and the server ---------------------------------------------


@dataclass
class Exchange:
    """One request as it reached the wire, and the server's answer to it (``status`` None:
    the server never saw the request)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int | None = None
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    response_body: bytes = b""
    delivered: bool = True  # whether the server's answer reached the device

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def response_json(self) -> Any:
        return json.loads(self.response_body)


class Wire:
    """An ASGI layer in front of the server application: records every exchange and applies
    the test's tampering (each hook is given the exchange, headers lower-cased, and may change
    its headers before the server sees them)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.exchanges: list[Exchange] = []
        self.reset()

    def reset(self) -> None:
        self.exchanges.clear()
        # change the request's headers on the way in
        self.rewrite: Callable[[Exchange], None] | None = None
        # answer with this earlier exchange's response instead of asking the server
        self.replay: Callable[[Exchange], Exchange | None] | None = None
        # answer 503 without asking the server (the proxy's upstream is down)
        self.drop: Callable[[Exchange], bool] | None = None
        # let the server handle the request, then answer 504 instead (the answer was lost)
        self.lose: Callable[[Exchange], bool] | None = None

    def device_calls(self, suffix: str) -> list[Exchange]:
        """The device API requests whose path ends with ``suffix``."""
        return [
            e for e in self.exchanges
            if e.path.startswith(f"{API}/devices/") and e.path.endswith(suffix)
        ]  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        exchange = Exchange(scope["method"], scope["path"], headers, body)
        self.exchanges.append(exchange)
        if self.rewrite is not None:
            self.rewrite(exchange)
        earlier = self.replay(exchange) if self.replay is not None else None
        if earlier is not None:
            assert earlier.status is not None
            await _answer(send, earlier.status, earlier.response_headers, earlier.response_body)
            return
        if self.drop is not None and self.drop(exchange):
            exchange.delivered = False
            await _answer(send, 503, [(b"content-type", b"text/plain")], b"upstream down")
            return
        lose = self.lose is not None and self.lose(exchange)
        scope = {
            **scope,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
        }
        given = False

        async def receive_body() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def keep(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                exchange.response_headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                exchange.response_body += message.get("body", b"")
            if not lose:
                await send(message)

        await self.app(scope, receive_body, keep)
        if lose:
            exchange.delivered = False
            await _answer(send, 504, [(b"content-type", b"text/plain")], b"upstream timed out")


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"date")]
    kept.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": kept})
    await send({"type": "http.response.body", "body": body})


# --- the real server ------------------------------------------------------------------------


class _Uvicorn(uvicorn.Server):
    """uvicorn, telling the test when it has started serving."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.serving = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            self.serving.set()


@dataclass
class RealServer:
    """The release server on loopback, its clock, the wire in front of it, and an operator."""

    url: str
    app: FastAPI
    clock: FakeClock
    wire: Wire
    operator: ApiClient
    releases: Releases
    uploaded: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def server_key(self) -> SigningKey:
        key: SigningKey = self.app.state.fleet.server_key
        return key

    @property
    def keyring(self) -> Keyring:
        """The devices' keyring: the server's answer-signing key."""
        return Keyring({self.server_key.key_id: self.server_key.public_key})

    def enrollment_token(self, uses: int = 1) -> str:
        answer = self.operator.post(f"{API}/enrollment-tokens", {"uses": uses, "expires_in": None})
        token: str = answer["token"]
        return token

    def preauthorize(self, public_key_hex: str) -> None:
        self.operator.post(f"{API}/preauthorized-keys", {"public_key": public_key_hex})

    def release(self, version: str, behaviour: str = "healthy", **options: Any) -> dict[str, Any]:
        """Upload the lab release ``version`` (once per server) and return the server's view."""
        name = f"{version}-{behaviour}-{sorted(options.items())}"
        if name not in self.uploaded:
            bundle = self.releases.bundle(version, behaviour, **options)
            self.uploaded[name] = self.operator.upload(f"{API}/releases", bundle, lambda n: None)
        return self.uploaded[name]

    def assign(self, device_id: str, version: str | None) -> None:
        self.operator.post(f"{API}/devices/{device_id}/assignment", {"version": version})

    def device(self, device_id: str) -> dict[str, Any]:
        view: dict[str, Any] = self.operator.get(f"{API}/devices/{device_id}")
        return view

    def events(self, device_id: str) -> list[dict[str, Any]]:
        """The device's events the server stored, in order: ``{"event", "seq", "fields"}``."""
        entries: list[dict[str, Any]] = []
        after: int | None = 0
        while after is not None:
            page = self.operator.get(f"{API}/audit", params={"after": after, "limit": 1000})
            entries += page["entries"]
            after = page["next_after"]
        return [
            {"event": e["action"], **e["details"]}
            for e in entries
            if e["actor"] == f"device:{device_id}" and set(e["details"]) == {"seq", "fields"}
        ]


@pytest.fixture(scope="module")
def real_server(
    tmp_path_factory: pytest.TempPathFactory, releases: Releases
) -> Iterator[RealServer]:
    root = tmp_path_factory.mktemp("server")
    keyring_dir = root / "release-keyring"
    trust_key(keyring_dir, releases.directory / "release-key.pub")
    clock = FakeClock()
    app = create_app(make_settings(root, keyring_dir, None, clock), rollout_interval_s=None)
    wire = Wire(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound before uvicorn is given it: no other process can take it
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = _Uvicorn(uvicorn.Config(wire, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert server.serving.wait(timeout=15), "uvicorn did not start serving"
        token = create_operator_token(
            app.state.fleet.db, name="protocol-tests", role=Role.ADMIN, created_by="test",
            now=utc(clock),
        )  # fmt: skip
        yield RealServer(url, app, clock, wire, ApiClient(ClientConfig(url, token)), releases)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture
def real(real_server: RealServer) -> Iterator[RealServer]:
    """The module's server with a clean wire (each test makes devices of its own)."""
    real_server.wire.reset()
    yield real_server
    real_server.wire.reset()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def identity(tmp_path: Path) -> DeviceIdentity:
    return load_or_create_identity(tmp_path / "device")[0]


def client_for(
    real: RealServer, identity: DeviceIdentity, clock: Clock, **options: Any
) -> ServerClient:
    options.setdefault("timeout_s", 5.0)
    options.setdefault("rng", lambda: 1.0)
    keyring = options.pop("keyring", real.keyring)
    return ServerClient([real.url], identity.key, keyring, clock=clock, **options)


def enrolled(
    real: RealServer, identity: DeviceIdentity, clock: Clock, **options: Any
) -> ServerClient:
    client = client_for(real, identity, clock, **options)
    client.enroll(compatible=COMPATIBLE, hostname="cam-0042", token=real.enrollment_token())
    return client


HEARTBEAT = {
    "version": "1.0.0", "booted": "a", "primary": "a", "trial": False,
    "slots": {"a": {"status": "good", "version": "1.0.0"},
              "b": {"status": "empty", "version": None}},
    "updater_state": "idle", "health": [{"name": "lab:release", "ok": True}],
    "temperature_c": 48.5, "free_space_mb": 100, "uptime_s": 5.0, "clock": 1.7e9,
    "clock_skew_s": None, "safe_mode": False,
}  # fmt: skip


# --- enrollment and sessions ----------------------------------------------------------------


def test_enrollment_with_a_token_is_harmless_to_repeat(
    real: RealServer, clock: Clock, tmp_path: Path
) -> None:
    token = real.enrollment_token(uses=1)
    identity = load_or_create_identity(tmp_path / "one")[0]
    client = client_for(real, identity, clock)
    result = client.enroll(compatible=COMPATIBLE, hostname="cam-1", token=token)
    assert result.device_id == identity.device_id and result.server_url == real.url
    assert result.server_keys == (real.server_key.public_key.public_bytes_raw().hex(),)
    view = real.device(identity.device_id)
    assert (view["hostname"], view["compatible"]) == ("cam-1", COMPATIBLE)
    # the token is used up, but enrolling the same key again costs nothing
    client.enroll(compatible=COMPATIBLE, hostname="cam-1", token=token)
    other = load_or_create_identity(tmp_path / "two")[0]
    with pytest.raises(NotEnrolledError, match="not_authorized"):
        client_for(real, other, clock).enroll(compatible=COMPATIBLE, hostname="cam-2", token=token)
    with pytest.raises(NotEnrolledError):
        client_for(real, other, clock).checkin()  # the server does not know it


def test_a_preauthorized_key_needs_no_token_and_others_are_refused(
    real: RealServer, clock: Clock, tmp_path: Path
) -> None:
    stranger = load_or_create_identity(tmp_path / "stranger")[0]
    with pytest.raises(NotEnrolledError, match="403 not_authorized"):
        client_for(real, stranger, clock).enroll(compatible=COMPATIBLE, hostname="x", token=None)
    identity = load_or_create_identity(tmp_path / "known")[0]
    real.preauthorize(identity.public_key_hex)
    client_for(real, identity, clock).enroll(compatible=COMPATIBLE, hostname="x", token=None)
    assert real.device(identity.device_id)["id"] == identity.device_id
    [_, sent] = real.wire.device_calls("/enroll")
    assert sent.status == 200 and "enrollment_token" not in sent.json()


def test_a_session_is_a_signed_single_use_challenge(
    real: RealServer, identity: DeviceIdentity, clock: Clock
) -> None:
    client = enrolled(real, identity, clock)
    client.heartbeat(HEARTBEAT)
    client.heartbeat(HEARTBEAT)
    [challenge] = real.wire.device_calls("/challenge")
    [session] = real.wire.device_calls("/session")
    heartbeats = real.wire.device_calls("/heartbeat")
    assert session.status == 200 and [h.status for h in heartbeats] == [204, 204]
    assert session.json()["challenge"] == challenge.response_json["challenge"]
    token = session.response_json["token"]
    assert all(h.headers["authorization"] == f"Bearer {token}" for h in heartbeats)
    # the server takes a challenge once: the same signed answer opens no second session
    again = requests.post(real.url + session.path, data=session.body, timeout=5)
    assert again.status_code in (401, 403), again.text


def test_a_401_gets_a_new_session_and_the_request_goes_through(
    real: RealServer, identity: DeviceIdentity, clock: Clock
) -> None:
    client = enrolled(real, identity, clock)
    client.checkin()
    real.clock.advance(SESSION_TTL_S + 1)  # the server expires the session; the device's
    client.checkin()  # clock has not moved, so it still thinks it valid
    assert len(real.wire.device_calls("/session")) == 2
    assert [e.status for e in real.wire.device_calls("/checkin")] == [200, 401, 304]
    assert client.failures == 0


def test_a_session_is_renewed_before_the_server_would_expire_it(
    real: RealServer, identity: DeviceIdentity, clock: Clock
) -> None:
    client = enrolled(real, identity, clock)
    client.checkin()
    for step in (SESSION_TTL_S - 31, 2):
        clock.now += step
        real.clock.advance(step)
        client.checkin()
    assert len(real.wire.device_calls("/session")) == 2
    assert 401 not in [e.status for e in real.wire.device_calls("/checkin")]


# --- check-in answers -----------------------------------------------------------------------


def test_checkin_returns_the_verified_assignment_and_where_its_blobs_are(
    real: RealServer, identity: DeviceIdentity, clock: Clock
) -> None:
    client = enrolled(real, identity, clock, mirrors=["https://cdn.example/fleet/"])
    assert client.checkin().answer.assignment is None
    release = real.release("2.0.0")
    real.assign(identity.device_id, "2.0.0")
    result = client.checkin(NONCE)
    assignment = result.answer.assignment
    assert assignment is not None and not result.unchanged
    assert (assignment.release_id, assignment.version) == (release["id"], "2.0.0")
    assert assignment.manifest_sha256 == release["manifest_sha256"]
    assert result.answer.nonce == NONCE and result.server_url == real.url
    assert json.loads(real.wire.device_calls("/checkin")[-1].response_json["answer"])["nonce"] == (
        NONCE
    )
    [image] = release["images"]
    # the image, then its chunk index (bundle format 2), each a blob named by its SHA-256
    blob, index = assignment.blobs
    assert (blob.sha256, blob.size, blob.slot_class) == (image["sha256"], image["size"], "rootfs")
    assert (index.sha256, index.size) == (
        image["chunk_index"]["sha256"], image["chunk_index"]["size"],
    )  # fmt: skip
    urls = client.blob_urls(assignment, result.server_url)
    assert urls == {
        sha: [f"{real.url}/blobs/{sha}", f"https://cdn.example/fleet/blobs/{sha}"]
        for sha in (blob.sha256, index.sha256)
    }
    for sha in urls:
        fetched = requests.get(urls[sha][0], timeout=5)
        assert hashlib.sha256(fetched.content).hexdigest() == sha


def test_an_unchanged_assignment_is_a_304_and_the_verified_answer_stays(
    real: RealServer, identity: DeviceIdentity, clock: Clock
) -> None:
    client = enrolled(real, identity, clock, answer_refresh_s=600)
    real.release("2.0.0")
    real.assign(identity.device_id, "2.0.0")
    first = client.checkin()
    second = client.checkin()
    assert second.unchanged and second.answer == first.answer
    checkins = real.wire.device_calls("/checkin")
    assert [e.headers.get("if-none-match") for e in checkins] == [None, f'"{first.answer.etag}"']
    assert [e.status for e in checkins] == [200, 304]
    real.release("2.1.0")
    real.assign(identity.device_id, "2.1.0")
    third = client.checkin()
    assert not third.unchanged and third.answer.assignment is not None
    assert third.answer.assignment.version == "2.1.0" and third.answer.etag != first.answer.etag
    assert real.wire.device_calls("/checkin")[-1].status == 200
    # past the refresh age a full signed answer is asked for, even if nothing changed
    clock.now += 601
    assert not client.checkin().unchanged
    last = real.wire.device_calls("/checkin")[-1]
    assert "if-none-match" not in last.headers and last.status == 200


def test_a_304_the_device_did_not_ask_for_is_refused(
    real: RealServer, identity: DeviceIdentity, clock: Clock
) -> None:
    """A ``304`` carries no signature: a device accepts one only as the answer to its own
    ``If-None-Match``. Here a proxy on the path adds the device's ETag to requests that did not
    carry it, and the real server answers ``304`` to them."""
    log = EventLog(io.StringIO(), keep=True)
    client = enrolled(real, identity, clock, answer_refresh_s=600, log=log)
    real.release("2.0.0")
    real.assign(identity.device_id, "2.0.0")
    good = client.checkin()
    etag = f'"{good.answer.etag}"'

    def add_etag(exchange: Exchange) -> None:
        if exchange.path.endswith("/checkin"):
            exchange.headers.setdefault("if-none-match", etag)

    real.wire.rewrite = add_etag
    # past the refresh age the device asks for a full answer, without If-None-Match
    clock.now += 601
    with pytest.raises(AnswerRejectedError, match="304 for a request without If-None-Match"):
        client.checkin()
    unasked = real.wire.device_calls("/checkin")[-1]
    assert unasked.status == 304 and unasked.headers["if-none-match"] == etag
    assert client.failures == 1 and client.last_answer == good.answer
    assert [e["event"] for e in log.events][-1] == "server.answer_rejected"
    # a restarted daemon has no verified answer at all: a 304 cannot stand for one
    fresh = client_for(real, identity, clock, answer_refresh_s=600)
    with pytest.raises(AnswerRejectedError, match="304 for a request without If-None-Match"):
        fresh.checkin()
    assert real.wire.device_calls("/checkin")[-1].status == 304
    assert fresh.last_answer is None
    # without the proxy, both get the full signed answer
    real.wire.rewrite = None
    for device in (client, fresh):
        result = device.checkin()
        assert not result.unchanged and result.answer.etag == good.answer.etag


def test_a_replayed_answer_is_ignored(
    real: RealServer, identity: DeviceIdentity, clock: Clock
) -> None:
    """A genuine answer, signed by the server, given again for a later check-in (a replaying
    proxy or cache) is refused: it does not echo that check-in's nonce."""
    log = EventLog(io.StringIO(), keep=True)
    client = enrolled(real, identity, clock, log=log)
    real.release("2.0.0")
    real.assign(identity.device_id, "2.0.0")
    good = client.checkin()
    [recorded] = [e for e in real.wire.device_calls("/checkin") if e.status == 200]
    real.release("2.1.0")
    real.assign(identity.device_id, "2.1.0")  # the server's answer has changed since
    real.wire.replay = lambda e: recorded if e.path.endswith("/checkin") else None
    with pytest.raises(AnswerRejectedError, match="does not echo this check-in's nonce"):
        client.checkin()
    assert client.last_answer == good.answer
    assert client.failures == 1  # an answer that cannot be used is no answer
    assert [e["event"] for e in log.events] == ["server.session_opened", "server.answer_rejected"]
    real.wire.replay = None
    current = client.checkin().answer.assignment
    assert current is not None and current.version == "2.1.0"


def test_an_answer_for_another_device_is_ignored(
    real: RealServer, identity: DeviceIdentity, clock: Clock, tmp_path: Path
) -> None:
    """Another device's genuine answer, with this device's nonce even, is not this device's."""
    other_identity = load_or_create_identity(tmp_path / "other")[0]
    other = enrolled(real, other_identity, clock)
    real.release("2.0.0")
    real.assign(other_identity.device_id, "2.0.0")
    other.checkin(NONCE)
    [recorded] = [e for e in real.wire.device_calls("/checkin") if e.status == 200]
    client = enrolled(real, identity, clock)
    real.wire.replay = lambda e: recorded if e.path.endswith("/checkin") else None
    with pytest.raises(AnswerRejectedError, match=f"is for device {other_identity.device_id[:16]}"):
        client.checkin(NONCE)
    assert client.last_answer is None and client.failures == 1


def test_an_enrollment_answer_for_another_device_is_no_answer(
    real: RealServer, identity: DeviceIdentity, clock: Clock, tmp_path: Path
) -> None:
    other = load_or_create_identity(tmp_path / "other")[0]
    enrolled(real, other, clock)
    [recorded] = real.wire.device_calls("/enroll")
    client = client_for(real, identity, clock)
    real.wire.replay = lambda e: recorded if e.path.endswith("/enroll") else None
    with pytest.raises(ServerUnavailableError, match="enrollment answered for device"):
        client.enroll(compatible=COMPATIBLE, hostname="x", token=real.enrollment_token())
    assert client.failures == 1


def test_without_a_server_keyring_there_is_no_checkin(
    real: RealServer, identity: DeviceIdentity, clock: Clock
) -> None:
    client = enrolled(real, identity, clock, keyring=None)
    with pytest.raises(ServerError, match="no server keyring"):
        client.checkin()
    assert not real.wire.device_calls("/checkin")


def test_an_answer_signed_by_a_key_the_device_does_not_trust_is_ignored(
    real: RealServer, identity: DeviceIdentity, clock: Clock, tmp_path: Path
) -> None:
    stranger = generate_key(tmp_path / "another-server")
    client = enrolled(
        real, identity, clock, keyring=Keyring({stranger.key_id: stranger.public_key})
    )
    with pytest.raises(AnswerRejectedError, match="not trusted"):
        client.checkin()
    assert client.last_answer is None and real.wire.device_calls("/checkin")[-1].status == 200


# --- heartbeats and events ------------------------------------------------------------------


def test_a_heartbeat_is_kept_as_the_device_s_latest(
    real: RealServer, identity: DeviceIdentity, clock: Clock
) -> None:
    client = enrolled(real, identity, clock)
    client.heartbeat(HEARTBEAT)
    client.heartbeat({**HEARTBEAT, "updater_state": "downloading", "temperature_c": 61.0})
    view = real.device(identity.device_id)
    assert (view["state"], view["version"]) == ("downloading", "1.0.0")
    latest = view["last_heartbeat"]
    assert (latest["temperature_c"], latest["health"]) == (61.0, HEARTBEAT["health"])
    # a field the protocol does not know is refused: an answer, not silence
    with pytest.raises(ServerRejectedError, match="HTTP 422") as caught:
        client.heartbeat({**HEARTBEAT, "surprise": 1})
    assert (caught.value.status, caught.value.code) == (422, "invalid_request")
    assert client.failures == 0


def test_a_resent_event_batch_is_stored_once(
    real: RealServer, identity: DeviceIdentity, clock: Clock
) -> None:
    client = enrolled(real, identity, clock)
    with pytest.raises(ValueError, match="more events than fit"):
        client.send_events([{"event": "a.b", "seq": i, "fields": {}} for i in range(101)])
    with pytest.raises(ValueError, match="more than a device may send"):
        client.heartbeat({**HEARTBEAT, "health": [{"name": "x" * 100, "ok": True}] * 1000})
    batch = [{"event": "install.started", "seq": 7, "fields": {"k": 1}},
             {"event": "install.verified", "seq": 8, "fields": {"k": 2}}]  # fmt: skip
    # the server stores the batch, but its answer is lost on the way: the device cannot know
    real.wire.lose = lambda e: e.path.endswith("/events")
    with pytest.raises(ServerUnavailableError, match="HTTP 504"):
        client.send_events(batch)
    real.wire.lose = None
    client.send_events(batch)  # so it sends the batch again
    client.send_events([{"event": "install.started", "seq": 7, "fields": {"k": 3}}])
    assert real.events(identity.device_id) == [
        {"event": "install.started", "seq": 7, "fields": {"k": 1}},
        {"event": "install.verified", "seq": 8, "fields": {"k": 2}},
    ]
    assert [e.status for e in real.wire.device_calls("/events")] == [204, 204, 204]


# --- the daemon on a virtual device ---------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, releases: Releases) -> Path:
    """A provisioned GRUB device running 1.0.0 from slot a: copied, never used."""
    return provision_template(tmp_path_factory.mktemp("template"), "grub", releases)


class Lab:
    """One virtual device whose daemon talks to the real server; one fake clock for the
    device (the server keeps its own)."""

    def __init__(self, root: Path, real: RealServer, token: str) -> None:
        self.real = real
        self.clock = Clock()
        keyring = root / "server-keyring"
        (root / "server.pub").write_bytes(public_key_pem(real.server_key.public_key))
        trust_key(keyring, root / "server.pub")
        self.device = VirtualDevice(root, "grub")
        self.device.config = dataclasses.replace(
            self.device.config, server_urls=(real.url,), server_keyring=keyring,
            enrollment_token=token,
        )  # fmt: skip
        self.identity = load_or_create_identity(self.device.config.data_dir)[0]
        self.device_id = self.identity.device_id

    def daemon(self) -> Daemon:
        config = self.device.config
        assert config.server_keyring is not None
        client = ServerClient(
            config.server_urls, self.identity.key, Keyring.load(config.server_keyring),
            clock=self.clock, rng=lambda: 0.5, timeout_s=5.0,
        )  # fmt: skip
        return Daemon(
            self.device.runtime(), client, self.clock, self.clock.sleep, lambda: 0.5,
            hostname="lab-device", wall_clock=lambda: 1.7e9,
        )  # fmt: skip

    def reboot(self) -> list[BootRecord]:
        assert self.device.pending_reboot is not None, "no reboot was asked for"
        return self.device.settle(BootEvent(BootCause.REBOOT, tuple(self.device.pending_reboot)))

    def assign(self, release: dict[str, Any] | None) -> None:
        """Assign ``release``; a device the server does not know yet enrolls first, with its
        own key and token, as its daemon would."""
        known = [e for e in self.real.wire.device_calls("/enroll") if e.status == 200]
        if not any(e.json()["public_key"] == self.identity.public_key_hex for e in known):
            self.daemon().client.enroll(
                compatible=COMPATIBLE,
                hostname="lab-device",
                token=self.device.config.enrollment_token,
            )
        self.real.assign(self.device_id, release["version"] if release is not None else None)

    def server_events(self) -> list[dict[str, Any]]:
        return self.real.events(self.device_id)

    def heartbeats(self) -> list[dict[str, Any]]:
        """Every heartbeat the server took from this device, in order (as sent)."""
        return [
            e.json() for e in self.real.wire.device_calls(f"{self.device_id}/heartbeat")
            if e.status == 204 and e.delivered
        ]  # fmt: skip

    def downloads(self) -> int:
        return len([e for e in self.real.wire.exchanges if e.path.startswith("/blobs/")])

    def slot(self, name: str) -> SlotState:
        return self.device.state().slot(name)

    def names(self) -> list[str]:
        return [e["event"] for e in self.server_events()]

    def heartbeat(self) -> dict[str, Any]:
        latest: dict[str, Any] = self.real.device(self.device_id)["last_heartbeat"]
        return latest

    def local(self, name: str) -> list[dict[str, Any]]:
        return self.device.events(name)


@pytest.fixture
def lab(tmp_path: Path, template: Path, real: RealServer) -> Lab:
    root = tmp_path / "lab"
    shutil.copytree(template, root)
    return Lab(root, real, real.enrollment_token())


def test_an_assignment_is_installed_end_to_end(lab: Lab) -> None:
    release = lab.real.release("2.0.0")
    daemon = lab.daemon()
    daemon.run_once()  # enrolls; nothing assigned yet
    assert daemon.last_error is None
    assert lab.real.device(lab.device_id)["hostname"] == "lab-device"
    lab.real.assign(lab.device_id, "2.0.0")
    lab.clock.now += 61
    daemon.run_once()
    assert daemon.last_error is None
    # installed into slot b, armed, and the reboot asked for
    assert lab.device.pending_reboot is not None
    slot = lab.device.state().slot("b")
    assert (slot.status, slot.bundle_sha256) == ("trial", release["manifest_sha256"])
    [image] = release["images"]
    blobs = [e for e in lab.real.wire.exchanges if e.path == f"/blobs/{image['sha256']}"]
    assert blobs and blobs[0].method == "GET" and blobs[0].status in (200, 206)
    names = lab.names()
    for name in ("daemon.enrolled", "daemon.install", "install.started", "install.verified",
                 "install.trial_armed", "install.rebooting"):  # fmt: skip
        assert name in names, names
    seqs = [e["seq"] for e in lab.server_events()]
    assert seqs == list(range(1_700_000_000_000, 1_700_000_000_000 + len(seqs)))
    assert lab.heartbeat()["updater_state"] == "installed"
    # the reboot: the boot check commits the trial; the daemon that starts next reports it
    records = lab.reboot()
    assert records[-1].action == "committed" and records[-1].image is not None
    assert records[-1].image.version == "2.0.0"
    after = lab.daemon()
    after.run_once()
    heartbeat = lab.heartbeat()
    assert (heartbeat["version"], heartbeat["booted"], heartbeat["primary"]) == ("2.0.0", "b", "b")
    assert heartbeat["slots"]["b"] == {"status": "good", "version": "2.0.0"}
    assert heartbeat["health"] == [{"name": "lab:release", "ok": True}]
    assert heartbeat["updater_state"] == "idle" and heartbeat["safe_mode"] is False
    assert lab.real.device(lab.device_id)["version"] == "2.0.0"
    assert len(lab.local("install.started")) == 1  # running it: nothing more to do
    # the next check-in within the refresh age is a 304 the daemon asked for: nothing to do
    lab.clock.now += 61
    after.run_once()
    last = lab.real.wire.device_calls("/checkin")[-1]
    assert last.status == 304 and "if-none-match" in last.headers
    assert after.last_error is None and len(lab.local("install.started")) == 1


def test_events_whose_acknowledgement_was_lost_are_sent_again_and_stored_once(
    lab: Lab,
) -> None:
    first = lab.daemon()
    first.run_once()
    sent = len(lab.server_events())
    assert sent and first.outbox.counts()[0] == 0
    # a proxy whose upstream is down: nothing reaches the server, the outbox keeps the events
    lab.real.wire.drop = lambda e: e.path.endswith("/events")
    first.log.event("boot_check.committed", slot="b")
    first.log.event("health.check_failed", level="warning", check="x", detail="y")
    first.log.event("install.progress", level="debug", bytes=1)  # debug: local only
    lab.clock.now += 61
    first.run_once()
    assert first.outbox.counts()[0] == 2 and len(lab.server_events()) == sent
    # the server stores the batch but its answer is lost: the daemon checks in all the same,
    # then sends the batch again, and the server absorbs the duplicates
    lab.real.wire.drop = None
    lost: list[Exchange] = []

    def lose_the_first_answer(exchange: Exchange) -> bool:
        if exchange.path.endswith("/events") and not lost:
            lost.append(exchange)
            return True
        return False

    lab.real.wire.lose = lose_the_first_answer
    lab.clock.now += 400
    first.run_once()
    assert first.last_error is None
    # the batch is acknowledged; only the news of the server's return, logged after the
    # step's last send, waits for the next one
    assert [e.event for e in first.outbox.pending()] == ["daemon.server_back"]
    [batch] = lost
    assert batch.status == 204 and not batch.delivered
    resent = lab.real.wire.device_calls("/events")[-1]
    assert resent.json() == batch.json() and resent.delivered
    assert len(lab.server_events()) == sent + 2
    # the daemon restarts (a reboot, a crash): numbering goes on, nothing lost or doubled
    second = lab.daemon()
    second.log.event("update.resumed", previously=None)
    second.run_once()
    assert second.outbox.counts()[0] == 0
    events = lab.server_events()
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    names = [e["event"] for e in events[sent:]]
    assert names[:2] == ["boot_check.committed", "health.check_failed"]
    assert "update.resumed" in names[2:] and "install.progress" not in names
    assert events[sent]["fields"] == {"level": "info", "slot": "b"}


def test_a_refused_enrollment_is_reported_and_tried_again(lab: Lab) -> None:
    wrong = "not-a-token"
    lab.device.config = dataclasses.replace(lab.device.config, enrollment_token=wrong)
    daemon = lab.daemon()
    delay = daemon.run_once()
    assert daemon.last_error is not None and "not_authorized" in daemon.last_error
    assert 54 <= delay <= 66
    assert lab.real.wire.device_calls("/enroll")[-1].status == 403
    lab.real.preauthorize(lab.identity.public_key_hex)
    lab.clock.sleep(delay)
    daemon.run_once()
    assert daemon.last_error is None and lab.heartbeat()["updater_state"] == "idle"
    assert len(lab.local("daemon.enroll_refused")) == 1  # the refusal, reported once


def test_a_decommissioned_device_waits_to_be_reinstated_and_keeps_its_identity(lab: Lab) -> None:
    daemon = lab.daemon()
    lab.clock.sleep(daemon.run_once())
    enrolled = lab.device.config.data_dir / "identity" / "enrolled.json"
    assert enrolled.exists()
    lab.real.operator.post(f"{API}/devices/{lab.device_id}/decommission", {})
    enrolls = len(lab.real.wire.device_calls("/enroll"))
    lab.clock.now += 61
    delay = daemon.run_once()
    assert daemon.last_error is not None and "device_decommissioned" in daemon.last_error
    assert delay == DECOMMISSIONED_RETRY_S  # (the lab's jitter is none)
    asked = len(lab.real.wire.exchanges)
    lab.clock.now += delay / 2
    assert daemon.run_once() == delay / 2 and len(lab.real.wire.exchanges) == asked
    lab.clock.now += delay / 2
    daemon.run_once()  # asks again, is refused again
    assert len(lab.real.wire.exchanges) > asked and "device_decommissioned" in daemon.last_error
    assert enrolled.exists() and len(lab.real.wire.device_calls("/enroll")) == enrolls
    assert len(lab.local("daemon.decommissioned")) == 1 and not lab.local("daemon.enrollment_lost")
    lab.real.operator.post(f"{API}/devices/{lab.device_id}/reinstate", {})
    lab.clock.now += DECOMMISSIONED_RETRY_S
    daemon.run_once()
    assert daemon.last_error is None and lab.local("daemon.reinstated")
    assert lab.heartbeat()["updater_state"] == "idle"


def test_the_daemon_keeps_its_session_and_heartbeats_on_schedule(lab: Lab) -> None:
    daemon = lab.daemon()
    for _ in range(4):
        lab.clock.sleep(daemon.run_once())
    heartbeats = lab.real.wire.device_calls("/heartbeat")
    assert len(heartbeats) >= 3 and all(e.status == 204 for e in heartbeats)
    assert len(lab.real.wire.device_calls("/session")) == 1
    assert lab.heartbeat()["booted"] == "a"


def test_nothing_is_installed_while_updates_are_suspended(lab: Lab) -> None:
    store = lab.device.store
    store.save(dataclasses.replace(store.load().state, suspended="crash loop: 4 starts"))
    lab.assign(lab.real.release("2.0.0"))
    daemon = lab.daemon()
    daemon.run_once()
    lab.clock.now += 61
    daemon.run_once()
    assert lab.device.pending_reboot is None and lab.slot("b").status == "empty"
    assert not lab.local("install.started") and lab.downloads() == 0
    skipped = [e for e in lab.server_events() if e["event"] == "daemon.install_skipped"]
    assert len(skipped) == 1 and "suspended" in skipped[0]["fields"]["reason"]
    assert "daemon.install" not in lab.names()  # not even begun (the installer refuses too)
    assert [h["updater_state"] for h in lab.heartbeats()] == ["suspended", "suspended"]


def test_a_release_whose_trial_failed_is_never_tried_again(lab: Lab) -> None:
    unhealthy = lab.real.release("2.6.0", "unhealthy")
    lab.assign(unhealthy)
    lab.daemon().run_once()
    records = lab.reboot()
    assert [r.action for r in records] == ["rolled_back", "confirmed"]
    daemon = lab.daemon()
    for _ in range(3):
        daemon.run_once()
        lab.clock.now += 61
    assert len(lab.local("install.started")) == 1
    assert lab.names().count("daemon.release_failed") == 1
    [record] = ReleaseHistoryStore(lab.device.config.data_dir).load().releases.values()
    assert record.outcome == "failed" and "trial" in (record.detail or "")
    # even when the slot has since been rewritten, the history remembers
    lab.assign(lab.real.release("3.0.0"))
    lab.clock.now += 61
    daemon.run_once()
    lab.reboot()
    lab.assign(unhealthy)
    again = lab.daemon()
    again.run_once()
    assert len(lab.local("install.started")) == 2


def run_once_cut_at(lab: Lab, point: str) -> None:
    """One daemon step that a power cut ends at write boundary ``point`` (and every write
    after it): the step raises PowerCut."""
    off = threading.Event()

    def hook(name: str, path: Path) -> None:
        if off.is_set() or name == point:
            off.set()
            raise PowerCut(name)

    previous = durable.set_boundary_hook(hook)
    try:
        with pytest.raises(PowerCut):
            lab.daemon().run_once()
    finally:
        durable.set_boundary_hook(previous)


def test_an_install_cut_short_is_counted_and_given_up_after_a_few(lab: Lab) -> None:
    lab.assign(lab.real.release("2.0.0"))
    for attempt in range(1, MAX_INTERRUPTED + 1):
        run_once_cut_at(lab, "slot:begin")
        lab.device.power_cut()  # the boot check finds the install interrupted: slot b bad
        assert lab.slot("b").status == "bad"
        lab.clock.now += 61
        if attempt < MAX_INTERRUPTED:
            assert len(lab.local("install.started")) == attempt
    daemon = lab.daemon()
    daemon.run_once()
    assert len(lab.local("install.started")) == MAX_INTERRUPTED
    assert len(lab.local("daemon.install_interrupted")) == MAX_INTERRUPTED
    assert "daemon.release_failed" in lab.names() and lab.device.pending_reboot is None


def test_an_install_cut_short_once_is_tried_again(lab: Lab) -> None:
    lab.assign(lab.real.release("2.0.0"))
    run_once_cut_at(lab, "slot:begin")
    lab.device.power_cut()
    lab.daemon().run_once()
    assert lab.reboot()[-1].action == "committed" and lab.slot("b").version == "2.0.0"


def test_a_rollback_to_the_release_in_the_other_slot_is_a_slot_flip(lab: Lab) -> None:
    two, three = lab.real.release("2.0.0"), lab.real.release("3.0.0")
    for release in (two, three):
        lab.assign(release)
        lab.daemon().run_once()
        assert lab.reboot()[-1].action == "committed"
    assert lab.device.runtime().backend.booted() == "a"
    downloads = lab.downloads()
    lab.assign(two)
    lab.daemon().run_once()
    assert lab.local("rollback.armed")[-1]["slot"] == "b"
    assert lab.downloads() == downloads
    records = lab.reboot()
    assert records[-1].action == "committed" and records[-1].image is not None
    assert records[-1].image.version == "2.0.0"


def test_without_a_server_keyring_the_device_still_reports(lab: Lab) -> None:
    daemon = lab.daemon()
    daemon.client.keyring = None
    daemon.run_once()
    lab.clock.now += 61
    daemon.run_once()
    assert daemon.last_error is not None and "no server keyring" in daemon.last_error
    assert len(lab.heartbeats()) == 2 and lab.names().count("daemon.step_failed") == 1


def test_checkins_are_jittered_and_heartbeats_regular(lab: Lab) -> None:
    rolls = iter([0.0, 1.0] * 10)
    daemon = lab.daemon()
    daemon._rng = lambda: next(rolls)  # the jitter's dice
    assert daemon.run_once() == pytest.approx(54.0)  # checkin in 60 s - 10 %, heartbeat in 60
    lab.clock.now += 54
    assert daemon.run_once() == pytest.approx(6.0)
    lab.clock.now += 6
    assert daemon.run_once() == pytest.approx(60.0)
    assert len(lab.real.wire.device_calls("/checkin")) == 2
    assert len(lab.real.wire.device_calls("/heartbeat")) == 2


def test_in_safe_mode_the_assigned_release_is_recovered_into_a_root_slot(lab: Lab) -> None:
    # both root slots go bad: b's release hangs at boot, then a's application stops working
    lab.device.install(lab.real.releases.bundle("1.5.0", "hang"))
    with lab.device.slot_path("a").open("r+b") as handle:
        handle.write(make_lab_image("1.0.0", "unhealthy"))
    assert lab.device.power_on()[-1].slot == "safe"
    lab.assign(lab.real.release("2.0.0"))  # the last known-good release, as a rollback does
    daemon = lab.daemon()
    daemon.run_once()
    assert daemon.last_error is None
    names = lab.names()
    for name in ("recovery.started", "recovery.verified", "recovery.finished",
                 "recovery.rebooting"):  # fmt: skip
        assert name in names, names
    assert lab.heartbeat()["safe_mode"] is True  # still reporting from safe mode
    assert lab.real.device(lab.device_id)["state"] == "safe_mode"
    records = lab.reboot()
    assert records[-1].action == "committed", records
    assert records[-1].image is not None and records[-1].image.version == "2.0.0"
    after = lab.daemon()
    after.run_once()
    heartbeat = lab.heartbeat()
    assert heartbeat["safe_mode"] is False and heartbeat["version"] == "2.0.0"
    assert len(lab.local("recovery.started")) == 1  # running it now: nothing more to do


def test_a_recovery_that_ends_in_safe_mode_again_is_not_repeated(lab: Lab) -> None:
    lab.device.install(lab.real.releases.bundle("1.5.0", "hang"))
    with lab.device.slot_path("a").open("r+b") as handle:
        handle.write(make_lab_image("1.0.0", "unhealthy"))
    assert lab.device.power_on()[-1].slot == "safe"
    lab.assign(lab.real.release("2.6.0", "unhealthy"))
    lab.daemon().run_once()
    assert lab.reboot()[-1].slot == "safe"  # the recovered release failed its trial
    daemon = lab.daemon()
    daemon.run_once()
    assert lab.device.pending_reboot is None  # no loop of recoveries
    assert len(lab.local("recovery.started")) == 1
    assert "daemon.release_failed" in lab.names()
