"""The manifest model: one validating parser, one canonical encoding."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from image_builder.errors import ManifestError
from image_builder.manifest import (
    MAX_IMAGE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_SECURITY_VERSION,
    Manifest,
    epoch,
    timestamp,
)

SHA_A, SHA_B = "a" * 64, "b" * 64


def document(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "format": 1,
        "product": "metrica-fleet",
        "compatible": "metrica-rpi4",
        "version": "1.2.3-rc.1+build.5",
        "security_version": 4,
        "created": "2026-11-27T07:00:00Z",
        "images": [
            {
                "slot_class": "rootfs",
                "filename": "rootfs.ext4.zst",
                "compression": "zstd",
                "size": 100,
                "sha256": SHA_A,
                "uncompressed_size": 4096,
                "uncompressed_sha256": SHA_B,
            }
        ],
    }
    base.update(changes)
    return base


def image(**changes: Any) -> dict[str, Any]:
    entry = dict(document()["images"][0])
    entry.update(changes)
    return entry


def test_round_trip_is_canonical() -> None:
    manifest = Manifest.from_dict(document())
    data = manifest.to_bytes()
    assert Manifest.from_bytes(data) == manifest
    assert data == json.dumps(document(), sort_keys=True, separators=(",", ":")).encode() + b"\n"
    assert manifest.image("rootfs") is manifest.images[0]
    assert manifest.image("bootfs") is None


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (document(format=3), "unknown format version 3"),
        (document(format="1"), "must be int"),
        ({k: v for k, v in document().items() if k != "compatible"}, "missing field 'compatible'"),
        (document(extra=1), "unknown field"),
        (document(version="1.2"), "not a semantic version"),
        (document(version="01.2.3"), "not a semantic version"),
        (document(security_version=-1), "out of range"),
        (document(security_version=2**32), "out of range"),
        (document(security_version=True), "must be int"),
        (document(created="yesterday"), "YYYY"),
        (document(created="2026-13-40T00:00:00Z"), "not a valid time"),
        (document(compatible=""), "1-128 characters"),
        (document(compatible="rpi 4"), "1-128 characters"),
        (document(images=[]), "needs 1 to 16"),
        (document(images=[image()] * 17), "needs 1 to 16"),
        (document(images=[image(slot_class="kernel")]), "unknown slot class"),
        (document(images=[image(compression="gzip")]), "unknown compression"),
        (document(images=[image(filename="../rootfs")]), "not a plain file name"),
        (document(images=[image(filename="/etc/passwd")]), "not a plain file name"),
        (document(images=[image(filename="dir/rootfs")]), "not a plain file name"),
        (document(images=[image(filename="manifest.sig")]), "reserved"),
        (document(images=[image(size=0)]), "out of range"),
        (document(images=[image(size=MAX_IMAGE_BYTES + 1)]), "out of range"),
        (document(images=[image(uncompressed_size=2**63)]), "out of range"),
        (document(images=[image(sha256="A" * 64)]), "64 lowercase hex"),
        (document(images=[image(unknown=1)]), "unknown field"),
        (document(images=[image(compression="none")]), "differing stored size"),
        (document(images=[image(), image()]), "two members named"),
        (document(images=[image(), image(filename="other.img")]), "two images for slot class"),
        (document(images=["rootfs"]), "must be an object"),
        ([], "JSON object"),
    ],
)
def test_invalid_manifests_name_the_problem(doc: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(doc)


def test_non_utf8_manifest() -> None:
    data = Manifest.from_dict(document()).to_bytes().replace(b"metrica-fleet", b"metrica\xff")
    with pytest.raises(ManifestError, match="not UTF-8"):
        Manifest.from_bytes(data)


def test_duplicate_keys_are_refused() -> None:
    data = Manifest.from_dict(document()).to_bytes()
    data = data.replace(b'{"compatible"', b'{"compatible":"other","compatible"', 1)
    with pytest.raises(ManifestError, match="appears twice"):
        Manifest.from_bytes(data)


def test_oversized_manifest() -> None:
    with pytest.raises(ManifestError, match="more than"):
        Manifest.from_bytes(b" " * (1024 * 1024 + 1))


@example(Manifest.from_dict(document()).to_bytes())  # random bytes are never a manifest
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_manifest_error_or_a_valid_manifest(data: bytes) -> None:
    try:
        manifest = Manifest.from_bytes(data)
    except ManifestError:
        return
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


# Arbitrary JSON is a valid value for its field about once in a hundred examples: the valid
# branch gets its own examples, one per kind of field (document, image, text, number, hash).
@example(field="security_version", value=0)
@example(field="version", value="2.0.0")
@example(field="created", value="2030-01-01T00:00:00Z")
@example(field="slot_class", value="bootfs")
@example(field="size", value=1)
@example(field="uncompressed_sha256", value="cd" * 32)
@given(field=st.sampled_from(sorted(document()) + sorted(image())), value=JSON_VALUES)
def test_any_json_value_in_any_field_gives_manifest_error_or_valid_manifest(
    field: str, value: Any
) -> None:
    doc = (
        document(**{field: value})
        if field in document()
        else document(images=[image(**{field: value})])
    )
    try:
        manifest = Manifest.from_dict(doc)
    except ManifestError:
        return
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest


@pytest.mark.parametrize(
    "data",
    [b"[" * 100_000, b'{"format":' + b"9" * 5000 + b"}", b'{"a":' * 50_000],
    ids=["deep nesting", "huge integer", "deep objects"],
)
def test_hostile_json_is_a_manifest_error(data: bytes) -> None:
    with pytest.raises(ManifestError, match="not JSON"):
        Manifest.from_bytes(data)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "1"}, "^manifest: field 'format' must be int, not '1'$"),
        ({"extra": 1}, "^manifest: unknown field\\(s\\) extra$"),
        ({"version": 1}, "^manifest: field 'version' must be str"),
        ({"security_version": "4"}, "^manifest: field 'security_version' must be int"),
        ({"created": 0}, "^manifest: field 'created' must be str"),
        ({"images": {}}, "^manifest: field 'images' must be list"),
        ({"product": None}, "^manifest: field 'product' must be str"),
        ({"compatible": 5}, "^manifest: field 'compatible' must be str"),
    ],
)
def test_manifest_field_errors_say_where(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(document(**changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"slot_class": 1}, "field 'slot_class' must be str"),
        ({"filename": 1}, "field 'filename' must be str"),
        ({"compression": 1}, "field 'compression' must be str"),
        ({"size": "1"}, "field 'size' must be int"),
        ({"sha256": 1}, "field 'sha256' must be str"),
        ({"uncompressed_size": "1"}, "field 'uncompressed_size' must be int"),
        ({"uncompressed_sha256": 1}, "field 'uncompressed_sha256' must be str"),
        ({"extra": 1}, "unknown field\\(s\\) extra"),
    ],
)
def test_image_field_errors_say_which_image(changes: dict[str, Any], message: str) -> None:
    boot = image(**{"slot_class": "bootfs", "filename": "bootfs.vfat.zst", **changes})
    with pytest.raises(ManifestError, match=f"^manifest image 1: {message}"):
        Manifest.from_dict(document(images=[image(), boot]))


def test_size_and_version_limits_are_inclusive() -> None:
    assert Manifest.from_dict(document(images=[image(size=1)])).images[0].size == 1
    biggest = image(
        compression="none",
        size=MAX_IMAGE_BYTES,
        uncompressed_size=MAX_IMAGE_BYTES,
        sha256=SHA_B,
        filename="rootfs.ext4",
    )
    assert Manifest.from_dict(document(images=[biggest])).images[0].size == MAX_IMAGE_BYTES
    version = "1.0.0-" + "a" * 122
    assert len(version) == 128
    assert Manifest.from_dict(document(version=version)).version == version
    with pytest.raises(ManifestError, match="not a semantic version"):
        Manifest.from_dict(document(version=version + "a"))
    top = Manifest.from_dict(document(security_version=MAX_SECURITY_VERSION))
    assert top.security_version == MAX_SECURITY_VERSION


def test_uncompressed_image_needs_equal_hashes_even_with_equal_sizes() -> None:
    entry = image(compression="none", filename="rootfs.ext4", size=4096, uncompressed_size=4096)
    with pytest.raises(ManifestError, match="differing stored size or hash"):
        Manifest.from_dict(document(images=[entry]))


def test_manifest_of_exactly_the_size_limit_is_parsed() -> None:
    with pytest.raises(ManifestError, match=r"^manifest: not JSON \(Expecting value"):
        Manifest.from_bytes(b"x" * MAX_MANIFEST_BYTES)
    with pytest.raises(ManifestError, match=f"more than {MAX_MANIFEST_BYTES}"):
        Manifest.from_bytes(b"x" * (MAX_MANIFEST_BYTES + 1))


def test_times_are_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert timestamp(1_700_000_000) == "2023-11-14T22:13:20Z"
        assert epoch("2023-11-14T22:13:20Z") == 1_700_000_000
    finally:
        monkeypatch.undo()
        time.tzset()
