"""``fleet rollout`` and ``fleet emergency-stop``: staged rollouts and the fleet-wide stop."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from fleet_core.params import FiniteFloatRange
from fleet_core.windows import WindowError, parse_windows
from server.cli.common import (
    DURATION,
    PERCENT,
    api_client,
    api_options,
    show,
)
from server.cli.devices import resolve_devices
from server.errors import RequestRejectedError, ServerError
from server.rollout_text import (
    failure_rule_text,
    selector_text,
    skipped_text,
    stage_text,
    waiting_text,
    windows_text,
)

if TYPE_CHECKING:
    from server.client import Answer


def parse_stages(text: str) -> list[int]:
    """``5,25,100`` as a list of percentages.

    Raises:
        click.BadParameter: anything else.
    """
    try:
        return [int(part.strip().removesuffix("%")) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give percentages such as 5,25,100") from None


def checked_stages(text: str) -> list[int]:
    """``--stages`` as the server's rule takes it (``server.rollouts.check_percents``), checked
    before any request: a usage error naming the option.

    Raises:
        click.BadParameter: not percentages, or not increasing from 1 to 100 ending with 100.
    """
    from server.errors import InvalidRolloutError
    from server.rollouts import check_percents

    stages = parse_stages(text)
    try:
        return list(check_percents(stages))
    except InvalidRolloutError as err:
        raise click.BadParameter(str(err)) from None


@click.group()
def rollout() -> None:
    """Staged rollouts of a release: canaries first, then growing shares of the fleet."""


JSON_OPTION = click.option(
    "--json", "as_json", is_flag=True, help="Print the API's answer as JSON."
)


def _print_rollout(r: Answer, as_json: bool = False) -> None:
    r.require("id", "state")  # printed as it is with --json: a rollout's answer, or an error
    if as_json:
        click.echo(json.dumps(r, indent=2, ensure_ascii=True))
        return
    counts = r["counts"]
    show(
        f"rollout {r['id']}: {r['version']} {r['state']} at stage {r['stage_name']} "
        f"({' > '.join(r['stages'])}); {counts['succeeded']} succeeded, {counts['pending']} "
        f"pending, {counts['failed']} failed" + (f"; {r['reason']}" if r["reason"] else "")
    )


def parse_selector(selectors: Sequence[str]) -> dict[str, Any] | None:
    """``role=camera`` and ``tag=north`` (repeatable) as the API's selector.

    Raises:
        click.BadParameter: another key, a second role, or an empty value.
    """
    role: str | None = None
    tags: list[str] = []
    for item in selectors:
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not value or key not in ("role", "tag", "tags"):
            raise click.BadParameter(
                f"{item!r}: give role=NAME or tag=NAME", param_hint="--selector"
            )
        if key == "role":
            if role is not None and role != value:
                raise click.BadParameter("give one role", param_hint="--selector")
            role = value
        else:
            tags += [t.strip() for t in value.split(",") if t.strip()]
    return {"role": role, "tags": tags} if role or tags else None


BAR_WIDTH = 24


def _bar(done: int, failed: int, expected: int) -> str:
    """``[####xx......]``: succeeded (#) and failed (x) devices of the stage's cohort."""
    if expected <= 0:
        return "[" + " " * BAR_WIDTH + "]"
    good = round(BAR_WIDTH * done / expected)
    bad = min(BAR_WIDTH - good, math.ceil(BAR_WIDTH * failed / expected))
    return "[" + "#" * good + "x" * bad + "." * (BAR_WIDTH - good - bad) + "]"


def render_rollout(r: dict[str, Any]) -> list[str]:
    """A rollout for a terminal: a line, a progress bar per stage, and the failure rule."""
    lines = [
        f"rollout {r['id']}: {r['version']} {r['state'].upper()} at stage {r['stage_name']}"
        f" (soak {r['soak_s']} s per stage)" + (f": {r['reason']}" if r["reason"] else "")
    ]
    selector = selector_text(r.get("selector"))
    if selector:
        lines.append(f"  selector: {selector}")
    skipped = r.get("skipped_offline")
    if skipped:
        lines.append(f"  {skipped_text(len(skipped), r['offline_after_s'])}")
    windows = windows_text(r.get("windows") or [])
    if windows:
        lines.append(f"  windows: {windows}")
    if r.get("waiting_window"):
        lines.append(f"  {waiting_text(r['waiting_window'])}")
    width = max(len(s["name"]) for s in r["stage_progress"])
    for index, stage in enumerate(r["stage_progress"]):
        marker = ">" if index == r["stage"] and r["state"] in ("running", "paused") else " "
        bar = _bar(stage["succeeded"], stage["failed"], stage["expected"])
        lines.append(f"{marker} {stage['name']:<{width}} {bar} {stage_text(stage)}")
    lines.append(f"  failure rule: {failure_rule_text(r['failure_rule'])}")
    if r.get("acknowledged"):
        lines.append(f"  acknowledged failures: {len(r['acknowledged'])}")
    return lines


@rollout.command("start")
@click.argument("version")
@click.option(
    "--canary", multiple=True,
    help="A canary DEVICE: id, unique id prefix or hostname (repeat for more).",
)  # fmt: skip
@click.option(
    "--device", "devices", multiple=True,
    help="Limit the rollout to these DEVICEs (id, unique id prefix or hostname; repeat).",
)  # fmt: skip
@click.option(
    "--stages", default="5,25,100", show_default=True, callback=lambda _c, _p, v: checked_stages(v),
    help="Percentages, increasing, ending 100.",
)  # fmt: skip
@click.option(
    "--soak", type=DURATION, default="15m", show_default=True, help="Soak time of each stage."
)
@click.option(
    "--max-failure", type=PERCENT, default="5%", show_default=True, help="Failure rate that halts."
)
@click.option(
    "--install-deadline", type=DURATION, default="1h", show_default=True, help="Time to commit."
)
@click.option("--no-rollback", is_flag=True, help="On a halt, leave failed devices as they are.")
@click.option(
    "--offline-after", type=DURATION, default="24h", show_default=True,
    help="A device not seen for longer is offline: skipped (neither assigned nor waited for) "
    "until it is seen again.",
)  # fmt: skip
@click.option(
    "--allow-empty", is_flag=True,
    help="Start even when no online device is selected (refused otherwise).",
)  # fmt: skip
@click.option(
    "--selector", "selectors", multiple=True,
    help="role=NAME or tag=NAME: only devices that report it (repeat; all must match).",
)  # fmt: skip
@click.option(
    "--window", "windows", multiple=True, callback=lambda _c, _p, v: checked_windows(v),
    help="A maintenance window in each device's local time: HH:MM-HH:MM, after days if only "
    "on them (Sat, Mon-Fri, Sat,Sun); may cross midnight (repeat). Devices start installing "
    "only inside one, and inside their own [updates] windows.",
)  # fmt: skip
@api_options
@JSON_OPTION
def rollout_start(
    version: str,
    canary: tuple[str, ...],
    devices: tuple[str, ...],
    stages: list[int],
    soak: int,
    max_failure: float,
    install_deadline: int,
    no_rollback: bool,
    offline_after: int,
    allow_empty: bool,
    selectors: tuple[str, ...],
    windows: list[str],
    server: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Start a staged rollout of release VERSION.

    With --window, devices start installing only inside those windows (each device's local
    time) and their own; a device waiting for one reports it, and `fleet rollout status`
    counts them. An install that started inside a window finishes. The install deadline
    counts from the assignment, so leave room for the wait (e.g. --install-deadline 24h).

    Devices not seen for longer than --offline-after are skipped: the rollout neither assigns
    them nor waits for them, and `fleet rollout status` counts them. One seen again while the
    rollout runs joins its cohort then; one the rollout already assigned stays its member.

    A rollout that would assign no device (none compatible, none matching --device and
    --selector, or all of them offline) is refused, saying which, unless --allow-empty."""
    client = api_client(server, token)
    named = resolve_devices(client, [*canary, *devices])  # one listing of the fleet for both
    document = {
        "selector": parse_selector(selectors),
        "version": version,
        "device_ids": named[len(canary) :] or None,
        "canary": named[: len(canary)],
        "stages": stages,
        "soak_s": soak,
        "max_failure_rate": max_failure,
        "install_deadline_s": install_deadline,
        "rollback_on_halt": not no_rollback,
        "offline_after_s": offline_after,
        "allow_empty": allow_empty,
        "windows": windows,
    }
    try:
        answer = client.post("/api/v1/rollouts", document)
    except RequestRejectedError as err:
        # the API names its field; the operator's is the option
        if API_ANYWAY not in str(err):
            raise
        raise RequestRejectedError(
            str(err).replace(API_ANYWAY, "(--allow-empty starts it anyway)"),
            status=err.status,
            code=err.code,
        ) from err
    _print_rollout(answer, as_json)


def checked_windows(entries: tuple[str, ...]) -> list[str]:
    """The --window entries in canonical text, each read as the server and devices read it.

    Raises:
        click.BadParameter: naming the entry that cannot be read.
    """
    try:
        return [window.text for window in parse_windows(list(entries), where="--window")]
    except WindowError as err:
        raise click.BadParameter(str(err).removeprefix("--window"), param_hint="--window") from None


API_ANYWAY = "(allow_empty starts it anyway)"  # server.rollouts' refusal of an empty rollout


class RolloutFailedError(ServerError):
    """A watched rollout ended without completing (halted, aborted or rolled back)."""


ENDED_BADLY = ("halted", "aborted")


@rollout.command("status")
@click.argument("rollout_id", type=click.IntRange(1, 2**31 - 1), required=False)
@api_options
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.option(
    "--watch", is_flag=True,
    help="Follow until no rollout (or ROLLOUT_ID) is running or paused; exit 0 when it completed, "
    "1 when it halted or was aborted (with none running or paused: the newest).",
)  # fmt: skip
@click.option("--interval", default=2.0, show_default=True, type=FiniteFloatRange(0.1, 3600))
@click.option("--all", "show_all", is_flag=True, help="Every rollout, not only the latest five.")
def rollout_status(
    rollout_id: int | None,
    server: str | None,
    token: str | None,
    as_json: bool,
    watch: bool,
    interval: float,
    show_all: bool,
) -> None:
    """The rollouts, newest first (or rollout ROLLOUT_ID), with a progress bar per stage, and the
    emergency stop.

    With --watch, as `kubectl rollout status`: the exit status is 0 once every rollout followed
    (ROLLOUT_ID; or those running or paused when the watch began, or else the newest) completed,
    and 1 as soon as one halts or is aborted; a paused rollout is waited for. With --json and
    --watch, the JSON is printed once, when the watch ends."""
    client = api_client(server, token)
    path = "/api/v1/rollouts" if rollout_id is None else f"/api/v1/rollouts/{rollout_id}"
    followed: set[int] | None = None
    while True:
        answer = client.get(path)
        rollouts = answer["rollouts"] if rollout_id is None else [answer]
        if followed is None:
            followed = {r["id"] for r in rollouts if r["state"] in ("running", "paused")}
            if rollout_id is not None:
                followed = {rollout_id}
            elif not followed and rollouts:
                # none going: the newest, judged by how it ended (one that halted before the
                # watch began is still a failed rollout to the script that started it)
                followed = {rollouts[0]["id"]}
        going = [r for r in rollouts if r["id"] in followed and r["state"] in ("running", "paused")]
        if not as_json:
            if watch and sys.stdout.isatty():
                click.clear()
            show(*_status_lines(answer, rollouts, show_all or rollout_id is not None))
        elif not (watch and going):
            click.echo(json.dumps(answer, indent=2, ensure_ascii=True))
        if not watch:
            return
        failed = [r for r in rollouts if r["id"] in followed and r["state"] in ENDED_BADLY]
        if failed:
            r = failed[0]
            raise RolloutFailedError(
                f"rollout {r['id']} {r['state']}" + (f": {r['reason']}" if r["reason"] else "")
            )
        if not going:
            return
        time.sleep(interval)
        if not as_json:
            click.echo("")


def _status_lines(
    answer: dict[str, Any], rollouts: list[dict[str, Any]], show_all: bool
) -> list[str]:
    lines = []
    stop = answer.get("emergency_stop")
    if stop is not None and stop["active"]:
        lines.append(f"EMERGENCY STOP since {stop['since']} by {stop['actor']}: {stop['reason']}")
    for r in rollouts if show_all else rollouts[:5]:
        lines += render_rollout(r)
    if not rollouts:
        lines.append("no rollouts")
    return lines


def _transition_command(action: str, help_text: str) -> None:
    @rollout.command(action, help=help_text)
    @click.argument("rollout_id", type=click.IntRange(1, 2**31 - 1))
    @click.option("--reason", help="Why (kept in the audit trail).")
    @api_options
    @JSON_OPTION
    def command(
        rollout_id: int, reason: str | None, server: str | None, token: str | None, as_json: bool
    ) -> None:
        body = {"reason": reason} if reason else {}
        answer = api_client(server, token).post(f"/api/v1/rollouts/{rollout_id}/{action}", body)
        _print_rollout(answer, as_json)


_transition_command("pause", "Pause a running rollout: no promotion, no new assignments.")
_transition_command("resume", "Resume a paused rollout.")
_transition_command("abort", "End a rollout; its uncommitted devices return to their release.")
_transition_command("rollback", "End a rollout; every one of its devices returns to its release.")


@click.command("emergency-stop")
@click.option("--clear", is_flag=True, help="Turn the emergency stop off.")
@click.option("--reason", help="Why (kept in the audit trail).")
@api_options
@JSON_OPTION
def emergency_stop(
    clear: bool, reason: str | None, server: str | None, token: str | None, as_json: bool
) -> None:
    """Pause every rollout and withdraw every uncommitted assignment at once (--clear: undo)."""
    client = api_client(server, token)
    if clear:
        answer = client.post("/api/v1/emergency-stop/clear", {})
    else:
        answer = client.post("/api/v1/emergency-stop", {"reason": reason} if reason else {})
    answer.require("active")  # never an emergency stop reported done on an answer without it
    if as_json:
        click.echo(json.dumps(answer, indent=2, ensure_ascii=True))
    elif answer["active"]:
        show(f"emergency stop ON since {answer['since']}: {answer['reason']}")
    else:
        click.echo("emergency stop off (paused rollouts stay paused until resumed)")
