"""The release history: what happened to each recently assigned release on this device.

``<data_dir>/releases.json``, written through :func:`fleet_core.durable.atomic_write` *before* an
install starts, so an install cut short by a crash, a kill or a power cut is counted and a
release that keeps killing the install is given up after ``MAX_INTERRUPTED`` tries.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet_core.durable import atomic_write
from updater.errors import DaemonError

RELEASES_NAME = "releases.json"
RELEASES_FORMAT = 1
MAX_RELEASES = 16
MAX_INTERRUPTED = 3  # installs of one release cut short (crash, kill, power) before giving up


OUTCOMES = ("installing", "interrupted", "download_failed", "abandoned", "armed", "failed")


@dataclass(frozen=True)
class ReleaseRecord:
    """What happened to one assigned release on this device.

    ``outcome``: ``installing`` (persisted before the install starts), ``interrupted`` (the
    process died during the install), ``download_failed`` (a blob could not be fetched: tried
    again later), ``armed`` (installed, trial boot arranged), ``failed`` (never tried again).
    """

    outcome: str
    version: str | None = None
    interrupted: int = 0
    download_failures: int = 0
    detail: str | None = None

    @classmethod
    def from_dict(cls, document: Any) -> ReleaseRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(document, dict) or set(document) - known:
            raise ValueError("release record: unexpected fields")
        record = cls(**document)
        if record.outcome not in OUTCOMES:
            raise ValueError(f"release record: unknown outcome {record.outcome!r}")
        for count in (record.interrupted, record.download_failures):
            if type(count) is not int or count < 0:
                raise ValueError("release record: counts must be non-negative integers")
        for text in (record.version, record.detail):
            if text is not None and not isinstance(text, str):
                raise ValueError("release record: version and detail must be strings")
        return record


@dataclass(frozen=True)
class ReleaseHistory:
    """Records by manifest SHA-256, oldest first, at most ``MAX_RELEASES``."""

    releases: Mapping[str, ReleaseRecord] = field(default_factory=dict)

    def get(self, sha: str) -> ReleaseRecord | None:
        return self.releases.get(sha)

    def with_record(self, sha: str, record: ReleaseRecord) -> ReleaseHistory:
        releases = {k: v for k, v in self.releases.items() if k != sha}
        releases[sha] = record
        return ReleaseHistory(dict(list(releases.items())[-MAX_RELEASES:]))

    def without(self, sha: str) -> ReleaseHistory:
        return ReleaseHistory({k: v for k, v in self.releases.items() if k != sha})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RELEASES_FORMAT,
            "releases": {k: dataclasses.asdict(v) for k, v in self.releases.items()},
        }

    @classmethod
    def from_dict(cls, document: Any) -> ReleaseHistory:
        if not isinstance(document, dict) or document.get("format") != RELEASES_FORMAT:
            raise ValueError("release history: unknown format")
        raw = document.get("releases")
        if not isinstance(raw, dict):
            raise ValueError("release history: releases must be an object")
        return cls({str(k): ReleaseRecord.from_dict(v) for k, v in raw.items()})


class ReleaseHistoryStore:
    """``<data_dir>/releases.json``. A missing or damaged file reads as an empty history:
    the state store still tells which slot holds what, and a release whose slot is bad and
    has no record is treated as failed (never retried)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / RELEASES_NAME

    def load(self) -> ReleaseHistory:
        try:
            return ReleaseHistory.from_dict(json.loads(self.path.read_bytes().decode("utf-8")))
        except (OSError, ValueError, TypeError):
            return ReleaseHistory()

    def save(self, history: ReleaseHistory) -> None:
        """Power cut: the file holds the previous history or this one.

        Raises:
            DaemonError: the data partition cannot be written.
        """
        data = json.dumps(history.to_dict(), indent=1, sort_keys=True).encode() + b"\n"
        try:
            atomic_write(self.path, data)
        except OSError as err:
            raise DaemonError(f"release history {self.path}: cannot write: {err.strerror}") from err
