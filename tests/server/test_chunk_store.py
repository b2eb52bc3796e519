"""The chunk store: chunked images kept as their chunks, each once across releases, served whole
or by range as blobs, checked chunk by chunk at upload, and exported for a static mirror."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import zstandard
from click.testing import CliRunner

from fleet_core.cli import fleet
from fleet_core.durable import set_boundary_hook
from image_builder.bundle_writer import ImageSource, create_bundle
from image_builder.chunks import ChunkIndex, unpack
from image_builder.container import BLOCK, decode_header, padding
from server.blobs import BlobStore
from server.chunkstore import SUFFIXES, ChunkStore
from server.datadir import sweep_leftovers
from server.models import Release, ReleaseImage
from signing.keys import SigningKey
from tests.conftest import assert_one_line_error, raw_bundle, require_tools, signed_members
from tests.server.conftest import Harness, listening_socket
from updater.client import Assignment

IMAGE_SIZE = 1_500_000
MTIME = 1_700_000_000


def image_bytes(seed: int = 1, size: int = IMAGE_SIZE) -> bytes:
    """Half words (compressible), half random bytes, in blocks: an image-like mixture."""
    rng = random.Random(seed)  # noqa: S311 (test data, repeatable)
    words = [
        bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(400)
    ]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(words, k=2000)) if rng.random() < 0.5 else rng.randbytes(16384)
    return bytes(out[:size])


def changed(data: bytes) -> bytes:
    """``data`` with a few bytes overwritten and 5000 bytes inserted: a patch release."""
    patched = bytearray(data)
    patched[300_000:300_100] = bytes(100)
    return bytes(patched[:900_000]) + b"inserted " * 555 + b"!!!!!" + bytes(patched[900_000:])


@pytest.fixture
def build(tmp_path: Path, key: SigningKey) -> Callable[..., Path]:
    """A signed bundle of one rootfs image of ``data``."""

    def make(data: bytes, version: str, *, compression: str = "zstd", chunked: bool = True) -> Path:
        source = tmp_path / "images" / f"{version}.img"
        source.parent.mkdir(exist_ok=True)
        source.write_bytes(data)
        output = tmp_path / f"{version}.bundle"
        create_bundle(
            output, images=[ImageSource("rootfs", source)], keys=[key], compatible="metrica-rpi4",
            version=version, security_version=1, compression=compression, created=MTIME,
            chunked=chunked,
        )  # fmt: skip
        return output

    return make


def chunk_files(harness: Harness) -> list[Path]:
    root = harness.settings.data_dir / "chunks"
    return sorted(p for p in root.glob("??/*") if p.is_file())


def stored_bytes(harness: Harness) -> int:
    stores = [harness.settings.blob_dir, harness.settings.data_dir / "chunks"]
    return sum(p.stat().st_size for store in stores for p in store.rglob("*") if p.is_file())


def uploaded(harness: Harness, bundle: Path) -> dict[str, Any]:
    response = harness.upload(bundle)
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


def members(bundle: Path | bytes) -> dict[str, bytes]:
    """The members of a bundle, by name."""
    data = bundle.read_bytes() if isinstance(bundle, Path) else bundle
    found = {}
    offset = 0
    while data[offset : offset + BLOCK] != bytes(BLOCK):
        header = decode_header(data[offset : offset + BLOCK], offset)
        offset += BLOCK
        found[header.name] = data[offset : offset + header.size]
        offset += header.size + padding(header.size)
    return found


def image_of(bundle: Path) -> bytes:
    """The stored bytes of the bundle's one image."""
    found = members(bundle)
    return found[json.loads(found["manifest.json"])["images"][0]["filename"]]


def index_of(bundle: Path) -> ChunkIndex:
    found = members(bundle)
    manifest = json.loads(found["manifest.json"])
    entry = manifest["images"][0]
    return ChunkIndex.from_bytes(
        found[entry["filename"] + ".chunks"], image_size=entry["uncompressed_size"],
        stored_size=entry["size"], compression=entry["compression"], where="test",
    )  # fmt: skip


