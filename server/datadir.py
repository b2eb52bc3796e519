"""The data directory at rest: who may read it, and what crashes leave in it.

**Permissions.** Everything the server keeps (the database with its token hashes, the server
key, the release images) is for the server's user alone: the data directory is 0700 and the
files in it 0600. ``fleet server run`` sets the process umask to 0077 so every file it creates
is private from its first byte; :func:`secure_data_dir` tightens a directory made earlier with
looser bits (and says so in the log), and the database tightens its own files
(server/database.py).

**Leftovers.** A process killed in the middle of a request leaves what it was writing:
temporary blobs (``blobs/ab/.<sha256>.<random>.tmp``, from
:func:`fleet_core.durable.atomic_output`), temporary chunks and recipes (the same, under
``chunks/``: server/chunkstore.py) and partial uploads (``uploads/upload-<random>.bundle``).
:func:`sweep_leftovers` removes those untouched for a given age: at start with a short one
(several processes may share the data directory, and one that starts must not remove a file
another is writing), and while running with a longer one. A live upload rewrites its file at
least every megabyte it receives, and the body deadline (server/timeouts.py) bounds how long a
megabyte may take, so an upload still being received is never taken for a leftover.
"""

from __future__ import annotations

import logging
import stat
import time
from pathlib import Path

from server.blobs import BlobStore

log = logging.getLogger("server")

DIR_MODE = 0o700
FILE_MODE = 0o600
# The names server/api/common.py's receive_file gives the bundles it receives.
UPLOAD_PATTERN = "upload-*.bundle"


def secure_data_dir(directory: Path) -> None:
    """Make ``directory`` 0700, logging when it was looser (a directory made by hand, or by an
    older server). Only the bits for others are the problem; the owner's are left alone."""
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        directory.chmod(mode & ~0o077 | DIR_MODE)
        log.warning(
            "data directory %s was readable by others (mode %04o); tightened to %04o",
            directory,
            mode,
            mode & ~0o077 | DIR_MODE,
        )


def sweep_leftovers(
    blobs: BlobStore, upload_dir: Path, *, min_age_s: float, now: float | None = None
) -> list[Path]:
    """Remove temporary blobs, chunks and recipes, and partial uploads untouched for
    ``min_age_s``; returns what was
    removed (each one logged). A file that cannot be removed is logged and left."""
    current = time.time() if now is None else now
    removed, problems = blobs.sweep_temporaries(min_age_s=min_age_s, now=current)
    for leftover in sorted(upload_dir.glob(UPLOAD_PATTERN)):
        try:
            if current - leftover.stat().st_mtime < min_age_s:
                continue
            leftover.unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            problems.append(f"{leftover}: cannot remove: {err.strerror}")
            continue
        removed.append(leftover)
    for path in removed:
        log.info("removed leftover of an interrupted write: %s", path)
    for problem in problems:
        log.warning("leftover sweep: %s", problem)
    return removed


def private_mkdir(directory: Path) -> None:
    """Create ``directory`` (and its parents) 0700 if it does not exist."""
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
