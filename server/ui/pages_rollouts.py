"""The console's rollout pages: the list, the form that starts one, and one rollout with its
transitions (pause, resume with the acknowledgment of its failed devices, abort, roll back).

Nothing here decides anything: a rollout is started from the API's own body model
(:class:`server.schemas.RolloutStartRequest`, through :func:`server.schemas.parse`) and
:func:`server.rollouts.start`; device references are read by the ``fleet`` commands' resolver
(:func:`server.cli.devices.resolve_device`); transitions are :func:`server.rollouts.transition`,
audited with the signed-in operator as actor. The pages show what :func:`server.rollouts.status`
and :func:`server.rollouts.get` answer, the failure rule worded as ``fleet rollout status``
words it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from sqlalchemy import func, select

from server import devices, releases, rollouts
from server.api.common import server_state
from server.auth import Role
from server.cli.devices import DeviceReferenceError, resolve_device
from server.database import Database
from server.errors import ApiError, InvalidRequestError
from server.models import Device, Rollout, RolloutDevice
from server.rollout_text import (
    duration_text,
    failure_rule_text,
    selector_text,
    skipped_text,
    stage_text,
    waiting_text,
    windows_text,
)
from server.schemas import (
    DEFAULT_INSTALL_DEADLINE_S,
    DEFAULT_MAX_FAILURE_RATE,
    DEFAULT_OFFLINE_AFTER_S,
    DEFAULT_SOAK_S,
    DEFAULT_STAGES,
    ReasonRequest,
    RolloutStartRequest,
    parse,
)
from server.ui.common import UiAction, UiPage, redirect, render
from server.ui.forms import Form
from server.ui.sessions import UiSession

router = APIRouter(prefix="/ui")

RolloutIdPath = Annotated[int, PathParam(ge=1, le=2**31 - 1)]
Transition = Literal["pause", "resume", "abort", "rollback"]
# A rollout of a whole fleet has as many members as devices: the page lists the failed and
# pending ones first and at most this many in all (the counts above the table are complete).
MEMBERS_SHOWN = 500
PAST_SHOWN = 20  # ended rollouts listed unless every one is asked for
DONE = {"pause": "paused", "resume": "resumed", "abort": "aborted", "rollback": "rolled back"}

# The form's fields, in the order a message may name them: the API's field (as the schema and
# server.rollouts name it in their messages) and the label the form shows.
FIELDS: tuple[tuple[str, str, str], ...] = (
    # (form field, prefix of a message about it, label)
    ("version", "version", "Release"),
    ("canary", "canary", "Canary devices"),
    ("devices", "device_ids", "Limit to devices"),
    ("role", "selector.role", "Role"),
    ("tags", "selector.tags", "Tags"),
    ("stages", "stages", "Stages"),
    ("soak_s", "soak", "Soak per stage"),
    ("max_failure_rate", "max", "Failure threshold"),
    ("install_deadline_s", "install", "Install deadline"),
    ("offline_after_s", "offline", "Offline after"),
    ("allow_empty", "the rollout would assign no device", "Start even if empty"),
)
_SEPARATORS = re.compile(r"[\s,]+")
_INTEGER = re.compile(r"-?[0-9]{1,30}")


def references(text: str | None) -> list[str]:
    """Device references or tags written one per line or separated by commas or spaces."""
    return [part for part in _SEPARATORS.split(text or "") if part]


def _integer(text: str | None) -> int | str | None:
    """A whole number as a number; anything else as typed, for the schema to refuse by name."""
    if not text:
        return None
    return int(text) if _INTEGER.fullmatch(text) else text


def _fraction(text: str | None) -> float | int | str | None:
    if not text:
        return None
    number = _integer(text)
    if isinstance(number, int):
        return number
    try:
        return float(text)
    except ValueError:
        return text


def start_document(form: Mapping[str, str], fleet: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The API's rollout body (``POST /api/v1/rollouts``) for what the form holds: device
    references resolved against ``fleet`` (the devices' listing) as ``fleet rollout start``
    resolves them; numbers passed as typed when they are not numbers, so that the schema, not
    this function, says what is wrong with them.

    Raises:
        InvalidRequestError: a device reference that names no device, or several.
    """
    document: dict[str, Any] = {"version": form.get("version", "")}
    for field, api_field in (("canary", "canary"), ("devices", "device_ids")):
        named = []
        for reference in references(form.get(field)):
            try:
                named.append(resolve_device(fleet, reference))
            except DeviceReferenceError as err:
                raise InvalidRequestError(f"{api_field}: {err}") from None
        if named:
            document[api_field] = named
    role, tags = form.get("role") or None, references(form.get("tags"))
    if role or tags:
        document["selector"] = {"role": role, "tags": tags}
    stages = form.get("stages")
    if stages:
        document["stages"] = [
            _integer(part.strip().removesuffix("%")) for part in stages.split(",")
        ]
    for field in ("soak_s", "install_deadline_s", "offline_after_s"):
        value = _integer(form.get(field))
        if value is not None:
            document[field] = value
    rate = _fraction(form.get("max_failure_rate"))
    if rate is not None:
        document["max_failure_rate"] = rate
    document["rollback_on_halt"] = form.get("rollback_on_halt") is not None
    document["allow_empty"] = form.get("allow_empty") is not None
    return document


