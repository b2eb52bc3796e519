"""``fleet device``: list devices, assign releases, quarantine, decommission, pre-authorize."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import click

from server.errors import ClientConfigError

if TYPE_CHECKING:
    pass
from server.cli.common import (
    api_client,
    api_options,
    print_table,
    show,
)


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
    print_table(
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
