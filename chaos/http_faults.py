"""A static HTTP server on loopback that misbehaves on request: the lab's flaky network.

Serves byte strings by path with ``ETag``, single ``Range`` requests (206/416) and
``If-Range``, like the plain HTTP hosts that mirror blobs. Faults are queued per request:
drop the connection after N body bytes, answer with an error status, or stall before sending.
Latency, loss and resets live here, in user space, because these machines have no ``netem``.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that takes a client hanging up as normal, not as an error:
    in the lab, connections are cut on purpose."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass(frozen=True)
class Fault:
    """What to do to one request: ``drop_after`` body bytes, reply ``status``, ``stall_s``."""

    drop_after: int | None = None
    status: int | None = None
    stall_s: float = 0.0


class FlakyHttpServer:
    """``with FlakyHttpServer({"/x": data}) as server: server.url("/x")``."""

    def __init__(
        self, files: dict[str, bytes], *, ranges: bool = True, etags: bool | None = None
    ) -> None:
        self.files = dict(files)
        self.ranges = ranges  # False: a host that ignores Range
        self.etags = ranges if etags is None else etags  # whether it sends ETags
        self.faults: deque[Fault] = deque()
        self.requests: list[dict[str, str]] = []
        self._lock = threading.Lock()
        handler = self._handler()
        self._server = QuietHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyHttpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{path}"

    def add_faults(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def _next_fault(self) -> Fault:
        with self._lock:
            return self.faults.popleft() if self.faults else Fault()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append({k: v for k, v in self.headers.items()})
                fault = server._next_fault()
                if fault.stall_s:
                    time.sleep(fault.stall_s)
                data = server.files.get(self.path)
                if fault.status is not None or data is None:
                    self._reply_empty(fault.status or 404)
                    return
                etag = '"' + hashlib.sha256(data).hexdigest() + '"'
                start, end, status = 0, len(data), 200
                wanted = self.headers.get("Range") if server.ranges else None
                if_range = self.headers.get("If-Range")
                if wanted and (if_range is None or if_range == etag):
                    first = wanted.removeprefix("bytes=").split("-")[0]
                    start = int(first)
                    if start >= len(data):
                        self._reply_empty(416, {"Content-Range": f"bytes */{len(data)}"})
                        return
                    status = 206
                self.send_response(status)
                if server.etags:
                    self.send_header("ETag", etag)
                if server.ranges:
                    self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.end_headers()
                body = data[start:end]
                if fault.drop_after is not None:
                    self.wfile.write(body[: fault.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.close()
                    return
                self.wfile.write(body)

            def _reply_empty(self, status: int, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler
