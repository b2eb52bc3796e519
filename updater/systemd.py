"""systemd's notification protocol (``sd_notify``) for the daemon.

``READY=1`` once started, ``WATCHDOG=1`` and a ``STATUS=`` line after every step, as datagrams on
the ``NOTIFY_SOCKET`` socket; during an install and the health checks a helper thread keeps the
watchdog fed until the install's own deadline has passed, so a stuck update is killed by the
watchdog.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping


class SystemdNotifier:
    """The ``sd_notify`` protocol: datagrams of ``NAME=value`` lines to ``NOTIFY_SOCKET``
    (a path, or ``@name`` for the abstract namespace). Without a socket every call does
    nothing; a send that fails is ignored (the watchdog then tells)."""

    def __init__(self, socket_path: str | None, watchdog_usec: int | None = None) -> None:
        self.socket_path = socket_path or None
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self.sent: list[str] = []  # the messages sent, newest last (bounded; for status)
        self._lock = threading.Lock()

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] = os.environ, pid: int | None = None
    ) -> SystemdNotifier:
        usec: int | None = None
        watchdog_pid = environ.get("WATCHDOG_PID")
        if watchdog_pid is None or watchdog_pid == str(pid if pid is not None else os.getpid()):
            with contextlib.suppress(ValueError):
                usec = int(environ.get("WATCHDOG_USEC", ""))
        return cls(environ.get("NOTIFY_SOCKET"), usec)

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half the service's ``WatchdogSec``."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, *lines: str) -> bool:
        if self.socket_path is None:
            return False
        address = self.socket_path
        if address.startswith("@"):
            address = "\0" + address[1:]
        message = "\n".join(lines)
        with self._lock:
            self.sent = [*self.sent[-15:], message]
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                    sock.sendto(message.encode("utf-8", "replace"), address)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def watchdog(self, status: str | None = None) -> bool:
        return self.notify("WATCHDOG=1", *([f"STATUS={status}"] if status else []))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    @contextlib.contextmanager
    def keep_alive(self, limit_s: float) -> Iterator[None]:
        """Feed the watchdog from a helper thread while the block runs, for at most
        ``limit_s`` seconds: a block stuck past that is left to the watchdog."""
        interval = self.watchdog_interval_s
        if interval is None or self.socket_path is None:
            yield
            return
        done = threading.Event()
        until = time.monotonic() + limit_s

        def feed() -> None:
            while not done.wait(interval) and time.monotonic() < until:
                self.watchdog()

        thread = threading.Thread(target=feed, name="watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
