"""The bundle's container: a strict subset of POSIX ustar.

A bundle is a tar archive that ``tar tvf`` can list and extract, but this reader accepts exactly
one spelling of it: regular files only, plain file names, fixed metadata, zero padding, the
two-block end marker and nothing after it. Every header is re-encoded from the values parsed out
of it and must match the stored 512 bytes exactly; together with the header checksum this means
any changed byte outside a member's data is an error, never silently ignored.

Header, as written and as required (offset, length, value)::

    0   100  name, NUL padded            257   6  "ustar\\0"
    100   8  "0000644\\0"                 263   2  "00"
    108   8  "0000000\\0" (uid)           265  32  "root", NUL padded (uname)
    116   8  "0000000\\0" (gid)           297  32  "root", NUL padded (gname)
    124  12  size: 11 octal digits + NUL, 329   8  "0000000\\0" (devmajor)
             or base-256 at 8 GiB and up  337   8  "0000000\\0" (devminor)
    136  12  mtime: 11 octal digits + NUL 345 155  zeros (prefix)
    148   8  checksum: 6 octal digits, NUL, space   500  12  zeros
    156   1  "0" (regular file)
    157 100  zeros (linkname)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from image_builder.errors import BundleFormatError

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)
MAX_NAME = 100
# ustar's octal size field holds at most 8 GiB - 1; beyond it the GNU base-256 form is used,
# which GNU tar, bsdtar and Python's tarfile all read.
_OCTAL_SIZE_LIMIT = 8**11
_MAX_MTIME = 8**11 - 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")

_TYPE_NAMES = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device node",
    b"4": "a block device node",
    b"5": "a directory",
    b"6": "a FIFO",
    b"7": "a contiguous file",
    b"x": "a pax extended header",
    b"g": "a pax global header",
    b"L": "a GNU long name",
    b"K": "a GNU long link name",
    b"S": "a GNU sparse file",
}


@dataclass(frozen=True)
class MemberHeader:
    """What a bundle's tar header says: a regular file's name, size and modification time."""

    name: str
    size: int
    mtime: int


def padding(size: int) -> int:
    """Zero bytes that follow ``size`` bytes of member data to reach a block boundary."""
    return -size % BLOCK


def check_name(name: str) -> None:
    """Allow only a plain file name: no directories, no ``..``, nothing absolute.

    Raises:
        BundleFormatError: the name is not plain.
    """
    if not _NAME.fullmatch(name) or len(name.encode()) >= MAX_NAME:
        raise BundleFormatError(
            f"member name {name!r} is not a plain file name (letters, digits, '._+-', "
            f"at most {MAX_NAME - 1} characters, no '/' or '..')"
        )


def _size_field(size: int) -> bytes:
    if size < _OCTAL_SIZE_LIMIT:
        return b"%011o\0" % size
    return b"\x80" + size.to_bytes(11, "big")


def encode_header(member: MemberHeader) -> bytes:
    """The canonical 512-byte header for ``member``."""
    check_name(member.name)
    if not 0 <= member.mtime <= _MAX_MTIME:
        raise BundleFormatError(f"member {member.name!r}: mtime {member.mtime} out of range")
    if not 0 <= member.size < 2**88:
        raise BundleFormatError(f"member {member.name!r}: size {member.size} out of range")
    header = bytearray(BLOCK)
    header[0:100] = member.name.encode().ljust(100, b"\0")
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = _size_field(member.size)
    header[136:148] = b"%011o\0" % member.mtime
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    header[265:297] = b"root".ljust(32, b"\0")
    header[297:329] = b"root".ljust(32, b"\0")
    header[329:337] = b"0000000\0"
    header[337:345] = b"0000000\0"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _parse_number(field: bytes, what: str) -> int:
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(digits, 8)
    except ValueError as err:
        raise BundleFormatError(f"tar header: {what} field {field!r} is not a number") from err


def decode_header(block: bytes, offset: int) -> MemberHeader:
    """Parse one header block that must be in canonical form.

    Raises:
        BundleFormatError: the header is damaged, names a non-regular member or an unsafe name,
            or is not spelled exactly as :func:`encode_header` spells it.
    """
    where = f"tar header at offset {offset}"
    if block[257:263] != b"ustar\0":
        raise BundleFormatError(
            f"{where}: not a ustar header (the file is not a bundle, or damaged)"
        )
    raw_name = block[0:100].split(b"\0", 1)[0]
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BundleFormatError(f"{where}: member name is not UTF-8") from err
    typeflag = block[156:157]
    if typeflag not in (b"0", b"\0"):
        kind = _TYPE_NAMES.get(typeflag, f"of unsupported type {typeflag!r}")
        raise BundleFormatError(f"member {name!r} is {kind}; a bundle holds only regular files")
    if block[345:500].strip(b"\0"):
        raise BundleFormatError(f"{where}: member name uses the ustar prefix field")
    check_name(name)
    member = MemberHeader(
        name=name,
        size=_parse_number(block[124:136], "size"),
        mtime=_parse_number(block[136:148], "mtime"),
    )
    stored_sum = _parse_number(block[148:156], "checksum")
    actual_sum = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if stored_sum != actual_sum:
        raise BundleFormatError(f"{where}: header checksum mismatch for member {name!r}")
    if encode_header(member) != block:
        raise BundleFormatError(f"{where}: header of member {name!r} is not in canonical form")
    return member
