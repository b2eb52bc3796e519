"""``/metrics`` and ``/healthz``: fleet series from the database, request series per app."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from tests.server.conftest import SCRAPE_TOKEN, FakeDevice, Harness, make_settings

MakeBundle = Callable[..., Path]
Enrolled = Callable[..., FakeDevice]


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    # as Prometheus scrapes: with the scrape token, so the per-device series are there too
    response = client.get("/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"})
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
    paths = harness.app.openapi()["paths"]  # /openapi.json is served with --api-docs only
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


def test_device_series_from_the_heartbeat(harness: Harness, enrolled: Enrolled) -> None:
    cam = enrolled(hostname="cam-1")
    quiet = enrolled(hostname="cam-2")
    cam.heartbeat(temperature_c=81.5, free_space_mb=400, uptime_s=120.0, clock_skew_s=-7.0)
    quiet.heartbeat(temperature_c=None, free_space_mb=None, uptime_s=None, safe_mode=True,
                    booted="safe", version=None)  # fmt: skip
    found = samples(harness.client)
    key = (("device", cam.id), ("hostname", "cam-1"))
    assert found[("fleet_device_temperature_celsius", key)] == 81.5
    assert found[("fleet_device_free_space_bytes", key)] == 400 * 2**20
    assert found[("fleet_device_uptime_seconds", key)] == 120
    assert found[("fleet_device_clock_skew_seconds", key)] == -7
    info = dict(key) | {"role": "", "compatible": "metrica-rpi4", "version": "1.0.0",
                        "state": "idle"}  # fmt: skip
    assert found[("fleet_device_info", tuple(sorted(info.items())))] == 1
    slot = dict(key) | {"slot": "b", "status": "good", "version": "0.9.0"}
    assert found[("fleet_device_slot_info", tuple(sorted(slot.items())))] == 1
    other = (("device", quiet.id), ("hostname", "cam-2"))
    assert ("fleet_device_temperature_celsius", other) not in found  # no reading, no series
    assert found[("fleet_devices_unhealthy", ())] == 1  # in safe mode
    assert found[("fleet_emergency_stop", ())] == 0


def test_outcome_events_are_counted_per_device(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled()
    device.events(("boot_check.fell_back", 1), ("install.started", 2), ("made_up.event", 3))
    device.events(("boot_check.fell_back", 1))  # a resend: not counted again
    found = samples(harness.client)
    outcome = "fleet_server_device_outcomes_total"
    assert found[(outcome, (("device", device.id), ("event", "boot_check.fell_back")))] == 1
    assert not any(name == outcome and ("event", "install.started") in labels
                   for name, labels in found)  # fmt: skip


def test_stored_outcome_events_are_counted_from_the_database(
    harness: Harness, enrolled: Enrolled
) -> None:
    device, quiet = enrolled(hostname="cam-1"), enrolled(hostname="cam-2")
    device.events(("boot_check.fell_back", 1), ("install.started", 2))
    device.events(("boot_check.fell_back", 3), ("boot_check.fell_back", 3))  # one a resend
    name = "fleet_device_outcome_events_total"

    def key(member: FakeDevice, event: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        labels = {"device": member.id, "hostname": member.hostname, "event": event}
        return (name, tuple(sorted(labels.items())))

    found = samples(harness.client)
    assert found[key(device, "boot_check.fell_back")] == 2
    # there at 0 before the first such event, so that increase() sees the first one
    assert found[key(quiet, "boot_check.fell_back")] == 0
    assert found[key(device, "boot_check.committed")] == 0
    assert not any(n == name and ("event", "install.started") in labels for n, labels in found)
    # another process over the same database (or this one, restarted) counts the same
    with TestClient(create_app(harness.settings, rollout_interval_s=None)) as other:
        assert samples(other)[key(device, "boot_check.fell_back")] == 2


def test_rollout_series(harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle) -> None:
    for version in ("1.0.0", "2.0.0"):
        assert harness.upload(make_bundle(f"{version}.bundle", version=version)).status_code == 201
    canary, other = enrolled(hostname="cam-1"), enrolled(hostname="cam-2")
    for device in (canary, other):
        device.heartbeat()
    response = harness.client.post(
        "/api/v1/rollouts", json={"version": "2.0.0", "canary": [canary.id]},
        headers=harness.operator,
    )  # fmt: skip
    assert response.status_code == 201, response.text
    rollout = str(response.json()["id"])
    harness.clock.advance(1000)
    found = samples(harness.client)
    rollout_labels = {"rollout": rollout, "version": "2.0.0"}

    def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return name, tuple(sorted((rollout_labels | labels).items()))

    assert found[("fleet_rollouts", (("state", "running"),))] == 1
    assert found[("fleet_rollouts", (("state", "halted"),))] == 0
    assert found[key("fleet_rollout_state", state="running")] == 1
    assert found[key("fleet_rollout_stage", stage="canary")] == 0
    assert found[key("fleet_rollout_stages")] == 4
    assert found[key("fleet_rollout_devices", stage="canary", outcome="pending")] == 1
    assert found[key("fleet_rollout_devices", stage="5%", outcome="failed")] == 0
    pending = key("fleet_device_update_pending_seconds", device=canary.id, hostname="cam-1")
    assert found[pending] == pytest.approx(1000)
    response = harness.client.post(
        "/api/v1/emergency-stop", json={"reason": "test"}, headers=harness.operator
    )
    assert response.status_code == 200, response.text
    assert samples(harness.client)[("fleet_emergency_stop", ())] == 1


def test_service_discovery(harness: Harness, enrolled: Enrolled) -> None:
    listed = enrolled(hostname="cam-1")
    enrolled(hostname="cam-2").heartbeat()  # no metrics address: not a target
    assert listed.heartbeat(metrics_address="10.1.2.3:9101").status_code == 204
    assert harness.client.get("/api/v1/sd/prometheus").status_code == 401
    response = harness.client.get("/api/v1/sd/prometheus", headers=harness.viewer)
    assert response.status_code == 200
    assert response.json() == [
        {
            "targets": ["10.1.2.3:9101"],
            "labels": {
                "device": listed.id,
                "hostname": "cam-1",
                "role": "",
                "version": "1.0.0",
                "compatible": "metrica-rpi4",
            },
        }
    ]
    quarantined = harness.client.post(
        f"/api/v1/devices/{listed.id}/quarantine", json={"reason": "test"},
        headers=harness.operator,
    )  # fmt: skip
    assert quarantined.status_code == 200, quarantined.text
    response = harness.client.get("/api/v1/sd/prometheus", headers=harness.viewer)
    assert len(response.json()) == 1  # quarantined: still watched
    decommissioned = harness.client.post(
        f"/api/v1/devices/{listed.id}/decommission", json={"reason": "stolen"},
        headers=harness.operator,
    )  # fmt: skip
    assert decommissioned.status_code == 200, decommissioned.text
    assert harness.client.get("/api/v1/sd/prometheus", headers=harness.viewer).json() == []


@pytest.mark.parametrize(
    "address", ["10.1.2.3", "host:0", "host:65536", "a b:80", "-host:80", "[::1:80", "h:80\n"]
)
def test_a_metrics_address_must_be_host_and_port(
    harness: Harness, enrolled: Enrolled, address: str
) -> None:
    assert enrolled().heartbeat(metrics_address=address).status_code == 422


def test_good_metrics_addresses(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled()
    for address in ("cam-1.lan:9101", "192.168.1.20:1", "[2001:db8::7]:65535"):
        assert device.heartbeat(metrics_address=address).status_code == 204, address
