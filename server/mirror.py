"""A mirror of the server's blobs for any static HTTP host: ``fleet release export DIR``.

Writes into ``DIR``, for every release the server holds::

    blobs/<sha256>                        every blob a device may ask for: each image (a
                                          chunked image assembled whole from its chunks) and
                                          each chunk index
    chunks/<first two hex>/<sha256>.zst   the chunks of each chunked image (.raw when stored
                                          uncompressed), named as in the server's chunk store

so nginx, a CDN or object storage serving ``DIR`` answers ``<mirror>/blobs/<sha256>`` as the
server does (``[server] mirrors`` on a device; static files serve ``Range`` themselves). Nothing
on a mirror is trusted: devices check every byte against the signed manifest.

An export adds to what ``DIR`` holds: every file is named by its content and never changes, so a
file present with its size whose bytes are what its name says (a blob hashed, a chunk unpacked
against the index) is kept, and an export after each upload writes only what is new; a file
that does not check out is written again. A new file is written through
:func:`fleet_core.durable.atomic_output`, hashed as it is written, and discarded if it does not
hash to its name; a chunk is cut from its image's exported (verified) blob and unpacked against
the index before it is written, so it is as verified as the image. Files are 0644 and
directories 0755: the web server's user reads them.

One export at a time writes into ``DIR`` (a lock file, ``DIR/.export.lock``); each sweeps the
temporary files a killed export left. ``DIR`` may not be the server's data directory, inside it,
or contain it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select

from fleet_core.durable import atomic_output, sweep_shards, sweep_temporaries
from image_builder.chunks import Chunk, ChunkIndex, unpack
from image_builder.errors import ImageIntegrityError, ManifestError
from image_builder.manifest import ImageEntry, Manifest
from server.blobs import BlobStore, copy_hashed
from server.chunkstore import SUFFIXES
from server.database import Database
from server.errors import ServerError
from server.models import Release

FILE_MODE = 0o644
DIR_MODE = 0o755
LOCK_FILE = ".export.lock"


class ExportError(ServerError):
    """A blob the releases need is missing from the store, or cannot be written."""


@dataclass
class ExportSummary:
    """What an export wrote and kept."""

    written: int = 0
    written_bytes: int = 0
    kept: int = 0
    releases: list[str] = field(default_factory=list)


def export(
    db: Database, blobs: BlobStore, directory: Path, *, data_dir: Path | None = None
) -> ExportSummary:
    """Write every release's blobs and chunks into ``directory`` (see the module docstring).
    ``data_dir``: the server's data directory (default: the blob store's parent).

    Raises:
        ExportError: ``directory`` overlaps the data directory, a blob is missing or damaged
            in the store, or a file cannot be written.
    """
    _refuse_overlap(directory, data_dir or blobs.root.parent)
    try:
        _mkdirs(directory)
        lock = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    except OSError as err:
        raise ExportError(f"cannot write {directory}: {err.strerror or err}") from err
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another export into it finishes first
        # what a killed export left: no other export is writing now
        sweep_temporaries(directory / "blobs", min_age_s=0)
        sweep_shards(directory / "chunks", min_age_s=0)
        return _export(db, blobs, directory)
    finally:
        os.close(lock)


def _refuse_overlap(directory: Path, data_dir: Path) -> None:
    target, data = directory.resolve(), data_dir.resolve()
    if target == data or data in target.parents or target in data.parents:
        raise ExportError(
            f"export directory {directory} overlaps the data directory {data_dir}: a mirror "
            "must be a directory of its own, outside the server's data"
        )


def _export(db: Database, blobs: BlobStore, directory: Path) -> ExportSummary:
    with db.read() as session:
        manifests = [
            (release.version, release.manifest)
            for release in session.scalars(select(Release).order_by(Release.id))
        ]
    summary = ExportSummary()
    writer = _Writer(directory, summary)
    for version, manifest_bytes in manifests:
        try:
            manifest = Manifest.from_bytes(manifest_bytes)
        except ManifestError as err:
            raise ExportError(f"release {version}: stored manifest unreadable: {err}") from err
        for entry in manifest.images:
            _export_image(blobs, writer, entry, f"release {version}, image {entry.filename!r}")
        summary.releases.append(version)
    return summary


def _export_image(blobs: BlobStore, writer: _Writer, entry: ImageEntry, where: str) -> None:
    image = writer.blob(blobs, entry.sha256, entry.size, where)
    ref = entry.chunk_index
    if ref is None:
        return
    index_path = writer.blob(blobs, ref.sha256, ref.size, f"{where}, chunk index")
    try:
        index = ChunkIndex.from_bytes(
            index_path.read_bytes(), image_size=entry.uncompressed_size, stored_size=entry.size,
            compression=entry.compression, where=f"{where}, chunk index",
        )  # fmt: skip
    except ManifestError as err:
        raise ExportError(str(err)) from err
    with open(image, "rb") as source:
        for number, chunk in enumerate(index.chunks()):
            name = chunk.sha256.hex()
            target = Path("chunks", name[:2], name + SUFFIXES[entry.compression])
            writer.chunk(target, source, chunk, entry.compression, f"{where}, chunk {number}")


class _Writer:
    def __init__(self, root: Path, summary: ExportSummary) -> None:
        self.root = root
        self.summary = summary

    def blob(self, blobs: BlobStore, sha256: str, size: int, where: str) -> Path:
        target = Path("blobs", sha256)
        if self._kept(target, size, lambda path: _hashed(path) == sha256):
            return self.root / target
        try:
            opened = blobs.open(sha256)
        except ServerError as err:
            raise ExportError(f"{where}: blob {sha256}: {err}") from err
        if opened is None:
            raise ExportError(f"{where}: blob {sha256} is not in the store")
        handle, stored_size = opened
        with handle:
            if stored_size != size:
                raise ExportError(f"{where}: blob {sha256} is {stored_size} bytes, not {size}")
            return self.file(target, handle, size, sha256, where, f"the store's blob {sha256}")

    def chunk(
        self, relative: Path, image: BinaryIO, chunk: Chunk, compression: str, where: str
    ) -> None:
        """Write the chunk's stored bytes, cut from the exported ``image``, as ``relative``
        once they unpack to the chunk (a present file is kept if it does)."""

        def holds(path: Path) -> bool:
            try:
                unpack(path.read_bytes(), chunk, compression)
            except ImageIntegrityError:
                return False
            return True

        if self._kept(relative, chunk.stored_length, holds):
            return
        image.seek(chunk.stored_offset)
        stored = image.read(chunk.stored_length)
        try:
            unpack(stored, chunk, compression)
        except ImageIntegrityError as err:
            raise ExportError(f"{where}: {err}") from err
        self._write(relative, stored, where)

    def _write(self, relative: Path, data: bytes, where: str) -> None:
        target = self.root / relative
        self._mkdir(target.parent)
        try:
            with atomic_output(target, FILE_MODE) as out:
                out.write(data)
        except OSError as err:
            raise ExportError(f"{where}: cannot write {target}: {err.strerror or err}") from err
        self.summary.written += 1
        self.summary.written_bytes += len(data)

    def file(
        self, relative: Path, source: BinaryIO, size: int, sha256: str, where: str, name: str
    ) -> Path:
        """Write ``size`` bytes of ``source`` (from where it is; the store file ``name``) as
        ``relative``, checking they hash to ``sha256``."""
        target = self.root / relative
        self._mkdir(target.parent)
        try:
            with atomic_output(target, FILE_MODE) as out:
                copy_hashed(source, out, size, sha256, str(relative), source_name=name)
        except ServerError as err:
            raise ExportError(f"{where}: {err}") from err
        except OSError as err:
            raise ExportError(f"{where}: cannot write {target}: {err.strerror or err}") from err
        self.summary.written += 1
        self.summary.written_bytes += size
        return target

    def _kept(self, relative: Path, size: int, holds: Callable[[Path], bool]) -> bool:
        """Whether ``relative`` is there, a regular file of ``size`` bytes that ``holds`` what
        its name says (else it is written again)."""
        path = self.root / relative
        try:
            if not path.is_file() or path.is_symlink() or path.stat().st_size != size:
                return False
            kept = holds(path)
        except OSError:
            return False
        self.summary.kept += kept
        return kept

    def _mkdir(self, directory: Path) -> None:
        _mkdirs(directory)


def _mkdirs(directory: Path) -> None:
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
        created.chmod(DIR_MODE)  # whatever the umask: a web server's user reads it


def _hashed(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
