"""``/healthz`` for load balancers and ``/metrics`` for Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.common import State
from server.errors import DatabaseUnavailableError

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(state: State) -> dict[str, str]:
    """200 when the database answers, 503 otherwise."""
    if not state.db.ping():
        raise DatabaseUnavailableError("the database did not answer")
    return {"status": "ok"}


@router.get("/metrics")
def metrics(state: State) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
