"""``fleet audit``: list the audit trail, sign its head, verify the chain and its signed heads."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from fleet_core.outputs import refuse_output_over_inputs
from server.errors import AuditChainBrokenError, ClientConfigError, ServerError

if TYPE_CHECKING:
    from server.audit import AuditEntry
    from server.client import ApiClient
    from signing.keys import SigningKey
from server.cli.common import (
    api_client,
    api_options,
    database_options,
    existing_data_dir,
    open_database,
    show,
    uses_database,
    utc_now,
)


@click.group()
def audit() -> None:
    """The audit trail of operator actions and device events."""


def _api_entries(client: ApiClient, **filters: str | list[str]) -> Iterator[AuditEntry]:
    """The entries the server lists, oldest first, only those ``filters`` (the API's
    ``action``, ``subject``, ``actor``) let through."""
    from server.audit import AuditEntry

    after: int | None = 0
    while after is not None:
        page = client.get("/api/v1/audit", params={**filters, "after": after, "limit": 1000})
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

    filters: dict[str, str | list[str]] = {"action": list(actions)} if actions else {}
    if subject is not None:
        filters["subject"] = subject
    if actor is not None:
        filters["actor"] = actor
    kept = deque(_api_entries(api_client(server, token), **filters), maxlen=last)
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


def _parse_head(
    _context: click.Context, _param: click.Parameter, text: str | None
) -> tuple[int, str] | Path | None:
    """``--expect-head``: SEQ:HASH printed by an earlier verify, or a signed head file."""
    if text is None:
        return None
    match = re.fullmatch(r"(\d+):([0-9a-f]{64})", text.strip())
    if match is not None:
        return int(match.group(1)), match.group(2)
    if Path(text).is_file():
        return Path(text)
    raise click.BadParameter(
        f"{text!r}: neither SEQ:HASH as an earlier verify printed it, nor a signed head file "
        "('fleet audit head --out'): no such file"
    )


def _server_signing_key(data_dir: Path | None) -> SigningKey:
    """The server key in ``data_dir`` (the audit heads are signed with it).

    Raises:
        ClientConfigError: no data directory given, or one that does not exist.
        KeyFileError: the key is missing or unusable.
    """
    from server.settings import Settings
    from signing.keys import load_private_key

    if data_dir is None:
        raise ClientConfigError("the server key is in the data directory: give --data-dir")
    return load_private_key(Settings.create(existing_data_dir(data_dir)).server_key_path)


@audit.command()
@database_options
@api_options
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the signed head here (keep it off the server) instead of printing it.",
)
@click.option(
    "--json", "as_json", is_flag=True,
    help='Print {"head": SIGNED HEAD, "out": FILE or null} (the head is also written to --out).',
)  # fmt: skip
def head(
    data_dir: Path | None,
    database_url: str | None,
    server: str | None,
    token: str | None,
    out: Path | None,
    as_json: bool,
) -> None:
    """Sign the audit trail's head with the server key and export it, for a later
    'fleet audit verify --expect-head FILE' to check that nothing at or below it changed."""
    from server.anchor import SignedHead, anchor_head

    if out is not None:  # refused before anything is signed
        if not out.absolute().parent.is_dir():
            raise ServerError(f"--out {out}: no such directory {str(out.absolute().parent)!r}")
        refuse_output_over_inputs(out, option="--out")  # never over a private key, say
    if uses_database(data_dir, database_url):
        key = _server_signing_key(data_dir)
        signed = anchor_head(open_database(data_dir, database_url), key, utc_now())
        document = None if signed is None else signed.to_dict()
    else:
        document = api_client(server, token).get("/api/v1/audit/head")["head"]
        if document is not None:
            SignedHead.from_dict(document)  # refuse to store what is not a signed head
    if document is None:
        raise AuditChainBrokenError("the audit trail is empty: there is no head to sign")
    text = json.dumps(document, indent=1, sort_keys=True) + "\n"
    if out is not None:
        from fleet_core.durable import atomic_write

        try:
            atomic_write(out, text.encode())
        except OSError as err:
            raise ServerError(f"--out {out}: cannot write: {err.strerror or err}") from err
    if as_json:
        report = {"head": document, "out": None if out is None else str(out)}
        click.echo(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=True))
    elif out is None:
        click.echo(text, nl=False)
    else:
        click.echo(f"signed head {document['seq']}:{document['hash']} written to {out}", err=True)


@audit.command()
@database_options
@api_options
@click.option(
    "--expect-head",
    metavar="FILE|SEQ:HASH",
    callback=_parse_head,
    help="A file written by 'fleet audit head --out' (its signature is checked with the server "
    "key: also catches a chain rewritten whole, and anchors deleted), or SEQ:HASH printed by an "
    "earlier verify: either also catches entries removed from the end.",
)
@click.option(
    "--expect-signed-head",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A signed head file, and only that (--expect-head FILE, when a name could be read as "
    "SEQ:HASH).",
)
@click.option(
    "--server-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The server's public key, to check signed heads (default with --data-dir: its key).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON (exit 1 still).")
def verify(
    data_dir: Path | None,
    database_url: str | None,
    server: str | None,
    token: str | None,
    expect_head: tuple[int, str] | Path | None,
    expect_signed_head: Path | None,
    server_key: Path | None,
    as_json: bool,
) -> None:
    """Walk the hash chain and check the signed heads; name the first changed or removed
    entry (exit 1 if any)."""
    from server.anchor import SignedHead, check_trail, read_head_file, stored_anchors
    from server.audit import all_entries
    from signing.keys import load_public_key

    direct = uses_database(data_dir, database_url)
    if server_key is not None:
        public_key = load_public_key(server_key)
    elif data_dir is not None:
        public_key = _server_signing_key(data_dir).public_key
    else:
        public_key = None
    if isinstance(expect_head, Path):
        if expect_signed_head is not None:
            raise click.UsageError(
                "give the signed head once: --expect-head or --expect-signed-head"
            )
        expect_head, expect_signed_head = None, expect_head
    exported = None if expect_signed_head is None else read_head_file(expect_signed_head)
    if exported is not None and public_key is None:
        raise ClientConfigError("checking a signed head needs the server key: give --server-key")
    if direct:
        db = open_database(data_dir, database_url)
        chain, anchors = all_entries(db), stored_anchors(db)
    else:
        client = api_client(server, token)
        anchors = [SignedHead.from_dict(a) for a in client.get("/api/v1/audit/anchors")["anchors"]]
        chain = _api_entries(client)
    check = check_trail(chain, anchors, public_key, exported=exported, expect_head=expect_head)
    if as_json:
        document = {
            "intact": check.intact,
            "problem": check.problem,
            "entries": check.entries,
            "head": check.head,
            "signed_heads_held": check.signed_heads,
            "signed_heads_unchecked": check.unchecked,
        }
        click.echo(json.dumps(document, indent=2, ensure_ascii=True))
        if not check.intact:
            raise SystemExit(1)
        return
    if not check.intact:
        raise AuditChainBrokenError(f"audit trail broken: {check.problem}")
    click.echo(f"audit trail intact: {check.entries} entries; head {check.head}")
    if check.signed_heads:
        click.echo(f"signed heads: {check.signed_heads} hold")
    elif check.unchecked:
        click.echo(f"{check.unchecked} signed head(s) not checked: give --server-key", err=True)
