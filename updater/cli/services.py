"""The commands the device's systemd units run: ``boot-check`` once per boot
(``fleet-boot-check.service``) and ``daemon``, which follows the release server
(``fleet-updater.service``)."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import click

from updater.cli.common import (
    EXIT_UNHEALTHY,
    command_runtime,
    echo_document,
    json_option,
    unhealthy,
)
from updater.errors import LockedError, UpdaterError
from updater.state import update_lock


@unhealthy
@click.command("boot-check")
@json_option
@click.pass_context
def boot_check(ctx: click.Context, as_json: bool) -> None:
    """Judge this boot: commit a healthy trial, roll back an unhealthy one (run once per boot).

    With --json, the verdict: the situation found, the slot, the action taken, whether the
    health checks passed (null: none ran), the checks that failed, and whether it reboots."""
    runtime = command_runtime(ctx, log_to_stdout=not as_json, on_defaults=True)
    with update_lock(runtime.config.data_dir):
        runtime.sweep_temporaries()
        runtime.record_start()
        verdict = runtime.boot_checker().run()
        runtime.publish_metrics(
            event="committed" if verdict.action == "committed" else None,
            failed_checks=verdict.failed_checks,
        )
    if as_json:
        echo_document({
            "situation": verdict.situation,
            "slot": verdict.slot,
            "action": verdict.action,
            "healthy": verdict.healthy,
            "failed_checks": list(verdict.failed_checks),
            "rebooting": verdict.reboot,
        })  # fmt: skip
    if verdict.healthy is False:
        ctx.exit(EXIT_UNHEALTHY)


@click.command()
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

    runtime = command_runtime(ctx, log_to_stdout=True, report=False, on_defaults=True)
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
