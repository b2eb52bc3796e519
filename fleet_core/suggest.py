"""Unknown setting names, refused with the valid one that was probably meant.

Every file an operator writes by hand (the updater's configuration, a backend's
``[bootloader]`` options, a keyring's ``keyring.toml``) refuses a name it does not know, since a
misspelt guard would otherwise be silently off. :func:`unknown_names` is how each of them names
what it refuses: ``command (did you mean argv?)``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable

# a TOML bare key: shown as it is; any other name is shown quoted, its escapes visible
_BARE = re.compile(r"[A-Za-z0-9_-]+")


def shown(name: str) -> str:
    """``name`` for a message: as typed if it is a bare key, else quoted (``'a b'``), so an
    empty name, spaces or a control character in it are visible."""
    return name if _BARE.fullmatch(name) else repr(name)


def closest(name: str, valid: Iterable[str], *, needed: Collection[str] = ()) -> str | None:
    """The valid name ``name`` was most likely meant to be, or None.

    The closest by spelling (:func:`difflib.get_close_matches`); failing that, the one name of
    ``needed`` (names required and not given), if there is exactly one: a setting the table
    must have and lacks, next to one it does not know, is most likely that setting misnamed
    (``command`` for ``argv``).
    """
    matches = difflib.get_close_matches(name, sorted(valid), n=1)
    if matches:
        return matches[0]
    if len(needed) == 1:
        return next(iter(needed))
    return None


def unknown_names(
    given: Iterable[str],
    valid: Collection[str],
    *,
    needed: Collection[str] = (),
    quote: bool = False,
) -> list[str]:
    """The names of ``given`` not in ``valid``, sorted, each shown with the valid name it was
    most likely meant to be: ``["command (did you mean argv?)"]``; empty when all are valid.

    A suggestion is a valid name not given already; ``needed`` are the names required (those
    given are left out). With ``quote``, names are always quoted, as ``repr`` does.
    """
    names = set(given)
    open_names = sorted(set(valid) - names)
    missing = sorted(set(needed) - names)
    show = repr if quote else shown
    described = []
    for name in sorted(names - set(valid)):
        meant = closest(name, open_names, needed=missing)
        hint = f" (did you mean {show(meant)}?)" if meant is not None else ""
        described.append(f"{show(name)}{hint}")
    return described
