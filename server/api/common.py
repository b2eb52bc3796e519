"""What every route shares: the server's state, bounded body reading, authentication, errors.

Bodies are never parsed by the framework: each route reads its body here with a size limit
enforced while reading (so a huge body costs the server at most the limit), and validates it
with one model from ``server.schemas``. Every error a client can cause becomes a 4xx with
``{"error": "<code>", "detail": "<one line>"}``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, cast

from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from server.auth import Operator, Role, authenticate_device, authenticate_operator, bearer_token
from server.blobs import BlobStore
from server.database import Database
from server.errors import ApiError, BodyTooLargeError, InvalidRequestError
from server.metrics import ServerMetrics
from server.settings import MAX_JSON_BODY_BYTES, Settings, utc
from signing.keys import SigningKey

log = logging.getLogger("server")
# Received bytes are written in batches of this size, off the event loop.
WRITE_BATCH = 1024 * 1024

DeviceIdPath = Annotated[
    str, PathParam(pattern=r"^[0-9a-f]{64}$", description="key id of the device's public key")
]


@dataclass(frozen=True)
class ServerState:
    """Everything a request handler needs; one per app, nothing in it caches database state."""

    settings: Settings
    db: Database
    blobs: BlobStore
    server_key: SigningKey
    metrics: ServerMetrics

    def now(self) -> datetime:
        return utc(self.settings.clock)


def server_state(request: Request) -> ServerState:
    return cast(ServerState, request.app.state.fleet)


State = Annotated[ServerState, Depends(server_state)]


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.isdigit():
        raise InvalidRequestError("Content-Length is not a number")
    if int(declared) > limit:
        raise BodyTooLargeError(f"body of {declared} bytes; at most {limit} accepted")


async def read_body(request: Request, limit: int = MAX_JSON_BODY_BYTES) -> bytes:
    """The request body, refused as soon as it exceeds ``limit`` bytes.

    Raises:
        BodyTooLargeError: more than ``limit`` bytes (declared or received).
        InvalidRequestError: the client went away before the body ended.
    """
    _check_declared_length(request, limit)
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise BodyTooLargeError(f"body larger than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect as err:
        raise InvalidRequestError("the client disconnected before the body ended") from err
    return b"".join(chunks)


async def receive_file(request: Request, directory: Path, limit: int) -> Path:
    """Stream the request body into a new file in ``directory``; the caller removes it.

    Raises:
        BodyTooLargeError: more than ``limit`` bytes; the partial file is removed.
        InvalidRequestError: the client went away; the partial file is removed.
    """
    _check_declared_length(request, limit)
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix="upload-", suffix=".bundle")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            batch: list[bytes] = []
            batched = received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise BodyTooLargeError(f"bundle larger than the {limit} bytes accepted")
                batch.append(chunk)
                batched += len(chunk)
                if batched >= WRITE_BATCH:
                    await run_in_threadpool(out.write, b"".join(batch))
                    batch, batched = [], 0
            await run_in_threadpool(out.write, b"".join(batch))
    except ClientDisconnect as err:
        path.unlink(missing_ok=True)
        raise InvalidRequestError("the client disconnected before the bundle ended") from err
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def operator(role: Role) -> Callable[[Request], Operator]:
    """A dependency admitting operators with at least ``role``."""

    def dependency(request: Request) -> Operator:
        token = bearer_token(request.headers.get("authorization"))
        state = server_state(request)
        with state.db.read() as session:
            caller = authenticate_operator(session, token, state.now())
        caller.require(role)
        return caller

    return dependency


Viewer = Annotated[Operator, Depends(operator(Role.VIEWER))]
OperatorRole = Annotated[Operator, Depends(operator(Role.OPERATOR))]
Admin = Annotated[Operator, Depends(operator(Role.ADMIN))]


@dataclass(frozen=True)
class DeviceCall:
    """An authenticated device request: whose it is, and its (bounded) body."""

    device_id: str
    body: bytes


def _authenticate_device(state: ServerState, token: str, device_id: str) -> None:
    with state.db.read() as session:
        authenticate_device(session, token, device_id, state.now())


async def device_call(request: Request, device_id: DeviceIdPath) -> DeviceCall:
    """Authenticate a device's session token for ``device_id``, then read the body."""
    token = bearer_token(request.headers.get("authorization"))
    await run_in_threadpool(_authenticate_device, server_state(request), token, device_id)
    return DeviceCall(device_id, await read_body(request))


DeviceRequest = Annotated[DeviceCall, Depends(device_call)]


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": code, "detail": _one_line(detail)}, status_code=status, headers=headers
    )


class ErrorBody(BaseModel):
    """What every refused request is answered with (:func:`error_response`)."""

    error: str
    detail: str


# Declared for every route (install_error_handlers): the errors are ErrorBody, never the shape
# FastAPI would describe for a validation error, which no answer of the server has.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "Refused request"},
    "5XX": {"model": ErrorBody, "description": "Server or database failure"},
}


def _status_code_name(status: int) -> str:
    names = {
        400: "bad_request",
        401: "unauthenticated",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        413: "body_too_large",
        415: "unsupported_media_type",
        422: "invalid_request",
    }
    return names.get(status, "error" if status < 500 else "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Make every error a ``{"error", "detail"}`` JSON answer, and say so in the app's OpenAPI
    description of every route included after this call."""
    app.router.responses = {**ERROR_RESPONSES, **app.router.responses}

    async def api_error(_request: Request, exc: Exception) -> JSONResponse:
        err = cast(ApiError, exc)
        return error_response(err.status, err.code, err.detail, err.headers)

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        errors = cast(RequestValidationError, exc).errors()
        first: dict[str, Any] = errors[0] if errors else {}
        where = ".".join(str(part) for part in first.get("loc", ())) or "request"
        return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        err = cast(StarletteHTTPException, exc)
        return error_response(
            err.status_code,
            _status_code_name(err.status_code),
            str(err.detail),
            dict(err.headers or {}),
        )

    async def database_error(_request: Request, exc: Exception) -> JSONResponse:
        log.error("database error: %s", _one_line(str(exc)))
        return error_response(503, "database_unavailable", "the database did not answer")

    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return error_response(500, "internal_error", "unexpected server error (logged)")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(OperationalError, database_error)
    app.add_exception_handler(Exception, internal_error)
