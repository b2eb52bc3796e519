"""The device protocol (docs/device-protocol.md) as a device sees it, and the operators' side."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fastapi.testclient import TestClient
from sqlalchemy import event, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import ORMExecuteState, Session
from sqlalchemy.sql import ClauseElement

from server import devices
from server.app import create_app
from server.assignment import SignedAnswer, assignment_etag
from server.errors import UnknownDeviceError
from server.models import AuditRow, Device, DeviceChallenge, EnrollmentToken, Release, Rollout
from server.schemas import Event
from server.settings import LAST_SEEN_RESOLUTION_S, utc
from signing.errors import BadSignatureError
from signing.keyring import Keyring
from signing.keys import SigningKey, key_id
from signing.signature import SignatureEnvelope
from tests.server.conftest import FakeDevice, Harness

MakeBundle = Callable[..., Path]
Enrolled = Callable[..., FakeDevice]


def verified_answer(harness: Harness, response: Any, nonce: str, device: FakeDevice) -> Any:
    """Check a check-in answer the way a device must; return the answer document."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"answer", "signatures"}
    server_key = Ed25519PublicKey.from_public_bytes(harness.server_public_key())
    keyring = Keyring({key_id(server_key): server_key})
    envelope = SignatureEnvelope.from_bytes(body["signatures"].encode())
    keyring.verify(body["answer"].encode(), envelope, "assignment")
    answer = json.loads(body["answer"])
    assert answer["format"] == 1
    assert answer["device_id"] == device.id
    assert answer["nonce"] == nonce
    assert response.headers["etag"] == f'"{answer["etag"]}"'
    return answer


# --- enrollment -------------------------------------------------------------------------------


def test_enroll_with_token_uses_it_once_per_device(harness: Harness) -> None:
    token = harness.enrollment_token(uses=2)
    first, second, third = (FakeDevice(harness.client, hostname=f"cam-{i}") for i in range(3))
    answer = first.enroll(token)
    assert answer.status_code == 200
    assert answer.json() == {
        "device_id": first.id,
        "server_keys": [harness.server_public_key().hex()],
    }
    # enrolling again is harmless and uses up nothing
    assert first.enroll(token).json()["device_id"] == first.id
    assert first.enroll().status_code == 200
    assert second.enroll(token).status_code == 200
    refused = third.enroll(token)
    assert refused.status_code == 403
    assert refused.json()["error"] == "not_authorized"
    with harness.db.read() as session:
        assert session.query(EnrollmentToken).one().uses_left == 0
    assert harness.count(Device) == 2


def test_enrollment_token_expires_by_server_clock(harness: Harness) -> None:
    token = harness.enrollment_token(uses=5, expires_in=600)
    assert FakeDevice(harness.client).enroll(token).status_code == 200
    harness.clock.advance(601)
    assert FakeDevice(harness.client).enroll(token).status_code == 403


def test_enroll_refusals(harness: Harness) -> None:
    device = FakeDevice(harness.client)
    assert device.enroll().status_code == 403  # no token, not pre-authorized
    assert device.enroll("fleet_enroll_made-up").status_code == 403
    token = harness.enrollment_token()
    forged = device.enroll_body(token)
    forged["proof"] = FakeDevice(harness.client).enroll_body()["proof"]  # someone else's key
    response = harness.client.post("/api/v1/devices/enroll", json=forged)
    assert response.status_code == 403
    assert "proof" in response.json()["detail"]
    for change in (
        {"public_key": "zz" * 32},
        {"compatible": ""},
        {"hostname": "a b"},
        {"extra": 1},
        {"proof": 5},
    ):
        body = {**device.enroll_body(token), **change}
        response = harness.client.post("/api/v1/devices/enroll", json=body)
        assert response.status_code == 422, change
        assert response.json()["error"] == "invalid_request"
    # the token was not used by any refused attempt
    assert device.enroll(token).status_code == 200


