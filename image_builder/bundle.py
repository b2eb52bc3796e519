"""Release bundles read as streams that verify as they go (the writer: ``bundle_writer``).

Layout (docs/bundle-format.md has the full specification): a strict ustar archive holding, in
this order, ``manifest.json``, ``manifest.sig`` (the signature envelope over the manifest's
exact bytes) and one member per image named in the manifest, in manifest order.

Reading is three steps, in an order the reader enforces:

1. :meth:`BundleReader.verify` reads only the manifest and its signature and checks them against
   a keyring, before a single payload byte is read;
2. :meth:`BundleReader.images` yields each image as an :class:`ImageStream`, which decompresses
   and hashes while it is read and raises instead of reporting the end of the stream if the
   bytes differ from the manifest;
3. the end of the archive is checked when the last image has been read: trailing data is an
   error.
"""

from __future__ import annotations

import hashlib
import io
import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from fleet_core.inputs import InputPathError, refuse_non_regular_input
from image_builder.chunks import ChunkIndex
from image_builder.container import BLOCK, MemberHeader, decode_header, padding
from image_builder.errors import BundleError, BundleFormatError, ImageIntegrityError
from image_builder.manifest import MAX_MANIFEST_BYTES, ChunkIndexRef, ImageEntry, Manifest, epoch
from signing import Keyring, SignatureEnvelope, Verified
from signing.errors import SignatureFormatError
from signing.signature import MAX_ENVELOPE_BYTES

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
SIGNATURE_PURPOSE = "bundle-manifest"
CHUNK = 1024 * 1024
MAX_READ = 8 * CHUNK  # the most one read of an image returns: bounds the memory a reader needs
# Frames asking for a larger window are refused: a device has little memory, and our writer
# never produces one.
ZSTD_MAX_WINDOW = 1 << 27


class _Source:
    """Sequential reads from the bundle with offset tracking and clear truncation errors."""

    def __init__(self, stream: BinaryIO, name: str) -> None:
        self.stream = stream
        self.name = name
        self.offset = 0

    def read_exact(self, size: int, what: str) -> bytes:
        parts = []
        remaining = size
        while remaining:
            chunk = self.stream.read(min(remaining, CHUNK))
            if not chunk:
                raise BundleFormatError(
                    f"{self.name}: truncated: {what} ends after {size - remaining} of {size} bytes"
                )
            parts.append(chunk)
            remaining -= len(chunk)
        self.offset += size
        return b"".join(parts)

    def read_some(self, limit: int, what: str) -> bytes:
        chunk = self.stream.read(min(limit, MAX_READ))
        if not chunk and limit:
            raise BundleFormatError(f"{self.name}: truncated inside {what}")
        self.offset += len(chunk)
        return chunk

    def skip_padding(self, size: int, what: str) -> None:
        pad = self.read_exact(padding(size), f"padding after {what}")
        if pad.strip(b"\0"):
            raise BundleFormatError(f"{self.name}: non-zero padding after {what}")


