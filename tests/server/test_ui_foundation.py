"""The web console's foundation (server/ui): signing in and out, the session cookie, session
expiry, redirects that stay on the console, CSRF and role checks on actions, the emergency
stop, HTML error pages, the console's Content-Security-Policy, and the form parser."""

from __future__ import annotations

import re
import warnings
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from click.testing import CliRunner
from fastapi import Request
from fastapi.responses import HTMLResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from fleet_core.text import refused_character
from server import rollouts
from server.auth import Role, create_operator_token, revoke_operator_token, secret_hash
from server.cli.serve import server as server_group
from server.errors import ApiError, SettingsError
from server.headers import UI_POLICY
from server.models import OperatorToken, UiSessionRow
from server.settings import Settings, utc
from server.ui import sessions
from server.ui.common import UiPage, render
from server.ui.forms import Form
from tests.server.conftest import Harness

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')
PAGE = "/ui/test-page"
HOSTILE = '<script>alert("x")</script>&"\''


def _add_test_page(harness: Harness) -> None:
    """A page that needs a session (the console's own pages are tested with their modules)."""

    def page(request: Request, me: UiPage) -> HTMLResponse:
        return render(request, me, "error.html", title="Test page", message="ok", error_status=200)

    if not any(getattr(r, "path", None) == PAGE for r in harness.app.router.routes):
        harness.app.router.add_api_route(PAGE, page, methods=["GET"])


@pytest.fixture
def console(harness: Harness) -> Harness:
    _add_test_page(harness)
    return harness


def token(harness: Harness, role: Role = Role.OPERATOR, name: str | None = None, **kw: Any) -> str:
    return create_operator_token(
        harness.db,
        name=name or f"ui-{role.label}",
        role=role,
        created_by="test",
        now=utc(harness.clock),
        **kw,
    )


def login(client: TestClient, secret: str, next_path: str | None = None) -> Any:
    data = {"token": secret}
    if next_path is not None:
        data["next"] = next_path
    return client.post("/ui/login", data=data, follow_redirects=False)


def signed_in(harness: Harness, role: Role = Role.OPERATOR) -> str:
    """Sign the harness's client in; the CSRF token of its session."""
    response = login(harness.client, token(harness, role))
    assert response.status_code == 303, response.text
    page = harness.client.get(PAGE)
    assert page.status_code == 200, page.text
    found = CSRF.search(page.text)
    assert found is not None
    return found[1]


def stop_state(harness: Harness) -> bool:
    return bool(rollouts.status(harness.db, utc(harness.clock))["emergency_stop"]["active"])


# --- signing in ---------------------------------------------------------------------------------


