"""Bundle sources: a local file, or an HTTP(S) URL read as a stream that survives dropped
connections.

:class:`HttpStream` reads a URL front to back. When the connection drops, stalls or ends early,
it reconnects with ``Range: bytes=<offset>-`` and ``If-Range: <ETag>``, so it continues where it
stopped, and only if the resource is still the same one; between attempts it waits with
exponential backoff and full jitter, so a fleet that lost its server does not come back all
at once. The bundle reader hashes every byte anyway: resuming can never smuggle in other bytes.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO

from updater.errors import DownloadError

if TYPE_CHECKING:
    import requests

    from updater.bandwidth import RateLimit

CHUNK = 1024 * 1024
# A dropped connection loses the chunk being received: keep it small, so a resume repeats
# little, and large enough that Python's per-chunk overhead stays negligible.
RECEIVE_CHUNK = 64 * 1024


class DeadlineGuard:
    """Cuts a response's connection when the install's deadline passes, however the host
    sends its bytes: a socket timeout bounds each read, not a host that drips a byte now and
    then, so a timer shuts the socket down (which wakes a read blocked on it)."""

    def __init__(self, response: Any, deadline: float | None, clock: Callable[[], float]) -> None:
        self._response = response
        self._timer: threading.Timer | None = None
        if deadline is not None:
            self._timer = threading.Timer(max(0.0, deadline - clock()), self._cut)
            self._timer.daemon = True
            self._timer.start()

    def _cut(self) -> None:
        for sock in _sockets(self._response):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self._response.close()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _sockets(response: Any) -> list[socket.socket]:
    """The socket(s) a streamed ``requests`` response reads from: its urllib3 connection's,
    or, once urllib3 let go of it (a reused connection), the one under http.client's reader."""
    found = []
    for path in (("raw", "_connection", "sock"), ("raw", "_fp", "fp", "raw", "_sock")):
        item = response
        for name in path:
            item = getattr(item, name, None)
        if isinstance(item, socket.socket):
            found.append(item)
    return found


@contextmanager
def deadline_guard(
    response: Any, deadline: float | None, clock: Callable[[], float]
) -> Iterator[DeadlineGuard]:
    """A :class:`DeadlineGuard` for the ``with`` block."""
    guard = DeadlineGuard(response, deadline, clock)
    try:
        yield guard
    finally:
        guard.cancel()


