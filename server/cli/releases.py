"""``fleet release``: upload signed bundles and list releases."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fleet_core.progress import progress
from server.cli.common import (
    api_client,
    api_options,
    print_table,
    show,
)


@click.group()
def release() -> None:
    """Releases on the server."""


@release.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@api_options
@click.option("--json", "as_json", is_flag=True, help="Print the accepted release as JSON.")
def upload(bundle: Path, server: str | None, token: str | None, as_json: bool) -> None:
    """Upload BUNDLE; the server verifies it against the fleet's release keyring."""
    client = api_client(server, token)
    size = bundle.stat().st_size
    with progress(size, f"uploading {bundle.name}", enabled=not as_json) as update:
        answer = client.upload("/api/v1/releases", bundle, update)
    if as_json:
        click.echo(json.dumps(answer, indent=2, ensure_ascii=True))
        return
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
    print_table(rows, ("VERSION", "COMPATIBLE", "SECURITY", "UPLOADED", "IMAGES"))
