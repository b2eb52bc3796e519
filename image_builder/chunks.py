"""Content-defined chunks of an image, and the chunk index a signed manifest names.

An image is cut into chunks by FastCDC (the ``fastcdc`` package, pinned: a cut depends only on
the bytes from the chunk's start, so unchanged files produce the same chunks in every release,
wherever they moved). Each chunk is stored on its own: as it is, or as one Zstandard frame, so
the stored image is the concatenation of its stored chunks and any run of chunks can be fetched
with one HTTP range and decompressed alone.

The index lists, in image order, each chunk's length, stored length and SHA-256 (of its
uncompressed bytes). Offsets are the running sums. Binary, big-endian (docs/bundle-format.md):

    magic "MFCHUNK1" | u32 min | u32 avg | u32 max | u64 count | count x (u32 length,
    u32 stored length, 32-byte SHA-256)

The manifest carries the index's size and SHA-256, so an index is as trusted as the manifest;
:meth:`ChunkIndex.from_bytes` still checks every figure against the image it describes, so an
index that does not add up is one clear error and never a write outside a slot.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import BinaryIO

import zstandard

from image_builder.errors import ImageBuildError, ImageIntegrityError, ManifestError
from image_builder.manifest import MAX_CHUNK_INDEX_BYTES

# FastCDC's sizes: 64 KiB on average, as casync; small enough that a patch release re-sends
# little beyond the files it changed, large enough that the index stays near 0.1 % of the image.
CHUNK_MIN = 16 << 10
CHUNK_AVG = 64 << 10
CHUNK_MAX = 256 << 10
# An index may name other sizes (a later writer's choice) within these bounds; outside them
# it is damaged or hostile.
LIMIT_MIN = 16 << 10  # the writer's minimum: no smaller chunks, so an index stays small
LIMIT_MAX = 4 << 20
MAGIC = b"MFCHUNK1"
_HEADER = struct.Struct(">8sIIIQ")
_ENTRY = struct.Struct(">II32s")
# How much of an image is cut at once: bounds memory whatever the image's size. A reader of
# the chunks may still hold the last window's last chunk while the next window is read, so two
# windows can be alive at once: 4 MiB keeps that at 8 MiB (16 MiB cost a device 32 MiB of its
# peak RSS while planning a delta), far above CHUNK_MAX, so the cut points do not change.
WINDOW = 4 << 20
ZSTD_LEVEL = (
    9  # per chunk: level 3 costs 5 % more bytes on a Debian root, level 9 about 2 s per GiB
)


def stored_length_bound(length: int) -> int:
    """The most bytes one chunk of ``length`` may take stored as a Zstandard frame
    (ZSTD_compressBound plus the frame header and checksum, rounded up)."""
    return length + (length >> 7) + 512


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk: where it is in the image and in the stored image, and its SHA-256."""

    offset: int
    length: int
    stored_offset: int
    stored_length: int
    sha256: bytes


