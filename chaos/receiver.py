"""The chaos lab's alert receiver: Alertmanager's webhook, on loopback, recording everything.

Alertmanager posts a JSON document per notification (webhook format version 4: a group of
alerts, each with a status, labels, annotations). :class:`AlertReceiver` records one
:class:`Notification` per alert in it, with the moment it arrived, and lets a scenario wait
for the first one that matches.

It also plays the external dead man's switch the committed Alertmanager configuration sends
``Watchdog`` to: :meth:`AlertReceiver.watch_deadman` checks, a few times per repeat interval,
when a ``Watchdog`` last arrived. Silence for longer than ``grace_s`` records an incident, a
notification named :data:`DEADMAN` with status ``firing``; the next ``Watchdog`` records it
``resolved``. A monitoring stack that is down cannot say so itself: only this silence shows it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# The incident the dead man's switch records when Watchdog stops arriving.
DEADMAN = "DeadMansSwitch"
WATCHDOG = "Watchdog"
MAX_BODY = 4 << 20  # Alertmanager's notifications are small; anything larger is refused


@dataclass(frozen=True)
class Notification:
    """One alert of one notification, as it arrived."""

    alertname: str
    status: str  # firing or resolved
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    received_at: float  # time.time() on arrival
    receiver: str = ""  # Alertmanager's receiver name (the webhook's path)

    def as_dict(self) -> dict[str, Any]:
        return {
            "alertname": self.alertname, "status": self.status, "labels": dict(self.labels),
            "annotations": dict(self.annotations), "received_at": self.received_at,
            "receiver": self.receiver,
        }  # fmt: skip


def parse_webhook(body: bytes, received_at: float, receiver: str = "") -> list[Notification]:
    """The alerts of one Alertmanager webhook document.

    Raises:
        ValueError: the body is not a webhook document (not JSON, no list of alerts, an alert
            without a status or an alertname label).
    """
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"the notification is not JSON: {err}") from None
    alerts = document.get("alerts") if isinstance(document, dict) else None
    if not isinstance(alerts, list):
        raise ValueError("the notification has no list of alerts")
    found = []
    for alert in alerts:
        labels = alert.get("labels") if isinstance(alert, dict) else None
        status = alert.get("status") if isinstance(alert, dict) else None
        if not isinstance(labels, dict) or "alertname" not in labels or status not in (
            "firing", "resolved",
        ):  # fmt: skip
            raise ValueError(f"an alert without labels, alertname or status: {alert!r:.200}")
        annotations = alert.get("annotations") or {}
        found.append(
            Notification(
                str(labels["alertname"]),
                status,
                {str(k): str(v) for k, v in labels.items()},
                {str(k): str(v) for k, v in annotations.items()},
                received_at,
                receiver,
            )
        )
    return found


@dataclass
class _Deadman:
    grace_s: float
    last_watchdog: float | None = None
    open_since: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)


class AlertReceiver:
    """See the module docstring. Serves on ``127.0.0.1`` (``port`` 0: one the kernel picks)
    until :meth:`close`; usable as a context manager."""

    def __init__(self, port: int = 0, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Condition()
        self._notifications: list[Notification] = []
        self._deadman: _Deadman | None = None
        self._deadman_thread: threading.Thread | None = None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self.send_error(413, "notification too large")
                    return
                body = self.rfile.read(length)
                try:
                    found = parse_webhook(body, receiver._clock(), self.path.strip("/"))
                except ValueError as err:
                    self.send_error(400, str(err))
                    return
                receiver._record(found)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return  # quiet: every notification is recorded, not logged

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="alert-receiver", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> AlertReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and stop the dead man's switch."""
        if self._deadman is not None:
            self._deadman.stop.set()
        if self._deadman_thread is not None:
            self._deadman_thread.join(10)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def _record(self, found: list[Notification]) -> None:
        with self._lock:
            self._notifications.extend(found)
            deadman = self._deadman
            for notification in found:
                if deadman is None or notification.alertname != WATCHDOG:
                    continue
                if notification.status == "firing":
                    deadman.last_watchdog = notification.received_at
                    if deadman.open_since is not None:
                        deadman.open_since = None
                        self._notifications.append(self._incident("resolved"))
            self._lock.notify_all()

    def _incident(self, status: str) -> Notification:
        return Notification(
            DEADMAN, status, {"alertname": DEADMAN, "watches": WATCHDOG},
            {"summary": f"no {WATCHDOG} notification for longer than the grace period",
             "runbook_url": "docs/runbooks/Watchdog.md"},
            self._clock(), "deadmans-switch",
        )  # fmt: skip

    def watch_deadman(self, grace_s: float, *, check_every_s: float | None = None) -> None:
        """Act as the dead man's switch from now on: see the module docstring. The silence is
        counted from the last Watchdog, or from now before the first."""
        if self._deadman is not None:
            raise RuntimeError("the dead man's switch is already watching")
        deadman = _Deadman(grace_s)
        with self._lock:
            self._deadman = deadman
            deadman.last_watchdog = max(
                (n.received_at for n in self._notifications if n.alertname == WATCHDOG),
                default=self._clock(),
            )
        interval = check_every_s if check_every_s is not None else max(0.05, grace_s / 10)

        def watch() -> None:
            while not deadman.stop.wait(interval):
                with self._lock:
                    last = deadman.last_watchdog or self._clock()
                    silent = self._clock() - last > deadman.grace_s
                    if silent and deadman.open_since is None:
                        deadman.open_since = self._clock()
                        self._notifications.append(self._incident("firing"))
                        self._lock.notify_all()

        self._deadman_thread = threading.Thread(target=watch, name="deadman", daemon=True)
        self._deadman_thread.start()

    def notifications(self) -> list[Notification]:
        """Everything received so far, in order of arrival."""
        with self._lock:
            return list(self._notifications)

    def wait_for(
        self,
        alertname: str,
        status: str,
        *,
        after: float,
        timeout_s: float,
        labels: Callable[[Mapping[str, str]], bool] = lambda _labels: True,
    ) -> Notification | None:
        """The first notification of ``alertname`` with ``status`` received after ``after``
        (a time.time() moment) whose labels pass ``labels``; None when none arrived within
        ``timeout_s`` real seconds."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                for notification in self._notifications:
                    if (
                        notification.alertname == alertname
                        and notification.status == status
                        and notification.received_at >= after
                        and labels(notification.labels)
                    ):
                        return notification
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._lock.wait(min(left, 0.5))
