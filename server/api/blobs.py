"""``GET /blobs/<sha256>``: image bytes for devices and mirrors, streamed from disk (a chunked
image assembled from its chunks by the blob store: server/blobs.py, server/chunkstore.py).

No authentication: every byte is checked against the signed manifest by whoever downloads it.
Blobs never change, so the ETag is the SHA-256 itself and caches may keep them forever; so a
damaged store never answers with other bytes: what fails before the answer starts (the first
mebibyte is read, and a chunked image's first chunks verified, before it) is a 500
``storage_damaged``, what fails later cuts the connection; either logs one error line naming the
store file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from server.api.common import State
from server.assignment import etag_matches
from server.blobs import CHUNK, SHA256_HEX, parse_range, read_chunks
from server.errors import StorageDamagedError, UnknownBlobError

router = APIRouter(tags=["blobs"])
log = logging.getLogger("server")


# the bytes are no JSON: the description says so
BLOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}},
    206: {"description": "One byte range", "content": {"application/octet-stream": {}}},
}


@router.get("/blobs/{sha256}", operation_id="get_blob", responses=BLOB_RESPONSES)
@router.head("/blobs/{sha256}", operation_id="head_blob", responses=BLOB_RESPONSES)
def get_blob(sha256: str, request: Request, state: State) -> Response:
    """The blob, or one byte range of it (``Range``, honoured only if ``If-Range`` matches)."""
    try:
        opened = state.blobs.open(sha256) if SHA256_HEX.fullmatch(sha256) else None
    except StorageDamagedError as err:
        raise _damaged(sha256, err) from err
    if opened is None:
        raise UnknownBlobError(f"no blob {sha256[:64]!r}")
    handle, size = opened
    etag = f'"{sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": "public, max-age=31536000, immutable",
    }
    try:
        if_none_match = request.headers.get("if-none-match")
        # "*" matches any current representation (RFC 9110, 13.1.2): the blob exists
        if (if_none_match or "").strip() == "*" or etag_matches(if_none_match, sha256):
            handle.close()
            return Response(status_code=304, headers=headers)
        if_range = request.headers.get("if-range")
        # If-Range with anything but this blob's ETag (another ETag, or a date: blobs carry no
        # Last-Modified) means the client's partial copy is of something else: the Range is
        # ignored and the blob sent whole, even if the Range would not fit (RFC 9110, 13.1.5).
        range_header = request.headers.get("range")
        if if_range is not None and if_range.strip() != etag:
            range_header = None
        wanted = parse_range(range_header, size)
    except BaseException:
        handle.close()
        raise
    status, start, length = 200, 0, size
    if wanted is not None:
        status, start, length = 206, wanted.start, wanted.length
        headers["Content-Range"] = wanted.content_range(size)
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        handle.close()
        # the same header fields as the GET's (RFC 9110, 9.3.2), the type included
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")
    try:  # the first bytes before the answer starts: a damaged store is a 500, not a cut
        handle.seek(start)
        first = handle.read(min(CHUNK, length))
    except StorageDamagedError as err:
        handle.close()
        raise _damaged(sha256, err) from err
    except BaseException:
        handle.close()
        raise
    return StreamingResponse(
        _logged(sha256, read_chunks(handle, start, length, first)),
        status_code=status,
        headers=headers,
        media_type="application/octet-stream",
    )


def _logged(sha256: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """``chunks``, logging a damaged store found mid-answer (the connection is then cut)."""
    try:
        yield from chunks
    except StorageDamagedError as err:
        log.error("serving blob %s: %s; connection cut", sha256[:12], err)
        raise


def _damaged(sha256: str, err: StorageDamagedError) -> StorageDamagedError:
    """The answer to a damaged store: the log names the store file, the client learns no path."""
    log.error("serving blob %s: %s", sha256[:12], err)
    return StorageDamagedError(f"the server's stored copy of blob {sha256} is damaged (logged)")