class ImageStream(io.RawIOBase):
    """One image, decompressed, as a readable stream that verifies itself.

    ``read`` returns the image's uncompressed bytes. When the stored bytes are exhausted it
    checks both the stored and the uncompressed size and SHA-256 against the signed manifest and
    raises :class:`ImageIntegrityError` instead of returning end of stream if either differs, so
    a consumer that reads to the end has either verified bytes or an exception. Output beyond
    the declared size is an error as soon as it appears.
    """

    def __init__(self, entry: ImageEntry, raw: BinaryIO, *, name: str = "image") -> None:
        super().__init__()
        self.entry = entry
        self.name = name
        self._raw = raw
        self._stored_left = entry.size
        self._stored_digest = hashlib.sha256()
        # Uncompressed, the stored bytes are the image (the manifest requires equal hashes):
        # one digest serves both, which halves the hashing.
        self._digest = self._stored_digest if entry.compression == "none" else hashlib.sha256()
        self.bytes_out = 0
        self._done = False
        self._reader: BinaryIO | None = None
        if entry.compression == "zstd":
            decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
            self._reader = decompressor.stream_reader(
                cast(BinaryIO, _StoredReader(self)),
                read_size=CHUNK,
                read_across_frames=True,
                closefd=False,
            )

    def readable(self) -> bool:
        return True

    def _read_stored(self, size: int) -> bytes:
        if self._stored_left == 0:
            return b""
        chunk = self._raw.read(min(size, self._stored_left, MAX_READ))
        if not chunk:
            raise ImageIntegrityError(
                f"{self.name}: stored data ends {self._stored_left} bytes early"
            )
        self._stored_left -= len(chunk)
        self._stored_digest.update(chunk)
        return chunk

    def read(self, size: int = -1) -> bytes:
        if self._done:
            return b""
        want = CHUNK if size is None or size < 0 else size
        if want == 0:
            return b""
        if self._reader is None:
            chunk = self._read_stored(want)
        else:
            try:
                chunk = self._reader.read(want)
            except zstandard.ZstdError as err:
                raise ImageIntegrityError(f"{self.name}: corrupt zstd data: {err}") from err
        if chunk:
            self.bytes_out += len(chunk)
            if self.bytes_out > self.entry.uncompressed_size:
                raise ImageIntegrityError(
                    f"{self.name}: larger than the {self.entry.uncompressed_size} bytes declared"
                )
            if self._digest is not self._stored_digest:
                self._digest.update(chunk)
            return chunk
        self._finish()
        return b""

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def _finish(self) -> None:
        if self._stored_left:
            raise ImageIntegrityError(
                f"{self.name}: {self._stored_left} stored bytes after the end of the "
                "compressed data"
            )
        if self._stored_digest.hexdigest() != self.entry.sha256:
            raise ImageIntegrityError(f"{self.name}: SHA-256 of stored bytes does not match")
        if self.bytes_out != self.entry.uncompressed_size:
            raise ImageIntegrityError(
                f"{self.name}: {self.bytes_out} bytes, manifest declares "
                f"{self.entry.uncompressed_size}"
            )
        if self._digest.hexdigest() != self.entry.uncompressed_sha256:
            raise ImageIntegrityError(f"{self.name}: SHA-256 of image does not match")
        self._done = True

    @property
    def verified(self) -> bool:
        """True once the whole image was read and matched the manifest."""
        return self._done


class _StoredReader(io.RawIOBase):
    """Feeds an :class:`ImageStream`'s stored bytes to the decompressor.

    It holds its owner weakly: the owner holds the decompressor's reader, which holds this, and
    that reader is invisible to Python's garbage collector, so a strong reference back would
    make a cycle never freed (a daemon would lose the image's buffers at every install)."""

    def __init__(self, owner: ImageStream) -> None:
        super().__init__()
        self._owner = weakref.ref(owner)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        owner = self._owner()
        if owner is None:  # the image stream is gone: nothing is read for it any more
            return b""
        return owner._read_stored(CHUNK if size is None or size < 0 else size)


@dataclass(frozen=True)
class BundleImage:
    """An image member of a bundle: its manifest entry, its offset in the bundle, its stream."""

    entry: ImageEntry
    offset: int  # of the stored bytes within the bundle file
    stream: ImageStream


