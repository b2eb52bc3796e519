"""The emergency stop from the console: ``POST /ui/emergency-stop`` (reason, and STOP typed
to confirm) and ``POST /ui/emergency-stop/clear`` (CLEAR typed). Operators and admins only;
each is an audit entry made by server.rollouts with the operator's name."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server import rollouts
from server.api.common import server_state
from server.errors import InvalidRequestError
from server.schemas import one_line
from server.ui.common import HOME_PATH, UiAction, local_ui_path, redirect

STOP_WORD = "STOP"
CLEAR_WORD = "CLEAR"
MAX_REASON_CHARS = 128  # as the API's reason (server/schemas.py)

router = APIRouter()


@router.post("/ui/emergency-stop")
def emergency_stop(request: Request, posted: UiAction) -> Response:
    """Pause every rollout and withdraw every uncommitted assignment; back to the page.

    Raises:
        ConfirmationError: ``confirm`` is not STOP (nothing was done).
        InvalidRequestError: no reason, one longer than a line of 128 characters, or one
            with a character the API refuses in free text (a bidi override, say).
    """
    form = posted.form
    reason = form.require("reason", "reason")
    if len(reason) > MAX_REASON_CHARS:
        raise InvalidRequestError(f"reason: one line of at most {MAX_REASON_CHARS} characters")
    try:
        one_line(reason)
    except ValueError as err:
        raise InvalidRequestError(f"reason: {err}") from None
    form.confirm("confirm", STOP_WORD)
    state = server_state(request)
    actor = posted.session.operator.actor
    rollouts.emergency_stop(state.db, reason, actor=actor, now=state.now())
    back = local_ui_path(form.get("back")) or HOME_PATH
    return redirect(back, posted.session, "Emergency stop is on: every rollout is paused.")


@router.post("/ui/emergency-stop/clear")
def clear_emergency_stop(request: Request, posted: UiAction) -> Response:
    """Turn the emergency stop off (paused rollouts stay paused); back to the page.

    Raises:
        ConfirmationError: ``confirm`` is not CLEAR (nothing was done).
    """
    posted.form.confirm("confirm", CLEAR_WORD)
    state = server_state(request)
    rollouts.clear_emergency_stop(state.db, actor=posted.session.operator.actor, now=state.now())
    back = local_ui_path(posted.form.get("back")) or HOME_PATH
    return redirect(
        back, posted.session, "Emergency stop cleared; paused rollouts stay paused until resumed."
    )
