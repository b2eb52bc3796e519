"""The chunk store: the stored chunks of chunked images, each kept once however many releases
share it.

A chunked image (release bundle format 2, :mod:`image_builder.chunks`) is the concatenation of
its stored chunks, each the chunk's bytes as they are or one Zstandard frame, and its chunk
index lists them. The server keeps each stored chunk once, named by the SHA-256 of the chunk's
bytes (what the index names) and how it is stored::

    chunks/<first two hex digits>/<sha256>.zst      (or .raw)
    chunks/images/<image sha256>                    the image's recipe

so a release that shares most of its chunks with an earlier one costs the disk only its new
chunks. The recipe (JSON) says which chunk index (an ordinary blob) and which compression make
the image; ``GET /blobs/<image sha256>`` assembles the image from these (:meth:`ChunkStore.open`,
used by server/blobs.py), so a chunked image is never stored a second time.

Every file is written once, through :func:`fleet_core.durable.atomic_output`, and never changed:
a chunk only after its bytes were verified (decompressed, their length and SHA-256 checked
against the index), a recipe only after every chunk it needs is stored. The same chunk stored
by another Zstandard encoder (another builder version) is other bytes under the same name: an
image whose chunks are stored with bytes other than its own cannot be assembled from them, and
server/releases.py stores it whole instead (:attr:`StoredChunks.foreign`).
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO

from fleet_core.durable import atomic_write, sweep_shards
from image_builder.chunks import Chunk, ChunkIndex, unpack
from image_builder.errors import ImageIntegrityError, ManifestError
from image_builder.manifest import ChunkIndexRef, ImageEntry
from server.errors import ServerError

RECIPES = "images"
RECIPE_FORMAT = 1
SUFFIXES = {"zstd": ".zst", "none": ".raw"}
# Parsed chunk indexes kept for serving ranges: a device fetches one image in many ranges, and
# parsing a large image's index (65,000 entries for 4 GiB) for each would cost more than the range.
CACHED_INDEXES = 8
# How much of an assembled image one read gathers at most (server/blobs.py reads 1 MiB at a time).
READ_BUFFER = 1024 * 1024


class ChunkIntegrityError(ServerError):
    """A stored chunk, recipe or index is missing or does not hold what its name says."""


@dataclass(frozen=True)
class ChunkedImage:
    """A chunked image of a bundle whose every chunk was verified (:func:`verify_chunks`)."""

    entry: ImageEntry
    offset: int  # of its stored bytes in the bundle
    index_offset: int  # of its chunk index's bytes in the bundle
    index: ChunkIndex
    stored_digests: tuple[bytes, ...]  # SHA-256 of each chunk's stored bytes, as verified


def verify_chunks(
    handle: BinaryIO, entry: ImageEntry, offset: int, index: ChunkIndex
) -> tuple[bytes, ...]:
    """Unpack every chunk of the image whose stored bytes start at ``offset`` in ``handle``,
    checking each against ``index``; returns the SHA-256 of each chunk's stored bytes.

    Raises:
        ImageIntegrityError: a chunk's bytes do not decompress to its length and SHA-256;
            names the image and the chunk.
    """
    digests = []
    for number, chunk in enumerate(index.chunks()):
        handle.seek(offset + chunk.stored_offset)
        stored = handle.read(chunk.stored_length)
        try:
            unpack(stored, chunk, entry.compression)
        except ImageIntegrityError as err:
            raise ImageIntegrityError(
                f"image {entry.filename!r}, chunk {number} of {len(index)} "
                f"(sha256 {chunk.sha256.hex()}): {err}"
            ) from err
        digests.append(hashlib.sha256(stored).digest())
    return tuple(digests)


@dataclass(frozen=True)
class Recipe:
    """What makes a chunked image: its chunk index (a blob) and how its chunks are stored."""

    sha256: str  # of the image's stored bytes: the blob it assembles
    size: int  # stored bytes
    compression: str
    uncompressed_size: int
    index_sha256: str
    index_size: int

    @classmethod
    def of(cls, entry: ImageEntry, ref: ChunkIndexRef) -> Recipe:
        """The recipe of the manifest's image ``entry`` with the chunk index ``ref``."""
        return cls(
            sha256=entry.sha256, size=entry.size, compression=entry.compression,
            uncompressed_size=entry.uncompressed_size, index_sha256=ref.sha256,
            index_size=ref.size,
        )  # fmt: skip

    def to_bytes(self) -> bytes:
        document = {"format": RECIPE_FORMAT, **asdict(self)}
        return json.dumps(document, sort_keys=True).encode("ascii") + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Recipe:
        """Raises:
        ChunkIntegrityError: not a recipe this server writes."""
        try:
            document: dict[str, Any] = json.loads(data)
            if document.pop("format") != RECIPE_FORMAT:
                raise ValueError("unknown format")
            recipe = cls(**document)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ChunkIntegrityError(f"{where}: not a chunked image's recipe ({err})") from err
        if recipe.compression not in SUFFIXES:
            raise ChunkIntegrityError(f"{where}: unknown compression {recipe.compression!r}")
        return recipe