def backoff_delay(attempt: int, base_s: float, cap_s: float, rng: Callable[[], float]) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2^attempt)]."""
    return float(rng() * min(cap_s, base_s * (2**attempt)))


class HttpStream(io.RawIOBase):
    """A readable stream of a URL's body that resumes after failures."""

    def __init__(
        self,
        url: str,
        *,
        session: requests.Session | None = None,
        retries: int = 8,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        timeout_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
        start: int = 0,
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        verify: bool | str | None = None,
        rate: RateLimit | None = None,
    ) -> None:
        # imported here: a device installing from a local file never pays for the HTTP stack
        import requests

        super().__init__()
        self._requests = requests
        self.url = url
        self.offset = start  # a stream may start mid-resource: a mirror taking over
        self.total: int | None = None
        self.resumes = 0
        self._session = session or requests.Session()
        self._retries = retries
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._timeout_s = timeout_s
        self._sleep = sleep
        self._rng = rng
        self._deadline = deadline  # on ``clock``: past it, no more reading or retrying
        self._clock = clock
        # an https:// URL's certificate: a CA file ([server] ca_file), or None for the
        # session's setting (the system's CA store unless the session says otherwise)
        self._verify = verify
        # every byte read passes the install's rate limit ([bandwidth] rate_limit), one bucket
        # shared by the streams of an install (a mirror taking over continues it)
        self._rate = rate
        self._etag: str | None = None
        self._response: requests.Response | None = None
        self._guard: DeadlineGuard | None = None
        self._body: Iterator[bytes] | None = None
        self._pending = b""

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        headers = {"Accept-Encoding": "identity"}
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
            if self._etag:
                headers["If-Range"] = self._etag
        response = self._session.get(
            self.url, headers=headers, stream=True, timeout=self._timeout_s, verify=self._verify
        )
        if self.offset and response.status_code == 200:
            response.close()
            etag = response.headers.get("ETag")
            if self._etag and etag != self._etag:  # If-Range answered by another resource
                raise DownloadError(
                    f"{self.url}: changed on the server during the download "
                    f"(ETag {self._etag}, now {etag or 'none'})"
                )
            raise DownloadError(
                f"{self.url}: the server ignores Range requests, so the download cannot resume "
                f"at byte {self.offset}"
            )
        if response.status_code not in (200, 206):
            response.close()
            raise _Retryable(f"HTTP {response.status_code}", permanent=response.status_code < 500
                             and response.status_code not in (408, 429))  # fmt: skip
        if response.status_code == 206:
            content_range = response.headers.get("Content-Range", "").removeprefix("bytes ")
            start = content_range.partition("-")[0]
            total = content_range.rpartition("/")[2]
            if start != str(self.offset):
                response.close()
                raise DownloadError(f"{self.url}: server resumed at {start!r}, not {self.offset}")
            if self.total is None and total.isdigit():
                self.total = int(total)
        else:
            length = response.headers.get("Content-Length")
            self.total = int(length) if length and length.isdigit() else None
            self._etag = response.headers.get("ETag")
        self._response = response
        self._guard = DeadlineGuard(response, self._deadline, self._clock)
        self._body = response.iter_content(RECEIVE_CHUNK)

    def _close_response(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None
        if self._response is not None:
            self._response.close()
        self._response = None
        self._body = None

    def read(self, size: int = -1) -> bytes:
        want = CHUNK if size is None or size < 0 else size
        failures = 0
        while not self._pending:
            if self._deadline is not None and self._clock() > self._deadline:
                self._close_response()
                raise DownloadError(f"{self.url}: deadline passed at byte {self.offset}")
            try:
                if self._body is None:
                    if self.total is not None and self.offset >= self.total:
                        return b""
                    self._open()
                chunk = next(self._body or iter(()), b"")
                if not chunk:
                    self._close_response()
                    if self.total is None or self.offset >= self.total:
                        return b""
                    raise _Retryable(f"connection ended at byte {self.offset} of {self.total}")
                self._pending = chunk
            except (self._requests.RequestException, _Retryable) as err:
                self._close_response()
                if self._deadline is not None and self._clock() > self._deadline:
                    raise DownloadError(
                        f"{self.url}: deadline passed at byte {self.offset}"
                    ) from err
                if isinstance(err, _Retryable) and err.permanent:
                    raise DownloadError(f"{self.url}: {err}") from err
                if failures >= self._retries:
                    raise DownloadError(
                        f"{self.url}: gave up after {failures + 1} attempts at byte "
                        f"{self.offset}: {err}"
                    ) from err
                self._sleep(
                    backoff_delay(failures, self._backoff_s, self._max_backoff_s, self._rng)
                )
                failures += 1
                if self.offset:
                    self.resumes += 1
        data, self._pending = self._pending[:want], self._pending[want:]
        self.offset += len(data)
        if self._rate is not None:
            self._rate.take(len(data))
        return data

    def close(self) -> None:
        self._close_response()
        super().close()


class _Retryable(Exception):
    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class MirroredStream(io.RawIOBase):
    """One resource available at several URLs (the server, then mirrors): read from the first;
    when it gives up, continue from the same offset at the next. Only for content-addressed
    blobs, whose bytes are the same everywhere and verified by hash as they are read."""

    def __init__(self, urls: Sequence[str], *, log: Any = None, **http_options: Any) -> None:
        super().__init__()
        if not urls:
            raise DownloadError("no URL to fetch from")
        self._urls = list(urls)
        self._log = log
        self._options = http_options
        self._index = 0
        self._stream = HttpStream(self._urls[0], **http_options)

    def readable(self) -> bool:
        return True

    @property
    def offset(self) -> int:
        return self._stream.offset

    def read(self, size: int = -1) -> bytes:
        while True:
            try:
                return self._stream.read(size)
            except DownloadError as err:
                if self._index + 1 >= len(self._urls):
                    raise
                offset = self._stream.offset
                self._stream.close()
                self._index += 1
                if self._log is not None:
                    self._log.event(
                        "download.mirror", level="warning", failed=str(err),
                        next=self._urls[self._index], offset=offset,
                    )  # fmt: skip
                self._stream = HttpStream(self._urls[self._index], start=offset, **self._options)

    def close(self) -> None:
        self._stream.close()
        super().close()


_OTHER_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a device",
    stat.S_IFBLK: "a device",
    stat.S_IFSOCK: "a socket",
}


@contextmanager
def open_source(source: str, **http_options: object) -> Iterator[BinaryIO]:
    """Open a bundle source: ``http://`` / ``https://`` URL or a local path.

    Raises:
        DownloadError: a local file that cannot be opened (URLs fail on first read).
    """
    if source.startswith(("http://", "https://")):
        stream = HttpStream(source, **http_options)  # type: ignore[arg-type]
        try:
            yield stream  # type: ignore[misc]
        finally:
            stream.close()
        return
    if not source:
        raise DownloadError("no bundle given: a path or an http(s) URL")
    scheme = _OTHER_URL.match(source)
    if scheme is not None:
        raise DownloadError(
            f"{source}: {scheme.group(1)} URLs are not a source (a path, or an http(s) URL)"
        )
    try:
        # O_NONBLOCK: a FIFO with no writer must not hang the install (holding the update
        # lock); a regular file reads the same either way
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise DownloadError(f"{source}: cannot open: {err.strerror}") from err
    kind = stat.S_IFMT(os.fstat(fd).st_mode)
    if kind != stat.S_IFREG:
        os.close(fd)
        what = _FILE_KINDS.get(kind, "no regular file")
        raise DownloadError(f"{source}: is {what}, not a bundle file")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as handle:
        yield handle