def forge(
    bundle: Path, key: SigningKey, *, image: bytes | None = None, index: bytes | None = None
) -> bytes:
    """``bundle`` with its image's stored bytes or chunk index replaced, and a manifest that
    names them, signed with ``key``: only the chunk checks stand between it and the store."""
    found = members(bundle)
    manifest = json.loads(found["manifest.json"])
    entry = manifest["images"][0]
    name = entry["filename"]
    stored = found[name] if image is None else image
    chunks = found[name + ".chunks"] if index is None else index
    if entry["compression"] == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(stored), read_across_frames=True
        )
        raw = reader.read()
    else:
        raw = stored
    entry.update(size=len(stored), sha256=sha(stored), uncompressed_size=len(raw))
    entry.update(
        uncompressed_sha256=sha(raw), chunk_index={"size": len(chunks), "sha256": sha(chunks)}
    )
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    return raw_bundle(
        [*signed_members(manifest_bytes, key), (name, stored), (name + ".chunks", chunks)], MTIME
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def index_bytes(index: ChunkIndex, **changes: Any) -> bytes:
    return ChunkIndex(**{**index.__dict__, **changes}).to_bytes()


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_chunked_image_is_stored_as_its_chunks_and_served_whole_and_by_range(
    harness: Harness, build: Callable[..., Path], compression: str
) -> None:
    bundle = build(image_bytes(), "1.0.0", compression=compression)
    release = uploaded(harness, bundle)
    image = release["images"][0]
    index_ref = image["chunk_index"]
    assert index_ref["url"] == f"/blobs/{index_ref['sha256']}"
    # the index is a blob; the image is not stored whole, only as its chunks
    assert [p.name for p in harness.blob_files()] == [index_ref["sha256"]]
    index = index_of(bundle)
    assert harness.client.get(index_ref["url"]).content == index.to_bytes()
    assert len(index) > 10
    files = chunk_files(harness)
    assert {p.name for p in files} == {d.hex() + SUFFIXES[compression] for d in index.digests}
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files)
    assert all(p.parent.stat().st_mode & 0o777 == 0o700 for p in files)

    stored = image_of(bundle)
    whole = harness.client.get(image["url"])
    assert whole.status_code == 200
    assert whole.headers["etag"] == f'"{image["sha256"]}"'
    assert whole.headers["content-length"] == str(len(stored))
    assert whole.content == stored
    head = harness.client.head(image["url"])
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == str(len(stored))

    # runs of neighbouring chunks, as a device fetches them, and ranges cutting chunks anywhere
    chunks = list(index.chunks())
    size = len(stored)
    wanted = [
        (chunks[3].stored_offset, chunks[6].stored_offset + chunks[6].stored_length - 1),
        (chunks[0].stored_offset, chunks[0].stored_length - 1),
        (chunks[5].stored_offset - 1, chunks[5].stored_offset),
        (17, size - 18),
        (size - 1, size - 1),
    ]
    for first, last in wanted:
        part = harness.client.get(image["url"], headers={"Range": f"bytes={first}-{last}"})
        assert part.status_code == 206, (first, last)
        assert part.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert part.headers["content-length"] == str(last - first + 1)
        assert part.content == stored[first : last + 1]
    for number, chunk in enumerate(chunks):  # each chunk's range unpacks to the chunk
        last = chunk.stored_offset + chunk.stored_length - 1
        part = harness.client.get(
            image["url"], headers={"Range": f"bytes={chunk.stored_offset}-{last}"}
        )
        assert unpack(part.content, chunk, compression), number
    tail = harness.client.get(image["url"], headers={"Range": "bytes=-10"})
    assert (tail.status_code, tail.content) == (206, stored[-10:])
    for header in (f"bytes={size}-", f"bytes={size + 5}-{size + 9}"):
        refused = harness.client.get(image["url"], headers={"Range": header})
        assert refused.status_code == 416, header
        assert refused.headers["content-range"] == f"bytes */{size}"
    etag = whole.headers["etag"]
    same = harness.client.get(image["url"], headers={"Range": "bytes=10-19", "If-Range": etag})
    assert (same.status_code, same.content) == (206, stored[10:20])
    other = harness.client.get(image["url"], headers={"Range": "bytes=10-19", "If-Range": '"x"'})
    assert (other.status_code, other.content) == (200, stored)
    assert harness.client.get(image["url"], headers={"If-None-Match": etag}).status_code == 304


