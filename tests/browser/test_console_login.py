"""Signing in: a bad token is refused with a message on the login page, a good one lands on
the overview, and the login field is reached from the keyboard."""

from __future__ import annotations

from tests.browser.conftest import Console, ConsoleServer, login, said


def test_a_bad_token_shows_the_error_and_a_good_one_lands_on_the_overview(
    console: Console, server: ConsoleServer
) -> None:
    page = console.page
    status = console.login("not-a-token")
    assert status == 401, f"{status}: {said(page)}"
    assert page.url.endswith("/ui/login")
    error = page.get_by_role("alert")
    assert "unknown, expired or revoked operator token" in error.inner_text()
    assert page.locator("header nav").count() == 0  # nothing of the console before signing in

    login(console, "operator")
    assert page.get_by_role("heading", level=1).inner_text() == "Fleet overview"
    assert "ui-operator" in page.locator("header").inner_text()
    assert "operator" in page.locator("header").inner_text()


def test_a_page_asked_for_before_signing_in_is_shown_after(
    console: Console, server: ConsoleServer
) -> None:
    console.goto("/ui/devices?q=camera", "devices-before-login")
    assert "/ui/login" in console.page.url
    console.page.fill("input[name=token]", server.tokens["viewer"])
    status = console.submit(lambda: console.page.get_by_role("button", name="Sign in").click(),
                            "devices-after-login")  # fmt: skip
    assert status == 200
    assert console.page.url == server.url + "/ui/devices?q=camera"


def test_signing_out_ends_the_session(console: Console, server: ConsoleServer) -> None:
    login(console, "admin")
    page = console.page
    console.submit(lambda: page.get_by_role("button", name="Sign out").click(), "signed-out")
    assert "/ui/login" in page.url
    console.goto("/ui/devices", "devices-after-signing-out")
    assert "/ui/login" in page.url
    assert page.context.cookies(server.url) == []
