"""Writing release bundles in one pass over each image.

The manifest comes first in a bundle but holds every image's size and hash, which are known
only once the image has been read. Rather than reading each image twice, the writer reserves
the manifest's space up front, streams each image once (hash, compress, hash, write) into its
place after it, and then writes the manifest into the reserved space. The reservation is exact
for every field but the stored size of a compressed image, whose digits are bounded by zstd's
worst case; the manifest is padded with spaces (insignificant JSON whitespace, covered by the
signature like every other byte) to fill it. Reading each source once also means that what is
hashed is exactly what is written, even if the source file changes meanwhile.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import zstandard

from fleet_core.durable import atomic_output
from fleet_core.outputs import sweep_stale_outputs
from image_builder.bundle import CHUNK, MANIFEST_NAME, SIGNATURE_NAME, SIGNATURE_PURPOSE
from image_builder.chunks import CHUNK_MIN, store_image, stored_length_bound
from image_builder.container import BLOCK, END_OF_ARCHIVE, MemberHeader, encode_header, padding
from image_builder.errors import BundleError
from image_builder.manifest import (
    COMPRESSIONS,
    MANIFEST_FORMAT,
    MAX_CHUNK_INDEX_BYTES,
    SLOT_CLASSES,
    ChunkIndexRef,
    ImageEntry,
    Manifest,
    timestamp,
)
from signing import Signature, SignatureEnvelope, SigningKey, sign

ZSTD_LEVEL = 3
_PLACEHOLDER_SHA = "0" * 64


@dataclass(frozen=True)
class ImageSource:
    """An image to put into a bundle: which slot class it fills, and the file holding it."""

    slot_class: str
    path: Path


def source_date_epoch() -> int:
    """``$SOURCE_DATE_EPOCH`` if set (reproducible builds), else now.

    Raises:
        BundleError: the variable is set but not a non-negative integer.
    """
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return int(time.time())
    try:
        epoch = int(value)
    except ValueError as err:
        raise BundleError(f"SOURCE_DATE_EPOCH {value!r} is not an integer") from err
    if epoch < 0:
        raise BundleError(f"SOURCE_DATE_EPOCH {value!r} is negative")
    return epoch


def _member_name(source: ImageSource, compression: str) -> str:
    """``rootfs.ext4`` for an image file ``anything.ext4``: the slot class, the file's type."""
    suffix = source.path.suffix if source.path.suffix[1:].isalnum() else ".img"
    return source.slot_class + suffix + (".zst" if compression == "zstd" else "")