def test_a_similar_release_stores_only_its_new_chunks(
    harness: Harness, build: Callable[..., Path]
) -> None:
    first = build(image_bytes(), "1.0.0")
    second = build(changed(image_bytes()), "1.1.0")
    uploaded(harness, first)
    before = {p.name for p in chunk_files(harness)}
    used_before = stored_bytes(harness)
    uploaded(harness, second)
    after = {p.name for p in chunk_files(harness)}
    new_index = index_of(second)
    assert before < after
    assert after - before == {d.hex() + ".zst" for d in new_index.digests} - before
    assert 0 < len(after - before) <= 6, len(after - before)  # of about 24
    # the disk grew by the new chunks and the index, far less than the bundle
    grown = stored_bytes(harness) - used_before
    assert grown < second.stat().st_size / 3, (grown, second.stat().st_size)
    # both releases are served whole, byte for byte
    for bundle in (first, second):
        entry = json.loads(members(bundle)["manifest.json"])["images"][0]
        assert harness.client.get(f"/blobs/{entry['sha256']}").content == image_of(bundle)
    # the same release bytes again under another version: nothing new at all
    files = chunk_files(harness)
    third = build(changed(image_bytes()), "1.1.1")
    uploaded(harness, third)
    assert chunk_files(harness) == files


def test_a_format_1_image_is_stored_whole_as_before(
    harness: Harness, build: Callable[..., Path]
) -> None:
    bundle = build(image_bytes(), "1.0.0", chunked=False)
    image = uploaded(harness, bundle)["images"][0]
    assert image["chunk_index"] is None
    assert [p.name for p in harness.blob_files()] == [image["sha256"]]
    assert chunk_files(harness) == []
    assert harness.client.get(image["url"]).content == image_of(bundle)


