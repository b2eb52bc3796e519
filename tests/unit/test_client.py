"""The device's protocol client: the rules of a check-in answer, what fits one request; against
the server simulator, what only it can do: answers of a form the real server never signs, a
server that forgot the device, failover between URLs, backoff, a skewed clock; and, against a
scripted HTTP session, each exchange on its own: what every request carries, each refusal and
silence, sessions and their renewal, and failover step by step on the device's clock.

Enrollment, sessions, signed check-ins, ETags and 304, replayed answers, heartbeats and events
are tested against the real server: tests/integration/test_device_protocol.py."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from signing.keyring import Keyring
from signing.keys import SigningKey, generate_key
from signing.signature import sign
from tests.server_simulator import FakeClock, Faults, ServerSimulator, SimRelease
from updater.client import (
    AnswerRejectedError,
    Assignment,
    BlobRef,
    DeviceDecommissionedError,
    EnrollResult,
    NotEnrolledError,
    ServerClient,
    ServerError,
    ServerRejectedError,
    ServerUnavailableError,
    events_that_fit,
    verify_answer,
)
from updater.identity import DeviceIdentity, load_or_create_identity
from updater.log import EventLog

NONCE = "ab" * 16


@pytest.fixture(scope="module")
def server_key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return generate_key(tmp_path_factory.mktemp("server") / "server")


@pytest.fixture
def keyring(server_key: SigningKey) -> Keyring:
    return Keyring({server_key.key_id: server_key.public_key})


@pytest.fixture
def identity(tmp_path: Path) -> DeviceIdentity:
    return load_or_create_identity(tmp_path / "data")[0]


@pytest.fixture
def server(server_key: SigningKey) -> Iterator[ServerSimulator]:
    with ServerSimulator(server_key) as simulator:
        yield simulator


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def client_for(
    urls: list[str], identity: DeviceIdentity, keyring: Keyring | None, clock: FakeClock,
    **options: Any,
) -> ServerClient:  # fmt: skip
    options.setdefault("timeout_s", 2.0)
    options.setdefault("rng", lambda: 1.0)
    return ServerClient(urls, identity.key, keyring, clock=clock, **options)


def enrolled(
    server: ServerSimulator, identity: DeviceIdentity, keyring: Keyring, clock: FakeClock,
    **options: Any,
) -> ServerClient:  # fmt: skip
    server.preauthorize(identity.public_key_hex)
    client = client_for([server.url], identity, keyring, clock, **options)
    client.enroll(compatible="lab-device", hostname="cam-0042", token=None)
    return client


def a_release(server: ServerSimulator, version: str = "2.0.0") -> SimRelease:
    blob = f"image of {version}".encode()
    manifest = json.dumps({"version": version}).encode()
    return server.add_release(
        manifest, b"signatures", {hashlib.sha256(blob).hexdigest(): blob}, version=version
    )


# --- sessions ----------------------------------------------------------------------------------


def test_a_device_the_server_forgot_is_told_to_enroll_again(
    server: ServerSimulator, identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    client = enrolled(server, identity, keyring, clock)
    server.forget_devices()
    with pytest.raises(NotEnrolledError, match="404"):
        client.checkin()
    assert client.failures == 0  # an answer, not silence


# --- check-in answers ---------------------------------------------------------------------------


def test_blob_urls_under_a_server_path_and_from_elsewhere(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    client = client_for(
        ["https://fleet.example/prefix/"], identity, keyring, clock, mirrors=["https://m.example"]
    )
    blobs = tuple(
        BlobRef("rootfs", str(n) * 64, 1, url)
        for n, url in enumerate(
            ["/blobs/x", "blobs/y", "https://cdn.example/z", "file:///etc/passwd"]
        )
    )
    urls = client.blob_urls(Assignment(1, "2.0.0", 1, b"", b"", blobs))
    assert list(urls.values()) == [
        ["https://fleet.example/prefix/blobs/x", f"https://m.example/blobs/{'0' * 64}"],
        ["https://fleet.example/prefix/blobs/y", f"https://m.example/blobs/{'1' * 64}"],
        ["https://cdn.example/z", f"https://m.example/blobs/{'2' * 64}"],
        [f"https://m.example/blobs/{'3' * 64}"],
    ]


def answer_format_2(document: dict[str, Any]) -> dict[str, Any]:
    return {**document, "format": 2}


def no_interval(document: dict[str, Any]) -> dict[str, Any]:
    return {**document, "checkin_interval_s": 0}


# Answers the real server never signs (it cannot be made to): a stale or another device's
# answer is tested against the real server, replayed (tests/integration/test_device_protocol.py).
@pytest.mark.parametrize(
    ("hook", "message"),
    [
        (answer_format_2, "unknown format 2"),
        (no_interval, "checkin_interval_s must be null or seconds >= 1"),
    ],
)
def test_a_signed_answer_of_a_form_the_device_does_not_know_is_ignored(
    server: ServerSimulator, identity: DeviceIdentity, keyring: Keyring, clock: FakeClock,
    hook: Any, message: str,
) -> None:  # fmt: skip
    log = EventLog(io.StringIO(), keep=True)
    client = enrolled(server, identity, keyring, clock, log=log)
    server.assign(identity.device_id, a_release(server))
    good = client.checkin()
    server.assign(identity.device_id, a_release(server, "6.6.6"))
    server.answer_hook = hook
    with pytest.raises(AnswerRejectedError, match=message):
        client.checkin()
    assert client.last_answer == good.answer
    assert client.failures == 1  # an answer that cannot be used is no answer
    assert [e["event"] for e in log.events] == ["server.session_opened", "server.answer_rejected"]


def signed_body(key: SigningKey, document: dict[str, Any]) -> dict[str, Any]:
    answer = json.dumps(document)
    envelope = sign(answer.encode(), [key], "assignment")
    return {"answer": answer, "signatures": envelope.to_bytes().decode()}


def answer(device_id: str, nonce: str = NONCE, **changes: Any) -> dict[str, Any]:
    return {
        "format": 1, "device_id": device_id, "nonce": nonce, "etag": "e1", "assignment": None,
        **changes,
    }  # fmt: skip


def test_verify_answer_accepts_exactly_the_signed_bytes(
    server_key: SigningKey, keyring: Keyring
) -> None:
    device_id = "d" * 64
    body = signed_body(server_key, answer(device_id))
    assert verify_answer(body, keyring, device_id, NONCE).etag == "e1"
    # the envelope may also arrive as a JSON object
    as_object = {**body, "signatures": json.loads(body["signatures"])}
    assert verify_answer(as_object, keyring, device_id, NONCE).etag == "e1"
    tampered = {**body, "answer": body["answer"].replace('"e1"', '"e2"')}
    with pytest.raises(AnswerRejectedError, match="does not match"):
        verify_answer(tampered, keyring, device_id, NONCE)
    replayed = signed_body(server_key, answer(device_id, nonce="ef" * 16))
    with pytest.raises(AnswerRejectedError, match="nonce"):
        verify_answer(replayed, keyring, device_id, NONCE)
    purpose = {**body, "signatures": sign(body["answer"].encode(), [server_key], "manifest")}
    purpose["signatures"] = purpose["signatures"].to_bytes().decode()
    with pytest.raises(AnswerRejectedError, match="does not match"):
        verify_answer(purpose, keyring, device_id, NONCE)


@pytest.mark.parametrize(
    "assignment",
    [
        {"release_id": 1},
        {"release_id": True, "version": "1", "security_version": 1, "manifest": "",
         "manifest_sig": "", "blobs": []},
        {"release_id": 1, "version": "1", "security_version": 1, "manifest": "not base64!",
         "manifest_sig": "", "blobs": []},
        {"release_id": 1, "version": "1", "security_version": 1, "manifest": "",
         "manifest_sig": "", "blobs": [{"slot_class": "rootfs", "sha256": "AB", "size": 1,
                                        "url": "/blobs/x"}]},
    ],
)  # fmt: skip
def test_a_malformed_assignment_is_refused(
    server_key: SigningKey, keyring: Keyring, assignment: dict[str, Any]
) -> None:
    body = signed_body(server_key, answer("d" * 64, assignment=assignment))
    with pytest.raises(AnswerRejectedError, match="assignment"):
        verify_answer(body, keyring, "d" * 64, NONCE)


@pytest.mark.parametrize("body", [None, {}, {"answer": 3}, {"answer": "{}", "signatures": 7}])
def test_a_response_without_a_signed_answer_is_refused(body: Any, keyring: Keyring) -> None:
    with pytest.raises(AnswerRejectedError):
        verify_answer(body, keyring, "d" * 64, NONCE)


# --- failover and backoff ---------------------------------------------------------------------


def until_answered(client: ServerClient, clock: FakeClock, call: Any) -> tuple[float, int]:
    """Call until it goes through, waiting as the client says; (time taken, failures)."""
    start, failures = clock.now, 0
    while True:
        try:
            call()
        except ServerUnavailableError:
            failures += 1
            clock.sleep(client.retry_delay_s())
            assert failures < 50
        else:
            return clock.now - start, failures


HEARTBEAT = {
    "version": "1.0.0", "booted": "a", "primary": "a", "trial": False,
    "slots": {"a": {"status": "good", "version": "1.0.0"}, "b": {"status": "empty",
                                                             "version": None}},
    "updater_state": "idle", "health": [], "temperature_c": None, "free_space_mb": 100,
    "uptime_s": 5.0, "clock": 1.7e9, "clock_skew_s": None, "safe_mode": False,
}  # fmt: skip


@pytest.mark.parametrize("fault", ["down", "500", "slow"])
def test_failover_within_failover_after_s_and_back_to_the_primary_later(
    server_key: SigningKey, identity: DeviceIdentity, keyring: Keyring, clock: FakeClock,
    fault: str,
) -> None:  # fmt: skip
    log = EventLog(io.StringIO(), keep=True)
    with (
        ServerSimulator(server_key) as primary,
        ServerSimulator(server_key, shares=primary) as second,
    ):
        primary.preauthorize(identity.public_key_hex)
        client = client_for(
            [primary.url, second.url], identity, keyring, clock, failover_after_s=30.0,
            timeout_s=0.25 if fault == "slow" else 2.0, backoff_s=10.0, log=log,
        )  # fmt: skip
        client.enroll(compatible="lab-device", hostname="x", token=None)
        client.heartbeat(HEARTBEAT)
        if fault == "down":
            primary.faults.down = True
        elif fault == "500":
            primary.faults.status = 500
        else:
            primary.faults.stall_s = 1.0  # longer than the device waits
        taken, failures = until_answered(client, clock, lambda: client.heartbeat(HEARTBEAT))
        assert failures >= 2 and taken <= 30.0
        assert client.active_url == second.url
        assert len(second.api_requests("/heartbeat")) == 1
        # the secondary is used directly from now on; the primary is not asked
        asked = len(primary.requests)
        clock.now += 60
        client.heartbeat(HEARTBEAT)
        assert len(primary.requests) == asked and client.failures == 0
        # a probe of the primary still down: the request still goes through, on the second
        primary.faults = Faults(down=True)
        clock.now += 300
        client.heartbeat(HEARTBEAT)
        assert len(primary.requests) == asked + 1 and client.active_url == second.url
        # the primary is back: the next probe finds it, and it is used again
        primary.faults = Faults()
        clock.now += 299
        client.heartbeat(HEARTBEAT)
        assert client.active_url == second.url
        clock.now += 1
        before = len(primary.api_requests("/heartbeat"))
        client.heartbeat(HEARTBEAT)
        assert client.active_url == primary.url
        assert len(primary.api_requests("/heartbeat")) == before + 1
    events = [e["event"] for e in log.events]
    assert events.count("server.failover") == 1 and events.count("server.failback") == 1


def test_backoff_grows_exponentially_with_full_jitter_up_to_a_cap(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock, server: ServerSimulator
) -> None:
    server.faults.down = True
    client = client_for([server.url], identity, keyring, clock, backoff_s=1.0, max_backoff_s=60)
    delays = []
    for _ in range(9):
        with pytest.raises(ServerUnavailableError, match="no answer to POST"):
            client.heartbeat(HEARTBEAT)
        delays.append(client.retry_delay_s())
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    halves = client_for([server.url], identity, keyring, clock, rng=lambda: 0.5)
    halves.failures = 4
    assert halves.retry_delay_s() == 4.0
    server.faults.down = False
    server.preauthorize(identity.public_key_hex)
    client.enroll(compatible="lab-device", hostname="x", token=None)
    assert client.failures == 0 and client.retry_delay_s() == 1.0


def test_with_two_urls_down_the_backoff_is_not_held_at_the_failover_time(
    server_key: SigningKey, identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    with ServerSimulator(server_key) as one, ServerSimulator(server_key, shares=one) as two:
        one.faults.down = two.faults.down = True
        client = client_for(
            [one.url, two.url], identity, keyring, clock, failover_after_s=30, timeout_s=1,
            max_backoff_s=300,
        )  # fmt: skip
        waits = []
        for _ in range(12):
            with pytest.raises(ServerUnavailableError):
                client.heartbeat(HEARTBEAT)
            waits.append(client.retry_delay_s())
            clock.sleep(waits[-1])
        assert max(waits) == 300 and sum(waits) > 1000
        assert one.requests and two.requests


def test_the_clock_skew_comes_from_the_date_header(
    server_key: SigningKey, identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    with ServerSimulator(server_key, clock=lambda: time.time() + 3600) as server:
        client = enrolled(server, identity, keyring, clock)
        assert client.clock_skew_s is not None and abs(client.clock_skew_s - 3600) < 3


def test_what_fits_one_request() -> None:
    small = [{"event": "install.started", "seq": i, "fields": {}} for i in range(150)]
    assert events_that_fit(small) == 100
    big = [{"event": "x.y", "seq": i, "fields": {"text": "x" * 20_000}} for i in range(5)]
    assert events_that_fit(big) == 3
    assert events_that_fit([]) == 0


# --- the requests the device sends, and what it makes of each answer ---------------------------
#
# A scripted HTTP session stands in for the network: it records every request exactly as the
# client hands it to ``requests`` and answers from a script, so each rule of the client about one
# exchange (headers, body, timeouts, status codes, error documents, the ``Date`` header) is seen
# alone. The challenge and session requests are answered as the server does.

URL = "https://fleet.example"
CHALLENGE = "c" * 64


@dataclass
class Sent:
    method: str
    url: str
    data: bytes | None
    headers: CaseInsensitiveDict[str]
    timeout: float | None
    verify: str | None = None  # a CA file, as requests takes it (absent: the system's store)

    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


def reply(
    status: int, document: Any = None, *, text: str | None = None,
    headers: dict[str, str] | None = None,
) -> requests.Response:  # fmt: skip
    response = requests.Response()
    response.status_code = status
    body = text if text is not None else ("" if document is None else json.dumps(document))
    response._content = body.encode()
    response._content_consumed = True
    response.encoding = "utf-8"
    response.headers = CaseInsensitiveDict(headers or {})
    return response


Answerer = Callable[[Sent], "requests.Response | Exception"]


class ScriptedHttp:
    """A ``requests.Session`` for one client: sessions are opened as the server opens them
    (``expires_in`` as given), every other request is answered by the next entry of ``script``
    (a response, an exception to raise, or a function of the request), then by ``default``."""

    def __init__(
        self, *script: Any, expires_in: Any = 3600, date: str | None = None,
        challenge: Answerer | None = None, session: Answerer | None = None,
        default: Answerer | None = None,
    ) -> None:  # fmt: skip
        self.script: deque[Any] = deque(script)
        self.default = default
        self.on_challenge = challenge
        self.on_session = session
        self.sent: list[Sent] = []
        self.expires_in = expires_in
        self.tokens = 0
        self.date = date

    def request(
        self, method: str, url: str, *, data: bytes | None, headers: dict[str, str],
        timeout: float | None, verify: str | None = None,
    ) -> requests.Response:  # fmt: skip
        sent = Sent(method, url, data, CaseInsensitiveDict(headers), timeout, verify)
        self.sent.append(sent)
        if url.endswith("/challenge"):
            answer: Any = self.on_challenge or reply(
                200, {"challenge": CHALLENGE, "expires_in": 60}
            )
        elif url.endswith("/session"):
            self.tokens += 1
            token = {"token": f"t{self.tokens}", "expires_in": self.expires_in}
            answer = self.on_session or reply(200, token)
        elif self.script:
            answer = self.script.popleft()
        else:
            answer = self.default
        if callable(answer) and not isinstance(answer, requests.Response):
            answer = answer(sent)
        if isinstance(answer, Exception):
            raise answer
        response: requests.Response = answer
        if self.date is not None:
            response.headers.setdefault("Date", self.date)
        return response

    def calls(self, suffix: str) -> list[Sent]:
        return [s for s in self.sent if s.url.endswith(suffix)]


def scripted(
    identity: DeviceIdentity, keyring: Keyring | None, clock: FakeClock, http: ScriptedHttp,
    urls: list[str] | None = None, **options: Any,
) -> ServerClient:  # fmt: skip
    options.setdefault("rng", lambda: 1.0)
    session = cast("requests.Session", http)
    return ServerClient(
        urls or [URL], identity.key, keyring, session=session, clock=clock, **options
    )


def signed_reply(
    key: SigningKey, device_id: str, nonce: str, etag: str = "e1", **changes: Any
) -> requests.Response:
    return reply(
        200, signed_body(key, answer(device_id, nonce, etag=etag, **changes)),
        headers={"ETag": f'"{etag}"'},
    )  # fmt: skip


def echo(key: SigningKey, device_id: str, etag: str = "e1", **changes: Any) -> Answerer:
    """The server's signed answer to whatever nonce the check-in carries."""
    return lambda sent: signed_reply(key, device_id, sent.json()["nonce"], etag, **changes)


