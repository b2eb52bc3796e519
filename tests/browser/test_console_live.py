"""Live refresh survives the server: a console left open while ``fleet server run`` stops and
starts again on the same port reconnects by itself, and a change made after the restart reaches
the open page without a reload."""

from __future__ import annotations

from playwright.sync_api import expect

from tests.browser.conftest import WAIT_MS, Console, ConsoleServer, fake_devices, login


def test_the_console_reconnects_after_a_server_restart(
    console: Console, server: ConsoleServer
) -> None:
    fake_devices(server, ["hall-cam"], version="1.0.0")
    login(console)
    page = console.page
    html = page.locator("html")
    expect(html).to_have_attribute("data-live-state", "connected")
    console.mark()
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))

    server.stop()
    expect(html).not_to_have_attribute("data-live-state", "connected")
    console.shot("server-stopped")
    server.start()
    expect(html).to_have_attribute("data-live-state", "connected", timeout=WAIT_MS)

    server.post("/api/v1/emergency-stop", {"reason": "after the restart"})
    expect(page.locator("#estop-state")).to_contain_text("Emergency stop is on", timeout=WAIT_MS)
    expect(page.get_by_test_id("overview-estop")).to_contain_text("after the restart")
    fake_devices(server, ["yard-cam"], version="1.1.0")
    expect(page.get_by_test_id("count-total")).to_have_text("2", timeout=WAIT_MS)
    console.shot("changed-after-restart")
    assert console.marked(), "the page was reloaded"
    assert navigations == []
