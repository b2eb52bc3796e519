"""The strict ustar container: canonical headers only, regular files only."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from image_builder.container import (
    _MAX_MTIME,
    BLOCK,
    MemberHeader,
    decode_header,
    encode_header,
)
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


def rechecksummed(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def header_with(**fields: tuple[int, bytes]) -> bytes:
    """A canonical header with byte ranges replaced, its checksum made right again."""
    block = bytearray(encode_header(MemberHeader("rootfs.ext4", 3000, 1_700_000_000)))
    for start, value in fields.values():
        block[start : start + len(value)] = value
    return rechecksummed(block)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prefix": (345, b"a")}, "^tar header at offset 1536: member name uses the ustar prefix"),
        ({"prefix": (400, b"X")}, "^tar header at offset 1536: member name uses the ustar prefix"),
        ({"prefix_end": (499, b"a")}, "^tar header at offset 1536: member name uses the ustar pre"),
        ({"pad": (500, b"a")}, "^tar header at offset 1536: header of member 'rootfs.ext4' is not"),
        ({"name": (0, b"\xff\xfe")}, "^tar header at offset 1536: member name is not UTF-8$"),
        ({"type": (156, b"X")}, "^member 'rootfs.ext4' is of unsupported type b'X'; a bundle"),
        ({"type": (156, b"5")}, "^member 'rootfs.ext4' is a directory; a bundle holds only"),
        ({"type": (156, b"\0")}, "^tar header at offset 1536: header of member 'rootfs.ext4' is"),
        ({"size": (124, b"0000000000x\0")}, r"^tar header: size field b'0000000000x\\x00' is not"),
        ({"mtime": (136, b"1234567890x\0")}, r"^tar header: mtime field b'1234567890x\\x00' is no"),
        # only NULs and spaces around the digits are tolerated, nothing else
        ({"size": (124, b"0000000001X\0")}, r"^tar header: size field b'0000000001X\\x00' is not"),
        ({"size": (124, b"X0000000001\0")}, r"^tar header: size field b'X0000000001\\x00' is not"),
        # a header whose checksum needs six octal digits (high bytes where canonical has none)
        ({"link": (157, b"\xff" * 100), "user": (265, b"\xff" * 64)}, "is not in canonical form"),
    ],
)
def test_header_errors_say_what_and_where(
    fields: dict[str, tuple[int, bytes]], message: str
) -> None:
    with pytest.raises(BundleFormatError, match=message):
        decode_header(header_with(**fields), 1536)


def test_header_checksum_errors() -> None:
    block = bytearray(encode_header(MemberHeader("rootfs.ext4", 3000, 1_700_000_000)))
    block[300] = 1
    with pytest.raises(
        BundleFormatError,
        match="^tar header at offset 0: header checksum mismatch for member 'rootfs.ext4'$",
    ):
        decode_header(bytes(block), 0)
    block[148:156] = b"00000x\0 "
    with pytest.raises(BundleFormatError, match="^tar header: checksum field b'00000x"):
        decode_header(bytes(block), 0)


def test_header_limits() -> None:
    top = MemberHeader("a", 2**88 - 1, _MAX_MTIME)
    assert decode_header(encode_header(top), 0) == top
    with pytest.raises(
        BundleFormatError,
        match=r"^member 'a': size 2\*\*88 out of range$".replace(r"2\*\*88", str(2**88)),
    ):
        encode_header(MemberHeader("a", 2**88, 0))
    with pytest.raises(
        BundleFormatError, match=f"^member 'a': mtime {_MAX_MTIME + 1} out of range$"
    ):
        encode_header(MemberHeader("a", 0, _MAX_MTIME + 1))
    with pytest.raises(BundleFormatError, match="at most 99 characters"):
        encode_header(MemberHeader("a" * 100, 0, 0))


def test_owner_is_root_for_tar_tools() -> None:
    info = tarfile.TarInfo.frombuf(encode_header(MemberHeader("a", 1, 0)), "utf-8", "strict")
    assert (info.uname, info.gname) == ("root", "root")