def test_a_page_without_a_session_redirects_to_sign_in_and_back(console: Harness) -> None:
    response = console.client.get(PAGE + "?x=1", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login?next=/ui/test-page%3Fx%3D1"
    form = console.client.get(response.headers["location"])
    assert form.status_code == 200
    assert 'name="next" value="/ui/test-page?x=1"' in form.text
    signed = login(console.client, token(console), "/ui/test-page?x=1")
    assert signed.status_code == 303
    assert signed.headers["location"] == "/ui/test-page?x=1"
    assert console.client.get(PAGE).status_code == 200


def test_a_good_token_signs_in_with_its_name_and_role(console: Harness) -> None:
    signed_in(console, Role.VIEWER)
    page = console.client.get(PAGE)
    assert "ui-viewer" in page.text
    assert 'class="role role-viewer"' in page.text
    assert console.count(UiSessionRow) == 1
    with console.db.read() as session:
        stored = session.scalars(select(UiSessionRow.secret_sha256)).all()
    cookie = console.client.cookies.get("fleet_ui")
    assert cookie is not None and cookie not in stored  # only the hash is kept
    assert stored == [secret_hash(cookie)]  # ...and it names this session


@pytest.mark.parametrize("kind", ["unknown", "expired", "revoked", "blank"])
def test_a_bad_token_is_the_form_again_with_401(console: Harness, kind: str) -> None:
    secret = "fleet_op_nobody"  # noqa: S105  # pragma: allowlist secret (no such token)
    if kind == "expired":
        secret = token(console, expires=utc(console.clock))
    elif kind == "revoked":
        secret = token(console)
        with console.db.read() as session:
            token_id = session.scalars(select(OperatorToken.id).order_by(OperatorToken.id)).all()[
                -1
            ]
        revoke_operator_token(console.db, token_id, actor="test", now=utc(console.clock))
    elif kind == "blank":
        secret = ""
    response = login(console.client, secret)
    assert response.status_code == 401
    assert "unknown, expired or revoked operator token" in response.text
    assert 'name="token"' in response.text
    assert "set-cookie" not in response.headers
    assert console.count(UiSessionRow) == 0


def test_a_session_dies_with_its_token(console: Harness) -> None:
    signed_in(console)
    with console.db.read() as session:
        token_id = session.scalars(select(OperatorToken.id).order_by(OperatorToken.id)).all()[-1]
    revoke_operator_token(console.db, token_id, actor="test", now=utc(console.clock))
    response = console.client.get(PAGE, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/ui/login")


def test_a_session_dies_when_its_token_expires(console: Harness) -> None:
    response = login(
        console.client, token(console, expires=utc(console.clock) + timedelta(seconds=120))
    )
    assert response.status_code == 303
    assert console.client.get(PAGE).status_code == 200
    console.clock.advance(121)
    assert console.client.get(PAGE, follow_redirects=False).status_code == 303


def test_the_cookie_is_httponly_samesite_strict_path_root(console: Harness) -> None:
    response = login(console.client, token(console))
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("fleet_ui=fleet_ui_")
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/" in cookie
    assert "Secure" not in cookie


def test_over_https_the_cookie_is_secure_and_host_prefixed(console: Harness) -> None:
    with TestClient(console.app, base_url="https://testserver") as client:
        response = login(client, token(console))
        cookie = response.headers["set-cookie"]
        assert cookie.startswith("__Host-fleet_ui=")
        assert "Secure" in cookie and "HttpOnly" in cookie and "Path=/" in cookie
        assert "SameSite=strict" in cookie
        assert client.get(PAGE).status_code == 200


def test_signing_out_ends_the_session_and_clears_the_cookie(console: Harness) -> None:
    csrf = signed_in(console)
    old = console.client.cookies.get("fleet_ui")
    response = console.client.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login"
    assert (
        'fleet_ui=""' in response.headers["set-cookie"]
        or "Max-Age=0" in response.headers["set-cookie"]
    )
    assert console.count(UiSessionRow) == 0
    console.client.cookies.set("fleet_ui", old or "")
    assert console.client.get(PAGE, follow_redirects=False).status_code == 303


def test_signing_in_always_makes_a_fresh_session_whatever_cookie_was_planted(
    console: Harness,
) -> None:
    # session fixation: a cookie planted before sign-in, unknown or another live session of
    # the planter's, is never the session the sign-in grants
    def plant(value: str) -> None:
        console.client.cookies.clear()
        console.client.cookies.set("fleet_ui", value)

    def granted() -> str:
        response = login(console.client, token(console))
        assert response.status_code == 303, response.text
        return response.cookies["fleet_ui"]

    plant("planted-by-someone-else")
    assert granted() != "planted-by-someone-else"
    plant("")
    signed_in(console, Role.VIEWER)
    theirs = [c.value for c in console.client.cookies.jar if c.name == "fleet_ui" and c.value]
    assert len(theirs) == 1
    plant(theirs[0])
    mine = granted()
    assert mine != theirs[0]
    plant(mine)
    page = console.client.get(PAGE)
    assert page.status_code == 200 and "operator" in page.text


def assert_cookie_cleared(response: Any) -> None:
    cookie = response.headers.get("set-cookie", "")
    assert cookie.startswith("fleet_ui=") and ('fleet_ui=""' in cookie or "Max-Age=0" in cookie)


def live_refresh(harness: Harness) -> Any:
    """A page fetched as console.js's live refresh fetches it."""
    return harness.client.get(PAGE, headers={"X-Fleet-Live": "1"}, follow_redirects=False)


def test_live_refresh_is_not_use_of_the_session(console: Harness) -> None:
    signed_in(console)
    for _ in range(sessions.IDLE_TIMEOUT_S // 120 - 1):
        console.clock.advance(120)
        assert live_refresh(console).status_code == 200
    console.clock.advance(121)
    ended = live_refresh(console)
    assert ended.status_code == 303
    assert ended.headers["location"].startswith("/ui/login")
    assert_cookie_cleared(ended)


def test_a_navigation_is_use_of_the_session(console: Harness) -> None:
    signed_in(console)
    console.clock.advance(sessions.IDLE_TIMEOUT_S - 120)
    assert console.client.get(PAGE).status_code == 200  # a person opened a page
    console.clock.advance(sessions.IDLE_TIMEOUT_S - 120)
    assert live_refresh(console).status_code == 200  # alive: the navigation restarted the time
    console.clock.advance(240)
    assert live_refresh(console).status_code == 303


def test_idle_sessions_end_after_30_minutes(console: Harness) -> None:
    signed_in(console)
    console.clock.advance(sessions.IDLE_TIMEOUT_S - 120)
    assert console.client.get(PAGE).status_code == 200  # use recorded: the idle time restarts
    console.clock.advance(sessions.IDLE_TIMEOUT_S - 120)
    assert console.client.get(PAGE).status_code == 200
    console.clock.advance(sessions.IDLE_TIMEOUT_S)
    assert console.client.get(PAGE, follow_redirects=False).status_code == 303


def test_sessions_end_12_hours_after_signing_in_however_used(console: Harness) -> None:
    signed_in(console)
    for _ in range(sessions.ABSOLUTE_LIFETIME_S // 1200 - 1):
        console.clock.advance(1200)
        assert console.client.get(PAGE).status_code == 200
    console.clock.advance(1200)
    assert console.client.get(PAGE, follow_redirects=False).status_code == 303


def test_use_is_recorded_at_most_once_a_minute(console: Harness) -> None:
    signed_in(console)

    def last_used() -> Any:
        with console.db.read() as session:
            return session.scalars(select(UiSessionRow.last_used)).one()

    first = last_used()
    console.clock.advance(30)
    console.client.get(PAGE)
    assert last_used() == first
    console.clock.advance(31)
    console.client.get(PAGE)
    assert last_used() > first


def test_ended_sessions_are_removed_when_someone_signs_in(console: Harness) -> None:
    secret = token(console)
    for _ in range(3):
        assert login(console.client, secret).status_code == 303
    console.clock.advance(sessions.IDLE_TIMEOUT_S + 1)
    assert login(console.client, secret).status_code == 303
    assert console.count(UiSessionRow) == 1


def test_a_token_keeps_its_newest_sessions_only(console: Harness) -> None:
    secret = token(console)
    cookies = []
    for _ in range(sessions.MAX_SESSIONS_PER_TOKEN + 5):
        console.clock.advance(1)
        assert login(console.client, secret).status_code == 303
        cookies.append(console.client.cookies.get("fleet_ui") or "")
    assert console.count(UiSessionRow) == sessions.MAX_SESSIONS_PER_TOKEN
    other = token(console, Role.VIEWER)  # another token's sessions are its own
    assert login(console.client, other).status_code == 303
    assert console.count(UiSessionRow) == sessions.MAX_SESSIONS_PER_TOKEN + 1
    for n, cookie in enumerate(cookies):
        console.client.cookies.set("fleet_ui", cookie)
        alive = console.client.get(PAGE, follow_redirects=False).status_code == 200
        assert alive == (n >= 5), n


def test_signing_out_of_an_ended_session_clears_the_cookie(console: Harness) -> None:
    csrf = signed_in(console)
    console.clock.advance(sessions.IDLE_TIMEOUT_S + 1)
    response = console.client.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login"
    assert_cookie_cleared(response)


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/ui/",
        "https://evil.example/ui/",
        "/ui/../api/v1/devices",
        "/ui/%2e%2e/api/v1/devices",
        "/ui/\\evil.example",
        "\\\\evil.example/ui/",
        "/\\evil.example",
        "/api/v1/devices",
        "javascript:alert(1)",
        "/ui/login",
    ],
)
def test_next_never_leaves_the_console(console: Harness, target: str) -> None:
    response = login(console.client, token(console), target)
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/"
    form = console.client.get("/ui/login", params={"next": target}, follow_redirects=False)
    assert form.status_code == 303 and form.headers["location"] == "/ui/"


def test_sign_in_from_another_site_is_refused(console: Harness) -> None:
    secret = token(console)
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        response = console.client.post(
            "/ui/login", data={"token": secret}, headers=headers, follow_redirects=False
        )
        assert response.status_code == 403
        assert "cross-site request refused" in response.text
    assert console.count(UiSessionRow) == 0


def test_failed_sign_ins_are_limited_per_address(console: Harness) -> None:
    for _ in range(10):
        assert login(console.client, "fleet_op_wrong").status_code == 401
    refused = login(console.client, token(console))
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) > 0
    assert "text/html" in refused.headers["content-type"]
    assert "too many failed sign-ins" in refused.text
    console.clock.advance(61)
    assert login(console.client, token(console)).status_code == 303


def test_the_limiter_forgets_the_oldest_addresses() -> None:
    from server.ui.pages_login import LoginLimiter, TooManyAttemptsError

    limiter = LoginLimiter(max_failures=1, window_s=60, max_addresses=3)
    for n in range(5):
        limiter.attempt(f"10.0.0.{n}", 0.0)
    assert len(limiter) == 3
    limiter.attempt("10.0.0.0", 1.0)  # forgotten: counted afresh
    with pytest.raises(TooManyAttemptsError):
        limiter.attempt("10.0.0.4", 1.0)


def test_an_attempt_counts_before_its_token_is_checked() -> None:
    from server.ui.pages_login import LoginLimiter, TooManyAttemptsError

    limiter = LoginLimiter(max_failures=3, window_s=60)
    # three attempts under way at once (none answered yet): the fourth is refused
    started = [limiter.attempt("10.0.0.1", 0.0) for _ in range(3)]
    with pytest.raises(TooManyAttemptsError, match="a correct token is refused too"):
        limiter.attempt("10.0.0.1", 0.0)
    limiter.succeeded(started[0])  # one of them signed in: given back
    limiter.attempt("10.0.0.1", 0.0)


# --- actions: CSRF and roles --------------------------------------------------------------------


def post_stop(harness: Harness, data: dict[str, str], **headers: str) -> Any:
    return harness.client.post(
        "/ui/emergency-stop", data=data, headers=headers, follow_redirects=False
    )


@pytest.mark.parametrize(
    ("change", "headers"),
    [
        ("missing", {}),
        ("wrong", {}),
        ("none", {"Origin": "https://evil.example"}),
        ("none", {"Origin": "null"}),
        ("none", {"Sec-Fetch-Site": "cross-site"}),
        ("none", {"Sec-Fetch-Site": "same-site"}),
    ],
)
def test_actions_from_elsewhere_are_refused(
    console: Harness, change: str, headers: dict[str, str]
) -> None:
    csrf = signed_in(console)
    data = {"reason": "test", "confirm": "STOP", "csrf": csrf}
    if change == "missing":
        del data["csrf"]
    elif change == "wrong":
        data["csrf"] = "0" * 64
    response = post_stop(console, data, **headers)
    assert response.status_code == 403
    assert "cross-site request refused" in response.text
    assert not stop_state(console)


def test_actions_from_the_console_itself_pass_the_origin_check(console: Harness) -> None:
    csrf = signed_in(console)
    data = {"reason": "test", "confirm": "STOP", "csrf": csrf, "back": "/ui/devices?x=1"}
    response = post_stop(
        console, data, Origin="http://testserver", **{"Sec-Fetch-Site": "same-origin"}
    )
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/ui/devices?x=1"
    assert stop_state(console)


def test_a_viewer_cannot_stop_the_fleet(console: Harness) -> None:
    csrf = signed_in(console, Role.VIEWER)
    response = post_stop(console, {"reason": "x", "confirm": "STOP", "csrf": csrf})
    assert response.status_code == 403
    assert "this needs operator" in response.text
    assert not stop_state(console)
    assert "Stop every rollout" not in console.client.get(PAGE).text


def test_an_action_without_a_session_goes_to_sign_in(console: Harness) -> None:
    response = post_stop(console, {"reason": "x", "confirm": "STOP", "csrf": "0" * 64})
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login"
    assert not stop_state(console)


def test_the_emergency_stop_needs_the_word_stop(console: Harness) -> None:
    csrf = signed_in(console)
    for word in ("stop", "STOP!", "", "CLEAR"):
        response = post_stop(console, {"reason": "x", "confirm": word, "csrf": csrf})
        assert response.status_code == 400, word
        assert "type STOP to confirm" in response.text
    assert not stop_state(console)
    missing = post_stop(console, {"confirm": "STOP", "csrf": csrf})
    assert missing.status_code == 422 and "reason: required" in missing.text
    assert not stop_state(console)


@pytest.mark.parametrize(
    ("reason", "named"),
    [
        ("evil \u202e gnirts", "U+202E"),  # a bidi override: the API refuses it too
        ("zero\u200bwidth", "U+200B"),
        ("two\nlines", "U+000A"),
        ("tab\there", "U+0009"),
    ],
)
def test_the_emergency_stop_reason_is_inert_text_as_in_the_api(
    console: Harness, reason: str, named: str
) -> None:
    csrf = signed_in(console)
    response = post_stop(console, {"reason": reason, "confirm": "STOP", "csrf": csrf})
    assert response.status_code == 422, response.text
    assert f"reason: {named}" in response.text
    assert not stop_state(console)


def test_the_emergency_stop_is_set_and_cleared_from_the_console(console: Harness) -> None:
    csrf = signed_in(console)
    response = post_stop(console, {"reason": "bad canary", "confirm": "STOP", "csrf": csrf})
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/"
    control = rollouts.status(console.db, utc(console.clock))["emergency_stop"]
    assert control["active"] and control["reason"] == "bad canary"
    assert control["actor"] == "operator:ui-operator"
    page = console.client.get(PAGE).text
    assert "Emergency stop is on" in page and "bad canary" in page
    assert "every rollout is paused" in page  # the one-shot notice...
    assert "every rollout is paused" not in console.client.get(PAGE).text  # ...shown once
    wrong = console.client.post(
        "/ui/emergency-stop/clear", data={"confirm": "STOP", "csrf": csrf}, follow_redirects=False
    )
    assert wrong.status_code == 400 and stop_state(console)
    cleared = console.client.post(
        "/ui/emergency-stop/clear",
        data={"confirm": "CLEAR", "csrf": csrf, "back": "https://evil.example/"},
        follow_redirects=False,
    )
    assert cleared.status_code == 303 and cleared.headers["location"] == "/ui/"
    assert not stop_state(console)


class LiveRegions(HTMLParser):
    """The page's live regions (elements with an id and ``data-live``): id -> their HTML."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.regions: dict[str, str] = {}
        self.nested = 0
        self._open: list[tuple[str, int, list[str]]] = []  # (id, depth, parts)
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        text = self.get_starttag_text() or ""
        for _, _, parts in self._open:
            parts.append(text)
        if tag in {"input", "meta", "link", "br", "img"}:
            return
        self._depth += 1
        if "data-live" in named and named.get("id"):
            self.nested += bool(self._open)
            self._open.append((str(named["id"]), self._depth, [text]))

    def handle_endtag(self, tag: str) -> None:
        for _, _, parts in self._open:
            parts.append(f"</{tag}>")
        if self._open and self._open[-1][1] == self._depth:
            region, _, parts = self._open.pop()
            self.regions[region] = "".join(parts)
        self._depth -= 1

    def handle_data(self, data: str) -> None:
        for _, _, parts in self._open:
            parts.append(data)


def live_regions(html: str) -> LiveRegions:
    parser = LiveRegions()
    parser.feed(html)
    return parser


def test_the_emergency_stop_bar_and_form_are_one_live_region(console: Harness) -> None:
    signed_in(console)
    off = live_regions(console.client.get(PAGE).text)
    assert off.nested == 0
    block = off.regions["estop"]
    assert "Emergency stop: off" in block and "estop-on" not in block
    assert 'action="/ui/emergency-stop"' in block and 'id="estop-reason"' in block
    rollouts.emergency_stop(console.db, "lab", actor="test", now=utc(console.clock))
    on = live_regions(console.client.get(PAGE, headers={"X-Fleet-Live": "1"}).text)
    block = on.regions["estop"]
    # the red bar, the state and the operator's clear form all follow, in one region
    assert 'class="estop estop-on"' in block and "Emergency stop is on" in block
    assert 'action="/ui/emergency-stop/clear"' in block
    assert 'action="/ui/emergency-stop"' not in block
    # an unrelated refresh serves the region unchanged (console.js then leaves it alone)
    again = live_regions(console.client.get(PAGE, headers={"X-Fleet-Live": "1"}).text)
    assert again.regions["estop"] == block


def test_a_form_of_another_type_is_refused(console: Harness) -> None:
    csrf = signed_in(console)
    response = console.client.post(
        "/ui/emergency-stop", json={"reason": "x", "confirm": "STOP", "csrf": csrf}
    )
    assert response.status_code == 415
    assert not stop_state(console)


# --- pages: headers, errors, escaping -----------------------------------------------------------


def test_console_pages_carry_the_console_policy(console: Harness) -> None:
    for path in ("/ui/login", "/ui/nothing-here", "/ui/static/console.css"):
        assert console.client.get(path).headers["content-security-policy"] == UI_POLICY
    api = console.client.get("/api/v1/rollouts", headers=console.viewer)
    assert "script-src" not in api.headers["content-security-policy"]


def test_console_pages_let_the_browser_name_their_origin(console: Harness) -> None:
    # under no-referrer a browser posts the console's own forms with Origin: null, which the
    # cross-site check refuses: the console's pages say same-origin, the API keeps no-referrer
    for path in ("/ui/login", "/ui/nothing-here", "/ui/static/console.css"):
        assert console.client.get(path).headers["referrer-policy"] == "same-origin", path
    api = console.client.get("/api/v1/rollouts", headers=console.viewer)
    assert api.headers["referrer-policy"] == "no-referrer"


def test_pages_are_not_cached_and_static_files_are(console: Harness) -> None:
    assert console.client.get("/ui/login").headers["cache-control"] == "no-store"
    page = console.client.get("/ui/login").text
    url = re.search(r'href="(/ui/static/console\.css\?v=[0-9a-f]+)"', page)
    assert url is not None
    css = console.client.get(url[1])
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert css.headers["cache-control"].startswith("public, max-age=")
    again = console.client.get(url[1], headers={"If-None-Match": css.headers["etag"]})
    assert again.status_code == 304
    for name in ("../settings.py", "nothing.css", "%2e%2e%2fcommon.py"):
        assert console.client.get(f"/ui/static/{name}").status_code == 404


def test_static_files_answer_head_like_get_without_a_body(console: Harness) -> None:
    got = console.client.get("/ui/static/console.js")
    head = console.client.head("/ui/static/console.js")
    assert head.status_code == 200 and head.content == b""
    for name in ("content-type", "etag", "cache-control", "content-length"):
        assert head.headers[name] == got.headers[name], name
    assert int(head.headers["content-length"]) == len(got.content)
    assert console.client.head("/ui/static/nothing.js").status_code == 404


def test_a_missing_page_is_html_under_ui_and_json_under_api(console: Harness) -> None:
    page = console.client.get("/ui/no/such/page")
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert "there is no such page" in page.text
    api = console.client.get("/api/v1/no/such/thing")
    assert api.status_code == 404
    assert api.json()["error"] == "not_found"


def test_a_hostile_token_name_is_escaped(console: Harness) -> None:
    response = login(console.client, token(console, name=HOSTILE))
    assert response.status_code == 303
    page = console.client.get(PAGE).text
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;&#34;&#39;" in page


def test_a_hostile_next_is_escaped_on_the_form(console: Harness) -> None:
    form = console.client.get("/ui/login", params={"next": '/ui/"><script>x</script>'})
    assert "<script>x" not in form.text


# --- the form parser ----------------------------------------------------------------------------


def test_forms_parse_fields_and_refuse_bad_ones() -> None:
    form = Form.parse(b"a=+1+&b=x%20y&b=&b=z&n=42&f=2.5&empty=")
    assert form.get("a") == "1"
    assert form.getall("b") == ["x y", "z"]
    assert form.get("empty") is None and form.get("absent") is None
    assert form.integer("n", 0, 100) == 42
    assert form.number("f", 0, 3) == 2.5
    with pytest.raises(ApiError, match="Stages: required"):
        form.require("absent", "Stages")
    with pytest.raises(ApiError, match="not between"):
        form.integer("n", 0, 10)
    with pytest.raises(ApiError, match="not a whole number"):
        Form.parse(b"n=%2B-5").integer("n", -10, 10)
    with pytest.raises(ApiError, match="not a number"):
        Form.parse(b"f=nan").number("f", 0, 1)
    with pytest.raises(ApiError, match="control characters"):
        Form.parse(b"name=a%00b")
    with pytest.raises(ApiError, match="not valid UTF-8"):
        Form.parse(b"name=%ff")
    with pytest.raises(ApiError, match="non-ASCII"):
        Form.parse("name=é".encode())


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_any_body_is_parsed_or_refused_with_a_4xx(body: bytes) -> None:
    try:
        form = Form.parse(body)
    except ApiError as err:
        assert 400 <= err.status < 500
        return
    for name in ("a", "n", "f"):
        for call in (form.integer, form.number):
            try:
                call(name, -5, 5)
            except ApiError as err:
                assert 400 <= err.status < 500
        try:
            form.confirm(name, "STOP")
        except ApiError as err:
            assert err.status == 400


def stop_form(reason: str, confirm: str) -> bytes:
    """A stop form's fields after the CSRF token (which the test puts first)."""
    return urlencode({"reason": reason, "confirm": confirm}).encode()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.binary(max_size=200)
    | st.builds(
        stop_form,
        # past the form parser's control check, so the reason's own rule is what is tried
        st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=140),
        st.sampled_from(["STOP", "stop", ""]),
    )
)
def test_any_posted_body_is_answered_with_a_clear_4xx_or_done(
    console: Harness, body: bytes
) -> None:
    # the session's own CSRF token first, so the body reaches the form's fields
    if "csrf" not in console.scratch:
        console.scratch["csrf"] = signed_in(console)
    response = console.client.post(
        "/ui/emergency-stop",
        content=f"csrf={console.scratch['csrf']}&".encode() + body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    if response.status_code == 303:  # done: what was stored is inert one-line text
        control = rollouts.status(console.db, utc(console.clock))["emergency_stop"]
        assert control["active"]
        assert 1 <= len(control["reason"]) <= 128
        assert refused_character(control["reason"]) is None, ascii(control["reason"])
        rollouts.clear_emergency_stop(console.db, actor="test", now=utc(console.clock))
        return
    assert 400 <= response.status_code < 500, response.text
    assert response.status_code != 403, response.text  # the CSRF token was the session's
    assert response.headers["content-type"].startswith("text/html")
    assert not stop_state(console)


def test_templates_and_static_files_are_package_data() -> None:
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert "ui/templates/*.html" in pyproject
    assert "ui/static/*" in pyproject


# --- the monitoring links' settings -------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://grafana.example",
        "javascript:alert(1)",
        "grafana.example:3000",
        "http://",
        "http://user:pw@grafana.example",  # pragma: allowlist secret
        "http://grafana.example/?q=1",
        "http://grafana.example/?",  # links would be made after an empty query
        "http://grafana.example/#",
        "http://grafana.example:99999",
        "http://grafana .example",
        "http://grafana.example/\x00",
    ],
)
def test_monitoring_urls_must_be_plain_http_urls(tmp_path: Path, url: str) -> None:
    with pytest.raises(SettingsError, match="Grafana URL"):
        Settings.create(tmp_path / "data", grafana_url=url)
    result = CliRunner().invoke(
        server_group, ["run", "--data-dir", str(tmp_path / "data"), "--grafana-url", url]
    )
    assert result.exit_code == 2
    assert "--grafana-url" in result.output


def test_monitoring_urls_are_kept_without_a_trailing_slash(tmp_path: Path) -> None:
    settings = Settings.create(
        tmp_path / "data",
        grafana_url="https://grafana.example:3000/",
        loki_url="http://127.0.0.1:3100",
        alertmanager_url="http://[::1]:9093/am/",
    )
    assert settings.grafana_url == "https://grafana.example:3000"
    assert settings.loki_url == "http://127.0.0.1:3100"
    assert settings.alertmanager_url == "http://[::1]:9093/am"
    assert Settings.create(tmp_path / "data").grafana_url is None


def test_an_unexpected_error_under_ui_is_an_html_page_without_details(console: Harness) -> None:
    def boom() -> None:
        raise RuntimeError("secret detail /etc/passwd")

    console.app.router.add_api_route("/ui/test-boom", boom, methods=["GET"])
    with TestClient(console.app, raise_server_exceptions=False) as client:
        response = client.get("/ui/test-boom")
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("text/html")
    assert "unexpected server error (logged)" in response.text
    assert "secret detail" not in response.text
    assert response.headers["content-security-policy"] == UI_POLICY