def test_preauthorized_key_enrolls_without_token(harness: Harness) -> None:
    device = FakeDevice(harness.client)
    response = harness.client.post(
        "/api/v1/preauthorized-keys",
        json={"public_key": device.public_hex},
        headers=harness.operator,
    )
    assert response.status_code == 201
    assert response.json() == {"device_id": device.id}
    assert (
        harness.client.post(
            "/api/v1/preauthorized-keys",
            json={"public_key": device.public_hex},
            headers=harness.viewer,
        ).status_code
        == 403
    )
    assert device.enroll().status_code == 200
    assert device.enroll("fleet_enroll_invalid").status_code == 200


# --- sessions ---------------------------------------------------------------------------------


def test_challenge_session_and_replay(harness: Harness) -> None:
    device = FakeDevice(harness.client)
    device.enroll(harness.enrollment_token())
    challenge = harness.client.post(f"/api/v1/devices/{device.id}/challenge").json()
    assert challenge["expires_in"] == 60
    body = device.session_body(challenge["challenge"])
    opened = harness.client.post(f"/api/v1/devices/{device.id}/session", json=body)
    assert opened.status_code == 200
    assert opened.json()["expires_in"] == 3600
    replayed = harness.client.post(f"/api/v1/devices/{device.id}/session", json=body)
    assert replayed.status_code == 401
    assert replayed.json()["error"] == "challenge_invalid"


