"""How long a client may take to send a request: the header deadline and the body deadline.

uvicorn bounds neither. Its keep-alive timeout runs only between requests and is cancelled by
every byte received, so a client sending its headers a byte at a time, or a body of 100 declared
bytes of which it sends one, holds a connection (and, for the body, a request handler) for ever.
Two rules close that:

- **Headers**: from the moment the server waits for a request (the connection opened, or the
  previous response ended) the request line and headers must be complete within
  ``header_timeout_s``; bytes trickling in do not extend it. Past it the client gets 408 and the
  connection is closed. This has to live in the HTTP protocol, below ASGI: an ASGI application
  is called only once the headers are complete (:func:`header_deadline_protocol`).
- **Body**: every read of the body must arrive within ``body_read_timeout_s`` of the previous
  one, and each mebibyte of it (``RATE_WINDOW_BYTES``, counted from the start of the body) within
  ``body_read_timeout_s`` plus a mebibyte at ``min_body_rate_bps``, so a large release upload
  on a slow but live link works, and neither a drip of one byte per read timeout nor one after a
  fast start does. Past either, the application sees the client gone (it removes what it
  received) and the client gets 408 with the connection closed (:class:`BodyDeadlineMiddleware`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.settings import RATE_WINDOW_BYTES

log = logging.getLogger("server")

_HEADER_TIMEOUT_BODY = (
    b'{"error": "request_timeout", "detail": "the request headers came in too slowly"}'
)
_HEADER_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_HEADER_TIMEOUT_BODY), _HEADER_TIMEOUT_BODY)
)
_BODY_TIMEOUT_BODY = (
    b'{"error": "request_timeout", "detail": "the request body came in too slowly"}'
)


def header_deadline_protocol(base: type[asyncio.Protocol], timeout_s: float) -> type[Any]:
    """uvicorn's HTTP protocol class ``base`` (h11 or httptools), closing a connection whose
    request headers are not complete ``timeout_s`` after the server began waiting for them.

    Both of uvicorn's implementations keep the request being served in ``cycle``: while there
    is none, or its response is complete, the server waits for headers.
    """

    class HeaderDeadlineProtocol(base):  # type: ignore[valid-type,misc]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._watch_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _watch_headers(self) -> None:
            waiting = self.cycle is None or self.cycle.response_complete
            if not waiting or self.transport.is_closing():
                self._disarm()
            elif self._header_timer is None:
                self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            # an upgraded connection (WebSocket) belongs to another protocol object now
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
            log.warning(
                "closed connection from %s: request headers took over %ss", client, timeout_s
            )
            self.transport.write(_HEADER_TIMEOUT_RESPONSE)
            self.transport.close()

    HeaderDeadlineProtocol.__name__ = HeaderDeadlineProtocol.__qualname__ = (
        f"HeaderDeadline{base.__name__}"
    )
    return HeaderDeadlineProtocol


class BodyDeadlineMiddleware:
    """ASGI middleware enforcing the body deadline (see the module docstring) on HTTP requests.

    A body that comes in too slowly ends, for the application, as a client disconnect; whatever
    the application answers then is replaced by 408 with ``connection: close``. Once the body
    has ended, ``receive`` is passed through untouched: a streaming response waiting for a
    disconnect must wait as long as the download lasts.
    """

    def __init__(self, app: ASGIApp, *, read_timeout_s: float, min_rate_bps: float = 0.0) -> None:
        self.app = app
        self.read_timeout_s = read_timeout_s
        self.min_rate_bps = min_rate_bps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = last = window_start = time.monotonic()
        received = window_base = 0
        body_done = timed_out = response_started = False

        def deadline() -> float:
            limit = last + self.read_timeout_s
            if self.min_rate_bps > 0:
                window = (received - window_base) / self.min_rate_bps
                limit = min(limit, window_start + self.read_timeout_s + window)
            return limit

        async def receive_in_time() -> Message:
            nonlocal last, received, window_start, window_base, body_done, timed_out
            if body_done:
                return await receive()
            if timed_out:
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline() - time.monotonic()))
            except TimeoutError:
                timed_out = True
                client = scope.get("client")
                log.warning(
                    "request body from %s came in too slowly (%d bytes in %.1fs); cut off",
                    f"{client[0]}:{client[1]}" if client else "unknown",
                    received,
                    time.monotonic() - started,
                )
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                last = time.monotonic()
                received += len(message.get("body", b""))
                if received - window_base >= RATE_WINDOW_BYTES:
                    window_start, window_base = last, received
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def send_or_408(message: Message) -> None:
            nonlocal response_started
            if not timed_out or response_started:
                response_started = True
                await send(message)
            elif message["type"] == "http.response.start":
                await send(
                    {
                        "type": "http.response.start",
                        "status": 408,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(_BODY_TIMEOUT_BODY)).encode()),
                            (b"connection", b"close"),
                        ],
                    }
                )
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                await send({"type": "http.response.body", "body": _BODY_TIMEOUT_BODY})

        await self.app(scope, receive_in_time, send_or_408)


def uvicorn_http_protocol(header_timeout_s: float) -> type[Any]:
    """The HTTP protocol class to give uvicorn (``http=``): the one it would pick itself
    (httptools when installed, else h11), with the header deadline."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return header_deadline_protocol(AutoHTTPProtocol, header_timeout_s)
