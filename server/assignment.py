"""The signed check-in answer: which release a device should run (docs/device-protocol.md).

The answer document is canonical JSON (sorted keys, no spaces) signed by the server key for
purpose ``assignment``. It echoes the device's nonce, so a device accepts only the answer to the
request it just made; no clock is involved. Its ETag depends only on the device, on what is
assigned (the exact manifest bytes) and on the check-in interval asked for, so it changes
exactly when one of them changes, and every server process computes the same one.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.models import Release
from server.releases import blob_url
from signing.keys import SigningKey
from signing.signature import sign

ANSWER_FORMAT = 1
ASSIGNMENT_PURPOSE = "assignment"


def assignment_etag(
    device_id: str,
    manifest_sha256: str | None,
    checkin_interval_s: int | None = None,
    windows: Sequence[str] = (),
) -> str:
    """The ETag (unquoted) of the device's current answer: what is assigned (by the SHA-256
    of its manifest), the check-in interval asked for, and the maintenance windows of the
    rollout that assigned it (an answer without windows keeps the ETag it always had)."""
    assigned = manifest_sha256 or "none"
    interval = "default" if checkin_interval_s is None else str(checkin_interval_s)
    material = f"assignment v{ANSWER_FORMAT}\n{device_id}\n{assigned}\n{interval}"
    if windows:
        material += "\n" + "\n".join(windows)
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (weak comparison, as RFC 9110 says).

    ``*`` does not match: a device that never verified an answer must get one.
    """
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        candidate = candidate.strip().removeprefix("W/")
        if candidate == f'"{etag}"':
            return True
    return False


def assignment_document(release: Release, windows: Sequence[str] = ()) -> dict[str, Any]:
    """The ``assignment`` member of an answer for ``release``: its blobs are its images, then
    the chunk index of each chunked image (with the image's slot class), which a device
    finds by the SHA-256 its manifest names; ``windows``, when the rollout that assigned it
    has any, narrow when the device may install it."""
    indexes = [
        (image.slot_class, image.chunk_index_sha256, image.chunk_index_size)
        for image in release.images
        if image.chunk_index_sha256 is not None and image.chunk_index_size is not None
    ]
    document: dict[str, Any] = {
        "release_id": release.id,
        "version": release.version,
        "security_version": release.security_version,
        "manifest": base64.b64encode(release.manifest).decode("ascii"),
        "manifest_sig": base64.b64encode(release.signature).decode("ascii"),
        "blobs": [
            _blob(slot_class, sha256, size)
            for slot_class, sha256, size in [
                *((image.slot_class, image.sha256, image.size) for image in release.images),
                *indexes,
            ]
        ],
    }
    if windows:
        document["windows"] = list(windows)
    return document


def _blob(slot_class: str, sha256: str, size: int) -> dict[str, Any]:
    return {"slot_class": slot_class, "sha256": sha256, "size": size, "url": blob_url(sha256)}


@dataclass(frozen=True)
class SignedAnswer:
    """A check-in answer: the document's exact text and the envelope over its UTF-8 bytes."""

    etag: str
    answer: str
    signatures: str  # the envelope's exact bytes (one JSON line and a newline), as text

    def to_dict(self) -> dict[str, str]:
        return {"answer": self.answer, "signatures": self.signatures}


def signed_answer(
    device_id: str,
    nonce: str,
    release: Release | None,
    server_key: SigningKey,
    checkin_interval_s: int | None = None,
    windows: Sequence[str] = (),
) -> SignedAnswer:
    """Build and sign the answer to a check-in with ``nonce``; ``checkin_interval_s`` asks the
    device to check in that often for now (a rollout is active), None leaves it to the
    device's configuration; ``windows``: the assigning rollout's maintenance windows."""
    etag = assignment_etag(
        device_id,
        release.manifest_sha256 if release is not None else None,
        checkin_interval_s,
        windows,
    )
    document = {
        "format": ANSWER_FORMAT,
        "device_id": device_id,
        "nonce": nonce,
        "etag": etag,
        "assignment": assignment_document(release, windows) if release is not None else None,
        "checkin_interval_s": checkin_interval_s,
    }
    answer = json.dumps(document, sort_keys=True, separators=(",", ":"))
    envelope = sign(answer.encode("utf-8"), [server_key], ASSIGNMENT_PURPOSE)
    return SignedAnswer(etag, answer, envelope.to_bytes().decode("ascii"))
