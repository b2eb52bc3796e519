"""The operator routes: releases, devices and assignments, tokens, the audit trail.

``viewer`` tokens read; ``operator`` tokens also upload, assign, create, list and revoke
enrollment tokens, pre-authorize device keys, and quarantine, release, decommission and
reinstate devices; ``admin`` tokens also create, list and revoke operator tokens.
"""

from __future__ import annotations

import errno
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from server import anchor, audit, devices, enrollment, releases
from server.api.common import (
    Admin,
    DeviceIdPath,
    OperatorRole,
    State,
    Viewer,
    read_body,
    receive_file,
)
from server.auth import (
    Role,
    create_operator_token,
    list_operator_tokens,
    operator_token_expiry,
    revoke_operator_token,
)
from server.errors import ApiError, StorageFullError
from server.schemas import (
    AssignmentRequest,
    EnrollmentTokenRequest,
    OperatorTokenRequest,
    PreauthorizeRequest,
    ReasonRequest,
    RenameRequest,
    parse,
)
from server.settings import iso

router = APIRouter(prefix="/api/v1")

VersionPath = Annotated[str, PathParam(pattern=r"^[^\x00-\x1f\x7f/]{1,128}$")]
TokenIdPath = Annotated[int, PathParam(ge=1, le=2**31 - 1)]


class NewOperatorTokenRequest(OperatorTokenRequest):
    """An operator token's name and role, and its lifetime in seconds (default: the server's
    default lifetime; at most the server's maximum)."""

    expires_in: Annotated[int, Field(ge=1, le=100 * 366 * 86400)] | None = None


MAX_AUDIT_PAGE = 1000


@router.post("/releases", status_code=201, tags=["releases"])
async def upload_release(request: Request, caller: OperatorRole, state: State) -> JSONResponse:
    """Accept a bundle (the request body, streamed) as a release."""
    try:
        # The keyring first: a server that cannot accept any bundle says so before the upload.
        keyring = await run_in_threadpool(releases.load_keyring, state.settings.keyring_dir)
        path = await receive_file(
            request, state.settings.upload_dir, state.settings.max_upload_bytes
        )
        try:
            description = await run_in_threadpool(
                releases.ingest,
                state.db,
                state.blobs,
                keyring,
                path,
                actor=caller.actor,
                now=state.now(),
            )
        finally:
            path.unlink(missing_ok=True)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        state.metrics.uploads.labels(StorageFullError.code).inc()
        raise StorageFullError("no space left for the bundle or its blobs") from err
    except ApiError as err:
        state.metrics.uploads.labels(err.code).inc()
        raise
    state.metrics.uploads.labels("accepted").inc()
    return JSONResponse(description, status_code=201)


@router.get("/releases", tags=["releases"])
def list_releases(_caller: Viewer, state: State) -> dict[str, Any]:
    return {"releases": releases.list_releases(state.db)}


@router.get("/releases/{version}", tags=["releases"])
def get_release(version: VersionPath, _caller: Viewer, state: State) -> dict[str, Any]:
    return releases.get_release(state.db, version)


@router.get("/devices", tags=["devices"])
def list_devices(_caller: Viewer, state: State) -> dict[str, Any]:
    return {"devices": devices.list_devices(state.db)}


@router.get("/devices/{device_id}", tags=["devices"])
def get_device(device_id: DeviceIdPath, _caller: Viewer, state: State) -> dict[str, Any]:
    return devices.get_device(state.db, device_id)


@router.get("/devices/{device_id}/events", tags=["devices"])
def device_events(
    device_id: DeviceIdPath,
    _caller: Viewer,
    state: State,
    limit: Annotated[int, Query(ge=1, le=MAX_AUDIT_PAGE)] = 20,
) -> dict[str, Any]:
    """The device's newest audit entries (its events, what was done to it), oldest first."""
    return {"entries": devices.recent_entries(state.db, device_id, limit)}


