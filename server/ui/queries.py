"""What the web console's pages read: the device list, the fleet overview, one device's detail
and the alerts firing in Alertmanager. Read transactions only; nothing here changes the fleet.

Every word keeps the meaning it has elsewhere, so the console never disagrees with the metrics,
the alerts or the rollout engine:

- a device's *state* is the one of the metrics' ``fleet_devices{state}``: the word from its last
  heartbeat (``idle``, ``trial``, ``safe_mode``, ...), ``enrolled`` when it never sent one;
- it is *offline* when unseen for longer than :data:`OFFLINE_AFTER_S` by the rollout engine's
  rule (:func:`server.rollouts.offline`), 5 minutes as in the ``DeviceOffline`` alert;
- it is *unhealthy* by the fleet guard's rule (:func:`server.rollouts.unhealthy`), the one of
  the ``fleet_devices_unhealthy`` gauge.

The device list stays fast on a large fleet: every filter and sort key has an index (migration
0008), the order ends on the device id so pages never overlap, a page loads only its rows and
the count of the matching devices reads an index alone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

import requests
from sqlalchemy import ColumnElement, Select, case, func, select
from sqlalchemy.orm import InstrumentedAttribute

from fleet_core.text import describe, refused_character
from server.database import Database
from server.devices import NEVER_REPORTED, get_device, recent_entries
from server.errors import InvalidRequestError
from server.models import Device, DeviceStatus, Release, Rollout
from server.rollouts import (
    ACTIVE,
    RolloutState,
    emergency_stop_view,
    get,
    offline,
    unhealthy,
)
from server.schemas import MIN_OFFLINE_AFTER_S
from server.settings import iso

# Unseen for longer: offline. The shortest a rollout accepts, and the DeviceOffline alert's.
OFFLINE_AFTER_S = MIN_OFFLINE_AFTER_S
# Derived states a list can be filtered by, besides a reported state word.
DERIVED_STATES = ("online", "offline", "unhealthy")
STATE_WORD = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
LABEL = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
DURATION = re.compile(r"^([1-9][0-9]{0,4})([mhd])$")
DURATION_UNITS = {"m": 60, "h": 3600, "d": 86400}
MAX_DURATION_S = 366 * 86400
SORT_KEYS = ("hostname", "last_seen", "version", "state", "enrolled")
DEFAULT_SORT = "hostname"
PER_PAGE = (25, 50, 100, 200)
DEFAULT_PER_PAGE = 50
MAX_PAGE = 100_000
MAX_SEARCH = 253
MAX_VERSION = 128
# A version the overview shows as "unknown": no version reported, or that very word.
UNKNOWN_VERSION = "unknown"
TIMELINE_LIMIT = 200
# The device's audit events that tell its boot history, and what each one is.
BOOT_EVENTS = {
    "install.started": "install",
    "install.trial_armed": "trial armed",
    "install.failed": "install failed",
    "install.abandoned": "install abandoned",
    "boot_check.committed": "commit",
    "boot_check.confirmed": "confirmed",
    "boot_check.rolled_back": "rollback",
    "boot_check.fell_back": "fallback",
    "boot_check.gave_up": "gave up",
    "boot_check.reported": "safe mode",
    "boot_check.trial_never_started": "trial never started",
    "boot_check.trial_died": "trial died",
    "boot_check.trial_rearmed": "trial armed",
    "boot_check.install_interrupted": "install interrupted",
    "rollback.armed": "rollback armed",
}
HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
HEALTH_RULE = (
    "healthy: active devices seen within the last 5 minutes and not unhealthy (in safe mode, "
    "or failed in an active rollout), as a share of all active devices"
)
ALERTS_TIMEOUT_S = 2.0
ALERTS_CACHE_S = 10.0
MAX_ALERTS = 50


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """``text`` with its ASCII letters in lower case, as SQL's ``lower`` on SQLite does (host
    names are ASCII, so the search ignores their case everywhere)."""
    return text.translate(_ASCII_LOWER)


def _escape_like(text: str) -> str:
    """``text`` matched literally by a LIKE with ``ESCAPE '\\'``."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _duration(name: str, value: str) -> int:
    match = DURATION.fullmatch(value)
    if match is None:
        raise InvalidRequestError(
            f"{name}: {value[:40]!r} is not a duration such as 30m, 1h, 24h or 7d"
        )
    seconds = int(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds > MAX_DURATION_S:
        raise InvalidRequestError(f"{name}: at most 366 days")
    return seconds


def _integer(name: str, value: str, lo: int, hi: int) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 9:
        raise InvalidRequestError(f"{name}: {value[:40]!r} is not a whole number")
    number = int(value)
    if not lo <= number <= hi:
        raise InvalidRequestError(f"{name}: give a number from {lo} to {hi}")
    return number


def _text(name: str, value: str, limit: int) -> str:
    """``value``, when it is free text as the API's (:func:`fleet_core.text.refused_character`)
    of at most ``limit`` characters."""
    if len(value) > limit:
        raise InvalidRequestError(f"{name}: at most {limit} characters")
    refused = refused_character(value)
    if refused is not None:
        raise InvalidRequestError(f"{name}: {describe(refused)} is not allowed")
    return value


@dataclass(frozen=True)
class DeviceQuery:
    """What the device list shows: filters, order and page, as given in the URL.

    ``state`` is a reported state word (``idle``, ``trial``, ``safe_mode``, ..., ``enrolled``
    for never reported; ``safe-mode`` and ``never-reported`` are accepted too) or one of
    :data:`DERIVED_STATES`. ``seen_within`` and ``not_seen_within`` are durations in seconds
    (given as ``30m``, ``1h``, ``7d``). ``sort`` is a key of :data:`SORT_KEYS`, ``-`` first
    for descending.
    """

    q: str | None = None
    version: str | None = None
    state: str | None = None
    role: str | None = None
    tag: str | None = None
    seen_within: int | None = None
    not_seen_within: int | None = None
    status: str | None = None
    sort: str = DEFAULT_SORT
    page: int = 1
    per_page: int = DEFAULT_PER_PAGE

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> DeviceQuery:
        """Parse URL query parameters; unknown ones and empty values are ignored.

        Raises:
            InvalidRequestError: a value out of its set or bounds, naming the parameter.
        """
        given = {k: v.strip() for k, v in params.items() if isinstance(v, str) and v.strip()}
        values: dict[str, Any] = {}
        if "q" in given:
            values["q"] = _text("q", given["q"], MAX_SEARCH)
        if "version" in given:
            values["version"] = _text("version", given["version"], MAX_VERSION)
        if "state" in given:
            state = given["state"].replace("-", "_")
            state = NEVER_REPORTED if state == "never_reported" else state
            if not STATE_WORD.fullmatch(state):
                raise InvalidRequestError(
                    f"state: {given['state'][:40]!r} is not a state (online, offline, "
                    "unhealthy, or a reported state such as idle or safe_mode)"
                )
            values["state"] = state
        for name in ("role", "tag"):
            if name in given:
                if not LABEL.fullmatch(given[name]):
                    raise InvalidRequestError(
                        f"{name}: {given[name][:40]!r} is not a {name} (lower-case letters, "
                        "digits, '.', '_' and '-', at most 63)"
                    )
                values[name] = given[name]
        for name in ("seen_within", "not_seen_within"):
            if name in given:
                values[name] = _duration(name, given[name])
        if "status" in given:
            if given["status"] not in {s.value for s in DeviceStatus}:
                raise InvalidRequestError(
                    f"status: {given['status'][:40]!r} is not active, quarantined or decommissioned"
                )
            values["status"] = given["status"]
        if "sort" in given:
            if given["sort"].removeprefix("-") not in SORT_KEYS:
                raise InvalidRequestError(
                    f"sort: {given['sort'][:40]!r} is not one of {', '.join(SORT_KEYS)} "
                    "(with '-' first for descending)"
                )
            values["sort"] = given["sort"]
        if "page" in given:
            values["page"] = _integer("page", given["page"], 1, MAX_PAGE)
        if "per_page" in given:
            per_page = _integer("per_page", given["per_page"], 1, max(PER_PAGE))
            if per_page not in PER_PAGE:
                raise InvalidRequestError(f"per_page: give one of {', '.join(map(str, PER_PAGE))}")
            values["per_page"] = per_page
        return cls(**values)

    def to_params(self, **changes: Any) -> dict[str, str]:
        """The URL parameters that give this query back (defaults left out), with ``changes``
        applied (``page=2``, ``sort="-last_seen"``): for links that keep the filters."""
        query = replace(self, **changes)
        params: dict[str, str] = {}
        for item in fields(query):
            value = getattr(query, item.name)
            if value is None or value == item.default:
                continue
            if item.name in ("seen_within", "not_seen_within"):
                value = _spell_duration(value)
            params[item.name] = str(value)
        return params

    def to_query_string(self, **changes: Any) -> str:
        """:meth:`to_params` encoded for a URL (no leading ``?``)."""
        return urlencode(self.to_params(**changes))


def _spell_duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds // 60}m"


@dataclass(frozen=True)
class DeviceRow:
    """One device in the list."""

    id: str
    hostname: str
    version: str | None
    state: str
    role: str | None
    tags: tuple[str, ...]
    last_seen: str
    enrolled: str
    status: str
    online: bool
    temperature_c: float | None
    free_space_mb: float | None


@dataclass(frozen=True)
class DevicePage:
    """A page of the device list: its rows, how many devices match, and where it is."""

    query: DeviceQuery
    rows: tuple[DeviceRow, ...]
    total: int
    page: int
    pages: int


def _online(now: datetime) -> ColumnElement[bool]:
    """The SQL side of :func:`server.rollouts.offline` with :data:`OFFLINE_AFTER_S`, negated:
    seen exactly that long ago is still online."""
    return Device.last_seen >= now - timedelta(seconds=OFFLINE_AFTER_S)


def _conditions(query: DeviceQuery, now: datetime) -> list[ColumnElement[bool]]:
    """The SQL conditions of the query's filters."""
    conditions: list[ColumnElement[bool]] = []
    if query.q is not None:
        needle = _escape_like(ascii_lower(query.q))
        conditions.append(
            Device.id.like(f"{needle}%", escape="\\")
            | func.lower(Device.hostname).like(f"%{needle}%", escape="\\")
        )
    if query.version == UNKNOWN_VERSION:
        conditions.append(Device.version.is_(None) | (Device.version == UNKNOWN_VERSION))
    elif query.version is not None:
        conditions.append(Device.version == query.version)
    if query.state == "online":
        conditions.append(_online(now))
    elif query.state == "offline":
        conditions.append(~_online(now))
    elif query.state == "unhealthy":
        conditions.append(unhealthy())
    elif query.state == NEVER_REPORTED:
        conditions.append(Device.state.is_(None) | (Device.state == NEVER_REPORTED))
    elif query.state is not None:
        conditions.append(Device.state == query.state)
    if query.role is not None:
        conditions.append(Device.role == query.role)
    if query.tag is not None:
        # Tags are stored as the JSON text of a sorted list of labels (server.devices), and a
        # label holds no quote or backslash: the quoted tag matches one whole element only.
        needle = _escape_like(json.dumps(query.tag))
        conditions.append(Device.tags.like(f"%{needle}%", escape="\\"))
    if query.seen_within is not None:
        conditions.append(Device.last_seen >= now - timedelta(seconds=query.seen_within))
    if query.not_seen_within is not None:
        conditions.append(Device.last_seen < now - timedelta(seconds=query.not_seen_within))
    if query.status is not None:
        conditions.append(Device.status == query.status)
    return conditions


def _order(query: DeviceQuery) -> list[Any]:
    key = query.sort.removeprefix("-")
    descending = query.sort.startswith("-")
    column = getattr(Device, key)
    if descending:
        # no version or state sorts as the smallest value, either way and on every database
        return [column.desc().nulls_last(), Device.id.desc()]
    return [column.asc().nulls_first(), Device.id.asc()]


def _figure(heartbeat: Mapping[str, Any], name: str) -> float | None:
    value = heartbeat.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _heartbeat(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        document = json.loads(text)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def _tags(text: str | None) -> tuple[str, ...]:
    try:
        tags = json.loads(text) if text else []
    except ValueError:
        return ()
    return tuple(str(t) for t in tags) if isinstance(tags, list) else ()


def count_statement(query: DeviceQuery, now: datetime) -> Select[int]:
    """The count of the devices matching ``query``'s filters: whatever they are, one index
    covers its condition (migration 0008), so it reads no device's row."""
    return select(func.count()).select_from(Device).where(*_conditions(query, now))


def device_page(db: Database, now: datetime, query: DeviceQuery) -> DevicePage:
    """The devices matching ``query``, one page of them in its order (ties by device id), and
    how many match."""
    with db.read() as session:
        total = session.scalar(count_statement(query, now)) or 0
        columns = (
            Device.id, Device.hostname, Device.version, Device.state, Device.role, Device.tags,
            Device.last_seen, Device.enrolled, Device.status, Device.last_heartbeat,
        )  # fmt: skip
        rows = session.execute(
            select(*columns)
            .where(*_conditions(query, now))
            .order_by(*_order(query))
            .limit(query.per_page)
            .offset((query.page - 1) * query.per_page)
        ).all()
    return DevicePage(
        query=query,
        rows=tuple(_row(row, now) for row in rows),
        total=total,
        page=query.page,
        pages=max(1, math.ceil(total / query.per_page)),
    )


def _row(row: Any, now: datetime) -> DeviceRow:
    heartbeat = _heartbeat(row.last_heartbeat)
    return DeviceRow(
        id=row.id,
        hostname=row.hostname,
        version=row.version,
        state=row.state or NEVER_REPORTED,
        role=row.role,
        tags=_tags(row.tags),
        last_seen=iso(row.last_seen),
        enrolled=iso(row.enrolled),
        status=row.status,
        online=not offline(row.last_seen, now, OFFLINE_AFTER_S),
        temperature_c=_figure(heartbeat, "temperature_c"),
        free_space_mb=_figure(heartbeat, "free_space_mb"),
    )


def distinct_statement(column: InstrumentedAttribute[str | None]) -> Select[str | None]:
    """The values of an indexed device column (and a last NULL), read by a skip scan of its
    index: a recursive query seeks the next greater value, one seek per value, where DISTINCT
    reads every entry of the index."""
    walk = select(func.min(column).label("value")).cte("walk", recursive=True)
    following = select(func.min(column)).where(column > walk.c.value).scalar_subquery()
    walk = walk.union_all(select(following).where(walk.c.value.is_not(None)))
    return select(walk.c.value)


def reported(db: Database) -> tuple[list[str], list[str]]:
    """The versions and the states devices report, in order, for the device list's filters
    (:data:`NEVER_REPORTED` among the states when a device never said one)."""
    with db.read() as session:
        versions = [v for v in session.scalars(distinct_statement(Device.version)) if v is not None]
        states = [s for s in session.scalars(distinct_statement(Device.state)) if s is not None]
        never = session.scalar(select(Device.id).where(Device.state.is_(None)).limit(1))
    # in Python's order, whatever the database's collation
    return sorted(versions), sorted({*states, *([NEVER_REPORTED] if never is not None else [])})


@dataclass(frozen=True)
class VersionCount:
    """How many devices run a version (``unknown``: none reported)."""

    version: str
    count: int


@dataclass(frozen=True)
class Overview:
    """The fleet at a glance. Counts are of every enrolled device (decommissioned ones too,
    counted apart as well); ``health_percent`` follows :data:`HEALTH_RULE`."""

    total: int
    online: int
    offline: int
    unhealthy: int
    safe_mode: int
    decommissioned: int
    quarantined: int
    active: int
    healthy: int
    health_percent: float | None  # None: no active device
    health_rule: str
    versions: tuple[VersionCount, ...]
    rollouts: tuple[dict[str, Any], ...]  # as server.rollouts.get gives them
    emergency_stop: dict[str, Any]


def overview(db: Database, now: datetime) -> Overview:
    """The fleet's counts, versions, unfinished rollouts and emergency stop, as of ``now``: one
    grouped query per aggregate, no device loaded."""
    online = _online(now)
    sick = unhealthy()
    with db.read() as session:
        by_status = session.execute(
            select(
                Device.status,
                func.count(),
                func.sum(case((online, 1), else_=0)),
                func.sum(case((sick, 1), else_=0)),
                func.sum(case((Device.state == "safe_mode", 1), else_=0)),
                # not ~sick: a device that never reported has no state, and NOT NULL is NULL
                func.sum(case((sick, 0), (online, 1), else_=0)),
            ).group_by(Device.status)
        ).all()
        versions: dict[str, int] = {}
        for version, count in session.execute(
            select(Device.version, func.count()).group_by(Device.version)
        ):
            name = UNKNOWN_VERSION if version is None else version
            versions[name] = versions.get(name, 0) + count
        unfinished = session.scalars(
            select(Rollout.id)
            .where(Rollout.state.in_((*ACTIVE, RolloutState.HALTED)))
            .order_by(Rollout.id.desc())
        ).all()
        emergency = emergency_stop_view(session)
    counts = {status: [int(v or 0) for v in values] for status, *values in by_status}
    total = sum(c[0] for c in counts.values())
    active = counts.get(DeviceStatus.ACTIVE, [0] * 5)
    return Overview(
        total=total,
        online=sum(c[1] for c in counts.values()),
        offline=total - sum(c[1] for c in counts.values()),
        unhealthy=sum(c[2] for c in counts.values()),
        safe_mode=sum(c[3] for c in counts.values()),
        decommissioned=counts.get(DeviceStatus.DECOMMISSIONED, [0])[0],
        quarantined=counts.get(DeviceStatus.QUARANTINED, [0])[0],
        active=active[0],
        healthy=active[4],
        health_percent=round(100 * active[4] / active[0], 1) if active[0] else None,
        health_rule=HEALTH_RULE,
        versions=tuple(
            VersionCount(v, c) for v, c in sorted(versions.items(), key=lambda i: (-i[1], i[0]))
        ),
        rollouts=tuple(get(db, rollout_id, now) for rollout_id in unfinished),
        emergency_stop=emergency,
    )


def _address(metrics_address: Any) -> str | None:
    """The host of a ``host:port`` the device reports, when it is an IP address or a host
    name; anything else is None (it goes into a command an operator copies)."""
    if not isinstance(metrics_address, str) or not metrics_address:
        return None
    host = metrics_address
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    return host if HOSTNAME.fullmatch(host) and not host.startswith("-") else None


def _link(base: Any, path: str) -> str | None:
    if not isinstance(base, str) or not base:
        return None
    return base.rstrip("/") + path


def device_detail(
    db: Database, device_id: str, now: datetime, settings: Any = None
) -> dict[str, Any]:
    """One device for its page: :func:`server.devices.get_device`'s view, plus ``online``, who
    set its status (``status_by``), its slots, boot history, timeline (newest first), last
    heartbeat's figures, the address it reports (for an SSH command) and links to its Grafana
    dashboard and Loki logs.

    Raises:
        UnknownDeviceError: no such device.
    """
    view = get_device(db, device_id)
    heartbeat: dict[str, Any] = view.get("last_heartbeat") or {}
    entries = list(reversed(recent_entries(db, device_id, TIMELINE_LIMIT)))
    reported = heartbeat.get("slots")
    slots_reported: dict[str, Any] = reported if isinstance(reported, dict) else {}
    versions = {
        str(info["version"])
        for info in slots_reported.values()
        if isinstance(info, dict) and info.get("version")
    }
    with db.read() as session:
        security = dict(
            session.execute(
                select(Release.version, Release.security_version).where(
                    Release.version.in_(sorted(versions))
                )
            ).all()
        )
        last_seen, status_by = session.execute(
            select(Device.last_seen, Device.status_by).where(Device.id == device_id)
        ).one()
    slots = [
        {
            "name": name,
            "release": info.get("version"),
            "status": info.get("status"),
            "security_version": security.get(str(info.get("version"))),
            "booted": heartbeat.get("booted") == name,
            "primary": heartbeat.get("primary") == name,
        }
        for name, info in sorted(slots_reported.items())
        if isinstance(info, dict)
    ]
    boot_history = [
        {"seq": e["seq"], "at": e["at"], "event": e["action"], "kind": BOOT_EVENTS[e["action"]],
         "fields": (e.get("details") or {}).get("fields", {})}
        for e in entries
        if e.get("action") in BOOT_EVENTS
    ]  # fmt: skip
    figures = {
        name: _figure(heartbeat, name)
        for name in ("temperature_c", "free_space_mb", "uptime_s", "cpu_percent",
                     "memory_percent", "network_rx_bytes", "network_tx_bytes")
    }  # fmt: skip
    quoted = quote(device_id, safe="")
    logs = quote(f'{{device="{device_id}"}}', safe="")
    return {
        **view,
        "online": not offline(last_seen, now, OFFLINE_AFTER_S),
        "status_by": status_by,
        "slots": slots,
        "boot_history": boot_history,
        "timeline": entries,
        "figures": {k: v for k, v in figures.items() if v is not None},
        "address": _address(heartbeat.get("metrics_address")),
        "grafana_url": _link(
            getattr(settings, "grafana_url", None), f"/d/fleet-device/?var-device={quoted}"
        ),
        "loki_url": _link(
            getattr(settings, "loki_url", None), f"/loki/api/v1/query_range?query={logs}"
        ),
    }


@dataclass(frozen=True)
class Alert:
    """One firing alert, as Alertmanager gives it."""

    name: str
    severity: str
    summary: str
    starts_at: str


@dataclass(frozen=True)
class AlertsView:
    """The alerts firing now (at most :data:`MAX_ALERTS`), or why they cannot be shown."""

    configured: bool
    alerts: tuple[Alert, ...] = ()
    error: str | None = None
    more: bool = False  # Alertmanager has more than those shown


@dataclass
class _Cached:
    at: float
    view: AlertsView


_alerts_cache: dict[str, _Cached] = {}
_alerts_lock = threading.Lock()


def firing_alerts(settings: Any, clock: Any = time.monotonic) -> AlertsView:
    """The alerts firing in the Alertmanager of ``settings.alertmanager_url`` (active, not
    silenced, not inhibited), asked at most every :data:`ALERTS_CACHE_S` per process and given
    :data:`ALERTS_TIMEOUT_S` to answer. Never raises: a failure is the view's ``error``."""
    url = getattr(settings, "alertmanager_url", None)
    if not url:
        return AlertsView(configured=False)
    with _alerts_lock:
        cached = _alerts_cache.get(url)
        if cached is not None and clock() - cached.at < ALERTS_CACHE_S:
            return cached.view
    view = _fetch_alerts(url)
    with _alerts_lock:
        _alerts_cache[url] = _Cached(clock(), view)
    return view


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _fetch_alerts(url: str) -> AlertsView:
    """The firing alerts, or why not, within :data:`ALERTS_TIMEOUT_S` in all: requests' timeout
    bounds each read, not the answer, which an Alertmanager sending a byte now and then would
    stretch without end while the page waits. The asking runs in a thread of its own, which
    closes the answer once the time is up (:func:`_ask_alertmanager`)."""
    asked: list[AlertsView] = []
    answered, gave_up = threading.Event(), threading.Event()

    def ask() -> None:
        try:
            asked.append(_ask_alertmanager(url))
        except Exception:
            if not gave_up.is_set():  # not the answer closed under its read: a fault
                raise
        finally:
            answered.set()

    threading.Thread(target=ask, name="alertmanager", daemon=True).start()
    if not answered.wait(ALERTS_TIMEOUT_S):
        gave_up.set()
        return AlertsView(True, error=f"Alertmanager did not answer within {ALERTS_TIMEOUT_S:g} s")
    if not asked:
        return AlertsView(True, error="Alertmanager's answer could not be read (logged)")
    return asked[0]


def _shut(response: requests.Response, cut_off: threading.Event) -> None:
    """End the reading of ``response`` in another thread (``cut_off`` set): its socket shut down
    (closing the response would wait for the reader's lock), found by the descriptor the answer
    reads from (the connection no longer holds it when the server said it closes)."""
    cut_off.set()
    with contextlib.suppress(OSError, ValueError):
        sock = socket.socket(fileno=response.raw.fileno())
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.detach()  # the answer's own socket closes the descriptor


def _ask_alertmanager(url: str) -> AlertsView:
    """Ask ``url``; the answer is cut off under its read once :data:`ALERTS_TIMEOUT_S` passed.

    Raises:
        Exception: whatever reading a closed answer raises, after the time is up.
    """
    endpoint = url.rstrip("/") + "/api/v2/alerts"
    params = {"active": "true", "silenced": "false", "inhibited": "false"}
    started, cut_off = time.monotonic(), threading.Event()
    too_slow = AlertsView(True, error=f"Alertmanager did not answer within {ALERTS_TIMEOUT_S:g} s")
    try:
        with requests.get(
            endpoint, params=params, timeout=ALERTS_TIMEOUT_S, stream=True
        ) as response:
            left = ALERTS_TIMEOUT_S - (time.monotonic() - started)
            cut = threading.Timer(max(left, 0.0), _shut, (response, cut_off))
            cut.daemon = True
            cut.start()
            try:
                response.raise_for_status()
                body = response.content
            finally:
                cut.cancel()
                cut.join()  # a cut under way ends before the answer closes its descriptor
        document = json.loads(body)
    except requests.Timeout:
        return too_slow
    except requests.HTTPError as err:
        code = err.response.status_code if err.response is not None else "an error"
        return AlertsView(True, error=f"Alertmanager answered {code}")
    except requests.RequestException as err:
        if cut_off.is_set():
            return too_slow
        return AlertsView(True, error=f"Alertmanager unreachable: {type(err).__name__}")
    except ValueError:
        return AlertsView(True, error="Alertmanager's answer is not JSON")
    if not isinstance(document, list):
        return AlertsView(True, error="Alertmanager's answer is not a list of alerts")
    alerts = []
    for item in document[:MAX_ALERTS]:
        if not isinstance(item, dict):
            return AlertsView(True, error="Alertmanager's answer holds something not an alert")
        labels = _mapping(item.get("labels"))
        annotations = _mapping(item.get("annotations"))
        alerts.append(
            Alert(
                name=str(labels.get("alertname", "?"))[:200],
                severity=str(labels.get("severity", ""))[:50],
                summary=str(annotations.get("summary", ""))[:500],
                starts_at=str(item.get("startsAt", ""))[:40],
            )
        )
    return AlertsView(True, tuple(alerts), more=len(document) > MAX_ALERTS)
