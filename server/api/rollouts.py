"""The rollout routes: start, watch, pause, resume, abort, roll back; the emergency stop.

Reading needs a ``viewer`` token, every transition an ``operator`` token; each transition is an
audit entry. Every call evaluates the running rollouts first (as the app's background task also
does every few seconds), so what it answers is current.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from server import rollouts
from server.api.common import OperatorRole, State, Viewer, read_body
from server.schemas import ReasonRequest, ResumeRequest, RolloutStartRequest, parse

router = APIRouter(prefix="/api/v1", tags=["rollouts"])

RolloutIdPath = Annotated[int, PathParam(ge=1, le=2**31 - 1)]


async def _reason(request: Request) -> str | None:
    body = await read_body(request)
    return parse(ReasonRequest, body).reason if body.strip() else None


async def _evaluate(state: State) -> None:
    await run_in_threadpool(rollouts.evaluate, state.db, state.now())


@router.post("/rollouts", status_code=201)
async def start_rollout(request: Request, caller: OperatorRole, state: State) -> dict[str, Any]:
    """Start a staged rollout of a release."""
    body = parse(RolloutStartRequest, await read_body(request))
    plan = rollouts.RolloutRequest.from_body(body)
    await _evaluate(state)
    return await run_in_threadpool(
        rollouts.start, state.db, plan, actor=caller.actor, now=state.now()
    )


@router.get("/rollouts")
async def list_rollouts(_caller: Viewer, state: State) -> dict[str, Any]:
    """Every rollout, newest first, and the emergency stop."""
    await _evaluate(state)
    return await run_in_threadpool(rollouts.status, state.db, state.now())


@router.post("/rollouts/evaluate")
async def evaluate(_caller: OperatorRole, state: State) -> dict[str, Any]:
    """Evaluate now (the background task does it every few seconds anyway)."""
    await _evaluate(state)
    return await run_in_threadpool(rollouts.status, state.db, state.now())


@router.get("/rollouts/{rollout_id}")
async def get_rollout(rollout_id: RolloutIdPath, _caller: Viewer, state: State) -> dict[str, Any]:
    await _evaluate(state)
    return await run_in_threadpool(rollouts.get, state.db, rollout_id, state.now())


@router.post("/rollouts/{rollout_id}/{action}")
async def transition(
    rollout_id: RolloutIdPath,
    action: Literal["pause", "resume", "abort", "rollback"],
    request: Request,
    caller: OperatorRole,
    state: State,
) -> dict[str, Any]:
    """Pause, resume, abort or roll back a rollout. A resume's body may name the failed devices
    it acknowledges (``acknowledge``): a failed device not named refuses it (409)."""
    if action == "resume":
        body = await read_body(request)
        resume = parse(ResumeRequest, body) if body.strip() else ResumeRequest()
        reason, acknowledge = resume.reason, resume.acknowledge
    else:
        reason, acknowledge = await _reason(request), None
    await _evaluate(state)
    return await run_in_threadpool(
        rollouts.transition, state.db, rollout_id, action,
        actor=caller.actor, now=state.now(), reason=reason, acknowledge=acknowledge,
    )  # fmt: skip


@router.post("/emergency-stop")
async def emergency_stop(request: Request, caller: OperatorRole, state: State) -> dict[str, Any]:
    """Pause every rollout and withdraw every uncommitted rollout assignment, at once."""
    reason = await _reason(request) or "emergency stop"
    return await run_in_threadpool(
        lambda: rollouts.emergency_stop(state.db, reason, actor=caller.actor, now=state.now())
    )


@router.post("/emergency-stop/clear")
async def clear_emergency_stop(caller: OperatorRole, state: State) -> dict[str, Any]:
    """Turn the emergency stop off (paused rollouts stay paused until resumed)."""
    return await run_in_threadpool(
        lambda: rollouts.clear_emergency_stop(state.db, actor=caller.actor, now=state.now())
    )
