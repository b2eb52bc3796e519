"""A TCP relay that misbehaves on purpose: latency, a slow link, lost connections and resets.

:class:`FaultProxy` is :class:`chaos.net_meter.NetMeter` (so it counts every byte as the meter
does, and relays at most ``max_connections`` connections at once) with faults applied as the
bytes pass, set by a :class:`Faults` that may be changed while connections run
(:meth:`FaultProxy.set`):

- ``latency_s``: every piece of data read from one side waits this long before it is passed
  to the other, in both directions (a request and its answer take two of it). The relay reads
  up to 64 KiB at a time, so a latency also caps a connection at 64 KiB per ``latency_s``
  each way;
- ``rate_bps``: the link carries at most this many bytes per second in each direction, shared
  by every connection (a download of N bytes takes at least N / rate);
- ``loss``: each new connection is lost with this probability, drawn from a generator seeded
  with ``seed`` in the order connections arrive, so a run is repeatable. ``loss_mode`` says
  how: ``stall`` accepts the connection and never answers (the client waits for its timeout;
  the proxy resets it after ``stall_s``), ``drop`` resets it at once;
- ``reset_after``: a connection that has carried this many bytes towards the client is reset
  (closed with ``SO_LINGER`` 0, so the client reads a TCP reset, not an orderly end): the bytes
  before the cut arrive, nothing after.

:meth:`FaultProxy.counters` says what was done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Literal

from chaos.net_meter import MAX_CONNECTIONS, NetMeter

PACE_CHUNK_S = 0.05  # a slow link passes data in pieces of at most this many seconds' worth


@dataclass(frozen=True)
class Faults:
    """What the proxy does to connections (see the module docstring); the default: nothing."""

    latency_s: float = 0.0
    rate_bps: float | None = None
    loss: float = 0.0
    loss_mode: Literal["stall", "drop"] = "stall"
    stall_s: float = 60.0
    reset_after: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.latency_s <= 60.0:
            raise ValueError(f"latency_s: 0 to 60 seconds, not {self.latency_s}")
        if self.rate_bps is not None and not self.rate_bps > 0:
            raise ValueError(f"rate_bps: above 0 bytes per second, not {self.rate_bps}")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss: a probability from 0 to 1, not {self.loss}")
        if self.loss_mode not in ("stall", "drop"):
            raise ValueError(f"loss_mode: stall or drop, not {self.loss_mode!r}")
        if not self.stall_s > 0:
            raise ValueError(f"stall_s: above 0 seconds, not {self.stall_s}")
        if self.reset_after is not None and self.reset_after < 0:
            raise ValueError(f"reset_after: 0 bytes or more, not {self.reset_after}")


@dataclass(frozen=True)
class FaultCounters:
    """What the proxy did, since it started."""

    connections: int = 0  # accepted
    stalled: int = 0  # lost by stalling
    dropped: int = 0  # lost by a reset at once
    resets: int = 0  # reset after ``reset_after`` bytes
    delayed: int = 0  # pieces of data held back by ``latency_s``
    paced_bytes: int = 0  # bytes passed through the slow link


class _Pacer:
    """A link of ``rate`` bytes per second, shared by its users: :meth:`take` returns when
    the bytes asked for have had their time on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free_at = 0.0

    def take(self, size: int, rate: float) -> None:
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + size / rate
            until = self._free_at
        delay = until - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class FaultProxy(NetMeter):
    """See the module docstring. ``upstream``: ``http://host:port`` (any TCP server there)."""

    def __init__(
        self,
        upstream: str,
        faults: Faults | None = None,
        *,
        seed: int = 0,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._faults = faults or Faults()
        self._random = random.Random(seed)  # noqa: S311 (a lab's repeatable dice)
        self._counters = FaultCounters()
        self._sent_down: dict[int, int] = {}  # connection -> bytes passed towards the client
        self._pacers = {"up": _Pacer(), "down": _Pacer()}
        self._stalled: dict[int, socket.socket] = {}
        self._fault_lock = threading.Lock()
        super().__init__(upstream, max_connections=max_connections)

    @property
    def faults(self) -> Faults:
        return self._faults

    def set(self, faults: Faults | None = None, **changes: object) -> Faults:
        """Apply ``faults`` (or change some fields of the current ones) from now on, to open
        connections too; return what is in force.

        Raises:
            ValueError: a field out of range, or not a field of :class:`Faults`.
        """
        with self._fault_lock:
            base = faults or self._faults
            try:
                self._faults = dataclasses.replace(base, **changes)  # type: ignore[arg-type]
            except TypeError as err:
                raise ValueError(f"unknown fault setting: {err}") from err
            return self._faults

    def counters(self) -> FaultCounters:
        with self._fault_lock:
            return self._counters

    def close(self) -> None:
        """Stop listening, reset the stalled connections and close every other."""
        self._reset_stalled()  # first: close() waits for the connections' threads
        super().close()
        self._reset_stalled()  # any stalled while closing

    def _reset_stalled(self) -> None:
        with self._fault_lock:
            stalled = list(self._stalled.values())
        for client in stalled:
            _reset(client)

    def _count(self, **more: int) -> None:
        with self._fault_lock:
            now = dataclasses.asdict(self._counters)
            self._counters = FaultCounters(**{k: v + more.get(k, 0) for k, v in now.items()})

    # --- the hooks of NetMeter -------------------------------------------------------------

    def _admit(self, number: int, client: socket.socket) -> bool:
        with self._fault_lock:
            faults = self._faults
            lost = faults.loss > 0 and self._random.random() < faults.loss
        self._count(connections=1)
        if not lost:
            return True
        if faults.loss_mode == "drop":
            self._count(dropped=1)
            _reset(client)
            self._release(number)
            return False
        self._count(stalled=1)
        with self._fault_lock:
            self._stalled[number] = client
        self._start(self._stall, (number, client, faults.stall_s), number)
        return False

    def _stall(self, number: int, client: socket.socket, stall_s: float) -> None:
        """Read and forget what the client sends, answer nothing; reset the connection after
        ``stall_s`` (or when the client gives up)."""
        deadline = time.monotonic() + stall_s
        try:
            while (left := deadline - time.monotonic()) > 0:
                client.settimeout(left)
                if not client.recv(1 << 16):
                    break  # the client gave up
        except (TimeoutError, OSError):
            pass
        with self._fault_lock:
            self._stalled.pop(number, None)
        _reset(client)
        self._release(number)

    def _forward(self, number: int, way: str, data: bytes, target: socket.socket) -> None:
        faults = self._faults
        if faults.latency_s > 0:
            self._count(delayed=1)
            time.sleep(faults.latency_s)
            faults = self._faults  # it may have changed meanwhile
        reset = False
        if way == "down" and faults.reset_after is not None:
            with self._fault_lock:
                sent = self._sent_down.get(number, 0)
                allowed = max(0, faults.reset_after - sent)
                if allowed < len(data):
                    data, reset = data[:allowed], True
                self._sent_down[number] = sent + len(data)
        if faults.rate_bps is None:
            target.sendall(data)
        else:
            step = max(1, int(faults.rate_bps * PACE_CHUNK_S))
            for start in range(0, len(data), step):
                piece = data[start : start + step]
                self._pacers[way].take(len(piece), faults.rate_bps)
                self._count(paced_bytes=len(piece))  # before it is sent: a reader may look
                target.sendall(piece)
        if reset:
            self._count(resets=1)
            with self._lock:  # taken first, so the other direction's end sends no orderly close
                pair = self._open.pop(number, None)
            _reset(target)
            if pair is not None:
                _reset(pair[1])
            raise ConnectionResetError(f"connection {number} reset after {faults.reset_after} B")


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` so that its peer reads a TCP reset (``SO_LINGER`` on, 0 seconds). The
    reading side is shut first, which wakes a thread blocked reading it without sending an
    orderly end to the peer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    sock.close()
