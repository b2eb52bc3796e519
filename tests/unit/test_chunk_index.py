"""The chunk index parser on hostile bytes: ``ChunkIndex.from_bytes`` raises ManifestError or
returns an index whose figures add up to the image it was asked about, never anything else."""

from __future__ import annotations

import struct

from hypothesis import event, example, given
from hypothesis import strategies as st

from image_builder.chunks import (
    LIMIT_MAX,
    LIMIT_MIN,
    MAGIC,
    ChunkIndex,
    stored_length_bound,
)
from image_builder.errors import ManifestError

HEADER = struct.Struct(">8sIIIQ")
ENTRY = struct.Struct(">II32s")


def _valid(lengths: list[int], stored: list[int]) -> bytes:
    index = ChunkIndex(
        tuple(lengths), tuple(stored), tuple(bytes([n % 256]) * 32 for n in range(len(lengths)))
    )
    return index.to_bytes()


@st.composite
def indexes(draw: st.DrawFn) -> tuple[bytes, int, int, str]:
    """A valid index and its image's figures, then perhaps mutated: bytes flipped, cut, grown,
    a field replaced by a boundary value, or the figures asked about changed."""
    compression = draw(st.sampled_from(["none", "zstd"]))
    lengths = draw(st.lists(st.integers(1, 256 << 10), min_size=1, max_size=12))
    if compression == "none":
        stored = list(lengths)
    else:
        stored = [draw(st.integers(1, stored_length_bound(n))) for n in lengths]
    data = bytearray(_valid(lengths, stored))
    image_size, stored_size = sum(lengths), sum(stored)
    interesting = st.sampled_from([0, 1, LIMIT_MIN - 1, LIMIT_MAX + 1, 2**31, 2**32 - 1])
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "grow", "field", "figures", "count"]))
        if kind == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "grow":
            data += draw(st.binary(max_size=80))
        elif kind == "field" and len(data) >= HEADER.size + ENTRY.size:
            entry = draw(st.integers(0, (len(data) - HEADER.size) // ENTRY.size - 1))
            at = HEADER.size + entry * ENTRY.size + draw(st.sampled_from([0, 4]))
            data[at : at + 4] = struct.pack(">I", draw(interesting))
        elif kind == "figures":
            image_size += draw(st.integers(-2, 2))
            stored_size += draw(st.integers(-2, 2))
        elif kind == "count" and len(data) >= HEADER.size:
            data[20:28] = struct.pack(">Q", draw(st.sampled_from([0, 1, 2**32, 2**64 - 1])))
    return bytes(data), image_size, stored_size, compression


def _check(data: bytes, image_size: int, stored_size: int, compression: str) -> None:
    try:
        index = ChunkIndex.from_bytes(
            data, image_size=image_size, stored_size=stored_size, compression=compression,
            where="index",
        )  # fmt: skip
    except ManifestError as err:
        assert str(err).startswith("index: "), err
        event("refused")
        return
    event("accepted")
    # accepted: every figure adds up to the image asked about
    assert len(index) >= 1
    assert len(index.lengths) == len(index.stored_lengths) == len(index.digests)
    assert index.image_size == image_size and index.stored_size == stored_size
    assert LIMIT_MIN <= index.min_size <= index.avg_size <= index.max_size <= LIMIT_MAX
    assert all(0 < n <= index.max_size for n in index.lengths)
    assert all(len(d) == 32 for d in index.digests)
    for length, stored in zip(index.lengths, index.stored_lengths, strict=True):
        assert 0 < stored <= (length if compression == "none" else stored_length_bound(length))
        if compression == "none":
            assert stored == length
    chunks = list(index.chunks())
    assert chunks[-1].offset + chunks[-1].length == image_size
    assert chunks[-1].stored_offset + chunks[-1].stored_length == stored_size
    assert index.to_bytes() == data  # one spelling: what was parsed is what is written


@given(indexes())
@example((b"", 0, 0, "none"))
@example((MAGIC, 1, 1, "zstd"))
@example((HEADER.pack(MAGIC, 1024, 1024, 1024, 2**64 - 1), 1, 1, "none"))
def test_hostile_index_bytes_are_refused_or_add_up(case: tuple[bytes, int, int, str]) -> None:
    _check(*case)


@given(st.binary(max_size=400), st.integers(0, 2**40), st.integers(0, 2**40))
def test_random_bytes_are_refused_or_add_up(data: bytes, image: int, stored: int) -> None:
    _check(data, image, stored, "zstd")
    _check(MAGIC + data, image, stored, "none")
