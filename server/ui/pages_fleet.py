"""The console's fleet pages: the overview (``/ui/``), the device list (``/ui/devices``) and a
device's page (``/ui/devices/{id}``) with the operators' actions on it.

Pages read through :mod:`server.ui.queries`; actions call the functions the API calls
(:func:`server.devices.assign`, :func:`~server.devices.change_status`,
:func:`~server.devices.rename`) with the API's request models for what an operator typed, so no
rule has a second home here. An action the server refuses (a status conflict, an unknown or
incompatible release, a hostname taken or malformed, a confirmation typed wrong) renders the
device's page again with the message, under the error's status.

There is no per-device rollback in the API: a device goes back by being assigned the release it
ran before (the assignment form lists every release compatible with it); a rollout's devices go
back with the rollout's own rollback.

Every string shown comes from devices or operators and is hostile text: it reaches the page
only through autoescaped templates, and links are built here from validated values.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from server import devices, releases
from server.api.common import server_state
from server.blobs import SHA256_HEX
from server.database import Database
from server.errors import ApiError, InvalidRequestError, UnknownDeviceError
from server.models import DeviceStatus
from server.rollout_text import failure_rule_text, selector_text, skipped_text, stage_text
from server.schemas import AssignmentRequest, ReasonRequest, RenameRequest, parse
from server.ui import queries
from server.ui.common import Action, UiAction, UiPage, redirect, render
from server.ui.sessions import UiSession

router = APIRouter(prefix="/ui")

# The device list's sortable columns (DeviceQuery's sort keys) and their headers.
COLUMNS = {
    "hostname": "Hostname",
    "version": "Version",
    "state": "State",
    "last_seen": "Last seen",
    "enrolled": "Enrolled",
}
SEEN_CHOICES = ("5m", "1h", "24h", "7d", "30d")
STATUS_CHOICES = tuple(status.value for status in DeviceStatus)
# (field, label, unit) of a heartbeat's figures, in the order shown.
FIGURES = (
    ("temperature_c", "Temperature", "°C"),
    ("free_space_mb", "Free space", "MB"),
    ("uptime_s", "Uptime", "s"),
    ("cpu_percent", "CPU", "%"),
    ("memory_percent", "Memory", "%"),
    ("network_rx_bytes", "Network received", "bytes"),
    ("network_tx_bytes", "Network sent", "bytes"),
)
_DONE = {
    "quarantine": "quarantined",
    "release": "released from quarantine",
    "decommission": "decommissioned",
    "reinstate": "reinstated",
}


class InvalidQueryError(ApiError):
    """A parameter of the device list's address out of its set or bounds."""

    status = 400
    code = "invalid_query"


def moment(text: str | None, *, seconds: bool = True) -> str:
    """An ISO 8601 UTC time as a page shows it: ``2026-12-03 20:05:49`` (to the minute
    without ``seconds``); the ``<time>`` element keeps the full value."""
    if not text:
        return ""
    shown = text.replace("T", " ")[: 19 if seconds else 16]
    return f"{shown} UTC" if text.endswith("Z") else shown


# --- the overview --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageLine:
    """One stage of a rollout as a page draws it."""

    name: str
    succeeded: int
    failed: int
    expected: int
    text: str  # server.rollout_text.stage_text
    current: bool


@dataclass(frozen=True)
class RolloutLine:
    """A rollout in the words ``fleet rollout status`` uses for it (server.rollout_text)."""

    id: int
    version: str
    state: str
    stage_name: str
    reason: str | None
    selector: str | None
    skipped: str | None
    stages: list[StageLine]
    failure_rule: str


