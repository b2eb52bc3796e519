"""Ed25519 signing keys on disk.

A key pair is two files: ``NAME.pem`` (PKCS#8 private key, mode 0600, optionally encrypted with a
passphrase) and ``NAME.pub`` (SubjectPublicKeyInfo PEM). Both are the standard encodings, so
``openssl pkey -in NAME.pem -pubout`` gives the same public key. A key id is the SHA-256 of the
32-byte raw public key, in lowercase hex: it names the key in signatures, keyrings and errors.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fleet_core.durable import boundary, fsync_dir
from fleet_core.inputs import InputPathError, read_regular_file
from signing.errors import KeyFileError
from signing.points import public_key_problem

# A private key is a secret, so it must never exist on disk with wider permissions.
PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o644


def key_id(public_key: Ed25519PublicKey) -> str:
    """Return the key id of ``public_key``: SHA-256 of its raw 32 bytes, lowercase hex."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class SigningKey:
    """A private key together with its key id, ready to sign."""

    private_key: Ed25519PrivateKey
    key_id: str

    @classmethod
    def from_private_key(cls, private_key: Ed25519PrivateKey) -> SigningKey:
        return cls(private_key, key_id(private_key.public_key()))

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The private and public key files of the pair named ``out``: OUT plus ``.pem`` and
    ``.pub``, a ``.pem`` or ``.pub`` given in OUT dropped first (and only that: a dot inside
    OUT stays, as in ``release-2024.1``)."""
    base = Path(out)
    if base.suffix in (".pem", ".pub"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".pem"), base.with_name(base.name + ".pub")


def generate_key(out: str | os.PathLike[str], passphrase: bytes | None = None) -> SigningKey:
    """Create a new key pair at ``OUT.pem`` and ``OUT.pub`` and return it.

    Refuses to overwrite an existing key file: losing a signing key is not recoverable. Each
    file is created exclusively (see :func:`_create_new`), the private key first, so of two
    runs racing for one name exactly one wins both files and the other fails, removing only
    its own temporaries: ``OUT.pem`` and ``OUT.pub`` always hold one key pair.
    Creates the parent directory if needed. ``passphrase`` None writes an unencrypted key; an
    empty passphrase is refused (it would leave the key unencrypted without saying so).
    Power cut: each file appears whole or not at all; the private key is written first, so a
    ``.pub`` never exists without its ``.pem``.

    Raises:
        KeyFileError: a file of that name exists already, the passphrase is empty, or the
            files cannot be written.
    """
    if passphrase is not None and not passphrase:
        raise KeyFileError(
            "the passphrase is empty: it would leave the private key unencrypted "
            "(for a key without a passphrase, give none)"
        )
    private_path, public_path = key_paths(out)
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise KeyFileError(f"{path}: already exists, refusing to overwrite a key")
    private_key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase is not None
        else serialization.NoEncryption()
    )
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KeyFileError(f"{private_path.parent}: cannot create: {err.strerror}") from err
    _create_new(private_path, private_pem, PRIVATE_KEY_MODE)
    try:
        _create_new(public_path, public_key_pem(private_key.public_key()), PUBLIC_KEY_MODE)
    except BaseException:
        private_path.unlink(missing_ok=True)  # ours: nobody else can have created it
        raise
    return SigningKey.from_private_key(private_key)


def _create_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` holding ``data``, durably, and only if no file of that name exists.

    The bytes go to a temporary file in the same directory (``.<name>.XXXXXXXX.tmp``, created
    with ``mode``, fsync-ed), which is then hard-linked to ``path``: the link fails if the name
    exists, atomically, so two processes never both create it, and ``path`` never holds a
    partial file. The temporary is removed whatever happens.

    Raises:
        KeyFileError: ``path`` exists already, or the file cannot be written.
    """
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise KeyFileError(f"{path}: cannot write: {err.strerror}") from err
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), mode)
            boundary("atomic:begin", path)
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        boundary("atomic:before-rename", path)
        os.link(tmp_name, path)
    except FileExistsError as err:
        raise KeyFileError(f"{path}: already exists, refusing to overwrite a key") from err
    except OSError as err:
        raise KeyFileError(f"{path}: cannot write: {err.strerror}") from err
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    fsync_dir(path.parent)
    boundary("atomic:done", path)


def _read(path: Path, what: str) -> bytes:
    """The bytes of the key file at ``path``: the one place a key file is read, and only a
    regular file (:func:`fleet_core.inputs.read_regular_file`: a FIFO never blocks)."""
    try:
        return read_regular_file(path)
    except InputPathError as err:
        raise KeyFileError(f"{path}: cannot read {what}: not a regular file ({err.kind})") from err
    except OSError as err:
        raise KeyFileError(f"{path}: cannot read {what}: {err.strerror}") from err


def private_key_is_encrypted(path: str | os.PathLike[str]) -> bool:
    """Tell whether the private key file at ``path`` needs a passphrase."""
    return b"ENCRYPTED PRIVATE KEY" in _read(Path(path), "private key")


def load_private_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> SigningKey:
    """Load an Ed25519 private key from a PEM file.

    Raises:
        KeyFileError: the file is unreadable, not an Ed25519 private key, or the passphrase is
            missing or wrong.
    """
    key_path = Path(path)
    data = _read(key_path, "private key")
    try:
        private_key = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError as err:
        if passphrase:
            raise KeyFileError(
                f"{key_path}: key is not encrypted, but a passphrase was given"
            ) from err
        raise KeyFileError(f"{key_path}: key is encrypted and needs a passphrase") from err
    except (ValueError, UnsupportedAlgorithm) as err:
        if b"ENCRYPTED" in data:
            raise KeyFileError(f"{key_path}: wrong passphrase or damaged key file") from err
        raise KeyFileError(f"{key_path}: not a PEM private key") from err
    if not isinstance(private_key, Ed25519PrivateKey):
        raise KeyFileError(f"{key_path}: not an Ed25519 key ({type(private_key).__name__})")
    return SigningKey.from_private_key(private_key)


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file (``.pub``) or its private key (``.pem``).

    Raises:
        KeyFileError: the file is unreadable or not an Ed25519 public key, or a key no honest
            signer has (see :mod:`signing.points`).
    """
    key_path = Path(path)
    data = _read(key_path, "public key")
    if b"PRIVATE KEY" in data:
        if b"ENCRYPTED" in data:
            raise KeyFileError(f"{key_path}: is an encrypted private key; give its .pub file")
        return load_private_key(key_path).public_key
    try:
        public_key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise KeyFileError(f"{key_path}: not a PEM public key") from err
    if not isinstance(public_key, Ed25519PublicKey):
        raise KeyFileError(f"{key_path}: not an Ed25519 key ({type(public_key).__name__})")
    problem = public_key_problem(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw))
    if problem is not None:
        raise KeyFileError(f"{key_path}: unusable Ed25519 public key: {problem}")
    return public_key
