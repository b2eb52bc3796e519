"""One ASGI wrapper that watches each HTTP request to its end, for the request metrics and the
access log: both need the route template, the status actually sent and the duration."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestObserver:
    """ASGI middleware that calls :meth:`observe` once per HTTP request, after it was answered
    (or failed: the status is then 500, what the client gets when the application raises
    before answering). Wrap the application from outside: the router fills in the route on
    the request's scope, which :meth:`observe` reads."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.observe(scope, status, time.perf_counter() - started)

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        """What to do with one answered request; subclasses say."""
        raise NotImplementedError


def route_template(scope: Scope, unmatched: str) -> str:
    """The template of the route that served the request (``/api/v1/devices/{device_id}``),
    never the path as sent; ``unmatched`` when no route matched."""
    return str(getattr(scope.get("route"), "path", None) or unmatched)