def field_of(message: str) -> tuple[str | None, str]:
    """The form field a refusal is about (``None``: the form as a whole), and the message
    prefixed with that field's label."""
    for field, prefix, label in FIELDS:
        if message.startswith(prefix):
            return field, f"{label}: {message}"
    return None, message


DEFAULT_VALUES = {
    "stages": ",".join(str(p) for p in DEFAULT_STAGES),
    "soak_s": str(DEFAULT_SOAK_S),
    "max_failure_rate": str(DEFAULT_MAX_FAILURE_RATE),
    "install_deadline_s": str(DEFAULT_INSTALL_DEADLINE_S),
    "offline_after_s": str(DEFAULT_OFFLINE_AFTER_S),
    "rollback_on_halt": "on",
}
FORM_FIELDS = (
    "version", "canary", "devices", "role", "tags", "stages", "soak_s", "max_failure_rate",
    "install_deadline_s", "offline_after_s", "rollback_on_halt", "allow_empty",
)  # fmt: skip


def _form_values(form: Form) -> dict[str, str]:
    values = {}
    for name in FORM_FIELDS:
        value = form.get(name)
        if value is not None:
            values[name] = value
    return values


def _new_form(
    request: Request,
    session: UiSession,
    values: Mapping[str, str],
    *,
    error: str | None = None,
    status: int = 200,
) -> Response:
    state = server_state(request)
    versions = [r["version"] for r in reversed(releases.list_releases(state.db))]
    error_field, message = field_of(error) if error is not None else (None, None)
    return render(
        request, session, "rollout_new.html", status=status, nav="rollouts",
        versions=versions, values=values, error=message, error_field=error_field,
    )  # fmt: skip


def listed_rollouts(db: Database, shown: int | None) -> tuple[list[int], int]:
    """The ids of the rollouts to list, newest first: the running or paused ones and the
    ``shown`` newest others (None: all); and how many rollouts there are in all."""
    with db.read() as session:
        total = session.scalar(select(func.count()).select_from(Rollout)) or 0
        query = select(Rollout.id).order_by(Rollout.id.desc())
        if shown is None:
            return list(session.scalars(query)), total
        active = set(session.scalars(query.where(Rollout.state.in_(rollouts.ACTIVE))))
        newest = set(
            session.scalars(query.where(Rollout.state.not_in(rollouts.ACTIVE)).limit(shown))
        )
        return sorted(active | newest, reverse=True), total


@router.get("/rollouts")
def rollout_list(request: Request, session: UiPage, every: bool = False) -> Response:
    """The rollouts, newest first: the running or paused one, then the ``PAST_SHOWN`` newest
    others (``?every=true``: all of them). Each is the summary of the API's view of it (its
    members counted, :func:`server.rollouts.summaries`), so a fleet's whole history is read
    only when asked for, and never member by member."""
    state = server_state(request)
    ids, total = listed_rollouts(state.db, None if every else PAST_SHOWN)
    views = rollouts.summaries(state.db, ids)
    active = [r for r in views if r["state"] in rollouts.ACTIVE]
    past = [r for r in views if r["state"] not in rollouts.ACTIVE]
    return render(
        request, session, "rollouts.html", nav="rollouts",
        active=active, past=past, hidden=total - len(views),
    )  # fmt: skip


@router.get("/rollouts/new")
def new_rollout(request: Request, session: UiPage) -> Response:
    """The form that starts a rollout (operators)."""
    session.operator.require(Role.OPERATOR)
    return _new_form(request, session, DEFAULT_VALUES)


@router.post("/rollouts/new")
def start_rollout(request: Request, action: UiAction) -> Response:
    """Start a rollout as ``POST /api/v1/rollouts`` does; a refusal shows the form again with
    what was typed and the message."""
    state = server_state(request)
    values = _form_values(action.form)
    try:
        named = references(values.get("canary")) + references(values.get("devices"))
        fleet = devices.list_devices(state.db) if named else []
        body = parse(RolloutStartRequest, json.dumps(start_document(values, fleet)).encode())
        rollouts.evaluate(state.db, state.now())
        started = rollouts.start(
            state.db,
            rollouts.RolloutRequest.from_body(body),
            actor=action.session.operator.actor,
            now=state.now(),
        )
    except ApiError as err:
        return _new_form(request, action.session, values, error=err.detail, status=err.status)
    return redirect(
        f"/ui/rollouts/{started['id']}",
        action.session,
        notice=f"rollout {started['id']} of {started['version']} started",
    )