@dataclass(frozen=True)
class ChunkIndex:
    """The chunks of one image, in order (see the module docstring)."""

    lengths: tuple[int, ...]
    stored_lengths: tuple[int, ...]
    digests: tuple[bytes, ...]
    min_size: int = CHUNK_MIN
    avg_size: int = CHUNK_AVG
    max_size: int = CHUNK_MAX

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def image_size(self) -> int:
        return sum(self.lengths)

    @property
    def stored_size(self) -> int:
        return sum(self.stored_lengths)

    def chunks(self) -> Iterator[Chunk]:
        offsets = accumulate(self.lengths, initial=0)
        stored = accumulate(self.stored_lengths, initial=0)
        for length, stored_length, digest, offset, stored_offset in zip(
            self.lengths, self.stored_lengths, self.digests, offsets, stored, strict=False
        ):
            yield Chunk(offset, length, stored_offset, stored_length, digest)

    def to_bytes(self) -> bytes:
        header = _HEADER.pack(MAGIC, self.min_size, self.avg_size, self.max_size, len(self))
        return header + b"".join(
            _ENTRY.pack(length, stored, digest)
            for length, stored, digest in zip(
                self.lengths, self.stored_lengths, self.digests, strict=True
            )
        )

    @classmethod
    def from_bytes(
        cls, data: bytes, *, image_size: int, stored_size: int, compression: str, where: str
    ) -> ChunkIndex:
        """Parse the index of an image of ``image_size`` bytes stored in ``stored_size`` bytes
        with ``compression``, checking that every figure adds up.

        Raises:
            ManifestError: a damaged or hostile index, naming what does not add up.
        """
        if len(data) > MAX_CHUNK_INDEX_BYTES:
            raise ManifestError(f"{where}: chunk index of {len(data)} bytes is too large")
        if len(data) < _HEADER.size:
            raise ManifestError(f"{where}: chunk index of {len(data)} bytes has no header")
        magic, min_size, avg_size, max_size, count = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ManifestError(f"{where}: not a chunk index (magic {magic!r})")
        if not LIMIT_MIN <= min_size <= avg_size <= max_size <= LIMIT_MAX:
            raise ManifestError(
                f"{where}: chunk sizes {min_size}/{avg_size}/{max_size} out of range "
                f"({LIMIT_MIN} <= min <= avg <= max <= {LIMIT_MAX})"
            )
        if len(data) != _HEADER.size + count * _ENTRY.size:
            raise ManifestError(
                f"{where}: chunk index of {len(data)} bytes does not hold the {count} chunks "
                "it declares"
            )
        if count == 0:
            raise ManifestError(f"{where}: chunk index lists no chunk")
        entries = list(_ENTRY.iter_unpack(memoryview(data)[_HEADER.size :]))
        lengths = tuple(entry[0] for entry in entries)
        stored_lengths = tuple(entry[1] for entry in entries)
        for number, (length, stored) in enumerate(zip(lengths, stored_lengths, strict=True)):
            # every chunk but the last is at least the minimum: a cut never comes earlier, and
            # the number of chunks (the memory a device plans with) stays bounded
            smallest = 1 if number == count - 1 else min_size
            if not smallest <= length <= max_size:
                raise ManifestError(
                    f"{where}: chunk {number} is {length} bytes ({smallest} to {max_size} allowed)"
                )
            bound = length if compression == "none" else stored_length_bound(length)
            if not 0 < stored <= bound or (compression == "none" and stored != length):
                raise ManifestError(
                    f"{where}: chunk {number} of {length} bytes is stored in {stored} bytes"
                )
        if sum(lengths) != image_size:
            raise ManifestError(
                f"{where}: chunks add up to {sum(lengths)} bytes, the image is {image_size}"
            )
        if sum(stored_lengths) != stored_size:
            raise ManifestError(
                f"{where}: stored chunks add up to {sum(stored_lengths)} bytes, the stored "
                f"image is {stored_size}"
            )
        return cls(
            lengths, stored_lengths, tuple(entry[2] for entry in entries),
            min_size, avg_size, max_size,
        )  # fmt: skip


def cut(
    read_at: Callable[[int, int], bytes],
    size: int,
    *,
    min_size: int = CHUNK_MIN,
    avg_size: int = CHUNK_AVG,
    max_size: int = CHUNK_MAX,
) -> Iterator[tuple[int, memoryview]]:
    """The chunks of ``size`` bytes read by ``read_at(offset, length)``: (offset, bytes), in
    order. Reads :data:`WINDOW` bytes at a time; the last chunk of a window is cut again with
    the next window, so the chunks are the same as those of the whole image at once."""
    try:
        from fastcdc import fastcdc  # imported here: only cutting needs it
    except ImportError as err:  # a device with its distribution's libraries only
        raise ImageBuildError(
            "cutting images into chunks needs the fastcdc package (pip install fastcdc==1.7.0)"
        ) from err

    offset = 0
    while offset < size:
        window = read_at(offset, min(WINDOW, size - offset))
        if not window:
            raise ManifestError(f"image ends at byte {offset} of {size}")
        last = offset + len(window) >= size
        view = memoryview(window)
        pieces = list(fastcdc(view, min_size, avg_size, max_size))
        if not last and len(pieces) > 1:
            pieces.pop()  # may be cut short by the window: cut again from its start
        for piece in pieces:
            yield offset + piece.offset, view[piece.offset : piece.offset + piece.length]
        offset += pieces[-1].offset + pieces[-1].length


