"""At most so many release uploads in progress at once, in one server process.

An upload holds a file in ``uploads/`` growing towards the upload limit, a request handler and,
once received, minutes of hashing and copying; a few dozen at once would fill the disk or starve
every other request. Past the limit an upload is answered 503 with ``Retry-After`` before its
body is read, and every other route is served as before.
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("server")

UPLOAD_PATH = "/api/v1/releases"
RETRY_AFTER_S = 30


class UploadLimitMiddleware:
    """ASGI middleware admitting at most ``limit`` concurrent ``POST`` requests to
    :data:`UPLOAD_PATH`; an upload is in progress from its admission until its answer has
    been sent (or the request failed)."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].rstrip("/") == UPLOAD_PATH
        ):
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            log.warning("upload refused: %d uploads in progress already", self.in_progress)
            await _refuse(send, self.limit)
            return
        self.in_progress += 1
        admitted = True

        def leave() -> None:
            nonlocal admitted
            if admitted:
                admitted = False
                self.in_progress -= 1

        async def send_and_leave(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                leave()  # answered: the client may start its next upload at once

        try:
            await self.app(scope, receive, send_and_leave)
        finally:
            leave()


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps(
        {
            "error": "too_many_uploads",
            "detail": f"{limit} release uploads are in progress already; retry later",
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # no "connection: close": closing with the body unread would reset the
                # connection, and the client could lose this answer; uvicorn discards the rest
                # of the body, under the header deadline (server/timeouts.py)
                (b"retry-after", str(RETRY_AFTER_S).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
