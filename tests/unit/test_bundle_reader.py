"""A bundle read in parts (SplitBundleReader): the manifest and signature as bytes, each image
fetched on its own, with the same verify-first, verify-while-reading contract as a bundle file."""

from __future__ import annotations

import gc
import hashlib
import io
import tarfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pytest

from image_builder.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleReader,
    ImageStream,
    SplitBundleReader,
)
from image_builder.errors import BundleError, BundleFormatError, ImageIntegrityError
from image_builder.manifest import ImageEntry
from signing import Keyring
from signing.errors import UnknownKeyError
from signing.keyring import trust_key
from signing.keys import generate_key

MakeBundle = Callable[..., Path]


class Parts:
    """The parts of a bundle as a server hands them out, and a record of what was fetched."""

    def __init__(self, bundle: Path) -> None:
        with tarfile.open(bundle) as archive:
            self.members = {
                member.name: archive.extractfile(member).read()  # type: ignore[union-attr]
                for member in archive.getmembers()
            }
        with open(bundle, "rb") as handle:
            manifest, _, _ = BundleReader(handle).read_header()
        self.image_names = [entry.filename for entry in manifest.images]
        self.manifest_bytes = self.members[MANIFEST_NAME]
        self.envelope_bytes = self.members[SIGNATURE_NAME]
        self.fetched: list[str] = []
        self.closed: list[str] = []

    def open_image(self, entry: ImageEntry) -> BinaryIO:
        self.fetched.append(entry.filename)
        parts = self

        class Blob(io.BytesIO):
            def close(self) -> None:
                parts.closed.append(entry.filename)
                super().close()

        return Blob(self.members[entry.filename])

    def reader(self, **changes: bytes) -> SplitBundleReader:
        return SplitBundleReader(
            changes.get("manifest", self.manifest_bytes),
            changes.get("envelope", self.envelope_bytes),
            self.open_image,
        )


