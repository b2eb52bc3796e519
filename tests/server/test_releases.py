"""Uploading releases: what is accepted, what is refused, and that a refusal stores nothing."""

from __future__ import annotations

import hashlib
import io
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from image_builder.bundle import BundleReader
from server.models import AuditRow, Release, ReleaseImage
from signing.keys import SigningKey, generate_key
from tests.conftest import raw_bundle, signed_members
from tests.server.conftest import MAX_UPLOAD, Harness

MakeBundle = Callable[..., Path]


def assert_nothing_stored(harness: Harness) -> None:
    assert harness.count(Release) == 0
    assert harness.count(ReleaseImage) == 0
    assert harness.blob_files() == []
    assert list(harness.settings.upload_dir.iterdir()) == []
    with harness.db.read() as session:
        actions = [row.action for row in session.query(AuditRow)]
    assert "release.uploaded" not in actions


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_upload_stores_release_and_blobs(
    harness: Harness, make_bundle: MakeBundle, compression: str
) -> None:
    bundle = make_bundle(compression=compression, bootfs=True, version="2.0.0")
    response = harness.upload(bundle)
    assert response.status_code == 201, response.text
    release = response.json()
    assert release["version"] == "2.0.0"
    assert release["compatible"] == "metrica-rpi4"
    assert release["uploaded_by"] == "operator:test-operator"
    assert [i["slot_class"] for i in release["images"]] == ["rootfs", "bootfs"]
    for image in release["images"]:
        blob = harness.client.get(image["url"])
        assert blob.status_code == 200
        assert hashlib.sha256(blob.content).hexdigest() == image["sha256"]
        assert len(blob.content) == image["size"]
    assert len(harness.blob_files()) == 2
    assert list(harness.settings.upload_dir.iterdir()) == []

    listing = harness.client.get("/api/v1/releases", headers=harness.viewer).json()["releases"]
    assert [r["version"] for r in listing] == ["2.0.0"]
    one = harness.client.get("/api/v1/releases/2.0.0", headers=harness.viewer)
    assert one.json() == release
    missing = harness.client.get("/api/v1/releases/9.9.9", headers=harness.viewer)
    assert missing.status_code == 404
    assert missing.json()["error"] == "unknown_release"


def test_duplicate_version_is_409_and_shared_blobs_stay(
    harness: Harness, make_bundle: MakeBundle
) -> None:
    first = make_bundle("a.bundle", version="1.0.0")
    assert harness.upload(first).status_code == 201
    blobs = harness.blob_files()
    response = harness.upload(make_bundle("b.bundle", version="1.0.0", size=5000))
    assert response.status_code == 409
    assert response.json()["error"] == "duplicate_version"
    assert harness.blob_files() == blobs
    assert harness.count(Release) == 1
    # A new version with the same image bytes shares the blob.
    assert harness.upload(make_bundle("c.bundle", version="1.0.1")).status_code == 201
    assert harness.blob_files() == blobs


def test_other_compatible_is_accepted_at_upload(harness: Harness, make_bundle: MakeBundle) -> None:
    response = harness.upload(make_bundle(compatible="metrica-cm4-gateway", version="3.0.0"))
    assert response.status_code == 201
    assert response.json()["compatible"] == "metrica-cm4-gateway"


def _unsigned(bundle: Path, image: Path) -> bytes:
    """The bundle without its ``manifest.sig`` member."""
    reader = BundleReader(io.BytesIO(bundle.read_bytes()))
    _, manifest_bytes, _ = reader.read_header()
    return raw_bundle([("manifest.json", manifest_bytes), ("rootfs.ext4", image.read_bytes())])


@pytest.fixture
def stranger(tmp_path: Path) -> SigningKey:
    return generate_key(tmp_path / "keys" / "stranger")


