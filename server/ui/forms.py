"""The console's HTML forms: ``application/x-www-form-urlencoded`` bodies, read with the
server's bounded body reader and parsed here (no multipart, no file uploads).

A value is text: percent-decoded UTF-8 without control characters (tab and line breaks
allowed in a multi-line field). Anything else is refused with a message naming the field.
"""

from __future__ import annotations

import math
import re
from urllib.parse import parse_qsl

from fastapi import Request

from server.api.common import read_body
from server.errors import ApiError, InvalidRequestError

FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 64 * 1024
MAX_FIELDS = 500
ALLOWED_CONTROLS = frozenset("\t\r\n")
WHOLE_NUMBER = re.compile(r"[+-]?[0-9]{1,18}")


class UnsupportedFormError(ApiError):
    """A console form posted as something other than a URL-encoded form."""

    status = 415
    code = "unsupported_media_type"


class ConfirmationError(ApiError):
    """A confirmation word typed wrong: nothing was done."""

    status = 400
    code = "confirmation_mismatch"


def _clean(text: str, what: str) -> str:
    if any((ord(c) < 32 or 127 <= ord(c) < 160) and c not in ALLOWED_CONTROLS for c in text):
        raise InvalidRequestError(f"{what}: control characters are not allowed")
    return text


class Form:
    """The fields of a submitted form, each name with its values in order."""

    def __init__(self, fields: dict[str, list[str]]) -> None:
        self._fields = fields

    @classmethod
    def parse(cls, body: bytes) -> Form:
        """The form in a URL-encoded ``body``.

        Raises:
            InvalidRequestError: not ASCII, invalid percent-encoded UTF-8, too many fields, or
                a name or value with control characters.
        """
        try:
            text = body.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidRequestError("form: not URL-encoded (raw non-ASCII bytes)") from None
        try:
            pairs = parse_qsl(
                text, keep_blank_values=True, errors="strict", max_num_fields=MAX_FIELDS
            )
        except UnicodeDecodeError:
            raise InvalidRequestError("form: a field is not valid UTF-8") from None
        except ValueError:
            raise InvalidRequestError(f"form: more than {MAX_FIELDS} fields") from None
        fields: dict[str, list[str]] = {}
        for name, value in pairs:
            _clean(name, "form: a field name")
            fields.setdefault(name, []).append(_clean(value, _label(name)))
        return cls(fields)

    def __contains__(self, name: str) -> bool:
        return name in self._fields

    def get(self, name: str) -> str | None:
        """The field's first value, stripped; None when absent or blank."""
        values = self._fields.get(name)
        value = values[0].strip() if values else ""
        return value or None

    def require(self, name: str, label: str) -> str:
        """The field's value, stripped.

        Raises:
            InvalidRequestError: absent or blank (the message names ``label``).
        """
        value = self.get(name)
        if value is None:
            raise InvalidRequestError(f"{label}: required")
        return value

    def getall(self, name: str) -> list[str]:
        """Every value of the field (checkboxes, multiple selects), stripped, blanks left out."""
        return [v.strip() for v in self._fields.get(name, []) if v.strip()]

    def integer(self, name: str, lo: int, hi: int, label: str | None = None) -> int:
        """The field as a whole number from ``lo`` to ``hi``.

        Raises:
            InvalidRequestError: absent, not a whole number, or out of range.
        """
        what = label or name
        text = self.require(name, what)
        if not WHOLE_NUMBER.fullmatch(text):
            raise InvalidRequestError(f"{what}: {text[:40]!r} is not a whole number")
        value = int(text)
        if not lo <= value <= hi:
            raise InvalidRequestError(f"{what}: {value} is not between {lo} and {hi}")
        return value

    def number(self, name: str, lo: float, hi: float, label: str | None = None) -> float:
        """The field as a finite number from ``lo`` to ``hi``.

        Raises:
            InvalidRequestError: absent, not a number, not finite, or out of range.
        """
        what = label or name
        text = self.require(name, what)
        try:
            value = float(text) if text.isascii() and len(text) <= 40 else math.nan
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise InvalidRequestError(f"{what}: {text[:40]!r} is not a number")
        if not lo <= value <= hi:
            raise InvalidRequestError(f"{what}: {value:g} is not between {lo:g} and {hi:g}")
        return value

    def confirm(self, name: str, word: str) -> None:
        """Check that the field holds exactly ``word`` (typed by the operator to confirm).

        Raises:
            ConfirmationError: it does not.
        """
        if self.get(name) != word:
            raise ConfirmationError(f"type {word} to confirm; nothing was done")


def _label(name: str) -> str:
    return f"field {name[:40]!r}"


async def read_form(request: Request) -> Form:
    """The request's URL-encoded form, at most :data:`MAX_FORM_BYTES`.

    Raises:
        UnsupportedFormError: another content type.
        BodyTooLargeError: a larger body.
        InvalidRequestError: a malformed form (:meth:`Form.parse`).
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM_TYPE:
        raise UnsupportedFormError(f"a console form is sent as {FORM_TYPE}")
    return Form.parse(await read_body(request, MAX_FORM_BYTES))
