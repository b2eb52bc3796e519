"""Operator and enrollment tokens are withdrawn: operator tokens expire by the server's clock and
are revoked by admins (never the last valid admin token), enrollment tokens are revoked by
operators; both are listed without their secrets, and every change is audited."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from server.app import create_app
from server.auth import Role, create_operator_token
from server.models import AuditRow, EnrollmentToken, OperatorToken
from server.settings import (
    DEFAULT_OPERATOR_TOKEN_MAX_TTL_S,
    DEFAULT_OPERATOR_TOKEN_TTL_S,
    CredentialLimits,
    Settings,
    utc,
)
from tests.server.conftest import FakeClock, FakeDevice, Harness

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

DAY = 86400
ROLES = ("none", "viewer", "operator", "admin")


def headers(harness: Harness, role: str) -> dict[str, str]:
    return {} if role == "none" else harness.headers[role]


def new_token(harness: Harness, **body: Any) -> dict[str, Any]:
    response = harness.client.post(
        "/api/v1/operator-tokens",
        json={"name": "ci", "role": "viewer", **body},
        headers=harness.admin,
    )
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def token_id(harness: Harness, name: str) -> int:
    listing = harness.client.get("/api/v1/operator-tokens", headers=harness.admin).json()
    (found,) = [t["id"] for t in listing["operator_tokens"] if t["name"] == name]
    return int(found)


def audit_entries(harness: Harness) -> list[AuditRow]:
    with harness.db.read() as session:
        return list(session.scalars(select(AuditRow).order_by(AuditRow.seq)))


def snapshot(harness: Harness) -> list[tuple[Any, ...]]:
    """What is stored of tokens and the trail: a refused request must leave it as it was."""
    with harness.db.read() as session:
        operators = session.execute(
            select(OperatorToken.id, OperatorToken.expires, OperatorToken.revoked)
        ).all()
        enrollments = session.execute(
            select(EnrollmentToken.id, EnrollmentToken.uses_left, EnrollmentToken.revoked)
        ).all()
        trail = session.scalars(select(AuditRow.seq)).all()
    return [tuple(operators), tuple(enrollments), tuple(trail)]


# --- expiry -----------------------------------------------------------------------------------


def test_a_new_operator_token_expires_after_the_default_lifetime(harness: Harness) -> None:
    created = new_token(harness)
    assert created["expires"] == "2024-02-12T22:13:20Z"  # START + 90 days
    assert DEFAULT_OPERATOR_TOKEN_TTL_S == 90 * DAY
    token = bearer(created["token"])
    harness.clock.advance(DEFAULT_OPERATOR_TOKEN_TTL_S - 1)
    assert harness.client.get("/api/v1/releases", headers=token).status_code == 200
    harness.clock.advance(1)  # the expiry itself is past
    refused = harness.client.get("/api/v1/releases", headers=token)
    assert refused.status_code == 401
    assert refused.json()["error"] == "unauthenticated"
    assert refused.headers["www-authenticate"] == "Bearer"


def test_expires_in_is_honoured_to_the_second(harness: Harness) -> None:
    created = new_token(harness, expires_in=30 * DAY)
    token = bearer(created["token"])
    harness.clock.advance(30 * DAY - 0.5)
    assert harness.client.get("/api/v1/devices", headers=token).status_code == 200
    harness.clock.advance(0.5)
    assert harness.client.get("/api/v1/devices", headers=token).status_code == 401


def test_an_expired_token_is_refused_like_an_unknown_one(harness: Harness) -> None:
    created = new_token(harness, expires_in=60)
    harness.clock.advance(60)
    expired = harness.client.get("/api/v1/releases", headers=bearer(created["token"]))
    unknown = harness.client.get("/api/v1/releases", headers=bearer("fleet_op_nobody"))
    assert expired.status_code == unknown.status_code == 401
    assert expired.json() == unknown.json()


def test_more_than_the_maximum_lifetime_is_refused_naming_the_field(harness: Harness) -> None:
    before = snapshot(harness)
    for expires_in in (DEFAULT_OPERATOR_TOKEN_MAX_TTL_S + 1, 0):
        response = harness.client.post(
            "/api/v1/operator-tokens",
            json={"name": "ci", "role": "viewer", "expires_in": expires_in},
            headers=harness.admin,
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "invalid_request"
        assert "expires_in" in response.json()["detail"]
    assert snapshot(harness) == before
    assert new_token(harness, expires_in=DEFAULT_OPERATOR_TOKEN_MAX_TTL_S)["expires"]


def test_the_server_settings_set_the_default_and_the_maximum(
    tmp_path: Path, keyring_dir: Path, clock: FakeClock
) -> None:
    limits = CredentialLimits(operator_token_ttl_s=DAY, operator_token_max_ttl_s=7 * DAY)
    settings = Settings.create(tmp_path / "data", clock=clock, credentials=limits)
    shutil.copytree(keyring_dir, settings.keyring_dir)
    app = create_app(settings)
    with TestClient(app) as client:
        db = app.state.fleet.db
        admin = bearer(
            create_operator_token(
                db, name="root", role=Role.ADMIN, created_by="test", now=utc(clock)
            )
        )

        def create(**body: Any) -> Any:
            return client.post(
                "/api/v1/operator-tokens",
                json={"name": "ci", "role": "viewer", **body},
                headers=admin,
            )

        assert create().json()["expires"] == "2023-11-15T22:13:20Z"
        refused = create(expires_in=7 * DAY + 1)
        assert refused.status_code == 422 and "expires_in" in refused.json()["detail"]
        assert create(expires_in=7 * DAY).json()["expires"] == "2023-11-21T22:13:20Z"
    db.dispose()


@pytest.mark.parametrize(
    ("ttl", "max_ttl", "sessions"), [(0, 10, 5), (11, 10, 5), (1, 10, 0)], ids=str
)
def test_credential_limits_refuse_impossible_values(ttl: int, max_ttl: int, sessions: int) -> None:
    from server.errors import SettingsError

    with pytest.raises(SettingsError):
        CredentialLimits(
            operator_token_ttl_s=ttl, operator_token_max_ttl_s=max_ttl, max_device_sessions=sessions
        )


def test_a_token_from_before_expiries_never_expires(harness: Harness) -> None:
    # what the migration leaves of an older token: no expiry
    secret = create_operator_token(
        harness.db, name="old", role=Role.VIEWER, created_by="test", now=utc(harness.clock)
    )
    harness.clock.advance(10 * 366 * DAY)
    assert harness.client.get("/api/v1/releases", headers=bearer(secret)).status_code == 200
    listing = harness.client.get("/api/v1/operator-tokens", headers=bearer(secret))
    assert listing.status_code == 403  # a viewer
    (old,) = [
        t
        for t in harness.client.get("/api/v1/operator-tokens", headers=harness.admin).json()[
            "operator_tokens"
        ]
        if t["name"] == "old"
    ]
    assert old["expires"] is None and old["status"] == "valid"


# --- listing ----------------------------------------------------------------------------------


def test_operator_tokens_are_listed_without_secrets(harness: Harness) -> None:
    created = new_token(harness, expires_in=DAY)
    harness.clock.advance(DAY)
    response = harness.client.get("/api/v1/operator-tokens", headers=harness.admin)
    assert response.status_code == 200
    tokens = response.json()["operator_tokens"]
    assert [t["name"] for t in tokens] == ["test-viewer", "test-operator", "test-admin", "ci"]
    ci = tokens[-1]
    assert ci == {
        "id": ci["id"],
        "name": "ci",
        "role": "viewer",
        "created": "2023-11-14T22:13:20Z",
        "created_by": "operator:test-admin",
        "expires": "2023-11-15T22:13:20Z",
        "revoked": None,
        "status": "expired",
    }
    secrets = [created["token"], *(h["Authorization"].split()[1] for h in harness.headers.values())]
    assert not any(secret in response.text for secret in secrets)
    with harness.db.read() as session:
        hashes = session.scalars(select(OperatorToken.token_sha256)).all()
    assert not any(digest in response.text for digest in hashes)


@pytest.mark.parametrize("role", ROLES)
def test_only_admins_list_and_revoke_operator_tokens(harness: Harness, role: str) -> None:
    target = token_id(harness, "test-viewer")
    listing = harness.client.get("/api/v1/operator-tokens", headers=headers(harness, role))
    before = snapshot(harness)
    revoke = harness.client.post(
        f"/api/v1/operator-tokens/{target}/revoke", headers=headers(harness, role)
    )
    create = harness.client.post(
        "/api/v1/operator-tokens",
        json={"name": "x", "role": "viewer"},
        headers=headers(harness, role),
    )
    expected = {"none": 401, "viewer": 403, "operator": 403}.get(role)
    if expected is None:
        assert (listing.status_code, revoke.status_code, create.status_code) == (200, 200, 201)
        return
    assert listing.status_code == revoke.status_code == create.status_code == expected
    assert snapshot(harness) == before


# --- revocation -------------------------------------------------------------------------------


def test_a_revoked_token_is_refused_on_its_next_request(harness: Harness) -> None:
    created = new_token(harness, role="operator", name="deploy")
    token = bearer(created["token"])
    assert harness.client.get("/api/v1/devices", headers=token).status_code == 200
    target = token_id(harness, "deploy")
    response = harness.client.post(
        f"/api/v1/operator-tokens/{target}/revoke", headers=harness.admin
    )
    assert response.status_code == 200, response.text
    assert response.json()["revoked"] == "2023-11-14T22:13:20Z"
    assert response.json()["status"] == "revoked"
    # the very next request, with no time passing
    assert harness.client.get("/api/v1/devices", headers=token).status_code == 401
    again = harness.client.post(f"/api/v1/operator-tokens/{target}/revoke", headers=harness.admin)
    assert again.status_code == 409 and again.json()["error"] == "token_conflict"


def test_revoking_an_unknown_token_is_404(harness: Harness) -> None:
    before = snapshot(harness)
    response = harness.client.post("/api/v1/operator-tokens/999/revoke", headers=harness.admin)
    assert response.status_code == 404 and response.json()["error"] == "unknown_token"
    assert (
        harness.client.post("/api/v1/operator-tokens/0/revoke", headers=harness.admin).status_code
        == 422
    )
    assert snapshot(harness) == before


def test_the_last_valid_admin_token_cannot_be_revoked(harness: Harness) -> None:
    mine = token_id(harness, "test-admin")
    before = snapshot(harness)
    refused = harness.client.post(f"/api/v1/operator-tokens/{mine}/revoke", headers=harness.admin)
    assert refused.status_code == 409, refused.text
    assert "last valid admin token" in refused.json()["detail"]
    assert snapshot(harness) == before
    # an expired admin token does not count as a way in
    new_token(harness, name="spare", role="admin", expires_in=DAY)
    spare_id = token_id(harness, "spare")
    harness.clock.advance(DAY)
    assert (
        harness.client.post(
            f"/api/v1/operator-tokens/{mine}/revoke", headers=harness.admin
        ).status_code
        == 409
    )
    # a revoked one neither; a valid one does
    new_token(harness, name="second", role="admin")
    second_id = token_id(harness, "second")
    assert (
        harness.client.post(
            f"/api/v1/operator-tokens/{second_id}/revoke", headers=harness.admin
        ).status_code
        == 200
    )
    assert (
        harness.client.post(
            f"/api/v1/operator-tokens/{mine}/revoke", headers=harness.admin
        ).status_code
        == 409
    )
    third = new_token(harness, name="third", role="admin")
    done = harness.client.post(f"/api/v1/operator-tokens/{mine}/revoke", headers=harness.admin)
    assert done.status_code == 200
    assert harness.client.get("/api/v1/devices", headers=harness.admin).status_code == 401
    assert harness.client.get("/api/v1/devices", headers=bearer(third["token"])).status_code == 200
    # an expired admin token itself may be revoked even when it is alone among the others
    assert (
        harness.client.post(
            f"/api/v1/operator-tokens/{spare_id}/revoke", headers=bearer(third["token"])
        ).status_code
        == 200
    )


def test_operator_token_changes_are_audited_without_secrets(harness: Harness) -> None:
    created = new_token(harness, name="deploy", role="operator", expires_in=DAY)
    target = token_id(harness, "deploy")
    harness.client.post(f"/api/v1/operator-tokens/{target}/revoke", headers=harness.admin)
    entries = [e for e in audit_entries(harness) if e.action.startswith("operator_token.")][-2:]
    made, revoked = entries
    assert (made.action, made.subject, made.actor) == (
        "operator_token.created",
        "deploy",
        "operator:test-admin",
    )
    assert made.details == (f'{{"expires":"2023-11-15T22:13:20Z","id":{target},"role":"operator"}}')
    assert (revoked.action, revoked.subject, revoked.actor) == (
        "operator_token.revoked",
        f"operator-token:{target}",
        "operator:test-admin",
    )
    assert revoked.details == '{"name":"deploy","role":"operator"}'
    for entry in entries:
        assert created["token"] not in entry.details


# --- enrollment tokens ------------------------------------------------------------------------


def enrollment_tokens(harness: Harness) -> list[dict[str, Any]]:
    response = harness.client.get("/api/v1/enrollment-tokens", headers=harness.operator)
    assert response.status_code == 200, response.text
    tokens: list[dict[str, Any]] = response.json()["enrollment_tokens"]
    return tokens


def test_enrollment_tokens_are_listed_without_secrets(harness: Harness) -> None:
    first = harness.enrollment_token(uses=3, expires_in=3600)
    second = harness.enrollment_token(uses=1)
    assert FakeDevice(harness.client).enroll(first).status_code == 200
    response = harness.client.get("/api/v1/enrollment-tokens", headers=harness.operator)
    assert first not in response.text and second not in response.text
    listed = response.json()["enrollment_tokens"]
    assert listed == [
        {
            "id": listed[0]["id"],
            "uses_left": 2,
            "expires": "2023-11-14T23:13:20Z",
            "created": "2023-11-14T22:13:20Z",
            "created_by": "operator:test-operator",
            "revoked": None,
        },
        {
            "id": listed[1]["id"],
            "uses_left": 1,
            "expires": None,
            "created": "2023-11-14T22:13:20Z",
            "created_by": "operator:test-operator",
            "revoked": None,
        },
    ]


def test_a_revoked_enrollment_token_admits_nobody(harness: Harness) -> None:
    token = harness.enrollment_token(uses=5)
    (listed,) = enrollment_tokens(harness)
    response = harness.client.post(
        f"/api/v1/enrollment-tokens/{listed['id']}/revoke", headers=harness.operator
    )
    assert response.status_code == 200, response.text
    assert response.json()["revoked"] == "2023-11-14T22:13:20Z"
    refused = FakeDevice(harness.client).enroll(token)
    assert refused.status_code == 403 and refused.json()["error"] == "not_authorized"
    assert enrollment_tokens(harness)[0]["uses_left"] == 5  # the refusal used nothing
    again = harness.client.post(
        f"/api/v1/enrollment-tokens/{listed['id']}/revoke", headers=harness.operator
    )
    assert again.status_code == 409
    missing = harness.client.post("/api/v1/enrollment-tokens/77/revoke", headers=harness.operator)
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_token"
    (entry,) = [e for e in audit_entries(harness) if e.action == "enrollment_token.revoked"]
    assert (entry.subject, entry.actor) == (
        f"enrollment-token:{listed['id']}",
        "operator:test-operator",
    )
    assert token not in entry.details
    assert json.loads(entry.details) == {"uses_left": 5}


def test_enrollment_tokens_are_listed_oldest_first_after_one_is_used(harness: Harness) -> None:
    """(PostgreSQL moves an updated row to the end of its table: only the query's order holds.)"""
    first = harness.enrollment_token(uses=3)
    for _ in range(2):
        harness.enrollment_token()
    assert FakeDevice(harness.client).enroll(first).status_code == 200
    listed = enrollment_tokens(harness)
    assert [t["uses_left"] for t in listed] == [2, 1, 1]
    assert [t["id"] for t in listed] == sorted(t["id"] for t in listed)


@pytest.mark.parametrize("role", ROLES)
def test_operators_list_and_revoke_enrollment_tokens(harness: Harness, role: str) -> None:
    harness.enrollment_token()
    (listed,) = enrollment_tokens(harness)
    before = snapshot(harness)
    listing = harness.client.get("/api/v1/enrollment-tokens", headers=headers(harness, role))
    revoke = harness.client.post(
        f"/api/v1/enrollment-tokens/{listed['id']}/revoke", headers=headers(harness, role)
    )
    expected = {"none": 401, "viewer": 403}.get(role)
    if expected is None:
        assert (listing.status_code, revoke.status_code) == (200, 200)
        return
    assert listing.status_code == revoke.status_code == expected
    assert snapshot(harness) == before


def test_a_revoked_token_row_stays_revoked_when_uses_remain(harness: Harness) -> None:
    """Revocation is its own column: giving uses back does not bring a token back."""
    token = harness.enrollment_token(uses=1)
    (listed,) = enrollment_tokens(harness)
    harness.client.post(
        f"/api/v1/enrollment-tokens/{listed['id']}/revoke", headers=harness.operator
    )
    with harness.db.write() as session:
        session.execute(update(EnrollmentToken).values(uses_left=3))
    assert FakeDevice(harness.client).enroll(token).status_code == 403


def test_the_migration_leaves_older_tokens_and_devices_as_they_were(tmp_path: Path) -> None:
    """Rows from before revision 0005: operator tokens keep no expiry (and still work),
    devices are active."""
    from alembic import command
    from sqlalchemy import text

    from server.auth import authenticate_operator, secret_hash
    from server.database import Database, alembic_config

    db = Database(f"sqlite:///{tmp_path / 'old.db'}")
    with db.engine.connect() as connection, connection.begin():
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")
        connection.execute(
            text(
                "INSERT INTO operator_tokens (token_sha256, name, role, created, created_by) "
                "VALUES (:sha, 'old', 'admin', '2023-01-01 00:00:00', 'cli:root')"
            ),
            {"sha": secret_hash("fleet_op_old")},
        )
        connection.execute(
            text(
                "INSERT INTO devices (id, public_key, compatible, hostname, enrolled, last_seen, "
                "event_seq) VALUES (:id, :id, 'metrica-rpi4', 'cam', '2023-01-01 00:00:00', "
                "'2023-01-01 00:00:00', -1)"
            ),
            {"id": "ab" * 32},
        )
    db.migrate()
    with db.read() as session:
        token = session.scalars(select(OperatorToken)).one()
        assert (token.expires, token.revoked) == (None, None)
        far = utc(lambda: 4_000_000_000.0)
        assert authenticate_operator(session, "fleet_op_old", far).role is Role.ADMIN
        assert session.scalar(text("SELECT status FROM devices")) == "active"
    db.dispose()


def test_an_expired_admin_token_is_revoked_even_when_no_valid_one_is_left(
    harness: Harness,
) -> None:
    """On the host (``fleet server token revoke --data-dir``) nobody needs a valid admin token:
    an expired one is no way in, and revoking it is always allowed."""
    from server.auth import revoke_operator_token

    now = utc(harness.clock)
    create_operator_token(
        harness.db, name="short", role=Role.ADMIN, created_by="test", now=now, expires=now
    )
    short = token_id(harness, "short")
    with harness.db.write() as session:  # the fixture's admin token is gone
        session.execute(
            update(OperatorToken).where(OperatorToken.name == "test-admin").values(revoked=now)
        )
    answer = revoke_operator_token(harness.db, short, actor="cli:root@host", now=now)
    assert answer["status"] == "revoked"
