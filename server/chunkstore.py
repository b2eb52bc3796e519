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
server/releases.py stores it whole instead (:attr:`StoredChunks.foreign`); so is an image one of
whose chunk files is found damaged (:attr:`StoredChunks.damaged`, logged as an error).

Nothing is served that was not verified: a recipe must name the image asked for, and every
chunk file opened for serving must be a regular file (a symlink is refused) of exactly its
stored length, whose bytes unpack to the chunk the index names. That check runs the first time
a file is served and is remembered by the file's identity (path, inode, size, modification
time; a bounded cache), so a file changed later is checked again. Any other outcome, and any
``OSError`` reading the store, is a :class:`ChunkIntegrityError` naming the file: a 5xx answer
before the response starts, a connection cut after it did, never other bytes.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import stat
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO

from fleet_core.durable import atomic_write, sweep_shards
from image_builder.chunks import Chunk, ChunkIndex, stored_length_bound, unpack
from image_builder.errors import ImageIntegrityError, ManifestError
from image_builder.manifest import ChunkIndexRef, ImageEntry
from server.errors import StorageDamagedError

RECIPES = "images"
RECIPE_FORMAT = 1
SUFFIXES = {"zstd": ".zst", "none": ".raw"}
# Parsed chunk indexes kept for serving ranges: a device fetches one image in many ranges, and
# parsing a large image's index (65,000 entries for 4 GiB) for each would cost more than the range.
CACHED_INDEXES = 8
# ... and at most this many bytes of them, estimated per chunk (three tuple entries, two ints
# and a 32-byte digest: about 200 bytes), so a few huge indexes cannot take the server's memory.
CACHED_INDEX_BYTES = 64 << 20
INDEX_BYTES_PER_CHUNK = 200
# Chunk files verified since they last changed (one 4 GiB image has 65,000 chunks).
VERIFIED_CHUNKS = 65536
# How much of an assembled image one read gathers at most (server/blobs.py reads 1 MiB at a time).
READ_BUFFER = 1024 * 1024


log = logging.getLogger("server")


class ChunkIntegrityError(StorageDamagedError):
    """A stored chunk, recipe or index is missing, unreadable or does not hold what its name
    says (a 5xx answer: the server's disk, not the request)."""


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
    damaged: int = 0  # chunk files found damaged (not a regular file, or not the chunk)


@dataclass(frozen=True)
class _Layout:
    index: ChunkIndex
    starts: tuple[int, ...]  # stored offset of each chunk, and the stored size last

    @property
    def cost(self) -> int:
        """The memory it holds, estimated."""
        return len(self.index) * INDEX_BYTES_PER_CHUNK


