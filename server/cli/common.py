"""What every operator command shares: options, where the database and the server are, output."""

from __future__ import annotations

import getpass
import re
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from fleet_core.text import printable
from server.errors import ClientConfigError

if TYPE_CHECKING:
    from server.client import ApiClient
    from server.database import Database

F = TypeVar("F", bound=Callable[..., Any])
DATABASE_URL_ENV = "FLEET_DATABASE_URL"
METRICS_NETWORKS_ENV = "FLEET_METRICS_NETWORKS"
CA_FILE_META = "fleet.ca_file"  # --ca-file, kept in the click context for api_client
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", re.ASCII)
MAX_DURATION_S = 2**31 - 1  # what every duration column and API field holds
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in ``3600``, ``90s``, ``15m``, ``12h``, ``7d``, or a compound such as ``1h30m``
    (units largest first, each at most once).

    Raises:
        click.BadParameter: anything else, or zero.
    """
    stripped = text.strip()
    match = _DURATION.fullmatch(stripped)
    if stripped.isascii() and stripped.isdigit():
        seconds = int(stripped)
    elif match is not None and stripped:
        seconds = sum(
            int(n or 0) * _UNITS[unit] for n, unit in zip(match.groups(), "dhms", strict=True)
        )
    else:
        seconds = 0
    if not 0 < seconds <= MAX_DURATION_S:
        raise click.BadParameter(
            f"{text!r}: give a positive number of seconds (at most {MAX_DURATION_S}), or 90s, "
            "15m, 12h, 7d, 1h30m"
        )
    return seconds


def parse_percent(text: str) -> float:
    """The fraction in ``5%`` or ``0.5%``. The ``%`` is required: a bare ``0.5`` could mean half
    or half a percent.

    Raises:
        click.BadParameter: no ``%``, not a number, or not from 0 to below 100 %.
    """
    stripped = text.strip()
    if not stripped.endswith("%"):
        raise click.BadParameter(f"{text!r}: write a percentage with %, such as 5% or 0.5%")
    try:
        value = float(stripped.removesuffix("%"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give a percentage such as 5%") from None
    if not 0 <= value < 100:  # (NaN fails this too)
        raise click.BadParameter(f"{text!r}: give a percentage from 0 to below 100%")
    return value / 100


class Duration(click.types.IntParamType):
    """An option's duration (:func:`parse_duration`), refused naming the option."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_duration(str(value))
        except click.BadParameter as err:
            self.fail(err.message, param, ctx)


class Percent(click.types.FloatParamType):
    """An option's percentage (:func:`parse_percent`), as a fraction, refused naming the option."""

    name = "percent"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_percent(str(value))
        except click.BadParameter as err:
            self.fail(err.message, param, ctx)


DURATION = Duration()
PERCENT = Percent()


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
    return click.option("--server", callback=_not_empty, help="Server URL (or $FLEET_SERVER).")(
        function
    )


def _not_empty(_context: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    # an empty --server must not fall back to $FLEET_SERVER, perhaps another (production) server
    if value is not None and not value.strip():
        raise click.BadParameter("empty: give the server's URL, or leave the option out")
    return value


def _keep_ca_file(context: click.Context, _param: click.Parameter, value: Path | None) -> None:
    # kept aside rather than passed: every API command would otherwise take one more argument
    context.meta[CA_FILE_META] = value


def existing_data_dir(data_dir: Path) -> Path:
    """``data_dir``, which must exist: only ``fleet server run`` makes one (server.settings
    would make any directory it is given).

    Raises:
        ClientConfigError: it does not exist, or is no directory.
    """
    if not data_dir.is_dir():
        raise ClientConfigError(
            f"{data_dir}: no such directory ('fleet server run --data-dir DIR' creates one)"
        )
    return data_dir


def open_database(
    data_dir: Path | None, database_url: str | None, *, initialise: bool = False
) -> Database:
    """The server's database, migrated to the newest schema.

    Only ``fleet server run`` makes a data directory: a mistyped ``--data-dir`` must not become
    a new, empty database whose tokens are valid nowhere. A data directory that does not exist
    is refused; one without its database yet is refused too, unless ``initialise`` (``fleet
    server token create``: the first admin token, which an installation makes before the first
    start, in the directory it made).

    Raises:
        ClientConfigError: neither a data directory nor a database URL; a data directory that
            does not exist, or (without ``initialise``) holds no database.
    """
    from server.database import Database

    db = Database(resolve_database_url(data_dir, database_url, initialise=initialise))
    db.migrate()
    return db


def resolve_database_url(
    data_dir: Path | None, database_url: str | None, *, initialise: bool = False
) -> str:
    """The database URL that ``--data-dir`` and ``--database-url`` name together (see
    :func:`open_database`).

    Raises:
        ClientConfigError: as :func:`open_database`.
    """
    from server.settings import SQLITE_FILE, Settings

    if data_dir is not None:
        existing_data_dir(data_dir)
        if database_url is None and not initialise and not (data_dir / SQLITE_FILE).is_file():
            raise ClientConfigError(
                f"{data_dir}: no server database in it ('fleet server run --data-dir DIR' "
                "creates one)"
            )
        return Settings.create(data_dir, database_url=database_url).database_url
    if database_url is not None:
        return database_url
    raise ClientConfigError("give --data-dir or --database-url")


def api_client(server: str | None, token: str | None) -> ApiClient:
    from server.client import ApiClient, ClientConfig

    context = click.get_current_context(silent=True)
    ca_file = None if context is None else context.meta.get(CA_FILE_META)
    return ApiClient(ClientConfig.resolve(server, token, ca_file=ca_file))


def utc_now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def show(*lines: str, err: bool = False) -> None:
    """Print lines that hold stored text, each escaped (fleet_core/text.py), so a string a
    device or an older server stored cannot steer the terminal or forge a line."""
    click.echo("\n".join(printable(line) for line in lines), err=err)


def print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    rows = [[printable(str(cell)) for cell in row] for row in rows]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )


def uses_database(data_dir: Path | None, database_url: str | None) -> bool:
    return data_dir is not None or database_url is not None
