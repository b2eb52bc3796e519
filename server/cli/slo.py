"""``fleet slo report``: the roadmap's success metrics, measured from the server's database."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from server.cli.common import (
    database_options,
    parse_duration,
    resolve_database_url,
    show,
    utc_now,
)
from server.errors import ClientConfigError, MigrationError

if TYPE_CHECKING:
    from server.database import Database

DEFAULT_WINDOW_S = 7 * 86400
# The times a report's window may name: the server has no records before 1970, and a year
# short of the calendar's end leaves room for the window's arithmetic.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)
WHEN_HELP = "a time (2026-12-01, 2026-12-01T06:00:00Z) or a duration before now (7d, 12h, 90m)"


def parse_when(text: str) -> datetime | timedelta:
    """``text`` as an aware UTC time (RFC 3339 with its offset, or a date: its midnight, UTC),
    or as a duration with its units (7d, 1h30m: :func:`server.cli.common.parse_duration`), which
    means that long before now.

    Raises:
        click.BadParameter: none of these, or a time without its offset.
    """
    stripped = text.strip()
    if re.fullmatch(r"(?:\d+[dhms])+", stripped, re.ASCII):
        return timedelta(seconds=parse_duration(stripped))
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        raise click.BadParameter(f"{text!r}: give {WHEN_HELP}") from None
    if moment.tzinfo is None:
        if len(stripped) != len("2026-12-01"):
            raise click.BadParameter(
                f"{text!r}: give the time's offset (Z for UTC, as in 2026-12-01T06:00:00Z)"
            )
        moment = moment.replace(tzinfo=UTC)
    try:
        moment = moment.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before the first representable instant
        moment = EARLIEST - timedelta(days=1)
    if not EARLIEST <= moment < LATEST:
        raise click.BadParameter(
            f"{text!r}: give a time from {EARLIEST:%Y-%m-%d} to before {LATEST:%Y-%m-%d}"
        )
    return moment


class When(click.ParamType[datetime | timedelta]):
    """An option's time or duration before now (:func:`parse_when`), refused naming the option."""

    name = "when"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime | timedelta:
        if isinstance(value, datetime | timedelta):
            return value
        try:
            return parse_when(str(value))
        except click.BadParameter as err:
            self.fail(err.message, param, ctx)


def resolve(when: datetime | timedelta, now: datetime) -> datetime:
    """The time ``when`` names, a duration counting back from ``now``."""
    return now - when if isinstance(when, timedelta) else when


def open_report_database(data_dir: Path | None, database_url: str | None) -> Database:
    """The server's database, as it is: a report reads and never migrates.

    Raises:
        ClientConfigError: neither a data directory nor a database URL; a data directory that
            does not exist or holds no database.
        MigrationError: the database is unreachable, or its schema is not this version's newest.
    """
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from server.database import Database, alembic_config

    url = resolve_database_url(data_dir, database_url)
    if url.startswith("sqlite"):  # opening a missing SQLite file would create an empty one
        path = make_url(url).database
        if path and path != ":memory:" and not path.startswith("file:") and not Path(path).exists():
            raise ClientConfigError(f"{path}: no such database file")
    db = Database(url)
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    try:
        with db.engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as err:
        db.dispose()
        raise MigrationError(f"database {db.safe_url}: cannot read it: {err}") from err
    if current != head:
        db.dispose()
        raise MigrationError(
            f"database {db.safe_url}: its schema is at revision {current or 'none'}, not "
            f"{head}: start this version's server on it once ('fleet server run') to migrate it"
        )
    return db


@click.group()
def slo() -> None:
    """The roadmap's success metrics, measured from the server's own records."""


@slo.command("report")
@click.option(
    "--since",
    "since_when",
    type=When(),
    metavar="WHEN",
    help=f"The window's start: {WHEN_HELP} (default: 7 days before --until).",
)
@click.option(
    "--until",
    "until_when",
    type=When(),
    metavar="WHEN",
    help=f"The window's end: {WHEN_HELP} (default: now).",
)
@database_options
@click.option("--json", "as_json", is_flag=True,
              help="Print every figure as JSON (docs/slo.md lists its keys).")  # fmt: skip
def slo_report(
    since_when: datetime | timedelta | None,
    until_when: datetime | timedelta | None,
    data_dir: Path | None,
    database_url: str | None,
    as_json: bool,
) -> None:
    """Uptime, update success, update latency, MTTD and MTTR over a window, beside the
    roadmap's targets, per rollout stage and per device role (docs/slo.md defines each)."""
    from server.slo import Window, report

    now = utc_now()
    until = resolve(until_when, now) if until_when is not None else now
    since = (
        resolve(since_when, now)
        if since_when is not None
        else until - timedelta(seconds=DEFAULT_WINDOW_S)
    )
    if until <= since:
        raise click.UsageError(
            f"the window ends ({_iso(until)}) before it starts ({_iso(since)}): give --until "
            "after --since"
        )
    db = open_report_database(data_dir, database_url)
    try:
        document = report(db, Window(since=since, until=until, now=now))
    finally:
        db.dispose()
    if as_json:
        click.echo(json.dumps(document, indent=2, ensure_ascii=True, allow_nan=False))
        return
    for line in render(document):
        show(line)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def figure(value: float | None, unit: str) -> str:
    """A measured figure for a terminal: ``no data`` for None."""
    if value is None:
        return "no data"
    if unit == "ratio":
        return f"{value * 100:.3f} %"
    if unit == "bytes":
        return f"{value / 1e6:.0f} MB"
    return duration(value)


