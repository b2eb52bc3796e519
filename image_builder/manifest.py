"""The release manifest: plain data, one validating parser, one canonical encoding.

The manifest is what a bundle's signature covers. It is UTF-8 JSON; the writer emits sorted
keys without spaces, and the reader checks every field, rejects unknown ones and duplicate keys,
so a manifest means exactly one thing. See docs/bundle-format.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from image_builder.container import check_name
from image_builder.errors import BundleFormatError, ManifestError

MANIFEST_FORMAT = 2  # what the writer emits: images carry a chunk index
KNOWN_FORMATS = (1, 2)  # what the reader accepts: version 1 bundles still install
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_IMAGES = 16
# No slot image comes near this; a header claiming more is damaged or hostile.
MAX_IMAGE_BYTES = 1 << 40
MAX_SECURITY_VERSION = 2**32 - 1

SLOT_CLASSES = ("rootfs", "bootfs")
COMPRESSIONS = ("none", "zstd")
RESERVED_NAMES = ("manifest.json", "manifest.sig")
CHUNK_INDEX_SUFFIX = ".chunks"
MAX_CHUNK_INDEX_BYTES = 64 << 20  # 1.6 million chunks: a 100 GiB image at 64 KiB each

_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
# Semantic Versioning 2.0.0, without leading zeros in numeric identifiers.
_NUM = r"(?:0|[1-9]\d*)"
_PRE_ID = r"(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)"
_SEMVER = re.compile(
    rf"{_NUM}\.{_NUM}\.{_NUM}(?:-{_PRE_ID}(?:\.{_PRE_ID})*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
)


def is_release_version(version: str) -> bool:
    """Whether ``version`` names a release as a manifest may: a semantic version (2.0.0, no
    leading zeros), at most 128 characters."""
    return bool(_SEMVER.fullmatch(version)) and len(version) <= 128


def _require(document: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in document:
        raise ManifestError(f"{where}: missing field '{key}'")
    value = document[key]
    # bool is an int in Python, but never a valid size or version here
    if type(value) is not kind:
        raise ManifestError(f"{where}: field '{key}' must be {kind.__name__}, not {value!r}")
    return value


def _check_keys(document: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(document) - allowed)
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {', '.join(unknown)}")


def _ident(document: Mapping[str, Any], key: str, where: str) -> str:
    value: str = _require(document, key, str, where)
    if not _IDENT.fullmatch(value):
        raise ManifestError(
            f"{where}: '{key}' {value!r} must be 1-128 characters of letters, digits and '._:+-'"
        )
    return value


def _size(document: Mapping[str, Any], key: str, where: str) -> int:
    value: int = _require(document, key, int, where)
    if not 0 < value <= MAX_IMAGE_BYTES:
        raise ManifestError(f"{where}: '{key}' {value} out of range (1 to {MAX_IMAGE_BYTES})")
    return value


def _digest(document: Mapping[str, Any], key: str, where: str) -> str:
    value: str = _require(document, key, str, where)
    if not _SHA256.fullmatch(value):
        raise ManifestError(f"{where}: '{key}' is not 64 lowercase hex digits")
    return value


@dataclass(frozen=True)
class ChunkIndexRef:
    """Which chunk index describes an image (image_builder.chunks): its size and SHA-256."""

    size: int
    sha256: str

    @classmethod
    def from_dict(cls, document: Any, where: str) -> ChunkIndexRef:
        where = f"{where} chunk_index"
        if not isinstance(document, dict):
            raise ManifestError(f"{where}: must be an object")
        _check_keys(document, {"size", "sha256"}, where)
        size: int = _require(document, "size", int, where)
        if not 0 < size <= MAX_CHUNK_INDEX_BYTES:
            raise ManifestError(
                f"{where}: 'size' {size} out of range (1 to {MAX_CHUNK_INDEX_BYTES})"
            )
        return cls(size=size, sha256=_digest(document, "sha256", where))

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class ImageEntry:
    """One image of a release: which slot class it fills and how its bytes are stored."""

    slot_class: str
    filename: str
    compression: str
    size: int  # stored bytes, as they appear in the bundle
    sha256: str  # of the stored bytes
    uncompressed_size: int  # bytes written into the slot
    uncompressed_sha256: str
    chunk_index: ChunkIndexRef | None = None  # format 2: the image's chunks

    @classmethod
    def from_dict(cls, document: Any, index: int, fmt: int = MANIFEST_FORMAT) -> ImageEntry:
        where = f"manifest image {index}"
        if not isinstance(document, dict):
            raise ManifestError(f"{where}: must be an object")
        allowed = set(cls.__dataclass_fields__)
        if fmt < 2:
            allowed.discard("chunk_index")
        _check_keys(document, allowed, where)
        slot_class = _require(document, "slot_class", str, where)
        if slot_class not in SLOT_CLASSES:
            raise ManifestError(
                f"{where}: unknown slot class {slot_class!r} (known: {', '.join(SLOT_CLASSES)})"
            )
        filename = _require(document, "filename", str, where)
        try:
            check_name(filename)
        except BundleFormatError as err:
            raise ManifestError(f"{where}: {err}") from err
        if filename in RESERVED_NAMES:
            raise ManifestError(f"{where}: file name {filename!r} is reserved")
        compression = _require(document, "compression", str, where)
        if compression not in COMPRESSIONS:
            raise ManifestError(
                f"{where}: unknown compression {compression!r} (known: {', '.join(COMPRESSIONS)})"
            )
        entry = cls(
            slot_class=slot_class,
            filename=filename,
            compression=compression,
            size=_size(document, "size", where),
            sha256=_digest(document, "sha256", where),
            uncompressed_size=_size(document, "uncompressed_size", where),
            uncompressed_sha256=_digest(document, "uncompressed_sha256", where),
            chunk_index=(
                ChunkIndexRef.from_dict(document["chunk_index"], where)
                if "chunk_index" in document
                else None
            ),
        )
        if entry.chunk_index is not None and len(entry.chunk_index_name) >= 100:
            raise ManifestError(f"{where}: file name {filename!r} too long for a chunked image")
        if compression == "none" and (
            entry.size != entry.uncompressed_size or entry.sha256 != entry.uncompressed_sha256
        ):
            raise ManifestError(f"{where}: uncompressed image with differing stored size or hash")
        return entry

    @property
    def chunk_index_name(self) -> str:
        """The bundle member holding this image's chunk index (it follows the image)."""
        return self.filename + CHUNK_INDEX_SUFFIX

    def to_dict(self) -> dict[str, Any]:
        document = {
            name: getattr(self, name) for name in self.__dataclass_fields__ if name != "chunk_index"
        }
        if self.chunk_index is not None:
            document["chunk_index"] = self.chunk_index.to_dict()
        return document