@router.post("/devices/{device_id}/rename", tags=["devices"])
async def rename_device(
    device_id: DeviceIdPath, request: Request, caller: OperatorRole, state: State
) -> dict[str, Any]:
    """Give a device another hostname (``{"hostname": ...}``), unique among devices."""
    body = parse(RenameRequest, await read_body(request))
    return await run_in_threadpool(
        devices.rename, state.db, device_id, body.hostname, actor=caller.actor, now=state.now()
    )


@router.delete("/devices/{device_id}", tags=["devices"])
def remove_device(device_id: DeviceIdPath, caller: OperatorRole, state: State) -> dict[str, Any]:
    """Remove a device's record, sessions and pre-authorization: it must be admitted again to
    come back (decommission it to refuse its key instead)."""
    return devices.remove(state.db, device_id, actor=caller.actor, now=state.now())


@router.post("/devices/{device_id}/assignment", tags=["devices"])
async def assign(
    device_id: DeviceIdPath, request: Request, caller: OperatorRole, state: State
) -> dict[str, Any]:
    """Assign a release to a device (``{"version": null}`` removes the assignment)."""
    body = parse(AssignmentRequest, await read_body(request))
    return await run_in_threadpool(
        devices.assign, state.db, device_id, body.version, actor=caller.actor, now=state.now()
    )


async def _change_status(
    change: str, device_id: str, request: Request, caller: OperatorRole, state: State
) -> dict[str, Any]:
    body = parse(ReasonRequest, await read_body(request))
    return await run_in_threadpool(
        devices.change_status,
        state.db,
        device_id,
        change,
        body.reason,
        actor=caller.actor,
        now=state.now(),
    )


@router.post("/devices/{device_id}/quarantine", tags=["devices"])
async def quarantine(
    device_id: DeviceIdPath, request: Request, caller: OperatorRole, state: State
) -> dict[str, Any]:
    """Quarantine a device: it checks in and reports, is answered "nothing assigned", and
    rollouts skip it (``{"reason": ...}`` optional)."""
    return await _change_status("quarantine", device_id, request, caller, state)


@router.post("/devices/{device_id}/release", tags=["devices"])
async def release_device(
    device_id: DeviceIdPath, request: Request, caller: OperatorRole, state: State
) -> dict[str, Any]:
    """End a device's quarantine: its assignment applies again."""
    return await _change_status("release", device_id, request, caller, state)


@router.post("/devices/{device_id}/decommission", tags=["devices"])
async def decommission(
    device_id: DeviceIdPath, request: Request, caller: OperatorRole, state: State
) -> dict[str, Any]:
    """Decommission a device: its sessions end and its key is refused until it is reinstated."""
    return await _change_status("decommission", device_id, request, caller, state)


@router.post("/devices/{device_id}/reinstate", tags=["devices"])
async def reinstate(
    device_id: DeviceIdPath, request: Request, caller: OperatorRole, state: State
) -> dict[str, Any]:
    """Let a decommissioned device open sessions with its key again."""
    return await _change_status("reinstate", device_id, request, caller, state)


@router.post("/preauthorized-keys", status_code=201, tags=["devices"])
async def preauthorize(request: Request, caller: OperatorRole, state: State) -> dict[str, Any]:
    """Let the device with this public key enroll without a token."""
    body = parse(PreauthorizeRequest, await read_body(request))
    device_id = await run_in_threadpool(
        enrollment.preauthorize, state.db, body.public_key, actor=caller.actor, now=state.now()
    )
    return {"device_id": device_id}


@router.post("/enrollment-tokens", status_code=201, tags=["tokens"])
async def create_enrollment_token(
    request: Request, caller: OperatorRole, state: State
) -> dict[str, Any]:
    """A new enrollment token, shown only in this answer."""
    body = parse(EnrollmentTokenRequest, await read_body(request))
    created = await run_in_threadpool(
        enrollment.create_enrollment_token,
        state.db,
        uses=body.uses,
        expires_in_s=body.expires_in,
        actor=caller.actor,
        now=state.now(),
    )
    return {
        "token": created.token,
        "uses": created.uses,
        "expires": iso(created.expires) if created.expires else None,
    }