def _stored_size_bound(size: int, compression: str, chunked: bool) -> int:
    if compression == "none":
        return size
    if chunked:  # one frame per chunk, each at most its bound; every chunk but the last >= min
        return size + (size >> 7) + stored_length_bound(0) * (size // CHUNK_MIN + 1)
    # zstd's worst case (ZSTD_compressBound) plus frame headers, generously rounded up
    return size + (size >> 7) + 4096


def _check_sources(images: Sequence[ImageSource], compression: str) -> list[int]:
    """Validate the inputs before anything is written; return each image's size."""
    if not images:
        raise BundleError("a bundle needs at least one image")
    if compression not in COMPRESSIONS:
        raise BundleError(f"unknown compression {compression!r} (known: none, zstd)")
    sizes = []
    seen: set[str] = set()
    for source in images:
        if source.slot_class not in SLOT_CLASSES:
            raise BundleError(
                f"unknown slot class {source.slot_class!r} (known: {', '.join(SLOT_CLASSES)})"
            )
        if source.slot_class in seen:
            raise BundleError(f"two images for slot class {source.slot_class!r}")
        seen.add(source.slot_class)
        if not source.path.is_file():
            raise BundleError(f"image {source.path}: not a regular file")
        size = source.path.stat().st_size
        if size == 0:
            raise BundleError(f"image {source.path}: is empty")
        sizes.append(size)
    return sizes


class _HashingFile:
    """Writes through to ``out`` while hashing and counting: the stored side of an image."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.out.write(data)


def _stream_chunked_image(
    out: BinaryIO,
    source: ImageSource,
    compression: str,
    size: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[ImageEntry, bytes]:
    """Write one image's stored chunks at the current position of ``out``; return its entry
    and its chunk index (image_builder.chunks)."""
    with open(source.path, "rb") as raw:
        stored = store_image(raw, size, out, compression, progress=progress)
    if stored.uncompressed_size != size or source.path.stat().st_size != size:
        raise BundleError(f"image {source.path}: changed size while being bundled")
    index = stored.index.to_bytes()
    entry = ImageEntry(
        slot_class=source.slot_class,
        filename=_member_name(source, compression),
        compression=compression,
        size=stored.size,
        sha256=stored.sha256,
        uncompressed_size=stored.uncompressed_size,
        uncompressed_sha256=stored.uncompressed_sha256,
        chunk_index=ChunkIndexRef(size=len(index), sha256=hashlib.sha256(index).hexdigest()),
    )
    return entry, index


def _stream_image(
    out: BinaryIO,
    source: ImageSource,
    compression: str,
    size: int,
    progress: Callable[[int], None] | None = None,
) -> ImageEntry:
    """Write one image's stored bytes at the current position of ``out``; return its entry.

    ``progress`` is called with the length of each chunk of the image once it is written.
    """
    raw_digest = hashlib.sha256()
    raw_size = 0
    with open(source.path, "rb") as raw:
        if compression == "zstd":
            stored = _HashingFile(out)
            # single-threaded: multi-threaded zstd gains little here and costs 4x the memory
            compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
            with compressor.stream_writer(stored, size=size, closefd=False) as writer:  # type: ignore[arg-type]
                while chunk := raw.read(CHUNK):
                    raw_digest.update(chunk)
                    raw_size += len(chunk)
                    writer.write(chunk)
                    if progress is not None:
                        progress(len(chunk))
            stored_size, stored_sha = stored.size, stored.digest.hexdigest()
        else:
            while chunk := raw.read(CHUNK):
                raw_digest.update(chunk)
                raw_size += len(chunk)
                out.write(chunk)
                if progress is not None:
                    progress(len(chunk))
            stored_size, stored_sha = raw_size, raw_digest.hexdigest()
    if raw_size != size:
        raise BundleError(f"image {source.path}: changed size while being bundled")
    return ImageEntry(
        slot_class=source.slot_class,
        filename=_member_name(source, compression),
        compression=compression,
        size=stored_size,
        sha256=stored_sha,
        uncompressed_size=raw_size,
        uncompressed_sha256=raw_digest.hexdigest(),
    )


def _pad_manifest(manifest_bytes: bytes, length: int) -> bytes:
    """Fill the reserved length with spaces before the final newline (insignificant in JSON)."""
    if len(manifest_bytes) > length:
        raise BundleError(
            f"manifest of {len(manifest_bytes)} bytes outgrew its reserved {length} bytes"
        )
    return manifest_bytes[:-1] + b" " * (length - len(manifest_bytes)) + b"\n"


def _member_span(size: int) -> int:
    return BLOCK + size + padding(size)


def create_bundle(
    output: str | os.PathLike[str],
    *,
    images: Sequence[ImageSource],
    keys: Sequence[SigningKey],
    compatible: str,
    version: str,
    security_version: int,
    product: str = "metrica-fleet",
    compression: str = "none",
    created: int | None = None,
    progress: Callable[[int], None] | None = None,
    chunked: bool = True,
) -> Manifest:
    """Build a signed bundle at ``output`` and return its manifest.

    ``chunked`` (the default) writes format 2: each image cut into content-defined chunks,
    each stored on its own, with the chunk index as a member after the image, so a device
    can fetch only the chunks it lacks. Without it, format 1, which every updater reads.

    ``created`` defaults to :func:`source_date_epoch`; with the same inputs, keys and
    ``created`` the bundle is byte-identical (Ed25519 signatures are deterministic).

    Power cut or error: ``output`` is untouched until the finished bundle replaces it.

    ``progress``, if given, is called with the length of each chunk of image read (the images'
    sizes add up to the total).

    Raises:
        BundleError: an input is missing, empty, duplicated or invalid.
        ManifestError: a manifest field is invalid (compatible, version, security version).
    """
    created_epoch = source_date_epoch() if created is None else created
    sizes = _check_sources(images, compression)
    if not keys:
        raise BundleError("a bundle needs at least one signing key")
    # The manifest with every field final but the hashes (fixed length) and the stored sizes
    # (at their upper bound): validated now, so bad input fails before a byte is written.
    draft = Manifest.from_dict(
        Manifest(
            product=product,
            compatible=compatible,
            version=version,
            security_version=security_version,
            created=timestamp(created_epoch),
            images=tuple(
                ImageEntry(
                    slot_class=source.slot_class,
                    filename=_member_name(source, compression),
                    compression=compression,
                    size=_stored_size_bound(size, compression, chunked),
                    sha256=_PLACEHOLDER_SHA,
                    uncompressed_size=size,
                    uncompressed_sha256=_PLACEHOLDER_SHA,
                    chunk_index=(
                        ChunkIndexRef(MAX_CHUNK_INDEX_BYTES, _PLACEHOLDER_SHA) if chunked else None
                    ),
                )
                for source, size in zip(images, sizes, strict=True)
            ),
            format=MANIFEST_FORMAT if chunked else 1,
        ).to_dict()
    )
    manifest_length = len(draft.to_bytes())
    envelope_length = len(
        SignatureEnvelope(tuple(Signature(k.key_id, bytes(64)) for k in keys)).to_bytes()
    )
    sweep_stale_outputs(output)
    with atomic_output(output) as out:
        out.seek(_member_span(manifest_length) + _member_span(envelope_length))
        entries = []
        for source, size in zip(images, sizes, strict=True):
            header_at = out.tell()
            out.seek(header_at + BLOCK)
            index = None
            if chunked:
                entry, index = _stream_chunked_image(out, source, compression, size, progress)
            else:
                entry = _stream_image(out, source, compression, size, progress)
            out.write(bytes(padding(entry.size)))
            end = out.tell()
            out.seek(header_at)
            out.write(encode_header(MemberHeader(entry.filename, entry.size, created_epoch)))
            out.seek(end)
            if index is not None:
                out.write(
                    encode_header(MemberHeader(entry.chunk_index_name, len(index), created_epoch))
                )
                out.write(index + bytes(padding(len(index))))
            entries.append(entry)
        out.write(END_OF_ARCHIVE)
        manifest = replace(draft, images=tuple(entries))
        manifest_bytes = _pad_manifest(manifest.to_bytes(), manifest_length)
        envelope_bytes = sign(manifest_bytes, keys, SIGNATURE_PURPOSE).to_bytes()
        out.seek(0)
        for name, data in ((MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, envelope_bytes)):
            out.write(encode_header(MemberHeader(name, len(data), created_epoch)))
            out.write(data + bytes(padding(len(data))))
    return manifest
