"""The keyring: which keys are trusted, which are revoked, and how many must sign.

On disk a keyring is a directory::

    KEYRING/
      <anything>.pub   trusted Ed25519 public keys (PEM), one per file
      revoked.txt      optional: key ids no longer trusted, one per line, '#' starts a comment
      keyring.toml     optional: threshold = K   (distinct trusted keys that must sign; default 1)

Every change (:func:`trust_key`, :func:`revoke_key`, :func:`set_threshold`) reads, checks and
writes under an exclusive ``flock`` on ``KEYRING/.keyring.lock``, so changes made at once (two
operators, a script running them in parallel) are serialised: none is lost, and the threshold
rule is checked against what the keyring holds when the change is written. Readers take no lock:
every file is replaced atomically.

A revoked key stays revoked even while its ``.pub`` is still in the directory, so revocation is
a single append and cannot be undone by restoring an old key file.

Key rotation: trust the new key next to the old one, sign releases with both, then revoke (or
remove) the old key once every device has the new keyring. A device that knows only the old key
accepts the dual-signed releases throughout.

Verification rule (:meth:`Keyring.verify`): a signature by a trusted key that does not verify is
an error even if others would meet the threshold, because it means the payload or envelope was
altered; signatures by unknown keys are ignored (they may be from a key this device has not yet
learnt); signatures by revoked keys never count.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fleet_core.durable import atomic_write
from fleet_core.inputs import InputPathError, read_regular_file
from fleet_core.suggest import unknown_names
from signing.errors import (
    BadSignatureError,
    KeyFileError,
    KeyringError,
    RevokedKeyError,
    ThresholdError,
    UnknownKeyError,
)
from signing.keys import key_id, load_public_key, public_key_pem
from signing.points import signature_problem
from signing.signature import SignatureEnvelope, signed_message

REVOKED_FILE = "revoked.txt"
CONFIG_FILE = "keyring.toml"
LOCK_FILE = ".keyring.lock"
_KEY_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Verified:
    """The outcome of a successful verification: the trusted key ids whose signatures held."""

    key_ids: tuple[str, ...]


@dataclass(frozen=True)
class Keyring:
    """Trusted public keys by key id, revoked key ids, and the signing threshold."""

    trusted: Mapping[str, Ed25519PublicKey]
    revoked: frozenset[str] = frozenset()
    threshold: int = 1
    source: str = "keyring"
    _active: dict[str, Ed25519PublicKey] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problem = threshold_problem(self.trusted, self.revoked, self.threshold, self.source)
        if problem is not None:
            raise KeyringError(problem)
        active = {kid: k for kid, k in self.trusted.items() if kid not in self.revoked}
        object.__setattr__(self, "_active", active)

    @property
    def active_key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._active))

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Keyring:
        """Read a keyring directory.

        Raises:
            KeyringError: the directory is missing, a key file or the revocation list or the
                configuration is malformed, or fewer usable keys than the threshold.
        """
        files = KeyringFiles.read(directory)
        return cls(files.trusted, files.revoked, files.threshold, files.source)

    def verify(self, payload: bytes, envelope: SignatureEnvelope, purpose: str) -> Verified:
        """Check that ``payload`` carries at least ``threshold`` valid signatures for ``purpose``.

        Raises:
            BadSignatureError: a signature by a trusted key does not match the payload.
            RevokedKeyError: the only trusted signatures are by revoked keys.
            UnknownKeyError: no signature is by a key this keyring knows.
            ThresholdError: valid signatures, but fewer than the threshold.
        """
        message = signed_message(purpose, payload)
        valid: list[str] = []
        revoked: list[str] = []
        unknown: list[str] = []
        for signature in envelope.signatures:
            if signature.key_id in self.revoked:
                revoked.append(signature.key_id)
                continue
            public_key = self._active.get(signature.key_id)
            if public_key is None:
                unknown.append(signature.key_id)
                continue
            problem = signature_problem(signature.value)
            if problem is not None:
                raise BadSignatureError(
                    f"signature by key {signature.key_id} is malformed: {problem}"
                )
            try:
                public_key.verify(signature.value, message)
            except InvalidSignature as err:
                raise BadSignatureError(
                    f"signature by key {signature.key_id} does not match the {purpose}: "
                    "it or the signature was altered"
                ) from err
            valid.append(signature.key_id)
        if len(valid) >= self.threshold:
            return Verified(tuple(valid))
        if not valid and revoked:
            raise RevokedKeyError(f"{purpose} is signed by revoked key(s) {', '.join(revoked)}")
        if not valid:
            raise UnknownKeyError(
                f"{purpose} is signed by key(s) {', '.join(unknown)}, none trusted by {self.source}"
            )
        raise ThresholdError(
            f"{purpose} has {len(valid)} valid signature(s) by trusted keys, "
            f"{self.source} requires {self.threshold}"
        )


def threshold_problem(
    trusted: Mapping[str, object], revoked: frozenset[str], threshold: int, source: str
) -> str | None:
    """Why a keyring with these keys and this threshold can verify nothing; None if it can."""
    if threshold < 1:
        return f"{source}: threshold must be at least 1, not {threshold}"
    active = len(set(trusted) - revoked)
    if threshold > active:
        return (
            f"{source}: threshold {threshold} but only {active} trusted key(s) that are not revoked"
        )
    return None


@dataclass(frozen=True)
class KeyringFiles:
    """What a keyring directory holds, read as it is, before the threshold rule is applied.

    ``fleet keys list`` shows it even when :meth:`problem` says the keyring verifies nothing
    (a threshold above its trusted keys, left by hand or by an older version), so the operator
    can see what to repair; verification goes through :class:`Keyring`, which refuses it.
    """

    trusted: Mapping[str, Ed25519PublicKey]
    revoked: frozenset[str]
    threshold: int
    source: str

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> KeyringFiles:
        """Read a keyring directory without judging its threshold.

        Raises:
            KeyringError: the directory is missing, or a key file or the revocation list or
                the configuration is malformed.
        """
        path = Path(directory)
        if not path.is_dir():
            raise KeyringError(f"keyring {path}: no such directory")
        return cls(
            trusted=_read_trusted(path),
            revoked=_read_revoked(path),
            threshold=_read_threshold(path),
            source=f"keyring {path}",
        )

    def problem(self) -> str | None:
        """Why this keyring verifies nothing, with the way out; None when it is usable."""
        problem = threshold_problem(self.trusted, self.revoked, self.threshold, self.source)
        if problem is None:
            return None
        active = len(set(self.trusted) - self.revoked)
        way_out = "trust another key (fleet keys trust)"
        if active >= 1:
            way_out = f"lower the threshold (fleet keys threshold {active}), or " + way_out
        return f"{problem}: it verifies nothing; {way_out}"


@contextlib.contextmanager
def _locked(path: Path, *, create: bool = False) -> Iterator[None]:
    """Hold the keyring's exclusive lock (``flock`` on ``LOCK_FILE``) for a change: the read,
    the check and the write all happen inside. The kernel releases it if the holder dies.

    With ``create``, a missing keyring directory is made first.

    Raises:
        KeyringError: the keyring is missing (without ``create``), is not a directory, or the
            lock file cannot be opened.
    """
    if path.exists() and not path.is_dir():
        raise KeyringError(f"keyring {path}: exists but is not a directory")
    if not create and not path.is_dir():
        raise KeyringError(f"keyring {path}: no such directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise KeyringError(f"keyring {path}: cannot lock it: {err.strerror or err}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(path: Path, name: str, data: bytes) -> None:
    """Replace the keyring file ``name`` atomically; an I/O failure is a KeyringError."""
    try:
        atomic_write(path / name, data)
    except OSError as err:
        raise KeyringError(f"keyring {path}: cannot write {name}: {err.strerror or err}") from err


def _read_trusted(path: Path) -> dict[str, Ed25519PublicKey]:
    trusted: dict[str, Ed25519PublicKey] = {}
    for pub in sorted(path.glob("*.pub")):
        try:
            public_key = load_public_key(pub)
        except KeyFileError as err:
            raise KeyringError(f"keyring {path}: {err}") from err
        trusted[key_id(public_key)] = public_key
    return trusted


def _read_text(path: Path, name: str) -> str | None:
    """The text of the keyring file ``name`` (UTF-8), or None when there is none. Only a
    regular file is read (:func:`fleet_core.inputs.read_regular_file`): a FIFO no process writes
    to would block every command reading the keyring.

    Raises:
        KeyringError: the file is not a regular file, cannot be read, or is not UTF-8.
    """
    try:
        return read_regular_file(path / name).decode("utf-8")
    except FileNotFoundError:
        return None
    except InputPathError as err:
        message = f"keyring {path}: cannot read {name}: not a regular file ({err.kind})"
        raise KeyringError(message) from err
    except (OSError, UnicodeDecodeError) as err:
        raise KeyringError(f"keyring {path}: cannot read {name}: {err}") from err


def _read_revoked(path: Path) -> frozenset[str]:
    text = _read_text(path, REVOKED_FILE)
    if text is None:
        return frozenset()
    revoked = set()
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not _KEY_ID.fullmatch(entry):
            raise KeyringError(
                f"keyring {path}: {REVOKED_FILE} line {number}: {entry!r} is not a key id "
                "(64 lowercase hex digits)"
            )
        revoked.add(entry)
    return frozenset(revoked)


def _read_threshold(path: Path) -> int:
    text = _read_text(path, CONFIG_FILE)
    if text is None:
        return 1
    try:
        config = tomllib.loads(text)
    except (ValueError, RecursionError) as err:  # ValueError: TOML, UTF-8, huge ints
        raise KeyringError(f"keyring {path}: cannot read {CONFIG_FILE}: {err}") from err
    unknown = unknown_names(config, {"threshold"})
    if unknown:
        noun = "setting" if len(unknown) == 1 else "settings"
        raise KeyringError(f"keyring {path}: {CONFIG_FILE}: unknown {noun} {', '.join(unknown)}")
    threshold = config.get("threshold", 1)
    if type(threshold) is not int:
        raise KeyringError(f"keyring {path}: {CONFIG_FILE}: threshold must be an integer")
    return threshold


def trust_key(directory: str | os.PathLike[str], public_key_path: str | os.PathLike[str]) -> str:
    """Add the public key at ``public_key_path`` to the keyring; returns its key id.

    The key is stored as ``<key id>.pub``. Creates the keyring directory if needed. Runs under
    the keyring's lock, so a revocation made at the same time is never undone by it.

    Raises:
        KeyFileError: the file is not an Ed25519 public key.
        KeyringError: the key is revoked in this keyring, or the keyring is not a directory
            or cannot be written.
    """
    path = Path(directory)
    public_key = load_public_key(public_key_path)
    kid = key_id(public_key)
    with _locked(path, create=True):
        if kid in _read_revoked(path):
            raise KeyringError(f"keyring {path}: key {kid} is revoked; it cannot be trusted again")
        _write(path, f"{kid}.pub", public_key_pem(public_key))
    return kid


def revoke_key(directory: str | os.PathLike[str], revoked_key_id: str) -> None:
    """Revoke ``revoked_key_id`` in the keyring; revoking twice is harmless.

    A revocation that would leave fewer trusted keys than the threshold is refused, and nothing
    is written: the keyring would verify nothing, and every later command reading it would fail.
    The way out is to lower the threshold first, or to trust another key first. A key id the
    keyring does not trust may be revoked ahead of time: that leaves every trusted key as it is.

    The list is read, checked and rewritten under the keyring's lock: of several revocations
    made at once, each is kept, or refused by the threshold rule applied to what the others
    left.

    Power cut: ``revoked.txt`` is replaced atomically, so it holds the old list or the new one.

    Raises:
        KeyringError: not a key id, the keyring directory is missing or malformed, or the
            revocation would leave fewer trusted keys than the threshold.
    """
    path = Path(directory)
    if not _KEY_ID.fullmatch(revoked_key_id):
        raise KeyringError(f"{revoked_key_id!r} is not a key id (64 lowercase hex digits)")
    with _locked(path):
        revoked = _read_revoked(path)
        if revoked_key_id in revoked:
            return
        active = set(_read_trusted(path)) - revoked
        threshold = _read_threshold(path)
        left = len(active - {revoked_key_id})
        if revoked_key_id in active and left < threshold:
            way_out = "trust another key first (fleet keys trust)"
            if left >= 1:
                way_out = f"lower the threshold first (fleet keys threshold {left}), or " + way_out
            raise KeyringError(
                f"keyring {path}: revoking {revoked_key_id} would leave {left} trusted key(s), "
                f"below the threshold {threshold}: {way_out}"
            )
        old = _read_text(path, REVOKED_FILE) or ""
        if old and not old.endswith("\n"):
            old += "\n"
        _write(path, REVOKED_FILE, (old + revoked_key_id + "\n").encode())


def set_threshold(directory: str | os.PathLike[str], threshold: int) -> None:
    """Require ``threshold`` distinct trusted signatures; checked against the keys present.

    Only the new value is checked, never the one it replaces: a keyring left with a threshold
    above its trusted keys (by hand, or by an older version) is repaired by lowering it.
    Runs under the keyring's lock, so a revocation made at the same time cannot slip under it.

    Raises:
        KeyringError: the threshold is below 1 or above the number of usable keys, or the
            keyring directory is missing or its keys or revocation list are malformed.
    """
    path = Path(directory)
    with _locked(path):
        problem = threshold_problem(
            _read_trusted(path), _read_revoked(path), threshold, f"keyring {path}"
        )
        if problem is not None:
            raise KeyringError(problem)
        _write(path, CONFIG_FILE, f"threshold = {threshold}\n".encode())
