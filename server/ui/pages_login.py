"""Signing in and out of the console (``/ui/login``, ``/ui/logout``).

Signing in exchanges an operator token for a session cookie (server/ui/sessions.py). Failed
attempts are limited per client address (:class:`LoginLimiter`), in memory: each process
keeps its own count, in bounded space. An attempt is counted when it starts, before its token
is checked, so parallel attempts cannot pass the limit; one that succeeds is given back. While
an address is over the limit every attempt from it is refused, a correct token too, for at
most :data:`WINDOW_S` seconds (the page and ``Retry-After`` say how long): telling a correct
token apart there would let the guessing go on. Signing in and out is logged, never audited
(the audit trail is for changes to the fleet), and no secret is logged.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from server.api.common import server_state
from server.errors import ApiError, UnauthenticatedError
from server.ui import sessions
from server.ui.common import (
    HOME_PATH,
    LOGIN_PATH,
    UiViewerAction,
    local_ui_path,
    redirect,
    render,
)
from server.ui.feed import feed_of
from server.ui.forms import read_form
from server.ui.security import (
    check_origin,
    clear_session_cookie,
    session_secret,
    set_session_cookie,
)

log = logging.getLogger("server")

MAX_FAILURES = 10  # failed sign-ins per address and window
WINDOW_S = 60.0
MAX_ADDRESSES = 10_000  # addresses remembered; the least recently failing are forgotten first
BAD_TOKEN = "unknown, expired or revoked operator token"  # noqa: S105 (a message)

router = APIRouter()


class TooManyAttemptsError(ApiError):
    """Too many failed sign-ins from one address: wait for the window to pass."""

    status = 429
    code = "too_many_attempts"


@dataclass
class _Window:
    started: float
    failures: int


class LoginLimiter:
    """At most ``max_failures`` failed sign-ins per client address in a window of
    ``window_s`` seconds, each counted as it starts; memory bounded to ``max_addresses``
    windows (least recently trying forgotten first)."""

    def __init__(
        self,
        max_failures: int = MAX_FAILURES,
        window_s: float = WINDOW_S,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def attempt(self, address: str, now: float) -> _Window:
        """Count an attempt from ``address`` as failed until it succeeds (:meth:`succeeded`);
        the window it was counted in.

        Raises:
            TooManyAttemptsError: (with Retry-After) ``address`` is over the limit; nothing
                is counted.
        """
        window = self._windows.pop(address, None)
        if window is None or now - window.started >= self.window_s:
            window = _Window(now, 0)
        self._windows[address] = window
        while len(self._windows) > self.max_addresses:
            self._windows.popitem(last=False)
        if window.failures >= self.max_failures:
            wait = max(1, math.ceil(window.started + self.window_s - now))
            raise TooManyAttemptsError(
                f"too many failed sign-ins from this address: try again in {wait} s "
                "(until then a correct token is refused too)",
                headers={"Retry-After": str(wait)},
            )
        window.failures += 1
        return window

    def succeeded(self, window: _Window) -> None:
        """Give back the attempt counted in ``window``: it signed in."""
        window.failures = max(0, window.failures - 1)

    def __len__(self) -> int:
        return len(self._windows)


def _limiter(request: Request) -> LoginLimiter:
    limiter: LoginLimiter | None = getattr(request.app.state, "ui_login_limiter", None)
    if limiter is None:
        limiter = request.app.state.ui_login_limiter = LoginLimiter()
    return limiter


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.get("/ui/login")
def login_page(request: Request, next: str | None = None) -> Response:
    """The sign-in form; a browser already signed in goes on to ``next`` (or the overview)."""
    target = local_ui_path(next)
    secret = session_secret(request)
    if secret is not None:
        state = server_state(request)
        try:
            sessions.lookup(state.db, secret, state.now())
        except UnauthenticatedError:
            pass
        else:
            return redirect(target or HOME_PATH)
    return render(request, None, "login.html", next=target, error=None)


@router.post("/ui/login")
async def login(request: Request) -> Response:
    """Sign in with an operator token: a session cookie, and on to ``next``; a bad token is
    the form again with 401.

    Raises:
        CrossSiteError: the form was posted from another site.
        TooManyAttemptsError: too many failed attempts from this address lately.
    """
    check_origin(request)
    state = server_state(request)
    limiter = _limiter(request)
    address = _address(request)
    window = limiter.attempt(address, state.settings.clock())
    form = await read_form(request)
    target = local_ui_path(form.get("next"))
    token = form.get("token") or ""
    try:
        secret, ui_session = await run_in_threadpool(sessions.create, state.db, token, state.now())
    except UnauthenticatedError:
        log.info("console sign-in refused from %s", address)
        return await run_in_threadpool(
            render, request, None, "login.html", 401, next=target, error=BAD_TOKEN
        )
    limiter.succeeded(window)
    log.info(
        "console sign-in: %s (%s) from %s",
        ui_session.operator.name,
        ui_session.operator.role.label,
        address,
    )
    response = redirect(target or HOME_PATH)
    set_session_cookie(response, request, secret, sessions.ABSOLUTE_LIFETIME_S)
    return response


@router.post("/ui/logout")
def logout(request: Request, posted: UiViewerAction) -> Response:
    """Sign out: the session ends and the cookie is cleared (a session that had ended already
    goes to the sign-in page with its cookie cleared: server.ui.common's login redirect)."""
    secret = session_secret(request)
    if secret is not None:
        sessions.end(server_state(request).db, secret)
        feed_of(request.app).end_sessions([posted.session.key])
    log.info("console sign-out: %s", posted.session.operator.name)
    response = redirect(LOGIN_PATH)
    clear_session_cookie(response, request)
    return response
