"""Config drift, detected and repaired: the configuration file kept in step with the
configuration the daemon runs.

The daemon loads its configuration once, at start. When the file changes under it (a damaged
write, a failing card, a hand edit without a restart) the daemon keeps running what it loaded,
and the ``fleet_updater_config_drift`` metric says so (the ConfigDrift alert). Left alone, the
difference is a trap: the next restart or boot applies a file nobody checked, or none at all.
So once a difference has stood for ``[limits] config_repair_after_s`` (the same bytes all
along: an edit in progress restarts the count), :class:`ConfigGuard` writes the bytes the daemon
runs back into the file (atomically; a power cut leaves the old file or the repaired one) and
keeps the file it replaced as ``<data_dir>/updater.replaced.toml`` for the operator. The bytes
written back are the ones the running configuration was parsed from (the file at start, or the
last good copy the daemon fell back to), so after a repair the file, the last good copy and
what runs agree. An operator who means an edit restarts the daemon within that time; the
built-in defaults are never written into a file.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fleet_core.durable import atomic_write
from fleet_core.inputs import InputPathError, read_regular_file
from updater.config import LoadedConfig, parse_config
from updater.errors import ConfigError

REPLACED_NAME = "updater.replaced.toml"
# A configuration file is a few KiB; a larger one is damaged, and is not read to be compared
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class Drift:
    """The configuration file differs from what runs: since when (the guard's clock) and, when
    the file cannot be used at all, why (``None``: it loads, but is not what runs)."""

    since: float
    problem: str | None


@dataclass(frozen=True)
class Repair:
    """The running configuration was written back over a file that differed from it."""

    path: Path
    problem: str | None  # why the file replaced was unusable; None: an edit
    replaced: Path | None  # where the replaced bytes were kept; None: there were none
    loaded: LoadedConfig  # the configuration as loaded now: from the file, with no problem


def read_config_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the configuration file ``path``, read without blocking.

    Raises:
        OSError: it cannot be read (``FileNotFoundError``: missing).
        InputPathError: it is not a regular file.
        ValueError: it is larger than :data:`MAX_CONFIG_BYTES`.
    """
    if Path(path).stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    text = read_regular_file(path)
    if len(text) > MAX_CONFIG_BYTES:  # grown since
        raise ValueError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    return text


def file_sha256(path: str) -> str | None:
    """SHA-256 of a configuration file; None for the built-in defaults ("defaults") or a file
    that cannot be read."""
    if path == "defaults":
        return None
    try:
        return hashlib.sha256(read_config_file(path)).hexdigest()
    except (OSError, InputPathError, ValueError):
        return None


@dataclass
class ConfigGuard:
    """Compares the configuration file with the running configuration at each :meth:`check`
    and puts the running one back once they have differed for the repair time. ``clock`` is
    monotonic (the daemon's)."""

    clock: Callable[[], float] = time.monotonic
    _seen: tuple[str, float] | None = field(default=None, init=False)

    def check(self, loaded: LoadedConfig) -> Drift | Repair | None:
        """``None`` when the file holds what runs (or nothing can be compared: the defaults
        run, or no file was asked for); a :class:`Drift` while they differ; a :class:`Repair`
        once the running configuration has been written back.

        Raises:
            OSError: the repair could not be written (the file is left as it was).
        """
        if loaded.path is None or loaded.text is None:
            return None
        path = Path(loaded.path)
        problem: str | None
        try:
            current: bytes | None = read_config_file(path)
        except FileNotFoundError:
            current, problem = None, f"{path}: missing"
        except (OSError, InputPathError, ValueError) as err:
            current, problem = (
                None,
                str(err)
                if not isinstance(err, OSError)
                else (f"{path}: cannot read: {err.strerror}"),
            )
        if current == loaded.text:
            self._seen = None
            return None
        if current is not None:
            try:
                parse_config(current, str(path))
                problem = None
            except ConfigError as err:
                problem = str(err)
        key = hashlib.sha256(current).hexdigest() if current is not None else f"none:{problem}"
        now = self.clock()
        if self._seen is None or self._seen[0] != key:
            self._seen = (key, now)
        since = self._seen[1]
        repair_after_s = loaded.config.limits.config_repair_after_s
        if repair_after_s <= 0 or now - since < repair_after_s:
            return Drift(since, problem)
        replaced = self._keep_replaced(loaded, current)
        atomic_write(path, loaded.text, mode=0o600)  # it may hold an enrollment token
        self._seen = None
        now_loaded = LoadedConfig(loaded.config, str(path), (), str(path), loaded.text)
        return Repair(path, problem, replaced, now_loaded)

    @staticmethod
    def _keep_replaced(loaded: LoadedConfig, current: bytes | None) -> Path | None:
        if current is None:
            return None
        kept = loaded.config.data_dir / REPLACED_NAME
        kept.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(kept, current, mode=0o600)
        return kept
