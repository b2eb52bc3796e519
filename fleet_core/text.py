"""Free text from outside: one rule for what it may hold coming in, one escaping going out.

Devices and operators send text that is stored and later shown to someone (host names,
versions, health check names, event fields, token names, reasons). Some characters in it are
not text but instructions to whatever displays it: a terminal obeys C0 and C1 controls
(``ESC``, the one-character CSI U+009B), a line separator (U+2028) or a newline forges a line,
bidi overrides and isolates (U+202A-U+202E, U+2066-U+2069) reorder what a reader sees, and
zero-width characters make two different strings look alike.

In: :func:`refused_character` is the one rule. Free text may not hold a character of the
Unicode categories in :data:`REFUSED_CATEGORIES`: ``Cc`` (C0 controls, DEL, C1 controls),
``Cf`` (format characters: bidi controls, zero-width spaces and joiners, the BOM, the soft
hyphen), ``Zl`` and ``Zp`` (U+2028, U+2029), ``Co`` (private use), ``Cn`` (unassigned in the
Unicode version of this Python; a character assigned later is refused until then) and ``Cs``
(lone surrogates). A field may allow some characters back by name (a log line keeps ``\\t``).
Everything else is kept: letters of every script, combining marks, emoji, ordinary spaces.
Emoji sequences joined by U+200D and the Persian ZWNJ are refused with the other ``Cf``.

Out: :func:`printable` shows any string inertly: every character the rule refuses, allowed
back or not, is written as a visible escape (``\\x9b``, ``\\u202e``, ``\\U000e0001``, ``\\t``).
Text stored before the rule existed, or by a path the rule does not cover, still prints as
one inert line. The escaping is for showing, not a reversible encoding: a backslash is kept
as it is, so ``\\x9b`` typed literally looks the same as an escaped U+009B.
"""

from __future__ import annotations

import unicodedata

REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cn", "Cs"})
_CATEGORY_NAMES = {
    "Cc": "a control character",
    "Cf": "a format character",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
    "Co": "a private-use character",
    "Cn": "an unassigned code point",
    "Cs": "a lone surrogate",
}
_SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def is_refused(char: str) -> bool:
    """Whether the one character ``char`` may not appear in free text."""
    return unicodedata.category(char) in REFUSED_CATEGORIES


def refused_character(text: str, *, allow: str = "") -> str | None:
    """The first character of ``text`` that free text may not hold, or None if there is none.

    ``allow`` names characters the field takes back (``"\\t"`` for a log line).
    """
    for char in text:
        if char not in allow and is_refused(char):
            return char
    return None


def describe(char: str) -> str:
    """A refused character named for an error message, never the character itself:
    ``U+202E (a format character)``."""
    what = _CATEGORY_NAMES.get(unicodedata.category(char), "a character")
    return f"U+{ord(char):04X} ({what})"


def check_text(text: str, *, allow: str = "") -> str:
    """``text`` itself, if free text may hold it.

    Raises:
        ValueError: naming the first refused character by its code point (the message holds
            nothing of ``text``, so it is safe to show anywhere).
    """
    char = refused_character(text, allow=allow)
    if char is not None:
        raise ValueError(f"{describe(char)} is not allowed in text")
    return text


def _escape(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` for a terminal: every character :func:`refused_character` refuses written as a
    visible escape, everything else as it is (``"é"``, ``"東京"`` stay). The result holds no
    character of :data:`REFUSED_CATEGORIES`, so it is one line that a terminal only displays."""
    if refused_character(text) is None:
        return text
    return "".join(_escape(char) if is_refused(char) else char for char in text)
