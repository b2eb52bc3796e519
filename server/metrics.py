"""The server's Prometheus metrics, in a registry of its own (never the global one).

Two kinds:

- request counts and latencies, device events and uploads: counted by this process (sum them
  over the processes with PromQL);
- the fleet's state (devices by state and version, each device's last heartbeat, rollouts, the
  emergency stop): read from the database at each scrape, so every process reports the same
  truth (aggregate them over the processes with ``max``, never ``sum``).

Fleet series (database, at each scrape):

=====================================================================  ==========================
``fleet_server_database_up``                                           whether the database
                                                                       answered the scrape
``fleet_devices{state,version}``                                       enrolled devices
``fleet_devices_assigned{version}``                                    devices assigned a release
``fleet_devices_unhealthy``                                            in safe mode, or failed in
                                                                       an active rollout (the
                                                                       fleet guard's count)
``fleet_releases``                                                     releases held
``fleet_emergency_stop``                                               1 while it is on
``fleet_rollouts{state}``                                              rollouts in each state
``fleet_rollout_state{rollout,version,state}``                         1 per unfinished rollout
``fleet_rollout_stage{rollout,version,stage}``                         its stage (0 = first)
``fleet_rollout_stages{rollout,version}``                              stages in its plan
``fleet_rollout_devices{rollout,version,stage,outcome}``               its devices, by outcome
``fleet_device_update_pending_seconds{device,hostname,rollout,...}``   since a rollout assigned
                                                                       the device a release it
                                                                       has not committed yet
``fleet_device_last_seen_age_seconds{device,hostname}``                since the last contact
``fleet_device_info{device,hostname,role,compatible,version,state}``   1 per device
``fleet_device_slot_info{device,hostname,slot,status,version}``        1 per reported slot
``fleet_device_temperature_celsius{device,hostname}``                  last heartbeat's reading
``fleet_device_throttled{device,hostname}``                            last heartbeat's Raspberry
                                                                       Pi get_throttled bits
``fleet_device_under_voltage{device,hostname}``                        1: its bit 0 (under-voltage
                                                                       now) was set, else 0
``fleet_device_free_space_bytes{device,hostname}``                     last heartbeat's reading
``fleet_device_uptime_seconds{device,hostname}``                       last heartbeat's reading
``fleet_device_clock_skew_seconds{device,hostname}``                   server clock minus device
``fleet_device_outcome_events_total{device,hostname,event}``           outcome events stored
                                                                       for the device (0 when
                                                                       none), a counter
=====================================================================  ==========================

A per-device series is absent when the device never reported that value. The per-device
series come from the heartbeat every device sends, so alerts on them cover devices that no
Prometheus can scrape (behind NAT, on cellular links).

``fleet_device_outcome_events_total`` is the exception: one series per device and event of
:data:`OUTCOME_EVENTS`, 0 until the first such event is stored. Counted from the audit trail,
it never resets when a server process restarts, and it is there, at 0, before a device's first
fallback, so ``increase()`` sees every event; a Prometheus that restarts (or starts afresh)
finds no increase in a value it had not seen before, so an alert on it does not fire falsely.

Counted by this process: ``fleet_server_requests_total``, ``fleet_server_request_duration_
seconds``, ``fleet_server_device_events_total{event}`` (by subject), ``fleet_server_release_
uploads_total{outcome}`` and ``fleet_server_device_outcomes_total{device,event}``: the events
that end an update or mark a device in trouble (:data:`OUTCOME_EVENTS`), by device.

Who sees what. The fleet-wide series (counts by state, version, rollout, route) are open to
any scraper: they name no device. A series with a label naming one device (:data:`DEVICE_LABELS`:
the ``fleet_device_*`` series and ``fleet_server_device_outcomes_total``) lists the fleet's
device ids and hostnames, so it is served only to a scrape bearing the server's scrape token
(``fleet server run --metrics-token-file``; Prometheus's ``authorization: credentials_file``).
A scrape with no ``Authorization`` gets the fleet-wide series; one with any other token is
refused (401), so a Prometheus given the wrong token shows its target down rather than
silently losing every per-device alert. Without a token configured, no one sees them.

Routes are labelled by their template (``/api/v1/devices/{device_id}/checkin``), never by the
path a client sent, so a client cannot create series.
"""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Scope

from server.asgi import RequestObserver, route_template
from server.auth import bearer_token
from server.database import Database
from server.devices import NEVER_REPORTED
from server.errors import UnauthenticatedError
from server.models import AuditRow, Device, FleetControl, Release, Rollout, RolloutDevice
from server.rollouts import ACTIVE, Outcome, Plan, RolloutState, unhealthy
from server.settings import Clock

