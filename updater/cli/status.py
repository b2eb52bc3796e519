"""``fleet-updater status``: what the device's slots, boot state and update state are, and
when it may download (rate limit, maintenance windows) and install (the supply's
under-voltage flag), read without writing anything, in words or as one JSON document."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import click

from fleet_core.text import printable
from updater.bandwidth import now_utc as _now_utc
from updater.bandwidth import rate_text, schedule_from_config
from updater.cli.common import command_runtime
from updater.config import UpdaterConfig
from updater.delta import Journal
from updater.device import Throttled, throttled_names, under_voltage_now
from updater.errors import UpdaterError


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show slots, boot state and update state, as far as they can be read, the download rate
    limit, the maintenance windows (whether now is inside one, when the next opens) and the
    Raspberry Pi firmware's throttling and under-voltage flags; writes nothing.

    Exits 1 (after printing what it found) when the configuration is missing, unreadable or
    invalid, or the boot state cannot be read (``repair`` rebuilds it): each problem is named
    in the document and on one ``Error:`` line.
    """
    runtime = command_runtime(ctx, log_to_stdout=False, read_only=True, on_defaults=True)
    document = runtime.snapshot()
    document.update(bandwidth_status(runtime.config))
    document["transfer"] = Journal(runtime.config.data_dir).summary()
    document["power"] = power_status(runtime.throttled())
    if as_json:
        click.echo(json.dumps(document, indent=2, sort_keys=True))
    else:
        _print_status(document)
    problems = _status_problems(document)
    if problems:
        raise UpdaterError("; ".join(problems))


def bandwidth_status(
    config: UpdaterConfig, wall_clock: Callable[[], float] = time.time
) -> dict[str, Any]:
    """The ``bandwidth`` and ``updates`` members of the status document: the rate limit, the
    device's own windows, whether now is inside one and when the next opens (ISO 8601, local
    time; ``next_open`` equals now when inside). A rollout may narrow the windows further: the
    daemon's ``daemon.waiting_for_window`` event says so."""
    schedule = schedule_from_config(config)
    updates = schedule.describe(_now_utc(wall_clock))
    del updates["rollout_windows"]
    return {
        "bandwidth": {"rate_limit_bytes_per_s": config.rate_limit_bytes_per_s},
        "updates": updates,
    }


def power_status(throttled: int | None) -> dict[str, Any]:
    """The ``power`` member of the status document: the firmware's ``get_throttled`` value
    (``null``: unknown, not a Raspberry Pi), whether it flags under-voltage now (an install
    waits until it clears), and the names of the conditions active now and seen since boot."""
    if throttled is None:
        return {"throttled": None, "under_voltage": None, "now": [], "since_boot": []}
    flags = Throttled(throttled)
    return {
        "throttled": throttled,
        "under_voltage": under_voltage_now(throttled),
        "now": throttled_names(flags.now),
        "since_boot": throttled_names(Throttled(flags.since_boot >> 16)),
    }


def _power_text(power: dict[str, Any]) -> str:
    """``under_voltage now (0x50005): installs wait; since boot: under_voltage, throttled``."""
    value = power["throttled"]
    if value is None:
        return "unknown (no get_throttled node or vcgencmd answered; not a Raspberry Pi?)"
    now = ", ".join(power["now"]) or "normal"
    text = f"{now} now ({value:#x})"
    if power["under_voltage"]:
        text += ": installs wait until the supply recovers"
    if power["since_boot"]:
        text += f"; since boot: {', '.join(power['since_boot'])}"
    return text


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
    lines.append(f"download:  {rate_text(document['bandwidth']['rate_limit_bytes_per_s'])}")
    lines.append(f"windows:   {_windows_text(document['updates'])}")
    lines.append(f"power:     {_power_text(document['power'])}")
    transfer = _transfer_text(document["transfer"])
    if transfer:
        lines.append(f"transfer:  {transfer}")
    if document["state_problem"]:
        lines.append(f"  problem: {document['state_problem']}")
    for line in lines:
        click.echo(printable(line))


def _windows_text(updates: dict[str, Any]) -> str:
    """``02:00-05:00, Sat 00:00-24:00 (Europe/Berlin): outside, next opens 2026-…``."""
    if not updates["windows"]:
        return "any time (no windows configured)"
    where = f"{', '.join(updates['windows'])} ({updates['time_zone']})"
    if updates["inside"]:
        return f"{where}: inside one now"
    opens = updates["next_open"]
    return f"{where}: outside, next opens {opens}" if opens else f"{where}: none opens ahead"


def _transfer_text(summary: dict[str, Any] | None) -> str | None:
    """The install journal's word (:class:`updater.delta.Journal`): what the last download
    cost, or how far the one in progress is."""
    if summary is None:
        return None
    release = (summary["release"] or "?")[:12]
    finished = summary["finished"]
    if finished is None:
        return (
            f"release {release} into slot {summary['slot']}: {summary['verified_bytes']} bytes "
            "written and verified, resumed from there by the next attempt"
        )
    fetched, stored = finished.get("fetched", 0), finished.get("stored", 0)
    share = f" ({100 * fetched / stored:.1f} % of the full image)" if stored else ""
    return (
        f"last install (release {release}, slot {summary['slot']}): {fetched} bytes fetched"
        f"{share}, {finished.get('reused', 0)} bytes found on the device"
    )
