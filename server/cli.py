"""``fleet server``, ``fleet release``, ``fleet device``, ``fleet audit``: the operator commands.

``fleet server ...`` runs on the server's host and works on its data directory or database
directly (running the server, creating the first admin token). The other groups talk to a
running server over HTTP (see ``server/client.py`` for where the URL and token come from).
``fleet server enrollment-token create`` and ``fleet audit verify`` do either: directly with
``--data-dir``/``--database-url``, over HTTP otherwise.

The web stack (FastAPI, SQLAlchemy, uvicorn) and requests are imported inside the commands, so
loading this module costs nothing but click.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import math
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from fleet_core.text import check_text, printable
from server.errors import AuditChainBrokenError, ClientConfigError

if TYPE_CHECKING:
    from server.audit import AuditEntry
    from server.client import ApiClient
    from server.database import Database
    from signing.keys import SigningKey

F = TypeVar("F", bound=Callable[..., Any])
DATABASE_URL_ENV = "FLEET_DATABASE_URL"
METRICS_NETWORKS_ENV = "FLEET_METRICS_NETWORKS"
CA_FILE_META = "fleet.ca_file"  # --ca-file, kept in the click context for api_client
_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in ``3600``, ``90s``, ``15m``, ``12h`` or ``7d``.

    Raises:
        click.BadParameter: anything else, or zero.
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise click.BadParameter(f"{text!r}: give a positive number of seconds, or 15m, 12h, 7d")
    return int(match.group(1)) * _UNITS[match.group(2)]


def cli_actor() -> str:
    """How the audit trail names someone acting on the database directly."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"[:160]  # the audit trail's actor column


def database_options(function: F) -> F:
    function = click.option(
        "--database-url",
        envvar=DATABASE_URL_ENV,
        help=f"PostgreSQL URL (or set ${DATABASE_URL_ENV}); default: SQLite in the data dir.",
    )(function)
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="The server's data directory.",
    )(function)


def api_options(function: F) -> F:
    function = click.option(
        "--ca-file",
        type=click.Path(dir_okay=False, path_type=Path),
        expose_value=False,
        callback=_keep_ca_file,
        help="CA certificates that verify an https:// server (or $FLEET_CA_FILE; default: the "
        "system's store).",
    )(function)
    function = click.option("--token", help="Operator token (or $FLEET_TOKEN).")(function)
    return click.option("--server", help="Server URL (or $FLEET_SERVER).")(function)


def _keep_ca_file(context: click.Context, _param: click.Parameter, value: Path | None) -> None:
    # kept aside rather than passed: every API command would otherwise take one more argument
    context.meta[CA_FILE_META] = value


def open_database(data_dir: Path | None, database_url: str | None) -> Database:
    """The server's database, migrated to the newest schema.

    Raises:
        ClientConfigError: neither a data directory nor a database URL.
    """
    from server.database import Database
    from server.settings import Settings

    if data_dir is not None:
        url = Settings.create(data_dir, database_url=database_url).database_url
    elif database_url is not None:
        url = database_url
    else:
        raise ClientConfigError("give --data-dir or --database-url")
    db = Database(url)
    db.migrate()
    return db


def api_client(server: str | None, token: str | None) -> ApiClient:
    from server.client import ApiClient, ClientConfig

    context = click.get_current_context(silent=True)
    ca_file = None if context is None else context.meta.get(CA_FILE_META)
    return ApiClient(ClientConfig.resolve(server, token, ca_file=ca_file))


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def show(*lines: str, err: bool = False) -> None:
    """Print lines that hold stored text, each escaped (fleet_core/text.py), so a string a
    device or an older server stored cannot steer the terminal or forge a line."""
    click.echo("\n".join(printable(line) for line in lines), err=err)


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    rows = [[printable(str(cell)) for cell in row] for row in rows]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )


# --- fleet server -----------------------------------------------------------------------------


@click.group()
def server() -> None:
    """The release server: run it, and create its tokens."""


