"""The strict ustar container: canonical headers only, regular files only."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from image_builder.container import BLOCK, MemberHeader, decode_header, encode_header
from image_builder.errors import BundleFormatError


def test_header_round_trip() -> None:
    member = MemberHeader("rootfs.ext4.zst", 123_456_789, 1_700_000_000)
    block = encode_header(member)
    assert len(block) == BLOCK
    assert decode_header(block, 0) == member


def test_python_tarfile_reads_our_headers_including_base256_sizes() -> None:
    for size in (0, 1, 8**11 - 1, 8**11, 64 << 30):
        block = encode_header(MemberHeader("rootfs.img", size, 1_700_000_000))
        info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
        assert (info.name, info.size, info.mtime, info.isreg()) == (
            "rootfs.img",
            size,
            1_700_000_000,
            True,
        )
        assert decode_header(block, 0).size == size


def python_header(**fields: object) -> bytes:
    info = tarfile.TarInfo("rootfs.img")
    info.size = 10
    info.mtime = 1_700_000_000
    info.mode = 0o644
    info.uname = info.gname = "root"
    for name, value in fields.items():
        setattr(info, name, value)
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"type": tarfile.SYMTYPE, "linkname": "/etc/passwd", "size": 0}, "symbolic link"),
        ({"type": tarfile.LNKTYPE, "linkname": "other", "size": 0}, "hard link"),
        ({"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3, "size": 0}, "character device"),
        ({"type": tarfile.BLKTYPE, "devmajor": 8, "devminor": 0, "size": 0}, "block device"),
        ({"type": tarfile.DIRTYPE, "size": 0}, "directory"),
        ({"type": tarfile.FIFOTYPE, "size": 0}, "FIFO"),
        ({"name": "../rootfs.img"}, "not a plain file name"),
        ({"name": "/rootfs.img"}, "not a plain file name"),
        ({"name": "images/rootfs.img"}, "not a plain file name"),
        ({"name": ".hidden"}, "not a plain file name"),
        ({"mode": 0o4755}, "canonical"),
        ({"uid": 1000}, "canonical"),
        ({"uname": "pi"}, "canonical"),
    ],
)
def test_foreign_headers_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(BundleFormatError, match=message):
        decode_header(python_header(**fields), 0)


def test_pax_and_gnu_extension_headers_are_refused() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("r" * 150)
        archive.addfile(info, io.BytesIO(b""))
    with pytest.raises(BundleFormatError, match="pax extended header"):
        decode_header(out.getvalue()[:BLOCK], 0)


def test_not_a_tar_header() -> None:
    with pytest.raises(BundleFormatError, match="not a ustar header"):
        decode_header(b"PK\x03\x04" + bytes(508), 0)


@given(position=st.integers(0, BLOCK - 1), xor=st.integers(1, 255))
def test_any_changed_header_byte_is_refused(position: int, xor: int) -> None:
    block = bytearray(encode_header(MemberHeader("rootfs.img", 4096, 1_700_000_000)))
    block[position] ^= xor
    with pytest.raises(BundleFormatError):
        decode_header(bytes(block), 0)


def test_every_single_bit_flip_in_a_header_is_refused() -> None:
    block = encode_header(MemberHeader("rootfs.img", 4096, 1_700_000_000))
    for position in range(BLOCK):
        for bit in range(8):
            damaged = bytearray(block)
            damaged[position] ^= 1 << bit
            with pytest.raises(BundleFormatError):
                decode_header(bytes(damaged), 0)


def test_writer_refuses_unsafe_names() -> None:
    for name in ("../x", "/x", "a/b", "", "x" * 100):
        with pytest.raises(BundleFormatError):
            encode_header(MemberHeader(name, 1, 0))
