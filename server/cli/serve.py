"""``fleet server run``: the release server as a process (listening socket, TLS, workers)."""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path
from typing import Any

import click

from fleet_core.params import FiniteFloatRange
from server.cli.common import (
    DURATION,
    METRICS_NETWORKS_ENV,
    database_options,
)
from server.cli.credentials import enrollment_token, token
from server.errors import ClientConfigError, ServerError


def _service_url(_context: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A monitoring URL option checked as the server checks it (a usage error naming it)."""
    from server.settings import check_service_url

    if value is None:
        return None
    try:
        return check_service_url(value)
    except ValueError as err:
        raise click.BadParameter(str(err), param=param) from None


# --time-origin: how far back a fast clock may start (a lab's servers start within minutes of
# each other; a day at --time-scale 10 already puts the clock 9 days ahead)
MAX_TIME_ORIGIN_AGE_S = 86400


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
    type=FiniteFloatRange(min=1.0),
    default=1.0,
    show_default=True,
    help="Run the server's clock this many times faster (labs and demos: soaks in seconds).",
)
@click.option(
    "--time-origin",
    type=FiniteFloatRange(min=0.0),
    default=None,
    metavar="UNIX_TIME",
    help="With --time-scale: the real time the fast clock counts from, at most a day ago "
    "(default: the start). Servers of one lab given the same origin keep one clock, across "
    "restarts too.",
)
@click.option(
    "--rollout-interval",
    type=FiniteFloatRange(min=0.05),
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
    "--grafana-url",
    default=None,
    callback=_service_url,
    help="Grafana's base URL (http or https): the web console links each device to its "
    "dashboard there. Default: no link.",
)
@click.option(
    "--loki-url",
    default=None,
    callback=_service_url,
    help="Loki's base URL (http or https): the web console links each device to its logs there. "
    "Default: no link.",
)
@click.option(
    "--alertmanager-url",
    default=None,
    callback=_service_url,
    help="Alertmanager's base URL (http or https): the web console's overview shows the alerts "
    "firing there. Default: none shown.",
)
@click.option(
    "--header-timeout",
    type=FiniteFloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds a client has to send a request's line and headers; then 408, connection closed.",
)
@click.option(
    "--body-read-timeout",
    type=FiniteFloatRange(min=0, min_open=True),
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
    type=FiniteFloatRange(min=0, min_open=True),
    default=3600.0,
    show_default=True,
    help="Seconds after its last write that a temporary blob or a partial upload left by an "
    "interrupted request is removed.",
)
@click.option(
    "--startup-leftover-age",
    type=FiniteFloatRange(min=0),
    default=60.0,
    show_default=True,
    help="The same, at start (short: only another process sharing the data directory can be "
    "writing then; 0 when none does).",
)
@click.option(
    "--operator-token-ttl",
    type=DURATION,
    default="90d",
    show_default=True,
    help="Lifetime of an operator token created without expires_in: seconds, or 12h, 30d.",
)
@click.option(
    "--operator-token-max-ttl",
    type=DURATION,
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
    time_origin: float | None,
    rollout_interval: float,
    active_checkin_interval: int,
    metrics_networks: str,
    metrics_token_file: Path | None,
    api_docs: bool,
    grafana_url: str | None,
    loki_url: str | None,
    alertmanager_url: str | None,
    header_timeout: float,
    body_read_timeout: float,
    min_body_rate: int,
    max_concurrent_uploads: int,
    leftover_age: float,
    startup_leftover_age: float,
    operator_token_ttl: int,
    operator_token_max_ttl: int,
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
    started = time.time()
    if time_origin is not None:
        if not started - MAX_TIME_ORIGIN_AGE_S <= time_origin <= started:
            raise click.BadParameter(
                f"{time_origin:g} is not within the last day ({started:.0f} is now)",
                param_hint="'--time-origin'",
            )
        started = time_origin
    inherited = None if fd is None else inherited_socket(fd)
    if data_dir is None:
        raise ClientConfigError("give --data-dir (blobs, keys and keyring live there)")
    listener = listening_socket(host, port) if inherited is None else inherited
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
    from server.ui.feed import StreamClosingServer, feed_of

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
        grafana_url=grafana_url,
        loki_url=loki_url,
        alertmanager_url=alertmanager_url,
        limits=limits,
        credentials=CredentialLimits(
            operator_token_ttl_s=operator_token_ttl,
            operator_token_max_ttl_s=operator_token_max_ttl,
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
    # the socket is ours (bound above, or inherited): uvicorn's own --fd takes any descriptor
    # for a Unix socket, and its own bind reports a busy port with exit status 3
    # the console's live streams end first, or uvicorn would wait for the browsers to leave
    config = uvicorn.Config(logs.AccessLogMiddleware(app), **options)
    served = StreamClosingServer(config, feed_of(app))
    served.run(sockets=[listener])
    if not served.started:
        raise ServerStartError("the server did not start: see the log above")


class ServerStartError(ServerError):
    """The server could not listen, or did not start."""


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (uvicorn listens on it), bound before anything
    else starts, so a busy port or an address not on this host is one error line (exit 1).

    Raises:
        ServerStartError: the address cannot be bound.
    """
    try:
        # IPv4 unless the address is IPv6 (as uvicorn's own bind): "localhost" listed as ::1
        # first by the resolver must not leave http://127.0.0.1 clients refused
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, family=family, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (OSError, UnicodeError) as err:
        raise ServerStartError(f"cannot listen on {host}:{port}: {err}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        reason = "the port is in use" if err.errno == errno.EADDRINUSE else err.strerror
        raise ServerStartError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


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


server.add_command(token)
server.add_command(enrollment_token)
