"""The server's Prometheus metrics, in a registry of its own (never the global one).

Two kinds:

- request counts and latencies, device events and uploads: counted by this process (sum them
  over the processes with PromQL);
- the fleet's state (devices by state and version, seconds since each device was last seen,
  releases): read from the database at each scrape, so every process reports the same truth.

Routes are labelled by their template (``/api/v1/devices/{device_id}/checkin``), never by the
path a client sent, so a client cannot create series.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.database import Database
from server.devices import NEVER_REPORTED
from server.models import Device, Release
from server.settings import Clock

UNMATCHED_ROUTE = "unmatched"
# Any other method a client invents is counted as "OTHER", for the same reason as routes.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ServerMetrics:
    """Every series the server exports, registered in :attr:`registry`."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fleet_server_requests_total",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fleet_server_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template",
            ["method", "route"],
            registry=self.registry,
        )
        self.events = Counter(
            "fleet_server_device_events_total",
            "Device events stored (resends not counted), by the subject of the event name",
            ["event"],
            registry=self.registry,
        )
        self.uploads = Counter(
            "fleet_server_release_uploads_total",
            "Bundle uploads, by outcome (accepted, or the error code)",
            ["outcome"],
            registry=self.registry,
        )
        self.registry.register(FleetCollector(db, clock))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class FleetCollector(Collector):
    """Fleet-wide gauges computed from the database at scrape time."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        # Describing without querying keeps registration free of database access.
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("fleet_server_database_up", "Whether the database answered"),
            GaugeMetricFamily(
                "fleet_devices",
                "Enrolled devices, by state and version from their last heartbeat",
                labels=["state", "version"],
            ),
            GaugeMetricFamily(
                "fleet_devices_assigned",
                "Devices assigned each release version",
                labels=["version"],
            ),
            GaugeMetricFamily(
                "fleet_device_last_seen_age_seconds",
                "Seconds since the server last heard from each device (server clock)",
                labels=["device", "hostname"],
            ),
            GaugeMetricFamily("fleet_releases", "Releases the server holds"),
        ]

    def collect(self) -> Iterable[Metric]:
        up, by_state, assigned, age, releases = self._families()
        try:
            self._fill(by_state, assigned, age, releases)
        except SQLAlchemyError:
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, by_state, assigned, age, releases]

    def _fill(
        self,
        by_state: GaugeMetricFamily,
        assigned: GaugeMetricFamily,
        age: GaugeMetricFamily,
        releases: GaugeMetricFamily,
    ) -> None:
        now = self._clock()
        with self._db.read() as session:
            for state, version, count in session.execute(
                select(Device.state, Device.version, func.count()).group_by(
                    Device.state, Device.version
                )
            ):
                by_state.add_metric([state or NEVER_REPORTED, version or ""], count)
            for version, count in session.execute(
                select(Release.version, func.count())
                .join(Device, Device.assigned_release_id == Release.id)
                .group_by(Release.version)
            ):
                assigned.add_metric([version], count)
            for device_id, hostname, last_seen in session.execute(
                select(Device.id, Device.hostname, Device.last_seen)
            ):
                age.add_metric([device_id, hostname], max(0.0, now - last_seen.timestamp()))
            releases.add_metric([], session.scalar(select(func.count()).select_from(Release)) or 0)


class RequestMetricsMiddleware:
    """ASGI middleware that counts and times every HTTP request by route template."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

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
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            method = scope.get("method", "")
            method = method if method in METHODS else "OTHER"
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - started)