UNMATCHED_ROUTE = "unmatched"
# Any other method a client invents is counted as "OTHER", for the same reason as routes.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Device events counted per device: how updates end, and the signs of a device in trouble.
# A fixed list, so a device cannot create series with event names of its own.
OUTCOME_EVENTS = frozenset(
    {
        "boot_check.committed",
        "boot_check.rolled_back",
        "boot_check.fell_back",
        "boot_check.gave_up",
        "boot_check.reported",
        "install.failed",
        "updater.crash_loop",
        "config.fallback",
    }
)
# Rollouts that still matter on a dashboard: a halted one waits for an operator.
UNFINISHED = (*ACTIVE, RolloutState.HALTED)
# Labels whose value names one device: a sample carrying one is served to the scrape token only.
DEVICE_LABELS = frozenset({"device", "hostname"})
MIB = 1 << 20


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
        self.outcomes = Counter(
            "fleet_server_device_outcomes_total",
            "Device events that end an update or mark trouble (fallback, rollback, crash "
            "loop), by device and event name",
            ["device", "event"],
            registry=self.registry,
        )
        self.uploads = Counter(
            "fleet_server_release_uploads_total",
            "Bundle uploads, by outcome (accepted, or the error code)",
            ["outcome"],
            registry=self.registry,
        )
        self.registry.register(FleetCollector(db, clock))

    def count_outcome(self, device_id: str, event: str) -> None:
        """Count a stored device event in ``fleet_server_device_outcomes_total`` when it is
        one of :data:`OUTCOME_EVENTS` (others are not counted per device)."""
        if event in OUTCOME_EVENTS:
            self.outcomes.labels(device_id, event).inc()

    def exposition(self, *, per_device: bool = False) -> bytes:
        """The series in Prometheus's text format: the fleet-wide ones, and with
        ``per_device`` those naming a device too (:func:`scrape_admits_devices` decides)."""
        return generate_latest(self.registry if per_device else _FleetWide(self.registry))