@server.command()
@database_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--fd",
    type=click.IntRange(min=0),
    default=None,
    help="Serve on this inherited TCP socket, already bound, instead of binding --host and "
    "--port: whoever starts the server (socket activation, the tests) holds the address "
    "before the server runs, so no other process can take it in between.",
)
@click.option(
    "--max-upload-bytes",
    type=click.IntRange(min=1),
    default=None,
    help="Largest bundle accepted (default 8 GiB).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
@click.option(
    "--log-format",
    default="json",
    show_default=True,
    type=click.Choice(["json", "text"]),
    help="json: one JSON object per line, for Loki (server/logs.py); text: for a terminal.",
)
@click.option(
    "--time-scale",
    type=click.FloatRange(min=1.0),
    default=1.0,
    show_default=True,
    help="Run the server's clock this many times faster (labs and demos: soaks in seconds).",
)
@click.option(
    "--rollout-interval",
    type=click.FloatRange(min=0.05),
    default=5.0,
    show_default=True,
    help="Real seconds between evaluations of the rollouts.",
)
@click.option(
    "--active-checkin-interval",
    type=click.IntRange(1, 86400),
    default=15,
    show_default=True,
    help="Seconds between device check-ins asked for while a rollout is running or paused.",
)
@click.option(
    "--metrics-networks",
    envvar=METRICS_NETWORKS_ENV,
    default="",
    help="Networks where devices may say Prometheus scrapes them, such as 10.0.0.0/8,"
    f"192.168.0.0/16 (or set ${METRICS_NETWORKS_ENV}). Then host names are refused. Default: "
    "any address but loopback, link-local, multicast and cloud metadata ones, or a host name.",
)
@click.option(
    "--metrics-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File holding the bearer token Prometheus scrapes /metrics with (its credentials_file); "
    "only with it are the per-device series served. Default: fleet-wide series only.",
)
@click.option(
    "--api-docs",
    is_flag=True,
    help="Serve the API's documentation (/docs, /redoc, /openapi.json). Default: off.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds a client has to send a request's line and headers; then 408, connection closed.",
)
@click.option(
    "--body-read-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds a client may pause while sending a request body; then 408.",
)
@click.option(
    "--min-body-rate",
    type=click.IntRange(min=0),
    default=1024,
    show_default=True,
    help="Bytes per second a request body must average after the first read timeout (0: any).",
)
@click.option(
    "--max-concurrent-uploads",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Release uploads in progress at once; the next is answered 503 with Retry-After.",
)
@click.option(
    "--leftover-age",
    type=click.FloatRange(min=0, min_open=True),
    default=3600.0,
    show_default=True,
    help="Seconds after its last write that a temporary blob or a partial upload left by an "
    "interrupted request is removed.",
)
@click.option(
    "--startup-leftover-age",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="The same, at start (short: only another process sharing the data directory can be "
    "writing then; 0 when none does).",
)
@click.option(
    "--operator-token-ttl",
    default="90d",
    show_default=True,
    help="Lifetime of an operator token created without expires_in: seconds, or 12h, 30d.",
)
@click.option(
    "--operator-token-max-ttl",
    default="365d",
    show_default=True,
    help="The longest lifetime an operator token may be given.",
)
@click.option(
    "--max-device-sessions",
    type=click.IntRange(1, 1000),
    default=5,
    show_default=True,
    help="Live sessions per device; opening one more ends the device's oldest.",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Serve HTTPS with this PEM certificate (chain first to last); needs --tls-key. "
    "See docs/tls.md.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The certificate's PEM private key (unencrypted; readable by the server only).",
)
@click.option(
    "--forwarded-allow-ips",
    default="",
    help="Addresses or networks of reverse proxies whose X-Forwarded-For and X-Forwarded-Proto "
    "are believed, such as 10.0.0.5,192.168.1.0/24. Default: none, no peer's.",
)
def run(
    data_dir: Path | None,
    database_url: str | None,
    host: str,
    port: int,
    fd: int | None,
    max_upload_bytes: int | None,
    log_level: str,
    log_format: str,
    time_scale: float,
    rollout_interval: float,
    active_checkin_interval: int,
    metrics_networks: str,
    metrics_token_file: Path | None,
    api_docs: bool,
    header_timeout: float,
    body_read_timeout: float,
    min_body_rate: int,
    max_concurrent_uploads: int,
    leftover_age: float,
    startup_leftover_age: float,
    operator_token_ttl: str,
    operator_token_max_ttl: str,
    max_device_sessions: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    forwarded_allow_ips: str,
) -> None:
    """Serve the API, the blobs and the metrics (runs until stopped). Logs go to standard
    error, one JSON object per line unless --log-format text (see server/logs.py)."""
    from server.transport import TransportSettings

    # checked first: a bad certificate or key is one error line, and nothing listens
    transport = TransportSettings.create(tls_cert, tls_key, forwarded_allow_ips)
    listener = None if fd is None else inherited_socket(fd)
    import uvicorn

    from server import logs
    from server.app import create_app
    from server.settings import (
        DEFAULT_MAX_UPLOAD_BYTES,
        CredentialLimits,
        ServerLimits,
        Settings,
    )
    from server.timeouts import uvicorn_http_protocol

    if data_dir is None:
        raise ClientConfigError("give --data-dir (blobs, keys and keyring live there)")
    logs.configure(log_level, log_format)
    os.umask(0o077)  # everything the server creates is its own (server/datadir.py)
    limits = ServerLimits(
        header_timeout_s=header_timeout,
        body_read_timeout_s=body_read_timeout,
        min_body_rate_bps=min_body_rate,
        max_concurrent_uploads=max_concurrent_uploads,
        leftover_age_s=leftover_age,
        startup_leftover_age_s=startup_leftover_age,
    )
    started = time.time()

    def clock() -> float:
        return started + (time.time() - started) * time_scale

    settings = Settings.create(
        data_dir,
        database_url=database_url,
        max_upload_bytes=max_upload_bytes or DEFAULT_MAX_UPLOAD_BYTES,
        clock=clock,
        active_checkin_interval_s=active_checkin_interval,
        metrics_networks=metrics_networks,
        metrics_token_file=metrics_token_file,
        api_docs=api_docs,
        limits=limits,
        credentials=CredentialLimits(
            operator_token_ttl_s=parse_duration(operator_token_ttl),
            operator_token_max_ttl_s=parse_duration(operator_token_max_ttl),
            max_device_sessions=max_device_sessions,
        ),
    )
    app = create_app(settings, rollout_interval_s=rollout_interval)
    # logging is configured above, once, for uvicorn's loggers too (log_config=None keeps
    # uvicorn's own colourful handlers out); its access log gives way to ours, which names
    # the route template rather than the path a client sent
    options: dict[str, Any] = {"log_level": log_level, "log_config": None, "access_log": False}
    # uvicorn has no deadline for a request's headers (its keep-alive timeout is cancelled by
    # every byte): the protocol class adds one (server/timeouts.py)
    options["http"] = uvicorn_http_protocol(header_timeout)
    # TLS, and whose proxy headers are believed (by default no peer's: uvicorn's own default
    # trusts loopback, and a local process could then forge the logged client address)
    options.update(transport.uvicorn_options())
    if listener is None:
        uvicorn.run(logs.AccessLogMiddleware(app), host=host, port=port, **options)
        return
    # uvicorn's own --fd takes any descriptor for a Unix socket; the socket's own family
    # (socket(fileno=...) reads it) keeps TCP sockets TCP
    served = uvicorn.Server(uvicorn.Config(logs.AccessLogMiddleware(app), **options))
    served.run(sockets=[listener])
    if not served.started:
        sys.exit(3)  # what uvicorn.run exits with when the server did not start


def inherited_socket(fd: int) -> socket.socket:
    """The TCP socket behind ``--fd``, checked before anything starts, so a wrong number is one
    usage error (exit 2) naming it, and --host/--port cannot silently name another address.

    Raises:
        click.UsageError: --host or --port given too.
        click.BadParameter: not an open TCP socket bound to an address.
    """
    context = click.get_current_context()
    for name in ("host", "port"):
        if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f"--fd serves on an inherited socket: leave out --{name}")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise click.BadParameter(
            f"{fd}: not an open socket ({err.strerror})", param_hint="--fd"
        ) from None
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        sock.detach()
        raise click.BadParameter(f"{fd}: not a TCP socket", param_hint="--fd")
    if sock.getsockname()[1] == 0:
        sock.detach()
        raise click.BadParameter(f"{fd}: a TCP socket bound to no port", param_hint="--fd")
    return sock


