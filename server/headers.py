"""The headers every answer of the server carries: what a browser may do with it, and whether
anyone may keep a copy.

- ``X-Content-Type-Options: nosniff``: an answer is what its ``Content-Type`` says, never a
  script or a page a browser guessed (a device's hostname in JSON stays text).
- ``Content-Security-Policy``: API answers load nothing and may not be framed
  (:data:`API_POLICY`). The interactive API documentation (``fleet server run --api-docs``)
  is a page that loads its scripts and styles from a CDN and runs an inline script, so its
  pages get :data:`DOCS_POLICY`, which allows exactly that and still no framing. The web
  console (``/ui``) gets :data:`UI_POLICY`: its own scripts, styles and event stream only, no
  inline script or style, forms posted only to itself, no framing.
- ``Referrer-Policy: no-referrer``: a link followed from a page of the server names no URL of
  it. The console's pages get ``same-origin`` instead: still nothing for another site (its
  Grafana and Loki links), but a browser posting one of the console's forms must name the
  console as the ``Origin`` it came from, which the console's cross-site check requires
  (under ``no-referrer`` Chromium sends ``Origin: null``, indistinguishable from a sandboxed
  attacker's page).
- ``Cache-Control: no-store`` on every answer that does not choose its own caching: tokens,
  sessions, device answers and fleet data are secrets or per-caller; no cache (a proxy, a
  browser's disk) may keep them. Blobs choose theirs (``public, immutable``: content-addressed,
  no authentication, every byte checked against a signed manifest by whoever downloads it) and
  keep it; so do the console's static files (``public``, versioned by their hash), while its
  pages, which show fleet data, get ``no-store`` like every API answer.

One middleware sets them all, outermost, so error answers (401, 404, 422, 500) carry them too.
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_POLICY = "default-src 'none'; frame-ancestors 'none'"
# What FastAPI's Swagger UI and ReDoc pages load: scripts and styles from jsDelivr, ReDoc's
# fonts from Google, the FastAPI logo, an inline start-up script, ReDoc's blob: worker, and the
# schema from this server.
DOCS_POLICY = (
    "default-src 'none'; "
    "script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "font-src https://fonts.gstatic.com; "
    "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; "
    "connect-src 'self'; "
    "worker-src blob:; "
    "frame-ancestors 'none'"
)
UI_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
NO_STORE = "no-store"


def is_console_path(path: str) -> bool:
    """Whether ``path`` is the web console's (``/ui`` and below)."""
    return path == "/ui" or path.startswith("/ui/")


def policy_for(path: str, docs_paths: Collection[str] = ()) -> str:
    """The Content-Security-Policy of an answer to ``path``."""
    if path in docs_paths:
        return DOCS_POLICY
    if is_console_path(path):
        return UI_POLICY
    return API_POLICY


def referrer_policy_for(path: str) -> str:
    """The Referrer-Policy of an answer to ``path``."""
    return "same-origin" if is_console_path(path) else "no-referrer"


class SecurityHeadersMiddleware:
    """ASGI middleware adding the security headers to every HTTP answer; ``docs_paths`` are
    the documentation pages (empty when the documentation is off)."""

    def __init__(self, app: ASGIApp, docs_paths: Collection[str] = ()) -> None:
        self.app = app
        self.docs_paths = frozenset(docs_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        policy = policy_for(path, self.docs_paths)
        referrer_policy = referrer_policy_for(path)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Content-Security-Policy"] = policy
                headers["Referrer-Policy"] = referrer_policy
                if "cache-control" not in headers:
                    headers["Cache-Control"] = NO_STORE
            await send(message)

        await self.app(scope, receive, send_with_headers)
