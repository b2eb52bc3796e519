"""``GET /blobs/<sha256>``: image bytes for devices and mirrors, streamed from disk (a chunked
image assembled from its chunks by the blob store: server/blobs.py, server/chunkstore.py).

No authentication: every byte is checked against the signed manifest by whoever downloads it.
Blobs never change, so the ETag is the SHA-256 itself and caches may keep them forever.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from server.api.common import State
from server.assignment import etag_matches
from server.blobs import SHA256_HEX, parse_range, read_chunks
from server.errors import UnknownBlobError

router = APIRouter(tags=["blobs"])


# the bytes are no JSON: the description says so
BLOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}},
    206: {"description": "One byte range", "content": {"application/octet-stream": {}}},
}


@router.get("/blobs/{sha256}", operation_id="get_blob", responses=BLOB_RESPONSES)
@router.head("/blobs/{sha256}", operation_id="head_blob", responses=BLOB_RESPONSES)
def get_blob(sha256: str, request: Request, state: State) -> Response:
    """The blob, or one byte range of it (``Range``, honoured only if ``If-Range`` matches)."""
    opened = state.blobs.open(sha256) if SHA256_HEX.fullmatch(sha256) else None
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
    return StreamingResponse(
        read_chunks(handle, start, length),
        status_code=status,
        headers=headers,
        media_type="application/octet-stream",
    )
