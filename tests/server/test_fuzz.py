"""Whatever a client sends, the answer is never a 5xx, and a refused upload stores nothing."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.models import Release
from tests.server.conftest import FakeDevice, Harness

MakeBundle = Callable[..., Path]
Enrolled = Callable[..., FakeDevice]

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ASCII = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "public_key", "compatible", "hostname", "enrollment_token", "proof", "challenge",
    "signature", "nonce", "version", "booted", "primary", "trial", "slots", "updater_state",
    "health", "temperature_c", "free_space_mb", "uptime_s", "clock", "clock_skew_s",
    "safe_mode", "events", "event", "seq", "fields",
]  # fmt: skip
HEARTBEAT = {
    "version": "1.0.0", "booted": "a", "primary": "a", "trial": False,
    "slots": {"a": {"status": "good", "version": "1.0.0"}}, "updater_state": "idle",
    "health": [{"name": "x", "ok": True}], "temperature_c": 50.0,
    "free_space_mb": 100, "uptime_s": 1.0, "clock": 1.0, "clock_skew_s": 0.0, "safe_mode": False,
}  # fmt: skip
ENDPOINTS = ["enroll", "challenge", "session", "checkin", "heartbeat", "events"]


def assert_well_formed(response: Any) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400 and response.request.method != "HEAD":
        assert set(response.json()) == {"error", "detail"}, response.text
        assert "\n" not in response.json()["detail"]


def valid_bodies(device: FakeDevice, token: str, challenge: str) -> dict[str, dict[str, Any]]:
    return {
        "enroll": device.enroll_body(token),
        "challenge": {},
        "session": device.session_body(challenge),
        "checkin": {"nonce": secrets.token_hex(16)},
        "heartbeat": HEARTBEAT,
        "events": {"events": [{"event": "install.started", "seq": 1, "fields": {}}]},
    }


@st.composite
def bodies(draw: st.DrawFn, valid: dict[str, Any]) -> bytes:
    kind = draw(st.sampled_from(["raw", "json", "fields", "mutated", "valid"]))
    if kind == "raw":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    if kind == "fields":
        chosen = draw(st.dictionaries(st.sampled_from(FIELDS) | ASCII, JSON_VALUES, max_size=6))
        return json.dumps(chosen).encode()
    body = dict(valid)
    if kind == "mutated" and body:
        key = draw(st.sampled_from(sorted(body)))
        if draw(st.booleans()):
            body[key] = draw(JSON_VALUES)
        else:
            del body[key]
    return json.dumps(body).encode()


@FUZZ
@given(data=st.data())
def test_device_endpoints_never_fail_with_5xx(
    harness: Harness, enrolled: Enrolled, data: st.DataObject
) -> None:
    if not harness.scratch:  # hypothesis runs many examples per fixture: set up once
        harness.scratch.update(
            device=enrolled(),
            other=enrolled(hostname="cam-other"),
            token=harness.enrollment_token(1000),
        )
    device, other = harness.scratch["device"], harness.scratch["other"]
    endpoint = data.draw(st.sampled_from(ENDPOINTS))
    challenge = device.challenge() if endpoint == "session" else "0" * 64
    valid = valid_bodies(device, harness.scratch["token"], challenge)[endpoint]
    body = data.draw(bodies(valid))
    target = data.draw(
        st.sampled_from([device.id, other.id, "0" * 64]) | ASCII.filter(lambda s: "/" not in s)
    )
    auth = data.draw(
        st.sampled_from(
            [None, device.headers, other.headers, harness.admin, {"Authorization": "Bearer x"}]
        )
        | ASCII.map(lambda value: {"Authorization": value})
    )
    headers = dict(auth or {})
    if data.draw(st.booleans()):
        headers["If-None-Match"] = data.draw(ASCII)
    path = (
        "/api/v1/devices/enroll" if endpoint == "enroll" else f"/api/v1/devices/{target}/{endpoint}"
    )
    assert_well_formed(harness.client.post(path, content=body, headers=headers))


@FUZZ
@given(data=st.data())
def test_blob_requests_never_fail_with_5xx(
    harness: Harness, make_bundle: MakeBundle, data: st.DataObject
) -> None:
    if harness.count(Release) == 0:
        harness.upload(make_bundle())
    with harness.db.read() as session:
        sha = session.query(Release).one().images[0].sha256
    headers = {
        name: data.draw(
            st.sampled_from(["bytes=0-", "bytes=-1", f'"{sha}"', "bytes=5-2"])
            | ASCII
            | st.from_regex(r"bytes=[0-9]{0,6}-[0-9]{0,6}", fullmatch=True)
        )
        for name in data.draw(st.sets(st.sampled_from(["Range", "If-Range", "If-None-Match"])))
    }
    method = data.draw(st.sampled_from(["GET", "HEAD"]))
    response = harness.client.request(method, f"/blobs/{sha}", headers=headers)
    assert_well_formed(response)
    if response.status_code == 206:
        start, end = response.headers["content-range"].split()[1].split("/")[0].split("-")
        assert int(response.headers["content-length"]) == int(end) - int(start) + 1


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_damaged_uploads_are_422_and_store_nothing(
    harness: Harness, make_bundle: MakeBundle, data: st.DataObject
) -> None:
    good = make_bundle(compression=data.draw(st.sampled_from(["none", "zstd"]))).read_bytes()
    damage = data.draw(st.sampled_from(["flip", "truncate", "insert", "random"]))
    if damage == "flip":
        position = data.draw(st.integers(0, len(good) - 1))
        bit = data.draw(st.integers(0, 7))
        damaged = good[:position] + bytes([good[position] ^ (1 << bit)]) + good[position + 1 :]
    elif damage == "truncate":
        damaged = good[: data.draw(st.integers(0, len(good) - 1))]
    elif damage == "insert":
        position = data.draw(st.integers(0, len(good)))
        damaged = good[:position] + data.draw(st.binary(min_size=1, max_size=600)) + good[position:]
    else:
        damaged = data.draw(st.binary(max_size=2000))
    response = harness.upload(damaged)
    assert_well_formed(response)
    assert response.status_code == 422, (damage, response.text)
    assert harness.count(Release) == 0
    assert harness.blob_files() == []
    assert list(harness.settings.upload_dir.iterdir()) == []
