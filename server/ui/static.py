"""The console's own static files (``server/ui/static``), served at ``/ui/static/<name>``.

Each answer carries an ETag (the file's SHA-256) and public caching; pages link to
``static_url(name)``, which adds ``?v=<hash>``, so a changed file is a new URL and a browser
may keep each version for a year. The files ship in the wheel as package data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, Response

from server.assignment import etag_matches
from server.errors import ApiError

STATIC_DIR = Path(__file__).resolve().parent / "static"
NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\.(css|js|svg|png|ico)")
CONTENT_TYPES = {
    "css": "text/css; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "svg": "image/svg+xml",
    "png": "image/png",
    "ico": "image/x-icon",
}
VERSIONED_CACHE = "public, max-age=31536000, immutable"
UNVERSIONED_CACHE = "public, max-age=300"

router = APIRouter()


class UnknownStaticFileError(ApiError):
    status = 404
    code = "not_found"


@dataclass(frozen=True)
class StaticFile:
    content: bytes
    sha256: str
    content_type: str


_loaded: dict[str, tuple[int, StaticFile]] = {}


def load(name: str) -> StaticFile | None:
    """The static file ``name`` (re-read when it changed on disk), None if there is none."""
    match = NAME.fullmatch(name)
    if match is None:
        return None
    path = STATIC_DIR / name
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    cached = _loaded.get(name)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    content = path.read_bytes()
    loaded = StaticFile(content, hashlib.sha256(content).hexdigest(), CONTENT_TYPES[match[1]])
    _loaded[name] = (stamp, loaded)
    return loaded


def static_url(name: str) -> str:
    """Where a page links to the static file ``name``: its URL with its content's version."""
    loaded = load(name)
    url = f"/ui/static/{name}"
    return url if loaded is None else f"{url}?v={loaded.sha256[:16]}"


def static_exists(name: str) -> bool:
    return load(name) is not None


@router.api_route("/ui/static/{name}", methods=["GET", "HEAD"])
def static_file(name: str, request: Request) -> Response:
    """A static file of the console, cached by browsers; 304 when the ETag still matches.
    HEAD answers the same headers without the body.

    Raises:
        UnknownStaticFileError: no such file.
    """
    loaded = load(name)
    if loaded is None:
        raise UnknownStaticFileError(f"no static file {name[:80]!r}")
    versioned = request.query_params.get("v") == loaded.sha256[:16]
    headers = {
        "ETag": f'"{loaded.sha256}"',
        "Cache-Control": VERSIONED_CACHE if versioned else UNVERSIONED_CACHE,
    }
    if etag_matches(request.headers.get("if-none-match"), loaded.sha256):
        return Response(status_code=304, headers=headers)
    body = b"" if request.method == "HEAD" else loaded.content
    headers["Content-Length"] = str(len(loaded.content))
    return Response(body, media_type=loaded.content_type, headers=headers)