def test_the_assignment_lists_each_chunk_index_as_a_blob(
    harness: Harness, make_bundle: Callable[..., Path], enrolled: Callable[..., Any]
) -> None:
    release = uploaded(harness, make_bundle(version="2.0.0", bootfs=True, size=200_000))
    device = enrolled()
    assigned = harness.client.post(
        f"/api/v1/devices/{device.id}/assignment", json={"version": "2.0.0"},
        headers=harness.operator,
    )  # fmt: skip
    assert assigned.status_code == 200, assigned.text
    answer = device.checkin()
    assert answer.status_code == 200, answer.text
    document = json.loads(answer.json()["answer"])["assignment"]
    images = release["images"]
    indexes = [(i["slot_class"], i["chunk_index"]) for i in images]
    assert [(b["slot_class"], b["sha256"], b["size"], b["url"]) for b in document["blobs"]] == [
        *((i["slot_class"], i["sha256"], i["size"], i["url"]) for i in images),
        *((slot, r["sha256"], r["size"], r["url"]) for slot, r in indexes),
    ]
    # the manifest names each index by the SHA-256 a device looks its URL up by
    manifest = json.loads(base64.b64decode(document["manifest"]))
    assert [i["chunk_index"]["sha256"] for i in manifest["images"]] == [
        r["sha256"] for _, r in indexes
    ]
    # an updater that predates chunk indexes reads the answer as before
    parsed = Assignment.from_dict(document)
    assert {b.sha256 for b in parsed.blobs} >= {i["sha256"] for i in images}
    for blob in document["blobs"]:  # every one is served, with its size
        assert len(harness.client.get(blob["url"]).content) == blob["size"]


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("chunk bytes", "chunk 4 of"),
        ("chunk digest", "chunk 2 of"),
        ("frames misaligned", "chunk 0 of"),
        ("more than the image", "chunks add up to"),
        ("absurd chunk", "chunk 1 is"),
        ("stored larger than possible", "is stored in"),
        ("not an index", "not a chunk index"),
    ],
)
def test_a_hostile_chunked_bundle_is_one_clear_error_and_stores_nothing(
    harness: Harness, build: Callable[..., Path], key: SigningKey, case: str, fragment: str
) -> None:
    compression = "none" if case == "chunk bytes" else "zstd"
    bundle = build(image_bytes(), "1.0.0", compression=compression)
    index = index_of(bundle)
    stored = image_of(bundle)
    lengths, stored_lengths = list(index.lengths), list(index.stored_lengths)
    if case == "chunk bytes":  # the image's hashes say the changed byte, the index does not
        chunk = list(index.chunks())[4]
        flipped = bytearray(stored)
        flipped[chunk.stored_offset + 10] ^= 0xFF
        forged = forge(bundle, key, image=bytes(flipped))
    elif case == "chunk digest":
        digests = list(index.digests)
        digests[2] = bytes(32)
        forged = forge(bundle, key, index=index_bytes(index, digests=tuple(digests)))
    elif case == "frames misaligned":  # the same totals, chunk 1 starts a byte into its frame
        stored_lengths[0] += 1
        stored_lengths[1] -= 1
        forged = forge(bundle, key, index=index_bytes(index, stored_lengths=tuple(stored_lengths)))
    elif case == "more than the image":
        lengths[3] += 1
        forged = forge(bundle, key, index=index_bytes(index, lengths=tuple(lengths)))
    elif case == "absurd chunk":
        lengths[1] = 2**32 - 1
        forged = forge(bundle, key, index=index_bytes(index, lengths=tuple(lengths)))
    elif case == "stored larger than possible":
        stored_lengths[2] = 2**31
        forged = forge(bundle, key, index=index_bytes(index, stored_lengths=tuple(stored_lengths)))
    else:
        forged = forge(bundle, key, index=b"MFCHUNK0" + index.to_bytes()[8:])
    response = harness.upload(forged)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "bundle_malformed"
    assert fragment in response.json()["detail"], response.json()["detail"]
    assert harness.count(Release) == 0
    assert harness.count(ReleaseImage) == 0
    assert harness.blob_files() == []
    assert chunk_files(harness) == []
    assert not (harness.settings.data_dir / "chunks" / "images").exists()
    # the genuine bundle is accepted afterwards
    uploaded(harness, bundle)


def test_a_chunk_stored_by_another_encoder_makes_the_image_stored_whole(
    harness: Harness, build: Callable[..., Path]
) -> None:
    bundle = build(image_bytes(), "1.0.0")
    index = index_of(bundle)
    chunk = list(index.chunks())[3]
    stored = image_of(bundle)
    raw = unpack(
        stored[chunk.stored_offset : chunk.stored_offset + chunk.stored_length], chunk, "zstd"
    )
    other = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(raw)
    assert other != stored[chunk.stored_offset : chunk.stored_offset + chunk.stored_length]
    store = BlobStore(harness.settings.blob_dir)
    held = store.chunks.path(chunk.sha256, "zstd")
    held.parent.mkdir(parents=True)
    held.write_bytes(other)
    image = uploaded(harness, bundle)["images"][0]
    assert held.read_bytes() == other  # a stored chunk is never rewritten
    assert image["sha256"] in {p.name for p in harness.blob_files()}
    assert not store.chunks.recipe_path(image["sha256"]).exists()
    assert harness.client.get(image["url"]).content == stored
    part = harness.client.get(image["url"], headers={"Range": "bytes=1000-99999"})
    assert part.content == stored[1000:100000]