@dataclass(frozen=True)
class Manifest:
    """What a release is, whom it is for, and the exact bytes of each of its images."""

    product: str
    compatible: str
    version: str
    security_version: int
    created: str  # RFC 3339, UTC, whole seconds: 2026-11-27T07:00:00Z
    images: tuple[ImageEntry, ...]
    format: int = MANIFEST_FORMAT

    @classmethod
    def from_dict(cls, document: Any) -> Manifest:
        """Validate a parsed manifest.

        Raises:
            ManifestError: a field is missing, unknown, of the wrong type or out of range.
        """
        where = "manifest"
        if not isinstance(document, dict):
            raise ManifestError("manifest: must be a JSON object")
        fmt = _require(document, "format", int, where)
        if fmt not in KNOWN_FORMATS:
            known = ", ".join(map(str, KNOWN_FORMATS))
            raise ManifestError(
                f"manifest: unknown format version {fmt} (this reader knows {known})"
            )
        _check_keys(document, set(cls.__dataclass_fields__), where)
        version = _require(document, "version", str, where)
        if not is_release_version(version):
            raise ManifestError(f"manifest: version {version!r} is not a semantic version")
        security_version = _require(document, "security_version", int, where)
        if not 0 <= security_version <= MAX_SECURITY_VERSION:
            raise ManifestError(
                f"manifest: security_version {security_version} out of range "
                f"(0 to {MAX_SECURITY_VERSION})"
            )
        created = _require(document, "created", str, where)
        if not _TIMESTAMP.fullmatch(created):
            raise ManifestError(f"manifest: created {created!r} is not YYYY-MM-DDTHH:MM:SSZ")
        try:
            datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ")
        except ValueError as err:
            raise ManifestError(f"manifest: created {created!r} is not a valid time") from err
        raw_images = _require(document, "images", list, where)
        if not 1 <= len(raw_images) <= MAX_IMAGES:
            raise ManifestError(f"manifest: needs 1 to {MAX_IMAGES} images, has {len(raw_images)}")
        images = tuple(ImageEntry.from_dict(raw, i, fmt) for i, raw in enumerate(raw_images))
        _check_unique(images)
        return cls(
            product=_ident(document, "product", where),
            compatible=_ident(document, "compatible", where),
            version=version,
            security_version=security_version,
            created=created,
            images=images,
            format=fmt,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse the exact manifest bytes of a bundle.

        Raises:
            ManifestError: too large, not UTF-8, not JSON, duplicate keys, or invalid fields.
        """
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest: {len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ManifestError(f"manifest: not UTF-8 (byte {err.start})") from err
        try:
            document = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except (ValueError, RecursionError) as err:  # ValueError: bad JSON, ints too long
            raise ManifestError(f"manifest: not JSON ({str(err)[:200]})") from err
        return cls.from_dict(document)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "product": self.product,
            "compatible": self.compatible,
            "version": self.version,
            "security_version": self.security_version,
            "created": self.created,
            "images": [image.to_dict() for image in self.images],
        }

    def to_bytes(self) -> bytes:
        """Canonical encoding: sorted keys, no spaces, UTF-8, trailing newline."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode() + b"\n"

    def image(self, slot_class: str) -> ImageEntry | None:
        return next((i for i in self.images if i.slot_class == slot_class), None)


def _check_unique(images: tuple[ImageEntry, ...]) -> None:
    seen_names: set[str] = set()
    seen_classes: set[str] = set()
    for image in images:
        names = [image.filename]
        if image.chunk_index is not None:
            names.append(image.chunk_index_name)
        for name in names:
            if name in seen_names:
                raise ManifestError(f"manifest: two members named {name!r}")
            seen_names.add(name)
        if image.slot_class in seen_classes:
            raise ManifestError(f"manifest: two images for slot class {image.slot_class!r}")
        seen_classes.add(image.slot_class)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ManifestError(f"manifest: key {key!r} appears twice")
        document[key] = value
    return document


def timestamp(seconds: int) -> str:
    """The manifest's spelling of a POSIX time."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(created: str) -> int:
    """The POSIX time of a manifest's ``created`` (the inverse of :func:`timestamp`)."""
    return int(datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())
