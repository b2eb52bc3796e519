"""What keeps another site from acting with a console session: the session cookie's
attributes and the check of every state-changing request (CSRF).

The cookie is ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site's page
sends it), ``Path=/``, and over TLS ``Secure`` with the ``__Host-`` prefix (no subdomain or
plain-HTTP page can set or shadow it).

A state-changing request must carry the session's CSRF token in its form (compared in constant
time) and, when the browser says so, come from the console's own origin: ``Origin`` (when
present) must be the request's own scheme and host, and ``Sec-Fetch-Site`` (when present)
``same-origin`` or ``none``. Signing in has no session yet: the origin check and SameSite
guard it.
"""

from __future__ import annotations

import hmac

from fastapi import Request, Response

from server.errors import ForbiddenError

TLS_COOKIE = "__Host-fleet_ui"
PLAIN_COOKIE = "fleet_ui"
CSRF_FIELD = "csrf"
DEFAULT_PORTS = {"http": "80", "https": "443"}
SAME_SITE_FETCHES = frozenset({"same-origin", "none"})


class CrossSiteError(ForbiddenError):
    """A state-changing request that did not come from the console's own pages."""

    code = "cross_site_request"


def is_tls(request: Request) -> bool:
    """Whether the browser reached the server over HTTPS (directly or through a trusted
    proxy's X-Forwarded-Proto, which uvicorn applies to the scheme)."""
    return request.url.scheme == "https"


def cookie_name(request: Request) -> str:
    return TLS_COOKIE if is_tls(request) else PLAIN_COOKIE


def session_secret(request: Request) -> str | None:
    """The session secret the browser sent, if any."""
    return request.cookies.get(cookie_name(request)) or None


def set_session_cookie(response: Response, request: Request, secret: str, max_age_s: int) -> None:
    response.set_cookie(
        cookie_name(request),
        secret,
        max_age=max_age_s,
        path="/",
        secure=is_tls(request),
        httponly=True,
        samesite="strict",
    )


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        cookie_name(request), path="/", secure=is_tls(request), httponly=True, samesite="strict"
    )


def _origin(scheme: str, host: str) -> str:
    scheme, host = scheme.lower(), host.lower()
    name, colon, port = host.rpartition(":")
    if colon and "]" not in port and port == DEFAULT_PORTS.get(scheme):
        host = name
    return f"{scheme}://{host}"


def check_origin(request: Request) -> None:
    """Refuse a request a browser says came from another site.

    Raises:
        CrossSiteError: ``Origin`` is not this server's own, or ``Sec-Fetch-Site`` is neither
            ``same-origin`` nor ``none``.
    """
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site.strip().lower() not in SAME_SITE_FETCHES:
        raise CrossSiteError("cross-site request refused")
    origin = request.headers.get("origin")
    if origin is None:
        return
    scheme, sep, host = origin.strip().partition("://")
    own = _origin(request.url.scheme, request.headers.get("host", request.url.netloc))
    if not sep or _origin(scheme, host) != own:
        raise CrossSiteError("cross-site request refused")


def check_csrf(request: Request, expected: str, submitted: str | None) -> None:
    """Refuse a state-changing request that is not from one of the session's own pages.

    Raises:
        CrossSiteError: the form's CSRF token is missing or not the session's, or the origin
            check (:func:`check_origin`) fails.
    """
    check_origin(request)
    if submitted is None or not hmac.compare_digest(
        submitted.encode("utf-8"), expected.encode("utf-8")
    ):
        raise CrossSiteError("cross-site request refused")
