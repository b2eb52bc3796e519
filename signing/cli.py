"""``fleet keys``: create signing keys and manage keyrings."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from fleet_core.text import printable
from signing.errors import KeyFileError
from signing.keyring import KeyringFiles, revoke_key, set_threshold, trust_key
from signing.keys import (
    generate_key,
    key_id,
    key_paths,
    load_private_key,
    load_public_key,
    private_key_is_encrypted,
)

PASSPHRASE_ENV = "FLEET_KEY_PASSPHRASE"  # noqa: S105 (the variable's name, not a secret)


def read_passphrase(passphrase_file: Path | None) -> bytes | None:
    """The passphrase from ``--passphrase-file`` or ``$FLEET_KEY_PASSPHRASE``, if any.

    A trailing newline of the file is not part of it. An empty passphrase (an empty file, a
    file of only a newline, the variable set to nothing) is refused, naming where it came
    from: encrypting with it would write an unencrypted key, and the operator who named a
    passphrase asked for an encrypted one. A key without a passphrase is asked for by giving
    none.

    Raises:
        KeyFileError: the passphrase is empty, or its file cannot be read.
    """
    if passphrase_file is not None:
        try:
            value = passphrase_file.read_bytes().rstrip(b"\r\n")
        except OSError as err:
            raise KeyFileError(
                f"{passphrase_file}: cannot read the passphrase: {err.strerror or err}"
            ) from err
        if not value:
            raise KeyFileError(
                f"{passphrase_file}: the passphrase is empty (for a key without a passphrase, "
                "give no --passphrase-file)"
            )
        return value
    variable = os.environ.get(PASSPHRASE_ENV)
    if variable is None:
        return None
    if not variable:
        raise KeyFileError(
            f"${PASSPHRASE_ENV} is set but empty (for a key without a passphrase, unset it)"
        )
    return variable.encode()


passphrase_file_option = click.option(
    "--passphrase-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=f"File holding the key's passphrase (or set ${PASSPHRASE_ENV}).",
)


json_option = click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")


def _echo_json(document: dict[str, Any]) -> None:
    """The one JSON document of a ``--json`` run: ASCII, sorted keys, alone on stdout."""
    click.echo(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=True))


def _keyring_document(keyring_dir: Path) -> dict[str, Any]:
    """A keyring as ``fleet keys list --json`` shows it: active and revoked ids, threshold."""
    keyring = KeyringFiles.read(keyring_dir)
    return {
        "trusted": sorted(set(keyring.trusted) - keyring.revoked),
        "revoked": sorted(keyring.revoked),
        "threshold": keyring.threshold,
    }


@click.group()
def keys() -> None:
    """Signing keys and keyrings of trusted keys."""


@keys.command()
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Writes OUT.pem, OUT.pub."
)
@passphrase_file_option
@click.option("--ask-passphrase", is_flag=True, help="Prompt for a passphrase to encrypt the key.")
@json_option
def generate(out: Path, passphrase_file: Path | None, ask_passphrase: bool, as_json: bool) -> None:
    """Create an Ed25519 key pair: OUT.pem (mode 0600) and OUT.pub."""
    passphrase = None if ask_passphrase else read_passphrase(passphrase_file)
    if ask_passphrase:
        passphrase = click.prompt(
            "Passphrase", hide_input=True, confirmation_prompt=True, err=as_json
        ).encode()
    key = generate_key(out, passphrase)
    if as_json:
        private_path, public_path = key_paths(out)
        document = {
            "key_id": key.key_id,
            "private_key": str(private_path),
            "public_key": str(public_path),
            "encrypted": passphrase is not None,
        }
        _echo_json(document)
        return
    click.echo(f"key id {key.key_id}")


@keys.command("id")
@click.argument("key_file", type=click.Path(path_type=Path))
@passphrase_file_option
@json_option
def show_id(key_file: Path, passphrase_file: Path | None, as_json: bool) -> None:
    """Print the key id of a public (.pub) or private (.pem) key."""
    if key_file.is_file() and private_key_is_encrypted(key_file):
        kid = load_private_key(key_file, read_passphrase(passphrase_file)).key_id
    else:
        kid = key_id(load_public_key(key_file))
    if as_json:
        _echo_json({"key_id": kid, "path": str(key_file)})
        return
    click.echo(kid)


@keys.command()
@click.argument("public_key", type=click.Path(path_type=Path))
@click.option("--keyring", "keyring_dir", required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the key id and the keyring as JSON.")
def trust(public_key: Path, keyring_dir: Path, as_json: bool) -> None:
    """Add PUBLIC_KEY to a keyring (created if missing)."""
    kid = trust_key(keyring_dir, public_key)
    if as_json:
        _echo_json({"key_id": kid, "keyring": str(keyring_dir), **_keyring_document(keyring_dir)})
        return
    click.echo(f"trusted {kid}")


@keys.command()
@click.argument("revoked_key_id")
@click.option("--keyring", "keyring_dir", required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the key id and the keyring as JSON.")
def revoke(revoked_key_id: str, keyring_dir: Path, as_json: bool) -> None:
    """Revoke a key id in a keyring: its signatures never count again."""
    kid = revoked_key_id.lower()
    revoke_key(keyring_dir, kid)
    if as_json:
        _echo_json({"key_id": kid, "keyring": str(keyring_dir), **_keyring_document(keyring_dir)})
        return
    click.echo(f"revoked {kid}")


@keys.command()
@click.argument("count", type=click.IntRange(min=1))
@click.option("--keyring", "keyring_dir", required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the keyring as JSON.")
def threshold(count: int, keyring_dir: Path, as_json: bool) -> None:
    """Require COUNT distinct trusted keys to sign."""
    set_threshold(keyring_dir, count)
    if as_json:
        _echo_json({"keyring": str(keyring_dir), **_keyring_document(keyring_dir)})
        return
    click.echo(f"threshold {count}")


@keys.command("list")
@click.option("--keyring", "keyring_dir", required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the keyring as JSON.")
def list_keys(keyring_dir: Path, as_json: bool) -> None:
    """Show a keyring: trusted and revoked key ids and the threshold.

    A keyring that verifies nothing (a threshold above its trusted keys) is shown all the
    same, with a warning on stderr saying why and how to repair it.
    """
    keyring = KeyringFiles.read(keyring_dir)
    problem = keyring.problem()
    if problem is not None:
        click.echo(f"warning: {printable(problem)}", err=True)
    if as_json:
        click.echo(json.dumps(_keyring_document(keyring_dir), indent=2))
        return
    for kid in sorted(set(keyring.trusted) | keyring.revoked):
        click.echo(f"{kid} {'revoked' if kid in keyring.revoked else 'trusted'}")
    click.echo(f"threshold {keyring.threshold}")
