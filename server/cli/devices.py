"""``fleet device``: list devices, assign releases, quarantine, decommission, pre-authorize."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fleet_core.text import printable
from server.errors import ClientConfigError

if TYPE_CHECKING:
    from server.client import ApiClient

from server.cli.common import (
    api_client,
    api_options,
    print_table,
    show,
)


@click.group()
def device() -> None:
    """Devices enrolled with the server. A DEVICE is its id, a unique prefix of its id (at least
    4 hex digits), or its hostname."""


class DeviceReferenceError(ClientConfigError):
    """A device reference that names no device, or more than one."""


MIN_PREFIX = 4


def resolve_device(devices: Sequence[dict[str, Any]], reference: str) -> str:
    """The id of the one device ``reference`` names in ``devices`` (the API's listing): its id,
    a unique id prefix of ``MIN_PREFIX`` or more hex digits, or its hostname, each read
    case-insensitively (hostnames are DNS names). A reference is never read one way rather than
    the other: one that is a device's hostname and another's id (or id prefix) names both, and
    is refused, so a device cannot take another's id as its hostname to be mistaken for it.

    Raises:
        DeviceReferenceError: no device, or several (naming them).
    """
    wanted = reference.strip()
    lowered = wanted.lower()
    by_name = [d for d in devices if str(d["hostname"]).lower() == lowered]
    by_id = (
        [d for d in devices if str(d["id"]).startswith(lowered)]
        if len(lowered) >= MIN_PREFIX and all(c in "0123456789abcdef" for c in lowered)
        else []
    )
    found = {d["id"]: d for d in [*by_name, *by_id]}
    if len(found) == 1:
        return str(next(iter(found)))
    if not found:
        raise DeviceReferenceError(
            f"no device is {wanted!r} (give an id, a prefix of {MIN_PREFIX}+ hex digits, or a "
            "hostname: see 'fleet device list')"
        )
    named = ", ".join(f"{d['id'][:12]} ({d['hostname']})" for d in list(found.values())[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    raise DeviceReferenceError(f"{wanted!r} names {len(found)} devices: {named}{more}")


def resolve_devices(client: ApiClient, references: Sequence[str]) -> list[str]:
    """The ids of ``references`` (see :func:`resolve_device`), with one listing of the fleet
    (a full id too: a device whose hostname is that id, stored before hostnames were refused
    that shape, makes it ambiguous)."""
    if not references:
        return []
    devices = client.get("/api/v1/devices")["devices"]
    return [resolve_device(devices, reference) for reference in references]


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
    _warn_duplicate_hostnames(devices)


def _warn_duplicate_hostnames(devices: Sequence[dict[str, Any]]) -> None:
    seen: dict[str, list[str]] = {}  # hostnames are DNS names: CAMERA-0000 is camera-0000
    for d in devices:
        seen.setdefault(str(d["hostname"]).lower(), []).append(str(d["hostname"]))
    for names in sorted(seen.values()):
        if len(names) > 1:
            spelled = " / ".join(repr(n) for n in sorted(set(names)))
            show(
                f"warning: {len(names)} devices are {spelled}: refer to them by id, or rename "
                "one ('fleet device rename')",
                err=True,
            )


JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")


def _print_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, ensure_ascii=True))


def _report(answer: dict[str, Any], as_json: bool, line: Callable[[dict[str, Any]], str]) -> None:
    """What a device command did: the API's answer as JSON, or one line of it."""
    if as_json:
        _print_json(answer)
    else:
        show(line(answer))


@device.command("show")
@click.argument("reference", metavar="DEVICE")
@api_options
@JSON_OPTION
@click.option("--events", default=10, show_default=True, type=click.IntRange(0, 1000),
              help="How many of its latest audit entries to show.")  # fmt: skip
def show_device(
    reference: str, server: str | None, token: str | None, as_json: bool, events: int
) -> None:
    """DEVICE: identity, status, slots and versions, last heartbeat, role and tags, and its
    latest events."""
    client = api_client(server, token)
    (device_id,) = resolve_devices(client, [reference])
    view = client.get(f"/api/v1/devices/{device_id}")
    entries = (
        client.get(f"/api/v1/devices/{device_id}/events", params={"limit": events})["entries"]
        if events
        else []
    )
    if as_json:
        _print_json({**view, "recent_entries": entries})
        return
    show(*describe_device(view, entries))


def describe_device(view: dict[str, Any], entries: Sequence[dict[str, Any]]) -> list[str]:
    """A device for a terminal (``fleet device show``)."""
    heartbeat = view.get("last_heartbeat") or {}
    status = view["status"] + (f" ({view['status_reason']})" if view.get("status_reason") else "")
    lines = [
        f"device {view['id']}",
        f"  hostname:    {view['hostname']}",
        f"  compatible:  {view['compatible']}",
        f"  status:      {status}",
        f"  state:       {view['state']}",
        f"  version:     {view['version'] or '-'} (assigned: {view['assigned_version'] or '-'})",
        f"  role, tags:  {view['role'] or '-'}; {', '.join(view['tags']) or '-'}",
        f"  enrolled:    {view['enrolled']}",
        f"  last seen:   {view['last_seen']}",
    ]
    if heartbeat:
        lines.append(f"  booted:      {heartbeat.get('booted', '-')}")
        for name, slot in sorted((heartbeat.get("slots") or {}).items()):
            lines.append(
                f"  slot {name}:      {slot.get('status', '-')} {slot.get('version') or '-'}"
            )
    if entries:
        lines.append("  recent:")
        lines += [
            f"    {e['at']} {e['actor']} {e['action']} {json.dumps(e['details'], sort_keys=True)}"
            for e in entries
        ]
    return lines


@device.command()
@click.argument("reference", metavar="DEVICE")
@click.argument("hostname")
@api_options
@JSON_OPTION
def rename(
    reference: str, hostname: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Give DEVICE the hostname HOSTNAME (unique among devices)."""
    client = api_client(server, token)
    (device_id,) = resolve_devices(client, [reference])
    answer = client.post(f"/api/v1/devices/{device_id}/rename", {"hostname": hostname})
    _report(answer, as_json, lambda a: f"device {a['id']}: {a['hostname']}")


@device.command()
@click.argument("reference", metavar="DEVICE")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@api_options
@JSON_OPTION
def remove(reference: str, yes: bool, server: str | None, token: str | None, as_json: bool) -> None:
    """Remove DEVICE's record, sessions and pre-authorization: it must be admitted again (an
    enrollment token or a new pre-authorization) to come back, and one that still holds a valid
    token does. Its audit entries stay. To refuse its key, decommission it instead (a
    decommissioned device cannot be removed)."""
    client = api_client(server, token)
    (device_id,) = resolve_devices(client, [reference])
    if not yes:
        hostname = client.get(f"/api/v1/devices/{device_id}")["hostname"]
        try:
            confirmed = click.confirm(
                printable(f"remove device {device_id} ({hostname})?"), err=True
            )
        except click.Abort:  # no answer (no terminal, end of input)
            click.echo("", err=True)  # ends the question's line
            raise ClientConfigError(
                f"device {device_id} not removed: no answer to the confirmation (pass --yes to "
                "remove it without asking)"
            ) from None
        if not confirmed:
            raise click.Abort
    answer = client.delete(f"/api/v1/devices/{device_id}")
    _report(answer, as_json, lambda a: f"device {a['id']} ({a['hostname']}) removed")


@device.command()
@click.argument("reference", metavar="DEVICE")
@click.argument("version")
@api_options
@JSON_OPTION
def assign(
    reference: str, version: str, server: str | None, token: str | None, as_json: bool
) -> None:
    """Assign release VERSION to DEVICE ('none' removes the assignment)."""
    client = api_client(server, token)
    (device_id,) = resolve_devices(client, [reference])
    target = None if version == "none" else version
    answer = client.post(f"/api/v1/devices/{device_id}/assignment", {"version": target})
    _report(
        answer,
        as_json,
        lambda a: f"device {a['id']}: assigned {a['assigned_version'] or 'nothing'}",
    )


def _status_command(change: str, help_text: str, *, reason_required: bool) -> None:
    @device.command(change, help=help_text)
    @click.argument("reference", metavar="DEVICE")
    @click.option("--reason", required=reason_required, help="Why (kept in the audit trail).")
    @api_options
    @JSON_OPTION
    def command(
        reference: str, reason: str | None, server: str | None, token: str | None, as_json: bool
    ) -> None:
        client = api_client(server, token)
        (device_id,) = resolve_devices(client, [reference])
        body = {} if reason is None else {"reason": reason}
        answer = client.post(f"/api/v1/devices/{device_id}/{change}", body)
        _report(answer, as_json, lambda a: f"device {a['id']}: {a['status']}")


_status_command(
    "decommission",
    "Decommission DEVICE: its sessions end and its key is refused (check-ins, sessions, "
    "enrollment) until 'reinstate'.",
    reason_required=True,
)
_status_command(
    "reinstate",
    "Let decommissioned DEVICE open sessions and check in with its key again.",
    reason_required=False,
)
_status_command(
    "quarantine",
    "Quarantine DEVICE: it checks in and reports, is assigned nothing, and rollouts skip it.",
    reason_required=True,
)
_status_command(
    "release",
    "End the quarantine of DEVICE: its assignment applies again.",
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
@JSON_OPTION
def preauthorize(public_key: str, server: str | None, token: str | None, as_json: bool) -> None:
    """Let the device with PUBLIC_KEY (hex, or a .pub/.pem/hex file) enroll without a token."""
    answer = api_client(server, token).post(
        "/api/v1/preauthorized-keys", {"public_key": public_key_hex(public_key)}
    )
    _report(answer, as_json, lambda a: str(a["device_id"]))