def test_session_refusals(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled()
    other = enrolled(hostname="cam-0002")
    url = f"/api/v1/devices/{device.id}/session"
    # a signature by another key
    challenge = device.challenge()
    wrong = {"challenge": challenge, "signature": other.session_body(challenge)["signature"]}
    response = harness.client.post(url, json=wrong)
    assert response.status_code == 401
    assert response.json()["error"] == "signature_invalid"
    # a challenge issued to another device
    foreign = other.challenge()
    assert harness.client.post(url, json=device.session_body(foreign)).status_code == 401
    # an expired challenge
    late = device.challenge()
    harness.clock.advance(61)
    assert harness.client.post(url, json=device.session_body(late)).status_code == 401
    # unknown device
    stranger = FakeDevice(harness.client)
    unknown = harness.client.post(f"/api/v1/devices/{stranger.id}/challenge")
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "unknown_device"
    assert harness.client.post("/api/v1/devices/not-hex/challenge").status_code == 422


def test_open_challenges_are_bounded(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled()
    for _ in range(30):
        device.challenge()
    assert harness.count(DeviceChallenge) <= 8
    harness.clock.advance(61)
    device.challenge()
    assert harness.count(DeviceChallenge) == 1


def test_session_expires_and_is_bound_to_its_device(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled()
    other = enrolled(hostname="cam-0002")
    assert device.checkin().status_code == 200
    foreign = harness.client.post(
        f"/api/v1/devices/{other.id}/checkin", json={"nonce": "00" * 16}, headers=device.headers
    )
    assert foreign.status_code == 403
    assert foreign.json()["error"] == "forbidden"
    for path in ("heartbeat", "events"):
        response = harness.client.post(
            f"/api/v1/devices/{other.id}/{path}", json={}, headers=device.headers
        )
        assert response.status_code == 403, path
    # operator tokens are not device sessions, and vice versa
    assert (
        harness.client.post(
            f"/api/v1/devices/{device.id}/checkin", json={"nonce": "00" * 16}, headers=harness.admin
        ).status_code
        == 401
    )
    assert harness.client.get("/api/v1/devices", headers=device.headers).status_code == 401
    harness.clock.advance(3601)
    expired = device.checkin()
    assert expired.status_code == 401
    assert expired.headers["www-authenticate"] == "Bearer"
    device.login()
    assert device.checkin().status_code == 200


# --- check-in ---------------------------------------------------------------------------------


def test_checkin_signed_answer_etag_and_304(
    harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle
) -> None:
    device = enrolled()
    nonce = "ab" * 16
    answer = verified_answer(harness, device.checkin(nonce), nonce, device)
    assert answer["assignment"] is None
    unassigned_etag = f'"{answer["etag"]}"'
    not_modified = device.checkin(etag=unassigned_etag)
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    assert not_modified.headers["etag"] == unassigned_etag

    release = harness.upload(make_bundle(version="2.0.0", bootfs=True)).json()
    assigned = harness.client.post(
        f"/api/v1/devices/{device.id}/assignment",
        json={"version": "2.0.0"},
        headers=harness.operator,
    )
    assert assigned.status_code == 200
    assert assigned.json()["assigned_version"] == "2.0.0"
    changed = device.checkin(nonce, etag=unassigned_etag)
    answer = verified_answer(harness, changed, nonce, device)
    assignment = answer["assignment"]
    assert assignment["version"] == "2.0.0"
    assert assignment["release_id"] == release["id"]
    assert assignment["security_version"] == 1
    bundle_manifest = base64.b64decode(assignment["manifest"])
    assert json.loads(bundle_manifest)["version"] == "2.0.0"
    SignatureEnvelope.from_bytes(base64.b64decode(assignment["manifest_sig"]))
    # the images, then each one's chunk index (tests/server/test_chunk_store.py)
    assert [(b["slot_class"], b["sha256"], b["size"], b["url"]) for b in assignment["blobs"]] == [
        *((i["slot_class"], i["sha256"], i["size"], i["url"]) for i in release["images"]),
        *(
            (
                i["slot_class"],
                i["chunk_index"]["sha256"],
                i["chunk_index"]["size"],
                i["chunk_index"]["url"],
            )
            for i in release["images"]
        ),
    ]
    etag = changed.headers["etag"]
    assert etag != unassigned_etag
    assert device.checkin(etag=etag).status_code == 304
    assert device.checkin(etag=f'W/{etag}, "zzz"').status_code == 304
    assert device.checkin(etag="*").status_code == 200
    # a fresh nonce gets a fresh signature over a different document
    other_nonce = "cd" * 32
    assert verified_answer(harness, device.checkin(other_nonce), other_nonce, device)


def test_answer_for_another_nonce_or_device_does_not_verify(
    harness: Harness, enrolled: Enrolled
) -> None:
    device = enrolled()
    body = device.checkin("ab" * 16).json()
    tampered = body["answer"].replace("ab" * 16, "cd" * 16)
    server_key = Ed25519PublicKey.from_public_bytes(harness.server_public_key())
    keyring = Keyring({key_id(server_key): server_key})
    envelope = SignatureEnvelope.from_bytes(body["signatures"].encode())
    with pytest.raises(BadSignatureError):
        keyring.verify(tampered.encode(), envelope, "assignment")


def test_checkin_bad_bodies(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled()
    url = f"/api/v1/devices/{device.id}/checkin"
    for body in (
        b"",
        b"{",
        b"[]",
        b'{"nonce": 1}',
        b'{"nonce": "abc"}',
        b'{"nonce": "' + b"a" * 66 + b'"}',
    ):
        response = harness.client.post(url, content=body, headers=device.headers)
        assert response.status_code == 422, body
        assert set(response.json()) == {"error", "detail"}
    huge = b'{"nonce": "' + b"a" * 70_000 + b'"}'
    assert harness.client.post(url, content=huge, headers=device.headers).status_code == 413


# --- heartbeats, events, listing --------------------------------------------------------------


def test_heartbeat_is_kept_and_listed(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled(hostname="cam-0042")
    assert (
        harness.client.get("/api/v1/devices", headers=harness.viewer).json()["devices"][0]["state"]
        == "enrolled"
    )
    harness.clock.advance(30)
    response = device.heartbeat(
        version="2.1.0", updater_state="downloading", role="camera", tags=["north", "hw2", "north"]
    )
    assert response.status_code == 204
    listing = harness.client.get("/api/v1/devices", headers=harness.viewer).json()["devices"]
    assert listing == [
        {
            "id": device.id,
            "hostname": "cam-0042",
            "compatible": "metrica-rpi4",
            "role": "camera",
            "tags": ["hw2", "north"],
            "enrolled": "2023-11-14T22:13:20Z",
            "last_seen": "2023-11-14T22:13:50Z",
            "version": "2.1.0",
            "state": "downloading",
            "assigned_version": None,
            "clock_skew_s": 3.2,
            "status": "active",
            "status_reason": None,
            "status_since": None,
        }
    ]
    one = harness.client.get(f"/api/v1/devices/{device.id}", headers=harness.viewer).json()
    assert one["last_heartbeat"]["slots"]["b"] == {"status": "good", "version": "0.9.0"}
    assert one["last_heartbeat_at"] == "2023-11-14T22:13:50Z"
    device.heartbeat(safe_mode=True)
    assert (
        harness.client.get(f"/api/v1/devices/{device.id}", headers=harness.viewer).json()["state"]
        == "safe_mode"
    )
    device.heartbeat(clock_skew_s=None, clock=harness.clock.now - 10.0)
    skew = harness.client.get(f"/api/v1/devices/{device.id}", headers=harness.viewer).json()
    assert skew["clock_skew_s"] == pytest.approx(10.0)
    for change in (
        {"trial": "no"},
        {"temperature_c": "hot"},
        {"unknown": 1},
        {"slots": {"a": {"status": "good", "extra": 1}}},
        {"free_space_mb": -1},
        {"health": [{"name": "x\ny", "ok": True}]},
    ):
        assert device.heartbeat(**change).status_code == 422, change


def test_events_dedup_by_seq_and_go_to_audit(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled()
    assert device.events(("install.started", 1), ("install.failed", 2)).status_code == 204
    # a resend of the same batch plus a new event, out of order
    assert device.events(("boot_check.committed", 3), ("install.started", 1)).status_code == 204
    assert device.events(("install.failed", 2)).status_code == 204
    assert device.events().status_code == 204
    with harness.db.read() as session:
        rows = session.query(AuditRow).filter(AuditRow.actor == f"device:{device.id}").all()
    stored = [
        (row.action, json.loads(row.details)["seq"])
        for row in rows
        if row.action != "device.enrolled"
    ]
    assert stored == [("install.started", 1), ("install.failed", 2), ("boot_check.committed", 3)]
    too_many = {"events": [{"event": "x", "seq": i} for i in range(101)]}
    response = harness.client.post(
        f"/api/v1/devices/{device.id}/events", json=too_many, headers=device.headers
    )
    assert response.status_code == 422
    for bad in ({"event": "Bad Name", "seq": 4}, {"event": "x", "seq": -1}, {"event": "x"}):
        response = harness.client.post(
            f"/api/v1/devices/{device.id}/events", json={"events": [bad]}, headers=device.headers
        )
        assert response.status_code == 422, bad


def test_a_resent_batch_is_absorbed_and_the_next_seq_is_stored(
    harness: Harness, enrolled: Enrolled
) -> None:
    """The boundary a device meets after losing the answer to a batch: everything up to the
    highest stored seq is a resend, the seq right after it is new."""
    device = enrolled()

    def stored() -> list[tuple[str, int]]:
        with harness.db.read() as session:
            rows = session.query(AuditRow).filter(AuditRow.actor == f"device:{device.id}")
            return [
                (row.action, json.loads(row.details)["seq"])
                for row in rows.order_by(AuditRow.seq)
                if row.action != "device.enrolled"
            ]

    batch = (("install.started", 41), ("install.verified", 42))
    assert device.events(*batch).status_code == 204
    assert stored() == list(batch)
    assert device.events(*batch).status_code == 204  # the answer was lost: sent again
    assert device.events(("install.verified", 42)).status_code == 204  # the last one alone
    assert stored() == list(batch)
    assert device.events(("install.verified", 42), ("boot_check.committed", 43)).status_code == 204
    assert stored() == [*batch, ("boot_check.committed", 43)]
    assert device.events(("health.ok", 44)).status_code == 204
    assert stored()[-1] == ("health.ok", 44)


# --- assignment -------------------------------------------------------------------------------


def test_assignment_rules(harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle) -> None:
    device = enrolled()
    harness.upload(make_bundle("a.bundle", version="2.0.0"))
    harness.upload(make_bundle("b.bundle", version="2.0.1", compatible="metrica-cm4"))
    url = f"/api/v1/devices/{device.id}/assignment"

    def assign(version: Any, headers: dict[str, str] | None = None) -> Any:
        return harness.client.post(
            url, json={"version": version}, headers=harness.operator if headers is None else headers
        )

    incompatible = assign("2.0.1")
    assert incompatible.status_code == 409
    assert incompatible.json()["error"] == "incompatible_release"
    assert assign("9.9.9").status_code == 404
    assert assign("2.0.0", harness.viewer).status_code == 403
    assert assign("2.0.0", {}).status_code == 401
    assert assign(2).status_code == 422
    unknown = harness.client.post(
        f"/api/v1/devices/{'0' * 64}/assignment",
        json={"version": "2.0.0"},
        headers=harness.operator,
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "unknown_device"
    assert assign("2.0.0").json()["assigned_version"] == "2.0.0"
    assert assign(None).json()["assigned_version"] is None
    actions = [
        e["action"]
        for e in harness.client.get("/api/v1/audit", headers=harness.viewer).json()["entries"]
    ]
    assert actions.count("device.assigned") == 1
    assert actions.count("device.unassigned") == 1


def test_operator_tokens_by_admin_only(harness: Harness) -> None:
    body = {"name": "ci", "role": "viewer"}
    assert (
        harness.client.post(
            "/api/v1/operator-tokens", json=body, headers=harness.operator
        ).status_code
        == 403
    )
    created = harness.client.post("/api/v1/operator-tokens", json=body, headers=harness.admin)
    assert created.status_code == 201
    token = created.json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    assert harness.client.get("/api/v1/devices", headers=headers).status_code == 200
    assert (
        harness.client.post(
            "/api/v1/enrollment-tokens", json={"uses": 1}, headers=headers
        ).status_code
        == 403
    )
    bad = harness.client.post(
        "/api/v1/operator-tokens", json={"name": "x", "role": "root"}, headers=harness.admin
    )
    assert bad.status_code == 422


def test_two_server_processes_share_one_database(
    harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle
) -> None:
    """Nothing that matters lives in a process: a second app on the same settings carries on."""
    device = enrolled()
    harness.upload(make_bundle(version="2.0.0"))
    second = create_app(harness.settings)
    with TestClient(second) as other:
        assigned = other.post(
            f"/api/v1/devices/{device.id}/assignment",
            json={"version": "2.0.0"},
            headers=harness.operator,
        )
        assert assigned.status_code == 200
        device.client = other  # the session opened on the first server works on the second
        nonce = "ef" * 16
        answer = verified_answer(harness, device.checkin(nonce), nonce, device)
        assert answer["assignment"]["version"] == "2.0.0"
        blob = other.get(answer["assignment"]["blobs"][0]["url"])
        assert blob.status_code == 200
    second.state.fleet.db.dispose()


def test_a_replayed_enrollment_cannot_change_the_details(harness: Harness) -> None:
    """The proof covers compatible and hostname: a copy of a device's enroll request, sent
    first with other details, is refused, and the device then enrolls as itself."""
    token = harness.enrollment_token(uses=2)
    device = FakeDevice(harness.client)
    replayed = device.enroll_body(token) | {"compatible": "other-board", "hostname": "evil"}
    refused = harness.client.post("/api/v1/devices/enroll", json=replayed)
    assert refused.status_code == 403
    assert device.enroll(token).status_code == 200
    with harness.db.read() as session:
        assert session.query(Device).one().compatible == device.compatible


def test_nobody_can_crowd_out_a_devices_challenge(harness: Harness, enrolled: Enrolled) -> None:
    """Challenges are stateless (a MAC, not a row): asking for many, as anyone may, neither
    evicts the device's own nor grows the database."""
    device = enrolled()
    with harness.db.read() as session:
        stored = session.query(DeviceChallenge).count()  # used ones, until they expire
    mine = device.challenge()
    for _ in range(100):
        device.challenge()
    with harness.db.read() as session:
        assert session.query(DeviceChallenge).count() == stored
    url = f"/api/v1/devices/{device.id}/session"
    assert harness.client.post(url, json=device.session_body(mine)).status_code == 200
    again = harness.client.post(url, json=device.session_body(mine))
    assert again.status_code == 401 and again.json()["error"] == "challenge_invalid"
    forged = mine[:-1] + ("0" if mine[-1] != "0" else "1")
    assert harness.client.post(url, json=device.session_body(forged)).status_code == 401


# --- check-in rules, called directly ------------------------------------------------------------

KEY = SigningKey.from_private_key(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
INTERVAL = 120


def at(harness: Harness, seconds: float = 0.0) -> datetime:
    return utc(harness.clock) + timedelta(seconds=seconds)


def last_seen(harness: Harness, device_id: str) -> datetime:
    with harness.db.read() as session:
        device = session.get(Device, device_id)
        assert device is not None
        return device.last_seen


def start_rollout(harness: Harness, version: str, state: str) -> None:
    with harness.db.write() as session:
        release = session.scalars(select(Release).where(Release.version == version)).one()
        session.add(
            Rollout(
                release_id=release.id,
                device_ids=None,
                selector=None,
                canary_ids="[]",
                stages="[100]",
                soak_s=60,
                max_failure_rate=0.1,
                install_deadline_s=3600,
                rollback_on_halt=False,
                state=state,
                stage=0,
                stage_started=at(harness),
                reason=None,
                acknowledged=None,
                created=at(harness),
                created_by="operator:test",
            )
        )


@pytest.fixture
def assigned(harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle) -> tuple[str, str]:
    """A device with release 2.0.0 assigned: its id and the release's manifest SHA-256."""
    device = enrolled()
    harness.upload(make_bundle(version="2.0.0"))
    devices.assign(harness.db, device.id, "2.0.0", actor="operator:test", now=at(harness))
    with harness.db.read() as session:
        sha = session.scalars(select(Release.manifest_sha256)).one()
    return device.id, sha


def check_in(
    harness: Harness, device_id: str, if_none_match: str | None, seconds: float
) -> SignedAnswer | devices.NotModified:
    return devices.check_in(
        harness.db, device_id, "ab" * 16, if_none_match, KEY, at(harness, seconds), INTERVAL
    )


def test_checkin_asks_for_the_rollout_interval_only_while_a_rollout_is_active(
    harness: Harness, assigned: tuple[str, str]
) -> None:
    device_id, sha = assigned
    quiet = check_in(harness, device_id, None, 1)
    assert isinstance(quiet, SignedAnswer)
    assert json.loads(quiet.answer)["checkin_interval_s"] is None
    assert quiet.etag == assignment_etag(device_id, sha, None)
    start_rollout(harness, "2.0.0", "completed")
    ended = check_in(harness, device_id, None, 2)
    assert isinstance(ended, SignedAnswer)
    assert json.loads(ended.answer)["checkin_interval_s"] is None
    for state in ("paused", "running"):
        start_rollout(harness, "2.0.0", state)
        active = check_in(harness, device_id, None, 3)
        assert isinstance(active, SignedAnswer)
        assert json.loads(active.answer)["checkin_interval_s"] == INTERVAL
        assert active.etag == assignment_etag(device_id, sha, INTERVAL)


@pytest.mark.parametrize("rollout", [None, "running"])
def test_recent_unchanged_checkin_only_reads(
    harness: Harness, assigned: tuple[str, str], rollout: str | None
) -> None:
    device_id, sha = assigned
    if rollout is not None:
        start_rollout(harness, "2.0.0", rollout)
    interval = INTERVAL if rollout is not None else None
    etag = assignment_etag(device_id, sha, interval)
    first = check_in(harness, device_id, None, 0)
    assert isinstance(first, SignedAnswer)
    assert first.etag == etag
    seen = last_seen(harness, device_id)
    # within the resolution: answered from the read alone, last_seen kept
    again = check_in(harness, device_id, f'"{etag}"', LAST_SEEN_RESOLUTION_S - 1)
    assert again == devices.NotModified(etag)
    assert last_seen(harness, device_id) == seen
    # at the resolution: still 304, and last_seen moves on
    later = check_in(harness, device_id, f'W/"{etag}"', LAST_SEEN_RESOLUTION_S)
    assert later == devices.NotModified(etag)
    assert last_seen(harness, device_id) == at(harness, LAST_SEEN_RESOLUTION_S)
    # a stale etag gets the full answer
    changed = check_in(harness, device_id, '"0123"', LAST_SEEN_RESOLUTION_S + 1)
    assert isinstance(changed, SignedAnswer)
    assert changed.etag == etag


def test_unknown_device_checkin_names_it(harness: Harness) -> None:
    with pytest.raises(UnknownDeviceError, match=f"^device {'0' * 64} is not enrolled$"):
        devices.check_in(harness.db, "0" * 64, "ab" * 16, None, KEY, at(harness))


# --- which operations lock the device row (compiled for PostgreSQL, where it matters) ----------


@pytest.fixture
def device_locks() -> Iterator[list[bool]]:
    """For every ORM read of the devices table: whether it takes the row lock (FOR UPDATE)."""
    seen: list[bool] = []

    def record(state: ORMExecuteState) -> None:
        statement = state.statement
        assert isinstance(statement, ClauseElement)
        sql = str(statement.compile(dialect=postgresql.dialect()))  # type: ignore[no-untyped-call]
        if "FROM devices" in sql and "JOIN" not in sql:
            seen.append("FOR UPDATE" in sql)

    event.listen(Session, "do_orm_execute", record)
    try:
        yield seen
    finally:
        event.remove(Session, "do_orm_execute", record)


def test_events_and_assignments_lock_the_device_row(
    harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle, device_locks: list[bool]
) -> None:
    device = enrolled()
    harness.upload(make_bundle(version="2.0.0"))
    device_locks.clear()
    devices.record_events(harness.db, device.id, [Event(event="x.y", seq=1)], at(harness))
    assert device_locks == [True]
    device_locks.clear()
    devices.assign(harness.db, device.id, "2.0.0", actor="operator:t", now=at(harness))
    assert device_locks[0] is True
    device_locks.clear()
    devices.get_device(harness.db, device.id)
    devices.check_in(harness.db, device.id, "ab" * 16, None, KEY, at(harness, 600))
    assert device_locks and not any(device_locks)  # a read or a check-in waits for nobody


# --- what the audit trail records for events and assignments ------------------------------------


def audit_entries(harness: Harness, action_prefix: str) -> list[dict[str, Any]]:
    entries = harness.client.get("/api/v1/audit", headers=harness.viewer).json()["entries"]
    return [e for e in entries if e["action"].startswith(action_prefix)]


def test_event_audit_entry_names_device_and_fields(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled()
    assert device.events(("install.started", 5)).status_code == 204
    [entry] = audit_entries(harness, "install.")
    assert entry["actor"] == f"device:{device.id}"
    assert entry["subject"] == device.id
    assert entry["details"] == {"seq": 5, "fields": {"n": 5}}


def test_assignment_audit_entries_say_what_changed(
    harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle
) -> None:
    device = enrolled()
    harness.upload(make_bundle("a.bundle", version="2.0.0"))
    harness.upload(make_bundle("b.bundle", version="2.0.1"))
    for version in ("2.0.0", "2.0.1", None):
        response = harness.client.post(
            f"/api/v1/devices/{device.id}/assignment",
            json={"version": version},
            headers=harness.operator,
        )
        assert response.status_code == 200, response.text
    entries = audit_entries(harness, "device.")
    assert [(e["action"], e["subject"], e["details"]) for e in entries[-3:]] == [
        ("device.assigned", device.id, {"version": "2.0.0", "previous": None}),
        ("device.assigned", device.id, {"version": "2.0.1", "previous": "2.0.0"}),
        ("device.unassigned", device.id, {"version": None, "previous": "2.0.1"}),
    ]


# --- the operators' view ------------------------------------------------------------------------


def test_device_without_heartbeat_and_trial_state(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled()
    url = f"/api/v1/devices/{device.id}"
    fresh = harness.client.get(url, headers=harness.viewer)
    assert fresh.status_code == 200, fresh.text
    assert fresh.json()["last_heartbeat"] is None
    assert fresh.json()["last_heartbeat_at"] is None
    assert fresh.json()["state"] == "enrolled"
    assert device.heartbeat(trial=True).status_code == 204
    assert harness.client.get(url, headers=harness.viewer).json()["state"] == "trial"


def test_devices_are_listed_by_enrollment_then_id(harness: Harness) -> None:
    made = [FakeDevice(harness.client, hostname=f"cam-{n}") for n in range(6)]
    by_id = sorted(made, key=lambda d: d.id)
    # the highest id enrolls first, alone; then the others at one moment, highest id first
    order = [by_id[-1], *reversed(by_id[:-1])]
    for n, device in enumerate(order):
        assert device.enroll(harness.enrollment_token()).status_code == 200
        if n == 0:
            harness.clock.advance(10)
    listing = harness.client.get("/api/v1/devices", headers=harness.viewer).json()["devices"]
    assert [d["id"] for d in listing] == [by_id[-1].id, *(d.id for d in by_id[:-1])]


def test_a_small_order_device_key_is_refused_before_it_can_forge_anything(
    harness: Harness,
) -> None:
    # R = the identity, S = 0 "verifies" for every message under a small-order key: the key
    # itself is refused (422 naming it), at enrollment and at pre-authorization, and nothing
    # is stored or used up
    from tests.unit.test_points import NON_CANONICAL, SMALL_ORDER

    token = harness.enrollment_token()
    identity = "01" + "00" * 31
    forgery = identity + "00" * 32
    for public_key in [*SMALL_ORDER, NON_CANONICAL[1].hex()]:
        body = {"public_key": public_key, "compatible": "metrica-rpi4", "hostname": "forged",
                "proof": forgery, "enrollment_token": token}  # fmt: skip
        response = harness.client.post("/api/v1/devices/enroll", json=body)
        assert response.status_code == 422, (public_key, response.text)
        detail = response.json()["detail"]
        assert detail.startswith("public_key: unusable Ed25519 public key: "), detail
        response = harness.client.post(
            "/api/v1/preauthorized-keys", json={"public_key": public_key},
            headers=harness.operator,
        )  # fmt: skip
        assert response.status_code == 422, (public_key, response.text)
    listed = harness.client.get("/api/v1/devices", headers=harness.operator)
    assert listed.json()["devices"] == []
    assert FakeDevice(harness.client).enroll(token).status_code == 200  # the token is unused


def test_a_malleated_proof_is_refused(harness: Harness) -> None:
    from signing.points import L

    device = FakeDevice(harness.client)
    body = device.enroll_body(harness.enrollment_token())
    proof = bytes.fromhex(body["proof"])
    s = int.from_bytes(proof[32:], "little")
    body["proof"] = (proof[:32] + (s + L).to_bytes(32, "little")).hex()
    response = harness.client.post("/api/v1/devices/enroll", json=body)
    assert response.status_code == 403 and "proof" in response.json()["detail"]
