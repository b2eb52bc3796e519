"""``fleet-updater``: the device side.

Exit codes: 0 success; 1 failure (one line, ``Error: …``); 2 usage error;
3 (``EXIT_REBOOT_REQUIRED``) installed and armed, reboot required (``install --no-reboot``);
4 (``EXIT_UNHEALTHY``) the boot check found this boot unhealthy and is rebooting.

Every command but ``daemon`` takes ``--json``: one JSON document on stdout describing the
outcome (printed before the exit status 3 or 4 too), the events going to stderr instead of
stdout. A command that fails prints no document: its ``Error:`` line is on stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from bootloader_hooks import boot_scripts
from bootloader_hooks.base import ROOT_SLOTS, other_slot
from fleet_core.cli import FleetGroup, exits
from fleet_core.errors import FleetError
from fleet_core.text import printable
from image_builder.manifest import MAX_SECURITY_VERSION, is_release_version
from updater.config import DEFAULT_CONFIG_PATH, UpdaterConfig, load_config
from updater.device import run_reboot
from updater.errors import ConfigError, LockedError, UpdaterError
from updater.install import InstallResult
from updater.lifecycle import boot_selection
from updater.log import EventLog, EventSink, device_labels
from updater.runtime import Runtime, build_backend, reporting_log
from updater.state import update_lock

EXIT_REBOOT_REQUIRED = 3
EXIT_UNHEALTHY = 4
reboot_required = exits(EXIT_REBOOT_REQUIRED, "a slot is armed, a reboot is needed (`--no-reboot`)")

json_option = click.option(
    "--json", "as_json", is_flag=True,
    help="One JSON document on stdout describing the outcome; events go to stderr.",
)  # fmt: skip


def _echo_document(document: dict[str, Any]) -> None:
    # ASCII only: every string may come from a bundle or a file someone edited
    click.echo(json.dumps(document, indent=2, sort_keys=True))


def _device_id(data_dir: Path) -> str | None:
    """The device id for the log's ``device`` label, once the device has a key (read here,
    never made: the daemon makes it)."""
    from signing.keys import key_id, load_public_key
    from updater.identity import PUBLIC_KEY_NAME, identity_dir

    try:
        return key_id(load_public_key(identity_dir(data_dir) / PUBLIC_KEY_NAME))
    except FleetError:
        return None


def _runtime(
    ctx: click.Context,
    *,
    log_to_stdout: bool,
    report: bool = True,
    read_only: bool = False,
    on_defaults: bool = False,
) -> Runtime:
    """The updater for one command; with ``report``, its events also go to the server (see
    ``updater.runtime.reporting_log``); ``read_only``: nothing is written (no last-good copy,
    no outbox); ``on_defaults``: the command also runs on the built-in defaults when the
    configuration is unusable and no last-good copy exists (``status`` to report it, the boot
    check and the daemon so as not to make a boot fail over it); every other command refuses,
    naming what is wrong with the file rather than what the defaults lack.

    Raises:
        ConfigError: the configuration is unusable and only the defaults are left.
    """
    options = ctx.obj
    loaded = load_config(
        options["config"], data_dir=options["data_dir"], build=build_backend,
        remember=not read_only,
    )  # fmt: skip
    if loaded.source == "defaults" and loaded.problems and not on_defaults:
        raise ConfigError(f"{loaded.problems[0]} (and no last good configuration to fall back to)")
    labels = device_labels(loaded.config.role, _device_id(loaded.config.data_dir))
    log: EventSink = EventLog(sys.stdout if log_to_stdout else sys.stderr, labels=labels)
    if report and not read_only:
        log = reporting_log(log, loaded.config)
    for problem in loaded.problems:
        log.event("config.fallback", level="warning", source=loaded.source, problem=problem)
    factory = options.get("runtime_factory")
    if factory is not None:
        runtime: Runtime = factory(loaded, log)
        return runtime
    return Runtime(loaded, log)


@click.group(cls=FleetGroup)
@click.version_option(package_name="metrica-fleet")
@click.option(
    "--config", type=click.Path(path_type=Path), default=DEFAULT_CONFIG_PATH, show_default=True
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=UpdaterConfig().data_dir,
    show_default=True,
    envvar="FLEET_DATA_DIR",
    help="Where the last configuration that loaded cleanly is kept, for when the "
    "configuration file is damaged (a valid file names its own data_dir).",
)
@click.pass_context
def main(ctx: click.Context, config: Path, data_dir: Path) -> None:
    """Metrica Fleet device updater."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    ctx.obj["data_dir"] = data_dir


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show slots, boot state and update state, as far as they can be read; writes nothing.

    Exits 1 (after printing what it found) when the configuration is missing, unreadable or
    invalid, or the boot state cannot be read (``repair`` rebuilds it): each problem is named
    in the document and on one ``Error:`` line.
    """
    document = _runtime(ctx, log_to_stdout=False, read_only=True, on_defaults=True).snapshot()
    if as_json:
        click.echo(json.dumps(document, indent=2, sort_keys=True))
    else:
        _print_status(document)
    problems = _status_problems(document)
    if problems:
        raise UpdaterError("; ".join(problems))


def _status_problems(document: dict[str, Any]) -> list[str]:
    """What makes ``status`` fail: a configuration it fell back from or whose backend cannot
    be built, and a boot state that cannot be read (nor a backend built to read it). A damaged
    state store is reported but is not one: the updater starts afresh from it, keeping the
    security floor."""
    problems = list(document["config"]["problems"])
    if document["bootloader_problem"]:
        problems.append(document["bootloader_problem"])
    return problems


def _print_status(document: dict[str, Any]) -> None:
    # every value may come from a file someone edited: each line is printed inert
    lines = [f"config:    {document['config']['source']}"]
    lines += [f"  problem: {problem}" for problem in document["config"]["problems"]]
    lines.append(f"backend:   {document['backend']}")
    if document["bootloader_problem"]:
        lines.append(f"  problem: {document['bootloader_problem']}")
    trial = " (trial boot)" if document["trial"] else ""
    lines.append(f"booted:    {document['booted']}{trial}")
    lines.append(f"primary:   {document['primary']}")
    for slot, info in document["slots"].items():
        marks = [m for m in ("booted", "primary") if info[m]]
        lines.append(
            f"slot {slot}:    {info['status']:<10} {info['version'] or '-':<12} "
            f"attempts {info['attempts_left']}  {' '.join(marks)}"
        )
    lines.append(f"security:  {document['installed_security_version']}")
    suspended = document["suspended"]
    lines.append(f"updates:   {'suspended: ' + suspended if suspended else 'active'}")
    if document["state_problem"]:
        lines.append(f"  problem: {document['state_problem']}")
    for line in lines:
        click.echo(printable(line))


@reboot_required
@main.command()
@click.argument("source")
@click.option("--no-reboot", is_flag=True, help="Stop after arming the trial boot (exit 3).")
@json_option
@click.pass_context
def install(ctx: click.Context, source: str, no_reboot: bool, as_json: bool) -> None:
    """Install the bundle SOURCE (a file or an http(s) URL) into the inactive slot."""
    runtime = _runtime(ctx, log_to_stdout=not as_json)
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
        _echo_document(_install_document(result, reboot_required=no_reboot))
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


@exits(EXIT_UNHEALTHY, "this boot was judged unhealthy: going back, rebooting")
@main.command("boot-check")
@json_option
@click.pass_context
def boot_check(ctx: click.Context, as_json: bool) -> None:
    """Judge this boot: commit a healthy trial, roll back an unhealthy one (run once per boot).

    With --json, the verdict: the situation found, the slot, the action taken, whether the
    health checks passed (null: none ran), the checks that failed, and whether it reboots."""
    runtime = _runtime(ctx, log_to_stdout=not as_json, on_defaults=True)
    with update_lock(runtime.config.data_dir):
        runtime.sweep_temporaries()
        runtime.record_start()
        verdict = runtime.boot_checker().run()
        runtime.publish_metrics(
            event="committed" if verdict.action == "committed" else None,
            failed_checks=verdict.failed_checks,
        )
    if as_json:
        _echo_document({
            "situation": verdict.situation,
            "slot": verdict.slot,
            "action": verdict.action,
            "healthy": verdict.healthy,
            "failed_checks": list(verdict.failed_checks),
            "rebooting": verdict.reboot,
        })  # fmt: skip
    if verdict.healthy is False:
        ctx.exit(EXIT_UNHEALTHY)


def _booted_root_slot(runtime: Runtime) -> str:
    slot = runtime.backend.booted()
    if slot not in ROOT_SLOTS:
        raise UpdaterError(f"running from slot {slot!r}: this needs a root slot")
    return slot


@main.command("mark-good")
@json_option
@click.pass_context
def mark_good(ctx: click.Context, as_json: bool) -> None:
    """Commit the booted slot by hand (what the boot check does when healthy)."""
    runtime = _runtime(ctx, log_to_stdout=False)
    with update_lock(runtime.config.data_dir):
        slot = _booted_root_slot(runtime)
        state = runtime.lifecycle.commit(runtime.store.load().state, slot)
        runtime.log.event(
            "slot.marked_good", slot=slot, security_floor=state.installed_security_version
        )
    if as_json:
        _echo_document(
            {"slot": slot, "status": "good", "security_floor": state.installed_security_version}
        )
        return
    click.echo(f"slot {slot} committed")


@main.command("mark-bad")
@click.argument("slot", required=False, type=click.Choice(["a", "b", "booted", "other"]))
@click.option(
    "--force", is_flag=True, help="Even the last good root slot (the device boots safe mode)."
)
@json_option
@click.pass_context
def mark_bad(ctx: click.Context, slot: str | None, force: bool, as_json: bool) -> None:
    """Never boot SLOT again until it is rewritten (default: the booted slot)."""
    runtime = _runtime(ctx, log_to_stdout=False)
    with update_lock(runtime.config.data_dir):
        chosen = slot or "booted"
        if chosen in ("booted", "other"):
            booted = _booted_root_slot(runtime)
            chosen = booted if chosen == "booted" else other_slot(booted)
        runtime.lifecycle.mark_bad(runtime.store.load().state, chosen, force=force)
        runtime.log.event("slot.marked_bad", slot=chosen, forced=force)
    if as_json:
        _echo_document({"slot": chosen, "status": "bad", "forced": force})
        return
    click.echo(f"slot {chosen} marked bad")


@main.command()
@click.option("--force", is_flag=True, help="Rebuild the boot state even when it reads intact.")
@json_option
@click.pass_context
def repair(ctx: click.Context, force: bool, as_json: bool) -> None:
    """Rebuild a damaged or missing boot state (grubenv, the U-Boot environment, autoboot.txt)
    from the state store: the good slot the store vouches for as primary, the other good one
    behind it. The boot check does the same at every boot; nothing else writes it anew.

    With --json: ``repaired`` false when the boot state was intact; else the reason, and the
    primary and the fallback written (null: none, the primary null meaning safe mode)."""
    runtime = _runtime(ctx, log_to_stdout=False)
    with update_lock(runtime.config.data_dir):
        problem = runtime.lifecycle.boot_state_problem()
        if problem is None and not force:
            if as_json:
                _echo_document({"repaired": False})
            else:
                click.echo("boot state intact: nothing to repair")
            return
        reason = problem or "rebuilt on request"
        primary, fallback = runtime.lifecycle.repair_boot_state(runtime.store.load().state, reason)
    if as_json:
        _echo_document(
            {"repaired": True, "reason": reason, "primary": primary, "fallback": fallback}
        )
        return
    click.echo(f"boot state rebuilt: primary {primary or 'none (safe mode)'}, "
               f"fallback {fallback or 'none'}")  # fmt: skip


@main.command()
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
    runtime = _runtime(ctx, log_to_stdout=False, report=False, read_only=dry_run)
    if runtime.loaded.problems:
        raise ConfigError(f"configuration: {runtime.loaded.problems[0]}")
    if not is_release_version(version):
        raise click.BadParameter(f"{version!r} is not a semantic version", param_hint="--version")
    # a dry run writes nothing, not even the lock file
    locked = contextlib.nullcontext() if dry_run else update_lock(runtime.config.data_dir)
    with locked:
        booted = _booted_root_slot(runtime)
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
                _echo_document(document)
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
        _echo_document(document)
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


@reboot_required
@main.command()
@click.option("--no-reboot", is_flag=True, help="Arm the rollback, do not reboot (exit 3).")
@json_option
@click.pass_context
def rollback(ctx: click.Context, no_reboot: bool, as_json: bool) -> None:
    """Go back to the previous release in the other slot: no download, one reboot.

    The other slot gets a trial boot, so if it no longer boots the firmware comes back here.
    With --json the document is printed once the trial is armed, before the reboot.
    """
    runtime = _runtime(ctx, log_to_stdout=not as_json)
    with update_lock(runtime.config.data_dir):
        other = other_slot(_booted_root_slot(runtime))
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
            _echo_document({
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
@main.command()
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

    runtime = _runtime(ctx, log_to_stdout=not as_json)
    with update_lock(runtime.config.data_dir):
        result = Recovery(runtime.installer()).recover(source, slot=slot, reboot=not no_reboot)
        runtime.publish_metrics()
    if as_json:
        _echo_document(_install_document(result, reboot_required=no_reboot))
    if no_reboot:
        click.echo(f"recovered {result.version} into slot {result.slot} ({result.armed})", err=True)
        ctx.exit(EXIT_REBOOT_REQUIRED)


@main.command()
@json_option
@click.pass_context
def resume(ctx: click.Context, as_json: bool) -> None:
    """Resume updates suspended by the crash-loop guard."""
    runtime = _runtime(ctx, log_to_stdout=False)
    with update_lock(runtime.config.data_dir):
        store = runtime.store
        state = store.load().state
        store.save(replace(state, suspended=None, restarts=()))
        runtime.log.event("update.resumed", previously=state.suspended)
    if as_json:
        _echo_document({"resumed": True, "previously": state.suspended})
        return
    click.echo("updates resumed")


@main.command()
@click.option(
    "--once",
    is_flag=True,
    help="One step (enroll, events, check-in and install, heartbeat), then exit.",
)
@click.pass_context
def daemon(ctx: click.Context, once: bool) -> None:
    """Follow the release server: check in, install what it assigns, send heartbeats and
    events. Runs until stopped (``fleet-updater.service``); ``--once`` fails (exit 1) if the
    server could not be reached."""
    import signal

    from updater.daemon import build_daemon

    runtime = _runtime(ctx, log_to_stdout=True, report=False, on_defaults=True)
    # an install running now holds the lock: the sweep waits for the next start
    with contextlib.suppress(LockedError), update_lock(runtime.config.data_dir):
        runtime.sweep_temporaries()
    port = runtime.config.metrics_port
    if port is not None:
        from prometheus_client import CollectorRegistry

        from updater.metrics import UpdaterMetrics

        live = UpdaterMetrics(CollectorRegistry())
        live.serve(port, addr=runtime.config.metrics_listen)
        runtime = replace(runtime, live_metrics=live)
    service = build_daemon(runtime)
    if once:
        service.run_once()
        if service.last_error:
            raise UpdaterError(f"daemon: {service.last_error}")
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: service.stop())
    service.run_forever()


if __name__ == "__main__":  # python -m updater.cli
    main()
