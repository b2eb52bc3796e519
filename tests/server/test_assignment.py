"""The signed check-in answer and its ETag, pinned independently of server/assignment.py."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.assignment import assignment_etag, signed_answer
from server.models import Release, ReleaseImage
from server.releases import blob_url
from signing.keyring import Keyring
from signing.keys import SigningKey
from signing.signature import SignatureEnvelope

DEVICE = "dev-0123"
SHA = "ab" * 32
KEY = SigningKey.from_private_key(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))


def expected_etag(device_id: str, assigned: str, interval: str) -> str:
    material = f"assignment v1\n{device_id}\n{assigned}\n{interval}".encode()
    return hashlib.sha256(material).hexdigest()[:32]


@pytest.mark.parametrize(
    ("manifest_sha256", "interval", "assigned", "spelled"),
    [
        (SHA, None, SHA, "default"),
        (SHA, 300, SHA, "300"),
        (None, None, "none", "default"),
        (None, 60, "none", "60"),
    ],
)
def test_etag_is_pinned(
    manifest_sha256: str | None, interval: int | None, assigned: str, spelled: str
) -> None:
    etag = assignment_etag(DEVICE, manifest_sha256, interval)
    assert etag == expected_etag(DEVICE, assigned, spelled)
    assert len(etag) == 32


def test_etag_changes_with_each_input() -> None:
    base = assignment_etag(DEVICE, SHA, None)
    others = {
        assignment_etag("dev-other", SHA, None),
        assignment_etag(DEVICE, "cd" * 32, None),
        assignment_etag(DEVICE, None, None),
        assignment_etag(DEVICE, SHA, 300),
        assignment_etag(DEVICE, SHA, 60),
    }
    assert base not in others
    assert len(others) == 5


def release() -> Release:
    return Release(
        id=7,
        version="1.2.0",
        security_version=3,
        manifest=b'{"manifest": true}',
        manifest_sha256=SHA,
        signature=b"envelope bytes",
        images=[ReleaseImage(slot_class="rootfs", sha256="cd" * 32, size=4096)],
    )


def verified(answer_text: str, signatures: str) -> None:
    keyring = Keyring({KEY.key_id: KEY.public_key})
    envelope = SignatureEnvelope.from_bytes(signatures.encode("ascii"))
    keyring.verify(answer_text.encode("utf-8"), envelope, "assignment")


def test_signed_answer_text_is_pinned() -> None:
    answer = signed_answer(DEVICE, "nonce-1", release(), KEY, 300)
    etag = expected_etag(DEVICE, SHA, "300")
    assert answer.etag == etag
    assignment = (
        '{"blobs":[{"sha256":"'
        + "cd" * 32
        + '","size":4096,"slot_class":"rootfs","url":"'
        + blob_url("cd" * 32)
        + '"}],"manifest":"'
        + base64.b64encode(b'{"manifest": true}').decode()
        + '","manifest_sig":"'
        + base64.b64encode(b"envelope bytes").decode()
        + '","release_id":7,"security_version":3,"version":"1.2.0"}'
    )
    assert answer.answer == (
        '{"assignment":'
        + assignment
        + ',"checkin_interval_s":300,"device_id":"'
        + DEVICE
        + '","etag":"'
        + etag
        + '","format":1,"nonce":"nonce-1"}'
    )
    verified(answer.answer, answer.signatures)
    assert answer.to_dict() == {"answer": answer.answer, "signatures": answer.signatures}


def test_signed_answer_without_release_or_interval() -> None:
    answer = signed_answer(DEVICE, "n", None, KEY)
    etag = expected_etag(DEVICE, "none", "default")
    assert answer.etag == etag
    assert answer.answer == (
        '{"assignment":null,"checkin_interval_s":null,"device_id":"'
        + DEVICE
        + '","etag":"'
        + etag
        + '","format":1,"nonce":"n"}'
    )
    verified(answer.answer, answer.signatures)
    assert json.loads(answer.answer)["etag"] == answer.etag
