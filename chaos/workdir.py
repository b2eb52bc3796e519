"""Work directories that a lab command empties at each run, and never anything else.

``fleet simulate``, ``fleet demo`` and ``fleet chaos run`` start from an empty directory each
time. A careless ``--workdir`` (a home directory, ``/srv``, a checkout) must not be wiped: a
directory is emptied only when it is empty already or carries the marker the same command left
in it, and a symlink or a file in its place is refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fleet_core.errors import FleetError


class WorkdirError(FleetError):
    """The work directory holds what the command did not make."""


def marker_name(command: str) -> str:
    """The marker file ``command`` (``"fleet simulate"``) leaves in the directories it made."""
    return ".made-by-" + command.replace(" ", "-")


def fresh_directory(path: Path, command: str) -> Path:
    """Make ``path`` an empty directory holding only ``command``'s marker; returns it
    absolute (a lab writes paths into configuration files that other processes read).

    Raises:
        WorkdirError: ``path`` is a symlink or not a directory, or holds files without the
            marker.
    """
    marker = marker_name(command)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise WorkdirError(
            f"{path} is not a directory {command} made: move it away or give another --workdir"
        )
    if path.is_dir() and any(path.iterdir()):
        if not (path / marker).is_file():
            raise WorkdirError(
                f"{path} holds files {command} did not make (no {marker}): move them away or "
                "give another --workdir"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / marker).write_text(
        f"made by {command}: its next run on this directory removes the directory\n"
    )
    return path.resolve()
