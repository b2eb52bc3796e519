"""The signature envelope: one canonical spelling, purpose-bound signatures."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from signing.errors import SignatureFormatError
from signing.keys import SigningKey
from signing.signature import (
    MAX_ENVELOPE_BYTES,
    MAX_SIGNATURES,
    Signature,
    SignatureEnvelope,
    sign,
    signed_message,
)

KEY_A = "a" * 64
KEY_B = "b" * 64


def envelope_bytes() -> bytes:
    return SignatureEnvelope(
        (Signature(KEY_B, b"\x02" * 64), Signature(KEY_A, b"\x01" * 64))
    ).to_bytes()


def test_round_trip_and_canonical_order() -> None:
    data = envelope_bytes()
    parsed = SignatureEnvelope.from_bytes(data)
    assert [s.key_id for s in parsed.signatures] == [KEY_A, KEY_B]
    assert parsed.to_bytes() == data
    assert data.endswith(b"\n") and b" " not in data


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.replace(b"aaaa", b"AAAA", 1), "64 lowercase hex"),
        (lambda d: d.replace(b":", b": ", 1), "canonical"),
        (lambda d: d.rstrip(b"\n"), "canonical"),
        (lambda d: d.replace(b'"format":1', b'"format":2'), "unknown format"),
        (lambda d: d.replace(b'"format":1', b'"format":true'), "unknown format"),
        (
            lambda d: (
                b'{"check":"%s","format":1,"signatures":[]}\n'
                % hashlib.sha256(b"[]").hexdigest().encode()
            ),
            "no signatures",
        ),
        (
            lambda d: d.replace(b'"check":"', b'"check":"0', 1).replace(
                b'","format', b'"format', 1
            ),
            "damaged|canonical|JSON",
        ),
        (lambda d: b"\xff\xfe", "not JSON"),
        (lambda d: b"[]", "expected keys"),
        (lambda d: d.replace(b"bbbb", b"aaaa", 16), "same key"),
        (lambda d: b" " * 70000, "more than"),
    ],
)
def test_non_canonical_or_malformed_envelopes_are_refused(mutate, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SignatureFormatError, match=message):
        SignatureEnvelope.from_bytes(mutate(envelope_bytes()))


def test_unsorted_envelope_is_refused() -> None:
    entries = [{"keyid": KEY_B, "sig": "02" * 64}, {"keyid": KEY_A, "sig": "01" * 64}]
    for check_over in (entries, entries[::-1]):
        check = hashlib.sha256(json.dumps(check_over, separators=(",", ":")).encode()).hexdigest()
        document = {"check": check, "format": 1, "signatures": entries}
        data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        with pytest.raises(SignatureFormatError, match="canonical|damaged"):
            SignatureEnvelope.from_bytes(data)


@given(position=st.integers(min_value=0), xor=st.integers(min_value=1, max_value=255))
def test_any_changed_byte_changes_the_meaning_or_is_refused(position: int, xor: int) -> None:
    data = bytearray(envelope_bytes())
    data[position % len(data)] ^= xor
    try:
        parsed = SignatureEnvelope.from_bytes(bytes(data))
    except SignatureFormatError:
        return
    assert parsed != SignatureEnvelope.from_bytes(envelope_bytes())


def test_signature_is_bound_to_its_purpose(key: SigningKey) -> None:
    envelope = sign(b"payload", [key], "bundle-manifest")
    value = envelope.signatures[0].value
    key.public_key.verify(value, signed_message("bundle-manifest", b"payload"))
    from cryptography.exceptions import InvalidSignature

    with pytest.raises(InvalidSignature):
        key.public_key.verify(value, signed_message("assignment", b"payload"))
    with pytest.raises(InvalidSignature):
        key.public_key.verify(value, b"payload")


def test_sign_needs_a_key() -> None:
    with pytest.raises(SignatureFormatError, match="at least one key"):
        sign(b"x", [], "bundle-manifest")


def test_signing_twice_with_one_key_is_refused(key: SigningKey) -> None:
    with pytest.raises(SignatureFormatError, match="same key"):
        sign(b"x", [key, key], "bundle-manifest")


@pytest.mark.parametrize("data", [b"[" * 60_000, b'{"format":' + b"9" * 5000 + b"}"])
def test_hostile_json_is_a_signature_format_error(data: bytes) -> None:
    with pytest.raises(SignatureFormatError, match="not JSON"):
        SignatureEnvelope.from_bytes(data)


def test_signed_message_is_domain_purpose_newline_payload() -> None:
    assert signed_message("bundle-manifest", b"{}") == (
        b"metrica-fleet signature v1\nbundle-manifest\n{}"
    )


def test_known_answer_signature() -> None:
    """Ed25519 is deterministic: a fixed key gives this signature forever (devices in the field
    verify what was signed years ago)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = SigningKey.from_private_key(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    envelope = sign(b'{"version":"1.0.0"}\n', [key], "bundle-manifest")
    assert key.key_id == "56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c"
    assert envelope.signatures[0].value.hex() == (
        "969c126c1500ab065a3afa805826b1aeda169857d54f5707b04f8bccce8c123f"
        "48a6d23d68219e8a748e02ab3d0e166203f2b29803039ea69c457dc85cea230e"
    )


def test_size_limits_are_inclusive() -> None:
    """An envelope of exactly MAX_ENVELOPE_BYTES is parsed (this one is no JSON); one byte more
    is refused for its size. MAX_SIGNATURES signatures are accepted, one more is refused."""
    with pytest.raises(SignatureFormatError, match="not JSON"):
        SignatureEnvelope.from_bytes(b"x" * MAX_ENVELOPE_BYTES)
    with pytest.raises(SignatureFormatError, match=f"{MAX_ENVELOPE_BYTES + 1} bytes, more than"):
        SignatureEnvelope.from_bytes(b"x" * (MAX_ENVELOPE_BYTES + 1))

    def envelope(count: int) -> bytes:
        signatures = (Signature(f"{i:064x}", bytes([i]) * 64) for i in range(count))
        return SignatureEnvelope(tuple(signatures)).to_bytes()

    assert len(SignatureEnvelope.from_bytes(envelope(MAX_SIGNATURES)).signatures) == MAX_SIGNATURES
    message = f"{MAX_SIGNATURES + 1} signatures, more than {MAX_SIGNATURES}"
    with pytest.raises(SignatureFormatError, match=message):
        SignatureEnvelope.from_bytes(envelope(MAX_SIGNATURES + 1))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"keyid": KEY_A}, "entry needs 'keyid' and 'sig'"),
        ({"keyid": KEY_A, "sig": "AB" * 64}, f"signature by key {KEY_A} is not 128 lowercase hex"),
    ],
)
def test_malformed_entries_are_named(entry: dict[str, str], message: str) -> None:
    entries = [entry]
    check = hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()
    document = {"check": check, "format": 1, "signatures": entries}
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    with pytest.raises(SignatureFormatError, match=message):
        SignatureEnvelope.from_bytes(data)


def test_check_is_the_sha256_of_the_canonical_signature_list() -> None:
    """The envelope format (docs/bundle-format.md) as another implementation must write it."""
    document = json.loads(envelope_bytes())
    entries = json.dumps(document["signatures"], sort_keys=True, separators=(",", ":"))
    assert document["check"] == hashlib.sha256(entries.encode()).hexdigest()
