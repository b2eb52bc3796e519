"""Version 2 bundles: images in content-defined chunks, each with a chunk index member; and
version 1 bundles, which every reader still accepts."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from image_builder.bundle import BundleReader, verify_bundle
from image_builder.bundle_writer import ImageSource, create_bundle
from image_builder.chunks import CHUNK_MAX, CHUNK_MIN, ChunkIndex, cut, file_reader, unpack
from image_builder.errors import ImageIntegrityError, ManifestError
from signing import Keyring, SigningKey
from tests.integration.test_bundle import forge

MakeBundle = Callable[..., Path]


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]


def image_bytes(size: int, seed: int = 1) -> bytes:
    """Text and random stretches, as a file system image holds: chunks of every size."""
    rng = __import__("random").Random(seed)
    parts = []
    while sum(map(len, parts)) < size:
        parts.append(rng.randbytes(rng.randrange(1, 200_000)))
        parts.append(b"config line %d\n" % rng.randrange(10**6) * rng.randrange(1, 5000))
    return b"".join(parts)[:size]


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_version_2_bundle_carries_an_index_whose_chunks_are_the_image(
    tmp_path: Path, key: SigningKey, keyring: Keyring, compression: str
) -> None:
    data = image_bytes(3_000_000)
    (tmp_path / "rootfs.ext4").write_bytes(data)
    manifest = create_bundle(
        tmp_path / "r.bundle", images=[ImageSource("rootfs", tmp_path / "rootfs.ext4")],
        keys=[key], compatible="c", version="1.0.0", security_version=1,
        compression=compression, created=1_700_000_000,
    )  # fmt: skip
    assert manifest.format == 2
    entry = manifest.images[0]
    assert entry.chunk_index is not None
    stored = members(tmp_path / "r.bundle")
    raw_index = stored[entry.chunk_index_name]
    assert len(raw_index) == entry.chunk_index.size
    assert hashlib.sha256(raw_index).hexdigest() == entry.chunk_index.sha256
    index = ChunkIndex.from_bytes(
        raw_index, image_size=len(data), stored_size=entry.size, compression=compression,
        where="t",
    )  # fmt: skip
    assert len(index) > 10
    image = stored[entry.filename]
    rebuilt = b"".join(
        unpack(image[c.stored_offset : c.stored_offset + c.stored_length], c, compression)
        for c in index.chunks()
    )
    assert rebuilt == data
    assert all(CHUNK_MIN <= c.length <= CHUNK_MAX for c in list(index.chunks())[:-1])
    # the reader checks the index member and hands it over
    with open(tmp_path / "r.bundle", "rb") as handle:
        reader = BundleReader(handle)
        reader.verify(keyring)
        for bundle_image in reader.images():
            while bundle_image.stream.read(1 << 20):
                pass
    offset, parsed = reader.chunk_indexes[entry.filename]
    assert parsed == index
    assert (tmp_path / "r.bundle").read_bytes()[offset : offset + len(raw_index)] == raw_index


def test_chunks_are_cut_the_same_whether_the_image_is_read_whole_or_in_windows() -> None:
    from fastcdc import fastcdc

    data = image_bytes(40_000_000, seed=3)
    whole = [(c.offset, c.length) for c in fastcdc(data, CHUNK_MIN, 64 << 10, CHUNK_MAX)]
    pieces = cut(file_reader(io.BytesIO(data)), len(data))
    windowed = [(offset, len(view)) for offset, view in pieces]
    assert windowed == whole


def test_unchanged_data_gives_the_same_chunks_wherever_it_moved() -> None:
    base = image_bytes(4_000_000, seed=5)
    moved = os.urandom(12_345) + base  # everything shifted by an odd number of bytes

    def digests(data: bytes) -> set[bytes]:
        return {
            hashlib.sha256(view).digest()
            for _, view in cut(file_reader(io.BytesIO(data)), len(data))
        }

    shared = digests(base) & digests(moved)
    assert len(shared) >= len(digests(base)) - 2


def test_a_version_1_bundle_still_verifies_and_has_no_index(
    make_bundle: MakeBundle, keyring: Keyring
) -> None:
    path = make_bundle(chunked=False, compression="zstd", size=100_000)
    verified = verify_bundle(path, keyring)
    assert verified.manifest.format == 1
    assert verified.manifest.images[0].chunk_index is None
    assert sorted(members(path)) == ["manifest.json", "manifest.sig", "rootfs.ext4.zst"]


def forged_v2(make_bundle: MakeBundle) -> tuple[dict, dict[str, bytes]]:
    stored = members(make_bundle(size=300_000))
    doc = json.loads(stored.pop("manifest.json"))
    stored.pop("manifest.sig")
    return doc, stored


def test_a_changed_index_member_is_refused(
    make_bundle: MakeBundle, key: SigningKey, keyring: Keyring
) -> None:
    doc, stored = forged_v2(make_bundle)
    name = "rootfs.ext4.chunks"
    index = bytearray(stored[name])
    index[-1] ^= 1
    stored[name] = bytes(index)
    with pytest.raises(ImageIntegrityError, match="index 'rootfs.ext4.chunks' does not match"):
        verify_stream_bytes(forge(doc, key, list(stored.items())), keyring)


def test_a_missing_index_member_is_refused(
    make_bundle: MakeBundle, key: SigningKey, keyring: Keyring
) -> None:
    doc, stored = forged_v2(make_bundle)
    del stored["rootfs.ext4.chunks"]
    with pytest.raises(Exception, match="ends before rootfs.ext4.chunks"):
        verify_stream_bytes(forge(doc, key, list(stored.items())), keyring)


def test_a_signed_index_that_does_not_add_up_is_refused(
    make_bundle: MakeBundle, key: SigningKey, keyring: Keyring
) -> None:
    """Signed by a trusted key, and still refused: the index claims more than the image."""
    doc, stored = forged_v2(make_bundle)
    name = "rootfs.ext4.chunks"
    index = bytearray(stored[name])
    last = len(index) - 40
    length, stored_length, digest = struct.unpack_from(">II32s", index, last)
    struct.pack_into(">II32s", index, last, length + 1, stored_length + 1, digest)
    stored[name] = bytes(index)
    doc["images"][0]["chunk_index"]["sha256"] = hashlib.sha256(index).hexdigest()
    with pytest.raises(ManifestError, match="chunks add up to 300001 bytes, the image is 300000"):
        verify_stream_bytes(forge(doc, key, list(stored.items())), keyring)


def test_a_version_1_manifest_may_not_name_a_chunk_index(
    make_bundle: MakeBundle, key: SigningKey, keyring: Keyring
) -> None:
    doc, stored = forged_v2(make_bundle)
    doc["format"] = 1
    with pytest.raises(ManifestError, match="unknown field.s. chunk_index"):
        verify_stream_bytes(forge(doc, key, list(stored.items())), keyring)


def test_an_index_name_may_not_collide_with_another_member(
    make_bundle: MakeBundle, key: SigningKey, keyring: Keyring
) -> None:
    doc, stored = forged_v2(make_bundle)
    second = dict(doc["images"][0], slot_class="bootfs", filename="rootfs.ext4.chunks")
    del second["chunk_index"]
    doc["images"].append(second)
    with pytest.raises(ManifestError, match="two members named 'rootfs.ext4.chunks'"):
        verify_stream_bytes(forge(doc, key, list(stored.items())), keyring)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XXCHUNK1" + b[8:], "not a chunk index"),
        (lambda b: b[:-1], "does not hold the 1 chunks"),
        (lambda b: b[:8] + struct.pack(">III", 10, 10, 10) + b[20:], "out of range"),
        (lambda b: b[:28] + struct.pack(">I", 0) + b[32:], "chunk 0 is 0 bytes"),
        (lambda b: b[:32] + struct.pack(">I", 0) + b[36:], "stored in 0 bytes"),
        (lambda b: b[:20] + struct.pack(">Q", 0), "lists no chunk"),
    ],
)
def test_damaged_indexes_name_the_problem(mutate: Callable[[bytes], bytes], message: str) -> None:
    data = b"x" * 5000
    index = ChunkIndex((5000,), (5000,), (hashlib.sha256(data).digest(),))
    raw = index.to_bytes()
    assert ChunkIndex.from_bytes(raw, image_size=5000, stored_size=5000, compression="none",
                                 where="t") == index  # fmt: skip
    with pytest.raises(ManifestError, match=message):
        ChunkIndex.from_bytes(mutate(raw), image_size=5000, stored_size=5000,
                              compression="none", where="t")  # fmt: skip


def test_a_zstd_frame_claiming_another_size_is_refused_before_it_is_decompressed() -> None:
    import zstandard

    data = b"a" * 10_000
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(data * 100)
    index = ChunkIndex((10_000,), (len(frame),), (hashlib.sha256(data).digest(),))
    chunk = next(index.chunks())
    with pytest.raises(ImageIntegrityError, match="declares 1000000 bytes, the index says 10000"):
        unpack(frame, chunk, "zstd")
    good = zstandard.ZstdCompressor(write_content_size=True).compress(data)
    for extra in (good + b"\0", good + good, good[:-2]):  # one frame, all of it, nothing else
        index = ChunkIndex((10_000,), (len(extra),), (hashlib.sha256(data).digest(),))
        with pytest.raises(ImageIntegrityError, match="not exactly one zstd frame|corrupt"):
            unpack(extra, next(index.chunks()), "zstd")
    wrong = ChunkIndex((10_000,), (len(good),), (bytes(32),))
    with pytest.raises(ImageIntegrityError, match="do not match the chunk index"):
        unpack(good, next(wrong.chunks()), "zstd")


def verify_stream_bytes(data: bytes, keyring: Keyring) -> None:
    from image_builder.bundle import verify_stream

    verify_stream(io.BytesIO(data), keyring)