@dataclass(frozen=True)
class RolloutPage:
    """What the rollout page shows besides the API's view of the rollout."""

    members: list[dict[str, Any]]
    hidden_members: int
    unacknowledged: list[dict[str, Any]]
    failure_rule: str
    selector: str | None
    skipped: str | None
    windows: str | None = None  # the rollout's maintenance windows; None: any time
    waiting: str | None = None  # how many pending devices wait for a window


_OUTCOME_ORDER = {"failed": 0, "pending": 1, "succeeded": 2}


def rollout_page(view: Mapping[str, Any], hostnames: Mapping[str, str]) -> RolloutPage:
    """The members to list (failed first, then pending), the failed devices a resume must
    acknowledge (those not acknowledged yet), and the failure rule's line."""
    acknowledged = set(view["acknowledged"])
    members = sorted(view["devices"], key=lambda d: (_OUTCOME_ORDER.get(d["outcome"], 3), d["id"]))
    shown = [{**m, "hostname": hostnames.get(m["id"])} for m in members[:MEMBERS_SHOWN]]
    unacknowledged = [
        {**m, "hostname": hostnames.get(m["id"])}
        for m in members
        if m["outcome"] == rollouts.Outcome.FAILED and m["id"] not in acknowledged
    ]
    return RolloutPage(
        members=shown,
        hidden_members=len(members) - len(shown),
        unacknowledged=unacknowledged,
        failure_rule=failure_rule_text(view["failure_rule"]),
        selector=selector_text(view["selector"]),
        skipped=skipped_text(len(view["skipped_offline"]), view["offline_after_s"])
        if view["skipped_offline"]
        else None,
        windows=windows_text(view.get("windows") or []),
        waiting=waiting_text(view["waiting_window"]) if view.get("waiting_window") else None,
    )


def member_hostnames(db: Database, rollout_id: int) -> dict[str, str]:
    """The hostname of each device of the rollout, by id."""
    with db.read() as session:
        rows = session.execute(
            select(Device.id, Device.hostname)
            .join(RolloutDevice, RolloutDevice.device_id == Device.id)
            .where(RolloutDevice.rollout_id == rollout_id)
        )
        return {device_id: hostname for device_id, hostname in rows}


def _rollout_page(
    request: Request,
    session: UiSession,
    rollout_id: int,
    *,
    error: str | None = None,
    status: int = 200,
) -> Response:
    state = server_state(request)
    view = rollouts.get(state.db, rollout_id, state.now())
    hostnames = member_hostnames(state.db, rollout_id)
    return render(
        request, session, "rollout.html", status=status, nav="rollouts",
        rollout=view, page=rollout_page(view, hostnames), error=error,
        duration_text=duration_text, stage_text=stage_text,
    )  # fmt: skip


@router.get("/rollouts/{rollout_id}")
def rollout_detail(request: Request, session: UiPage, rollout_id: RolloutIdPath) -> Response:
    """One rollout: its stages' progress, the failure rule, its members and, for operators,
    the transitions its state allows."""
    return _rollout_page(request, session, rollout_id)


@router.post("/rollouts/{rollout_id}/{change}")
def change_rollout(
    request: Request, action: UiAction, rollout_id: RolloutIdPath, change: Transition
) -> Response:
    """Pause, resume, abort or roll back, as ``POST /api/v1/rollouts/{id}/{action}`` does.

    A resume acknowledges the failed devices the operator ticked (they stop counting against
    the failure rule): a failed device not ticked (it failed after the page was shown, say)
    refuses the resume, naming it (:func:`server.rollouts.transition`)."""
    state = server_state(request)
    reason_text = action.form.get("reason")
    try:
        reason = (
            parse(ReasonRequest, json.dumps({"reason": reason_text}).encode()).reason
            if reason_text
            else None
        )
        rollouts.evaluate(state.db, state.now())
        rollouts.transition(
            state.db, rollout_id, change,
            actor=action.session.operator.actor, now=state.now(), reason=reason,
            acknowledge=action.form.getall("acknowledge") if change == "resume" else None,
        )  # fmt: skip
    except ApiError as err:
        return _rollout_page(
            request, action.session, rollout_id, error=err.detail, status=err.status
        )
    return redirect(
        f"/ui/rollouts/{rollout_id}", action.session, notice=f"rollout {rollout_id} {DONE[change]}"
    )
