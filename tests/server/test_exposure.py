"""What the server shows to whom: security headers on every answer, the API documentation only
when asked for, and the per-device metrics only to the scrape token."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.errors import SettingsError
from server.headers import API_POLICY, DOCS_POLICY
from server.settings import Settings
from tests.server.conftest import SCRAPE_TOKEN, FakeDevice, Harness, make_settings

MakeBundle = Callable[..., Path]
Enrolled = Callable[..., FakeDevice]
ZERO_ID = "0" * 64
# A value for every path parameter of the API, so each route can be called.
PARAMETERS = {
    "device_id": ZERO_ID,
    "sha256": ZERO_ID,
    "token_id": "1",
    "rollout_id": "1",
    "action": "pause",
    "version": "1.0.0",
}
DOCS = ("/docs", "/redoc", "/openapi.json")


def routes(harness: Harness) -> Iterator[tuple[str, str]]:
    """Every (method, path) the app serves, its path parameters filled in."""
    for template, operations in harness.app.openapi()["paths"].items():
        path = re.sub(r"\{(\w+)\}", lambda m: PARAMETERS[m[1]], template)
        for method in operations:
            yield method.upper(), path


def assert_protected(response: Any, *, cache: str = "no-store", policy: str = API_POLICY) -> None:
    where = f"{response.request.method} {response.request.url.path} ({response.status_code})"
    assert response.headers.get("x-content-type-options") == "nosniff", where
    assert response.headers.get("content-security-policy") == policy, where
    assert response.headers.get("referrer-policy") == "no-referrer", where
    assert response.headers.get("cache-control") == cache, where


def test_every_route_answers_with_the_headers(harness: Harness) -> None:
    seen = 0
    for method, path in routes(harness):
        for headers in ({}, harness.admin):
            assert_protected(harness.client.request(method, path, headers=headers))
            seen += 1
    assert seen >= 60  # the routes were found (33 paths today)
    assert_protected(harness.client.get("/no/such/route"))
    assert_protected(harness.client.request("BREW", "/healthz"))


def test_secrets_and_device_answers_are_never_stored(harness: Harness, enrolled: Enrolled) -> None:
    created = harness.client.post(
        "/api/v1/operator-tokens", json={"name": "ci", "role": "viewer"}, headers=harness.admin
    )
    assert created.status_code == 201, created.text
    assert "token" in created.json()
    assert_protected(created)
    enrollment = harness.client.post(
        "/api/v1/enrollment-tokens", json={"uses": 1}, headers=harness.operator
    )
    assert enrollment.status_code == 201
    assert_protected(enrollment)
    device = enrolled()
    session = harness.client.post(
        f"/api/v1/devices/{device.id}/session", json=device.session_body(device.challenge())
    )
    assert session.status_code == 200 and "token" in session.json()
    assert_protected(session)
    checkin = device.checkin()
    assert checkin.status_code == 200
    assert_protected(checkin)
    assert_protected(device.heartbeat())


def test_blobs_keep_their_immutable_caching(harness: Harness, make_bundle: MakeBundle) -> None:
    url = harness.upload(make_bundle(size=3000)).json()["images"][0]["url"]
    immutable = "public, max-age=31536000, immutable"
    for method in ("GET", "HEAD"):
        assert_protected(harness.client.request(method, url), cache=immutable)
    etag = harness.client.get(url).headers["etag"]
    assert_protected(harness.client.get(url, headers={"If-None-Match": etag}), cache=immutable)
    # an unknown blob is an error, not content: no one keeps it
    assert_protected(harness.client.get(f"/blobs/{ZERO_ID}"))


def test_an_unexpected_error_carries_the_headers_too(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    monkeypatch.setattr(harness.db, "ping", broken)
    client = TestClient(harness.app, raise_server_exceptions=False)
    response = client.get("/healthz")
    assert response.status_code == 500
    assert_protected(response)


def test_the_api_documentation_is_off_by_default(harness: Harness) -> None:
    assert harness.settings.api_docs is False
    for path in (*DOCS, "/docs/oauth2-redirect"):
        response = harness.client.get(path)
        assert response.status_code == 404, path
        assert_protected(response)


@pytest.fixture
def documented(tmp_path: Path, keyring_dir: Path, harness: Harness) -> Iterator[TestClient]:
    base = make_settings(tmp_path / "docs", keyring_dir, None, harness.clock)
    settings = Settings.create(
        base.data_dir, clock=harness.clock, api_docs=True,
        metrics_token_file=tmp_path / "docs" / "metrics-token",
    )  # fmt: skip
    with TestClient(create_app(settings, rollout_interval_s=None)) as client:
        yield client


def test_api_docs_serves_the_documentation_with_what_its_pages_load(
    documented: TestClient,
) -> None:
    schema = documented.get("/openapi.json")
    assert schema.status_code == 200
    assert "/api/v1/devices/{device_id}/checkin" in schema.json()["paths"]
    assert_protected(schema)
    for page in ("/docs", "/redoc"):
        response = documented.get(page)
        assert response.status_code == 200, page
        assert_protected(response, policy=DOCS_POLICY)
        # every script and stylesheet the page names comes from a source its policy allows
        sources = re.findall(r'(?:src|href)="(https://[^/"]+)/', response.text)
        assert sources, page
        for origin in sources:
            assert origin in DOCS_POLICY, (page, origin)
    # the API answers keep the strict policy while the documentation is on
    assert_protected(documented.get("/healthz"))


def test_api_docs_is_a_run_option() -> None:
    from click.testing import CliRunner

    from fleet_core.cli import fleet

    help_text = CliRunner().invoke(fleet, ["server", "run", "--help"]).output
    assert "--api-docs" in help_text and "--metrics-token-file" in help_text


# --- /metrics ------------------------------------------------------------------------------------


def scrape(client: TestClient, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.get("/metrics", headers=headers)


def test_metrics_without_a_token_name_no_device(
    harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle
) -> None:
    harness.upload(make_bundle(version="2.0.0"))
    device = enrolled(hostname="secret-cam-7")
    device.heartbeat(version="2.0.0")
    device.events(("boot_check.fell_back", 1))
    harness.client.post(
        "/api/v1/rollouts",
        json={"version": "2.0.0", "stages": [100], "device_ids": [device.id]},
        headers=harness.operator,
    )
    open_answer = scrape(harness.client)
    assert open_answer.status_code == 200
    assert_protected(open_answer)
    text = open_answer.text
    assert "fleet_devices{" in text and "fleet_rollouts{" in text
    assert "fleet_server_requests_total{" in text and "fleet_rollout_devices{" in text
    assert device.id not in text and "secret-cam-7" not in text
    assert not re.search(r'(device|hostname)="', text)
    full = scrape(harness.client, SCRAPE_TOKEN)
    assert full.status_code == 200
    assert_protected(full)
    assert f'device="{device.id}"' in full.text and 'hostname="secret-cam-7"' in full.text
    assert "fleet_server_device_outcomes_total{" in full.text
    assert "fleet_device_update_pending_seconds{" in full.text


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {SCRAPE_TOKEN}x", f"Bearer {SCRAPE_TOKEN[:-1]}", "Bearer ", f"Basic {SCRAPE_TOKEN}"],
)
def test_metrics_refuse_any_other_credential(harness: Harness, authorization: str) -> None:
    response = harness.client.get("/metrics", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"] == "unauthenticated"
    assert_protected(response)


def test_operator_tokens_do_not_open_the_per_device_metrics(harness: Harness) -> None:
    admin = harness.admin["Authorization"].removeprefix("Bearer ")
    assert scrape(harness.client, admin).status_code == 401


def test_without_a_configured_token_no_one_sees_per_device_metrics(
    tmp_path: Path, harness: Harness, enrolled: Enrolled
) -> None:
    enrolled(hostname="cam-x")
    settings = Settings.create(
        harness.settings.data_dir, database_url=harness.settings.database_url, clock=harness.clock
    )  # the same database, SQLite or PostgreSQL, without a scrape token
    assert settings.metrics_token is None
    with TestClient(create_app(settings, rollout_interval_s=None)) as client:
        answer = scrape(client)
        assert answer.status_code == 200 and "fleet_devices{" in answer.text
        assert "cam-x" not in answer.text
        assert scrape(client, SCRAPE_TOKEN).status_code == 401


def test_the_token_file_is_read_like_prometheus_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {SCRAPE_TOKEN}\n\n")
    settings = Settings.create(tmp_path / "data", metrics_token_file=path)
    assert settings.metrics_token == SCRAPE_TOKEN
    assert SCRAPE_TOKEN not in repr(settings)


@pytest.mark.parametrize(
    "content", ["", "\n", "short-token\n", "two words " + "x" * 40, "é" * 40, None]
)
def test_an_unusable_token_file_is_refused(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(SettingsError, match="metrics token file"):
        Settings.create(tmp_path / "data", metrics_token_file=path)