@server.group()
def token() -> None:
    """Operator tokens."""


@token.command("create")
@click.option(
    "--role",
    required=True,
    type=click.Choice(["viewer", "operator", "admin"]),
    help="What it may do.",
)
@click.option("--name", required=True, help="Whose token it is (shown in the audit trail).")
@click.option(
    "--expires-in",
    help="Lifetime: seconds, or 15m, 12h, 30d (default 90d, at most 365d).",
)
@database_options
def token_create(
    role: str, name: str, expires_in: str | None, data_dir: Path | None, database_url: str | None
) -> None:
    """Create an operator token and print it (only this once; the server keeps its hash).

    This is the way in when no admin token is left: it works on the database directly."""
    from server.auth import Role, create_operator_token, operator_token_expiry
    from server.errors import InvalidRequestError
    from server.settings import DEFAULT_OPERATOR_TOKEN_MAX_TTL_S, DEFAULT_OPERATOR_TOKEN_TTL_S

    now = _now()
    seconds = parse_duration(expires_in) if expires_in is not None else None
    try:
        expires = operator_token_expiry(
            now,
            seconds,
            default_s=DEFAULT_OPERATOR_TOKEN_TTL_S,
            max_s=DEFAULT_OPERATOR_TOKEN_MAX_TTL_S,
        )
    except InvalidRequestError as err:
        raise click.BadParameter(err.detail, param_hint="--expires-in") from None

    try:
        check_text(name)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--name") from None
    if not 1 <= len(name) <= 128:
        raise click.BadParameter("1 to 128 characters", param_hint="--name")
    db = open_database(data_dir, database_url)
    secret = create_operator_token(
        db, name=name, role=Role.parse(role), created_by=cli_actor(), now=now, expires=expires
    )
    click.echo(secret)
    show(f"operator token for {name!r}, role {role}; it is not shown again", err=True)


def _direct(data_dir: Path | None, database_url: str | None) -> bool:
    return data_dir is not None or database_url is not None


