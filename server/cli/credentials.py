"""``fleet server token`` and ``fleet server enrollment-token``: operator and enrollment
credentials, made, listed and revoked directly on the database or over the API."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import click

from fleet_core.text import check_text
from server.cli.common import (
    DURATION,
    api_client,
    api_options,
    cli_actor,
    database_options,
    open_database,
    print_table,
    show,
    uses_database,
    utc_now,
)


@click.group()
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
    type=DURATION,
    help="Lifetime: seconds, or 15m, 12h, 30d, 1h30m (default 90d, at most 365d).",
)
@database_options
@click.option(
    "--json", "as_json", is_flag=True,
    help="Print the token, its name, role and expiry as JSON (the token is still shown once).",
)  # fmt: skip
def token_create(
    role: str,
    name: str,
    expires_in: int | None,
    data_dir: Path | None,
    database_url: str | None,
    as_json: bool,
) -> None:
    """Create an operator token and print it (only this once; the server keeps its hash).

    This is the way in when no admin token is left: it works on the database directly."""
    from server.auth import Role, create_operator_token, operator_token_expiry
    from server.errors import InvalidRequestError
    from server.settings import DEFAULT_OPERATOR_TOKEN_MAX_TTL_S, DEFAULT_OPERATOR_TOKEN_TTL_S

    now = utc_now()
    seconds = expires_in
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
    db = open_database(data_dir, database_url, initialise=True)
    secret = create_operator_token(
        db, name=name, role=Role.parse(role), created_by=cli_actor(), now=now, expires=expires
    )
    if as_json:
        document = {
            "token": secret,
            "name": name,
            "role": role,
            "expires": expires.strftime("%Y-%m-%dT%H:%M:%SZ") if expires else None,
        }
        click.echo(json.dumps(document, indent=2, ensure_ascii=True))
        return
    click.echo(secret)
    show(f"operator token for {name!r}, role {role}; it is not shown again", err=True)


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
    if uses_database(data_dir, database_url):
        from server.auth import list_operator_tokens

        tokens = list_operator_tokens(open_database(data_dir, database_url), utc_now())
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
    print_table(rows, ("ID", "NAME", "ROLE", "STATUS", "EXPIRES", "CREATED", "CREATED BY"))


@click.group("enrollment-token")
def enrollment_token() -> None:
    """Tokens that admit new devices."""


@enrollment_token.command("create")
@click.option("--uses", required=True, type=click.IntRange(1, 1_000_000), help="Devices it admits.")
@click.option(
    "--expires-in",
    type=DURATION,
    help="Lifetime: seconds, or 15m, 12h, 7d, 1h30m (default: no expiry).",
)
@database_options
@api_options
@click.option(
    "--json", "as_json", is_flag=True,
    help="Print the token, its uses and expiry as JSON (the token is still shown once).",
)  # fmt: skip
def enrollment_token_create(
    uses: int,
    expires_in: int | None,
    data_dir: Path | None,
    database_url: str | None,
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Create an enrollment token and print it (only this once)."""
    seconds = expires_in
    if uses_database(data_dir, database_url):
        from server.enrollment import create_enrollment_token

        db = open_database(data_dir, database_url)
        created = create_enrollment_token(
            db, uses=uses, expires_in_s=seconds, actor=cli_actor(), now=utc_now()
        )
        secret = created.token
        expires = created.expires.strftime("%Y-%m-%dT%H:%M:%SZ") if created.expires else None
    else:
        answer = api_client(server, token).post(
            "/api/v1/enrollment-tokens", {"uses": uses, "expires_in": seconds}
        )
        secret, expires = answer["token"], answer["expires"]
    if as_json:
        document = {"token": secret, "uses": uses, "expires": expires}
        click.echo(json.dumps(document, indent=2, ensure_ascii=True))
        return
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
    if uses_database(data_dir, database_url):
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
    print_table(rows, ("ID", "USES LEFT", "EXPIRES", "REVOKED", "CREATED", "CREATED BY"))


def _revoke_command(group: click.Group, kind: str, route: str, revoke: str, help_text: str) -> None:
    """``<group> revoke TOKEN_ID``: on the database with ``--data-dir``/``--database-url``
    (``revoke``, ``module:function``), over the API (``route``) otherwise; ``--json`` prints
    the token as listed."""

    @group.command("revoke", help=help_text)
    @click.argument("token_id", type=click.IntRange(1, 2**31 - 1))
    @database_options
    @api_options
    @click.option("--json", "as_json", is_flag=True, help="Print the revoked token as JSON.")
    def revoke_command(
        token_id: int,
        data_dir: Path | None,
        database_url: str | None,
        server: str | None,
        token: str | None,
        as_json: bool,
    ) -> None:
        if uses_database(data_dir, database_url):
            module, function = revoke.split(":")
            revoked = getattr(importlib.import_module(module), function)(
                open_database(data_dir, database_url), token_id, actor=cli_actor(), now=utc_now()
            )
        else:
            revoked = api_client(server, token).post(f"/api/v1/{route}/{token_id}/revoke", {})
        if as_json:
            click.echo(json.dumps(revoked, indent=2, ensure_ascii=True))
        else:
            click.echo(f"{kind} {token_id} revoked")


_revoke_command(
    token,
    "operator token",
    "operator-tokens",
    "server.auth:revoke_operator_token",
    "Revoke operator token TOKEN_ID (see 'list') at once; the last valid admin token stays.",
)
_revoke_command(
    enrollment_token,
    "enrollment token",
    "enrollment-tokens",
    "server.enrollment:revoke_enrollment_token",
    "Revoke enrollment token TOKEN_ID (see 'list') at once: it admits no more devices.",
)