class BundleReader:
    """Reads a bundle front to back from any stream, never seeking, never buffering an image.

    Use :meth:`verify` (or :meth:`read_header` to only look), then :meth:`images`.
    """

    def __init__(self, stream: BinaryIO, *, name: str = "bundle") -> None:
        self._source = _Source(stream, name)
        self.name = name
        self._header: tuple[Manifest, bytes, SignatureEnvelope] | None = None
        self._manifest: Manifest | None = None
        self._verified: Verified | None = None
        self._images_started = False
        # image file name -> (offset of the index in the bundle, the parsed index)
        self.chunk_indexes: dict[str, tuple[int, ChunkIndex]] = {}

    def _next_header(self) -> MemberHeader | None:
        offset = self._source.offset
        block = self._source.read_exact(BLOCK, "a tar header")
        if block == bytes(BLOCK):
            second = self._source.read_exact(BLOCK, "the end-of-archive marker")
            if second != bytes(BLOCK):
                raise BundleFormatError(f"{self.name}: damaged end-of-archive marker")
            if self._source.stream.read(1):
                raise BundleFormatError(f"{self.name}: trailing data after the end of the bundle")
            return None
        return decode_header(block, offset)

    def _check_mtime(self, header: MemberHeader, manifest: Manifest) -> None:
        # Every header carries the manifest's creation time: with it fixed, a header has one
        # spelling, and a change that keeps the (additive) header checksum is still caught.
        if header.mtime != epoch(manifest.created):
            raise BundleFormatError(
                f"{self.name}: member {header.name!r} has mtime {header.mtime}, "
                f"the manifest was created at {epoch(manifest.created)}"
            )

    def _read_small_member(self, expected: str, limit: int) -> tuple[bytes, MemberHeader]:
        header = self._next_header()
        if header is None:
            raise BundleFormatError(f"{self.name}: ends before {expected}")
        if header.name != expected:
            raise BundleFormatError(
                f"{self.name}: member {header.name!r} where {expected!r} must be"
            )
        if header.size > limit:
            raise BundleFormatError(
                f"{self.name}: {expected} claims {header.size} bytes, more than {limit}"
            )
        data = self._source.read_exact(header.size, expected)
        self._source.skip_padding(header.size, expected)
        return data, header

    def read_header(self) -> tuple[Manifest, bytes, SignatureEnvelope]:
        """Read and parse the manifest (and its exact bytes) and the signature envelope.

        Nothing is checked against a key: for display, or before :meth:`verify`.

        Raises:
            BundleFormatError, ManifestError: not a well-formed bundle header.
        """
        if self._header is None:
            manifest_bytes, header = self._read_small_member(MANIFEST_NAME, MAX_MANIFEST_BYTES)
            manifest = Manifest.from_bytes(manifest_bytes)
            self._check_mtime(header, manifest)
            envelope_bytes, header = self._read_small_member(SIGNATURE_NAME, MAX_ENVELOPE_BYTES)
            self._check_mtime(header, manifest)
            try:
                envelope = SignatureEnvelope.from_bytes(envelope_bytes)
            except SignatureFormatError as err:
                raise BundleFormatError(f"{self.name}: {err}") from err
            self._header = (manifest, manifest_bytes, envelope)
        return self._header

    def verify(self, keyring: Keyring) -> Manifest:
        """Read the manifest and its signatures and check them against ``keyring``.

        No payload byte has been read when this returns or raises.

        Raises:
            BundleFormatError, ManifestError: not a well-formed bundle.
            signing.VerificationError: the signatures do not satisfy the keyring.
        """
        manifest, manifest_bytes, envelope = self.read_header()
        self._verified = keyring.verify(manifest_bytes, envelope, SIGNATURE_PURPOSE)
        self._manifest = manifest
        return manifest

    @property
    def manifest(self) -> Manifest:
        """The verified manifest.

        Raises:
            BundleError: :meth:`verify` has not succeeded.
        """
        if self._manifest is None:
            raise BundleError(f"{self.name}: manifest not verified")
        return self._manifest

    @property
    def manifest_sha256(self) -> str:
        """SHA-256 of the verified manifest's exact bytes: the release's identity."""
        if self._header is None or self._manifest is None:
            raise BundleError(f"{self.name}: manifest not verified")
        return hashlib.sha256(self._header[1]).hexdigest()

    @property
    def bytes_read(self) -> int:
        """How many bytes of the bundle have been consumed so far."""
        return self._source.offset

    @property
    def signed_by(self) -> tuple[str, ...]:
        """Key ids whose signatures were verified (empty before :meth:`verify`)."""
        return self._verified.key_ids if self._verified else ()

    def images(self) -> Iterator[BundleImage]:
        """Yield each image in manifest order; each must be read to its end before the next.

        After the last image the end of the archive is checked.

        Raises:
            BundleError: called before :meth:`verify`, or called twice.
            BundleFormatError: a member is missing, extra, duplicated or out of order.
            ImageIntegrityError: (from the streams) bytes that differ from the manifest.
        """
        if self._verified is None or self._manifest is None:
            raise BundleError(f"{self.name}: images read before the manifest was verified")
        if self._images_started:
            raise BundleError(f"{self.name}: images can be read only once")
        self._images_started = True
        seen = {MANIFEST_NAME, SIGNATURE_NAME}
        members = {i.filename for i in self._manifest.images} | {
            i.chunk_index_name for i in self._manifest.images if i.chunk_index is not None
        }
        for entry in self._manifest.images:
            header = self._next_header()
            if header is None:
                raise BundleFormatError(
                    f"{self.name}: image {entry.filename!r} named in the manifest is missing"
                )
            if header.name != entry.filename:
                problem = "appears twice" if header.name in seen else "is out of place"
                if header.name not in members | seen:
                    problem = "is not named in the manifest"
                raise BundleFormatError(
                    f"{self.name}: member {header.name!r} {problem} (expected {entry.filename!r})"
                )
            self._check_mtime(header, self._manifest)
            if header.size != entry.size:
                raise BundleFormatError(
                    f"{self.name}: member {entry.filename!r} is {header.size} bytes, "
                    f"the manifest says {entry.size}"
                )
            seen.add(header.name)
            stream = ImageStream(
                entry,
                _Limited(self._source, entry.size, entry.filename),  # type: ignore[arg-type]
                name=f"{self.name}: image {entry.filename!r}",
            )
            yield BundleImage(entry, self._source.offset, stream)
            if not stream.verified:
                raise BundleError(f"{self.name}: image {entry.filename!r} was not read to its end")
            self._source.skip_padding(entry.size, entry.filename)
            if entry.chunk_index is not None:
                self._read_chunk_index(entry, entry.chunk_index)
                seen.add(entry.chunk_index_name)
        header = self._next_header()
        if header is not None:
            problem = "appears twice" if header.name in seen else "is not named in the manifest"
            raise BundleFormatError(f"{self.name}: member {header.name!r} {problem}")

    def _read_chunk_index(self, entry: ImageEntry, ref: ChunkIndexRef) -> None:
        """Read the chunk index member that follows ``entry``'s image: its size and SHA-256
        as the manifest says, its figures adding up to the image (:mod:`image_builder.chunks`).
        """
        name = entry.chunk_index_name
        offset = self._source.offset + BLOCK
        data, header = self._read_small_member(name, ref.size)
        self._check_mtime(header, self.manifest)
        if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ImageIntegrityError(
                f"{self.name}: chunk index {name!r} does not match the manifest"
            )
        index = ChunkIndex.from_bytes(
            data, image_size=entry.uncompressed_size, stored_size=entry.size,
            compression=entry.compression, where=f"{self.name}: {name}",
        )  # fmt: skip
        self.chunk_indexes[entry.filename] = (offset, index)


