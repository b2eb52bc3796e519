"""``/metrics`` and ``/healthz``: fleet series from the database, request series per app."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from tests.server.conftest import FakeDevice, Harness, make_settings

MakeBundle = Callable[..., Path]
Enrolled = Callable[..., FakeDevice]


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_fleet_series(harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle) -> None:
    harness.upload(make_bundle(version="2.0.0"))
    idle = enrolled(hostname="cam-1")
    fresh = enrolled(hostname="cam-2")
    idle.heartbeat(version="2.0.0")
    idle.events(("install.started", 1), ("install.started", 2), ("install.started", 2))
    harness.client.post(
        f"/api/v1/devices/{idle.id}/assignment", json={"version": "2.0.0"}, headers=harness.operator
    )
    harness.clock.advance(42)
    found = samples(harness.client)
    assert found[("fleet_server_database_up", ())] == 1
    assert found[("fleet_releases", ())] == 1
    assert found[("fleet_devices", (("state", "idle"), ("version", "2.0.0")))] == 1
    assert found[("fleet_devices", (("state", "enrolled"), ("version", "")))] == 1
    assert found[("fleet_devices_assigned", (("version", "2.0.0"),))] == 1
    for device in (idle, fresh):
        key = (
            "fleet_device_last_seen_age_seconds",
            (("device", device.id), ("hostname", device.hostname)),
        )
        assert found[key] == pytest.approx(42)
    assert found[("fleet_server_device_events_total", (("event", "install"),))] == 2
    assert found[("fleet_server_release_uploads_total", (("outcome", "accepted"),))] == 1
    checkin = (
        "fleet_server_requests_total",
        (
            ("method", "POST"),
            ("route", "/api/v1/devices/{device_id}/heartbeat"),
            ("status", "204"),
        ),
    )
    assert found[checkin] == 1


def test_routes_are_labelled_by_template(harness: Harness) -> None:
    harness.client.get("/no/such/path")
    harness.client.request("BREW", "/healthz")
    harness.client.get(f"/blobs/{'0' * 64}")
    found = samples(harness.client)
    assert (
        found[
            (
                "fleet_server_requests_total",
                (("method", "GET"), ("route", "unmatched"), ("status", "404")),
            )
        ]
        == 1
    )
    assert (
        found[
            (
                "fleet_server_requests_total",
                (("method", "GET"), ("route", "/blobs/{sha256}"), ("status", "404")),
            )
        ]
        == 1
    )
    assert any(
        name == "fleet_server_requests_total" and ("method", "OTHER") in labels
        for name, labels in found
    )
    assert not any("0" * 64 in str(labels) for _, labels in found)


def test_each_app_has_its_own_registry(harness: Harness, tmp_path: Path, keyring_dir: Path) -> None:
    harness.client.get("/healthz")
    other = create_app(make_settings(tmp_path / "other", keyring_dir, None, harness.clock))
    with TestClient(other) as client:
        found = samples(client)
    assert not any(
        name == "fleet_server_requests_total" and ("route", "/healthz") in labels
        for name, labels in found
    )
    other.state.fleet.db.dispose()


def test_healthz_and_api_description(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    assert harness.client.get("/healthz").json() == {"status": "ok"}
    paths = harness.client.get("/openapi.json").json()["paths"]
    assert "/api/v1/devices/{device_id}/checkin" in paths
    monkeypatch.setattr(harness.db, "ping", lambda: False)
    response = harness.client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["error"] == "database_unavailable"


def test_device_chosen_event_names_cannot_create_series() -> None:
    from server.api.device import event_label

    assert event_label("install.failed") == "install"
    assert event_label("boot_check.committed") == "boot_check"
    assert {event_label(f"made_up_{i}.x") for i in range(100)} == {"other"}
