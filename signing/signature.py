"""Detached Ed25519 signatures over exact bytes, in a canonical envelope.

What is signed is never the payload alone but ``DOMAIN || purpose || "\\n" || payload``: a
signature made for one purpose (a bundle manifest, a server assignment) can never be replayed
as a signature for another.

The envelope is one line of JSON with sorted keys and no spaces, followed by a newline::

    {"check":"<64 hex>","format":1,"signatures":[{"keyid":"<64 hex>","sig":"<128 hex>"}]}

Readers accept only this exact encoding (lowercase hex, signatures sorted by key id, one per key),
so the envelope has one spelling per meaning. ``check`` is the SHA-256 of the canonical encoding
of the ``signatures`` list: not a security measure (anyone can recompute it) but a corruption
check, so that a damaged signature by a key this verifier does not know, which it would otherwise
have to ignore, is still reported. Together: changing any byte of an envelope is detected.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from signing.errors import SignatureFormatError
from signing.keys import SigningKey

ENVELOPE_FORMAT = 1
DOMAIN = b"metrica-fleet signature v1\n"
MAX_ENVELOPE_BYTES = 64 * 1024
MAX_SIGNATURES = 32

_KEY_ID = re.compile(r"[0-9a-f]{64}")
_SIG = re.compile(r"[0-9a-f]{128}")


def signed_message(purpose: str, payload: bytes) -> bytes:
    """The exact bytes an Ed25519 signature covers for ``payload`` signed for ``purpose``."""
    return DOMAIN + purpose.encode("ascii") + b"\n" + payload


@dataclass(frozen=True)
class Signature:
    """One detached signature: which key made it, and the 64 signature bytes."""

    key_id: str
    value: bytes


@dataclass(frozen=True)
class SignatureEnvelope:
    """The signatures over one payload, in their canonical order (by key id)."""

    signatures: tuple[Signature, ...]

    def __post_init__(self) -> None:
        ids = [s.key_id for s in self.signatures]
        if len(set(ids)) != len(ids):
            raise SignatureFormatError("signature envelope: two signatures by the same key")
        if ids != sorted(ids):
            object.__setattr__(
                self, "signatures", tuple(sorted(self.signatures, key=lambda s: s.key_id))
            )

    def _entries(self) -> list[dict[str, str]]:
        return [{"keyid": s.key_id, "sig": s.value.hex()} for s in self.signatures]

    def to_bytes(self) -> bytes:
        entries = self._entries()
        document = {"check": _check(entries), "format": ENVELOPE_FORMAT, "signatures": entries}
        return _canonical(document) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> SignatureEnvelope:
        """Parse an envelope, accepting only its canonical encoding.

        Raises:
            SignatureFormatError: anything but a canonical envelope of a known format.
        """
        if len(data) > MAX_ENVELOPE_BYTES:
            raise SignatureFormatError(
                f"signature envelope: {len(data)} bytes, more than {MAX_ENVELOPE_BYTES}"
            )
        try:
            document = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as err:  # ValueError: bad JSON, UTF-8, huge ints
            raise SignatureFormatError(f"signature envelope: not JSON ({err})") from err
        if not isinstance(document, dict) or set(document) != {"check", "format", "signatures"}:
            raise SignatureFormatError(
                "signature envelope: expected keys 'check', 'format', 'signatures'"
            )
        if document["format"] != ENVELOPE_FORMAT or type(document["format"]) is not int:
            raise SignatureFormatError(
                f"signature envelope: unknown format {document['format']!r}, "
                f"this reader knows {ENVELOPE_FORMAT}"
            )
        entries = document["signatures"]
        if not isinstance(entries, list) or not entries:
            raise SignatureFormatError("signature envelope: no signatures")
        if len(entries) > MAX_SIGNATURES:
            raise SignatureFormatError(
                f"signature envelope: {len(entries)} signatures, more than {MAX_SIGNATURES}"
            )
        signatures = []
        for entry in entries:
            if not isinstance(entry, dict) or set(entry) != {"keyid", "sig"}:
                raise SignatureFormatError("signature envelope: entry needs 'keyid' and 'sig'")
            keyid, sig = entry["keyid"], entry["sig"]
            if not isinstance(keyid, str) or not _KEY_ID.fullmatch(keyid):
                raise SignatureFormatError(
                    f"signature envelope: key id {keyid!r} is not 64 lowercase hex digits"
                )
            if not isinstance(sig, str) or not _SIG.fullmatch(sig):
                raise SignatureFormatError(
                    f"signature envelope: signature by key {keyid} is not 128 lowercase hex digits"
                )
            signatures.append(Signature(keyid, bytes.fromhex(sig)))
        envelope = cls(tuple(signatures))
        if document["check"] != _check(envelope._entries()):
            raise SignatureFormatError("signature envelope: damaged (check does not match)")
        if envelope.to_bytes() != data:
            raise SignatureFormatError("signature envelope: not in canonical form")
        return envelope


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _check(entries: list[dict[str, str]]) -> str:
    return hashlib.sha256(_canonical(entries)).hexdigest()


def sign(payload: bytes, keys: Iterable[SigningKey], purpose: str) -> SignatureEnvelope:
    """Sign ``payload`` for ``purpose`` with each of ``keys``; returns the envelope.

    Raises:
        SignatureFormatError: no key, or the same key twice.
    """
    key_list: Sequence[SigningKey] = list(keys)
    if not key_list:
        raise SignatureFormatError("sign: at least one key is needed")
    message = signed_message(purpose, payload)
    return SignatureEnvelope(
        tuple(Signature(k.key_id, k.private_key.sign(message)) for k in key_list)
    )
