"""Strict Ed25519 encodings (signing.points): small-order and non-canonical keys and signatures
are refused wherever a key is accepted or a signature verified."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from signing.errors import BadSignatureError, KeyFileError, KeyringError
from signing.keyring import Keyring, trust_key
from signing.keys import generate_key, load_public_key, public_key_pem
from signing.points import L, P, public_key_problem, signature_problem
from signing.signature import Signature, SignatureEnvelope, sign

# The eight points of order dividing 8, in their canonical encodings (as listed in "Taming the
# many EdDSAs", Chalkias et al., 2020, and in libsodium's blocklist): orders 1, 2, 4, 4, 8 x 4.
SMALL_ORDER = [
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
]


def encode(y: int, sign: int = 0) -> bytes:
    return (y | sign << 255).to_bytes(32, "little")


# Encodings no canonical encoder produces: y at or above p (y + p for the small y the curve
# allows, and the largest values), and "negative zero" (x = 0 with the sign bit set).
NON_CANONICAL = [
    encode(P),  # y = 0 + p
    encode(P + 1),  # the identity, y = 1 + p
    encode(P + 1, 1),
    encode(2**255 - 1),
    encode(2**255 - 1, 1),
    encode(1, 1),  # the identity, x = 0 with the sign bit
    encode(P - 1, 1),  # the point of order 2, x = 0 with the sign bit
]


def raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def honest_key(seed: bytes = bytes(range(32))) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(seed)


def with_order_2_component(encoded: bytes) -> bytes:
    """A + T, T the point of order 2 (0, -1): on an Edwards curve, (x, y) + (0, -1) = (-x, -y).
    So the encoding of the sum is y' = p - y with the sign bit flipped (x is odd or even, -x the
    other way round)."""
    value = int.from_bytes(encoded, "little")
    sign, y = value >> 255, value & ((1 << 255) - 1)
    return encode(P - y, 1 - sign)


@pytest.mark.parametrize("encoded", SMALL_ORDER)
def test_every_small_order_point_is_refused_as_a_key_and_as_r(encoded: str) -> None:
    point = bytes.fromhex(encoded)
    assert public_key_problem(point) == (
        "a small-order point (a signature by it would verify for any message)"
    )
    assert signature_problem(point + bytes(32)) == "R is a small-order point"


@pytest.mark.parametrize("encoded", NON_CANONICAL, ids=lambda b: b.hex()[:6] + b.hex()[-4:])
def test_non_canonical_encodings_are_refused_as_a_key_and_as_r(encoded: bytes) -> None:
    problem = public_key_problem(encoded)
    assert problem is not None and problem.startswith("non-canonical encoding")
    r_problem = signature_problem(encoded + bytes(32))
    assert r_problem is not None and r_problem.startswith("R is a non-canonical encoding")


def test_a_key_with_a_small_order_component_is_refused() -> None:
    mixed = with_order_2_component(raw(honest_key().public_key()))
    assert public_key_problem(mixed) == (
        "not in the prime-order subgroup (it has a small-order component)"
    )


def test_bytes_that_are_no_point_are_refused() -> None:
    # y = 2: (y^2 - 1) / (d y^2 + 1) has no square root mod p
    assert public_key_problem(encode(2)) == "not a point on the curve"
    assert public_key_problem(bytes(31)) == "31 bytes, not 32"
    assert signature_problem(bytes(63)) == "63 bytes, not 64"
    assert signature_problem(encode(2) + bytes(32)) == "R: not a point on the curve"


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary())
def test_honest_keys_and_signatures_pass(seed: bytes, message: bytes) -> None:
    private_key = honest_key(seed)
    assert public_key_problem(raw(private_key.public_key())) is None
    assert signature_problem(private_key.sign(message)) is None


def test_s_at_or_above_the_group_order_is_refused() -> None:
    signature = honest_key().sign(b"payload")
    s = int.from_bytes(signature[32:], "little")
    for bad in (s + L, L, 2**256 - 1):
        assert signature_problem(signature[:32] + bad.to_bytes(32, "little")) == (
            "S is not below the group order (non-canonical)"
        )


# --- where keys are accepted and signatures verified ---------------------------------------


def pem_of(raw_key: bytes, path: Path) -> Path:
    path.write_bytes(public_key_pem(Ed25519PublicKey.from_public_bytes(raw_key)))
    return path


@pytest.mark.parametrize("encoded", [*SMALL_ORDER[:3], SMALL_ORDER[4]])
def test_a_small_order_key_file_is_refused_by_name(tmp_path: Path, encoded: str) -> None:
    path = pem_of(bytes.fromhex(encoded), tmp_path / "weak.pub")
    with pytest.raises(
        KeyFileError, match=f"^{path}: unusable Ed25519 public key: a small-order point"
    ):
        load_public_key(path)


def test_a_keyring_refuses_to_trust_or_load_a_weak_key(tmp_path: Path) -> None:
    keyring_dir = tmp_path / "keyring"
    keyring_dir.mkdir()
    honest = generate_key(tmp_path / "honest")
    trust_key(keyring_dir, tmp_path / "honest.pub")
    weak = pem_of(bytes.fromhex(SMALL_ORDER[0]), tmp_path / "weak.pub")
    with pytest.raises(KeyFileError, match="small-order point"):
        trust_key(keyring_dir, weak)
    assert Keyring.load(keyring_dir).active_key_ids == (honest.key_id,)  # nothing changed
    # a weak key dropped into the directory by hand: the keyring refuses to load at all
    (keyring_dir / "weak.pub").write_bytes(weak.read_bytes())
    with pytest.raises(KeyringError, match="small-order point"):
        Keyring.load(keyring_dir)


def test_a_keyring_refuses_a_signature_with_s_above_the_group_order(tmp_path: Path) -> None:
    keyring_dir = tmp_path / "keyring"
    keyring_dir.mkdir()
    key = generate_key(tmp_path / "release")
    trust_key(keyring_dir, tmp_path / "release.pub")
    keyring = Keyring.load(keyring_dir)
    envelope = sign(b"manifest", [key], "bundle-manifest")
    (signature,) = envelope.signatures
    s = int.from_bytes(signature.value[32:], "little")
    malleated = signature.value[:32] + (s + L).to_bytes(32, "little")
    forged = SignatureEnvelope((Signature(signature.key_id, malleated),))
    with pytest.raises(
        BadSignatureError,
        match=f"^signature by key {key.key_id} is malformed: S is not below the group order",
    ):
        keyring.verify(b"manifest", forged, "bundle-manifest")
    assert keyring.verify(b"manifest", envelope, "bundle-manifest").key_ids == (key.key_id,)
