"""Every page of the console for everyone: axe-core finds no serious or critical violation,
the keyboard reaches the sign-in field, the emergency stop and the device filter, and a phone's
375 px wide screen needs no sideways scrolling."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from playwright.sync_api import Page

from tests.browser.conftest import Console, ConsoleServer, fake_devices, login, run_axe
from tests.chaos.conftest import Releases

PHONE = {"width": 375, "height": 812}
NO_SUCH_DEVICE = "/ui/devices/" + "0" * 64


def every_page(server: ConsoleServer, releases: Releases) -> list[str]:
    """A fleet with something on every page; the console's pages, signed in."""
    devices = fake_devices(server, [f"cam-{i}" for i in range(3)], version="1.0.0",
                           role="camera", tags=["lobby"])  # fmt: skip
    server.fleet("release", "upload", str(releases.bundle("2.0.0")))
    server.fleet("rollout", "start", "2.0.0", "--canary", devices[0].id, "--soak", "1d")
    rollout = server.rollouts()["rollouts"][0]["id"]
    return [
        "/ui/",
        "/ui/devices",
        "/ui/devices?role=camera&per_page=25",
        f"/ui/devices/{devices[0].id}",
        "/ui/rollouts",
        "/ui/rollouts/new",
        f"/ui/rollouts/{rollout}",
        "/ui/releases",
        "/ui/audit",
        NO_SUCH_DEVICE,  # the error page
    ]


def horizontal_overflow(page: Page) -> int:
    """How many pixels the page is wider than the window."""
    width: int = page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    return width


@pytest.mark.parametrize("viewport", [None, PHONE], ids=["desktop", "phone"])
def test_axe_finds_no_serious_violation_and_no_page_scrolls_sideways(
    new_console: Callable[..., Console],
    server: ConsoleServer,
    releases: Releases,
    viewport: dict[str, int] | None,
) -> None:
    pages = every_page(server, releases)
    console = new_console(viewport=viewport) if viewport else new_console()
    found: dict[str, object] = {}
    console.goto("/ui/login", "login")
    found["/ui/login"] = run_axe(console.page)
    wide = {"/ui/login": horizontal_overflow(console.page)}
    login(console, "admin")
    for path in pages:
        # the page itself is checked, not an error page in its place
        assert console.goto(path) == (404 if path == NO_SUCH_DEVICE else 200), path
        found[path] = run_axe(console.page)
        wide[path] = horizontal_overflow(console.page)
    assert {path: v for path, v in found.items() if v} == {}
    if viewport is not None:
        assert {path: px for path, px in wide.items() if px > 0} == {}


def focus_by_tab(page: Page, selector: str, limit: int = 60) -> int:
    """Press Tab from the top of the page until ``selector`` has the focus; the presses."""
    page.locator("body").focus()
    page.evaluate("document.activeElement && document.activeElement.blur()")
    for presses in range(1, limit + 1):
        page.keyboard.press("Tab")
        if page.evaluate("(s) => document.activeElement.matches(s)", selector):
            return presses
    raise AssertionError(f"{limit} presses of Tab never reached {selector}")


def test_the_keyboard_reaches_sign_in_the_emergency_stop_and_the_device_filter(
    console: Console, server: ConsoleServer
) -> None:
    fake_devices(server, ["cam-0"], version="1.0.0")
    page = console.page
    console.goto("/ui/login", "login")
    focus_by_tab(page, "input[name=token]")
    page.keyboard.type(server.tokens["operator"])
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url.rstrip("/").endswith("/ui")

    focus_by_tab(page, "details.estop-actions > summary")
    page.keyboard.press("Enter")  # opens the emergency stop's form
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "estop-reason"
    page.keyboard.type("checking the keyboard")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "estop-confirm"
    page.keyboard.type("STOP")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Stop every rollout"
    console.shot("stop-focused")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert server.emergency_stopped()

    console.goto("/ui/devices", "devices")
    focus_by_tab(page, "#filter-q")
    page.keyboard.type("cam")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "q=cam" in page.url
    assert page.get_by_test_id("device-link").all_inner_texts() == ["cam-0"]


def test_a_signed_in_console_is_also_reached_by_keyboard_on_a_phone(
    new_console: Callable[..., Console], server: ConsoleServer
) -> None:
    console = login(new_console(viewport=PHONE))
    focus_by_tab(console.page, "details.estop-actions > summary")
    console.goto("/ui/devices", "devices-phone")
    focus_by_tab(console.page, "#filter-q")
