"""Device enrollment and sessions at the edges: which token is used, expiry to the second, the
audit record of each grant, and what a new session clears away."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from server import enrollment
from server.enrollment import (
    challenge_key,
    create_enrollment_token,
    device_public_key,
    enroll,
    open_session,
    preauthorize,
)
from server.errors import ChallengeInvalidError, InvalidRequestError, UnknownDeviceError
from server.models import AuditRow, Device, DeviceChallenge, DeviceSession, EnrollmentToken
from server.settings import CHALLENGE_TTL_S, SESSION_TTL_S, utc
from signing.keys import SigningKey
from tests.server.conftest import FakeDevice, Harness

Enrolled = Callable[..., FakeDevice]


def audit_rows(harness: Harness, action: str) -> list[AuditRow]:
    with harness.db.read() as session:
        return list(session.scalars(select(AuditRow).where(AuditRow.action == action)))


def uses_left(harness: Harness) -> list[int]:
    with harness.db.read() as session:
        return list(session.scalars(select(EnrollmentToken.uses_left).order_by(EnrollmentToken.id)))


def test_an_unknown_token_uses_up_no_valid_token(harness: Harness) -> None:
    harness.enrollment_token(uses=2)
    device = FakeDevice(harness.client)
    refused = device.enroll("fleet-enroll-" + "0" * 40)
    assert refused.status_code == 403, refused.text
    assert uses_left(harness) == [2]
    assert harness.count(Device) == 0


def test_a_token_is_refused_from_the_second_it_expires(harness: Harness) -> None:
    token = harness.enrollment_token(expires_in=60)
    harness.clock.advance(60)
    assert FakeDevice(harness.client).enroll(token).status_code == 403
    assert uses_left(harness) == [1]


def test_a_token_is_accepted_the_second_before_it_expires(harness: Harness) -> None:
    token = harness.enrollment_token(expires_in=60)
    harness.clock.advance(59)
    assert FakeDevice(harness.client).enroll(token).status_code == 200
    assert uses_left(harness) == [0]


def test_creating_a_token_is_audited_and_returned(harness: Harness) -> None:
    now = utc(harness.clock)
    new = create_enrollment_token(harness.db, uses=3, expires_in_s=600, actor="ops", now=now)
    assert (new.uses, new.expires) == (3, now + timedelta(seconds=600))
    forever = create_enrollment_token(harness.db, uses=1, expires_in_s=None, actor="ops", now=now)
    assert forever.expires is None
    first, second = audit_rows(harness, "enrollment_token.created")[-2:]
    with harness.db.read() as session:
        ids = list(session.scalars(select(EnrollmentToken.id).order_by(EnrollmentToken.id)))
    assert (first.actor, first.subject) == ("ops", f"enrollment-token:{ids[-2]}")
    assert json.loads(first.details) == {"uses": 3, "expires": new.expires.isoformat()}  # type: ignore[union-attr]
    assert second.subject == f"enrollment-token:{ids[-1]}"
    assert json.loads(second.details) == {"uses": 1, "expires": None}


def test_preauthorizing_is_audited_once(harness: Harness) -> None:
    device = FakeDevice(harness.client)
    now = utc(harness.clock)
    assert preauthorize(harness.db, device.public_hex, actor="ops", now=now) == device.id
    assert preauthorize(harness.db, device.public_hex, actor="ops", now=now) == device.id
    (row,) = audit_rows(harness, "device.preauthorized")
    assert (row.actor, row.subject) == ("ops", device.id)


def test_a_bad_public_key_says_so() -> None:
    with pytest.raises(InvalidRequestError, match="^public_key: not an Ed25519 public key"):
        device_public_key("00" * 31)


def test_losing_the_enrollment_race_is_an_enrollment_not_an_error(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another request enrolled the same key first (our insert hit its primary key)."""
    device = FakeDevice(harness.client)
    harness.enrollment_token()

    def lost_race(*args: object) -> enrollment.Enrollment:
        raise IntegrityError("INSERT INTO devices", None, Exception("duplicate key"))

    monkeypatch.setattr(enrollment, "_admit", lost_race)
    request = enrollment.EnrollRequest(**device.enroll_body("any"))
    assert enroll(harness.db, request, utc(harness.clock)) == enrollment.Enrollment(
        device.id, new=False
    )