def rollout_line(view: Mapping[str, Any]) -> RolloutLine:
    """A rollout's view (``server.rollouts.get``) as the overview shows it."""
    going = view["state"] in ("running", "paused")
    skipped = view.get("skipped_offline") or []
    return RolloutLine(
        id=view["id"],
        version=view["version"],
        state=view["state"],
        stage_name=view["stage_name"],
        reason=view["reason"],
        selector=selector_text(view.get("selector")),
        skipped=skipped_text(len(skipped), view["offline_after_s"]) if skipped else None,
        stages=[
            StageLine(
                name=stage["name"],
                succeeded=stage["succeeded"],
                failed=stage["failed"],
                expected=stage["expected"],
                text=stage_text(stage),
                current=going and index == view["stage"],
            )
            for index, stage in enumerate(view["stage_progress"])
        ],
        failure_rule=failure_rule_text(view["failure_rule"]),
    )


@dataclass(frozen=True)
class VersionLine:
    """A row of the version distribution: the version, its devices, its share."""

    version: str
    count: int
    total: int
    percent: str
    url: str | None  # the device list of that version (none for "unknown")


def _list_url(**params: str) -> str:
    return f"/ui/devices?{queries.DeviceQuery.from_params(params).to_query_string()}"


@router.get("/", response_class=HTMLResponse)
def overview_page(request: Request, session: UiPage) -> HTMLResponse:
    """The fleet at a glance: device counts, health, versions, active rollouts, alerts."""
    state = server_state(request)
    overview = queries.overview(state.db, state.now())
    alerts = queries.firing_alerts(state.settings)
    total = sum(v.count for v in overview.versions)
    counts = [
        ("total", "Devices", overview.total, "/ui/devices"),
        ("online", "Online", overview.online, _list_url(state="online")),
        ("offline", "Offline", overview.offline, _list_url(state="offline")),
        ("unhealthy", "Unhealthy", overview.unhealthy, _list_url(state="unhealthy")),
        ("safe_mode", "Safe mode", overview.safe_mode, _list_url(state="safe_mode")),
        ("quarantined", "Quarantined", overview.quarantined, _list_url(status="quarantined")),
        (
            "decommissioned", "Decommissioned", overview.decommissioned,
            _list_url(status="decommissioned"),
        ),
    ]  # fmt: skip
    versions = [
        VersionLine(
            version=v.version,
            count=v.count,
            total=total,
            percent=f"{100 * v.count / total:.1f} %" if total else "0 %",
            url=None if v.version == queries.UNKNOWN_VERSION else _list_url(version=v.version),
        )
        for v in overview.versions
    ]
    return render(
        request,
        session,
        "overview.html",
        overview=overview,
        counts=counts,
        versions=versions,
        rollouts=[rollout_line(view) for view in overview.rollouts],
        alerts=alerts,
    )


# --- the device list -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A sortable column header: its link (the same filters, this order, first page) and the
    order it shows now (``aria-sort``)."""

    key: str
    label: str
    url: str
    order: str  # ascending, descending or none


def columns(query: queries.DeviceQuery) -> list[Column]:
    """The device list's headers: a click sorts by the column, a second click the other way."""
    found = []
    for key, label in COLUMNS.items():
        if query.sort == key:
            order, target = "ascending", f"-{key}"
        elif query.sort == f"-{key}":
            order, target = "descending", key
        else:
            order, target = "none", key
        url = f"/ui/devices?{query.to_query_string(sort=target, page=1)}"
        found.append(Column(key, label, url, order))
    return found


def _page_url(query: queries.DeviceQuery, page: int) -> str:
    return f"/ui/devices?{query.to_query_string(page=page)}"


