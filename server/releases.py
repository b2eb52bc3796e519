"""Releases: accepting an uploaded bundle, and describing the releases the server holds.

Accepting a bundle is a sequence of checks before anything is stored, then two stores:

1. verify the manifest's signatures against the fleet's release keyring (422 if they fail);
2. refuse a version that exists already (409);
3. read every image to its end through the bundle reader, which hashes the stored and the
   uncompressed bytes against the signed manifest and checks that each chunked image's index
   adds up to it (422 on any difference); then unpack every chunk of each chunked image and
   check its length and SHA-256 against the index (422 naming the chunk);
4. copy each image's stored bytes into the blob store, hashing again as they are copied: an
   image whole, a chunked image as its chunks not stored yet, its index and its recipe
   (server/chunkstore.py);
5. insert the release and its images, with an audit entry, in one transaction.

A failure in 1-3 stores nothing. Blobs and chunks stored in 4 for an upload that then fails
are kept (see :func:`ingest`): they are named by their content and verified, so they cost disk
space, never correctness, and no release refers to them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from image_builder.bundle import CHUNK, BundleReader
from image_builder.errors import BundleError
from image_builder.manifest import ImageEntry, Manifest
from server import audit
from server.blobs import BlobStore
from server.chunkstore import ChunkedImage, verify_chunks
from server.database import Database
from server.errors import (
    BundleMalformedError,
    BundleSignatureError,
    DuplicateVersionError,
    KeyringUnusableError,
    UnknownReleaseError,
)
from server.models import Release, ReleaseImage
from server.settings import iso
from signing.errors import KeyringError, VerificationError
from signing.keyring import Keyring

log = logging.getLogger("server")


def blob_url(sha256: str) -> str:
    """Where a blob is served, relative to the server (docs/device-protocol.md, "Blobs")."""
    return f"/blobs/{sha256}"


def load_keyring(directory: Path) -> Keyring:
    """The fleet's release keyring, read afresh so a rotation needs no restart.

    Raises:
        KeyringUnusableError: missing, malformed, or without a usable key.
    """
    try:
        return Keyring.load(directory)
    except KeyringError as err:
        raise KeyringUnusableError(
            f"the server's release keyring is not usable ({err}); trust a key with "
            f"'fleet keys trust --keyring {directory} KEY.pub'"
        ) from err


@dataclass(frozen=True)
class CheckedImage:
    """An image of a verified bundle: where its stored bytes are, and its verified chunks."""

    entry: ImageEntry
    offset: int  # of its stored bytes in the bundle
    chunked: ChunkedImage | None  # None: a format 1 image, stored whole


@dataclass(frozen=True)
class CheckedBundle:
    """A bundle whose signatures and image bytes were verified, with where each image is."""

    manifest: Manifest
    manifest_bytes: bytes
    signature_bytes: bytes
    images: tuple[CheckedImage, ...]


def check_bundle(path: Path, keyring: Keyring, db: Database) -> CheckedBundle:
    """Steps 1-3: verify a received bundle completely, storing nothing.

    Raises:
        BundleSignatureError: the signatures do not satisfy the keyring.
        BundleMalformedError: not a well-formed bundle, or an image differs from the manifest.
        DuplicateVersionError: the version exists already.
    """
    with open(path, "rb") as handle:
        reader = BundleReader(handle, name="bundle")
        try:
            manifest = reader.verify(keyring)
        except VerificationError as err:
            raise BundleSignatureError(f"manifest signature: {err}") from err
        except BundleError as err:
            raise BundleMalformedError(str(err)) from err
        with db.read() as session:
            _refuse_duplicate(session, manifest.version)
        located = []
        try:
            for image in reader.images():
                while image.stream.read(CHUNK):
                    pass
                located.append((image.entry, image.offset))
            checked = tuple(
                CheckedImage(entry, offset, _check_chunks(handle, reader, entry, offset))
                for entry, offset in located
            )
        except BundleError as err:
            raise BundleMalformedError(str(err)) from err
        _, manifest_bytes, envelope = reader.read_header()
    return CheckedBundle(manifest, manifest_bytes, envelope.to_bytes(), checked)


def _check_chunks(
    handle: BinaryIO, reader: BundleReader, entry: ImageEntry, offset: int
) -> ChunkedImage | None:
    """Every chunk of ``entry``'s image unpacked and checked against its index (which the
    reader checked against the manifest); None for an image without chunks.

    Raises:
        BundleError: a chunk does not match the index.
    """
    if entry.chunk_index is None:
        return None
    index_offset, index = reader.chunk_indexes[entry.filename]
    digests = verify_chunks(handle, entry, offset, index)
    return ChunkedImage(entry, offset, index_offset, index, digests)


def _refuse_duplicate(session: Session, version: str) -> None:
    if session.scalar(select(Release.id).where(Release.version == version)) is not None:
        raise DuplicateVersionError(f"release {version} exists already; versions are never reused")


def ingest(
    db: Database,
    blobs: BlobStore,
    keyring: Keyring,
    path: Path,
    *,
    actor: str,
    now: datetime,
) -> dict[str, Any]:
    """Accept the bundle at ``path`` as a release; returns its description (:func:`describe`).

    Raises:
        BundleSignatureError, BundleMalformedError, DuplicateVersionError: see
            :func:`check_bundle`; nothing is stored.
    """
    checked = check_bundle(path, keyring, db)
    try:
        with open(path, "rb") as handle:
            for image in checked.images:
                if image.chunked is None:
                    blobs.put_range(handle, image.offset, image.entry.size, image.entry.sha256)
                    continue
                stored = blobs.put_chunked(handle, image.chunked)
                log.info(
                    "release %s, image %s: %d of %d chunks new (%d bytes), %d stored already%s",
                    checked.manifest.version, image.entry.filename, stored.new,
                    len(image.chunked.index), stored.new_bytes, stored.shared,
                    f", {stored.foreign} by another encoder: image stored whole"
                    if stored.foreign else "",
                )  # fmt: skip
        with db.write() as session:
            _refuse_duplicate(session, checked.manifest.version)
            release = _insert(session, checked, actor, now)
            audit.append(
                db,
                session,
                at=now,
                actor=actor,
                action="release.uploaded",
                subject=f"release:{release.version}",
                details={
                    "compatible": release.compatible,
                    "security_version": release.security_version,
                    "manifest_sha256": release.manifest_sha256,
                },
            )
            description = describe(release)
    except IntegrityError as err:
        raise DuplicateVersionError(
            f"release {checked.manifest.version} was uploaded concurrently"
        ) from err
    # Blobs and chunks written for an upload that then failed are kept, not removed: another
    # upload of the same image may have found them stored and committed a release that needs
    # them, and a content-addressed file nobody refers to costs disk space, never correctness.
    return description


def _insert(session: Session, checked: CheckedBundle, actor: str, now: datetime) -> Release:
    manifest = checked.manifest
    release = Release(
        version=manifest.version,
        product=manifest.product,
        compatible=manifest.compatible,
        security_version=manifest.security_version,
        manifest=checked.manifest_bytes,
        manifest_sha256=hashlib.sha256(checked.manifest_bytes).hexdigest(),
        signature=checked.signature_bytes,
        created=now,
        uploaded_by=actor,
        images=[_image_row(position, image.entry) for position, image in enumerate(checked.images)],
    )
    session.add(release)
    session.flush()
    return release


def _image_row(position: int, entry: ImageEntry) -> ReleaseImage:
    index = entry.chunk_index
    return ReleaseImage(
        position=position,
        slot_class=entry.slot_class,
        filename=entry.filename,
        compression=entry.compression,
        sha256=entry.sha256,
        size=entry.size,
        chunk_index_sha256=index.sha256 if index is not None else None,
        chunk_index_size=index.size if index is not None else None,
    )


def describe(release: Release) -> dict[str, Any]:
    """The API's view of a release."""
    return {
        "id": release.id,
        "version": release.version,
        "product": release.product,
        "compatible": release.compatible,
        "security_version": release.security_version,
        "manifest_sha256": release.manifest_sha256,
        "created": iso(release.created),
        "uploaded_by": release.uploaded_by,
        "images": [
            {
                "slot_class": image.slot_class,
                "filename": image.filename,
                "compression": image.compression,
                "sha256": image.sha256,
                "size": image.size,
                "url": blob_url(image.sha256),
                "chunk_index": (
                    None
                    if image.chunk_index_sha256 is None
                    else {
                        "sha256": image.chunk_index_sha256,
                        "size": image.chunk_index_size,
                        "url": blob_url(image.chunk_index_sha256),
                    }
                ),
            }
            for image in release.images
        ],
    }


def list_releases(db: Database) -> list[dict[str, Any]]:
    """Every release, oldest first."""
    with db.read() as session:
        releases = session.scalars(
            select(Release).options(selectinload(Release.images)).order_by(Release.id)
        ).all()
        return [describe(release) for release in releases]


def get_release(db: Database, version: str) -> dict[str, Any]:
    """The release with this version.

    Raises:
        UnknownReleaseError: none.
    """
    with db.read() as session:
        release = session.scalars(
            select(Release).options(selectinload(Release.images)).where(Release.version == version)
        ).first()
        if release is None:
            raise UnknownReleaseError(f"no release {version!r}")
        return describe(release)
