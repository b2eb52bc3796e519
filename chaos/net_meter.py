"""A counting TCP relay on loopback: what a device's metered link would carry, in bytes.

:class:`NetMeter` listens on a loopback port the kernel picks and relays every connection to
one upstream HTTP server, byte for byte, counting the bytes in each direction: request lines,
headers and bodies, status lines and chunked framing included (what a SIM pays for, less the
TCP/IP headers beneath, which are not seen here). Devices are pointed at :attr:`NetMeter.url`
instead of the server's.

Each connection takes the meter's :attr:`~NetMeter.label` as it is accepted (the lab sets it to
the device that is about to run), so a lab that runs one device at a time knows whose every
byte is. The bytes a client sends are split into its requests (HTTP/1.1 without pipelining,
as ``requests`` speaks it: a head, then ``Content-Length`` bytes of body); the bytes the server
sends are counted to the request last sent on that connection. A request body sent chunked
cannot be split so: everything after its head counts to it.

:meth:`NetMeter.hang_up` closes connections, as a server's keep-alive timeout does between a
device's polls, so a lab whose clock runs faster than real time still opens a connection where
a real device would.

At most ``max_connections`` connections are relayed at once (two threads each); more wait in
the listening socket's queue until one ends. :class:`chaos.fault_proxy.FaultProxy` is this
relay with faults: it decides what becomes of each connection as it is accepted
(:meth:`NetMeter._admit`) and of each piece of data before it is passed on
(:meth:`NetMeter._forward`).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import urlsplit

RECEIVE = 64 << 10
MAX_HEAD = 64 << 10  # a request head longer than this is counted whole to one unparsed request
MAX_CONNECTIONS = 256  # relayed at once
SLOT_POLL_S = 0.2  # how soon an acceptor waiting for a free slot notices the relay closed


@dataclass
class Exchange:
    """One HTTP request and its response on a metered connection."""

    label: str
    connection: int  # the connection's number, from 0, in the order accepted
    method: str
    target: str
    up: int = 0  # request bytes: line, headers, body
    down: int = 0  # response bytes: status line, headers, body
    status: int | None = None
    up_head: int = 0  # of ``up``: the request line and headers
    down_head: int = 0  # of ``down``: the status line and headers (as far as the first read)


@dataclass
class Connection:
    """One relayed TCP connection and its totals."""

    number: int
    label: str
    up: int = 0
    down: int = 0
    exchanges: list[Exchange] = field(default_factory=list)
    closed: bool = False  # both directions ended, or hung up
    # the request being sent: its head so far, then the body bytes still to come
    _head: bytearray = field(default_factory=bytearray, repr=False)
    _body_left: int = 0
    _unframed: bool = False  # a chunked request body: no later request can be told apart

    def sent(self, data: bytes) -> None:
        """Count ``data``, sent by the client."""
        self.up += len(data)
        view = memoryview(data)
        while view:
            current = self.exchanges[-1] if self.exchanges else None
            if current is not None and (self._unframed or self._body_left):
                taken = len(view) if self._unframed else min(self._body_left, len(view))
                current.up += taken
                if not self._unframed:
                    self._body_left -= taken
                view = view[taken:]
                continue
            self._head += view
            view = view[len(view) :]
            end = self._head.find(b"\r\n\r\n")
            if end < 0 and len(self._head) < MAX_HEAD:
                return
            head_length = end + 4 if end >= 0 else len(self._head)
            head, rest = bytes(self._head[:head_length]), bytes(self._head[head_length:])
            self._head.clear()
            self._start(head, complete=end >= 0)
            view = memoryview(rest)

    def _start(self, head: bytes, *, complete: bool) -> None:
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        target = rest.rpartition(" ")[0] or rest
        exchange = Exchange(
            self.label, self.number, method, target, up=len(head), up_head=len(head)
        )
        self.exchanges.append(exchange)
        self._body_left = 0
        if not complete:
            self._unframed = True
            return
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length" and value.strip().isdigit():
                self._body_left = int(value.strip())
            elif name == "transfer-encoding" and "chunked" in value.lower():
                self._unframed = True

    def received(self, data: bytes) -> None:
        """Count ``data``, sent by the server: to the request last sent."""
        self.down += len(data)
        if not self.exchanges:
            return  # the server spoke first: counted to the connection only
        current = self.exchanges[-1]
        if current.down == 0 and data.startswith(b"HTTP/"):
            code = data[9:12]
            current.status = int(code) if code.isdigit() else None
            end = data.find(b"\r\n\r\n")
            current.down_head = end + 4 if end >= 0 else len(data)
        current.down += len(data)


class NetMeter:
    """See the module docstring. ``upstream``: the server's base URL (``http://host:port``)."""

    def __init__(self, upstream: str, *, max_connections: int = MAX_CONNECTIONS) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ValueError(f"upstream: give http://HOST:PORT, not {upstream!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections: at least 1, not {max_connections}")
        self._slots = threading.BoundedSemaphore(max_connections)
        self._running: dict[int, int] = {}  # connection number -> its threads still running
        self.upstream = (parts.hostname, parts.port)
        self.label = ""
        self._lock = threading.Lock()
        self._connections: list[Connection] = []
        self._open: dict[int, tuple[socket.socket, socket.socket]] = {}
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="net-meter", daemon=True)
        self._acceptor.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what was counted -----------------------------------------------------------------

    def connections(self) -> list[Connection]:
        with self._lock:
            return list(self._connections)

    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return [e for c in self._connections for e in c.exchanges]

    def totals(self, labels: Iterable[str] | None = None) -> tuple[int, int]:
        """Bytes (up, down) over every connection, or those of ``labels``."""
        wanted = None if labels is None else set(labels)
        with self._lock:
            chosen = [c for c in self._connections if wanted is None or c.label in wanted]
            return sum(c.up for c in chosen), sum(c.down for c in chosen)

    # --- connections ----------------------------------------------------------------------

    def hang_up(self, label: str | None = None) -> int:
        """Close the open connections (of ``label``, or all), as an idle server does; the
        clients open new ones. Returns how many were closed. Call it only while no request
        is in flight on them."""
        with self._lock:
            chosen = [n for n, c in enumerate(self._connections)
                      if n in self._open and (label is None or c.label == label)]  # fmt: skip
            pairs = [self._open.pop(n) for n in chosen]
            for n in chosen:
                self._connections[n].closed = True
        for pair in pairs:
            _shut(*pair)
        return len(pairs)

    def close(self) -> None:
        """Stop listening and close every connection."""
        self._closed = True
        with contextlib.suppress(OSError):  # wakes the acceptor (closing alone does not)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.hang_up()
        self._acceptor.join(5)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self._closed:
            if not self._slots.acquire(timeout=SLOT_POLL_S):
                continue  # every slot is taken: the next connection waits in the queue
            try:
                client, _ = self._listener.accept()
            except OSError:
                self._slots.release()
                return  # closed
            with self._lock:
                number = len(self._connections)
                connection = Connection(number, self.label)
                self._connections.append(connection)
                self._running[number] = 1
            try:
                admitted = self._admit(number, client)
            except BaseException:
                client.close()
                self._release(number)
                raise
            if admitted:
                self._connect(connection, client)

    def _connect(self, connection: Connection, client: socket.socket) -> None:
        number = connection.number
        try:
            server = socket.create_connection(self.upstream, timeout=10)
            server.settimeout(None)
        except OSError:
            client.close()  # the client sees the refusal as a dropped connection
            self._release(number)
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._open[number] = (client, server)
            self._running[number] = 2
        ways = (
            (client, server, connection.sent, "up"),
            (server, client, connection.received, "down"),
        )
        for source, target, count, way in ways:
            self._start(self._pump, (number, source, target, count, way), number)

    def _start(self, work: Callable[..., None], args: tuple[object, ...], number: int) -> None:
        """Run ``work(*args)`` in a thread of connection ``number``."""
        thread = threading.Thread(target=work, args=args, daemon=True, name=f"net-meter-{number}")
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _admit(self, number: int, client: socket.socket) -> bool:
        """Whether to relay connection ``number``. When not, the connection is this method's
        to end: it closes ``client`` (now or from a thread of :meth:`_start`) and then calls
        :meth:`_release` once."""
        return True

    def _forward(self, number: int, way: str, data: bytes, target: socket.socket) -> None:
        """Pass ``data`` on to ``target``; ``way`` is ``up`` (client to server) or ``down``.
        An ``OSError`` ends the connection."""
        target.sendall(data)

    def _release(self, number: int) -> None:
        """One of connection ``number``'s threads ended: its slot is free once all have."""
        with self._lock:
            left = self._running.get(number, 1) - 1
            if left > 0:
                self._running[number] = left
                return
            self._running.pop(number, None)
            self._connections[number].closed = True
        self._slots.release()

    def _pump(
        self,
        number: int,
        source: socket.socket,
        target: socket.socket,
        count: Callable[[bytes], None],
        way: str,
    ) -> None:
        try:
            while data := source.recv(RECEIVE):
                with self._lock:
                    count(data)
                self._forward(number, way, data, target)
        except OSError:
            pass  # hung up, or the peer went away
        with self._lock:
            pair = self._open.pop(number, None)
            self._connections[number].closed = True
        if pair is not None:
            _shut(*pair)
        self._release(number)


def _shut(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
