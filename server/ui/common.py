"""What every console page shares: the session dependencies, rendering, redirects, and the
HTML error pages of ``/ui``.

- :data:`UiPage` admits a GET page with a live session, else redirects to the sign-in page
  (which comes back to the page afterwards) and clears the cookie of a session that ended. A
  page fetched by console.js's live refresh (header :data:`LIVE_HEADER`) does not count as
  use of the session, so an open page left alone still ends after the idle limit.
- :data:`UiAction` admits a POST with a live session, a form from the session's own page
  (CSRF, server/ui/security.py) and at least the ``operator`` role; ``action(Role.ADMIN)``
  for admin-only actions.
- :func:`render` renders a template with the base context every page needs; every value is
  escaped by Jinja2's autoescaping, whatever a device or an operator named it.
- An error in a ``/ui`` route is answered with ``error.html`` (its status and one-line
  message), the API's JSON errors elsewhere (:func:`install_error_pages`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, unquote, urlsplit

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from server import rollouts
from server.api.common import server_state
from server.auth import Role
from server.database import Database
from server.errors import UnauthenticatedError
from server.headers import is_console_path
from server.ui import sessions
from server.ui.forms import Form, read_form
from server.ui.security import CSRF_FIELD, check_csrf, clear_session_cookie, session_secret
from server.ui.sessions import UiSession
from server.ui.static import static_exists, static_url

log = logging.getLogger("server")

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
LOGIN_PATH = "/ui/login"
HOME_PATH = "/ui/"
MAX_LOCAL_PATH = 2000
# Sent by console.js on its background refetch of a page: the fetch is not a person's use.
LIVE_HEADER = "x-fleet-live"
# (nav key, label, path) of the header's sections.
SECTIONS = (
    ("overview", "Overview", "/ui/"),
    ("devices", "Devices", "/ui/devices"),
    ("rollouts", "Rollouts", "/ui/rollouts"),
    ("releases", "Releases", "/ui/releases"),
    ("audit", "Audit", "/ui/audit"),
)

templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.globals.update(static_url=static_url, static_exists=static_exists, sections=SECTIONS)


class LoginRequired(Exception):
    """No live session: the browser is sent to the sign-in page, to come back to ``next``."""

    def __init__(self, next_path: str | None) -> None:
        super().__init__("sign in")
        self.next_path = next_path

    @property
    def location(self) -> str:
        if self.next_path is None:
            return LOGIN_PATH
        return f"{LOGIN_PATH}?next={quote(self.next_path, safe='/')}"


def local_ui_path(value: str | None) -> str | None:
    """``value`` if it is a path of the console on this server (``/ui/...``, with its query),
    else None: where a redirect may go after signing in or after an action, never another
    site (``//host``, ``https://...``), a backslash trick or a ``..`` out of ``/ui``."""
    if not value or len(value) > MAX_LOCAL_PATH or not value.isascii():
        return None
    if not value.isprintable() or "\\" in value or value.startswith("//"):
        return None
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not is_console_path(parts.path):
        return None
    decoded = unquote(parts.path)
    if "\\" in decoded or "//" in decoded or not decoded.isprintable():
        return None
    if any(segment in {".", ".."} for segment in decoded.split("/")):
        return None
    if decoded.rstrip("/") == LOGIN_PATH:
        return None
    return value


def here(request: Request) -> str:
    """The request's path and query, as a link back to it."""
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def is_background(request: Request) -> bool:
    """Whether console.js sent the request by itself (a live refresh), not a person."""
    return request.headers.get(LIVE_HEADER) == "1"


def _session(request: Request) -> UiSession:
    """The request's live session, its use recorded unless the request is a background one.

    Raises:
        UnauthenticatedError: no cookie, or its session ended.
    """
    secret = session_secret(request)
    if secret is None:
        raise UnauthenticatedError("no console session: sign in")
    state = server_state(request)
    return sessions.lookup(state.db, secret, state.now(), touch=not is_background(request))


def page_session(request: Request) -> UiSession:
    """The session of a GET page.

    Raises:
        LoginRequired: no live session (the page is where to come back to).
    """
    try:
        ui_session = _session(request)
    except UnauthenticatedError:
        raise LoginRequired(local_ui_path(here(request))) from None
    request.state.ui_session = ui_session
    return ui_session


@dataclass(frozen=True)
class Action:
    """A console POST admitted: its session and its form."""

    session: UiSession
    form: Form


def action(role: Role) -> Callable[[Request], Awaitable[Action]]:
    """A dependency admitting POSTs from the session's own pages by operators with at least
    ``role``.

    The dependency raises LoginRequired without a live session, CrossSiteError (403) when the
    CSRF check fails (server/ui/security.py), ForbiddenError (403) for a lower role, and the
    form's errors (server/ui/forms.py).
    """

    async def dependency(request: Request) -> Action:
        try:
            ui_session = await run_in_threadpool(_session, request)
        except UnauthenticatedError:
            raise LoginRequired(None) from None
        request.state.ui_session = ui_session
        form = await read_form(request)
        check_csrf(request, ui_session.csrf, form.get(CSRF_FIELD))
        ui_session.operator.require(role)
        return Action(ui_session, form)

    return dependency


UiPage = Annotated[UiSession, Depends(page_session)]
UiAction = Annotated[Action, Depends(action(Role.OPERATOR))]
UiAdminAction = Annotated[Action, Depends(action(Role.ADMIN))]
UiViewerAction = Annotated[Action, Depends(action(Role.VIEWER))]


def fleet_control(db: Database) -> dict[str, Any]:
    """The emergency stop as server.rollouts shows it (:func:`server.rollouts.emergency_stop_view`),
    read in one primary-key lookup; off until it was first used."""
    with db.read() as session:
        return rollouts.emergency_stop_view(session)


def _nav(path: str) -> str | None:
    for key, _label, section in SECTIONS:
        if section != HOME_PATH and (path == section or path.startswith(section + "/")):
            return key
    return "overview" if path == HOME_PATH else None


def render(
    request: Request,
    session: UiSession | None,
    template: str,
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    """``template`` rendered with the base context (``me``, ``csrf``, ``control``, ``notice``,
    ``nav``, ``can_act``, ``is_admin``, ``now``, ``here``, ``static_url``) and ``context``
    (which may override it). A waiting notice is shown once. Call from a worker thread (a
    sync route): it reads the database."""
    state = server_state(request)
    base: dict[str, Any] = {
        "request": request,
        "me": session,
        "csrf": session.csrf if session else None,
        "control": None,
        "notice": None,
        "nav": _nav(request.url.path),
        "can_act": session is not None and session.operator.role >= Role.OPERATOR,
        "is_admin": session is not None and session.operator.role >= Role.ADMIN,
        "now": state.now(),
        "here": here(request),
    }
    if session is not None:
        base["control"] = fleet_control(state.db)
        base["notice"] = sessions.take_notice(session)
    base.update(context)
    html = templates.get_template(template).render(base)
    return HTMLResponse(html, status_code=status)


def redirect(
    path: str, session: UiSession | None = None, notice: str | None = None
) -> RedirectResponse:
    """A 303 to ``path`` (a console path); with ``notice``, the session's next page shows it.
    Call from a worker thread when there is a notice (it writes to the database)."""
    if session is not None and notice is not None:
        sessions.set_notice(session, notice)
    return RedirectResponse(path, status_code=303)


async def _html_error(
    request: Request, status: int, message: str, headers: dict[str, str]
) -> Response:
    ui_session: UiSession | None = getattr(request.state, "ui_session", None)
    if ui_session is None and status < 500:
        try:
            ui_session = await run_in_threadpool(_session, request)
        except Exception:  # the error page is shown to anyone, signed in or not
            ui_session = None
    if status >= 500:
        ui_session = None
    titles = {400: "Bad request", 401: "Not signed in", 403: "Not allowed", 404: "Not found",
              405: "Not allowed here", 409: "Conflict", 413: "Too large", 422: "Invalid input",
              429: "Too many attempts", 503: "Unavailable"}  # fmt: skip
    title = titles.get(status, "Error" if status < 500 else "Server error")
    response = await run_in_threadpool(
        render, request, ui_session, "error.html", status, title=title, message=message,
        error_status=status,
    )  # fmt: skip
    response.headers.update(headers)
    return response


Handler = Callable[[Request, Exception], Awaitable[Response]]
AnyHandler = Callable[[Request, Any], Response | Awaitable[Response]]


def _html_for_ui(handler: AnyHandler) -> Handler:
    """``handler`` (one of the API's JSON error handlers) for every path but ``/ui``, whose
    errors get the same status and message as an HTML page."""

    async def handle(request: Request, exc: Exception) -> Response:
        answer = handler(request, exc)
        if not isinstance(answer, Response):
            answer = await answer
        if not is_console_path(request.url.path):
            return answer
        try:
            body = json.loads(bytes(answer.body))
            message = str(body["detail"])
        except (ValueError, KeyError, TypeError):
            message = "the request failed"
        if answer.status_code == 404 and message == "Not Found":
            message = "there is no such page"
        kept = {k: v for k, v in answer.headers.items() if k.lower() == "retry-after"}
        return await _html_error(request, answer.status_code, message, kept)

    return handle


async def _login_redirect(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)  # noqa: S101 (registered for LoginRequired only)
    response = RedirectResponse(exc.location, status_code=303)
    if session_secret(request) is not None:  # its session ended: the cookie goes too
        clear_session_cookie(response, request)
    return response


def install_error_pages(app: FastAPI) -> None:
    """Answer errors of ``/ui`` routes with ``error.html``; call after the API's error
    handlers are installed (server.api.common.install_error_handlers), which it wraps."""
    for kind, handler in list(app.exception_handlers.items()):
        app.add_exception_handler(kind, _html_for_ui(handler))
    app.add_exception_handler(LoginRequired, _login_redirect)
