"""Settings of a hand-written configuration file, declared once for the parser and the reference.

Each table of a configuration (the updater's ``updater.toml``, a boot backend's ``[bootloader]``
options) lists its keys as :class:`Setting` records: the parser accepts exactly the names
listed (:func:`names`), and ``docs/generate.py`` writes the reference from the same records
(``docs/updater-config.md``). A key therefore cannot be accepted without its documentation, and
the reference cannot name a key the parser refuses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    """One key of a table.

    ``default`` and ``example`` are TOML values as they would be written in the file
    (``"/var/lib/fleet"``, ``60``, ``["reboot"]``); a ``default`` of None means the key has no
    value when absent (``help`` says what the program does then). ``required``: the table is
    refused without it.
    """

    name: str
    type: str  # as the reference names it: "string", "absolute path", "number of seconds"
    default: str | None
    help: str
    example: str
    required: bool = False


@dataclass(frozen=True)
class Section:
    """A table of settings: ``title`` is how it is written in the file (``[server]``)."""

    title: str
    help: str
    settings: tuple[Setting, ...]


def names(settings: Iterable[Setting]) -> tuple[str, ...]:
    """The keys of ``settings``, in their order."""
    return tuple(setting.name for setting in settings)


def required(settings: Iterable[Setting]) -> tuple[str, ...]:
    """The keys of ``settings`` a table must have."""
    return tuple(setting.name for setting in settings if setting.required)
