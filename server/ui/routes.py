"""``ui_router``: every route of the web console, for server/app.py to include. Each page
module has its own ``router``; this module only gathers them."""

from __future__ import annotations

from fastapi import APIRouter

from server.ui import (
    feed,
    pages_control,
    pages_fleet,
    pages_login,
    pages_records,
    pages_rollouts,
    static,
)


def ui_router() -> APIRouter:
    """The console's routes (left out of the API's OpenAPI description)."""
    router = APIRouter(include_in_schema=False)
    router.include_router(static.router, include_in_schema=False)
    router.include_router(pages_login.router, include_in_schema=False)
    router.include_router(pages_control.router, include_in_schema=False)
    router.include_router(pages_fleet.router, include_in_schema=False)
    router.include_router(pages_rollouts.router, include_in_schema=False)
    router.include_router(pages_records.router, include_in_schema=False)
    router.include_router(feed.router, include_in_schema=False)
    return router
