"""``fleet-updater status``: what the device's slots, boot state and update state are, read
without writing anything, in words or as one JSON document."""

from __future__ import annotations

import json
from typing import Any

import click

from fleet_core.text import printable
from updater.cli.common import command_runtime
from updater.errors import UpdaterError


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show slots, boot state and update state, as far as they can be read; writes nothing.

    Exits 1 (after printing what it found) when the configuration is missing, unreadable or
    invalid, or the boot state cannot be read (``repair`` rebuilds it): each problem is named
    in the document and on one ``Error:`` line.
    """
    runtime = command_runtime(ctx, log_to_stdout=False, read_only=True, on_defaults=True)
    document = runtime.snapshot()
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