def logged(log: EventLog) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "ts"} for e in log.events]


def test_every_request_is_compact_json_with_the_session_and_the_timeout(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp(reply(204))
    client = scripted(identity, keyring, clock, http, timeout_s=4.0)
    client.heartbeat({"state": "idle", "n": [1, 2]})
    challenge, session, heartbeat = http.sent
    base = f"{URL}/api/v1/devices/{identity.device_id}"
    assert [(s.method.upper(), s.url) for s in http.sent] == [
        ("POST", f"{base}/challenge"), ("POST", f"{base}/session"), ("POST", f"{base}/heartbeat"),
    ]  # fmt: skip
    for sent in http.sent:
        assert sent.headers["Content-Type"] == "application/json"
        assert sent.headers["Accept"] == "application/json"
        assert sent.timeout == 4.0
    # the challenge request's body is a JSON object too, as every request body
    assert challenge.data == b"{}"
    assert "Authorization" not in challenge.headers and "Authorization" not in session.headers
    assert session.json()["challenge"] == CHALLENGE
    assert heartbeat.headers["Authorization"] == "Bearer t1"
    assert heartbeat.data == b'{"state":"idle","n":[1,2]}'


@pytest.mark.parametrize(
    ("failover_after_s", "timeout_s"), [(None, 10.0), (15.0, 5.0), (60.0, 10.0)]
)
def test_without_a_timeout_a_request_waits_a_third_of_the_failover_time_at_most_10_s(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock,
    failover_after_s: float | None, timeout_s: float,
) -> None:  # fmt: skip
    http = ScriptedHttp(reply(204))
    options: dict[str, Any] = {}
    if failover_after_s is not None:
        options["failover_after_s"] = failover_after_s
    client = scripted(identity, keyring, clock, http, **options)
    assert client.timeout_s == timeout_s
    assert client.failover_after_s == (failover_after_s or 30.0)
    client.heartbeat({})
    assert {s.timeout for s in http.sent} == {timeout_s}


def test_a_body_of_exactly_64_kib_is_sent_and_one_byte_more_is_refused(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp(reply(204))
    client = scripted(identity, keyring, clock, http)
    overhead = len(b'{"text":""}')
    client.heartbeat({"text": "x" * (64 * 1024 - overhead)})
    assert len(http.calls("/heartbeat")[0].data or b"") == 64 * 1024
    with pytest.raises(ValueError, match=r"/heartbeat: 65537 bytes, more than a device may send"):
        client.heartbeat({"text": "x" * (64 * 1024 - overhead + 1)})
    assert len(http.calls("/heartbeat")) == 1


def test_a_value_json_cannot_carry_is_refused_before_anything_is_sent(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp()
    client = scripted(identity, keyring, clock, http)
    with pytest.raises(ValueError):
        client.heartbeat({**HEARTBEAT, "temperature_c": float("nan")})
    assert http.sent == []


def test_a_session_is_renewed_30_s_before_the_server_would_expire_it(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    log = EventLog(io.StringIO(), keep=True)
    http = ScriptedHttp(*[reply(204)] * 3)
    client = scripted(identity, keyring, clock, http, log=log)
    client.heartbeat({})
    clock.now += 3570 - 0.001
    client.heartbeat({})
    assert http.tokens == 1
    clock.now += 0.001  # 3570 s: 30 s before the server's hour
    client.heartbeat({})
    assert http.tokens == 2
    assert [s.headers["Authorization"] for s in http.calls("/heartbeat")] == [
        "Bearer t1", "Bearer t1", "Bearer t2",
    ]  # fmt: skip
    assert logged(log)[0] == {
        "level": "debug", "event": "server.session_opened", "url": URL, "expires_in_s": 3600,
    }  # fmt: skip


def test_a_session_shorter_than_the_margin_is_used_for_one_request(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp(reply(204), reply(204), expires_in=30)
    client = scripted(identity, keyring, clock, http)
    client.heartbeat({})
    client.heartbeat({})
    assert http.tokens == 2


def test_a_401_opens_a_new_session_and_sends_the_request_once_more(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp(reply(401, {"error": "unauthenticated"}), reply(204))
    client = scripted(identity, keyring, clock, http)
    client.heartbeat({})
    assert [s.headers["Authorization"] for s in http.calls("/heartbeat")] == [
        "Bearer t1", "Bearer t2",
    ]  # fmt: skip
    assert client.failures == 0
    # a second 401 in a row is the server's answer: a refusal, not a loop
    http.script.extend([reply(401, {"error": "unauthenticated"})] * 2)
    with pytest.raises(ServerRejectedError, match="HTTP 401 unauthenticated"):
        client.heartbeat({})
    assert http.tokens == 3 and len(http.calls("/heartbeat")) == 4


@pytest.mark.parametrize(
    ("expires_in", "token"), [(True, "t"), ("3600", "t"), (3600, None), (3600, 7)]
)
def test_a_session_answer_without_a_token_and_a_lifetime_in_seconds_is_no_answer(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock, expires_in: Any, token: Any
) -> None:  # fmt: skip
    def session(sent: Sent) -> requests.Response:
        return reply(200, {"token": token, "expires_in": expires_in})

    http = ScriptedHttp(session=session)
    client = scripted(identity, keyring, clock, http)
    missing = "token" if not isinstance(token, str) else "expires_in"
    with pytest.raises(ServerUnavailableError, match=f"session: {missing} missing from the answer"):
        client.heartbeat({})
    assert client.failures == 1


@pytest.mark.parametrize(
    ("answer_", "error"),
    [
        (reply(200, {"challenge": "zz", "expires_in": 60}), "challenge: not 64 hex digits"),
        (reply(200, text="<html>"), "HTTP 200: not JSON"),
        (reply(200, ["c" * 64]), "HTTP 200: not a JSON object"),
        (reply(200, {"expires_in": 60}), "session: challenge missing from the answer"),
    ],
)
def test_a_challenge_that_is_not_one_is_no_answer(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock,
    answer_: requests.Response, error: str,
) -> None:  # fmt: skip
    http = ScriptedHttp(challenge=lambda sent: answer_)
    client = scripted(identity, keyring, clock, http)
    with pytest.raises(ServerUnavailableError, match=f"{URL}: {re.escape(error)}"):
        client.heartbeat({})
    assert client.failures == 1 and not http.calls("/session")


@pytest.mark.parametrize(
    ("answer_", "message", "code"),
    [
        (reply(404, {"error": "unknown_device", "detail": "enroll first"}),
         "session: HTTP 404 unknown_device: enroll first", "unknown_device"),
        (reply(403, {"error": "forbidden", "detail": "not yours"}),
         "session: HTTP 403 forbidden: not yours", "forbidden"),
    ],
)  # fmt: skip
def test_a_challenge_refused_for_an_unknown_device_means_enroll_again(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock,
    answer_: requests.Response, message: str, code: str,
) -> None:  # fmt: skip
    http = ScriptedHttp(challenge=lambda sent: answer_)
    client = scripted(identity, keyring, clock, http)
    with pytest.raises(NotEnrolledError) as caught:
        client.heartbeat({})
    assert str(caught.value) == message
    assert (caught.value.status, caught.value.code) == (answer_.status_code, code)
    assert client.failures == 0


def test_an_unknown_device_without_an_error_document_is_still_told_to_enroll(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp(challenge=lambda sent: reply(404, text="Not Found"))
    client = scripted(identity, keyring, clock, http)
    with pytest.raises(NotEnrolledError, match=r"^session: HTTP 404 ?: device not enrolled$"):
        client.heartbeat({})


def test_a_session_request_refused_otherwise_is_a_refusal(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    refusal = {"error": "invalid_request", "detail": "signature: 128 hex"}
    http = ScriptedHttp(session=lambda sent: reply(422, refusal))
    client = scripted(identity, keyring, clock, http)
    with pytest.raises(ServerRejectedError) as caught:
        client.heartbeat({})
    assert type(caught.value) is ServerRejectedError
    assert str(caught.value) == "session: HTTP 422 invalid_request: signature: 128 hex"
    assert (caught.value.status, caught.value.code) == (422, "invalid_request")
    assert client.failures == 0


# --- refusals: what the server said, kept -----------------------------------------------------


@pytest.mark.parametrize(
    ("answer_", "message", "code"),
    [
        (reply(422, {"error": "invalid_request", "detail": "surprise: unknown field"}),
         ": HTTP 422 invalid_request: surprise: unknown field", "invalid_request"),
        (reply(409, {"error": "conflict"}), ": HTTP 409 conflict", "conflict"),
        (reply(400, {"detail": "bad"}), ": HTTP 400: bad", None),
        (reply(422, {"error": 5, "detail": 7}), ": HTTP 422", None),
        (reply(413, ["body_too_large"]), ": HTTP 413", None),
        (reply(413, text="request entity too large"), ": HTTP 413", None),
        (reply(403, {"error": "forbidden", "detail": "not yours"}),
         ": HTTP 403 forbidden: not yours", "forbidden"),
        (reply(404, {"error": "not_authorized"}), ": HTTP 404 not_authorized", "not_authorized"),
    ],
)  # fmt: skip
def test_a_refusal_says_what_the_server_said(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock,
    answer_: requests.Response, message: str, code: str | None,
) -> None:  # fmt: skip
    http = ScriptedHttp(answer_)
    client = scripted(identity, keyring, clock, http)
    with pytest.raises(ServerRejectedError) as caught:
        client.heartbeat({})
    assert type(caught.value) is ServerRejectedError  # only a 403 not_authorized is "enroll"
    assert str(caught.value) == f"POST /devices/{identity.device_id}/heartbeat{message}"
    assert (caught.value.status, caught.value.code) == (answer_.status_code, code)
    assert client.failures == 0  # an answer, not silence


DECOMMISSIONED_ANSWER = {"error": "device_decommissioned", "detail": "reinstate it"}


def test_a_decommissioned_device_is_told_so_wherever_it_asks(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    """Not "enroll again" (its key is what is refused) and not silence (the server answered)."""
    asks = {
        "session": lambda client: client.heartbeat({}),
        "enroll": lambda client: client.enroll(compatible="lab", hostname="cam", token=TOKEN),
    }
    for name, ask in asks.items():
        http = ScriptedHttp(challenge=lambda sent: reply(403, DECOMMISSIONED_ANSWER))
        if name == "enroll":
            http = ScriptedHttp(reply(403, DECOMMISSIONED_ANSWER))
        client = scripted(identity, keyring, clock, http)
        with pytest.raises(DeviceDecommissionedError) as caught:
            ask(client)
        assert str(caught.value).endswith("HTTP 403 device_decommissioned: reinstate it"), name
        assert (caught.value.status, caught.value.code, client.failures) == (
            403, "device_decommissioned", 0,
        )  # fmt: skip
    other = ScriptedHttp(reply(404, DECOMMISSIONED_ANSWER))  # the code under another status
    with pytest.raises(ServerRejectedError) as caught_other:
        scripted(identity, keyring, clock, other).heartbeat({})
    assert type(caught_other.value) is ServerRejectedError


@pytest.mark.parametrize("ca_file", [None, "/etc/fleet/fleet-ca.pem"])
def test_the_server_is_verified_with_the_ca_file_or_the_system_store(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock, ca_file: str | None
) -> None:
    """Every request (the session's included) is verified with [server] ca_file when there is
    one; a failed handshake says what the certificate was checked against."""
    handshake = requests.exceptions.SSLError("[SSL: CERTIFICATE_VERIFY_FAILED] unable to get")
    http = ScriptedHttp(reply(204), handshake)
    client = scripted(identity, keyring, clock, http, ca_file=Path(ca_file) if ca_file else None)
    client.heartbeat({})
    assert {sent.verify for sent in http.sent} == {ca_file}
    with pytest.raises(ServerUnavailableError) as caught:
        client.heartbeat({})
    trust = ca_file or "the system's CA store"
    assert str(caught.value).endswith(
        "TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] unable to get "
        f"(certificates verified against {trust})"
    ), str(caught.value)


TOKEN = "enrollment-token-1"  # noqa: S105 (a test token)


def test_an_enrollment_refused_as_not_authorized_is_not_enrolled(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp(reply(403, {"error": "not_authorized", "detail": "no valid token"}))
    client = scripted(identity, keyring, clock, http)
    with pytest.raises(NotEnrolledError) as caught:
        client.enroll(compatible="lab-device", hostname="cam", token=TOKEN)
    assert str(caught.value) == "POST /devices/enroll: HTTP 403 not_authorized: no valid token"
    assert (caught.value.status, caught.value.code) == (403, "not_authorized")
    [sent] = http.sent
    assert "Authorization" not in sent.headers
    assert sent.json()["enrollment_token"] == TOKEN


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_a_timeout_a_rate_limit_or_a_5xx_is_silence(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock, status: int
) -> None:
    http = ScriptedHttp(reply(status, {"error": "busy"}), reply(204))
    client = scripted(identity, keyring, clock, http)
    with pytest.raises(ServerUnavailableError) as caught:
        client.heartbeat({})
    assert type(caught.value) is ServerUnavailableError
    assert str(caught.value).endswith(f"/heartbeat: {URL}: HTTP {status}")
    assert client.failures == 1
    client.heartbeat({})
    assert client.failures == 0


def test_an_unexpected_success_status_is_a_server_the_device_does_not_understand(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp(reply(201, {"error": "created", "detail": "?"}))
    client = scripted(identity, keyring, clock, http)
    with pytest.raises(ServerUnavailableError) as caught:
        client.heartbeat({})
    assert str(caught.value).endswith(
        f"{URL}: POST /devices/{identity.device_id}/heartbeat: HTTP 201 created: ?"
    )
    assert client.failures == 1


def test_no_connection_is_silence_naming_the_error(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp()
    http.on_challenge = lambda sent: requests.ConnectionError("connection refused")
    client = scripted(identity, keyring, clock, http)
    with pytest.raises(ServerUnavailableError) as caught:
        client.heartbeat({})
    assert str(caught.value) == (
        f"no answer to POST /devices/{identity.device_id}/heartbeat: "
        f"{URL}: ConnectionError: connection refused"
    )


@pytest.mark.parametrize("status", [200, 204])
def test_heartbeats_and_events_take_200_or_204(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock, status: int
) -> None:
    http = ScriptedHttp(reply(status), reply(status))
    client = scripted(identity, keyring, clock, http)
    client.heartbeat({})
    client.send_events([{"event": "a.b", "seq": 1, "fields": {}}])
    assert http.calls("/events")[0].json() == {"events": [{"event": "a.b", "seq": 1, "fields": {}}]}
    assert client.failures == 0


def test_a_failed_checkin_or_events_request_names_the_request(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp(reply(422, {"error": "invalid_request", "detail": "nonce"}), reply(503))
    client = scripted(identity, keyring, clock, http)
    base = f"/devices/{identity.device_id}"
    with pytest.raises(ServerRejectedError) as refused:
        client.checkin(NONCE)
    assert str(refused.value) == f"POST {base}/checkin: HTTP 422 invalid_request: nonce"
    with pytest.raises(ServerUnavailableError) as unanswered:
        client.send_events([{"event": "a.b", "seq": 1, "fields": {}}])
    assert str(unanswered.value) == f"no answer to POST {base}/events: {URL}: HTTP 503"


def test_more_events_than_fit_are_refused_before_sending(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp()
    client = scripted(identity, keyring, clock, http)
    with pytest.raises(ValueError, match="^send_events: more events than fit one request$"):
        client.send_events([{"event": "a.b", "seq": i, "fields": {}} for i in range(101)])
    assert http.sent == []


def test_events_fit_up_to_exactly_the_request_limit() -> None:
    # each event counts its JSON and one separator, over the 13 bytes of {"events":[]}
    def events(total: int) -> list[dict[str, Any]]:
        first = {"e": "x" * 100}
        rest = total - len(b'{"events":[]}') - (len(json.dumps(first, separators=(",", ":"))) + 1)
        second = {"e": "y" * (rest - 1 - len(b'{"e":""}'))}
        return [first, second]

    assert events_that_fit(events(64 * 1024)) == 2
    assert events_that_fit(events(64 * 1024 + 1)) == 1


def test_the_clock_skew_is_the_server_s_date_less_the_device_s_clock(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp(reply(204), reply(204, headers={"Date": "not a date"}))
    client = scripted(identity, keyring, clock, http, wall_clock=lambda: 1_700_000_000.12345)
    skews = [client.clock_skew_s]  # nothing heard yet
    http.date = "Tue, 14 Nov 2023 22:13:30 GMT"  # 1_700_000_010
    client.heartbeat({})
    skews.append(client.clock_skew_s)
    client.heartbeat({})  # an unreadable Date changes nothing
    skews.append(client.clock_skew_s)
    assert skews == [None, 9.877, 9.877]


# --- check-ins ----------------------------------------------------------------------------------


def test_a_checkin_carries_a_fresh_128_bit_nonce_and_the_etag_while_it_is_fresh(
    server_key: SigningKey, identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    device = identity.device_id
    http = ScriptedHttp(echo(server_key, device), reply(304), echo(server_key, device, "e2"))
    client = scripted(identity, keyring, clock, http)
    first = client.checkin()
    assert (first.unchanged, first.server_url, first.answer.etag) == (False, URL, "e1")
    clock.now += 3600 - 0.001
    second = client.checkin()
    assert second.unchanged is True and second.server_url == URL
    assert second.answer == first.answer
    # an hour after the last verified answer (the default), a full signed answer is asked for
    clock.now += 0.001
    third = client.checkin()
    assert third.unchanged is False and third.answer.etag == "e2"
    checkins = http.calls("/checkin")
    assert [c.headers.get("If-None-Match") for c in checkins] == [None, '"e1"', None]
    nonces = [c.json()["nonce"] for c in checkins]
    assert all(re.fullmatch("[0-9a-f]{32}", n) for n in nonces) and len(set(nonces)) == 3


def test_a_304_after_the_refresh_age_is_refused(
    server_key: SigningKey, identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp(echo(server_key, identity.device_id), reply(304))
    client = scripted(identity, keyring, clock, http, answer_refresh_s=600)
    good = client.checkin()
    clock.now += 600
    with pytest.raises(
        AnswerRejectedError, match="^check-in: 304 for a request without If-None-Match$"
    ):
        client.checkin()
    assert "If-None-Match" not in http.calls("/checkin")[-1].headers
    assert client.last_answer == good.answer and client.failures == 1


@pytest.mark.parametrize("nonce", ["ab" * 15, "AB" * 16, "ab" * 33])
def test_a_nonce_outside_the_protocol_is_refused(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock, nonce: str
) -> None:
    http = ScriptedHttp()
    client = scripted(identity, keyring, clock, http)
    with pytest.raises(ValueError, match="^a check-in nonce is 32 to 64 lowercase hex digits$"):
        client.checkin(nonce)
    assert http.sent == []


def test_no_keyring_no_checkin(identity: DeviceIdentity, clock: FakeClock) -> None:
    http = ScriptedHttp()
    client = scripted(identity, None, clock, http)
    with pytest.raises(ServerError, match=r"^no server keyring configured \(\[server\] keyring\)"):
        client.checkin()
    assert http.sent == []


def test_no_url_no_client(identity: DeviceIdentity) -> None:
    with pytest.raises(ServerError, match=r"^no server URL configured \(\[server\] urls\)$"):
        ServerClient([], identity.key, None)


def test_a_rejected_answer_is_reported_once_until_the_server_answers_again(
    server_key: SigningKey, identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    device = identity.device_id
    stale = signed_reply(server_key, device, "ef" * 16)
    other = signed_reply(server_key, "f" * 64, NONCE)
    log = EventLog(io.StringIO(), keep=True)
    http = ScriptedHttp(stale, stale, other, echo(server_key, device), stale)
    client = scripted(identity, keyring, clock, http, log=log)
    nonce_error = "check-in answer does not echo this check-in's nonce: stale"
    for _ in range(2):
        with pytest.raises(AnswerRejectedError, match=f"^{nonce_error}$"):
            client.checkin(NONCE)
    device_error = f"check-in answer is for device {'f' * 16}…, not this one"
    with pytest.raises(AnswerRejectedError, match=f"^{device_error}$"):
        client.checkin(NONCE)
    client.checkin()
    with pytest.raises(AnswerRejectedError):
        client.checkin(NONCE)
    rejected = [e for e in logged(log) if e["event"] == "server.answer_rejected"]
    assert rejected == [
        {"level": "error", "event": "server.answer_rejected", "url": URL, "error": error}
        for error in (nonce_error, device_error, nonce_error)
    ]


# --- the answer's rules, one by one ------------------------------------------------------------

ASSIGNMENT = {
    "release_id": 7, "version": "2.0.0", "security_version": 3,
    "manifest": base64.b64encode(b"manifest").decode(),
    "manifest_sig": base64.b64encode(b"sig").decode(),
    "blobs": [
        {"slot_class": "rootfs", "sha256": "a" * 64, "size": 0, "url": "/blobs/a"},
        {"slot_class": "boot", "sha256": "b" * 64, "size": 12, "url": "https://cdn.example/b"},
    ],
}  # fmt: skip


def test_a_signed_assignment_is_read_field_by_field(
    server_key: SigningKey, keyring: Keyring
) -> None:
    body = signed_body(server_key, answer("d" * 64, assignment=ASSIGNMENT, checkin_interval_s=60))
    verified = verify_answer(body, keyring, "d" * 64, NONCE)
    assert verified.checkin_interval_s == 60
    assert verified.assignment == Assignment(
        release_id=7, version="2.0.0", security_version=3, manifest=b"manifest",
        manifest_sig=b"sig",
        blobs=(
            BlobRef("rootfs", "a" * 64, 0, "/blobs/a"),  # an empty image is an image
            BlobRef("boot", "b" * 64, 12, "https://cdn.example/b"),
        ),
    )  # fmt: skip


def blob(index: int, **changes: Any) -> dict[str, Any]:
    blobs = [dict(b) for b in ASSIGNMENT["blobs"]]  # type: ignore[attr-defined]
    blobs[index].update(changes)
    return {**ASSIGNMENT, "blobs": blobs}


@pytest.mark.parametrize(
    ("assignment", "error"),
    [
        (5, "assignment: must be an object or null"),
        ({**ASSIGNMENT, "blobs": None}, "assignment: blobs must be list, not None"),
        ({**ASSIGNMENT, "release_id": "7"}, "assignment: release_id must be int, not '7'"),
        ({**ASSIGNMENT, "version": 2}, "assignment: version must be str, not 2"),
        ({**ASSIGNMENT, "security_version": True},
         "assignment: security_version must be int, not True"),
        ({**ASSIGNMENT, "manifest": "bWFua WZlc3Q="}, "assignment: manifest is not base64"),
        ({**ASSIGNMENT, "manifest_sig": "c2ln\n"}, "assignment: manifest_sig is not base64"),
        ({**ASSIGNMENT, "manifest_sig": None}, "assignment: manifest_sig must be str, not None"),
        ({**ASSIGNMENT, "blobs": [None]}, "assignment blob 0: must be an object"),
        (blob(1, sha256=None), "assignment blob 1: sha256 must be str, not None"),
        (blob(1, sha256="B" * 64), "assignment blob 1: sha256 must be 64 lowercase hex digits"),
        (blob(1, size="12"), "assignment blob 1: size must be int, not '12'"),
        (blob(1, size=-1), "assignment blob 1: size must not be negative"),
        (blob(1, slot_class=1), "assignment blob 1: slot_class must be str, not 1"),
        (blob(1, url=None), "assignment blob 1: url must be str, not None"),
    ],
)  # fmt: skip
def test_each_malformed_assignment_field_is_named(
    server_key: SigningKey, keyring: Keyring, assignment: Any, error: str
) -> None:
    body = signed_body(server_key, answer("d" * 64, assignment=assignment))
    with pytest.raises(AnswerRejectedError, match=f"^{re.escape(error)}$"):
        verify_answer(body, keyring, "d" * 64, NONCE)


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ([1], "check-in answer: not a JSON object"),
        ({**answer("d" * 64), "format": 2}, "check-in answer: unknown format 2"),
        ({**answer("d" * 64), "device_id": None},
         "check-in answer: device_id must be str, not None"),
        ({**answer("d" * 64), "nonce": 1}, "check-in answer: nonce must be str, not 1"),
        ({**answer("d" * 64), "etag": None}, "check-in answer: etag must be str, not None"),
    ],
)  # fmt: skip
def test_each_malformed_answer_field_is_named(
    server_key: SigningKey, keyring: Keyring, document: Any, error: str
) -> None:
    text = json.dumps(document)
    envelope = sign(text.encode(), [server_key], "assignment")
    body = {"answer": text, "signatures": envelope.to_bytes().decode()}
    with pytest.raises(AnswerRejectedError, match=f"^{re.escape(error)}$"):
        verify_answer(body, keyring, "d" * 64, NONCE)


def test_a_signed_answer_that_is_not_json_is_refused(
    server_key: SigningKey, keyring: Keyring
) -> None:
    text = "not json"
    envelope = sign(text.encode(), [server_key], "assignment")
    body = {"answer": text, "signatures": envelope.to_bytes().decode()}
    with pytest.raises(AnswerRejectedError, match="^check-in answer: signed, but not JSON: "):
        verify_answer(body, keyring, "d" * 64, NONCE)


def test_the_envelope_is_read_as_its_canonical_text_whatever_its_spelling(
    server_key: SigningKey, keyring: Keyring
) -> None:
    body = signed_body(server_key, answer("d" * 64))
    text = body["signatures"]
    assert text.endswith("\n")
    # without its final newline, and as an object whose keys come in another order
    assert verify_answer({**body, "signatures": text[:-1]}, keyring, "d" * 64, NONCE)
    shuffled = dict(reversed(list(json.loads(text).items())))
    assert verify_answer({**body, "signatures": shuffled}, keyring, "d" * 64, NONCE)
    with pytest.raises(AnswerRejectedError, match="^check-in answer not trusted: "):
        verify_answer({**body, "signatures": text[:-1] + " "}, keyring, "d" * 64, NONCE)
    with pytest.raises(
        AnswerRejectedError, match="^check-in answer: signatures must be a signature envelope$"
    ):
        verify_answer({**body, "signatures": [text]}, keyring, "d" * 64, NONCE)


@pytest.mark.parametrize("body", [None, {}, {"answer": 3}, {"signatures": "x"}])
def test_a_response_without_an_answer_says_so(body: Any, keyring: Keyring) -> None:
    with pytest.raises(
        AnswerRejectedError, match="^check-in answer: no signed answer in the response$"
    ):
        verify_answer(body, keyring, "d" * 64, NONCE)


# --- failover, step by step --------------------------------------------------------------------

A, B, C = "https://a.example", "https://b.example", "https://c.example"


def by_url(status: dict[str, int]) -> Answerer:
    """Each server answers with its status of the moment (``status`` may change)."""
    return lambda sent: reply(status[sent.url.split("/api/")[0]])


def test_the_next_url_is_used_once_the_active_one_was_silent_for_failover_after_s_less_a_timeout(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    status = {A: 503, B: 204}
    log = EventLog(io.StringIO(), keep=True)
    http = ScriptedHttp(default=by_url(status))
    client = scripted(
        identity, keyring, clock, http, [A, B], failover_after_s=30.0, timeout_s=2.0,
        backoff_s=100.0, log=log,
    )  # fmt: skip
    clock.now = 1000.0
    with pytest.raises(ServerUnavailableError, match=f"{A}: HTTP 503$"):
        client.heartbeat({})
    # the wait is held to the moment the primary is given up: 28 s of silence, not the backoff
    assert client.retry_delay_s() == pytest.approx(28.0, abs=1e-5)
    clock.now = 1027.5
    assert client.retry_delay_s() == pytest.approx(0.5, abs=1e-5)
    with pytest.raises(ServerUnavailableError):
        client.heartbeat({})  # still the primary's turn
    assert http.sent[-1].url.startswith(A) and client.failures == 2
    clock.now = 1028.0
    assert client.retry_delay_s() == 0.0
    asked = len(http.sent)
    client.heartbeat({})
    # the primary just given up is not probed again at once
    assert all(s.url.startswith(B) for s in http.sent[asked:]) and client.active_url == B
    assert logged(log)[-2:] == [
        {"level": "warning", "event": "server.failover", "previous": A, "url": B,
         "silent_s": 28.0},
        {"level": "debug", "event": "server.session_opened", "url": B, "expires_in_s": 3600},
    ]  # fmt: skip
    # the primary is probed every probe_primary_every_s (300 s) from the switch on
    status[A] = 204
    asked = len(http.sent)
    clock.now = 1028.0 + 299.0
    client.heartbeat({})
    assert [s.url.startswith(B) for s in http.sent[asked:]] == [True]
    clock.now = 1028.0 + 300.0
    client.heartbeat({})
    assert client.active_url == A and http.sent[-1].url.startswith(A)
    assert logged(log)[-1] == {
        "level": "info", "event": "server.failback", "url": A, "previous": B,
    }  # fmt: skip


def test_a_probe_that_finds_both_urls_silent_names_both(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    status = {A: 503, B: 204}
    http = ScriptedHttp(default=by_url(status))
    client = scripted(identity, keyring, clock, http, [A, B], failover_after_s=30.0, timeout_s=2.0)
    with pytest.raises(ServerUnavailableError):
        client.heartbeat({})
    clock.now += 30
    client.heartbeat({})
    status[B] = 500
    clock.now += 300
    with pytest.raises(ServerUnavailableError) as caught:
        client.heartbeat({})
    assert str(caught.value) == (
        f"no answer to POST /devices/{identity.device_id}/heartbeat: {A}: HTTP 503; {B}: HTTP 500"
    )
    assert client.active_url == B  # a failed probe of the primary changes nothing


def test_going_round_urls_that_are_all_down_is_news_only_until_each_was_tried(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    log = EventLog(io.StringIO(), keep=True)
    http = ScriptedHttp(default=lambda sent: reply(503))
    client = scripted(
        identity, keyring, clock, http, [A, B, C], failover_after_s=30.0, timeout_s=2.0, log=log
    )  # fmt: skip
    for now in (1000.0, 1030.12345, 1060.0, 1090.0):
        clock.now = now
        with pytest.raises(ServerUnavailableError):
            client.heartbeat({})
    failovers = [e for e in logged(log) if e["event"] == "server.failover"]
    assert failovers == [
        {"level": "warning", "event": "server.failover", "previous": A, "url": B,
         "silent_s": 30.123},
        {"level": "warning", "event": "server.failover", "previous": B, "url": C,
         "silent_s": 29.877},
        {"level": "debug", "event": "server.failover", "previous": C, "url": A,
         "silent_s": 30.0},
    ]  # fmt: skip


def test_with_one_url_there_is_nothing_to_fail_over_to(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    log = EventLog(io.StringIO(), keep=True)
    http = ScriptedHttp(default=lambda sent: reply(503))
    client = scripted(identity, keyring, clock, http, failover_after_s=30.0, timeout_s=2.0, log=log)
    for _ in range(3):
        with pytest.raises(ServerUnavailableError):
            client.heartbeat({})
        clock.now += 40
    assert "server.failover" not in [e["event"] for e in logged(log)]


def test_a_failover_time_no_longer_than_the_timeout_switches_at_once(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    status = {A: 503, B: 204}
    http = ScriptedHttp(default=by_url(status))
    client = scripted(identity, keyring, clock, http, [A, B], failover_after_s=5.0, timeout_s=5.0)
    with pytest.raises(ServerUnavailableError):
        client.heartbeat({})
    assert client.retry_delay_s() == 0.0
    client.heartbeat({})
    assert client.active_url == B


def test_the_default_failover_time_is_30_s(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp(default=lambda sent: reply(503))
    client = scripted(identity, keyring, clock, http, [A, B], backoff_s=100.0)
    with pytest.raises(ServerUnavailableError):
        client.heartbeat({})
    # 30 s less the 10 s a request may last
    assert client.retry_delay_s() == pytest.approx(20.0, abs=1e-5)


# --- enrollment and where blobs are -------------------------------------------------------------


def server_keys_answer(identity: DeviceIdentity, **document: Any) -> requests.Response:
    return reply(200, {"device_id": identity.device_id, **document})


def test_enrollment_returns_the_server_s_keys_and_where_it_answered(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp(
        server_keys_answer(identity, server_keys=["ab" * 32]), server_keys_answer(identity)
    )
    client = scripted(identity, keyring, clock, http, [URL + "/"])
    result = client.enroll(compatible="lab-device", hostname="cam", token=None)
    assert result == EnrollResult(identity.device_id, ("ab" * 32,), URL)
    [sent] = http.sent
    assert sent.url == f"{URL}/api/v1/devices/enroll" and "enrollment_token" not in sent.json()
    # the keys are informational: an answer without them is an enrollment all the same
    assert client.enroll(compatible="lab-device", hostname="cam", token=None).server_keys == ()


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({"device_id": "f" * 64}, "enrollment answered for device 'ffffffffffffffff'"),
        ({"server_keys": "ab"}, "enrollment answer: server_keys must be a list of strings"),
        ({"server_keys": [1]}, "enrollment answer: server_keys must be a list of strings"),
    ],
)
def test_an_enrollment_answer_that_does_not_fit_is_no_answer(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock,
    document: dict[str, Any], error: str,
) -> None:  # fmt: skip
    http = ScriptedHttp(server_keys_answer(identity, **document))
    client = scripted(identity, keyring, clock, http)
    with pytest.raises(ServerUnavailableError, match=f"{URL}: {re.escape(error)}$"):
        client.enroll(compatible="lab-device", hostname="cam", token=None)
    assert client.failures == 1


def test_urls_given_with_a_final_slash_are_used_without_it(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    http = ScriptedHttp(reply(204))
    client = scripted(
        identity, keyring, clock, http, ["https://fleet.example/X/"],
        mirrors=["https://mirror.example/X/"],
    )  # fmt: skip
    assert client.active_url == "https://fleet.example/X"
    client.heartbeat({})
    assert http.sent[0].url.startswith("https://fleet.example/X/api/v1/devices/")
    assignment = Assignment(1, "2.0.0", 1, b"", b"", (BlobRef("rootfs", "0" * 64, 1, "/b/0"),))
    assert client.blob_urls(assignment, "https://other.example/X/") == {
        "0" * 64: ["https://other.example/X/b/0", f"https://mirror.example/X/blobs/{'0' * 64}"]
    }


def test_a_blob_url_with_a_host_of_its_own_keeps_the_server_s_scheme(
    identity: DeviceIdentity, keyring: Keyring, clock: FakeClock
) -> None:
    client = scripted(identity, keyring, clock, ScriptedHttp(), ["https://fleet.example/prefix"])
    assignment = Assignment(
        1, "2.0.0", 1, b"", b"", (BlobRef("rootfs", "0" * 64, 1, "//cdn.example/z"),)
    )
    assert client.blob_urls(assignment) == {"0" * 64: ["https://cdn.example/z"]}