@router.get("/devices", response_class=HTMLResponse)
def devices_page(request: Request, session: UiPage) -> HTMLResponse:
    """The devices, filtered, sorted and paged by the query string (so a link shares the view).

    Raises:
        InvalidQueryError: a parameter out of its set or bounds (the page names it).
    """
    state = server_state(request)
    try:
        query = queries.DeviceQuery.from_params(request.query_params)
    except InvalidRequestError as err:
        raise InvalidQueryError(err.detail) from None
    page = queries.device_page(state.db, state.now(), query)
    versions, states = queries.reported(state.db)
    if query.version is not None and query.version not in versions:
        versions = sorted([*versions, query.version])
    states = [*queries.DERIVED_STATES, *states]
    if query.state is not None and query.state not in states:
        states.append(query.state)
    shown = query.to_params()
    return render(
        request,
        session,
        "devices.html",
        moment=moment,
        query=query,
        page=page,
        versions=versions,
        states=states,
        statuses=STATUS_CHOICES,
        seen_choices=sorted({*SEEN_CHOICES, shown.get("seen_within", "5m")}, key=_seconds),
        seen_within=shown.get("seen_within"),
        not_seen_within=shown.get("not_seen_within"),
        per_page_choices=queries.PER_PAGE,
        columns=columns(query),
        # past the last page, "previous" leads back to the last one
        previous_url=_page_url(query, min(query.page - 1, page.pages)) if query.page > 1 else None,
        next_url=_page_url(query, query.page + 1) if query.page < page.pages else None,
    )


def _seconds(duration: str) -> int:
    return int(duration[:-1]) * queries.DURATION_UNITS[duration[-1]]


# --- a device ------------------------------------------------------------------------------------


def _checked_id(device_id: str) -> str:
    """The device id of a page's address.

    Raises:
        UnknownDeviceError: not a device id (64 lowercase hex digits): no such device.
    """
    if not SHA256_HEX.fullmatch(device_id):
        raise UnknownDeviceError("no such device: a device id is 64 hex digits")
    return device_id


def device_url(device_id: str) -> str:
    """A device's page (its id: 64 hex digits, quoted all the same)."""
    return f"/ui/devices/{quote(device_id, safe='')}"


def compatible_releases(db: Database, compatible: str) -> list[str]:
    """The versions a device of ``compatible`` may be assigned, newest first."""
    return [
        r["version"] for r in reversed(releases.list_releases(db)) if r["compatible"] == compatible
    ]


