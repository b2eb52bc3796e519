"""``fleet image`` (filesystem and disk images) and ``fleet bundle`` (signed release bundles)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fleet_core.errors import FleetError
from fleet_core.inputs import refuse_non_regular_input
from fleet_core.outputs import refuse_output_over_inputs
from fleet_core.progress import progress
from fleet_core.text import printable
from image_builder.bundle import read_bundle_info, verify_bundle
from image_builder.bundle_writer import ImageSource, create_bundle
from image_builder.errors import BundleCompatibilityError
from image_builder.manifest import SLOT_CLASSES
from signing.cli import passphrase_file_option, read_passphrase
from signing.keyring import Keyring
from signing.keys import SigningKey, load_private_key, private_key_is_encrypted


@click.group()
def image() -> None:
    """Build filesystem images for slots, and import existing disk images."""


def _echo_json(document: object) -> None:
    """The one JSON document of a ``--json`` run: ASCII, sorted keys, alone on stdout."""
    click.echo(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=True))


@image.command()
@click.argument("source_dir", type=click.Path(path_type=Path))
@click.option(
    "--type",
    "fs_type",
    default="ext4",
    show_default=True,
    type=click.Choice(["ext4", "squashfs", "vfat"]),
)
@click.option(
    "--size", "size_text",
    help="Image size (ext4 and vfat), as written: 512M or 512MiB binary, 500MB decimal.",
)  # fmt: skip
@click.option("--label", help="Filesystem label.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the image built as JSON.")
def rootfs(
    source_dir: Path,
    fs_type: str,
    size_text: str | None,
    label: str | None,
    output: Path,
    as_json: bool,
) -> None:
    """Build a filesystem image from SOURCE_DIR, reproducibly (honours SOURCE_DATE_EPOCH)."""
    from image_builder.filesystem import build_filesystem_image, parse_size

    try:
        size = parse_size(size_text) if size_text is not None else None
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--size") from err
    refuse_output_over_inputs(output, [source_dir], option="-o")
    built = build_filesystem_image(source_dir, output, fs_type, size_bytes=size, label=label)
    if as_json:
        document = {
            "path": str(built.path),
            "fs_type": built.fs_type,
            "size": built.size_bytes,
            "label": built.label,
        }
        _echo_json(document)
        return
    click.echo(f"{built.path}: {built.fs_type}, {built.size_bytes} bytes")


@image.command("import")
@click.argument("disk", type=click.Path(path_type=Path))
@click.option("--out-dir", required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the slot images written as JSON.")
def import_disk(disk: Path, out_dir: Path, as_json: bool) -> None:
    """Extract the boot (FAT) and root (ext4) partitions of a disk image as slot images."""
    from image_builder.disk_import import OUTPUT_NAMES, import_disk_image

    if out_dir.is_dir():
        for name in OUTPUT_NAMES:
            refuse_output_over_inputs(out_dir / name, [disk], option="--out-dir")
    parts = import_disk_image(disk, out_dir)
    if as_json:
        images = [
            {
                "slot_class": part.slot_class,
                "path": str(part.path),
                "partition": part.number,
                "offset": part.offset_bytes,
                "size": part.size_bytes,
                "fs_type": part.fs_type,
            }
            for part in parts
        ]
        _echo_json({"disk": str(disk), "images": images})
        return
    for part in parts:
        click.echo(
            f"{part.slot_class}: {part.path} (partition {part.number}, {part.size_bytes} bytes)"
        )


@image.command()
@click.option("--layout", required=True, type=click.Choice(["grub", "rpi"]))
@click.option(
    "--rootfs", required=True, type=click.Path(path_type=Path), help="ext4 image for root A."
)
@click.option(
    "--safe", "safe_rootfs", required=True, type=click.Path(path_type=Path),
    help="squashfs image of the safe-mode slot.",
)  # fmt: skip
@click.option("--bootfs", type=click.Path(path_type=Path), help="rpi: FAT image for boot A.")
@click.option(
    "--safe-bootfs", type=click.Path(path_type=Path), help="rpi: FAT image of the safe-mode slot."
)
@click.option(
    "--root-size",
    help="Size of each root slot, as --size (default: the rootfs image's); rounded up to MiB.",
)
@click.option(
    "--data-size", default="64M", show_default=True,
    help="Size of the data partition, as --size; rounded up to MiB.",
)  # fmt: skip
@click.option(
    "--data-content",
    "data_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A directory whose files are copied into the data partition.",
)
@click.option(
    "--kernel-options", default="ro", show_default=True,
    help="grub: kernel parameters of every slot (root= and fleet.slot= are added).",
)  # fmt: skip
@click.option("--attempts", default=3, show_default=True, type=click.IntRange(1, 9))
@click.option("--grub-efi", type=click.Path(path_type=Path), help="grub: a GRUB EFI binary to use.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the disk built as JSON.")
def disk(
    layout: str,
    rootfs: Path,
    safe_rootfs: Path,
    bootfs: Path | None,
    safe_bootfs: Path | None,
    root_size: str | None,
    data_size: str,
    data_dir: Path | None,
    kernel_options: str,
    attempts: int,
    grub_efi: Path | None,
    output: Path,
    as_json: bool,
) -> None:
    """Build a whole-device disk (GPT) for provisioning: slot A holds ROOTFS and is
    committed, slot B is empty."""
    from image_builder.disk import grub_disk, rpi_disk
    from image_builder.filesystem import parse_size

    sizes: dict[str, int | None] = {}
    for name, text in (("--root-size", root_size), ("--data-size", data_size)):
        try:
            sizes[name] = parse_size(text) if text is not None else None
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint=name) from err
    inputs = [p for p in (rootfs, safe_rootfs, bootfs, safe_bootfs, grub_efi, data_dir) if p]
    refuse_output_over_inputs(output, inputs, option="-o")
    slot_size = sizes["--root-size"] or rootfs.stat().st_size
    data_bytes = sizes["--data-size"] or 64 << 20
    if layout == "grub":
        built = grub_disk(
            output,
            boot_files=_grub_boot_files(kernel_options, attempts),
            rootfs=rootfs,
            safe_rootfs=safe_rootfs,
            root_size=slot_size,
            data_size=data_bytes,
            data_dir=data_dir,
            grub_efi=grub_efi,
        )
    else:
        if bootfs is None or safe_bootfs is None:
            raise click.UsageError("--layout rpi needs --bootfs and --safe-bootfs")
        built = rpi_disk(
            output,
            boot_files=_rpi_boot_files(),
            bootfs=bootfs,
            rootfs=rootfs,
            safe_bootfs=safe_bootfs,
            safe_rootfs=safe_rootfs,
            root_size=slot_size,
            data_size=data_bytes,
            data_dir=data_dir,
        )
    if as_json:
        partitions = [
            {
                "number": part.number,
                "label": part.label,
                "offset": part.offset_bytes,
                "size": part.size_bytes,
            }
            for part in built.partitions
        ]
        _echo_json(
            {
                "path": str(built.path),
                "layout": layout,
                "size": built.size_bytes,
                "partitions": partitions,
            }
        )
        return
    click.echo(f"{built.path}: {layout} disk, {built.size_bytes} bytes")
    for part in built.partitions:
        click.echo(
            f"  {part.number} {part.label:<10} at {part.offset_bytes}, {part.size_bytes} bytes"
        )


# The boot selection files on a new disk are the boot backends' own (bootloader_hooks.base's
# provisioning, the same code that repairs them on the device), which is why this command,
# alone in image_builder, imports bootloader_hooks.


def _grub_boot_files(kernel_options: str, attempts: int) -> dict[str, bytes]:
    """grub.cfg and a grubenv with slot A committed, under the ESP directory GRUB reads."""
    from bootloader_hooks.base import provisioned_files

    return provisioned_files("grub", primary="a", attempts=attempts, kernel_options=kernel_options)


def _rpi_boot_files() -> dict[str, bytes]:
    """autoboot.txt booting boot A (partition 2), nothing on trial."""
    from bootloader_hooks.base import provisioned_files

    return provisioned_files("tryboot", primary="a")


@click.group()
def bundle() -> None:
    """Create, verify and inspect signed release bundles."""


def _parse_image(text: str) -> ImageSource:
    slot_class, sep, path = text.partition("=")
    if not sep or not path:
        raise click.BadParameter(f"{text!r}: expected SLOT_CLASS=PATH", param_hint="--image")
    if slot_class not in SLOT_CLASSES:
        raise click.BadParameter(
            f"{text!r}: slot class must be one of {', '.join(SLOT_CLASSES)}", param_hint="--image"
        )
    return ImageSource(slot_class, Path(path))


def _load_key(path: Path, passphrase_file: Path | None, *, prompt_on_stderr: bool) -> SigningKey:
    refuse_non_regular_input(path, "--key")
    passphrase = read_passphrase(passphrase_file)
    if passphrase is None and path.is_file() and private_key_is_encrypted(path):
        passphrase = click.prompt(
            f"Passphrase for {path}", hide_input=True, err=prompt_on_stderr
        ).encode()
    return load_private_key(path, passphrase)


@bundle.command()
@click.option("--compatible", required=True, help="Which devices may install it.")
@click.option("--version", "version", required=True, help="Semantic version, e.g. 1.4.0.")
@click.option(
    "--security-version",
    required=True,
    type=click.IntRange(min=0),
    help="Anti-rollback counter: devices refuse bundles below the installed one.",
)
@click.option(
    "--image",
    "images",
    required=True,
    multiple=True,
    help="SLOT_CLASS=PATH, e.g. rootfs=root.ext4; repeat for bootfs.",
)
@click.option(
    "--key",
    "key_paths",
    required=True,
    multiple=True,
    type=click.Path(path_type=Path),
    help="Private key (.pem); repeat to co-sign.",
)
@passphrase_file_option
@click.option("--compress", type=click.Choice(["none", "zstd"]), default="none", show_default=True)
@click.option(
    "--format",
    "bundle_format",
    type=click.Choice(["1", "2"]),
    default="2",
    show_default=True,
    help="2: images in content-defined chunks with a chunk index, so devices download only "
    "what changed; 1: for updaters older than format 2, which refuse it.",
)
@click.option("--product", default="metrica-fleet", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the signed manifest as JSON.")
def create(
    compatible: str,
    version: str,
    security_version: int,
    images: tuple[str, ...],
    key_paths: tuple[Path, ...],
    passphrase_file: Path | None,
    compress: str,
    bundle_format: str,
    product: str,
    output: Path,
    as_json: bool,
) -> None:
    """Build and sign a release bundle."""
    sources = [_parse_image(text) for text in images]
    inputs = [*key_paths, *(s.path for s in sources)]
    if passphrase_file is not None:
        inputs.append(passphrase_file)
    refuse_output_over_inputs(output, inputs, option="-o")
    keys = [_load_key(path, passphrase_file, prompt_on_stderr=as_json) for path in key_paths]
    # the images' sizes as they are now (create_bundle checks them before reading a byte)
    total = sum(s.path.stat().st_size for s in sources if s.path.is_file())
    with progress(total, f"bundling {output.name}", enabled=not as_json) as update:
        manifest = create_bundle(
            output,
            images=sources,
            keys=keys,
            compatible=compatible,
            version=version,
            security_version=security_version,
            product=product,
            compression=compress,
            progress=update,
            chunked=bundle_format == "2",
        )
    if as_json:
        document = {
            "bundle": str(output),
            "manifest": manifest.to_dict(),
            "signed_by": [k.key_id for k in keys],
            "size": output.stat().st_size,
        }
        click.echo(json.dumps(document, indent=2, sort_keys=True))
        return
    click.echo(
        f"{output}: {manifest.product} {manifest.version} for {manifest.compatible}, "
        f"signed by {', '.join(k.key_id for k in keys)}"
    )


@bundle.command()
@click.argument("bundle_path", type=click.Path(path_type=Path))
@click.option("--keyring", "keyring_dir", required=True, type=click.Path(path_type=Path))
@click.option("--compatible", help="Also require this compatible string.")
@click.option(
    "--json", "as_json", is_flag=True,
    help='Print the outcome as JSON ({"ok": false, "problem": ...} and exit 1 when it fails).',
)  # fmt: skip
def verify(bundle_path: Path, keyring_dir: Path, compatible: str | None, as_json: bool) -> None:
    """Check a bundle's signatures and every byte of its images."""
    try:
        keyring = Keyring.load(keyring_dir)
        size = bundle_path.stat().st_size if bundle_path.is_file() else 0
        with progress(size, f"verifying {bundle_path.name}", enabled=not as_json) as update:
            result = verify_bundle(bundle_path, keyring, progress=update)
        manifest = result.manifest
        if compatible is not None and manifest.compatible != compatible:
            raise BundleCompatibilityError(
                f"{bundle_path}: built for {manifest.compatible!r}, not {compatible!r}"
            )
    except FleetError as err:
        if not as_json:
            raise
        click.echo(json.dumps({"ok": False, "problem": printable(str(err))}, indent=2))
        raise SystemExit(1) from None
    if as_json:
        document = {
            "ok": True,
            "manifest": manifest.to_dict(),
            "signed_by": list(result.signed_by),
        }
        click.echo(json.dumps(document, indent=2, sort_keys=True))
        return
    click.echo(
        f"{bundle_path}: OK: {manifest.product} {manifest.version} for "
        f"{manifest.compatible}, security version {manifest.security_version}, "
        f"signed by {', '.join(result.signed_by)}"
    )


