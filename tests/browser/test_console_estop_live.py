"""The emergency stop follows the fleet without a reload: a stop made elsewhere turns the bar
red and offers the operator the clear form at once, and a live refresh for an unrelated change
leaves what the operator is typing into the stop form alone; the refetches say they are
background requests (not use of the session)."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.browser.conftest import WAIT_MS, Console, ConsoleServer, fake_devices, login


def test_the_stop_bar_and_form_follow_the_fleet_without_a_reload(
    console: Console, server: ConsoleServer
) -> None:
    fake_devices(server, ["hall-cam"], version="1.0.0")
    login(console)
    page = console.page
    html = page.locator("html")
    expect(html).to_have_attribute("data-live-state", "connected")
    console.mark()
    fetched: list[dict[str, str]] = []
    page.on("request", lambda r: fetched.append(r.headers) if r.resource_type == "fetch" else None)
    bar = page.locator("section#estop")
    expect(bar).not_to_have_class("estop estop-on")

    page.get_by_text("Emergency stop", exact=True).click()  # opens the form
    page.fill("#estop-reason", "half typed")
    refreshes = int(html.get_attribute("data-live-refreshes") or "0")
    fake_devices(server, ["yard-cam"], version="1.0.0")  # an unrelated change
    expect(page.get_by_test_id("count-total")).to_have_text("2", timeout=WAIT_MS)
    assert int(html.get_attribute("data-live-refreshes") or "0") > refreshes
    expect(page.locator("#estop-reason")).to_have_value("half typed")
    expect(page.locator("details.estop-actions")).to_have_attribute("open", "")
    console.shot("typing-kept")

    server.post("/api/v1/emergency-stop", {"reason": "stopped from the api"})
    expect(bar).to_have_class("estop estop-on", timeout=WAIT_MS)
    expect(page.locator("#estop-state")).to_contain_text("stopped from the api")
    expect(page.locator("form[action='/ui/emergency-stop/clear']")).to_have_count(1)
    expect(page.locator("form[action='/ui/emergency-stop']")).to_have_count(0)
    console.shot("stopped-elsewhere")
    assert console.marked(), "the page was reloaded"
    # every refetch says it is the page's own, not a person's use of the session
    assert fetched and all(headers.get("x-fleet-live") == "1" for headers in fetched)