def test_challenge_key_is_stable_across_versions() -> None:
    """Every server process derives the same key from the signing key, and so must the next
    release of the server during a rolling upgrade."""
    key = SigningKey.from_private_key(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    assert challenge_key(key).hex() == (
        "5feb3317972657c24ce2890906475a03fd340e3b3987b5752b365799fbef28c7"
    )


def test_a_challenge_is_refused_from_the_second_it_expires(
    harness: Harness, enrolled: Enrolled
) -> None:
    device = enrolled()
    challenge = device.challenge()
    harness.clock.advance(CHALLENGE_TTL_S)
    response = harness.client.post(
        f"/api/v1/devices/{device.id}/session", json=device.session_body(challenge)
    )
    assert response.status_code == 401, response.text
    fresh = device.challenge()
    harness.clock.advance(CHALLENGE_TTL_S - 1)
    response = harness.client.post(
        f"/api/v1/devices/{device.id}/session", json=device.session_body(fresh)
    )
    assert response.status_code == 200, response.text


def test_a_used_challenge_stays_used_while_other_challenges_expire(
    harness: Harness, enrolled: Enrolled
) -> None:
    device = enrolled()
    challenge = device.challenge()
    body = device.session_body(challenge)
    url = f"/api/v1/devices/{device.id}/session"
    assert harness.client.post(url, json=body).status_code == 200
    harness.clock.advance(CHALLENGE_TTL_S // 2)
    device.login()  # purges the used challenges that expired, not this one
    assert harness.client.post(url, json=body).status_code == 401
    with harness.db.read() as session:
        assert session.get(DeviceChallenge, enrollment.secret_hash(challenge)) is not None


def test_a_device_vanishing_between_challenge_and_session(
    harness: Harness, enrolled: Enrolled
) -> None:
    device = enrolled()
    challenge = device.challenge()
    with harness.db.write() as session:
        session.delete(session.get(Device, device.id))
    key = challenge_key(harness.app.state.fleet.server_key)
    with pytest.raises(UnknownDeviceError, match=f"^device {device.id} is not enrolled$"):
        open_session(harness.db, device.id, challenge, "00", utc(harness.clock), key)
    with pytest.raises(ChallengeInvalidError, match="unknown, already used or expired"):
        open_session(harness.db, device.id, "0" * 64, "00", utc(harness.clock), key)


def sessions(harness: Harness) -> dict[str, list[float]]:
    with harness.db.read() as session:
        rows = session.scalars(select(DeviceSession)).all()
        found: dict[str, list[float]] = {}
        for row in rows:
            found.setdefault(row.device_id, []).append(row.expires.timestamp())
        return {k: sorted(v) for k, v in found.items()}


def test_a_new_session_clears_the_devices_expired_sessions_only(
    harness: Harness, enrolled: Enrolled
) -> None:
    a, b = enrolled(hostname="a"), enrolled(hostname="b")
    first = harness.clock.now + SESSION_TTL_S
    harness.clock.advance(SESSION_TTL_S)  # both first sessions expire this very second
    a.login()
    found = sessions(harness)
    assert found[a.id] == [first + SESSION_TTL_S]  # its expired session is gone
    assert found[b.id] == [first]  # another device's are its own business
    b.login()
    assert sessions(harness)[b.id] == [first + SESSION_TTL_S]
    assert a.checkin().status_code == 200
    assert b.checkin().status_code == 200


def test_enroll_tells_whether_the_device_is_new(harness: Harness) -> None:
    device = FakeDevice(harness.client)
    harness.enrollment_token(uses=2)
    request = enrollment.EnrollRequest(**device.enroll_body("unused"))
    token_request = enrollment.EnrollRequest(**device.enroll_body(harness.enrollment_token(uses=1)))
    now = utc(harness.clock)
    assert enroll(harness.db, token_request, now) == enrollment.Enrollment(device.id, new=True)
    assert enroll(harness.db, request, now) == enrollment.Enrollment(device.id, new=False)


@pytest.mark.parametrize("via", ["enrollment token", "preauthorized key"])
def test_an_enrollment_is_audited_with_how_it_was_admitted(harness: Harness, via: str) -> None:
    device = FakeDevice(harness.client, hostname="cam-0042")
    if via == "enrollment token":
        response = device.enroll(harness.enrollment_token())
    else:
        preauthorize(harness.db, device.public_hex, actor="ops", now=utc(harness.clock))
        response = device.enroll()
    assert response.status_code == 200, response.text
    (row,) = audit_rows(harness, "device.enrolled")
    assert (row.actor, row.subject) == (f"device:{device.id}", device.id)
    assert json.loads(row.details) == {
        "hostname": "cam-0042",
        "compatible": "metrica-rpi4",
        "via": via,
    }


def test_losing_the_race_for_a_challenge_is_an_invalid_challenge(
    harness: Harness, enrolled: Enrolled, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests with the same signed challenge: the one whose insert hits the primary key."""
    device = enrolled()
    challenge = device.challenge()
    signature = device.session_body(challenge)["signature"]

    def lost_race(*args: object) -> None:
        raise IntegrityError("INSERT INTO device_challenges", None, Exception("duplicate key"))

    monkeypatch.setattr(enrollment, "_add_session", lost_race)
    key = challenge_key(harness.app.state.fleet.server_key)
    with pytest.raises(ChallengeInvalidError, match="^unknown, already used or expired challenge$"):
        open_session(harness.db, device.id, challenge, signature, utc(harness.clock), key)


def test_a_second_session_leaves_the_first_one_working(
    harness: Harness, enrolled: Enrolled
) -> None:
    device = enrolled()
    first = device.token
    device.login()
    assert device.checkin().status_code == 200
    device.token = first
    assert device.checkin().status_code == 200


def test_used_challenges_are_forgotten_the_second_they_expire(
    harness: Harness, enrolled: Enrolled
) -> None:
    device = enrolled()  # its login used one challenge
    assert harness.count(DeviceChallenge) == 1
    harness.clock.advance(CHALLENGE_TTL_S - 1)
    device.login()
    assert harness.count(DeviceChallenge) == 2  # the first is still one second from expiring
    harness.clock.advance(1)
    device.login()
    assert harness.count(DeviceChallenge) == 2  # the first expired this second: gone