def test_refused_bundles_store_nothing(
    harness: Harness,
    make_bundle: MakeBundle,
    stranger: SigningKey,
    key: SigningKey,
    tmp_path: Path,
) -> None:
    good_path = make_bundle(version="1.0.0")
    good = good_path.read_bytes()
    flipped_manifest = bytearray(good)
    flipped_manifest[600] ^= 0x01
    flipped_image = bytearray(good)
    flipped_image[-1024 - 600] ^= 0x01
    manifest_bytes = b'{"format":1}\n'
    cases = {
        "unsigned": (
            _unsigned(good_path, tmp_path / "images" / "rootfs.ext4"),
            "bundle_malformed",
        ),
        "manifest byte flipped": (bytes(flipped_manifest), None),
        "image byte flipped": (bytes(flipped_image), "bundle_malformed"),
        "truncated": (good[: len(good) // 2], "bundle_malformed"),
        "trailing data": (good + b"x", "bundle_malformed"),
        "signed by an untrusted key": (
            make_bundle("s.bundle", keys=[stranger]).read_bytes(),
            "bundle_signature_invalid",
        ),
        "invalid manifest, validly signed": (
            raw_bundle(signed_members(manifest_bytes, key)),
            "bundle_malformed",
        ),
        "not a bundle": (b"hello world", "bundle_malformed"),
        "empty": (b"", "bundle_malformed"),
    }
    for name, (data, code) in cases.items():
        response = harness.upload(data)
        assert response.status_code == 422, (name, response.text)
        body = response.json()
        assert set(body) == {"error", "detail"}, name
        if code is not None:
            assert body["error"] == code, (name, body)
        assert_nothing_stored(harness)


def test_image_corrupted_after_signing_stores_nothing(
    harness: Harness, make_bundle: MakeBundle
) -> None:
    # Two images: the first is fine, the second is damaged. The first must not stay behind.
    data = bytearray(make_bundle(bootfs=True, size=4000).read_bytes())
    data[-1024 - 100] ^= 0xFF
    response = harness.upload(bytes(data))
    assert response.status_code == 422
    assert response.json()["error"] == "bundle_malformed"
    assert_nothing_stored(harness)


def test_upload_limit_declared_and_streamed(harness: Harness) -> None:
    too_big = b"\0" * (MAX_UPLOAD + 1)
    response = harness.upload(too_big)
    assert response.status_code == 413
    assert response.json()["error"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        for _ in range(3):
            yield b"\0" * (MAX_UPLOAD // 2)

    response = harness.client.post("/api/v1/releases", content=chunks(), headers=harness.operator)
    assert response.status_code == 413
    assert_nothing_stored(harness)


def test_upload_needs_operator_role(harness: Harness, make_bundle: MakeBundle) -> None:
    bundle = make_bundle()
    assert harness.upload(bundle, headers={}).status_code == 401
    assert harness.upload(bundle, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert harness.upload(bundle, headers={"Authorization": "Basic abc"}).status_code == 401
    forbidden = harness.upload(bundle, headers=harness.viewer)
    assert forbidden.status_code == 403
    assert forbidden.json()["error"] == "forbidden"
    assert harness.upload(bundle, headers=harness.admin).status_code == 201
    assert harness.client.get("/api/v1/releases").status_code == 401


def test_unusable_keyring_is_a_clear_503(harness: Harness, make_bundle: MakeBundle) -> None:
    shutil.rmtree(harness.settings.keyring_dir)
    harness.settings.keyring_dir.mkdir()
    response = harness.upload(make_bundle())
    assert response.status_code == 503
    assert response.json()["error"] == "keyring_unusable"
    assert "fleet keys trust" in response.json()["detail"]
    assert_nothing_stored(harness)


def test_audit_records_upload(harness: Harness, make_bundle: MakeBundle) -> None:
    harness.upload(make_bundle(version="4.0.0"))
    entries = harness.client.get("/api/v1/audit", headers=harness.viewer).json()["entries"]
    uploaded = [e for e in entries if e["action"] == "release.uploaded"]
    assert len(uploaded) == 1
    assert uploaded[0]["subject"] == "release:4.0.0"
    assert uploaded[0]["actor"] == "operator:test-operator"