@bundle.command()
@click.argument("bundle_path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(bundle_path: Path, as_json: bool) -> None:
    """Show a bundle's manifest and signers (without verifying; see 'verify')."""
    manifest, envelope = read_bundle_info(bundle_path)
    signers = [s.key_id for s in envelope.signatures]
    if as_json:
        document = {
            "manifest": manifest.to_dict(),
            "signatures": signers,
            "size": bundle_path.stat().st_size,
            "verified": False,
        }
        click.echo(json.dumps(document, indent=2, sort_keys=True))
        return
    click.echo(f"bundle:           {bundle_path} ({bundle_path.stat().st_size} bytes)")
    click.echo(f"product:          {manifest.product}")
    click.echo(f"compatible:       {manifest.compatible}")
    click.echo(f"version:          {manifest.version}")
    click.echo(f"security version: {manifest.security_version}")
    click.echo(f"created:          {manifest.created}")
    click.echo(f"format:           {manifest.format}")
    for entry in manifest.images:
        chunks = (
            "" if entry.chunk_index is None else f", chunk index {entry.chunk_index.size} bytes"
        )
        click.echo(
            f"image {entry.slot_class}: {entry.filename}, {entry.compression}, "
            f"{entry.size} bytes stored, {entry.uncompressed_size} bytes, "
            f"sha256 {entry.uncompressed_sha256}{chunks}"
        )
    for kid in signers:
        click.echo(f"signed by:        {kid} (not verified; use 'fleet bundle verify')")
