"""What every ``fleet-updater`` command shares: its exit statuses, the ``--json`` option and the
document it prints, the updater a command runs on, and the booted root slot."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from bootloader_hooks.base import ROOT_SLOTS
from fleet_core.cli import exits
from fleet_core.errors import FleetError
from updater.config import load_config
from updater.errors import ConfigError, UpdaterError
from updater.log import EventLog, EventSink, device_labels
from updater.runtime import Runtime, build_backend, reporting_log

EXIT_REBOOT_REQUIRED = 3
EXIT_UNHEALTHY = 4
reboot_required = exits(EXIT_REBOOT_REQUIRED, "a slot is armed, a reboot is needed (`--no-reboot`)")
unhealthy = exits(EXIT_UNHEALTHY, "this boot was judged unhealthy: going back, rebooting")

json_option = click.option(
    "--json", "as_json", is_flag=True,
    help="One JSON document on stdout describing the outcome; events go to stderr.",
)  # fmt: skip


def echo_document(document: dict[str, Any]) -> None:
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


def command_runtime(
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


def booted_root_slot(runtime: Runtime) -> str:
    slot = runtime.backend.booted()
    if slot not in ROOT_SLOTS:
        raise UpdaterError(f"running from slot {slot!r}: this needs a root slot")
    return slot
