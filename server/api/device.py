"""The device-facing routes: exactly docs/device-protocol.md, version 1."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from server import devices, enrollment
from server.api.common import DeviceIdPath, DeviceRequest, State, read_body
from server.devices import NotModified
from server.schemas import (
    CheckinRequest,
    EnrollRequest,
    EventsRequest,
    Heartbeat,
    Policy,
    SessionRequest,
    parse,
)
from server.settings import CHALLENGE_TTL_S, SESSION_TTL_S

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])


@router.post("/enroll")
async def enroll(request: Request, state: State) -> dict[str, Any]:
    """Admit a device by enrollment token or pre-authorized key (idempotent per key)."""
    body = parse(EnrollRequest, await read_body(request))
    result = await run_in_threadpool(enrollment.enroll, state.db, body, state.now())
    return {
        "device_id": result.device_id,
        "server_keys": [enrollment.raw_public_key_hex(state.server_key.public_key)],
    }


@router.post("/{device_id}/challenge")
def challenge(device_id: DeviceIdPath, state: State) -> dict[str, Any]:
    """A single-use challenge to sign for a session."""
    key = enrollment.challenge_key(state.server_key)
    value = enrollment.issue_challenge(state.db, device_id, state.now(), key)
    return {"challenge": value, "expires_in": CHALLENGE_TTL_S}


@router.post("/{device_id}/session")
async def session(device_id: DeviceIdPath, request: Request, state: State) -> dict[str, Any]:
    """Exchange a signed challenge for a session token."""
    body = parse(SessionRequest, await read_body(request))
    token = await run_in_threadpool(
        enrollment.open_session, state.db, device_id, body.challenge, body.signature,
        state.now(), enrollment.challenge_key(state.server_key),
        state.settings.credentials.max_device_sessions,
    )  # fmt: skip
    return {"token": token, "expires_in": SESSION_TTL_S}


@router.post("/{device_id}/checkin")
def checkin(call: DeviceRequest, request: Request, state: State) -> Response:
    """The device's assignment, signed and echoing its nonce; 304 if its ETag is current."""
    body = parse(CheckinRequest, call.body)
    result = devices.check_in(
        state.db,
        call.device_id,
        body.nonce,
        request.headers.get("if-none-match"),
        state.server_key,
        state.now(),
        state.settings.active_checkin_interval_s,
    )
    if isinstance(result, NotModified):
        return Response(status_code=304, headers={"ETag": f'"{result.etag}"'})
    return JSONResponse(result.to_dict(), headers={"ETag": f'"{result.etag}"'})


@router.post("/{device_id}/heartbeat", status_code=204)
def heartbeat(call: DeviceRequest, state: State) -> Response:
    """Keep the device's latest heartbeat."""
    policy = Policy(metrics_networks=state.settings.metrics_networks)
    body = parse(Heartbeat, call.body, policy)  # refused whole, before anything is stored
    devices.record_heartbeat(state.db, call.device_id, body, state.now())
    return Response(status_code=204)


# Event names are the device's to choose; a metric label is not. Only the subjects of the
# updater's event names (docs/device-protocol.md, updater/log.py) become label values, so a
# device cannot create new series: everything else is counted as "other".
EVENT_SUBJECTS = frozenset(
    {"install", "boot_check", "health", "slot", "rollback", "update", "updater", "daemon",
     "download", "server", "config", "state", "outbox", "identity", "metrics"}
)  # fmt: skip


def event_label(event: str) -> str:
    """The label an event is counted under: its subject (``install.failed`` → ``install``)."""
    subject = event.partition(".")[0]
    return subject if subject in EVENT_SUBJECTS else "other"


@router.post("/{device_id}/events", status_code=204)
def events(call: DeviceRequest, state: State) -> Response:
    """Store the device's events (resends ignored by seq) in the audit trail."""
    body = parse(EventsRequest, call.body)
    stored = devices.record_events(state.db, call.device_id, body.events, state.now())
    for event in stored:
        state.metrics.events.labels(event_label(event.event)).inc()
        state.metrics.count_outcome(call.device_id, event.event)
    return Response(status_code=204)
