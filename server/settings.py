"""The server's settings: where its state lives and how much it accepts.

Everything the server keeps is under one data directory (or, for the database, at a URL), so
that several server processes given the same settings are interchangeable::

    DATA_DIR/
      data.db          the SQLite database (WAL mode), unless --database-url names another
      blobs/           content-addressed image blobs (blobs/ab/abcdef...)
      uploads/         bundles being received; each is removed when its request ends
      keyring/         the fleet's release keyring: which keys may sign bundles (signing/)
      server-key.pem   the key the server signs assignments with (generated on first start)
      server-key.pub
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import URL

from server.errors import SettingsError
from server.scrape import Network, parse_networks

SQLITE_FILE = "data.db"  # the database in a data directory, unless another is named

DEFAULT_MAX_UPLOAD_BYTES = 8 * 1024**3
# What a device may send in one request (docs/device-protocol.md); operator JSON bodies too.
MAX_JSON_BODY_BYTES = 64 * 1024
CHALLENGE_TTL_S = 60
SESSION_TTL_S = 3600
# Operator tokens: the lifetime of one created without asking for one, and the longest allowed.
DEFAULT_OPERATOR_TOKEN_TTL_S = 90 * 86400
DEFAULT_OPERATOR_TOKEN_MAX_TTL_S = 365 * 86400
# Live sessions a device may hold; opening one more ends its oldest (server/enrollment.py).
DEFAULT_MAX_DEVICE_SESSIONS = 5
DEFAULT_ACTIVE_CHECKIN_INTERVAL_S = 15
# A check-in refreshes the device's last_seen only when the stored one is older than this:
# a 304 check-in is then a read, not a write (last_seen is kept to within this many seconds).
LAST_SEEN_RESOLUTION_S = 60

# The body rate is enforced per window of this many bytes (server/timeouts.py): an average since
# the start would let a fast first gigabyte buy days of dripping.
RATE_WINDOW_BYTES = 1024 * 1024
# A scrape token shorter than this is refused: it is compared, not looked up, so it must be
# unguessable by itself (``openssl rand -hex 32`` makes one).
MIN_METRICS_TOKEN_CHARS = 32


@dataclass(frozen=True)
class ServerLimits:
    """How long and how much a client may hold of the server, and how soon the leftovers of
    interrupted writes go (server/timeouts.py, server/upload_limit.py, server/datadir.py).

    Raises:
        SettingsError: a time that is not positive, a negative rate, or no upload allowed.
    """

    # The request line and headers must be complete this long after the server began to wait.
    header_timeout_s: float = 10.0
    # Each read of a body must arrive within this of the previous one...
    body_read_timeout_s: float = 30.0
    # ...and each mebibyte of it at this rate (bytes/s), after a read timeout of grace (0: no
    # rate rule). 1 KiB/s: an 8 GiB bundle may take days, a drip may not.
    min_body_rate_bps: int = 1024
    # Release uploads in progress at once in one process; the next is answered 503.
    max_concurrent_uploads: int = 2
    # Temporary blobs and partial uploads untouched this long are removed while running...
    leftover_age_s: float = 3600.0
    # ...and at start, when only another process sharing the data directory can be writing.
    startup_leftover_age_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_read_timeout_s", "leftover_age_s"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name} must be positive, not {getattr(self, name)}")
        if self.startup_leftover_age_s < 0 or self.min_body_rate_bps < 0:
            raise SettingsError("the start-up leftover age and the body rate cannot be negative")
        if self.max_concurrent_uploads < 1:
            raise SettingsError("at least one upload must be allowed at a time")

    @property
    def upload_idle_bound_s(self) -> float | None:
        """The longest a live upload can leave its partial file untouched, None when unbounded
        (no rate rule): the file is written at least every mebibyte received
        (server/api/common.py) and a mebibyte may straddle two rate windows."""
        if not self.min_body_rate_bps:
            return None
        return 2 * (self.body_read_timeout_s + RATE_WINDOW_BYTES / self.min_body_rate_bps)


@dataclass(frozen=True)
class CredentialLimits:
    """How long operator tokens live, and how many sessions a device holds at once."""

    # The lifetime of an operator token created without ``expires_in``, and the longest one.
    operator_token_ttl_s: int = DEFAULT_OPERATOR_TOKEN_TTL_S
    operator_token_max_ttl_s: int = DEFAULT_OPERATOR_TOKEN_MAX_TTL_S
    # Live sessions per device; opening one more ends the device's oldest.
    max_device_sessions: int = DEFAULT_MAX_DEVICE_SESSIONS

    def __post_init__(self) -> None:
        if not 1 <= self.operator_token_ttl_s <= self.operator_token_max_ttl_s:
            raise SettingsError(
                "the operator token lifetime must be at least one second and at most the "
                f"maximum ({self.operator_token_max_ttl_s} s), not {self.operator_token_ttl_s}"
            )
        if self.max_device_sessions < 1:
            raise SettingsError("a device must be allowed at least one session")


Clock = Callable[[], float]
"""Seconds since the epoch, server side; injected so tests can move time."""


def utc(clock: Clock) -> datetime:
    """The clock's current time as an aware UTC datetime."""
    return datetime.fromtimestamp(clock(), UTC)