def file_reader(handle: BinaryIO) -> Callable[[int, int], bytes]:
    """``read_at`` for :func:`cut` over an open file or block device."""

    def read_at(offset: int, length: int) -> bytes:
        handle.seek(offset)
        data = handle.read(length)  # a file's or a block device's: all of it at once
        if len(data) == length or not data:
            return data
        parts = [data]  # a stream giving less at a time: join (one more copy of the window)
        length -= len(data)
        while length:
            data = handle.read(length)
            if not data:
                break
            parts.append(data)
            length -= len(data)
        return b"".join(parts)

    return read_at


@dataclass
class StoredImage:
    """What :func:`store_image` wrote: the index, and the SHA-256 and size of both sides."""

    index: ChunkIndex
    sha256: str
    size: int
    uncompressed_sha256: str
    uncompressed_size: int


def store_image(
    source: BinaryIO,
    size: int,
    out: BinaryIO,
    compression: str,
    *,
    progress: Callable[[int], None] | None = None,
) -> StoredImage:
    """Cut the ``size`` bytes of ``source`` into chunks, write each chunk stored (as it is, or
    as its own Zstandard frame) to ``out``, and return the index with both sides' hashes."""
    raw_digest = hashlib.sha256()
    stored_digest = raw_digest if compression == "none" else hashlib.sha256()
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    lengths: list[int] = []
    stored_lengths: list[int] = []
    digests: list[bytes] = []
    stored_size = 0
    for _, data in cut(file_reader(source), size):
        raw_digest.update(data)
        digests.append(hashlib.sha256(data).digest())
        stored = data if compression == "none" else compressor.compress(data)
        if stored_digest is not raw_digest:
            stored_digest.update(stored)
        out.write(stored)
        lengths.append(len(data))
        stored_lengths.append(len(stored))
        stored_size += len(stored)
        if progress is not None:
            progress(len(data))
    index = ChunkIndex(tuple(lengths), tuple(stored_lengths), tuple(digests))
    return StoredImage(
        index, stored_digest.hexdigest(), stored_size, raw_digest.hexdigest(), sum(lengths)
    )


def unpack(stored: bytes, chunk: Chunk, compression: str) -> bytes:
    """A chunk's bytes from its stored bytes, checked against the index.

    Raises:
        ImageIntegrityError: the bytes do not decompress to the chunk's length and SHA-256.
    """
    where = f"chunk at byte {chunk.offset}"
    if len(stored) != chunk.stored_length:
        raise ImageIntegrityError(
            f"{where}: {len(stored)} stored bytes, the index says {chunk.stored_length}"
        )
    if compression == "none":
        data = stored
    else:
        try:
            # the frame's declared size first: decompress() would allocate whatever it claims
            declared = zstandard.get_frame_parameters(stored).content_size
            if declared != chunk.length:
                raise ImageIntegrityError(
                    f"{where}: zstd frame declares {declared} bytes, the index says {chunk.length}"
                )
            inflater = zstandard.ZstdDecompressor().decompressobj()
            data = inflater.decompress(stored)
            if not inflater.eof or inflater.unused_data:
                raise ImageIntegrityError(f"{where}: not exactly one zstd frame")
        except zstandard.ZstdError as err:
            raise ImageIntegrityError(f"{where}: corrupt zstd frame: {err}") from err
    if len(data) != chunk.length or hashlib.sha256(data).digest() != chunk.sha256:
        raise ImageIntegrityError(f"{where}: bytes do not match the chunk index")
    return data
