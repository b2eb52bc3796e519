"""Release bundles written and read back: integrity, authenticity, and every kind of bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_core.errors import FleetError
from image_builder.bundle import (
    CHUNK,
    MAX_READ,
    BundleImage,
    BundleReader,
    ImageStream,
    read_bundle_info,
    verify_bundle,
    verify_stream,
)
from image_builder.bundle_writer import ImageSource, create_bundle
from image_builder.container import BLOCK, END_OF_ARCHIVE, padding
from image_builder.errors import (
    BundleError,
    BundleFormatError,
    ImageIntegrityError,
    ManifestError,
)
from image_builder.manifest import ImageEntry, Manifest
from signing.errors import BadSignatureError, RevokedKeyError, ThresholdError, UnknownKeyError
from signing.keyring import Keyring, revoke_key, set_threshold, trust_key
from signing.keys import SigningKey, generate_key
from signing.signature import MAX_ENVELOPE_BYTES
from tests.conftest import raw_bundle, signed_members

MakeBundle = Callable[..., Path]


def verify_bytes(data: bytes, keyring: Keyring) -> None:
    verify_stream(io.BytesIO(data), keyring)


def read_images(data: bytes, keyring: Keyring) -> dict[str, bytes]:
    reader = BundleReader(io.BytesIO(data))
    reader.verify(keyring)
    return {
        image.entry.slot_class: image.stream.read(1 << 30) + image.stream.read()
        for image in reader.images()
    }


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_create_and_read_back(
    make_bundle: MakeBundle, keyring: Keyring, key: SigningKey, compression: str, tmp_path: Path
) -> None:
    path = make_bundle(compression=compression, size=300_000, bootfs=True)
    result = verify_bundle(path, keyring)
    assert result.signed_by == (key.key_id,)
    assert result.size == path.stat().st_size
    images = read_images(path.read_bytes(), keyring)
    assert images["rootfs"] == (tmp_path / "images" / "rootfs.ext4").read_bytes()
    assert images["bootfs"] == (tmp_path / "images" / "bootfs.vfat").read_bytes()
    manifest = result.manifest
    assert [i.slot_class for i in manifest.images] == ["rootfs", "bootfs"]
    rootfs = manifest.images[0]
    assert rootfs.uncompressed_sha256 == hashlib.sha256(images["rootfs"]).hexdigest()
    assert rootfs.compression == compression
    if compression == "zstd":
        assert rootfs.size < rootfs.uncompressed_size
        assert rootfs.filename == "rootfs.ext4.zst"


def test_bundle_is_reproducible(
    key: SigningKey,
    make_image: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    image = make_image(size=200_000)
    outputs = []
    for name in ("one.bundle", "two.bundle"):
        create_bundle(
            tmp_path / name,
            images=[ImageSource("rootfs", image)],
            keys=[key],
            compatible="c",
            version="1.0.0",
            security_version=0,
            compression="zstd",
        )
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    manifest, _ = read_bundle_info(tmp_path / "one.bundle")
    assert manifest.created == "2023-11-14T22:13:20Z"


def test_gnu_tar_lists_and_extracts_a_bundle(make_bundle: MakeBundle, tmp_path: Path) -> None:
    import subprocess

    path = make_bundle(compression="zstd", size=100_000)
    listing = subprocess.run(["tar", "-tf", str(path)], check=True, capture_output=True, text=True)
    assert listing.stdout.split() == [
        "manifest.json",
        "manifest.sig",
        "rootfs.ext4.zst",
        "rootfs.ext4.zst.chunks",
    ]
    out = tmp_path / "extracted"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(path), "-C", str(out)], check=True)
    subprocess.run(["zstd", "-q", "-d", str(out / "rootfs.ext4.zst")], check=True)
    assert (out / "rootfs.ext4").read_bytes() == (tmp_path / "images" / "rootfs.ext4").read_bytes()
    Manifest.from_bytes((out / "manifest.json").read_bytes())


def test_manifest_is_verified_before_any_payload_is_read(
    make_bundle: MakeBundle, keyring: Keyring
) -> None:
    data = make_bundle(size=50_000).read_bytes()
    stream = io.BytesIO(data)
    reader = BundleReader(stream)
    reader.verify(keyring)
    _, manifest_bytes, envelope = reader.read_header()
    manifest_len, envelope_len = len(manifest_bytes), len(envelope.to_bytes())
    header_end = (
        BLOCK + -(-manifest_len // BLOCK) * BLOCK + BLOCK + -(-envelope_len // BLOCK) * BLOCK
    )
    assert stream.tell() == reader.bytes_read == header_end


def test_images_require_verification_and_full_reads(
    make_bundle: MakeBundle, keyring: Keyring
) -> None:
    data = make_bundle(size=50_000, bootfs=True).read_bytes()
    reader = BundleReader(io.BytesIO(data))
    reader.read_header()
    with pytest.raises(BundleError, match="before the manifest was verified"):
        next(reader.images())
    reader = BundleReader(io.BytesIO(data))
    reader.verify(keyring)
    images = reader.images()
    first = next(images)
    first.stream.read(10)
    with pytest.raises(BundleError, match="not read to its end"):
        next(images)


# --- any changed byte is detected ----------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_every_single_byte_change_is_detected(
    make_bundle: MakeBundle, keyring: Keyring, compression: str
) -> None:
    """Exhaustive over every position of a small bundle (two images, padding, end marker)."""
    data = make_bundle(compression=compression, size=1500, bootfs=True).read_bytes()
    verify_bytes(data, keyring)
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x01 if position % 2 else 0x80
        with pytest.raises(FleetError):
            verify_bytes(bytes(damaged), keyring)


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), xor=st.integers(min_value=1, max_value=255))
def test_any_byte_flip_is_detected(
    make_bundle: MakeBundle, keyring: Keyring, position: int, xor: int
) -> None:
    data = _cached_bundle(make_bundle)
    damaged = bytearray(data)
    damaged[position % len(data)] ^= xor
    with pytest.raises(FleetError):
        verify_bytes(bytes(damaged), keyring)


_CACHE: dict[str, bytes] = {}


def _cached_bundle(make_bundle: MakeBundle) -> bytes:
    # one bundle per test run: hypothesis calls the test hundreds of times with one fixture
    if "zstd" not in _CACHE:
        _CACHE["zstd"] = make_bundle(
            "flip.bundle", compression="zstd", size=5000, bootfs=True
        ).read_bytes()
    return _CACHE["zstd"]


def test_byte_flips_in_a_co_signed_bundle_are_detected(
    make_bundle: MakeBundle, key: SigningKey, tmp_path: Path
) -> None:
    second = generate_key(tmp_path / "keys" / "second")
    both = tmp_path / "both"
    trust_key(both, tmp_path / "keys" / "release.pub")
    trust_key(both, tmp_path / "keys" / "second.pub")
    keyring = Keyring.load(both)
    data = make_bundle(keys=[key, second], size=600).read_bytes()
    verify_bytes(data, keyring)
    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 0x04
        with pytest.raises(FleetError):
            verify_bytes(bytes(damaged), keyring)


# --- malformed containers ------------------------------------------------------------------


def test_truncated_anywhere(make_bundle: MakeBundle, keyring: Keyring) -> None:
    data = make_bundle(compression="zstd", size=3000, bootfs=True).read_bytes()
    for length in [*range(0, len(data), 97), *range(len(data) - 1030, len(data))]:
        with pytest.raises(BundleFormatError, match="truncated|ends"):
            verify_bytes(data[:length], keyring)


@pytest.mark.parametrize(
    "garbage", [b"\0", b"x", bytes(BLOCK), bytes(10240), b"PK\x03\x04 another archive"]
)
def test_trailing_garbage(make_bundle: MakeBundle, keyring: Keyring, garbage: bytes) -> None:
    data = make_bundle().read_bytes()
    with pytest.raises(BundleFormatError, match="trailing data"):
        verify_bytes(data + garbage, keyring)


def manifest_doc(
    make_bundle: MakeBundle, **kwargs: object
) -> tuple[dict[str, object], dict[str, bytes]]:
    """A valid manifest as a dict, and the stored bytes of each image by file name: of a
    version 1 bundle (no chunk index members) unless ``chunked=True`` is passed."""
    kwargs.setdefault("chunked", False)
    data = make_bundle(**kwargs).read_bytes()
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for info in archive.getmembers():
            extracted = archive.extractfile(info)
            assert extracted is not None
            members[info.name] = extracted.read()
    return json.loads(members.pop("manifest.json")), {
        k: v for k, v in members.items() if k != "manifest.sig"
    }


def forge(
    doc: dict[str, object] | bytes, key: SigningKey, images: list[tuple[str, bytes]]
) -> bytes:
    manifest_bytes = (
        doc
        if isinstance(doc, bytes)
        else json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    )
    return raw_bundle([*signed_members(manifest_bytes, key), *images])


def test_forged_bundle_helper_produces_a_valid_bundle(
    make_bundle: MakeBundle, key: SigningKey, keyring: Keyring
) -> None:
    doc, images = manifest_doc(make_bundle)
    verify_bytes(forge(doc, key, list(images.items())), keyring)


def test_unknown_format_version(make_bundle: MakeBundle, key: SigningKey, keyring: Keyring) -> None:
    doc, images = manifest_doc(make_bundle)
    doc["format"] = 3
    with pytest.raises(ManifestError, match="unknown format version 3"):
        verify_bytes(forge(doc, key, list(images.items())), keyring)


def test_non_utf8_manifest(make_bundle: MakeBundle, key: SigningKey, keyring: Keyring) -> None:
    doc, images = manifest_doc(make_bundle)
    raw = (
        json.dumps(doc, sort_keys=True, separators=(",", ":"))
        .encode()
        .replace(b"metrica-fleet", b"metrica\xe9")
    )
    with pytest.raises(ManifestError, match="not UTF-8"):
        verify_bytes(forge(raw, key, list(images.items())), keyring)


def test_missing_image(make_bundle: MakeBundle, key: SigningKey, keyring: Keyring) -> None:
    doc, images = manifest_doc(make_bundle, bootfs=True)
    first = next(iter(images.items()))
    with pytest.raises(BundleFormatError, match="'bootfs.vfat' named in the manifest is missing"):
        verify_bytes(forge(doc, key, [first]), keyring)


def test_duplicate_image(make_bundle: MakeBundle, key: SigningKey, keyring: Keyring) -> None:
    doc, images = manifest_doc(make_bundle)
    member = next(iter(images.items()))
    with pytest.raises(BundleFormatError, match="'rootfs.ext4' appears twice"):
        verify_bytes(forge(doc, key, [member, member]), keyring)


def test_duplicate_signature_member(
    make_bundle: MakeBundle, key: SigningKey, keyring: Keyring
) -> None:
    doc, images = manifest_doc(make_bundle)
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    members = signed_members(raw, key)
    with pytest.raises(BundleFormatError, match="'manifest.sig' appears twice"):
        verify_bytes(raw_bundle([*members, members[1], *images.items()]), keyring)


def test_extra_and_reordered_members(
    make_bundle: MakeBundle, key: SigningKey, keyring: Keyring
) -> None:
    doc, images = manifest_doc(make_bundle, bootfs=True)
    members = list(images.items())
    with pytest.raises(BundleFormatError, match="'evil.sh' is not named in the manifest"):
        verify_bytes(forge(doc, key, [*members, ("evil.sh", b"#!/bin/sh\n")]), keyring)
    with pytest.raises(BundleFormatError, match="is out of place"):
        verify_bytes(forge(doc, key, members[::-1]), keyring)
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    sig_first = signed_members(raw, key)[::-1]
    with pytest.raises(BundleFormatError, match="'manifest.sig' where 'manifest.json' must be"):
        verify_bytes(raw_bundle([*sig_first, *members]), keyring)


def _bad_member_bundle(make_bundle: MakeBundle, key: SigningKey, info: tarfile.TarInfo) -> bytes:
    doc, _ = manifest_doc(make_bundle)
    good = forge(doc, key, [])
    prefix = good[: -len(END_OF_ARCHIVE)]
    return prefix + info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict") + END_OF_ARCHIVE


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("rootfs.ext4", tarfile.SYMTYPE, "symbolic link"),
        ("rootfs.ext4", tarfile.CHRTYPE, "character device node"),
        ("rootfs.ext4", tarfile.BLKTYPE, "block device node"),
        ("rootfs.ext4", tarfile.LNKTYPE, "hard link"),
        ("../rootfs.ext4", tarfile.REGTYPE, "not a plain file name"),
        ("/rootfs.ext4", tarfile.REGTYPE, "not a plain file name"),
        ("../../etc/passwd", tarfile.REGTYPE, "not a plain file name"),
    ],
)
def test_unsafe_members_are_refused(
    make_bundle: MakeBundle, key: SigningKey, keyring: Keyring, name: str, kind: bytes, message: str
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = "/dev/sda" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    with pytest.raises(BundleFormatError, match=message):
        verify_bytes(_bad_member_bundle(make_bundle, key, info), keyring)


def test_absurd_sizes_in_headers(
    make_bundle: MakeBundle, key: SigningKey, keyring: Keyring
) -> None:
    doc, images = manifest_doc(make_bundle)
    from image_builder.container import MemberHeader, encode_header

    huge_manifest = encode_header(MemberHeader("manifest.json", 1 << 60, 0)) + bytes(BLOCK)
    with pytest.raises(BundleFormatError, match="manifest.json claims 1152921504606846976 bytes"):
        verify_bytes(huge_manifest, keyring)

    good = forge(doc, key, list(images.items()))
    sig_end = BundleReader(io.BytesIO(good))
    sig_end.read_header()
    offset = sig_end.bytes_read
    huge_image = (
        good[:offset]
        + encode_header(MemberHeader("rootfs.ext4", 1 << 45, 1_700_000_000))
        + good[offset + BLOCK :]
    )
    with pytest.raises(BundleFormatError, match="is 35184372088832 bytes, the manifest says"):
        verify_bytes(huge_image, keyring)

    images_doc = doc["images"]
    assert isinstance(images_doc, list)
    images_doc[0]["size"] = 1 << 50
    with pytest.raises(ManifestError, match="out of range"):
        verify_bytes(forge(doc, key, list(images.items())), keyring)


def test_image_larger_than_declared(
    make_bundle: MakeBundle, key: SigningKey, keyring: Keyring
) -> None:
    """A signed manifest that under-declares the uncompressed size stops the stream early."""
    doc, images = manifest_doc(make_bundle, compression="zstd", size=200_000)
    images_doc = doc["images"]
    assert isinstance(images_doc, list)
    images_doc[0]["uncompressed_size"] = 100_000
    reader = BundleReader(io.BytesIO(forge(doc, key, list(images.items()))))
    reader.verify(keyring)
    image = next(reader.images())
    delivered = 0
    with pytest.raises(ImageIntegrityError, match="larger than the 100000 bytes declared"):
        while chunk := image.stream.read(65536):
            delivered += len(chunk)
    assert delivered <= 100_000


def test_image_stream_checks_before_reporting_the_end(
    make_bundle: MakeBundle, keyring: Keyring
) -> None:
    """A stream of the wrong bytes never returns end-of-stream: it raises instead."""
    data = make_bundle(size=10_000).read_bytes()
    entry = read_bundle_info_bytes(data).images[0]
    stream = ImageStream(entry, io.BytesIO(bytes(entry.size)))
    received = b""
    with pytest.raises(ImageIntegrityError, match="SHA-256"):
        while chunk := stream.read(4096):
            received += chunk
    assert len(received) == entry.size
    short = ImageStream(entry, io.BytesIO(bytes(entry.size - 1)))
    with pytest.raises(ImageIntegrityError, match="ends 1 bytes early"):
        while short.read(4096):
            pass


def read_bundle_info_bytes(data: bytes) -> Manifest:
    return BundleReader(io.BytesIO(data)).read_header()[0]


# --- authenticity --------------------------------------------------------------------------


def test_wrong_key(make_bundle: MakeBundle, tmp_path: Path) -> None:
    path = make_bundle()
    other = generate_key(tmp_path / "keys" / "other")
    ring = tmp_path / "other-ring"
    trust_key(ring, tmp_path / "keys" / "other.pub")
    with pytest.raises(UnknownKeyError, match="none trusted"):
        verify_bundle(path, Keyring.load(ring))
    assert other.key_id not in str(path.read_bytes())


def test_revoked_key(
    make_bundle: MakeBundle, key: SigningKey, keyring_dir: Path, tmp_path: Path
) -> None:
    generate_key(tmp_path / "keys" / "next")
    trust_key(keyring_dir, tmp_path / "keys" / "next.pub")
    revoke_key(keyring_dir, key.key_id)
    with pytest.raises(RevokedKeyError, match=key.key_id):
        verify_bundle(make_bundle(), Keyring.load(keyring_dir))


def test_threshold_not_met(make_bundle: MakeBundle, keyring_dir: Path, tmp_path: Path) -> None:
    generate_key(tmp_path / "keys" / "second")
    trust_key(keyring_dir, tmp_path / "keys" / "second.pub")
    set_threshold(keyring_dir, 2)
    with pytest.raises(ThresholdError, match="requires 2"):
        verify_bundle(make_bundle(), Keyring.load(keyring_dir))


def test_signature_over_other_manifest_is_bad(
    make_bundle: MakeBundle, key: SigningKey, keyring: Keyring
) -> None:
    doc, images = manifest_doc(make_bundle)
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    members = signed_members(raw, key)
    doc["security_version"] = 99
    tampered = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(BadSignatureError):
        verify_bytes(
            raw_bundle([("manifest.json", tampered), members[1], *images.items()]), keyring
        )


# --- the writer ----------------------------------------------------------------------------


def test_failed_create_leaves_nothing_and_keeps_the_old_output(
    key: SigningKey, make_image: Callable[..., Path], tmp_path: Path
) -> None:
    output = tmp_path / "out.bundle"
    output.write_bytes(b"previous release")
    image = make_image()
    cases = [
        ({"images": [ImageSource("rootfs", tmp_path / "missing.img")]}, "not a regular file"),
        ({"images": [ImageSource("rootfs", image), ImageSource("rootfs", image)]}, "two images"),
        ({"images": [ImageSource("kernel", image)]}, "unknown slot class"),
        ({"images": [ImageSource("rootfs", image)], "version": "v1"}, "semantic version"),
        ({"images": [ImageSource("rootfs", image)], "compatible": "a b"}, "1-128 characters"),
        ({"images": [ImageSource("rootfs", image)], "compression": "lz4"}, "unknown compression"),
        ({"images": []}, "at least one image"),
    ]
    for kwargs, message in cases:
        arguments: dict[str, object] = {
            "keys": [key],
            "compatible": "c",
            "version": "1.0.0",
            "security_version": 0,
            "compression": "zstd",
        }
        arguments.update(kwargs)
        with pytest.raises(FleetError, match=message):
            create_bundle(output, **arguments)  # type: ignore[arg-type]
        assert output.read_bytes() == b"previous release"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "keys", "out.bundle"]
    empty = tmp_path / "images" / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(BundleError, match="is empty"):
        create_bundle(
            output,
            images=[ImageSource("rootfs", empty)],
            keys=[key],
            compatible="c",
            version="1.0.0",
            security_version=0,
        )


def test_header_change_that_keeps_the_checksum_is_detected(
    make_bundle: MakeBundle, keyring: Keyring
) -> None:
    """Raise one mtime digit and lower another: the additive checksum stays the same."""
    data = bytearray(make_bundle().read_bytes())
    mtime = data[136:147]
    digits = [int(chr(d)) for d in mtime]
    up = next(i for i in range(10, -1, -1) if digits[i] < 7)
    down = next(i for i in range(10, -1, -1) if i != up and digits[i] > 0)
    data[136 + up] += 1
    data[136 + down] -= 1
    with pytest.raises(BundleFormatError, match="mtime"):
        verify_bytes(bytes(data), keyring)


# --- the reader's read sizes, limits and messages -------------------------------------------


def entry_for(stored: bytes, image: bytes, compression: str) -> ImageEntry:
    return ImageEntry(
        slot_class="rootfs",
        filename="rootfs.ext4" + (".zst" if compression == "zstd" else ""),
        compression=compression,
        size=len(stored),
        sha256=hashlib.sha256(stored).hexdigest(),
        uncompressed_size=len(image),
        uncompressed_sha256=hashlib.sha256(image).hexdigest(),
    )


IMAGE = bytes(range(256)) * 40  # 10240 bytes


def test_image_stream_reads_what_is_asked_and_never_past_its_stored_bytes() -> None:
    raw = io.BytesIO(IMAGE + b"next member")
    stream = ImageStream(entry_for(IMAGE, IMAGE, "none"), raw)
    assert stream.read(0) == b""
    assert stream.read(1) == IMAGE[:1]
    assert stream.read(10) == IMAGE[1:11]
    assert stream.read() == IMAGE[11:]  # at most CHUNK, and all that is left
    assert raw.read() == b"next member"  # the stream stopped at the image's last byte
    assert stream.read() == b""
    assert stream.verified
    assert stream.read() == b""  # and stays at its end
    assert stream.read(5) == b""


def test_one_read_returns_at_most_chunk_by_default_and_max_read_when_asked_for_more() -> None:
    image = bytes(range(251)) * ((MAX_READ + 4 * CHUNK) // 251 + 1)
    stream = ImageStream(entry_for(image, image, "none"), io.BytesIO(image))
    assert len(stream.read()) == CHUNK
    assert len(stream.read(-1)) == CHUNK
    assert len(stream.read(None)) == CHUNK  # type: ignore[arg-type]
    assert len(stream.read(2 * MAX_READ)) == MAX_READ


def test_an_image_of_several_zstd_frames_is_read_whole() -> None:
    """Concatenated frames are one valid zstd stream (multi-threaded compressors write them)."""
    half = len(IMAGE) // 2
    compressor = zstandard.ZstdCompressor()
    stored = compressor.compress(IMAGE[:half]) + compressor.compress(IMAGE[half:])
    stream = ImageStream(entry_for(stored, IMAGE, "zstd"), io.BytesIO(stored))
    out = b""
    while chunk := stream.read(4096):
        out += chunk
    assert out == IMAGE and stream.verified


def test_image_stream_errors_name_the_image() -> None:
    short = entry_for(IMAGE[:-1], IMAGE, "none")
    with pytest.raises(ImageIntegrityError, match="^image: 10239 bytes, manifest declares 10240$"):
        read_stream(ImageStream(short, io.BytesIO(IMAGE[:-1])))
    changed = io.BytesIO(IMAGE[::-1])
    with pytest.raises(
        ImageIntegrityError, match="^image: SHA-256 of stored bytes does not match$"
    ):
        read_stream(ImageStream(entry_for(IMAGE, IMAGE, "none"), changed))


def test_zstd_image_errors_name_the_image() -> None:
    stored = zstandard.ZstdCompressor().compress(IMAGE)
    entry = entry_for(stored, IMAGE, "zstd")
    # the uncompressed bytes hash differently than declared
    wrong = dataclasses.replace(entry, uncompressed_sha256="0" * 64)
    with pytest.raises(ImageIntegrityError, match="^img: SHA-256 of image does not match$"):
        read_stream(ImageStream(wrong, io.BytesIO(stored), name="img"))
    broken = stored[:4] + b"\xff" + stored[5:]  # reserved bits in the frame descriptor
    with pytest.raises(ImageIntegrityError, match="^img: corrupt zstd data: "):
        read_stream(ImageStream(entry_for(broken, IMAGE, "zstd"), io.BytesIO(broken), name="img"))


def read_stream(stream: ImageStream) -> bytes:
    out = b""
    while chunk := stream.read(4096):
        out += chunk
    return out


def test_image_offsets_are_where_the_stored_bytes_are(
    make_bundle: MakeBundle, keyring: Keyring
) -> None:
    path = make_bundle(compression="zstd", bootfs=True)
    data = path.read_bytes()
    with open(path, "rb") as handle:
        reader = BundleReader(handle)
        reader.verify(keyring)
        for image in reader.images():
            stored = data[image.offset : image.offset + image.entry.size]
            assert hashlib.sha256(stored).hexdigest() == image.entry.sha256
            read_stream(image.stream)


def test_bundle_images_are_read_once(make_bundle: MakeBundle, keyring: Keyring) -> None:
    reader = BundleReader(io.BytesIO(make_bundle().read_bytes()))
    reader.verify(keyring)
    for image in reader.images():
        read_stream(image.stream)
    with pytest.raises(BundleError, match="^bundle: images can be read only once$"):
        next(reader.images())


def test_bundle_errors_name_the_bundle_file(make_bundle: MakeBundle, keyring: Keyring) -> None:
    path = make_bundle(chunked=False)
    path.write_bytes(path.read_bytes()[:-700])
    with pytest.raises(BundleFormatError, match=f"^{path}: truncated: a tar header ends"):
        verify_bundle(path, keyring)
    with pytest.raises(BundleFormatError, match="^bundle: truncated: a tar header ends"):
        verify_stream(io.BytesIO(path.read_bytes()), keyring)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BundleFormatError, match=f"^{path}: truncated: padding after manifest.json"):
        read_bundle_info(path)


def test_damaged_end_of_archive_and_members_missing_are_named(
    make_bundle: MakeBundle, keyring: Keyring
) -> None:
    data = make_bundle().read_bytes()
    damaged = data[:-BLOCK] + b"\1" + bytes(BLOCK - 1)
    with pytest.raises(BundleFormatError, match="^bundle: damaged end-of-archive marker$"):
        verify_bytes(damaged, keyring)
    cut = data[: -2 * BLOCK] + bytes(BLOCK)
    with pytest.raises(
        BundleFormatError, match="truncated: the end-of-archive marker ends after 0"
    ):
        verify_bytes(cut, keyring)
    manifest_only = raw_bundle([("manifest.json", read_member(data, "manifest.json"))])
    with pytest.raises(BundleFormatError, match="^bundle: ends before manifest.sig$"):
        verify_bytes(manifest_only, keyring)


def read_member(data: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return archive.extractfile(name).read()  # type: ignore[union-attr]


def test_header_errors_give_the_offset_of_the_header(
    make_bundle: MakeBundle, keyring: Keyring
) -> None:
    data = bytearray(make_bundle().read_bytes())
    manifest = read_member(bytes(data), "manifest.json")
    second_header = BLOCK + len(manifest) + padding(len(manifest))
    data[second_header + 100] ^= 0xFF  # mode field of manifest.sig's header
    with pytest.raises(BundleFormatError, match=f"tar header at offset {second_header}"):
        verify_bytes(bytes(data), keyring)


def test_signature_member_of_exactly_the_envelope_limit_is_read(
    make_bundle: MakeBundle, key: SigningKey, keyring: Keyring
) -> None:
    manifest = read_member(make_bundle().read_bytes(), "manifest.json")
    at_limit = raw_bundle(
        [("manifest.json", manifest), ("manifest.sig", b"x" * MAX_ENVELOPE_BYTES)]
    )
    with pytest.raises(BundleFormatError, match="signature envelope: not JSON"):
        verify_bytes(at_limit, keyring)
    over = raw_bundle(
        [("manifest.json", manifest), ("manifest.sig", b"x" * (MAX_ENVELOPE_BYTES + 1))]
    )
    with pytest.raises(
        BundleFormatError, match=f"manifest.sig claims {MAX_ENVELOPE_BYTES + 1} bytes"
    ):
        verify_bytes(over, keyring)


def test_an_unknown_member_in_place_of_an_image_is_named_as_such(
    make_bundle: MakeBundle, key: SigningKey, keyring: Keyring
) -> None:
    data = make_bundle().read_bytes()
    manifest = read_member(data, "manifest.json")
    forged = raw_bundle([*signed_members(manifest, key), ("evil.bin", b"x")])
    with pytest.raises(BundleFormatError, match="'evil.bin' is not named in the manifest"):
        verify_bytes(forged, keyring)


def test_nothing_is_verified_before_verify(make_bundle: MakeBundle) -> None:
    reader = BundleReader(io.BytesIO(make_bundle().read_bytes()))
    assert reader.signed_by == ()
    with pytest.raises(BundleError, match="^bundle: manifest not verified$"):
        reader.manifest  # noqa: B018
    with pytest.raises(BundleError, match="^bundle: manifest not verified$"):
        reader.manifest_sha256  # noqa: B018
    reader.read_header()  # only looking verifies nothing either
    with pytest.raises(BundleError, match="^bundle: manifest not verified$"):
        reader.manifest  # noqa: B018
    with pytest.raises(BundleError, match="^bundle: images read before the manifest was verified$"):
        next(reader.images())


def test_truncation_and_padding_errors_name_the_member(
    make_bundle: MakeBundle, keyring: Keyring
) -> None:
    data = make_bundle(size=3000).read_bytes()
    manifest = read_member(data, "manifest.json")
    with pytest.raises(
        BundleFormatError, match="^bundle: truncated: manifest.json ends after 88 of"
    ):
        verify_bytes(data[: BLOCK + 88], keyring)
    end_of_manifest = BLOCK + len(manifest)
    with pytest.raises(
        BundleFormatError, match="^bundle: truncated: padding after manifest.json ends after 3 of"
    ):
        verify_bytes(data[: end_of_manifest + 3], keyring)
    image_at = next(image.offset for image in read_all_images(data, keyring))
    with pytest.raises(BundleFormatError, match="^bundle: truncated inside rootfs.ext4$"):
        verify_bytes(data[: image_at + 100], keyring)
    padded = bytearray(data)
    padded[image_at + 3000] = 1  # the first padding byte after the 3000-byte image
    with pytest.raises(BundleFormatError, match="^bundle: non-zero padding after rootfs.ext4$"):
        verify_bytes(bytes(padded), keyring)
    changed = bytearray(data)
    changed[image_at + 10] ^= 1
    with pytest.raises(
        ImageIntegrityError, match="^bundle: image 'rootfs.ext4': SHA-256 of stored"
    ):
        verify_bytes(bytes(changed), keyring)


def read_all_images(data: bytes, keyring: Keyring) -> list[BundleImage]:
    reader = BundleReader(io.BytesIO(data))
    reader.verify(keyring)
    images = []
    for image in reader.images():
        read_stream(image.stream)
        images.append(image)
    return images


class Trickle(io.RawIOBase):
    """A stream that returns a few bytes a read, as a pipe or a socket may."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._data.read(min(7, size) if size >= 0 else 7)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_bundle_from_a_stream_of_short_reads(
    make_bundle: MakeBundle, keyring: Keyring, compression: str
) -> None:
    data = make_bundle(compression=compression, bootfs=True).read_bytes()
    verified = verify_stream(Trickle(data), keyring)  # type: ignore[arg-type]
    assert verified.size == len(data)
    assert verified.signed_by == keyring.active_key_ids


def test_an_image_read_up_to_its_last_byte_then_the_rest(
    make_bundle: MakeBundle, keyring: Keyring
) -> None:
    data = make_bundle(size=3000).read_bytes()
    reader = BundleReader(io.BytesIO(data))
    reader.verify(keyring)
    for image in reader.images():
        first = image.stream.read(2999)
        assert len(first) == 2999
        assert len(image.stream.read()) == 1
        assert image.stream.read() == b""
        assert image.stream.verified


@pytest.mark.parametrize("byte", [1, ord("X"), 0xFF])
def test_any_non_zero_padding_byte_is_refused(
    make_bundle: MakeBundle, keyring: Keyring, byte: int
) -> None:
    data = bytearray(make_bundle(size=3000).read_bytes())
    image_at = read_all_images(bytes(data), keyring)[0].offset
    data[image_at + 3000] = byte
    with pytest.raises(BundleFormatError, match="non-zero padding after rootfs.ext4"):
        verify_bytes(bytes(data), keyring)
