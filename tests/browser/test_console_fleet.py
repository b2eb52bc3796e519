"""The fleet pages: the overview says what the API says, the device list filters and pages
with its state in the URL (a shared URL shows the same view), and a device's page shows the
events it reported."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from tests.browser.conftest import Console, ConsoleServer, fake_devices, login, send_events
from tests.chaos.conftest import Releases


def test_the_overview_shows_the_numbers_of_the_api(
    console: Console, server: ConsoleServer, releases: Releases
) -> None:
    devices = fake_devices(server, [f"cam-{i}" for i in range(4)], version="1.0.0")
    devices += fake_devices(server, ["gw-0", "gw-1", "gw-2"], version="1.1.0")
    server.post(f"/api/v1/devices/{devices[0].id}/quarantine", {"reason": "bench test"})
    server.post(f"/api/v1/devices/{devices[5].id}/decommission", {"reason": "returned"})
    server.fleet("release", "upload", str(releases.bundle("2.0.0")))
    server.fleet("rollout", "start", "2.0.0", "--canary", devices[1].id, "--soak", "1d")

    login(console)
    page = console.page
    rows = server.devices()
    statuses = Counter(row["status"] for row in rows)

    def count(key: str) -> int:
        return int(page.get_by_test_id(f"count-{key}").inner_text())

    assert count("total") == len(rows) == 7
    assert count("quarantined") == statuses["quarantined"] == 1
    assert count("decommissioned") == statuses["decommissioned"] == 1
    versions = Counter(row["version"] for row in rows)
    shown = {
        row.locator("td").nth(0).inner_text(): int(row.locator("td").nth(1).inner_text())
        for row in page.get_by_test_id("version-row").all()
    }
    assert shown == dict(versions) == {"1.0.0": 4, "1.1.0": 3}
    active = [r for r in server.rollouts()["rollouts"] if r["state"] in ("running", "paused")]
    assert len(active) == 1
    card = page.get_by_test_id(f"rollout-{active[0]['id']}")
    assert card.get_by_test_id("rollout-state").inner_text() == active[0]["state"]
    assert "2.0.0" in card.inner_text()
    assert "off" in page.get_by_test_id("overview-estop").inner_text()


def test_the_device_list_filters_and_pages_and_its_url_is_the_view(
    new_console: Callable[..., Console], server: ConsoleServer
) -> None:
    fake_devices(server, [f"cam-{i:02d}" for i in range(30)], role="camera")
    fake_devices(server, [f"sensor-{i}" for i in range(4)], role="sensor")
    console = login(new_console())
    page = console.page
    console.goto("/ui/devices", "devices")
    assert "34 devices match" in page.get_by_test_id("device-total").inner_text()

    page.fill("#filter-role", "camera")
    page.select_option("#filter-per-page", "25")
    console.submit(lambda: page.get_by_test_id("filter-submit").click(), "cameras-page-1")
    query = parse_qs(urlsplit(page.url).query)
    assert query["role"] == ["camera"] and query["per_page"] == ["25"]
    assert "30 devices match; page 1 of 2" in page.get_by_test_id("device-total").inner_text()
    first = page.get_by_test_id("device-link").all_inner_texts()
    assert len(first) == 25 and all(name.startswith("cam-") for name in first)

    console.submit(lambda: page.get_by_test_id("page-next").click(), "cameras-page-2")
    query = parse_qs(urlsplit(page.url).query)
    assert query["role"] == ["camera"] and query["page"] == ["2"]
    second = page.get_by_test_id("device-link").all_inner_texts()
    assert len(second) == 5 and not set(first) & set(second)
    assert page.input_value("#filter-role") == "camera"  # the form keeps the filter

    # the URL is the view: another browser signing in there sees the same page
    shared = page.url
    other = new_console()
    other.goto(shared.removeprefix(server.url), "shared-before-login")
    assert "/ui/login" in other.page.url
    other.page.fill("input[name=token]", server.tokens["viewer"])
    other.submit(lambda: other.page.get_by_role("button", name="Sign in").click(), "shared")
    assert other.page.url == shared
    assert other.page.get_by_test_id("device-link").all_inner_texts() == second


def test_a_device_page_shows_the_events_the_device_reported(
    console: Console, server: ConsoleServer
) -> None:
    device, _ = fake_devices(server, ["door-cam", "yard-cam"], version="1.0.0")
    send_events(
        device,
        ("install.started", {"version": "2.0.0", "message": "streaming into slot b"}),
        ("install.failed", {"version": "2.0.0", "error": "disk full: 12 MB left"}),
    )
    login(console)
    console.goto("/ui/devices", "devices")
    page = console.page
    console.submit(lambda: page.get_by_role("link", name="door-cam").click(), "door-cam")
    assert page.url.endswith(f"/ui/devices/{device.id}")
    assert page.get_by_test_id("device-hostname").inner_text() == "door-cam"
    assert page.get_by_test_id("device-version").inner_text() == "1.0.0"

    reported = server.api(f"/api/v1/devices/{device.id}/events")["entries"]
    actions = [entry["action"] for entry in reported]
    assert actions[-2:] == ["install.started", "install.failed"]
    timeline = page.get_by_test_id("timeline").inner_text()
    for action in actions:
        assert action in timeline
    assert "disk full: 12 MB left" in timeline
    assert "streaming into slot b" in timeline