@router.get("/enrollment-tokens", tags=["tokens"])
def list_enrollment_tokens(_caller: OperatorRole, state: State) -> dict[str, Any]:
    """Every enrollment token, without its secret."""
    return {"enrollment_tokens": enrollment.list_enrollment_tokens(state.db)}


@router.post("/enrollment-tokens/{token_id}/revoke", tags=["tokens"])
def revoke_enrollment_token(
    token_id: TokenIdPath, caller: OperatorRole, state: State
) -> dict[str, Any]:
    """Revoke an enrollment token at once: it admits no more devices."""
    return enrollment.revoke_enrollment_token(
        state.db, token_id, actor=caller.actor, now=state.now()
    )


@router.post("/operator-tokens", status_code=201, tags=["tokens"])
async def create_token(request: Request, caller: Admin, state: State) -> dict[str, Any]:
    """A new operator token, shown only in this answer."""
    body = parse(NewOperatorTokenRequest, await read_body(request))
    role = Role.parse(body.role)
    now = state.now()
    limits = state.settings.credentials
    expires = operator_token_expiry(
        now,
        body.expires_in,
        default_s=limits.operator_token_ttl_s,
        max_s=limits.operator_token_max_ttl_s,
    )
    token = await run_in_threadpool(
        lambda: create_operator_token(
            state.db, name=body.name, role=role, created_by=caller.actor, now=now, expires=expires
        )
    )
    return {"token": token, "name": body.name, "role": role.label, "expires": iso(expires)}


@router.get("/operator-tokens", tags=["tokens"])
def list_tokens(_caller: Admin, state: State) -> dict[str, Any]:
    """Every operator token, without its secret."""
    return {"operator_tokens": list_operator_tokens(state.db, state.now())}


@router.post("/operator-tokens/{token_id}/revoke", tags=["tokens"])
def revoke_token(token_id: TokenIdPath, caller: Admin, state: State) -> dict[str, Any]:
    """Revoke an operator token at once; the last valid admin token cannot be revoked."""
    return revoke_operator_token(state.db, token_id, actor=caller.actor, now=state.now())


@router.get("/audit/head", tags=["audit"])
def audit_head(_caller: Viewer, state: State) -> dict[str, Any]:
    """The trail's head signed with the server key now (and kept as an anchor): export it
    somewhere else to catch later rewrites (``fleet audit head --out``); ``head`` is null for
    an empty trail."""
    head = anchor.anchor_head(state.db, state.server_key, state.now())
    return {"head": None if head is None else head.to_dict()}


@router.get("/audit/anchors", tags=["audit"])
def audit_anchors(_caller: Viewer, state: State) -> dict[str, Any]:
    """Every signed head the server kept, oldest first (``fleet audit verify`` checks them)."""
    return {"anchors": [head.to_dict() for head in anchor.stored_anchors(state.db)]}


@router.get("/audit", tags=["audit"])
def list_audit(
    _caller: Viewer,
    state: State,
    after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_AUDIT_PAGE)] = 100,
    action: Annotated[list[str] | None, Query()] = None,
    subject: str | None = None,
    actor: str | None = None,
) -> dict[str, Any]:
    """Audit entries after ``after``, oldest first; ``next_after`` pages on (null at the end).

    Only entries whose action is an ``action`` or under one (``rollout``: ``rollout.halted``;
    repeat for more), about ``subject`` and by ``actor``, when given."""
    match = audit.AuditFilter.checked(action or (), subject, actor)
    with state.db.read() as session:
        page = audit.entries(session, after=after, limit=limit, match=match)
    return {
        "entries": [entry.to_dict() for entry in page],
        "next_after": page[-1].seq if len(page) == limit else None,
    }
