"""The checks every command makes on a file it is about to write from other files.

A command that writes its result to a path the operator names (``-o``, ``--out``) replaces
whatever is there. That is what the operator asked for, unless the path names one of the
command's own inputs (a signing key, an image, a disk), a directory, or something that is not a
file at all: then the write would destroy the input or replace a FIFO or device node with a
regular file. :func:`refuse_output_over_inputs` refuses those before anything is read or
written, naming the path and what it is.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from fleet_core.durable import sweep_temporaries
from fleet_core.errors import FleetError

# The first bytes of a PEM private key (PKCS#8, encrypted or not, and the older typed forms):
# losing a signing key is not recoverable, so no output ever replaces one.
_PEM_PRIVATE_KEY_BEGIN = b"-----BEGIN "
_PEM_PRIVATE_KEY_MARK = b"PRIVATE KEY-----"


class OutputPathError(FleetError):
    """An output path that would destroy an input, or that names no file that can be written."""


def refuse_output_over_inputs(
    output: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    *,
    option: str = "output",
) -> None:
    """Refuse to write ``output`` when it is (the same file as) one of ``inputs``, a directory,
    in a directory that does not exist, an existing thing that is not a regular file, or an
    existing PEM private key. ``option`` names the output in the message (``-o``, ``--out``).

    Inputs are compared by the file itself (``Path.samefile``: a symlink or a hard link to
    an input is that input) and, for inputs that do not exist yet, by resolved path. An input
    directory (a source tree) also claims every path below it.

    Raises:
        OutputPathError: one line naming the output and, when it is an input, that input.
    """
    target = Path(output)
    try:
        st = target.stat()
    except FileNotFoundError:
        st = None
    except OSError as err:
        raise OutputPathError(f"{option} {target}: cannot check it: {err.strerror}") from err
    if st is None:
        parent = target.parent if str(target.parent) else Path()
        if target.is_symlink():
            raise OutputPathError(f"{option} {target}: is a dangling symbolic link")
        if not parent.is_dir():
            raise OutputPathError(f"{option} {target}: directory {parent} does not exist")
    elif stat.S_ISDIR(st.st_mode):
        raise OutputPathError(f"{option} {target}: is a directory; name a file to write")
    elif not stat.S_ISREG(st.st_mode):
        raise OutputPathError(f"{option} {target}: exists and is not a regular file")
    resolved = target.resolve()
    for path in inputs:
        source = Path(path)
        if st is not None and source.exists() and target.samefile(source):
            raise OutputPathError(
                f"{option} {target}: is the input {source}; writing it would destroy that input"
            )
        if source.is_dir() and resolved.is_relative_to(source.resolve()):
            raise OutputPathError(f"{option} {target}: is inside the input directory {source}")
        if not source.exists() and resolved == source.resolve():
            raise OutputPathError(f"{option} {target}: is the input {source}")
    if st is not None and _holds_private_key(target):
        raise OutputPathError(
            f"{option} {target}: holds a private key; a key is never replaced by an output "
            "(losing a signing key is not recoverable)"
        )


def _holds_private_key(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            head = file.read(64)
    except OSError:
        return False
    first_line = head.lstrip().split(b"\n", 1)[0]
    return first_line.startswith(_PEM_PRIVATE_KEY_BEGIN) and first_line.rstrip().endswith(
        _PEM_PRIVATE_KEY_MARK
    )


# A temporary file of an output this old belongs to a write that was killed (kill -9, a power
# cut): a bundle or an image of gigabytes is written in minutes, never in an hour.
STALE_OUTPUT_S = 3600.0


def sweep_stale_outputs(output: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries that earlier, killed writes of ``output`` left beside it (the
    :data:`fleet_core.durable.TEMPORARY` names of this one file, unchanged for
    :data:`STALE_OUTPUT_S`): each is as big as the output, and nothing else ever removes
    them. Another file's temporaries, and a write in flight, are left alone. Returns the files
    removed; one that cannot be removed is left, as it was."""
    target = Path(output)
    directory = target.parent if str(target.parent) else Path()
    removed, _problems = sweep_temporaries(directory, [target.name], min_age_s=STALE_OUTPUT_S)
    return removed
