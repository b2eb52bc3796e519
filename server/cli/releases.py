"""``fleet release``: upload signed bundles, list releases, export them for a mirror."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from fleet_core.progress import progress
from server.cli.common import (
    api_client,
    api_options,
    database_options,
    existing_data_dir,
    open_database,
    print_table,
    show,
)
from server.errors import ClientConfigError


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


@release.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@database_options
@click.option("--json", "as_json", is_flag=True, help="Print what was exported as JSON.")
def release_export(
    directory: Path, data_dir: Path | None, database_url: str | None, as_json: bool
) -> None:
    """Write every release's blobs into DIRECTORY for a static HTTP server to mirror.

    DIRECTORY gets blobs/<sha256> for every image (a chunked image whole) and chunk index, and
    chunks/ with every chunk; serve it as a mirror ([server] mirrors on the devices). Files
    already there are kept, so exporting again after an upload copies only what is new. Runs
    on the server's host, on its data directory; DIRECTORY must lie outside it.
    """
    from server.blobs import BlobStore
    from server.mirror import export
    from server.settings import Settings

    if data_dir is None:
        raise ClientConfigError("the blobs are in the data directory: give --data-dir")
    settings = Settings.create(existing_data_dir(data_dir), database_url=database_url)
    db = open_database(data_dir, database_url)
    try:
        summary = export(db, BlobStore(settings.blob_dir), directory, data_dir=settings.data_dir)
    finally:
        db.dispose()
    if as_json:
        document = {"directory": str(directory), **asdict(summary)}
        click.echo(json.dumps(document, indent=2, ensure_ascii=True))
        return
    show(
        f"exported {len(summary.releases)} release(s) to {directory}: {summary.written} file(s) "
        f"written ({summary.written_bytes} bytes), {summary.kept} already there"
    )