@token.command("list")
@database_options
@api_options
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
def token_list(
    data_dir: Path | None,
    database_url: str | None,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """List the operator tokens (never their secrets): admins only over the API."""
    if _direct(data_dir, database_url):
        from server.auth import list_operator_tokens

        tokens = list_operator_tokens(open_database(data_dir, database_url), _now())
    else:
        tokens = api_client(server, token).get("/api/v1/operator-tokens")["operator_tokens"]
    if as_json:
        click.echo(json.dumps(tokens, indent=2, ensure_ascii=True))
        return
    rows = [
        (
            str(t["id"]),
            t["name"],
            t["role"],
            t["status"],
            t["expires"] or "never",
            t["created"],
            t["created_by"],
        )
        for t in tokens
    ]
    _table(rows, ("ID", "NAME", "ROLE", "STATUS", "EXPIRES", "CREATED", "CREATED BY"))


@token.command("revoke")
@click.argument("token_id", type=click.IntRange(1, 2**31 - 1))
@database_options
@api_options
def token_revoke(
    token_id: int,
    data_dir: Path | None,
    database_url: str | None,
    server: str | None,
    token: str | None,
) -> None:
    """Revoke operator token TOKEN_ID (see 'list') at once; the last valid admin token stays."""
    if _direct(data_dir, database_url):
        from server.auth import revoke_operator_token

        revoke_operator_token(
            open_database(data_dir, database_url), token_id, actor=cli_actor(), now=_now()
        )
    else:
        api_client(server, token).post(f"/api/v1/operator-tokens/{token_id}/revoke", {})
    click.echo(f"operator token {token_id} revoked")


@server.group("enrollment-token")
def enrollment_token() -> None:
    """Tokens that admit new devices."""


@enrollment_token.command("create")
@click.option("--uses", required=True, type=click.IntRange(1, 1_000_000), help="Devices it admits.")
@click.option("--expires-in", help="Lifetime: seconds, or 15m, 12h, 7d (default: no expiry).")
@database_options
@api_options
def enrollment_token_create(
    uses: int,
    expires_in: str | None,
    data_dir: Path | None,
    database_url: str | None,
    server: str | None,
    token: str | None,
) -> None:
    """Create an enrollment token and print it (only this once)."""
    seconds = parse_duration(expires_in) if expires_in is not None else None
    if data_dir is not None or database_url is not None:
        from server.enrollment import create_enrollment_token

        db = open_database(data_dir, database_url)
        created = create_enrollment_token(
            db, uses=uses, expires_in_s=seconds, actor=cli_actor(), now=_now()
        )
        secret = created.token
        expires = created.expires.strftime("%Y-%m-%dT%H:%M:%SZ") if created.expires else None
    else:
        answer = api_client(server, token).post(
            "/api/v1/enrollment-tokens", {"uses": uses, "expires_in": seconds}
        )
        secret, expires = answer["token"], answer["expires"]
    show(secret)
    show(
        f"admits {uses} device(s), {f'expires {expires}' if expires else 'never expires'}",
        err=True,
    )


@enrollment_token.command("list")
@database_options
@api_options
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
def enrollment_token_list(
    data_dir: Path | None,
    database_url: str | None,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """List the enrollment tokens (never their secrets)."""
    if _direct(data_dir, database_url):
        from server.enrollment import list_enrollment_tokens

        tokens = list_enrollment_tokens(open_database(data_dir, database_url))
    else:
        tokens = api_client(server, token).get("/api/v1/enrollment-tokens")["enrollment_tokens"]
    if as_json:
        click.echo(json.dumps(tokens, indent=2, ensure_ascii=True))
        return
    rows = [
        (
            str(t["id"]),
            str(t["uses_left"]),
            t["expires"] or "never",
            "revoked " + t["revoked"] if t["revoked"] else "-",
            t["created"],
            t["created_by"],
        )
        for t in tokens
    ]
    _table(rows, ("ID", "USES LEFT", "EXPIRES", "REVOKED", "CREATED", "CREATED BY"))


@enrollment_token.command("revoke")
@click.argument("token_id", type=click.IntRange(1, 2**31 - 1))
@database_options
@api_options
def enrollment_token_revoke(
    token_id: int,
    data_dir: Path | None,
    database_url: str | None,
    server: str | None,
    token: str | None,
) -> None:
    """Revoke enrollment token TOKEN_ID (see 'list') at once: it admits no more devices."""
    if _direct(data_dir, database_url):
        from server.enrollment import revoke_enrollment_token

        revoke_enrollment_token(
            open_database(data_dir, database_url), token_id, actor=cli_actor(), now=_now()
        )
    else:
        api_client(server, token).post(f"/api/v1/enrollment-tokens/{token_id}/revoke", {})
    click.echo(f"enrollment token {token_id} revoked")


# --- fleet release ----------------------------------------------------------------------------


@click.group()
def release() -> None:
    """Releases on the server."""


@release.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@api_options
def upload(bundle: Path, server: str | None, token: str | None) -> None:
    """Upload BUNDLE; the server verifies it against the fleet's release keyring."""
    client = api_client(server, token)
    size = bundle.stat().st_size
    if sys.stderr.isatty():
        with click.progressbar(
            length=size, label=f"uploading {bundle.name}", file=sys.stderr
        ) as bar:
            answer = client.upload("/api/v1/releases", bundle, bar.update)
    else:
        answer = client.upload("/api/v1/releases", bundle, lambda _n: None)
    show(
        f"release {answer['version']} accepted: compatible {answer['compatible']}, security "
        f"version {answer['security_version']}, {len(answer['images'])} image(s)"
    )


@release.command("list")
@api_options
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
def release_list(server: str | None, token: str | None, as_json: bool) -> None:
    """List the releases."""
    releases = api_client(server, token).get("/api/v1/releases")["releases"]
    if as_json:
        click.echo(json.dumps(releases, indent=2, ensure_ascii=True))
        return
    rows = [
        (
            r["version"],
            r["compatible"],
            str(r["security_version"]),
            r["created"],
            ",".join(i["slot_class"] for i in r["images"]),
        )
        for r in releases
    ]
    _table(rows, ("VERSION", "COMPATIBLE", "SECURITY", "UPLOADED", "IMAGES"))


# --- fleet device -----------------------------------------------------------------------------


@click.group()
def device() -> None:
    """Devices enrolled with the server."""


@device.command("list")
@api_options
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
def device_list(server: str | None, token: str | None, as_json: bool) -> None:
    """List the devices: last seen, running version, state, assigned version."""
    devices = api_client(server, token).get("/api/v1/devices")["devices"]
    if as_json:
        click.echo(json.dumps(devices, indent=2, ensure_ascii=True))
        return
    rows = [
        (
            d["id"],
            d["hostname"],
            d["compatible"],
            d["version"] or "-",
            d["state"],
            d["assigned_version"] or "-",
            d["last_seen"],
            d["status"],
        )
        for d in devices
    ]
    _table(
        rows,
        ("DEVICE", "HOSTNAME", "COMPATIBLE", "VERSION", "STATE", "ASSIGNED", "LAST SEEN", "STATUS"),
    )


@device.command()
@click.argument("device_id")
@click.argument("version")
@api_options
def assign(device_id: str, version: str, server: str | None, token: str | None) -> None:
    """Assign release VERSION to DEVICE_ID ('none' removes the assignment)."""
    target = None if version == "none" else version
    answer = api_client(server, token).post(
        f"/api/v1/devices/{device_id}/assignment", {"version": target}
    )
    show(f"device {answer['id']}: assigned {answer['assigned_version'] or 'nothing'}")


def _status_command(change: str, help_text: str, *, reason_required: bool) -> None:
    @device.command(change, help=help_text)
    @click.argument("device_id")
    @click.option("--reason", required=reason_required, help="Why (kept in the audit trail).")
    @api_options
    def command(device_id: str, reason: str | None, server: str | None, token: str | None) -> None:
        body = {} if reason is None else {"reason": reason}
        answer = api_client(server, token).post(f"/api/v1/devices/{device_id}/{change}", body)
        click.echo(f"device {answer['id']}: {answer['status']}")


_status_command(
    "decommission",
    "Decommission DEVICE_ID: its sessions end and its key is refused (check-ins, sessions, "
    "enrollment) until 'reinstate'.",
    reason_required=True,
)
_status_command(
    "reinstate",
    "Let decommissioned DEVICE_ID open sessions and check in with its key again.",
    reason_required=False,
)
_status_command(
    "quarantine",
    "Quarantine DEVICE_ID: it checks in and reports, is assigned nothing, and rollouts skip it.",
    reason_required=True,
)
_status_command(
    "release",
    "End the quarantine of DEVICE_ID: its assignment applies again.",
    reason_required=False,
)


def public_key_hex(argument: str) -> str:
    """A device public key given as 64 hex digits, or a file holding hex or a PEM key.

    Raises:
        ClientConfigError: neither.
    """
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from signing.errors import KeyFileError
    from signing.keys import load_public_key

    if re.fullmatch(r"[0-9a-fA-F]{64}", argument):
        return argument.lower()
    path = Path(argument)
    if not path.is_file():
        raise ClientConfigError(f"{argument}: neither 64 hex digits nor a key file")
    text = path.read_bytes().strip()
    if re.fullmatch(rb"[0-9a-fA-F]{64}", text):
        return text.decode().lower()
    try:
        key = load_public_key(path)
    except KeyFileError as err:
        raise ClientConfigError(str(err)) from err
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


@device.command()
@click.argument("public_key")
@api_options
def preauthorize(public_key: str, server: str | None, token: str | None) -> None:
    """Let the device with PUBLIC_KEY (hex, or a .pub/.pem/hex file) enroll without a token."""
    answer = api_client(server, token).post(
        "/api/v1/preauthorized-keys", {"public_key": public_key_hex(public_key)}
    )
    show(answer["device_id"])


# --- fleet audit ------------------------------------------------------------------------------


@click.group()
def audit() -> None:
    """The audit trail of operator actions and device events."""


def _api_entries(client: ApiClient) -> Iterator[AuditEntry]:
    from server.audit import AuditEntry

    after: int | None = 0
    while after is not None:
        page = client.get("/api/v1/audit", params={"after": after, "limit": 1000})
        for document in page["entries"]:
            try:
                yield AuditEntry.from_dict(document)
            except ValueError as err:
                raise AuditChainBrokenError(f"audit trail: {err}") from err
        after = page["next_after"]


@audit.command("list")
@api_options
@click.option("--action", "actions", multiple=True,
              help="Only entries whose action is this or starts with it followed by a dot "
                   "(rollout, rollout.halted; repeat for more).")  # fmt: skip
@click.option("--subject", help="Only entries about this device id or rollout:ID.")
@click.option("--actor", help="Only entries by this actor (device:ID, rollout-engine, ...).")
@click.option("--last", default=50, show_default=True, type=click.IntRange(1, 1_000_000),
              help="How many of the newest matching entries to show.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit_list(
    actions: tuple[str, ...],
    subject: str | None,
    actor: str | None,
    last: int,
    as_json: bool,
    server: str | None,
    token: str | None,
) -> None:
    """The newest entries of the audit trail, oldest first, filtered."""
    from collections import deque

    def wanted(entry: AuditEntry) -> bool:
        by_action = not actions or any(
            entry.action == a or entry.action.startswith(a + ".") for a in actions
        )
        by_subject = subject is None or entry.subject == subject
        return by_action and by_subject and (actor is None or entry.actor == actor)

    kept = deque((e for e in _api_entries(api_client(server, token)) if wanted(e)), maxlen=last)
    for entry in kept:
        if as_json:
            document = dataclasses.asdict(entry)
            document["details"] = json.loads(entry.details)
            # ASCII: a raw U+2028 in a JSON string is valid JSON and a line break to a reader
            click.echo(json.dumps(document, sort_keys=True, ensure_ascii=True))
        else:
            show(
                f"{entry.seq:>7} {entry.at} {entry.actor} {entry.action}"
                + (f" {entry.subject}" if entry.subject else "")
                + f" {entry.details}"
            )
    if not kept:
        click.echo("no matching entries", err=True)


def _parse_head(text: str) -> tuple[int, str]:
    match = re.fullmatch(r"(\d+):([0-9a-f]{64})", text.strip())
    if match is None:
        raise click.BadParameter(
            "give SEQ:HASH as printed by an earlier verify, or a file written by "
            "'fleet audit head --out'",
            param_hint="--expect-head",
        )
    return int(match.group(1)), match.group(2)


def _server_signing_key(data_dir: Path | None) -> SigningKey:
    """The server key in ``data_dir`` (the audit heads are signed with it).

    Raises:
        ClientConfigError: no data directory given.
        KeyFileError: the key is missing or unusable.
    """
    from server.settings import Settings
    from signing.keys import load_private_key

    if data_dir is None:
        raise ClientConfigError("the server key is in the data directory: give --data-dir")
    return load_private_key(Settings.create(data_dir).server_key_path)


@audit.command()
@database_options
@api_options
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the signed head here (keep it off the server) instead of printing it.",
)
def head(
    data_dir: Path | None,
    database_url: str | None,
    server: str | None,
    token: str | None,
    out: Path | None,
) -> None:
    """Sign the audit trail's head with the server key and export it, for a later
    'fleet audit verify --expect-head FILE' to check that nothing at or below it changed."""
    from server.anchor import SignedHead, anchor_head

    if data_dir is not None or database_url is not None:
        key = _server_signing_key(data_dir)
        signed = anchor_head(open_database(data_dir, database_url), key, _now())
        document = None if signed is None else signed.to_dict()
    else:
        document = api_client(server, token).get("/api/v1/audit/head")["head"]
        if document is not None:
            SignedHead.from_dict(document)  # refuse to store what is not a signed head
    if document is None:
        raise AuditChainBrokenError("the audit trail is empty: there is no head to sign")
    text = json.dumps(document, indent=1, sort_keys=True) + "\n"
    if out is None:
        click.echo(text, nl=False)
        return
    from fleet_core.durable import atomic_write

    atomic_write(out, text.encode())
    click.echo(f"signed head {document['seq']}:{document['hash']} written to {out}", err=True)


@audit.command()
@database_options
@api_options
@click.option(
    "--expect-head",
    help="A file written by 'fleet audit head --out' (its signature is checked), or SEQ:HASH "
    "printed by an earlier verify: also catches entries removed from the end.",
)
@click.option(
    "--server-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The server's public key, to check signed heads (default with --data-dir: its key).",
)
def verify(
    data_dir: Path | None,
    database_url: str | None,
    server: str | None,
    token: str | None,
    expect_head: str | None,
    server_key: Path | None,
) -> None:
    """Walk the hash chain and check the signed heads; name the first changed or removed
    entry (exit 1 if any)."""
    from server.anchor import SignedHead, check_anchors, read_head_file, stored_anchors
    from server.audit import all_entries, verify_chain
    from signing.keys import load_public_key

    direct = data_dir is not None or database_url is not None
    if server_key is not None:
        public_key = load_public_key(server_key)
    elif data_dir is not None:
        public_key = _server_signing_key(data_dir).public_key
    else:
        public_key = None
    exported: SignedHead | None = None
    recorded: tuple[int, str] | None = None
    if expect_head is not None and Path(expect_head).is_file():
        exported = read_head_file(Path(expect_head))
    elif expect_head is not None:
        recorded = _parse_head(expect_head)
    if exported is not None and public_key is None:
        raise ClientConfigError("checking a signed head needs the server key: give --server-key")
    if direct:
        db = open_database(data_dir, database_url)
        chain, anchors = all_entries(db), stored_anchors(db)
    else:
        client = api_client(server, token)
        anchors = [SignedHead.from_dict(a) for a in client.get("/api/v1/audit/anchors")["anchors"]]
        chain = _api_entries(client)
    anchored: dict[int, str] = {}
    if public_key is not None:
        anchored, problem = check_anchors([*anchors, *filter(None, [exported])], public_key)
        if problem is not None:
            raise AuditChainBrokenError(f"audit trail broken: {problem}")
    report = verify_chain(chain, expect_head=recorded, anchored=anchored)
    if not report.intact:
        raise AuditChainBrokenError(
            f"audit trail broken: {report.problem} ({report.checked} entries before it hold)"
        )
    click.echo(
        f"audit trail intact: {report.checked} entries; head {report.head_seq}:{report.head_hash}"
    )
    if anchored:
        click.echo(f"signed heads: {len(anchored)} hold")
    elif anchors and public_key is None:
        click.echo(f"{len(anchors)} signed head(s) not checked: give --server-key", err=True)


# --- fleet rollout, fleet emergency-stop ------------------------------------------------------


def parse_percent(text: str) -> float:
    """A fraction from ``5%``, ``0.05`` or ``5`` (a number above 1 is a percentage).

    Raises:
        click.BadParameter: not a number from 0 to below 100 %.
    """
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give a percentage such as 5%") from None
    fraction = value / 100 if text.strip().endswith("%") or value > 1 else value
    if not 0 <= fraction < 1:
        raise click.BadParameter(f"{text!r}: give a percentage from 0 to below 100%")
    return fraction


def parse_stages(text: str) -> list[int]:
    """``5,25,100`` as a list of percentages.

    Raises:
        click.BadParameter: anything else.
    """
    try:
        return [int(part.strip().removesuffix("%")) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give percentages such as 5,25,100") from None


@click.group()
def rollout() -> None:
    """Staged rollouts of a release: canaries first, then growing shares of the fleet."""


def _print_rollout(r: dict[str, Any]) -> None:
    counts = r["counts"]
    show(
        f"rollout {r['id']}: {r['version']} {r['state']} at stage {r['stage_name']} "
        f"({' > '.join(r['stages'])}); {counts['succeeded']} succeeded, {counts['pending']} "
        f"pending, {counts['failed']} failed" + (f"; {r['reason']}" if r["reason"] else "")
    )


def parse_selector(selectors: Sequence[str]) -> dict[str, Any] | None:
    """``role=camera`` and ``tag=north`` (repeatable) as the API's selector.

    Raises:
        click.BadParameter: another key, a second role, or an empty value.
    """
    role: str | None = None
    tags: list[str] = []
    for item in selectors:
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not value or key not in ("role", "tag", "tags"):
            raise click.BadParameter(
                f"{item!r}: give role=NAME or tag=NAME", param_hint="--selector"
            )
        if key == "role":
            if role is not None and role != value:
                raise click.BadParameter("give one role", param_hint="--selector")
            role = value
        else:
            tags += [t.strip() for t in value.split(",") if t.strip()]
    return {"role": role, "tags": tags} if role or tags else None


BAR_WIDTH = 24


def _bar(done: int, failed: int, expected: int) -> str:
    """``[####xx......]``: succeeded (#) and failed (x) devices of the stage's cohort."""
    if expected <= 0:
        return "[" + " " * BAR_WIDTH + "]"
    good = round(BAR_WIDTH * done / expected)
    bad = min(BAR_WIDTH - good, math.ceil(BAR_WIDTH * failed / expected))
    return "[" + "#" * good + "x" * bad + "." * (BAR_WIDTH - good - bad) + "]"


def render_rollout(r: dict[str, Any]) -> list[str]:
    """A rollout for a terminal: a line, a progress bar per stage, and the failure rule."""
    lines = [
        f"rollout {r['id']}: {r['version']} {r['state'].upper()} at stage {r['stage_name']}"
        f" (soak {r['soak_s']} s per stage)" + (f": {r['reason']}" if r["reason"] else "")
    ]
    selector = r.get("selector")
    if selector:
        wanted = ([f"role={selector['role']}"] if selector.get("role") else []) + [
            f"tag={t}" for t in selector.get("tags", [])
        ]
        lines.append(f"  selector: {' '.join(wanted)}")
    width = max(len(s["name"]) for s in r["stage_progress"])
    for index, stage in enumerate(r["stage_progress"]):
        marker = ">" if index == r["stage"] and r["state"] in ("running", "paused") else " "
        bar = _bar(stage["succeeded"], stage["failed"], stage["expected"])
        lines.append(
            f"{marker} {stage['name']:<{width}} {bar}"
            f" {stage['succeeded']}/{stage['expected']} ok, {stage['failed']} failed, "
            f"{stage['pending']} pending"
        )
    rule = r["failure_rule"]
    lines.append(
        f"  failure rule: {rule['text']}; now {rule['failed']} of {rule['assigned']} failed, "
        f"{rule['allowed']} tolerated"
        + (
            f" (one failure is tolerated from {rule['min_devices_for_one_failure']} devices on)"
            if rule["min_devices_for_one_failure"]
            else ""
        )
    )
    if r.get("acknowledged"):
        lines.append(f"  acknowledged failures: {len(r['acknowledged'])}")
    return lines


@rollout.command("start")
@click.argument("version")
@click.option("--canary", multiple=True, help="A canary device id (repeat for more).")
@click.option("--device", "devices", multiple=True, help="Limit the rollout to these devices.")
@click.option("--stages", default="5,25,100", show_default=True, help="Percentages, ending 100.")
@click.option("--soak", default="15m", show_default=True, help="Soak time of each stage.")
@click.option("--max-failure", default="5%", show_default=True, help="Failure rate that halts.")
@click.option("--install-deadline", default="1h", show_default=True, help="Time to commit.")
@click.option("--no-rollback", is_flag=True, help="On a halt, leave failed devices as they are.")
@click.option(
    "--selector", "selectors", multiple=True,
    help="role=NAME or tag=NAME: only devices that report it (repeat; all must match).",
)  # fmt: skip
@api_options
def rollout_start(
    version: str,
    canary: tuple[str, ...],
    devices: tuple[str, ...],
    stages: str,
    soak: str,
    max_failure: str,
    install_deadline: str,
    no_rollback: bool,
    selectors: tuple[str, ...],
    server: str | None,
    token: str | None,
) -> None:
    """Start a staged rollout of release VERSION."""
    document = {
        "selector": parse_selector(selectors),
        "version": version,
        "device_ids": list(devices) or None,
        "canary": list(canary),
        "stages": parse_stages(stages),
        "soak_s": parse_duration(soak),
        "max_failure_rate": parse_percent(max_failure),
        "install_deadline_s": parse_duration(install_deadline),
        "rollback_on_halt": not no_rollback,
    }
    _print_rollout(api_client(server, token).post("/api/v1/rollouts", document))


@rollout.command("status")
@api_options
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.option(
    "--watch", is_flag=True,
    help="Redraw every --interval seconds until no rollout is running or paused (or Ctrl-C).",
)  # fmt: skip
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(0.1, 3600))
@click.option("--all", "show_all", is_flag=True, help="Every rollout, not only the latest five.")
def rollout_status(
    server: str | None,
    token: str | None,
    as_json: bool,
    watch: bool,
    interval: float,
    show_all: bool,
) -> None:
    """The rollouts, newest first, with a progress bar per stage, and the emergency stop."""
    client = api_client(server, token)
    while True:
        answer = client.get("/api/v1/rollouts")
        if as_json:
            click.echo(json.dumps(answer, indent=2, ensure_ascii=True))
            return
        lines = []
        stop = answer["emergency_stop"]
        if stop["active"]:
            lines.append(
                f"EMERGENCY STOP since {stop['since']} by {stop['actor']}: {stop['reason']}"
            )
        shown = answer["rollouts"] if show_all else answer["rollouts"][:5]
        for r in shown:
            lines += render_rollout(r)
        if not answer["rollouts"]:
            lines.append("no rollouts")
        if watch and sys.stdout.isatty():
            click.clear()
        show(*lines)
        going = any(r["state"] in ("running", "paused") for r in answer["rollouts"])
        if not watch or not going:
            return
        time.sleep(interval)
        click.echo("")


def _transition_command(action: str, help_text: str) -> None:
    @rollout.command(action, help=help_text)
    @click.argument("rollout_id", type=click.IntRange(1, 2**31 - 1))
    @click.option("--reason", help="Why (kept in the audit trail).")
    @api_options
    def command(rollout_id: int, reason: str | None, server: str | None, token: str | None) -> None:
        body = {"reason": reason} if reason else {}
        _print_rollout(
            api_client(server, token).post(f"/api/v1/rollouts/{rollout_id}/{action}", body)
        )


_transition_command("pause", "Pause a running rollout: no promotion, no new assignments.")
_transition_command("resume", "Resume a paused rollout.")
_transition_command("abort", "End a rollout; its uncommitted devices return to their release.")
_transition_command("rollback", "End a rollout; every one of its devices returns to its release.")


@click.command("emergency-stop")
@click.option("--clear", is_flag=True, help="Turn the emergency stop off.")
@click.option("--reason", help="Why (kept in the audit trail).")
@api_options
def emergency_stop(clear: bool, reason: str | None, server: str | None, token: str | None) -> None:
    """Pause every rollout and withdraw every uncommitted assignment at once (--clear: undo)."""
    client = api_client(server, token)
    if clear:
        answer = client.post("/api/v1/emergency-stop/clear", {})
    else:
        answer = client.post("/api/v1/emergency-stop", {"reason": reason} if reason else {})
    if answer["active"]:
        show(f"emergency stop ON since {answer['since']}: {answer['reason']}")
    else:
        click.echo("emergency stop off (paused rollouts stay paused until resumed)")
