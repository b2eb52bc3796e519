"""``fleet-updater provision``: make a freshly flashed device ready (record the factory release,
write the boot scripts and a fresh boot state), and the plan it prints before doing so."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import click

from bootloader_hooks import boot_scripts
from fleet_core.text import printable
from image_builder.manifest import MAX_SECURITY_VERSION, is_release_version
from updater.cli.common import booted_root_slot, command_runtime, echo_document, json_option
from updater.errors import ConfigError, UpdaterError
from updater.lifecycle import boot_selection
from updater.state import update_lock


@click.command()
@click.option(
    "--version", "version", required=True,
    help="The release the running slot holds from the factory (as its bundle names it).",
)  # fmt: skip
@click.option(
    "--security-version", required=True, type=click.IntRange(0, MAX_SECURITY_VERSION),
    help="That release's security version: the floor the device starts from.",
)  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Check and print what would be done; change nothing.")
@json_option
@click.pass_context
def provision(
    ctx: click.Context, version: str, security_version: int, dry_run: bool, as_json: bool
) -> None:
    """Make a freshly flashed device ready: check the whole configuration, record the release
    the running slot holds (the factory release: committed, its security version the floor),
    write the boot script the configured backend's firmware runs where it is missing (GRUB's
    grub.cfg beside the grubenv; U-Boot's boot.scr beside a file-backed environment; an
    existing one is kept as it is), and write a fresh boot state with that slot as primary and
    the other slot not bootable. What it will do is printed first; --dry-run stops there.

    Refused when the configuration is not the file's own (damaged: a fallback was used), when
    the device does not run from a root slot, or when the running slot already holds another
    release (provisioning again with the same release changes nothing).

    With --json, no plan in words: one document, the plan with --dry-run, else what was done."""
    runtime = command_runtime(ctx, log_to_stdout=False, report=False, read_only=dry_run)
    if runtime.loaded.problems:
        raise ConfigError(f"configuration: {runtime.loaded.problems[0]}")
    if not is_release_version(version):
        raise click.BadParameter(f"{version!r} is not a semantic version", param_hint="--version")
    # a dry run writes nothing, not even the lock file
    locked = contextlib.nullcontext() if dry_run else update_lock(runtime.config.data_dir)
    with locked:
        booted = booted_root_slot(runtime)
        state = runtime.store.load(keep_evidence=not dry_run).state
        held = state.slot(booted)
        if held.version not in (None, version) or held.security_version not in (
            None, security_version,
        ):  # fmt: skip
            raise UpdaterError(
                f"slot {booted} holds {held.version} (security version {held.security_version})"
                f" already: provisioning records a factory release once"
            )
        floor = max(state.installed_security_version, security_version)
        recorded = replace(
            state.with_slot(booted, status="good", version=version,
                            security_version=security_version, failures=0, trial_boots=0),
            installed_security_version=floor,
        )  # fmt: skip
        primary, fallback = boot_selection(recorded, booted)
        scripts = boot_scripts.plan(runtime.backend)
        document: dict[str, Any] = {
            "dry_run": dry_run,
            "configuration": {
                "source": str(runtime.loaded.source),
                "backend": runtime.backend.name,
                "data_dir": str(runtime.config.data_dir),
            },
            "slot": booted,
            "version": version,
            "security_version": security_version,
            "security_floor": floor,
            "boot_scripts": [script.to_dict() for script in scripts],
            "boot_state": {"primary": primary, "fallback": fallback},
        }
        if not as_json:
            for line in _provision_plan(document, runtime.backend.name):
                click.echo(printable(line))
        if dry_run:
            if as_json:
                echo_document(document)
            else:
                click.echo("dry run: nothing changed")
            return
        state = runtime.store.save(recorded)
        written = boot_scripts.install(scripts)
        primary, fallback = runtime.lifecycle.repair_boot_state(state, "provisioned")
        runtime.log.event("device.provisioned", slot=booted, version=version,
                          security_version=security_version,
                          boot_scripts=[str(path) for path in written])  # fmt: skip
    if as_json:
        document["boot_scripts"] = [
            script.to_dict(written=script.path in written) for script in scripts
        ]
        document["boot_state"] = {"primary": primary, "fallback": fallback}
        echo_document(document)
        return
    click.echo(f"provisioned: slot {primary} runs {version}")


def _provision_plan(document: dict[str, Any], backend: str) -> list[str]:
    """The plan ``provision`` prints before doing anything, from its document."""
    configuration, boot_state = document["configuration"], document["boot_state"]
    lines = [
        f"configuration {configuration['source']}: ok ({backend} backend, "
        f"data in {configuration['data_dir']})",
        f"running slot {document['slot']}: record {document['version']}, security version "
        f"{document['security_version']} (committed; the device's floor becomes "
        f"{document['security_floor']})",
    ]
    for script in document["boot_scripts"]:
        where = f"{script['path']}: " if script["path"] else ""
        if script["action"] == "write":
            lines.append(f"boot script {script['name']}: {where}written, {script['detail']}")
        elif script["action"] == "kept":
            lines.append(f"boot script {script['name']}: {where}kept, {script['detail']}")
        else:
            lines.append(f"boot script {script['name']}: {where}{script['detail']}")
    if not document["boot_scripts"]:
        lines.append(f"boot script: none needed (the {backend} firmware follows the boot state)")
    lines.append(
        f"boot state: written fresh, primary {boot_state['primary']}, "
        f"fallback {boot_state['fallback'] or 'none'}"
    )
    return lines
