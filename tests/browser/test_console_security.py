"""What the console refuses in a real browser: a viewer sees no action and its forged request is
403 even with the session's CSRF token; a page of another origin cannot press the emergency stop
with the operator's session, not even knowing the CSRF token; and what devices report (or a
hostname stored before hostnames had rules) is shown as text, never run as markup."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from server.settings import SQLITE_FILE
from tests.browser.conftest import Console, ConsoleServer, fake_devices, login, send_events

VIEWER_PAGES = ["/ui/", "/ui/devices", "/ui/rollouts", "/ui/releases", "/ui/audit"]


def test_a_viewer_sees_no_action_and_its_forged_post_is_refused(
    console: Console, server: ConsoleServer
) -> None:
    (device,) = fake_devices(server, ["lobby-cam"], version="1.0.0")
    login(console, "viewer")
    page = console.page
    for path in [*VIEWER_PAGES, f"/ui/devices/{device.id}"]:
        assert console.goto(path) == 200, path
        # the only form a viewer has is signing out
        actions = page.locator("form[method=post]").evaluate_all("fs => fs.map(f => f.action)")
        assert actions == [server.url + "/ui/logout"], (path, actions)
    assert page.get_by_text("Start a rollout").count() == 0

    csrf = page.locator("form[action='/ui/logout'] input[name=csrf]").input_value()
    assert csrf
    answer = page.evaluate(
        """async ([csrf]) => {
            const body = new URLSearchParams({csrf, reason: "forged", confirm: "STOP",
                                              back: "/ui/"});
            const r = await fetch("/ui/emergency-stop", {method: "POST", body,
                                                         credentials: "same-origin"});
            return [r.status, await r.text()];
        }""",
        [csrf],
    )
    assert answer[0] == 403, answer
    assert "operator" in answer[1]  # names the role needed
    assert not server.emergency_stopped()


class Attacker:
    """A web page on another origin (another port of loopback) that posts a form to the
    console's emergency stop as soon as it is opened."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.form: dict[str, str] = {}
        page = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fields = "".join(
                    f'<input type="hidden" name="{name}" value="{value}">'
                    for name, value in page.form.items()
                )
                body = (
                    "<!doctype html><title>cute cats</title>"
                    f'<form method="post" action="{page.target}/ui/emergency-stop">{fields}</form>'
                    "<script>document.forms[0].submit()</script>"
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def attacker(server: ConsoleServer) -> Iterator[Attacker]:
    page = Attacker(server.url)
    try:
        yield page
    finally:
        page.close()


@pytest.mark.parametrize("knows_csrf", [False, True], ids=["guessing", "knowing-the-csrf-token"])
def test_a_page_of_another_origin_cannot_press_the_emergency_stop(
    console: Console, server: ConsoleServer, attacker: Attacker, knows_csrf: bool
) -> None:
    login(console, "admin")
    page = console.page
    attacker.form = {"reason": "pwned", "confirm": "STOP", "back": "/ui/"}
    if knows_csrf:  # as if it had leaked: the origin check alone must refuse
        attacker.form["csrf"] = page.locator("input[name=csrf]").first.input_value()
    with page.expect_response(lambda r: r.url.endswith("/ui/emergency-stop")) as posted:
        page.goto(attacker.url)
    page.wait_for_load_state()
    console.shot("after-the-attack")
    assert posted.value.status == 403
    assert "cross-site request refused" in page.content()
    assert not server.emergency_stopped()
    # the session itself still works from the console's own pages
    console.goto("/ui/", "overview")
    assert "Emergency stop: off" in page.locator("#estop-state").inner_text()


XSS_IMG = "<img src=x onerror=window.__fleetXss=1>"
XSS_SCRIPT = "<script>window.__fleetXss=2</script>"
XSS_SVG = '"><svg onload=window.__fleetXss=3>'


def markup_ran(page: Any) -> list[str]:
    """What of the hostile markup became elements, or ran."""
    found = page.evaluate(
        """() => {
            const found = [];
            if (window.__fleetXss !== undefined) found.push("ran: " + window.__fleetXss);
            if (document.querySelector("img[src=x]")) found.push("img element");
            if (document.querySelector("main svg")) found.push("svg element");
            for (const s of document.scripts) {
                if (s.textContent.includes("__fleetXss")) found.push("script element");
            }
            return found;
        }"""
    )
    return list(found)


def test_hostile_text_from_devices_is_shown_as_text_and_runs_nothing(
    new_console: Callable[..., Console], server: ConsoleServer
) -> None:
    hostile, _ = fake_devices(
        server, ["xss-probe", "neighbour"], version=XSS_SCRIPT,
        health=[{"name": XSS_IMG, "ok": False}],
    )  # fmt: skip
    send_events(hostile, ("install.failed", {"error": XSS_IMG, "detail": XSS_SCRIPT}))
    # a hostname stored before hostnames had rules (the API refuses markup in one now)
    with sqlite3.connect(server.data / SQLITE_FILE) as db:
        db.execute("UPDATE devices SET hostname = ? WHERE id = ?", (XSS_SVG, hostile.id))
    console = login(new_console())
    page = console.page
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    for path, texts in [
        ("/ui/", [XSS_SCRIPT]),
        ("/ui/devices", [XSS_SVG, XSS_SCRIPT]),
        (f"/ui/devices/{hostile.id}", [XSS_SVG, XSS_SCRIPT, XSS_IMG]),
        ("/ui/audit", [XSS_IMG]),
    ]:
        assert console.goto(path) == 200, path
        shown = page.locator("main").inner_text()
        for text in texts:
            assert text in shown, (path, text)
        assert markup_ran(page) == [], path
    assert errors == []