class _Limited:
    """Reads of at most ``size`` bytes from the bundle source."""

    def __init__(self, source: _Source, size: int, what: str) -> None:
        self._source = source
        self._left = size
        self._what = what

    def read(self, size: int) -> bytes:
        if self._left == 0:
            return b""
        chunk = self._source.read_some(min(size, self._left), self._what)
        self._left -= len(chunk)
        return chunk


# --- whole-bundle operations ---------------------------------------------------------------


class SplitBundleReader:
    """A bundle delivered in parts: the manifest and its signature envelope as bytes, each
    image's stored bytes from wherever ``open_image`` fetches them (a blob URL, a mirror).

    Same contract as :class:`BundleReader`: :meth:`verify` before :meth:`images`, and each
    image is an :class:`ImageStream` that raises instead of ending if a byte differs from the
    signed manifest, so the host the blobs come from is never trusted.
    """

    def __init__(
        self,
        manifest_bytes: bytes,
        envelope_bytes: bytes,
        open_image: Callable[[ImageEntry], BinaryIO],
        *,
        name: str = "release",
    ) -> None:
        self.name = name
        self._manifest_bytes = manifest_bytes
        self._envelope_bytes = envelope_bytes
        self._open_image = open_image
        self._manifest: Manifest | None = None
        self._verified: Verified | None = None
        self._images_started = False

    def verify(self, keyring: Keyring) -> Manifest:
        """Parse and verify the manifest against ``keyring``; no image is fetched yet.

        Raises:
            ManifestError, BundleFormatError: malformed manifest or envelope.
            signing.VerificationError: the signatures do not satisfy the keyring.
        """
        manifest = Manifest.from_bytes(self._manifest_bytes)
        try:
            envelope = SignatureEnvelope.from_bytes(self._envelope_bytes)
        except SignatureFormatError as err:
            raise BundleFormatError(f"{self.name}: {err}") from err
        self._verified = keyring.verify(self._manifest_bytes, envelope, SIGNATURE_PURPOSE)
        self._manifest = manifest
        return manifest

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None or self._verified is None:
            raise BundleError(f"{self.name}: manifest not verified")
        return self._manifest

    @property
    def manifest_sha256(self) -> str:
        """SHA-256 of the verified manifest's exact bytes: the release's identity."""
        self.manifest  # noqa: B018 (raises unless verified)
        return hashlib.sha256(self._manifest_bytes).hexdigest()

    @property
    def signed_by(self) -> tuple[str, ...]:
        return self._verified.key_ids if self._verified else ()

    def images(self) -> Iterator[BundleImage]:
        """Yield each image in manifest order, fetched only when its turn comes.

        Raises:
            BundleError: called before :meth:`verify`, or twice; an image not read to its end.
        """
        manifest = self.manifest
        if self._images_started:
            raise BundleError(f"{self.name}: images can be read only once")
        self._images_started = True
        for entry in manifest.images:
            raw = self._open_image(entry)
            try:
                stream = ImageStream(entry, raw, name=f"{self.name}: image {entry.filename!r}")
                yield BundleImage(entry, 0, stream)
                if not stream.verified:
                    raise BundleError(f"{self.name}: image {entry.filename!r} not read to its end")
            finally:
                close = getattr(raw, "close", None)
                if close is not None:
                    close()


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signatures and every image byte were checked."""

    manifest: Manifest
    signed_by: tuple[str, ...]
    size: int


def verify_stream(
    stream: BinaryIO,
    keyring: Keyring,
    *,
    name: str = "bundle",
    progress: Callable[[int], None] | None = None,
) -> VerifiedBundle:
    """Check a whole bundle read from ``stream``: signatures, every image byte, nothing extra.

    ``progress``, if given, is called per chunk with how many more bytes of the bundle were
    read; the calls add up to the bundle's size once it is verified.

    Raises:
        BundleError (and subclasses), signing.VerificationError: what is wrong, with its place.
    """
    reader = BundleReader(stream, name=name)
    manifest = reader.verify(keyring)
    reported = 0
    for image in reader.images():
        while image.stream.read(CHUNK):
            if progress is not None:
                progress(reader.bytes_read - reported)
                reported = reader.bytes_read
    if progress is not None:
        progress(reader.bytes_read - reported)
    return VerifiedBundle(manifest, reader.signed_by, reader.bytes_read)


@contextmanager
def open_bundle(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a bundle file for reading, turning "cannot open" into a :class:`BundleError`; a
    path that is not a regular file (a FIFO would block) is refused before it is opened."""
    bundle_path = Path(path)
    try:
        refuse_non_regular_input(bundle_path)
    except InputPathError as err:
        raise BundleError(str(err)) from err
    try:
        stream = open(bundle_path, "rb")  # noqa: SIM115 (closed below; open errors are ours)
    except OSError as err:
        raise BundleError(f"{bundle_path}: cannot open: {err.strerror}") from err
    with stream:
        yield stream


def verify_bundle(
    path: str | os.PathLike[str],
    keyring: Keyring,
    *,
    progress: Callable[[int], None] | None = None,
) -> VerifiedBundle:
    """Check a whole bundle file; see :func:`verify_stream`."""
    with open_bundle(path) as stream:
        return verify_stream(stream, keyring, name=str(path), progress=progress)


def read_bundle_info(path: str | os.PathLike[str]) -> tuple[Manifest, SignatureEnvelope]:
    """The manifest and signature envelope of a bundle, unverified, for display.

    Raises:
        BundleError (and subclasses): the bundle's header is not well-formed.
    """
    with open_bundle(path) as stream:
        reader = BundleReader(stream, name=str(path))
        manifest, _, envelope = reader.read_header()
        return manifest, envelope
