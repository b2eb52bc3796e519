"""The device's protocol client: the rules of a check-in answer, what fits one request, and,
against the server simulator, what only it can do: answers of a form the real server never
signs, a server that forgot the device, failover between URLs, backoff, a skewed clock.

Enrollment, sessions, signed check-ins, ETags and 304, replayed answers, heartbeats and events
are tested against the real server: tests/integration/test_device_protocol.py."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signing.keyring import Keyring
from signing.keys import SigningKey, generate_key
from signing.signature import sign
from tests.server_simulator import FakeClock, Faults, ServerSimulator, SimRelease
from updater.client import (
    AnswerRejectedError,
    Assignment,
    BlobRef,
    NotEnrolledError,
    ServerClient,
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