def read_all(stream: BinaryIO | ImageStream) -> bytes:
    chunks = []
    while chunk := stream.read(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def images_of(bundle: Path, keyring: Keyring) -> list[tuple[str, bytes]]:
    with open(bundle, "rb") as handle:
        reader = BundleReader(handle)
        reader.verify(keyring)
        return [(image.entry.filename, read_all(image.stream)) for image in reader.images()]


@pytest.fixture
def bundle(make_bundle: MakeBundle) -> Path:
    return make_bundle(compression="zstd", bootfs=True, size=5000)


def test_verify_then_each_image_in_order_fetched_only_when_its_turn_comes(
    bundle: Path, keyring: Keyring
) -> None:
    parts = Parts(bundle)
    reader = parts.reader()
    manifest = reader.verify(keyring)
    assert [entry.filename for entry in manifest.images] == parts.image_names
    assert reader.manifest == manifest
    assert reader.manifest_sha256 == hashlib.sha256(parts.manifest_bytes).hexdigest()
    assert reader.signed_by == keyring.active_key_ids
    assert parts.fetched == []

    read = []
    for image in reader.images():
        assert parts.fetched[-1] == image.entry.filename
        assert image.offset == 0
        read.append((image.entry.filename, read_all(image.stream)))
        assert image.stream.read(1) == b""
        assert image.stream.verified
    assert read == images_of(bundle, keyring)
    assert len(read) == 2
    assert parts.closed == parts.fetched == [name for name, _ in read]


def test_nothing_before_verify(bundle: Path) -> None:
    reader = Parts(bundle).reader()
    assert reader.signed_by == ()
    with pytest.raises(BundleError, match="^release: manifest not verified$"):
        reader.manifest  # noqa: B018
    with pytest.raises(BundleError, match="^release: manifest not verified$"):
        reader.manifest_sha256  # noqa: B018
    with pytest.raises(BundleError, match="^release: manifest not verified$"):
        next(reader.images())


def test_a_failed_verification_leaves_the_manifest_unverified(bundle: Path, tmp_path: Path) -> None:
    stranger = generate_key(tmp_path / "stranger")
    trust_key(tmp_path / "other-ring", tmp_path / "stranger.pub")
    reader = Parts(bundle).reader()
    with pytest.raises(UnknownKeyError):
        reader.verify(Keyring.load(tmp_path / "other-ring"))
    assert stranger.key_id not in reader.signed_by
    with pytest.raises(BundleError, match="manifest not verified"):
        reader.manifest  # noqa: B018
    with pytest.raises(BundleError, match="manifest not verified"):
        next(reader.images())


def test_a_damaged_envelope_is_a_format_error_naming_the_release(
    bundle: Path, keyring: Keyring
) -> None:
    parts = Parts(bundle)
    reader = SplitBundleReader(
        parts.manifest_bytes, parts.envelope_bytes[:-2], parts.open_image, name="1.0.0"
    )
    with pytest.raises(BundleFormatError, match="^1.0.0: signature envelope: "):
        reader.verify(keyring)


def test_images_are_read_once(bundle: Path, keyring: Keyring) -> None:
    reader = Parts(bundle).reader()
    reader.verify(keyring)
    for image in reader.images():
        read_all(image.stream)
    with pytest.raises(BundleError, match="^release: images can be read only once$"):
        next(reader.images())


def test_an_image_not_read_to_its_end_stops_the_release(bundle: Path, keyring: Keyring) -> None:
    parts = Parts(bundle)
    reader = parts.reader()
    reader.verify(keyring)
    images = reader.images()
    first = next(images)
    first.stream.read(10)
    with pytest.raises(BundleError, match=f"image {first.entry.filename!r} not read to its end"):
        next(images)
    assert parts.closed == [first.entry.filename]


def test_changed_image_bytes_are_caught_while_reading(bundle: Path, keyring: Keyring) -> None:
    parts = Parts(bundle)
    name = parts.image_names[0]
    data = bytearray(parts.members[name])
    data[len(data) // 2] ^= 1
    parts.members[name] = bytes(data)
    reader = parts.reader()
    reader.verify(keyring)
    images = reader.images()
    image = next(images)
    with pytest.raises(ImageIntegrityError, match=f"^release: image {name!r}: "):
        read_all(image.stream)


def test_image_stream_is_a_readable_raw_stream(bundle: Path, keyring: Keyring) -> None:
    parts = Parts(bundle)
    reader = parts.reader()
    entry = reader.verify(keyring).images[0]
    expected = dict(images_of(bundle, keyring))[entry.filename]
    stream = ImageStream(entry, io.BytesIO(parts.members[entry.filename]))
    assert stream.readable()
    buffer = bytearray(100)
    assert stream.readinto(buffer) == 100
    assert bytes(buffer) == expected[:100]
    # io's own buffered reader uses readinto and readable
    assert io.BufferedReader(stream).read() == expected[100:]
    assert stream.verified


def test_an_image_source_without_close(bundle: Path, keyring: Keyring) -> None:
    """open_image may hand back any reader, not only a file (a generator of an HTTP body)."""
    parts = Parts(bundle)

    class Reader:
        def __init__(self, data: bytes) -> None:
            self.read = io.BytesIO(data).read

    reader = SplitBundleReader(
        parts.manifest_bytes,
        parts.envelope_bytes,
        lambda entry: Reader(parts.members[entry.filename]),  # type: ignore[arg-type,return-value]
    )
    reader.verify(keyring)
    read = [(image.entry.filename, read_all(image.stream)) for image in reader.images()]
    assert read == images_of(bundle, keyring)


def test_an_image_stream_read_and_dropped_is_freed(bundle: Path, keyring: Keyring) -> None:
    """A daemon installs release after release: nothing of an install's image streams may stay
    behind (the decompressor's reader is invisible to the garbage collector, so a reference
    cycle through it is never freed)."""
    gone = []
    with open(bundle, "rb") as handle:
        reader = BundleReader(handle)
        reader.verify(keyring)
        for image in reader.images():
            assert image.entry.compression == "zstd"
            read_all(image.stream)
            gone.append(weakref.ref(image.stream))
        del image
    gc.collect()
    assert gone and all(ref() is None for ref in gone)
