"""Signing keys, detached signatures and the keyring of trusted keys.

Public API:

- :func:`generate_key`, :func:`load_private_key`, :func:`load_public_key`, :func:`key_id`
  (``signing.keys``): Ed25519 keys on disk, key id = SHA-256 of the raw public key, hex.
- :func:`sign` and :class:`SignatureEnvelope` (``signing.signature``): detached signatures over
  exact bytes, for one named purpose.
- :class:`Keyring` (``signing.keyring``): trusted keys, revocations and a k-of-n threshold; the
  one place that decides whether bytes are authentic.
"""

from signing.errors import (
    BadSignatureError,
    KeyFileError,
    KeyringError,
    RevokedKeyError,
    SignatureFormatError,
    SigningError,
    ThresholdError,
    UnknownKeyError,
    VerificationError,
)
from signing.keyring import Keyring, Verified
from signing.keys import SigningKey, generate_key, key_id, load_private_key, load_public_key
from signing.signature import Signature, SignatureEnvelope, sign

__all__ = [
    "BadSignatureError",
    "KeyFileError",
    "Keyring",
    "KeyringError",
    "RevokedKeyError",
    "Signature",
    "SignatureEnvelope",
    "SignatureFormatError",
    "SigningError",
    "SigningKey",
    "ThresholdError",
    "UnknownKeyError",
    "VerificationError",
    "Verified",
    "generate_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign",
]
