"""The device's identity: its Ed25519 key, its enrollment token, and whether it is enrolled.

Everything lives on the data partition, in ``<data_dir>/identity/`` (mode 0700)::

    device.pem         the device's private key (PKCS#8 PEM, mode 0600): made on first start,
                       never leaves the device
    device.pub         its public key (PEM), for ``fleet device preauthorize device.pub``
    enrollment-token   optional: the token an operator provisioned (``[server] enrollment_token``
                       in the configuration takes precedence)
    enrolled.json      the enrollment record: which server admitted which device id

The device id is the key id of the public key (``signing.keys.key_id``): SHA-256 of its 32 raw
bytes, in hex. There is no secret shared between devices.

Power cuts: every file is written with :func:`fleet_core.durable.atomic_write` and appears
whole or not at all. The private key is written before the public one, so a ``.pub`` never
exists without its ``.pem``; a ``.pem`` without a ``.pub`` gets its ``.pub`` on the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet_core.durable import atomic_write
from signing.errors import KeyFileError
from signing.keys import (
    PRIVATE_KEY_MODE,
    PUBLIC_KEY_MODE,
    SigningKey,
    load_private_key,
    public_key_pem,
)
from updater.errors import UpdaterError
from updater.state import now_text

IDENTITY_DIR = "identity"
KEY_NAME = "device.pem"
PUBLIC_KEY_NAME = "device.pub"
TOKEN_NAME = "enrollment-token"  # noqa: S105 (the name of the file, not a secret)
ENROLLED_NAME = "enrolled.json"
ENROLLMENT_FORMAT = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")


class IdentityError(UpdaterError):
    """The device key cannot be read or made (data partition unreadable or read-only)."""


@dataclass(frozen=True)
class DeviceIdentity:
    """The device's signing key; its key id is the device id."""

    key: SigningKey

    @property
    def device_id(self) -> str:
        return self.key.key_id

    @property
    def public_key_hex(self) -> str:
        """The raw 32-byte public key in hex, as the enrollment request carries it."""
        raw = self.key.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return raw.hex()


@dataclass(frozen=True)
class Enrollment:
    """The record that this device was admitted: by which server, under which device id."""

    device_id: str
    server: str  # the URL that answered the enrollment
    server_keys: tuple[str, ...] = ()  # what the server said it signs with (informational)
    enrolled_at: str | None = None  # wall clock, for humans only

    @classmethod
    def from_dict(cls, document: Any) -> Enrollment:
        """Raises:
        IdentityError: not an enrollment record of a known format."""
        if not isinstance(document, dict) or document.get("format") != ENROLLMENT_FORMAT:
            raise IdentityError("enrollment record: unknown format")
        device_id, server = document.get("device_id"), document.get("server")
        keys = document.get("server_keys", [])
        at = document.get("enrolled_at")
        if not isinstance(device_id, str) or not _HEX64.fullmatch(device_id):
            raise IdentityError("enrollment record: device_id must be 64 lowercase hex digits")
        if not isinstance(server, str) or not server:
            raise IdentityError("enrollment record: server must be a URL")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise IdentityError("enrollment record: server_keys must be a list of strings")
        if at is not None and not isinstance(at, str):
            raise IdentityError("enrollment record: enrolled_at must be a string")
        return cls(device_id, server, tuple(keys), at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ENROLLMENT_FORMAT,
            "device_id": self.device_id,
            "server": self.server,
            "server_keys": list(self.server_keys),
            "enrolled_at": self.enrolled_at,
        }


def identity_dir(data_dir: Path) -> Path:
    return data_dir / IDENTITY_DIR


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialize the first start's key generation between processes (daemon, CLI)."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_or_create_identity(data_dir: Path) -> tuple[DeviceIdentity, str | None]:
    """The device's identity, made on first start; and a problem to report, if any.

    A key file that exists but is not an Ed25519 private key (damaged) is set aside as
    ``device.pem.damaged`` and a new key is made: the device must enroll again (enrolling is
    harmless, but a pre-authorized key is lost, so the problem is returned for the log). A key
    file that cannot be *read* is an error instead: replacing a key because of a passing I/O
    error would lose the identity for nothing.

    Power cut: the key appears whole or not at all (see the module docstring).

    Raises:
        IdentityError: the identity directory or key cannot be read or written.
    """
    directory = identity_dir(data_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        with _locked(directory):
            return _load_or_create(directory)
    except OSError as err:
        raise IdentityError(f"device identity {directory}: {err.strerror or err}") from err


def _load_or_create(directory: Path) -> tuple[DeviceIdentity, str | None]:
    private_path = directory / KEY_NAME
    problem = None
    if private_path.exists():
        if private_path.stat().st_mode & 0o077:
            private_path.chmod(PRIVATE_KEY_MODE)
        private_path.read_bytes()  # an I/O error is raised here, as OSError, not replaced
        try:
            key = load_private_key(private_path)
        except KeyFileError as err:
            damaged = private_path.with_name(KEY_NAME + ".damaged")
            private_path.replace(damaged)
            (directory / PUBLIC_KEY_NAME).unlink(missing_ok=True)
            problem = f"{err}: set aside as {damaged.name}, a new device key was made"
        else:
            _write_public(directory, key)
            return DeviceIdentity(key), None
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(private_path, pem, mode=PRIVATE_KEY_MODE)
    key = SigningKey.from_private_key(private_key)
    _write_public(directory, key)
    return DeviceIdentity(key), problem


def _write_public(directory: Path, key: SigningKey) -> None:
    path = directory / PUBLIC_KEY_NAME
    pem = public_key_pem(key.public_key)
    with contextlib.suppress(OSError):
        if path.read_bytes() == pem:
            return
    atomic_write(path, pem, mode=PUBLIC_KEY_MODE)


def enrollment_token(data_dir: Path, configured: str | None) -> str | None:
    """The enrollment token: the configured one, else the provisioned file, else None
    (a device whose key an operator pre-authorized needs none)."""
    if configured:
        return configured
    try:
        token = (identity_dir(data_dir) / TOKEN_NAME).read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token or None


def load_enrollment(data_dir: Path, device_id: str) -> Enrollment | None:
    """The enrollment record of ``device_id``; None if there is none, it is damaged, or it
    names another device id (a new key): the device then simply enrolls again."""
    path = identity_dir(data_dir) / ENROLLED_NAME
    try:
        record = Enrollment.from_dict(json.loads(path.read_bytes().decode("utf-8")))
    except (OSError, ValueError, IdentityError):
        return None
    return record if record.device_id == device_id else None


def save_enrollment(
    data_dir: Path, device_id: str, server: str, server_keys: tuple[str, ...] = ()
) -> Enrollment:
    """Record that ``server`` admitted ``device_id``.

    Power cut: the file holds the previous record or this one; losing it only costs a repeated
    (harmless) enrollment.

    Raises:
        IdentityError: the record cannot be written.
    """
    record = Enrollment(device_id, server, server_keys, now_text())
    data = json.dumps(record.to_dict(), indent=1, sort_keys=True).encode() + b"\n"
    path = identity_dir(data_dir) / ENROLLED_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError as err:
        raise IdentityError(f"enrollment record {path}: cannot write: {err.strerror}") from err
    return record


def forget_enrollment(data_dir: Path) -> None:
    """Drop the enrollment record (the server no longer knows this device): the next start
    of the daemon enrolls again. Power cut: the record is there or not."""
    with contextlib.suppress(FileNotFoundError):
        (identity_dir(data_dir) / ENROLLED_NAME).unlink()
