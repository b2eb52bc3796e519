"""Signing keys on disk: creation, permissions, passphrases, key ids."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from signing.errors import KeyFileError
from signing.keys import (
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    private_key_is_encrypted,
)


def test_generate_writes_private_key_0600_and_public_key(tmp_path: Path) -> None:
    key = generate_key(tmp_path / "release")
    private, public = tmp_path / "release.pem", tmp_path / "release.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert load_private_key(private).key_id == key.key_id
    assert key_id(load_public_key(public)) == key.key_id
    assert not list(tmp_path.glob(".*.tmp"))


def test_key_id_is_sha256_of_raw_public_key(tmp_path: Path) -> None:
    key = generate_key(tmp_path / "k")
    raw = key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key.key_id == hashlib.sha256(raw).hexdigest()
    assert len(key.key_id) == 64


def test_generate_accepts_pem_suffix_and_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_key(tmp_path / "k.pem")
    before = (tmp_path / "k.pem").read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key(tmp_path / "k")
    assert (tmp_path / "k.pem").read_bytes() == before


def test_passphrase_protects_the_private_key(tmp_path: Path) -> None:
    key = generate_key(tmp_path / "k", passphrase=b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "k.pem").read_bytes()
    assert load_private_key(tmp_path / "k.pem", b"correct horse").key_id == key.key_id
    with pytest.raises(KeyFileError, match="needs a passphrase"):
        load_private_key(tmp_path / "k.pem")
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_private_key(tmp_path / "k.pem", b"wrong")
    with pytest.raises(KeyFileError, match="encrypted private key"):
        load_public_key(tmp_path / "k.pem")


def test_passphrase_given_for_plain_key_is_an_error(tmp_path: Path) -> None:
    generate_key(tmp_path / "k")
    with pytest.raises(KeyFileError, match="not encrypted"):
        load_private_key(tmp_path / "k.pem", b"pass")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a PEM"),
        (b"garbage\n", "not a PEM"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM"),
    ],
)
def test_malformed_key_files_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.pub"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=message) as info:
        load_public_key(path)
    assert str(path) in str(info.value)
    path.rename(tmp_path / "bad.pem")
    with pytest.raises(KeyFileError):
        load_private_key(tmp_path / "bad.pem")


def test_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.pem"
    path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyFileError, match=rf"not an Ed25519 key \({type(other).__name__}\)"):
        load_private_key(path)
    pub = tmp_path / "ec.pub"
    pub.write_bytes(
        other.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(
        KeyFileError, match=rf"not an Ed25519 key \({type(other.public_key()).__name__}\)"
    ):
        load_public_key(pub)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        load_private_key(tmp_path / "nope.pem")


@pytest.mark.parametrize("function", [load_private_key, load_public_key])
def test_unreadable_key_file_says_which_kind_of_key(tmp_path: Path, function) -> None:  # type: ignore[no-untyped-def]
    kind = "private key" if function is load_private_key else "public key"
    with pytest.raises(KeyFileError, match=f"nope.pem: cannot read {kind}: "):
        function(tmp_path / "nope.pem")


def test_damaged_private_key_file_says_it_is_not_a_pem_private_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(b"garbage\n")
    with pytest.raises(KeyFileError, match=r"bad.pem: not a PEM private key$"):
        load_private_key(path)


def test_public_key_from_the_private_key_file(tmp_path: Path) -> None:
    key = generate_key(tmp_path / "k")
    assert key_id(load_public_key(tmp_path / "k.pem")) == key.key_id


@pytest.mark.parametrize(
    ("out", "stem"),
    [
        ("keys/release", "keys/release"),
        ("keys/release.pem", "keys/release"),
        ("keys/release.pub", "keys/release"),
        ("keys/release-2024.1", "keys/release-2024.1"),
        ("keys/release.v2.pem", "keys/release.v2"),
    ],
)
def test_generate_names_the_pair_after_out(tmp_path: Path, out: str, stem: str) -> None:
    """``OUT.pem`` and ``OUT.pub``: a .pem or .pub given is not doubled, other dots are kept;
    missing parent directories are created."""
    key = generate_key(tmp_path / "new" / out)
    base = tmp_path / "new" / stem
    assert sorted(p.name for p in base.parent.iterdir()) == [base.name + ".pem", base.name + ".pub"]
    assert load_private_key(base.parent / (base.name + ".pem")).key_id == key.key_id


def test_private_key_is_encrypted(tmp_path: Path) -> None:
    generate_key(tmp_path / "plain")
    generate_key(tmp_path / "secret", passphrase=b"correct horse")
    assert private_key_is_encrypted(tmp_path / "secret.pem") is True
    assert private_key_is_encrypted(tmp_path / "plain.pem") is False
    with pytest.raises(KeyFileError, match="nope.pem: cannot read private key"):
        private_key_is_encrypted(tmp_path / "nope.pem")


def test_an_empty_passphrase_is_refused_rather_than_writing_a_plain_key(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="passphrase is empty"):
        generate_key(tmp_path / "k", passphrase=b"")
    assert list(tmp_path.iterdir()) == []


def test_a_public_key_file_in_the_way_fails_the_generation_and_keeps_nothing_of_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "k.pub").write_bytes(b"someone else's")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key(tmp_path / "k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pub"]
