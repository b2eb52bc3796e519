"""``create_app``: the release server as an ASGI application.

Creating the app prepares the data directory, migrates the database to the newest schema and
loads (on first start: generates) the server's signing key. The process keeps nothing else: any
number of processes with the same settings can serve the same fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import FastAPI
from starlette.types import ASGIApp

from server import rollouts
from server.anchor import ANCHOR_INTERVAL_S, anchor_every
from server.api import blobs as blob_routes
from server.api import device, health, keys, operator, sd
from server.api import rollouts as rollout_routes
from server.api.common import ServerState, install_error_handlers
from server.blobs import BlobStore
from server.database import Database, finish_in_thread
from server.datadir import private_mkdir, secure_data_dir, sweep_leftovers
from server.errors import ServerKeyError
from server.headers import SecurityHeadersMiddleware
from server.metrics import RequestMetricsMiddleware, ServerMetrics
from server.settings import Settings
from server.timeouts import BodyDeadlineMiddleware
from server.ui.common import install_error_pages
from server.ui.feed import FleetFeed
from server.ui.routes import ui_router
from server.upload_limit import UploadLimitMiddleware
from signing.errors import KeyFileError
from signing.keys import SigningKey, generate_key, load_private_key

log = logging.getLogger("server")
# How often each process evaluates the running rollouts (they serialize in the database).
ROLLOUT_INTERVAL_S = 5.0


def load_server_key(path: Path) -> SigningKey:
    """The server's assignment signing key, generated (mode 0600) if there is none yet.

    Several processes starting at once agree on one key: a second generation fails because the
    file exists, and that process loads the first one's key.

    Raises:
        ServerKeyError: the key file exists but cannot be read as an Ed25519 key.
    """
    if not path.exists():
        try:
            key = generate_key(path)
            log.info("generated server key %s at %s", key.key_id, path)
            return key
        except KeyFileError:
            pass
    try:
        return load_private_key(path)
    except KeyFileError as err:
        raise ServerKeyError(f"server key: {err}") from err


def _check_leftover_age(settings: Settings) -> None:
    limits = settings.limits
    bound = limits.upload_idle_bound_s
    if bound is None or limits.leftover_age_s <= bound:
        log.warning(
            "the leftover age (%ss) is not longer than a live upload may leave its file "
            "untouched (%s): a slow upload may be swept away; raise the age or the minimum "
            "body rate",
            limits.leftover_age_s,
            "without a minimum body rate, any time" if bound is None else f"{bound:.0f}s",
        )


async def _sweep_periodically(state: ServerState) -> None:
    """Remove the leftovers of interrupted writes (server/datadir.py) untouched for the
    configured age, checking four times per age (at least every 10 minutes), until cancelled."""
    limits = state.settings.limits
    interval_s = min(limits.leftover_age_s / 4, 600.0)
    while True:
        await asyncio.sleep(interval_s)
        try:
            await finish_in_thread(
                partial(sweep_leftovers, min_age_s=limits.leftover_age_s),
                state.blobs,
                state.settings.upload_dir,
            )
        except Exception:
            log.exception("leftover sweep failed")


async def _evaluate_rollouts(state: ServerState, interval_s: float) -> None:
    """Evaluate the rollouts every ``interval_s`` until cancelled; a failed evaluation is
    logged and retried at the next tick (it changed nothing: it is one transaction)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await finish_in_thread(rollouts.evaluate, state.db, state.now())
        except Exception:
            log.exception("rollout evaluation failed")


class ServerApp(FastAPI):
    """The FastAPI application with :class:`SecurityHeadersMiddleware` outside everything:
    Starlette's error middleware (the answer to an unexpected error) is otherwise outermost,
    and a 500 would go out without the headers."""

    def build_middleware_stack(self) -> ASGIApp:
        docs = (self.docs_url, self.redoc_url, self.swagger_ui_oauth2_redirect_url)
        pages = [path for path in docs if path] if self.docs_url else []
        return SecurityHeadersMiddleware(super().build_middleware_stack(), docs_paths=pages)


def create_app(
    settings: Settings,
    *,
    rollout_interval_s: float | None = ROLLOUT_INTERVAL_S,
    anchor_interval_s: float = ANCHOR_INTERVAL_S,
) -> FastAPI:
    """The server application for ``settings``, with its database migrated; with
    ``rollout_interval_s``, a background task evaluates the rollouts that often; another
    signs the audit trail's head every ``anchor_interval_s`` (:mod:`server.anchor`).

    Raises:
        MigrationError: the database is unreachable or cannot be migrated.
        ServerKeyError: the server key exists but is unusable.
    """
    private_mkdir(settings.data_dir)
    secure_data_dir(settings.data_dir)
    _check_leftover_age(settings)
    private_mkdir(settings.upload_dir)
    private_mkdir(settings.keyring_dir)
    blobs = BlobStore(settings.blob_dir)
    sweep_leftovers(blobs, settings.upload_dir, min_age_s=settings.limits.startup_leftover_age_s)
    db = Database(settings.database_url)
    db.migrate()
    metrics = ServerMetrics(db, settings.clock)
    state = ServerState(
        settings=settings,
        db=db,
        blobs=blobs,
        server_key=load_server_key(settings.server_key_path),
        metrics=metrics,
    )
    feed = FleetFeed(db, now=state.now)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(_sweep_periodically(state)),
            asyncio.create_task(
                anchor_every(state.db, state.server_key, state.now, anchor_interval_s)
            ),
        ]
        if rollout_interval_s:
            tasks.append(asyncio.create_task(_evaluate_rollouts(state, rollout_interval_s)))
        await feed.start()
        try:
            yield
        finally:
            await feed.stop()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            db.dispose()

    app = ServerApp(
        title="Metrica Fleet release server",
        summary="Signed releases, device enrollment and assignments (docs/device-protocol.md)",
        lifespan=lifespan,
        # the API's map is for its developers: off unless `fleet server run --api-docs`
        docs_url="/docs" if settings.api_docs else None,
        redoc_url="/redoc" if settings.api_docs else None,
        openapi_url="/openapi.json" if settings.api_docs else None,
    )
    app.state.fleet = state
    app.state.feed = feed
    install_error_handlers(app)
    app.include_router(device.router)
    app.include_router(operator.router)
    app.include_router(rollout_routes.router)
    app.include_router(blob_routes.router)
    app.include_router(health.router)
    app.include_router(sd.router)
    app.include_router(keys.router)
    # the web console: HTML pages, and HTML error pages for its paths (server/ui/)
    app.include_router(ui_router(), include_in_schema=False)
    install_error_pages(app)
    limits = settings.limits
    app.add_middleware(UploadLimitMiddleware, limit=limits.max_concurrent_uploads)
    app.add_middleware(
        BodyDeadlineMiddleware,
        read_timeout_s=limits.body_read_timeout_s,
        min_rate_bps=limits.min_body_rate_bps,
    )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app
