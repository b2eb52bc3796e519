"""Root filesystem images for the lab that say how they behave when booted.

The virtual device has no kernel to run, so an image carries its behaviour in a header: the
release version, what happens when it boots (``healthy``, ``unhealthy``: boots but fails its
health checks, ``hang``: never reaches user space, ``crash``: reaches user space, then the
board resets while the boot check runs), and the SHA-256 of its body. A slot boots
only if its image is complete: a half-written slot (header or body not matching) behaves like
a kernel that cannot mount its root, that is, it hangs until the watchdog resets the board.
Deciding from the slot's bytes, rather than from a table on the side, means the lab cannot
believe a slot is fine when its disk says otherwise.

Lab images are what the lab's own releases carry (tests, ``fleet demo``); a bundle may carry one
like any image (``fleet bundle create --image rootfs=lab.img``). Ordinary images (an ext4 root
filesystem) have no header: a virtual device boots them only when made with ``plain_images``
(``fleet simulate``), as healthy releases (``chaos.virtual_device``).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"FLEETLAB"
BEHAVIOURS = ("healthy", "unhealthy", "hang", "crash")
_HEADER = struct.Struct(">8s16s32sQ32s")  # magic, behaviour, version, body length, body sha


@dataclass(frozen=True)
class LabImage:
    version: str
    behaviour: str


def make_lab_image(
    version: str, behaviour: str = "healthy", size: int = 256 * 1024, *, body: bytes | None = None
) -> bytes:
    """An image of ``size`` bytes for ``version``; the body differs per version unless given
    (releases that share most of their bytes, for delta installs; ``size`` is then ignored)."""
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {behaviour!r}")
    body_length = size - _HEADER.size
    if body is None:
        seed = hashlib.sha256(f"{version}/{behaviour}".encode()).digest()
        body = (seed * (body_length // len(seed) + 1))[:body_length]
    body_length = len(body)
    header = _HEADER.pack(
        MAGIC, behaviour.encode(), version.encode(), body_length, hashlib.sha256(body).digest()
    )
    return header + body


def read_lab_image(slot: Path) -> LabImage | None:
    """The image in ``slot`` if it is complete and intact; ``None`` for anything else."""
    try:
        with slot.open("rb") as handle:
            header = handle.read(_HEADER.size)
            if len(header) != _HEADER.size:
                return None
            magic, behaviour, version, length, digest = _HEADER.unpack(header)
            if magic != MAGIC or length > 1 << 30:
                return None
            if hashlib.sha256(handle.read(length)).digest() != digest:
                return None
        return LabImage(version.rstrip(b"\0").decode(), behaviour.rstrip(b"\0").decode())
    except (OSError, UnicodeDecodeError):
        return None


def looks_like_lab_image(slot: Path) -> bool:
    """Whether ``slot`` starts like a lab image (complete or not): such a slot is judged as a
    lab image, never as an ordinary one."""
    try:
        with slot.open("rb") as handle:
            return handle.read(len(MAGIC)) == MAGIC
    except OSError:
        return False
