"""The checks every backend applies to its ``[bootloader]`` options, written once.

Each backend module has ``parse_options(options)`` (the values its constructor takes, checked),
``check_options(options)`` (the same check as a configuration loads, reading nothing) and
``<Backend>.from_options(options)``; these helpers are what they share. Every error names the
backend (``who``, the module's ``WHO``) and the option.

Each backend declares its options once, documented (:func:`declare`): the names it accepts are
the names of those declarations, and the reference (``docs/updater-config.md``) is written from
them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bootloader_hooks.errors import BootloaderError
from fleet_core.settings import Setting, names
from fleet_core.suggest import unknown_names

# backend name -> its options as the reference documents them, in the order declared
DECLARED: dict[str, tuple[Setting, ...]] = {}
DEFAULT_CMDLINE = "/proc/cmdline"
# The option of every backend that reads which slot booted from the kernel command line.
CMDLINE = Setting(
    "cmdline", "path", f'"{DEFAULT_CMDLINE}"',
    "The kernel command line, which names the slot that booted.",
    '"/proc/cmdline"',
)  # fmt: skip


def declare(backend: str, settings: tuple[Setting, ...]) -> tuple[str, ...]:
    """Record the options of ``backend`` with their documentation; their names, which are all
    the backend accepts (:func:`check_known`)."""
    DECLARED[backend] = settings
    return names(settings)


def check_known(who: str, options: Mapping[str, Any], known: Sequence[str]) -> None:
    """Refuse an option that is not in ``known``, naming the first one (in sorted order) and
    the option probably meant (:func:`fleet_core.suggest.unknown_names`).

    Raises:
        BootloaderError: ``unknown option 'grubenvs' (did you mean 'grubenv'?); known
            options: attempts, cmdline, grubenv``.
    """
    unknown = unknown_names(options, known, quote=True)
    if unknown:
        raise BootloaderError(
            f"{who}: unknown option {unknown[0]}; known options: {', '.join(known)}"
        )


def path_option(who: str, key: str, value: Any) -> Path:
    """The value of option ``key`` as a path: a non-empty string or path-like.

    Raises:
        BootloaderError: anything else.
    """
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise BootloaderError(f"{who}: option {key!r} must be a path, not {value!r}")
    return Path(value)


def command_option(who: str, key: str, value: Any) -> tuple[str, ...]:
    """The value of option ``key`` as a command: a non-empty list of non-empty strings.

    Raises:
        BootloaderError: anything else.
    """
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(word, str) and word for word in value)
    ):
        raise BootloaderError(
            f"{who}: option {key!r} must be a non-empty list of strings, got {value!r}"
        )
    return tuple(value)


def check_attempts(who: str, attempts: Any, maximum: int | None) -> int:
    """``attempts`` if it is an integer from 1 to ``maximum`` (``None``: no upper bound).

    The backends' constructors check their ``attempts`` with it too.

    Raises:
        BootloaderError: not an integer (``True`` is not one), or out of range.
    """
    if type(attempts) is not int:
        raise BootloaderError(f"{who}: option 'attempts' must be an integer, not {attempts!r}")
    if maximum is None:
        if attempts < 1:
            raise BootloaderError(
                f"{who}: option 'attempts' must be an integer >= 1, got {attempts!r}"
            )
    elif not 1 <= attempts <= maximum:
        raise BootloaderError(f"{who}: attempts must be 1 to {maximum}, not {attempts!r}")
    return attempts