@dataclass(frozen=True)
class StoredChunks:
    """What :meth:`ChunkStore.put_chunks` did."""

    new: int  # chunks written now
    new_bytes: int  # their stored bytes
    shared: int  # chunks stored already, with this image's bytes
    foreign: int  # chunks stored already with other bytes (another encoder's)


@dataclass(frozen=True)
class _Layout:
    index: ChunkIndex
    starts: tuple[int, ...]  # stored offset of each chunk, and the stored size last


class ChunkStore:
    """Stored chunks and recipes under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, *, file_mode: int, dir_mode: int) -> None:
        self.root = root
        self._file_mode = file_mode
        self._dir_mode = dir_mode
        self._layouts: OrderedDict[str, _Layout] = OrderedDict()
        self._lock = threading.Lock()

    def path(self, sha256: bytes, compression: str) -> Path:
        """Where the chunk with this SHA-256 lives stored with ``compression``."""
        name = sha256.hex()
        return self.root / name[:2] / (name + SUFFIXES[compression])

    def recipe_path(self, image_sha256: str) -> Path:
        return self.root / RECIPES / image_sha256

    def _mkdir(self, directory: Path) -> None:
        self.root.mkdir(mode=self._dir_mode, parents=True, exist_ok=True)
        directory.mkdir(mode=self._dir_mode, exist_ok=True)

    def put_chunks(self, handle: BinaryIO, image: ChunkedImage) -> StoredChunks:
        """Store each chunk of ``image`` (read from ``handle``, the bundle) not stored yet.

        A chunk's bytes are hashed again as they are copied and must be those
        :func:`verify_chunks` verified. Power cut: each chunk exists whole or not at all.

        Raises:
            ChunkIntegrityError: the bundle's bytes changed since they were verified.
        """
        compression = image.entry.compression
        new = new_bytes = shared = foreign = 0
        for chunk, digest in zip(image.index.chunks(), image.stored_digests, strict=True):
            target = self.path(chunk.sha256, compression)
            held = _file_digest(target, chunk.stored_length)
            if held == digest:
                shared += 1
                continue
            if held is not None or target.exists():
                foreign += 1
                continue
            handle.seek(image.offset + chunk.stored_offset)
            stored = handle.read(chunk.stored_length)
            if hashlib.sha256(stored).digest() != digest:
                raise ChunkIntegrityError(
                    f"image {image.entry.filename!r}: chunk {chunk.sha256.hex()} changed in the "
                    "bundle after it was verified"
                )
            self._mkdir(target.parent)
            try:
                atomic_write(target, stored, self._file_mode, exclusive=True)
            except FileExistsError:  # another upload stored it meanwhile: its bytes stay
                if _file_digest(target, chunk.stored_length) == digest:
                    shared += 1
                else:
                    foreign += 1
                continue
            new += 1
            new_bytes += len(stored)
        return StoredChunks(new, new_bytes, shared, foreign)

    def put_recipe(self, recipe: Recipe) -> None:
        """Store ``recipe`` (after every chunk it needs and its index). Power cut: whole or
        absent."""
        target = self.recipe_path(recipe.sha256)
        if target.exists():
            return
        self._mkdir(target.parent)
        atomic_write(target, recipe.to_bytes(), self._file_mode)

    def recipe(self, image_sha256: str) -> Recipe | None:
        """The recipe of the chunked image ``image_sha256``; None if there is none."""
        try:
            data = self.recipe_path(image_sha256).read_bytes()
        except FileNotFoundError:
            return None
        return Recipe.from_bytes(data, f"recipe of {image_sha256}")

    def layout(self, recipe: Recipe, load_index: Callable[[str, int], bytes | None]) -> ChunkIndex:
        """The chunk index of ``recipe``'s image, parsed (and kept for the next ranges).

        Raises:
            ChunkIntegrityError: the index blob is missing or not the index it should be.
        """
        return self._layout(recipe, load_index).index

    def _layout(self, recipe: Recipe, load_index: Callable[[str, int], bytes | None]) -> _Layout:
        with self._lock:
            cached = self._layouts.get(recipe.index_sha256)
            if cached is not None:
                self._layouts.move_to_end(recipe.index_sha256)
                return cached
        where = f"chunk index {recipe.index_sha256} of image {recipe.sha256}"
        data = load_index(recipe.index_sha256, recipe.index_size)
        if data is None or hashlib.sha256(data).hexdigest() != recipe.index_sha256:
            raise ChunkIntegrityError(f"{where}: missing or damaged")
        try:
            index = ChunkIndex.from_bytes(
                data, image_size=recipe.uncompressed_size, stored_size=recipe.size,
                compression=recipe.compression, where=where,
            )  # fmt: skip
        except ManifestError as err:
            raise ChunkIntegrityError(str(err)) from err
        layout = _Layout(index, tuple(accumulate(index.stored_lengths, initial=0)))
        with self._lock:
            self._layouts[recipe.index_sha256] = layout
            while len(self._layouts) > CACHED_INDEXES:
                self._layouts.popitem(last=False)
        return layout

    def open(
        self, image_sha256: str, load_index: Callable[[str, int], bytes | None]
    ) -> tuple[BinaryIO, int] | None:
        """The chunked image ``image_sha256`` assembled from its chunks, opened for reading
        (seekable), with its stored size; None if no chunked image has that SHA-256.

        Raises:
            ChunkIntegrityError: its recipe or index is damaged. A chunk found missing or
                damaged while reading raises it from ``read``.
        """
        recipe = self.recipe(image_sha256)
        if recipe is None:
            return None
        layout = self._layout(recipe, load_index)
        raw = AssembledImage(self, layout, recipe)
        return io.BufferedReader(raw, buffer_size=READ_BUFFER), recipe.size

    def chunk_files(self, recipe: Recipe, index: ChunkIndex) -> Iterator[tuple[Chunk, Path]]:
        """Each chunk of the image and the file that holds it."""
        for chunk in index.chunks():
            yield chunk, self.path(chunk.sha256, recipe.compression)

    def sweep_temporaries(
        self, *, min_age_s: float, now: float | None = None
    ) -> tuple[list[Path], list[str]]:
        """Remove the temporary files of writes cut short, untouched for ``min_age_s``."""
        return sweep_shards(self.root, min_age_s=min_age_s, now=now)


def _file_digest(path: Path, size: int) -> bytes | None:
    """The SHA-256 of ``path`` if it exists with ``size`` bytes; None otherwise."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(size + 1)
    except FileNotFoundError:
        return None
    return hashlib.sha256(data).digest() if len(data) == size else None