def iso(moment: datetime) -> str:
    """The API's spelling of a time: RFC 3339, UTC, whole seconds (``2026-11-27T07:00:00Z``)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Settings:
    """Where one server keeps its state, and its limits. Build with :meth:`create`."""

    data_dir: Path
    database_url: str  # sqlite:///DATA_DIR/data.db unless another database was named
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    clock: Clock = time.time
    # While a rollout is running or paused, check-in answers ask devices to check in this
    # often (seconds), so an emergency stop or a rollback reaches them quickly.
    active_checkin_interval_s: int = DEFAULT_ACTIVE_CHECKIN_INTERVAL_S
    # Where devices may say Prometheus scrapes them (server/scrape.py); empty: no network is
    # configured, and the defaults there apply.
    metrics_networks: tuple[Network, ...] = ()
    limits: ServerLimits = ServerLimits()
    credentials: CredentialLimits = CredentialLimits()
    # The bearer token that admits a scraper to the per-device series of /metrics
    # (server/metrics.py); None: no one sees them. Never printed.
    metrics_token: str | None = field(default=None, repr=False)
    # Whether /docs, /redoc and /openapi.json are served (off: the API's map is nobody's).
    api_docs: bool = False
    # The monitoring stack the web console links to and reads alerts from (check_service_url);
    # None: not linked.
    grafana_url: str | None = None
    loki_url: str | None = None
    alertmanager_url: str | None = None

    @classmethod
    def create(
        cls,
        data_dir: str | os.PathLike[str],
        *,
        database_url: str | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        clock: Clock = time.time,
        active_checkin_interval_s: int = DEFAULT_ACTIVE_CHECKIN_INTERVAL_S,
        metrics_networks: str = "",
        limits: ServerLimits | None = None,
        credentials: CredentialLimits | None = None,
        metrics_token_file: str | os.PathLike[str] | None = None,
        api_docs: bool = False,
        grafana_url: str | None = None,
        loki_url: str | None = None,
        alertmanager_url: str | None = None,
    ) -> Settings:
        """Validate the settings; the data directory is created if needed.

        Raises:
            SettingsError: the data directory cannot be created, the database URL is neither
                SQLite nor PostgreSQL, the upload limit is not positive, or the metrics
                networks (``10.0.0.0/8,192.168.0.0/16``) are not a list of networks, or the
                metrics token file is unreadable or holds no usable token, or a monitoring URL
                is not an http or https URL (:func:`check_service_url`).
        """
        directory = Path(data_dir).absolute()
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise SettingsError(f"data directory {directory}: {err.strerror}") from err
        if database_url is None:
            # URL.create escapes what a path may hold and a URL may not ('?', '#', '%')
            database_url = URL.create(
                "sqlite", database=str(directory / SQLITE_FILE)
            ).render_as_string()
        elif not database_url.startswith(("sqlite:", "postgresql:", "postgresql+")):
            raise SettingsError(
                f"database URL {_redact(database_url)!r}: only sqlite:// and postgresql:// "
                "are supported"
            )
        if max_upload_bytes <= 0:
            raise SettingsError(f"max upload size must be positive, not {max_upload_bytes}")
        if not 1 <= active_checkin_interval_s <= 86400:
            raise SettingsError("the active check-in interval must be 1 to 86400 seconds")
        try:
            networks = parse_networks(metrics_networks)
        except ValueError as err:
            raise SettingsError(f"metrics networks: {err}") from None
        return cls(
            directory,
            database_url,
            max_upload_bytes,
            clock,
            active_checkin_interval_s,
            networks,
            limits=limits or ServerLimits(),
            credentials=credentials or CredentialLimits(),
            metrics_token=(
                read_metrics_token(Path(metrics_token_file)) if metrics_token_file else None
            ),
            api_docs=api_docs,
            grafana_url=_service_url("Grafana", grafana_url),
            loki_url=_service_url("Loki", loki_url),
            alertmanager_url=_service_url("Alertmanager", alertmanager_url),
        )

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def upload_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def keyring_dir(self) -> Path:
        return self.data_dir / "keyring"

    @property
    def server_key_path(self) -> Path:
        return self.data_dir / "server-key.pem"


def read_metrics_token(path: Path) -> str:
    """The scrape token in ``path``: its one line, without surrounding whitespace (as
    Prometheus reads its ``credentials_file``).

    Raises:
        SettingsError: the file cannot be read, or its token is too short or not one word of
            printable ASCII.
    """
    try:
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(f"metrics token file {path}: cannot be read ({err})") from None
    if len(token) < MIN_METRICS_TOKEN_CHARS or not all(33 <= ord(c) < 127 for c in token):
        raise SettingsError(
            f"metrics token file {path}: give one word of at least {MIN_METRICS_TOKEN_CHARS} "
            "printable characters (openssl rand -hex 32)"
        )
    return token


def check_service_url(url: str) -> str:
    """``url`` as the base of a monitoring service's links: an ``http`` or ``https`` URL with a
    host, without spaces, control characters, a query or a fragment, and without a trailing
    slash.

    Raises:
        ValueError: anything else (the message says what).
    """
    text = url.strip()
    if not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError("an http:// or https:// URL without spaces or control characters")
    parts = urlsplit(text)
    if parts.scheme.lower() not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"{text[:100]!r} is not an http:// or https:// URL with a host")
    if "?" in text or "#" in text or "@" in parts.netloc:  # an empty "?" or "#" too
        raise ValueError(f"{text[:100]!r}: give the base URL, without credentials, query or #")
    try:
        parts.port  # noqa: B018 (a bad port raises)
    except ValueError:
        raise ValueError(f"{text[:100]!r}: the port is not a number from 0 to 65535") from None
    return text.rstrip("/")


def _service_url(name: str, url: str | None) -> str | None:
    if url is None:
        return None
    try:
        return check_service_url(url)
    except ValueError as err:
        raise SettingsError(f"{name} URL: {err}") from None


def _redact(url: str) -> str:
    """``url`` without its password, fit for an error message."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
