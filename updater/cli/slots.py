"""The commands that change what a root slot holds or how it boots: ``install`` and ``recover``
write a release into a slot and arm it, ``rollback`` arms the previous release, ``mark-good``
and ``mark-bad`` commit or condemn a slot by hand, ``repair`` rebuilds the boot state and
``resume`` lifts the crash-loop guard's suspension of updates."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import click

from bootloader_hooks.base import ROOT_SLOTS, other_slot
from fleet_core.errors import FleetError
from updater.cli.common import (
    EXIT_REBOOT_REQUIRED,
    booted_root_slot,
    command_runtime,
    echo_document,
    json_option,
    reboot_required,
)
from updater.device import run_reboot
from updater.errors import UpdaterError
from updater.install import InstallResult
from updater.state import update_lock


@reboot_required
@click.command()
@click.argument("source")
@click.option("--no-reboot", is_flag=True, help="Stop after arming the trial boot (exit 3).")
@json_option
@click.pass_context
def install(ctx: click.Context, source: str, no_reboot: bool, as_json: bool) -> None:
    """Install the bundle SOURCE (a file or an http(s) URL) into the inactive slot."""
    runtime = command_runtime(ctx, log_to_stdout=not as_json)
    with update_lock(runtime.config.data_dir):
        options: dict[str, Any] = {}
        if sys.stderr.isatty():
            bar = click.progressbar(length=1, label="installing", file=sys.stderr)

            def progress(done: int, total: int) -> None:
                bar.length = total
                bar.update(done - bar.pos)

            options["progress"] = progress
        try:
            result = runtime.installer(**options).install(source, reboot=not no_reboot)
        except FleetError:
            runtime.publish_metrics(event="failed")
            raise
        runtime.publish_metrics(install=result)
    if as_json:
        echo_document(_install_document(result, reboot_required=no_reboot))
    if no_reboot:
        click.echo(
            f"installed {result.version} into slot {result.slot}: reboot to try it", err=True
        )
        ctx.exit(EXIT_REBOOT_REQUIRED)


def _install_document(result: InstallResult, *, reboot_required: bool) -> dict[str, Any]:
    """What ``install --json`` and ``recover --json`` print: the slot written, the release in
    it, how it is armed (``trial``, or ``repaired``: committed by a fresh boot state), and
    whether a reboot is needed (exit 3) or under way."""
    return {
        "slot": result.slot,
        "version": result.version,
        "armed": result.armed,
        "bytes_written": result.bytes_written,
        "reboot_required": reboot_required,
        "rebooting": result.rebooting,
    }


@click.command("mark-good")
@json_option
@click.pass_context
def mark_good(ctx: click.Context, as_json: bool) -> None:
    """Commit the booted slot by hand (what the boot check does when healthy)."""
    runtime = command_runtime(ctx, log_to_stdout=False)
    with update_lock(runtime.config.data_dir):
        slot = booted_root_slot(runtime)
        state = runtime.lifecycle.commit(runtime.store.load().state, slot)
        runtime.log.event(
            "slot.marked_good", slot=slot, security_floor=state.installed_security_version
        )
    if as_json:
        echo_document(
            {"slot": slot, "status": "good", "security_floor": state.installed_security_version}
        )
        return
    click.echo(f"slot {slot} committed")


@click.command("mark-bad")
@click.argument("slot", required=False, type=click.Choice(["a", "b", "booted", "other"]))
@click.option(
    "--force", is_flag=True, help="Even the last good root slot (the device boots safe mode)."
)
@json_option
@click.pass_context
def mark_bad(ctx: click.Context, slot: str | None, force: bool, as_json: bool) -> None:
    """Never boot SLOT again until it is rewritten (default: the booted slot)."""
    runtime = command_runtime(ctx, log_to_stdout=False)
    with update_lock(runtime.config.data_dir):
        chosen = slot or "booted"
        if chosen in ("booted", "other"):
            booted = booted_root_slot(runtime)
            chosen = booted if chosen == "booted" else other_slot(booted)
        runtime.lifecycle.mark_bad(runtime.store.load().state, chosen, force=force)
        runtime.log.event("slot.marked_bad", slot=chosen, forced=force)
    if as_json:
        echo_document({"slot": chosen, "status": "bad", "forced": force})
        return
    click.echo(f"slot {chosen} marked bad")


@click.command()
@click.option("--force", is_flag=True, help="Rebuild the boot state even when it reads intact.")
@json_option
@click.pass_context
def repair(ctx: click.Context, force: bool, as_json: bool) -> None:
    """Rebuild a damaged or missing boot state (grubenv, the U-Boot environment, autoboot.txt)
    from the state store: the good slot the store vouches for as primary, the other good one
    behind it. The boot check does the same at every boot; nothing else writes it anew.

    With --json: ``repaired`` false when the boot state was intact; else the reason, and the
    primary and the fallback written (null: none, the primary null meaning safe mode)."""
    runtime = command_runtime(ctx, log_to_stdout=False)
    with update_lock(runtime.config.data_dir):
        problem = runtime.lifecycle.boot_state_problem()
        if problem is None and not force:
            if as_json:
                echo_document({"repaired": False})
            else:
                click.echo("boot state intact: nothing to repair")
            return
        reason = problem or "rebuilt on request"
        primary, fallback = runtime.lifecycle.repair_boot_state(runtime.store.load().state, reason)
    if as_json:
        echo_document(
            {"repaired": True, "reason": reason, "primary": primary, "fallback": fallback}
        )
        return
    click.echo(f"boot state rebuilt: primary {primary or 'none (safe mode)'}, "
               f"fallback {fallback or 'none'}")  # fmt: skip


@reboot_required
@click.command()
@click.option("--no-reboot", is_flag=True, help="Arm the rollback, do not reboot (exit 3).")
@json_option
@click.pass_context
def rollback(ctx: click.Context, no_reboot: bool, as_json: bool) -> None:
    """Go back to the previous release in the other slot: no download, one reboot.

    The other slot gets a trial boot, so if it no longer boots the firmware comes back here.
    With --json the document is printed once the trial is armed, before the reboot.
    """
    runtime = command_runtime(ctx, log_to_stdout=not as_json)
    with update_lock(runtime.config.data_dir):
        other = other_slot(booted_root_slot(runtime))
        store = runtime.store
        state = store.load().state
        previous = state.slot(other)
        if previous.status != "good":
            raise UpdaterError(
                f"slot {other} holds no intact previous release ({previous.status}): "
                "install one instead"
            )
        runtime.lifecycle.arm_trial(state, other, purpose="rollback")
        runtime.log.event("rollback.armed", slot=other, version=state.slot(other).version)
        if as_json:
            echo_document({
                "slot": other,
                "version": previous.version,
                "armed": "trial",
                "reboot_required": no_reboot,
                "rebooting": not no_reboot,
            })  # fmt: skip
        if no_reboot:
            ctx.exit(EXIT_REBOOT_REQUIRED)
        command = list(runtime.config.reboot_command or runtime.backend.reboot_command())
        (runtime.reboot or run_reboot)(command)


@reboot_required
@click.command()
@click.argument("source")
@click.option("--slot", type=click.Choice(list(ROOT_SLOTS)), help="Root slot to write.")
@click.option("--no-reboot", is_flag=True, help="Stop after arming the slot (exit 3).")
@json_option
@click.pass_context
def recover(
    ctx: click.Context, source: str, slot: str | None, no_reboot: bool, as_json: bool
) -> None:
    """In safe mode: put the release SOURCE (a bundle file or URL, the last known-good one)
    into a root slot and boot it (see updater.recovery)."""
    from updater.recovery import Recovery

    runtime = command_runtime(ctx, log_to_stdout=not as_json)
    with update_lock(runtime.config.data_dir):
        result = Recovery(runtime.installer()).recover(source, slot=slot, reboot=not no_reboot)
        runtime.publish_metrics()
    if as_json:
        echo_document(_install_document(result, reboot_required=no_reboot))
    if no_reboot:
        click.echo(f"recovered {result.version} into slot {result.slot} ({result.armed})", err=True)
        ctx.exit(EXIT_REBOOT_REQUIRED)


@click.command()
@json_option
@click.pass_context
def resume(ctx: click.Context, as_json: bool) -> None:
    """Resume updates suspended by the crash-loop guard."""
    runtime = command_runtime(ctx, log_to_stdout=False)
    with update_lock(runtime.config.data_dir):
        store = runtime.store
        state = store.load().state
        store.save(replace(state, suspended=None, restarts=()))
        runtime.log.event("update.resumed", previously=state.suspended)
    if as_json:
        echo_document({"resumed": True, "previously": state.suspended})
        return
    click.echo("updates resumed")
