"""``/healthz`` for load balancers and ``/metrics`` for Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.common import State
from server.errors import DatabaseUnavailableError
from server.metrics import scrape_admits_devices

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(state: State) -> dict[str, str]:
    """200 when the database answers, 503 otherwise."""
    if not state.db.ping():
        raise DatabaseUnavailableError("the database did not answer")
    return {"status": "ok"}


# Prometheus's text format (its errors are JSON like every other route's)
@router.get(
    "/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}
)
def metrics(request: Request, state: State) -> Response:
    """The fleet-wide series; with the scrape token, the per-device ones too (server/metrics.py)."""
    per_device = scrape_admits_devices(
        request.headers.get("authorization"), state.settings.metrics_token
    )
    return Response(state.metrics.exposition(per_device=per_device), media_type=CONTENT_TYPE_LATEST)