class ChunkStore:
    """Stored chunks and recipes under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, *, file_mode: int, dir_mode: int) -> None:
        self.root = root
        self._file_mode = file_mode
        self._dir_mode = dir_mode
        self._layouts: OrderedDict[str, _Layout] = OrderedDict()
        self._layout_bytes = 0
        self._parsing: dict[str, threading.Lock] = {}  # one parse of an index at a time
        self._verified: OrderedDict[tuple[str, int, int, int], None] = OrderedDict()
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
        new = new_bytes = shared = foreign = damaged = 0
        for chunk, digest in zip(image.index.chunks(), image.stored_digests, strict=True):
            target = self.path(chunk.sha256, compression)
            held = self._held(target, chunk, compression)
            if held == digest:
                shared += 1
                continue
            if held == _DAMAGED:
                damaged += 1
                continue
            if held is not None:
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
                held = self._held(target, chunk, compression)
                if held == digest:
                    shared += 1
                elif held in (_DAMAGED, None):
                    damaged += 1
                else:
                    foreign += 1
                continue
            new += 1
            new_bytes += len(stored)
        return StoredChunks(new, new_bytes, shared, foreign, damaged)

    def _held(self, path: Path, chunk: Chunk, compression: str) -> bytes | None:
        """The SHA-256 of the stored bytes of the chunk file ``path`` if it holds ``chunk``
        (this image's bytes or another encoder's); None if there is no such file;
        :data:`_DAMAGED` (and an error logged) if the file is there but does not hold the
        chunk: not a regular file, unreadable, or bytes that do not unpack to it."""
        bound = chunk.length if compression == "none" else stored_length_bound(chunk.length)
        try:
            data = _read_regular(path, bound)
        except FileNotFoundError:
            return None
        except (OSError, _NotRegular) as err:
            log.error("chunk store: damaged chunk file %s: %s; image stored whole", path, _why(err))
            return _DAMAGED
        try:
            unpack(data, _as_stored(chunk, len(data)), compression)
        except ImageIntegrityError as err:
            log.error("chunk store: damaged chunk file %s: %s; image stored whole", path, err)
            return _DAMAGED
        return hashlib.sha256(data).digest()

    def put_recipe(self, recipe: Recipe) -> None:
        """Store ``recipe`` (after every chunk it needs and its index). Power cut: whole or
        absent."""
        target = self.recipe_path(recipe.sha256)
        if target.exists():
            return
        self._mkdir(target.parent)
        atomic_write(target, recipe.to_bytes(), self._file_mode)

    def recipe(self, image_sha256: str) -> Recipe | None:
        """The recipe of the chunked image ``image_sha256``; None if there is none.

        Raises:
            ChunkIntegrityError: the recipe file is unreadable, not a recipe, or the recipe of
                another image.
        """
        path = self.recipe_path(image_sha256)
        try:
            data = _read_regular(path, RECIPE_LIMIT)
        except FileNotFoundError:
            return None
        except (OSError, _NotRegular) as err:
            raise ChunkIntegrityError(f"recipe {path}: {_why(err)}") from err
        recipe = Recipe.from_bytes(data, f"recipe {path}")
        if recipe.sha256 != image_sha256:
            raise ChunkIntegrityError(f"recipe {path}: names image {recipe.sha256!r}")
        return recipe

    def layout(self, recipe: Recipe, load_index: Callable[[str, int], bytes | None]) -> ChunkIndex:
        """The chunk index of ``recipe``'s image, parsed (and kept for the next ranges).

        Raises:
            ChunkIntegrityError: the index blob is missing or not the index it should be.
        """
        return self._layout(recipe, load_index).index

    def _layout(self, recipe: Recipe, load_index: Callable[[str, int], bytes | None]) -> _Layout:
        """The parsed index, from the cache or parsed once however many requests ask at the
        same moment (the others wait for that parse)."""
        key = recipe.index_sha256
        with self._lock:
            cached = self._cached_layout(key)
            if cached is not None:
                return cached
            parsing = self._parsing.setdefault(key, threading.Lock())
        with parsing:
            try:
                with self._lock:
                    cached = self._cached_layout(key)
                if cached is not None:
                    return cached
                layout = self._parse(recipe, load_index)
                with self._lock:
                    self._keep_layout(key, layout)
                return layout
            finally:
                with self._lock:
                    if self._parsing.get(key) is parsing:
                        del self._parsing[key]

    def _cached_layout(self, key: str) -> _Layout | None:
        cached = self._layouts.get(key)
        if cached is not None:
            self._layouts.move_to_end(key)
        return cached

    def _keep_layout(self, key: str, layout: _Layout) -> None:
        if key in self._layouts or layout.cost > CACHED_INDEX_BYTES:
            return
        self._layouts[key] = layout
        self._layout_bytes += layout.cost
        while len(self._layouts) > CACHED_INDEXES or self._layout_bytes > CACHED_INDEX_BYTES:
            _, dropped = self._layouts.popitem(last=False)
            self._layout_bytes -= dropped.cost

    def _parse(self, recipe: Recipe, load_index: Callable[[str, int], bytes | None]) -> _Layout:
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
        return _Layout(index, tuple(accumulate(index.stored_lengths, initial=0)))

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
        # the index is parsed at the first read: a HEAD or a 304 answers from the recipe
        raw = AssembledImage(self, lambda: self._layout(recipe, load_index), recipe)
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

    def read_chunk(self, chunk: Chunk, compression: str, where: str) -> bytes:
        """The stored bytes of ``chunk`` from its chunk file, verified (see the module
        docstring).

        Raises:
            ChunkIntegrityError: the file is missing, unreadable, not a regular file, not of
                the chunk's stored length, or its bytes are not the chunk; names the file.
        """
        path = self.path(chunk.sha256, compression)
        try:
            data, before = _read_exactly(path, chunk.stored_length)
            key = (str(path), before.st_ino, before.st_size, before.st_mtime_ns)
            with self._lock:
                known = key in self._verified
                if known:
                    self._verified.move_to_end(key)
            if not known:
                unpack(data, chunk, compression)
                with self._lock:
                    self._verified[key] = None
                    while len(self._verified) > VERIFIED_CHUNKS:
                        self._verified.popitem(last=False)
        except FileNotFoundError as err:
            problem = f"{where}: chunk file {path} is missing from the chunk store"
            raise ChunkIntegrityError(problem) from err
        except (OSError, _NotRegular, ImageIntegrityError) as err:
            raise ChunkIntegrityError(
                f"{where}: chunk file {path} is damaged: {_why(err)}"
            ) from err
        return data


RECIPE_LIMIT = 64 << 10  # a recipe is a few hundred bytes
_DAMAGED = b"damaged"  # a chunk file that is there but does not hold its chunk


class _NotRegular(Exception):
    """A store file that is a symlink, a directory or a device, or not of its length."""


def _why(err: BaseException) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return str(err)


def _as_stored(chunk: Chunk, stored_length: int) -> Chunk:
    return Chunk(chunk.offset, chunk.length, chunk.stored_offset, stored_length, chunk.sha256)


def _read_regular(path: Path, limit: int | None) -> bytes:
    """The bytes of the regular file ``path``, never through a symlink (at most ``limit``).

    Raises:
        FileNotFoundError: no such file.
        _NotRegular: a symlink, a directory, a device, or larger than ``limit``.
        OSError: it cannot be read.
    """
    data, _ = _read_exactly(path, None, limit)
    return data


def _read_exactly(
    path: Path, length: int | None, limit: int | None = None
) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file ``path`` (exactly ``length`` of them, if given), opened
    without following a symlink, and its status before the read; the status must not change
    during the read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _NotRegular("a symlink (refused)") from err
        raise
    with os.fdopen(fd, "rb") as handle:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise _NotRegular("not a regular file")
        if length is not None and before.st_size != length:
            raise _NotRegular(f"{before.st_size} bytes, the index says {length}")
        if limit is not None and before.st_size > limit:
            raise _NotRegular(f"{before.st_size} bytes, more than {limit}")
        data = handle.read(before.st_size + 1)
        after = os.fstat(fd)
    if len(data) != before.st_size or (after.st_size, after.st_mtime_ns) != (
        before.st_size,
        before.st_mtime_ns,
    ):
        raise _NotRegular("changed while it was read")
    return data, before


class AssembledImage(io.RawIOBase):
    """A chunked image's stored bytes, read from its chunk files in index order: a read at a
    stored offset finds its chunk by bisection over the chunks' stored offsets. Each chunk is
    read whole and verified (:meth:`ChunkStore.read_chunk`) before any of its bytes are given
    out; the index is parsed at the first read."""

    def __init__(self, store: ChunkStore, layout: Callable[[], _Layout], recipe: Recipe) -> None:
        super().__init__()
        self._store = store
        self._load_layout = layout
        self._layout: _Layout | None = None
        self._recipe = recipe
        self._position = 0
        self._number = -1  # the chunk whose bytes are held
        self._data = b""

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
        if self._layout is None:
            self._layout = self._load_layout()
        starts = self._layout.starts
        if self._position >= starts[-1]:
            return 0
        number = bisect_right(starts, self._position) - 1
        if number != self._number:
            self._data, self._number = b"", -1
            chunk = Chunk(
                0, self._layout.index.lengths[number], starts[number],
                self._layout.index.stored_lengths[number], self._layout.index.digests[number],
            )  # fmt: skip
            where = f"image {self._recipe.sha256}, chunk {number}"
            self._data = self._store.read_chunk(chunk, self._recipe.compression, where)
            self._number = number
        within = self._position - starts[number]
        count = min(len(buffer), len(self._data) - within)
        memoryview(buffer)[:count] = self._data[within : within + count]
        self._position += count
        return count

    def close(self) -> None:
        self._data, self._number = b"", -1
        super().close()
