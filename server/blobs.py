"""The blob store: image bytes named by their SHA-256, and the byte-range rules for serving them.

A blob lives at ``BLOBS/<first two hex digits>/<sha256>``; it is written once, through
:func:`fleet_core.durable.atomic_output`, and never changed. A blob whose bytes do not hash to
its name is never stored: bytes are hashed while they are copied, and the copy is discarded on
a mismatch.

A chunked image (bundle format 2) is a blob too, but it is not stored whole: its chunks are in
the chunk store beside the blobs (server/chunkstore.py, ``<data dir>/chunks``), each once for
every release that shares it, and :meth:`BlobStore.open` assembles it from them. Its chunk
index is an ordinary blob. ``fleet release export`` (server/mirror.py) writes every blob whole
for a static HTTP server (nginx, a CDN) to serve as a mirror.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fleet_core.durable import atomic_output, sweep_shards
from image_builder.manifest import MAX_CHUNK_INDEX_BYTES
from server.chunkstore import ChunkedImage, ChunkStore, Recipe, StoredChunks
from server.errors import RangeNotSatisfiableError, ServerError, StorageDamagedError

CHUNK = 1024 * 1024
# The store is the server's alone (server/datadir.py): blobs and their directories are private.
BLOB_MODE = 0o600
DIR_MODE = 0o700
CHUNK_DIR = "chunks"  # the chunk store's directory, beside the blob store's
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# At most 19 digits: every byte position of any blob, and never a number Python refuses to
# convert (a 5000-digit position must be a plain "ignore this header", not a server error).
_RANGE = re.compile(r"bytes\s*=\s*([0-9]{0,19})\s*-\s*([0-9]{0,19})")


class BlobIntegrityError(ServerError):
    """Bytes copied into the store do not have the SHA-256 or size they were stored under."""


def copy_hashed(
    source: BinaryIO,
    out: BinaryIO,
    size: int,
    sha256: str | None,
    where: str,
    *,
    source_name: str | None = None,
) -> None:
    """Copy ``size`` bytes from ``source`` to ``out``, hashing them as they pass.

    Raises:
        BlobIntegrityError: the source ends early, or the bytes do not hash to ``sha256``
            (when given); the caller discards what was written.
        StorageDamagedError: the source (``source_name``, a store file) cannot be read; an
            ``OSError`` writing ``out`` is raised as it is.
    """
    digest = hashlib.sha256()
    remaining = size
    while remaining:
        try:
            chunk = source.read(min(CHUNK, remaining))
        except OSError as err:
            if source_name is None:
                raise
            raise StorageDamagedError(f"{source_name}: cannot read: {err.strerror or err}") from err
        if not chunk:
            raise BlobIntegrityError(f"{where}: source ends {remaining} bytes early")
        digest.update(chunk)
        out.write(chunk)
        remaining -= len(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise BlobIntegrityError(f"{where}: bytes hash to {digest.hexdigest()}")


class BlobStore:
    """Content-addressed files under ``root``, and the chunked images of ``chunks`` (default:
    the chunk store in ``root``'s sibling ``chunks``)."""

    def __init__(self, root: Path, chunks: ChunkStore | None = None) -> None:
        self.root = root
        root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self.chunks = chunks or ChunkStore(
            root.parent / CHUNK_DIR, file_mode=BLOB_MODE, dir_mode=DIR_MODE
        )

    def path(self, sha256: str) -> Path:
        """Where the blob named ``sha256`` lives (whether or not it exists).

        Raises:
            ValueError: ``sha256`` is not 64 lowercase hex digits.
        """
        if not SHA256_HEX.fullmatch(sha256):
            raise ValueError(f"{sha256!r} is not a SHA-256 in lowercase hex")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str, size: int) -> bool:
        """Whether the blob is stored with the expected size."""
        try:
            return self.path(sha256).stat().st_size == size
        except FileNotFoundError:
            return False

    def put_range(self, source: BinaryIO, offset: int, size: int, sha256: str) -> bool:
        """Store ``size`` bytes of ``source`` from ``offset`` as the blob ``sha256``.

        Returns False (and copies nothing) when the blob is stored already. The bytes are
        hashed as they are copied; the blob appears only if they match.
        Power cut: the blob exists whole or not at all.

        Raises:
            BlobIntegrityError: the bytes are shorter than ``size`` or hash differently.
        """
        if self.exists(sha256, size):
            return False
        target = self.path(sha256)
        target.parent.mkdir(mode=DIR_MODE, exist_ok=True)
        source.seek(offset)
        with atomic_output(target, BLOB_MODE) as out:
            copy_hashed(source, out, size, sha256, f"blob {sha256}")
        return True

    def put_chunked(self, source: BinaryIO, image: ChunkedImage) -> StoredChunks:
        """Store the chunked image ``image`` of the bundle ``source``: its chunks not stored
        yet, its chunk index as a blob, then its recipe, so that :meth:`open` finds it only
        when all it needs is there. An image some of whose chunks are stored with other bytes
        (another encoder's), or found damaged, is stored whole instead of its recipe.

        Power cut: each file exists whole or not at all; the recipe is written last.

        Raises:
            BlobIntegrityError, ChunkIntegrityError: the bundle's bytes changed since they
                were verified.
        """
        entry, ref = image.entry, image.entry.chunk_index
        if ref is None:
            raise BlobIntegrityError(f"image {entry.filename!r} has no chunk index")
        stored = self.chunks.put_chunks(source, image)
        self.put_range(source, image.index_offset, ref.size, ref.sha256)
        if stored.foreign or stored.damaged:
            self.put_range(source, image.offset, entry.size, entry.sha256)
            return stored
        self.chunks.put_recipe(Recipe.of(entry, ref))
        return stored

    def sweep_temporaries(
        self, *, min_age_s: float, now: float | None = None
    ) -> tuple[list[Path], list[str]]:
        """Remove the temporary files of copies cut short (a killed process leaves them; see
        :meth:`put_range`), in the blob store and the chunk store, untouched for ``min_age_s``;
        never a stored blob or chunk. Returns the files removed and one problem line per file
        that could not be."""
        removed, problems = self.chunks.sweep_temporaries(min_age_s=min_age_s, now=now)
        gone, failed = sweep_shards(self.root, min_age_s=min_age_s, now=now)
        return removed + gone, problems + failed

    def remove(self, sha256: str) -> None:
        """Delete a blob (for undoing a store that its release never committed)."""
        self.path(sha256).unlink(missing_ok=True)

    def open(self, sha256: str) -> tuple[BinaryIO, int] | None:
        """The blob opened for reading (seekable), with its size; None if it is not stored.
        A chunked image is assembled from the chunk store.

        Raises:
            StorageDamagedError: the blob's file cannot be opened, or a chunked image's recipe
                is damaged (a damaged chunk index or chunk raises it from ``read``).
        """
        whole = self.open_whole(sha256)
        if whole is not None or not SHA256_HEX.fullmatch(sha256):
            return whole
        return self.chunks.open(sha256, self.read_small)

    def open_whole(self, sha256: str) -> tuple[BinaryIO, int] | None:
        """The blob stored whole (never a chunked image's), as :meth:`open`."""
        try:
            path = self.path(sha256)
        except ValueError:
            return None
        try:
            handle = open(path, "rb")  # noqa: SIM115 (the caller closes it)
        except FileNotFoundError:
            return None
        except OSError as err:  # a directory in its place, no permission, a disk error
            raise StorageDamagedError(f"blob file {path}: {err.strerror or err}") from err
        return handle, os.fstat(handle.fileno()).st_size

    def read_small(self, sha256: str, size: int) -> bytes | None:
        """The blob stored whole with ``size`` bytes (a chunk index: at most
        :data:`~image_builder.manifest.MAX_CHUNK_INDEX_BYTES`), in
        memory; None if there is none of that size."""
        if size > MAX_CHUNK_INDEX_BYTES:
            return None
        opened = self.open_whole(sha256)
        if opened is None:
            return None
        handle, stored_size = opened
        with handle:
            if stored_size != size:
                return None
            try:
                return handle.read()
            except OSError as err:
                path = self.path(sha256)
                raise StorageDamagedError(f"blob file {path}: {err.strerror or err}") from err


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``start`` to ``end`` inclusive, as in ``Content-Range``."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range a ``Range`` header asks of a ``size``-byte resource.

    None means "send the whole resource": no header, a unit other than bytes, several ranges
    (only single ranges are served), or a header that is not valid syntax (RFC 9110 lets a
    server ignore those). A range whose last byte is past the end is cut to the end.

    Raises:
        RangeNotSatisfiableError: a valid single range that starts at or beyond the end, or
            an empty suffix (``bytes=-0``); carries ``Content-Range: bytes */size``.
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _unsatisfiable(header, size)
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise _unsatisfiable(header, size)
    return ByteRange(start, min(int(last), size - 1) if last else size - 1)


def _unsatisfiable(header: str, size: int) -> RangeNotSatisfiableError:
    return RangeNotSatisfiableError(
        f"range {header.strip()[:80]!r} is outside the {size} bytes of the blob",
        headers={"Content-Range": f"bytes */{size}"},
    )


def read_chunks(handle: BinaryIO, start: int, length: int, first: bytes = b"") -> Iterator[bytes]:
    """``length`` bytes of ``handle`` from ``start``, a chunk at a time; closes ``handle``.
    ``first``: the first bytes, read already (the handle is past them).

    Raises:
        StorageDamagedError: the store's bytes cannot be read or end early, or a chunk does
            not verify; names the store file.
    """
    try:
        remaining = length
        if first:
            remaining -= len(first)
            yield first
        else:
            handle.seek(start)
        while remaining:
            try:
                chunk = handle.read(min(CHUNK, remaining))
            except OSError as err:
                name = getattr(handle, "name", "a blob")
                raise StorageDamagedError(f"blob file {name}: {err.strerror or err}") from err
            if not chunk:
                name = getattr(handle, "name", "a blob")
                raise StorageDamagedError(f"blob file {name}: ends {remaining} bytes early")
            remaining -= len(chunk)
            yield chunk
    finally:
        handle.close()