def test_a_chunk_another_upload_stores_at_the_same_moment_is_never_replaced(
    harness: Harness, build: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two uploads both find a chunk missing; the one that publishes second keeps the first's
    file and stores its own image whole: a chunk file never changes once written."""
    import server.chunkstore as chunkstore

    bundle = build(image_bytes(), "1.0.0")
    chunk = list(index_of(bundle).chunks())[3]
    stored = image_of(bundle)
    raw = unpack(
        stored[chunk.stored_offset : chunk.stored_offset + chunk.stored_length], chunk, "zstd"
    )
    other = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(raw)
    held = BlobStore(harness.settings.blob_dir).chunks.path(chunk.sha256, "zstd")
    write = chunkstore.atomic_write

    def racing(path: Path, data: bytes, mode: int = 0o644, **options: Any) -> None:
        if path == held and not held.exists():
            held.write_bytes(other)  # the other upload wins the race
        write(path, data, mode, **options)

    monkeypatch.setattr(chunkstore, "atomic_write", racing)
    image = uploaded(harness, bundle)["images"][0]
    assert held.read_bytes() == other
    assert image["sha256"] in {p.name for p in harness.blob_files()}
    assert harness.client.get(image["url"]).content == stored


def test_a_missing_chunk_is_a_server_fault_not_wrong_bytes(
    harness: Harness, build: Callable[..., Path]
) -> None:
    image = uploaded(harness, build(image_bytes(), "1.0.0"))["images"][0]
    victim = chunk_files(harness)[0]
    victim.unlink()
    answer = harness.client.get(image["url"])
    assert answer.status_code == 500
    assert answer.json()["error"] == "storage_damaged"
    assert str(harness.settings.data_dir) not in answer.text  # the log names the file


class PowerCut(Exception):
    pass


def test_a_store_cut_short_serves_nothing_of_the_image_and_a_retry_completes_it(
    harness: Harness, build: Callable[..., Path]
) -> None:
    bundle = build(image_bytes(), "1.0.0")
    written: list[Path] = []

    def cut_at_the_fifth_chunk(point: str, path: Path) -> None:
        if point == "atomic:before-rename" and path.suffix == ".zst":
            written.append(path)
            if len(written) == 5:
                raise PowerCut(path)

    previous = set_boundary_hook(cut_at_the_fifth_chunk)
    try:
        with pytest.raises(PowerCut):
            harness.upload(bundle)
    finally:
        set_boundary_hook(previous)
    assert len(chunk_files(harness)) == 4  # whole chunks only, no temporary left
    assert not list((harness.settings.data_dir / "chunks").glob("*/.*"))
    assert harness.count(Release) == 0
    entry = json.loads(members(bundle)["manifest.json"])["images"][0]
    # no recipe yet: the image is not served at all, rather than served with holes
    assert harness.client.get(f"/blobs/{entry['sha256']}").status_code == 404
    image = uploaded(harness, bundle)["images"][0]
    assert harness.client.get(image["url"]).content == image_of(bundle)


def test_temporaries_of_chunks_cut_short_are_swept(
    harness: Harness, build: Callable[..., Path]
) -> None:
    uploaded(harness, build(image_bytes(), "1.0.0"))
    chunk = chunk_files(harness)[0]
    leftover = chunk.parent / f".{chunk.name}.abcdefgh.tmp"
    leftover.write_bytes(b"half")
    recipe_leftover = harness.settings.data_dir / "chunks" / "images" / ".x.abcdefgh.tmp"
    recipe_leftover.write_bytes(b"half")
    store = BlobStore(harness.settings.blob_dir)
    now = time.time() + 3600
    removed = sweep_leftovers(store, harness.settings.upload_dir, min_age_s=600, now=now)
    assert sorted(removed) == sorted([leftover, recipe_leftover])
    assert chunk.exists()


@pytest.fixture
def static_mirror(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served by busybox httpd on loopback: a plain static HTTP server."""
    busybox = shutil.which("busybox")
    require_tools(busybox=busybox is not None)
    assert busybox is not None
    directory = tmp_path / "mirror"
    directory.mkdir()
    with listening_socket() as sock:
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [busybox, "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(directory)]
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "busybox httpd did not start"
                time.sleep(0.05)
        yield directory, f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def test_export_makes_a_static_mirror(
    harness: Harness, build: Callable[..., Path], static_mirror: tuple[Path, str]
) -> None:
    directory, url = static_mirror
    first = uploaded(harness, build(image_bytes(), "1.0.0"))
    second = uploaded(harness, build(changed(image_bytes()), "1.1.0"))
    old = uploaded(harness, build(image_bytes(seed=2, size=100_000), "0.9.0", chunked=False))
    options = ["--data-dir", str(harness.settings.data_dir)]
    if harness.settings.database_url.startswith("postgresql"):
        options += ["--database-url", harness.settings.database_url]
    runner = CliRunner()
    result = runner.invoke(fleet, ["release", "export", str(directory), *options])
    assert result.exit_code == 0, result.output
    assert "exported 3 release(s)" in result.output
    for release in (first, second, old):
        for image in release["images"]:
            blobs = [(image["sha256"], image["size"])]
            if image["chunk_index"] is not None:
                blobs.append((image["chunk_index"]["sha256"], image["chunk_index"]["size"]))
            for sha256, size in blobs:
                path = directory / "blobs" / sha256
                assert path.stat().st_mode & 0o777 == 0o644
                served = requests.get(f"{url}/blobs/{sha256}", timeout=10)
                assert served.status_code == 200
                assert sha(served.content) == sha256 and len(served.content) == size
                assert (
                    served.content
                    == harness.client.get(
                        image["url"] if sha256 == image["sha256"] else f"/blobs/{sha256}"
                    ).content
                )
            if image["chunk_index"] is None:
                continue
            # a device's ranges: a run of chunks, byte for byte as the server sends them
            part = requests.get(
                f"{url}/blobs/{image['sha256']}",
                headers={"Range": "bytes=70000-200000"},
                timeout=10,
            )
            assert part.status_code == 206
            assert part.headers["content-range"] == f"bytes 70000-200000/{image['size']}"
            assert (
                part.content
                == harness.client.get(image["url"], headers={"Range": "bytes=70000-200000"}).content
            )
            index = ChunkIndex.from_bytes(
                (directory / "blobs" / image["chunk_index"]["sha256"]).read_bytes(),
                image_size=len(changed(image_bytes())) if release is second else IMAGE_SIZE,
                stored_size=image["size"], compression="zstd", where="test",
            )  # fmt: skip
            for chunk in index.chunks():
                name = chunk.sha256.hex()
                served = requests.get(f"{url}/chunks/{name[:2]}/{name}.zst", timeout=10)
                assert unpack(served.content, chunk, "zstd")
    assert (directory / "blobs").stat().st_mode & 0o777 == 0o755
    # again: everything is there already, nothing is written
    again = runner.invoke(fleet, ["release", "export", str(directory), *options, "--json"])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.output)
    assert summary["releases"] == ["1.0.0", "1.1.0", "0.9.0"]
    assert (summary["written"], summary["written_bytes"]) == (0, 0)
    assert summary["kept"] > 0


def test_export_refuses_a_chunk_whose_bytes_changed_on_disk(
    harness: Harness, build: Callable[..., Path], tmp_path: Path
) -> None:
    uploaded(harness, build(image_bytes(), "1.0.0"))
    victim = chunk_files(harness)[3]
    damaged = bytearray(victim.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    victim.write_bytes(bytes(damaged))
    options = ["--data-dir", str(harness.settings.data_dir)]
    if harness.settings.database_url.startswith("postgresql"):
        options += ["--database-url", harness.settings.database_url]
    out = tmp_path / "out"
    result = CliRunner().invoke(fleet, ["release", "export", str(out), *options])
    assert_one_line_error(result, f"chunk file {victim} is damaged")
    assert not (out / "blobs").exists() or list((out / "blobs").iterdir()) == []


def test_export_refuses_a_store_missing_a_chunk(
    harness: Harness, build: Callable[..., Path], tmp_path: Path
) -> None:
    uploaded(harness, build(image_bytes(), "1.0.0"))
    chunk_files(harness)[5].unlink()
    options = ["--data-dir", str(harness.settings.data_dir)]
    if harness.settings.database_url.startswith("postgresql"):
        options += ["--database-url", harness.settings.database_url]
    result = CliRunner().invoke(fleet, ["release", "export", str(tmp_path / "out"), *options])
    assert_one_line_error(result, "is missing from the chunk store")
    assert list((tmp_path / "out" / "blobs").glob("*")) == []  # no half-written blob


def _damage(victim: Path, how: str, elsewhere: Path) -> None:
    data = victim.read_bytes()
    if how == "same size":
        victim.write_bytes(bytes(b ^ 0x55 for b in data))
    elif how == "longer":
        victim.write_bytes(data + b"EXTRA")
    elif how == "symlink":
        elsewhere.write_bytes(data)  # even the right bytes: a chunk file is never a symlink
        victim.unlink()
        victim.symlink_to(elsewhere)
    else:
        victim.unlink()
        victim.mkdir()


@pytest.mark.parametrize("how", ["same size", "longer", "symlink", "directory"])
def test_a_damaged_chunk_file_is_never_served(
    harness: Harness, build: Callable[..., Path], tmp_path: Path, how: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    bundle = build(image_bytes(), "1.0.0")
    image = uploaded(harness, bundle)["images"][0]
    assert harness.client.get(image["url"]).content == image_of(bundle)  # verified, remembered
    index = index_of(bundle)
    files = [ChunkStore.path(BlobStore(harness.settings.blob_dir).chunks, c, "zstd")
             for c in index.digests]  # fmt: skip
    time.sleep(0.01)  # another modification time
    # a chunk past the first mebibyte: read once the answer started, so the connection is cut
    last = index.stored_size - index.stored_lengths[-1]
    assert last > 1 << 20
    _damage(files[-1], how, tmp_path / "last")
    with pytest.raises(RuntimeError, match="response already started"):
        harness.client.get(image["url"])
    assert re.search(f"chunk file {re.escape(str(files[-1]))}.*connection cut", caplog.text)
    # the first chunk: found before the answer starts, a 500
    _damage(files[0], how, tmp_path / "first")
    answer = harness.client.get(image["url"], headers={"Range": "bytes=0-99"})
    assert answer.status_code == 500 and answer.json()["error"] == "storage_damaged"
    assert "etag" not in answer.headers
    assert f"chunk file {files[0]}" in caplog.text


def test_a_recipe_must_name_the_image_asked_for(
    harness: Harness, build: Callable[..., Path]
) -> None:
    first = uploaded(harness, build(image_bytes(1), "1.0.0"))["images"][0]
    second = uploaded(harness, build(image_bytes(2), "1.1.0"))["images"][0]
    recipes = harness.settings.data_dir / "chunks" / "images"
    (recipes / first["sha256"]).write_bytes((recipes / second["sha256"]).read_bytes())
    answer = harness.client.get(first["url"])
    assert answer.status_code == 500 and answer.json()["error"] == "storage_damaged"
    (recipes / first["sha256"]).unlink()
    (recipes / first["sha256"]).mkdir()
    assert harness.client.head(first["url"]).status_code == 500


def test_head_answers_from_the_recipe_and_an_index_is_parsed_once_at_a_time(
    harness: Harness, build: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import server.chunkstore as chunkstore

    image = uploaded(harness, build(image_bytes(), "1.0.0"))["images"][0]
    parse = ChunkIndex.from_bytes
    parsed: list[int] = []

    def slow(data: bytes, **options: Any) -> ChunkIndex:
        parsed.append(1)
        time.sleep(0.2)
        return parse(data, **options)

    monkeypatch.setattr(chunkstore.ChunkIndex, "from_bytes", staticmethod(slow))
    store = BlobStore(harness.settings.blob_dir)
    head = harness.client.head(image["url"])
    assert head.status_code == 200 and head.headers["content-length"] == str(image["size"])
    assert parsed == []
    results: list[bytes] = []

    def fetch() -> None:
        opened = store.open(image["sha256"])
        assert opened is not None
        with opened[0] as handle:
            results.append(handle.read(1000))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert parsed == [1]


def test_the_parsed_index_cache_is_bounded_in_bytes(
    harness: Harness, build: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.chunkstore as chunkstore

    images = [uploaded(harness, build(image_bytes(n), f"1.{n}.0"))["images"][0] for n in (1, 2, 3)]
    store = BlobStore(harness.settings.blob_dir)
    one = len(index_of(build(image_bytes(1), "9.0.0")))
    monkeypatch.setattr(
        chunkstore, "CACHED_INDEX_BYTES", 2 * one * chunkstore.INDEX_BYTES_PER_CHUNK
    )
    for image in images:
        opened = store.open(image["sha256"])
        assert opened is not None
        with opened[0] as handle:
            handle.read(10)
    assert len(store.chunks._layouts) <= 2
    assert store.chunks._layout_bytes <= chunkstore.CACHED_INDEX_BYTES


def test_an_upload_finding_a_damaged_chunk_file_stores_the_image_whole(
    harness: Harness, build: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="server")
    bundle = build(image_bytes(), "1.0.0")
    chunk = list(index_of(bundle).chunks())[3]
    held = BlobStore(harness.settings.blob_dir).chunks.path(chunk.sha256, "zstd")
    held.parent.mkdir(parents=True)
    held.write_bytes(b"x" * chunk.stored_length)  # its size, not its bytes
    image = uploaded(harness, bundle)["images"][0]
    assert f"damaged chunk file {held}" in caplog.text
    assert "another encoder" not in caplog.text
    assert image["sha256"] in {p.name for p in harness.blob_files()}
    assert harness.client.get(image["url"]).content == image_of(bundle)


def test_export_checks_what_it_keeps_refuses_the_data_dir_and_sweeps_leftovers(
    harness: Harness, build: Callable[..., Path], tmp_path: Path
) -> None:
    from server.mirror import ExportError, export

    bundle = build(image_bytes(), "1.0.0")
    image = uploaded(harness, bundle)["images"][0]
    store = BlobStore(harness.settings.blob_dir)
    out = tmp_path / "mirror"
    (out / "blobs").mkdir(parents=True)
    (out / "blobs" / image["sha256"]).write_bytes(bytes(image["size"]))  # its size only
    index = index_of(bundle)
    wrong = out / "chunks" / index.digests[0].hex()[:2] / (index.digests[0].hex() + ".zst")
    wrong.parent.mkdir(parents=True)
    wrong.write_bytes(bytes(index.stored_lengths[0]))
    leftover = wrong.parent / f".{wrong.name}.abcdefgh.tmp"
    leftover.write_bytes(b"half")
    export(harness.db, store, out)
    assert sha((out / "blobs" / image["sha256"]).read_bytes()) == image["sha256"]
    for chunk in index.chunks():
        name = chunk.sha256.hex()
        assert unpack((out / "chunks" / name[:2] / f"{name}.zst").read_bytes(), chunk, "zstd")
    assert not leftover.exists()
    data = harness.settings.data_dir
    for directory in (data, data / "mirror", data.parent):
        with pytest.raises(ExportError, match="overlaps the data directory"):
            export(harness.db, store, directory)
    assert not (data / "mirror").exists()