class AssembledImage(io.RawIOBase):
    """A chunked image's stored bytes, read from its chunk files in index order: a read at a
    stored offset finds its chunk by bisection over the chunks' stored offsets."""

    def __init__(self, store: ChunkStore, layout: _Layout, recipe: Recipe) -> None:
        super().__init__()
        self._store = store
        self._layout = layout
        self._recipe = recipe
        self._position = 0
        self._number = -1  # the chunk whose file is open
        self._file: io.BufferedReader | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._recipe.size}
        position = base[whence] + offset
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def readinto(self, buffer: Any) -> int:
        starts = self._layout.starts
        if self._position >= starts[-1]:
            return 0
        number = bisect_right(starts, self._position) - 1
        handle = self._file if number == self._number and self._file else self._open_chunk(number)
        within = self._position - starts[number]
        wanted = min(len(buffer), starts[number + 1] - self._position)
        handle.seek(within)
        count = handle.readinto(memoryview(buffer)[:wanted])
        if count != wanted:
            raise ChunkIntegrityError(
                f"image {self._recipe.sha256}: chunk {number} ends early in the chunk store"
            )
        self._position += count
        return count

    def _open_chunk(self, number: int) -> io.BufferedReader:
        self._close_chunk()
        digest = self._layout.index.digests[number]
        path = self._store.path(digest, self._recipe.compression)
        try:
            self._file = open(path, "rb")  # noqa: SIM115 (kept open for the next reads)
        except FileNotFoundError as err:
            raise ChunkIntegrityError(
                f"image {self._recipe.sha256}: chunk {number} ({digest.hex()}) is missing from "
                "the chunk store"
            ) from err
        self._number = number
        return self._file

    def _close_chunk(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._number = -1

    def close(self) -> None:
        self._close_chunk()
        super().close()
