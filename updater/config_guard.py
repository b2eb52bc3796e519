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
built-in defaults are never written into a file, and while the daemon runs on its last good
copy a usable file (an operator's fix) is left for a restart to load.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fleet_core.durable import atomic_output, atomic_write
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
    """The bytes of the configuration file ``path``, read without blocking and never more than
    :data:`MAX_CONFIG_BYTES` (and one).

    Raises:
        OSError: it cannot be read (``FileNotFoundError``: missing).
        InputPathError: it is not a regular file.
        ValueError: it is larger than :data:`MAX_CONFIG_BYTES`.
    """
    return read_regular_file(path, max_bytes=MAX_CONFIG_BYTES)


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

        While the daemon runs on its last good copy (the file was unusable at start), only a
        file still unusable is repaired: a usable one is an operator's fix, applied by a
        restart. A symbolic link at the path stays one: its target is repaired. The file is
        read once more just before the repair is put in place, and an edit saved meanwhile
        stops the repair and starts the count again.

        Raises:
            ConfigError: the repair could not be written (the file is left as it was).
        """
        if loaded.path is None or loaded.text is None:
            return None
        path = Path(loaded.path)
        current, problem = _current(path)
        if current == loaded.text:
            self._seen = None
            return None
        # unusable bytes count as one state: a card returning other garbage at each read
        # must not hold the repair off for ever
        key = "unusable" if problem is not None else hashlib.sha256(current or b"").hexdigest()
        now = self.clock()
        if self._seen is None or self._seen[0] != key:
            self._seen = (key, now)
        since = self._seen[1]
        repair_after_s = loaded.config.limits.config_repair_after_s
        on_fallback = loaded.source != loaded.path
        if repair_after_s <= 0 or now - since < repair_after_s or (on_fallback and problem is None):
            return Drift(since, problem)
        target = Path(os.path.realpath(path))
        try:
            replaced = _keep_replaced(loaded, current)
            with atomic_output(target, mode=0o600) as out:  # it may hold an enrollment token
                out.write(loaded.text)
                if _current(path)[0] != current:  # saved meanwhile: that edit is the news
                    raise _EditedMeanwhile
        except _EditedMeanwhile:
            self._seen = None
            return Drift(now, None)
        except OSError as err:
            raise ConfigError(f"{path}: cannot write the repair: {err.strerror}") from None
        self._seen = None
        # problems of the bytes themselves (a backend that cannot be built) stay; those of
        # the unusable file the daemon fell back from are gone with it
        problems = () if on_fallback else loaded.problems
        repaired = LoadedConfig(loaded.config, str(path), problems, str(path), loaded.text)
        return Repair(path, problem, replaced, repaired)


class _EditedMeanwhile(Exception):
    """The file changed between the check and the repair."""


def _current(path: Path) -> tuple[bytes | None, str | None]:
    """The file's bytes (None: none could be read) and why it cannot be used (None: it can)."""
    try:
        current = read_config_file(path)
    except FileNotFoundError:
        return None, f"{path}: missing"
    except OSError as err:
        return None, f"{path}: cannot read: {err.strerror}"
    except (InputPathError, ValueError) as err:
        return None, str(err)
    try:
        parse_config(current, str(path))
    except ConfigError as err:
        return current, str(err)
    return current, None


def _keep_replaced(loaded: LoadedConfig, current: bytes | None) -> Path | None:
    """Keep ``current`` as ``updater.replaced.toml`` (not written again when it holds it)."""
    if current is None:
        return None
    kept = loaded.config.data_dir / REPLACED_NAME
    with contextlib.suppress(OSError, InputPathError, ValueError):
        if read_config_file(kept) == current:
            return kept
    kept.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(kept, current, mode=0o600)
    return kept