def detail_lines(details: Mapping[str, Any]) -> list[tuple[str, str]]:
    """An audit entry's details as ``(key, text)`` pairs: a device event's fields (its log
    line) or an operator action's details; values that are not text as JSON."""
    fields = details.get("fields")
    shown = fields if isinstance(fields, dict) else details
    return [
        (str(key), value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        for key, value in shown.items()
        if not (key == "seq" and shown is details)
    ]


def _figure_text(value: float) -> str:
    return f"{value:.0f}" if value == int(value) and abs(value) < 1e15 else f"{value:.1f}"


def _device_page(
    request: Request,
    session: UiSession,
    device_id: str,
    *,
    status: int = 200,
    error: str | None = None,
    values: Mapping[str, str] | None = None,
) -> HTMLResponse:
    state = server_state(request)
    detail = queries.device_detail(state.db, device_id, state.now(), state.settings)
    figures = [
        (name, label, unit, _figure_text(detail["figures"][name]))
        for name, label, unit in FIGURES
        if name in detail["figures"]
    ]
    return render(
        request,
        session,
        "device.html",
        status=status,
        moment=moment,
        device=detail,
        figures=figures,
        boot_history=[(boot, detail_lines(boot)) for boot in detail["boot_history"]],
        timeline=[
            (entry, detail_lines(entry.get("details") or {})) for entry in detail["timeline"]
        ],
        releases=compatible_releases(state.db, detail["compatible"]),
        base_url=device_url(device_id),
        error=error,
        values=values or {},
    )


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device_page(device_id: str, request: Request, session: UiPage) -> HTMLResponse:
    """A device: its status, slots, boot history, timeline, last heartbeat, links, actions.

    Raises:
        UnknownDeviceError: no such device (a 404 page).
    """
    return _device_page(request, session, _checked_id(device_id))


Body = TypeVar("Body", AssignmentRequest, ReasonRequest, RenameRequest)


def _validated(model: type[Body], **fields: Any) -> Body:
    """What the operator typed, validated by the model the API validates its body with.

    Raises:
        InvalidRequestError: naming the first field refused.
    """
    return parse(model, json.dumps(fields).encode())


def _act(
    request: Request, action: Action, device_id: str, work: Callable[[], object], notice: str
) -> HTMLResponse | RedirectResponse:
    """``work()`` (a change through server.devices), then back to the device's page with
    ``notice``; refused, the page again with the message under the error's status.

    Raises:
        UnknownDeviceError: no such device (a 404 page).
    """
    try:
        work()
    except UnknownDeviceError:
        raise
    except ApiError as err:
        typed = {name: action.form.get(name) or "" for name in ("hostname", "version", "reason")}
        return _device_page(
            request, action.session, device_id, status=err.status, error=err.detail, values=typed
        )
    return redirect(device_url(device_id), action.session, notice=notice)


@router.post("/devices/{device_id}/assign", response_model=None)
def assign_release(
    device_id: str, request: Request, action: UiAction
) -> HTMLResponse | RedirectResponse:
    """Assign a release to the device (field ``version``; empty: remove the assignment)."""
    device_id = _checked_id(device_id)
    state = server_state(request)
    version = action.form.get("version") or None

    def work() -> object:
        body = _validated(AssignmentRequest, version=version)
        return devices.assign(
            state.db, device_id, body.version, actor=action.session.operator.actor, now=state.now()
        )

    notice = f"release {version} assigned" if version else "assignment removed"
    return _act(request, action, device_id, work, notice)


@router.post("/devices/{device_id}/rename", response_model=None)
def rename_device(
    device_id: str, request: Request, action: UiAction
) -> HTMLResponse | RedirectResponse:
    """Give the device another hostname (field ``hostname``), unique among devices."""
    device_id = _checked_id(device_id)
    state = server_state(request)
    hostname = action.form.get("hostname") or ""

    def work() -> object:
        body = _validated(RenameRequest, hostname=hostname)
        return devices.rename(
            state.db, device_id, body.hostname, actor=action.session.operator.actor, now=state.now()
        )

    return _act(request, action, device_id, work, f"device renamed to {hostname}")


def _change_status(
    change: str, device_id: str, request: Request, action: Action
) -> HTMLResponse | RedirectResponse:
    device_id = _checked_id(device_id)
    state = server_state(request)
    reason = action.form.get("reason") or None

    def work() -> object:
        body = _validated(ReasonRequest, reason=reason)
        if change == "decommission":
            action.form.confirm("confirm", devices.get_device(state.db, device_id)["hostname"])
        return devices.change_status(
            state.db, device_id, change, body.reason,
            actor=action.session.operator.actor, now=state.now(),
        )  # fmt: skip

    return _act(request, action, device_id, work, f"device {_DONE[change]}")


@router.post("/devices/{device_id}/quarantine", response_model=None)
def quarantine(
    device_id: str, request: Request, action: UiAction
) -> HTMLResponse | RedirectResponse:
    """Quarantine the device (optional ``reason``): answered "nothing assigned", skipped by
    rollouts."""
    return _change_status("quarantine", device_id, request, action)


@router.post("/devices/{device_id}/release", response_model=None)
def release(device_id: str, request: Request, action: UiAction) -> HTMLResponse | RedirectResponse:
    """End the device's quarantine (optional ``reason``): its assignment applies again."""
    return _change_status("release", device_id, request, action)


@router.post("/devices/{device_id}/decommission", response_model=None)
def decommission(
    device_id: str, request: Request, action: UiAction
) -> HTMLResponse | RedirectResponse:
    """Decommission the device, confirmed by its hostname typed in ``confirm`` (optional
    ``reason``): its sessions end and its key is refused until it is reinstated."""
    return _change_status("decommission", device_id, request, action)


@router.post("/devices/{device_id}/reinstate", response_model=None)
def reinstate(
    device_id: str, request: Request, action: UiAction
) -> HTMLResponse | RedirectResponse:
    """Let a decommissioned device open sessions with its key again (optional ``reason``)."""
    return _change_status("reinstate", device_id, request, action)
