"""``fleet demo``: the whole path that exists, end to end, on embedded defaults.

Today: make a signing key and a keyring that trusts it, build a root filesystem image from a
sample tree, bundle and sign it, verify every byte against the keyring, and show the bundle.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from image_builder.bundle import verify_bundle
from image_builder.bundle_writer import ImageSource, create_bundle
from image_builder.filesystem import build_filesystem_image
from signing.keyring import Keyring, trust_key
from signing.keys import generate_key

SAMPLE_FILES = {
    "etc/os-release": 'NAME="Metrica Fleet demo"\nVERSION_ID="1.0.0"\n',
    "etc/hostname": "fleet-demo\n",
    "etc/fleet/updater.toml": 'compatible = "metrica-rpi4"\n',
    "usr/bin/hello": "#!/bin/sh\necho hello from the demo root filesystem\n",
    "var/lib/.keep": "",
}


def write_sample_tree(root: Path) -> None:
    """A small root filesystem tree, the same every time."""
    for name, text in SAMPLE_FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "usr/bin/hello").chmod(0o755)


def step(text: str) -> None:
    click.secho(f"==> {text}", bold=True)


@click.command()
@click.option(
    "--workdir",
    default="build/demo",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
)
def demo(workdir: Path) -> None:
    """Run the end-to-end demo in WORKDIR (recreated each run)."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)

    step("generate a release signing key")
    key = generate_key(workdir / "release-key")
    click.echo(f"key id {key.key_id} ({workdir / 'release-key.pem'}, mode 0600)")

    step("create the device keyring that trusts it")
    trust_key(workdir / "keyring", workdir / "release-key.pub")

    step("build a root filesystem image (ext4, 64 MiB) from a sample tree")
    tree = workdir / "rootfs-tree"
    write_sample_tree(tree)
    rootfs = build_filesystem_image(
        tree, workdir / "rootfs.ext4", "ext4", size_bytes=64 << 20, label="rootfs"
    )
    click.echo(f"{rootfs.path}: {rootfs.size_bytes} bytes")

    step("bundle and sign it (zstd)")
    bundle_path = workdir / "release-1.0.0.bundle"
    create_bundle(
        bundle_path,
        images=[ImageSource("rootfs", rootfs.path)],
        keys=[key],
        compatible="metrica-rpi4",
        version="1.0.0",
        security_version=1,
        compression="zstd",
    )
    click.echo(f"{bundle_path}: {bundle_path.stat().st_size} bytes")

    step("verify signature and every image byte against the keyring")
    verified = verify_bundle(bundle_path, Keyring.load(workdir / "keyring"))
    click.echo(f"OK, signed by {', '.join(verified.signed_by)}")

    step("bundle info")
    from image_builder.cli import info

    ctx = click.get_current_context()
    ctx.invoke(info, bundle_path=bundle_path, as_json=False)