def duration(seconds: float) -> str:
    """``42 s``, ``7m12s``, ``3h05m``."""
    whole = round(seconds)
    if whole < 60:
        return f"{seconds:.0f} s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def target_text(objective: dict[str, Any]) -> str:
    comparison = ">=" if objective["comparison"] == ">=" else "<"
    return f"{comparison} {figure(objective['target'], objective['unit'])}"


def _rate(value: float | None) -> str:
    return "no data" if value is None else f"{value * 100:.2f} %"


def _latency(view: dict[str, Any]) -> str:
    if not view["count"]:
        return "no data"
    return (
        f"p50 {duration(view['p50_s'])}, p95 {duration(view['p95_s'])}, "
        f"max {duration(view['max_s'])}"
    )


def render(document: dict[str, Any]) -> list[str]:
    """The report for a terminal: the objectives' table, then the breakdowns."""
    lines: list[str] = []
    window = document["window"]
    uptime = document["uptime"]
    lines.append(f"window {window['since']} to {window['until']} (made {document['generated']})")
    since = document["contact_record_since"]
    lines.append(
        f"contact gaps recorded since {since}: uptime counts from then"
        if since
        else "contact gaps recorded since the first device enrolled"
    )
    lines.append("")
    rows: list[tuple[str, ...]] = [
        (
            o["title"],
            target_text(o),
            "-" if o["status"] == "not measured" else figure(o["measured"], o["unit"]),
            o["status"],
        )
        for o in document["objectives"]
    ]
    lines.extend(_table(rows, ("OBJECTIVE", "TARGET", "MEASURED", "STATUS")))
    lines.append("")
    lines.append(
        f"uptime: {uptime['devices']} device(s), {duration(uptime['down_s'])} down of "
        f"{duration(uptime['observed_s'])} observed"
        + (f" from {uptime['from']}" if uptime["from"] else "")
    )
    rows = [
        (role, str(v["devices"]), figure(v["uptime"], "ratio"), duration(v["down_s"]))
        for role, v in uptime["by_role"].items()
    ]
    lines.extend(_table(rows, ("ROLE", "DEVICES", "UPTIME", "DOWN")))
    updates = document["updates"]
    lines.append("")
    lines.append(
        f"updates: {updates['succeeded']} succeeded, {updates['failed']} failed"
        + "".join(f"; {reason} {n}" for reason, n in updates["failure_reasons"].items())
    )
    for key, title in (("by_stage", "STAGE"), ("by_role", "ROLE")):
        rows = [
            (name, str(v["succeeded"]), str(v["failed"]), _rate(v["success_rate"]),
             _latency(v["assignment_to_commit"]))
            for name, v in updates[key].items()
        ]  # fmt: skip
        lines.extend(_table(rows, (title, "SUCCEEDED", "FAILED", "SUCCESS", "ASSIGNED TO COMMIT")))
    releases = document["releases"]
    lines.append("")
    lines.append(f"release upload to 100 % stage: {_latency(releases['upload_to_full'])}")
    rows = [
        (str(r["rollout"]), r["version"], r["uploaded"], duration(r["upload_to_full_s"]),
         duration(r["upload_to_completed_s"]) if r["completed"] else "not completed")
        for r in releases["rollouts"]
    ]  # fmt: skip
    lines.extend(_table(rows, ("ROLLOUT", "VERSION", "UPLOADED", "TO 100 %", "TO COMPLETED")))
    incidents = document["incidents"]
    lines.append("")
    lines.append(
        f"incidents: {incidents['count']} ({incidents['open']} open); MTTD "
        f"{figure(incidents['mttd_s'], 's')}, MTTR {figure(incidents['mttr_s'], 's')}"
    )
    for key, title in (("by_kind", "KIND"), ("by_stage", "STAGE"), ("by_role", "ROLE")):
        rows = [
            (name, str(v["count"]), str(v["open"]), figure(v["mttd_s"], "s"),
             figure(v["mttr_s"], "s"))
            for name, v in incidents[key].items()
        ]  # fmt: skip
        lines.extend(_table(rows, (title, "INCIDENTS", "OPEN", "MTTD", "MTTR")))
    return lines


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> list[str]:
    """``rows`` under ``header`` in aligned columns; nothing when there are no rows."""
    if not rows:
        return []
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