class _FleetWide:
    """A view of a registry without the samples that name a device (:data:`DEVICE_LABELS`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [s for s in family.samples if DEVICE_LABELS.isdisjoint(s.labels)]
            yield kept


def scrape_admits_devices(authorization: str | None, token: str | None) -> bool:
    """Whether a scrape with this ``Authorization`` header sees the per-device series: with the
    scrape ``token`` (compared in constant time), yes; with no header, no (the fleet-wide
    series only).

    Raises:
        UnauthenticatedError: any other credential, or one when no token is configured.
    """
    if authorization is None:
        return False
    presented = bearer_token(authorization)
    if token is None or not hmac.compare_digest(presented.encode(), token.encode()):
        raise UnauthenticatedError("not the metrics scrape token")
    return True


def _gauge(name: str, documentation: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


def _heartbeat(device: Device) -> dict[str, Any]:
    if not device.last_heartbeat:
        return {}
    try:
        document = json.loads(device.last_heartbeat)
    except ValueError:  # stored after validation, so never; a scrape must not fail for it
        return {}
    return document if isinstance(document, dict) else {}


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


class FleetCollector(Collector):
    """Fleet-wide gauges computed from the database at scrape time."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        # Describing without querying keeps registration free of database access.
        return [self._up(), *self._families().values()]

    @staticmethod
    def _up() -> GaugeMetricFamily:
        return _gauge("fleet_server_database_up", "Whether the database answered")

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
        device = ("device", "hostname")
        rollout = ("rollout", "version")
        families: list[GaugeMetricFamily | CounterMetricFamily] = [
            _gauge(
                "fleet_devices",
                "Enrolled devices, by state and version from their last heartbeat",
                "state", "version",
            ),
            _gauge("fleet_devices_assigned", "Devices assigned each release version", "version"),
            _gauge(
                "fleet_devices_unhealthy",
                "Devices in safe mode or failed in an active rollout (the fleet guard's count)",
            ),
            _gauge("fleet_releases", "Releases the server holds"),
            _gauge("fleet_emergency_stop", "1 while the emergency stop is on"),
            _gauge("fleet_rollouts", "Rollouts in each state", "state"),
            _gauge(
                "fleet_rollout_state",
                "1 per running, paused or halted rollout, labelled with its state",
                *rollout, "state",
            ),
            _gauge(
                "fleet_rollout_stage",
                "Stage an unfinished rollout is in (0 = first), labelled with its name",
                *rollout, "stage",
            ),
            _gauge("fleet_rollout_stages", "Stages in an unfinished rollout's plan", *rollout),
            _gauge(
                "fleet_rollout_devices",
                "Devices an unfinished rollout assigned, by stage of their cohort and outcome",
                *rollout, "stage", "outcome",
            ),
            _gauge(
                "fleet_device_update_pending_seconds",
                "Seconds since an active rollout assigned the device a release it has not "
                "committed yet (server clock)",
                *device, "rollout", "version",
            ),
            _gauge(
                "fleet_device_last_seen_age_seconds",
                "Seconds since the server last heard from each device (server clock)",
                *device,
            ),
            _gauge(
                "fleet_device_info",
                "1 per device: role, compatible, version and state from its last heartbeat",
                *device, "role", "compatible", "version", "state",
            ),
            _gauge(
                "fleet_device_slot_info",
                "1 per root slot a device reported in its last heartbeat",
                *device, "slot", "status", "version",
            ),
            _gauge(
                "fleet_device_temperature_celsius",
                "Hottest thermal zone in the device's last heartbeat",
                *device,
            ),
            _gauge(
                "fleet_device_throttled",
                "Raspberry Pi firmware get_throttled bits in the device's last heartbeat",
                *device,
            ),
            _gauge(
                "fleet_device_under_voltage",
                "1 when the device's last heartbeat flagged its supply under-voltage now, else 0",
                *device,
            ),
            _gauge(
                "fleet_device_free_space_bytes",
                "Free space on the device's data partition in its last heartbeat",
                *device,
            ),
            _gauge("fleet_device_uptime_seconds", "Uptime in the device's last heartbeat", *device),
            _gauge(
                "fleet_device_clock_skew_seconds",
                "The server's clock minus the device's, from its last heartbeat",
                *device,
            ),
            CounterMetricFamily(
                "fleet_device_outcome_events",
                "Events that end an update or mark trouble stored for each device (from the "
                "audit trail: the same in every process), by event name; 0 when none",
                labels=[*device, "event"],
            ),
        ]  # fmt: skip
        return {family.name: family for family in families}

    def collect(self) -> Iterable[Metric]:
        up = self._up()
        families = self._families()
        try:
            with self._db.read() as session:
                self._fill(session, families)
        except SQLAlchemyError:
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, *families.values()]

    def _fill(
        self, session: Session, families: dict[str, GaugeMetricFamily | CounterMetricFamily]
    ) -> None:
        now = self._clock()
        for state, version, count in session.execute(
            select(Device.state, Device.version, func.count()).group_by(
                Device.state, Device.version
            )
        ):
            families["fleet_devices"].add_metric([state or NEVER_REPORTED, version or ""], count)
        for version, count in session.execute(
            select(Release.version, func.count())
            .join(Device, Device.assigned_release_id == Release.id)
            .group_by(Release.version)
        ):
            families["fleet_devices_assigned"].add_metric([version], count)
        releases = session.scalar(select(func.count()).select_from(Release)) or 0
        families["fleet_releases"].add_metric([], releases)
        control = session.get(FleetControl, 1)
        stopped = bool(control is not None and control.emergency_stop)
        families["fleet_emergency_stop"].add_metric([], 1 if stopped else 0)
        families["fleet_devices_unhealthy"].add_metric([], _unhealthy(session))
        hostnames = self._fill_devices(session, families, now)
        self._fill_rollouts(session, families, hostnames, now)

    @staticmethod
    def _fill_devices(
        session: Session,
        families: dict[str, GaugeMetricFamily | CounterMetricFamily],
        now: float,
    ) -> dict[str, str]:
        hostnames: dict[str, str] = {}
        # a device's events are in the audit trail with the event as action, the device as
        # subject (server.devices.record_events); ix_audit_action keeps this a narrow read
        outcomes: dict[tuple[str | None, str], int] = {
            (subject, action): count
            for subject, action, count in session.execute(
                select(AuditRow.subject, AuditRow.action, func.count())
                .where(AuditRow.action.in_(sorted(OUTCOME_EVENTS)))
                .group_by(AuditRow.subject, AuditRow.action)
            )
        }
        for device in session.scalars(select(Device)):
            key = [device.id, device.hostname]
            hostnames[device.id] = device.hostname
            for event in sorted(OUTCOME_EVENTS):
                families["fleet_device_outcome_events"].add_metric(
                    [*key, event], outcomes.get((device.id, event), 0)
                )
            families["fleet_device_last_seen_age_seconds"].add_metric(
                key, max(0.0, now - device.last_seen.timestamp())
            )
            role = device.role or ""
            families["fleet_device_info"].add_metric(
                [*key, role, device.compatible, device.version or "",
                 device.state or NEVER_REPORTED],
                1,
            )  # fmt: skip
            if device.clock_skew_s is not None:
                families["fleet_device_clock_skew_seconds"].add_metric(key, device.clock_skew_s)
            heartbeat = _heartbeat(device)
            for name, field, scale in (
                ("fleet_device_temperature_celsius", "temperature_c", 1),
                ("fleet_device_free_space_bytes", "free_space_mb", MIB),
                ("fleet_device_uptime_seconds", "uptime_s", 1),
            ):
                value = _finite(heartbeat.get(field))
                if value is not None:
                    families[name].add_metric(key, value * scale)
            throttled = heartbeat.get("throttled")
            if isinstance(throttled, int) and not isinstance(throttled, bool) and throttled >= 0:
                families["fleet_device_throttled"].add_metric(key, throttled)
                families["fleet_device_under_voltage"].add_metric(key, throttled & 1)
            slots = heartbeat.get("slots")
            for slot, info in sorted(slots.items() if isinstance(slots, dict) else ()):
                if isinstance(info, dict):
                    families["fleet_device_slot_info"].add_metric(
                        [*key, slot, str(info.get("status") or ""), str(info.get("version") or "")],
                        1,
                    )
        return hostnames

    @staticmethod
    def _fill_rollouts(
        session: Session,
        families: dict[str, GaugeMetricFamily | CounterMetricFamily],
        hostnames: dict[str, str],
        now: float,
    ) -> None:
        counts = dict.fromkeys((state.value for state in RolloutState), 0)
        for state, count in session.execute(
            select(Rollout.state, func.count()).group_by(Rollout.state)
        ):
            counts[state] = count
        for state, count in counts.items():
            families["fleet_rollouts"].add_metric([state], count)
        unfinished = session.execute(
            select(Rollout, Release.version)
            .join(Release, Release.id == Rollout.release_id)
            .where(Rollout.state.in_(UNFINISHED))
            .order_by(Rollout.id)
        ).all()
        for rollout, version in unfinished:
            labels = [str(rollout.id), version]
            names = Plan(
                bool(json.loads(rollout.canary_ids)), tuple(json.loads(rollout.stages))
            ).names
            families["fleet_rollout_state"].add_metric([*labels, rollout.state], 1)
            stage = names[rollout.stage] if 0 <= rollout.stage < len(names) else "?"
            families["fleet_rollout_stage"].add_metric([*labels, stage], rollout.stage)
            families["fleet_rollout_stages"].add_metric(labels, len(names))
            by_outcome = {(name, o.value): 0 for name in names for o in Outcome}
            members = session.execute(
                select(RolloutDevice, Device.assigned_release_id)
                .join(Device, Device.id == RolloutDevice.device_id)
                .where(RolloutDevice.rollout_id == rollout.id)
            ).all()
            for member, assigned in members:
                name = names[member.stage] if 0 <= member.stage < len(names) else "?"
                by_outcome[(name, member.outcome)] = by_outcome.get((name, member.outcome), 0) + 1
                updating = (
                    rollout.state in ACTIVE
                    and member.outcome == Outcome.PENDING
                    and member.committed_since is None
                    and assigned == rollout.release_id
                )
                if updating:
                    families["fleet_device_update_pending_seconds"].add_metric(
                        [member.device_id, hostnames.get(member.device_id, ""), *labels],
                        max(0.0, now - member.assigned_at.timestamp()),
                    )
            for (name, outcome), count in by_outcome.items():
                families["fleet_rollout_devices"].add_metric([*labels, name, outcome], count)


def _unhealthy(session: Session) -> int:
    """Devices by the fleet guard's rule (``server.rollouts.unhealthy``), so the alert and the
    automatic emergency stop agree."""
    return session.scalar(select(func.count()).select_from(Device).where(unhealthy())) or 0


class RequestMetricsMiddleware(RequestObserver):
    """ASGI middleware that counts and times every HTTP request by route template."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        template = route_template(scope, UNMATCHED_ROUTE)
        method = scope.get("method", "")
        method = method if method in METHODS else "OTHER"
        self.metrics.requests.labels(method, template, str(status)).inc()
        self.metrics.latency.labels(method, template).observe(seconds)
