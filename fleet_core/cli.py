"""The ``fleet`` operator command: a root that loads each package's group only when used.

Each package owns its commands in its own ``cli`` module (the server's is a package of them).
The root names them by import path and imports a group only when that group is invoked, so
``fleet keys`` on a build workstation never pulls in the server's web stack.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import click

from fleet_core.errors import FleetError
from fleet_core.text import printable

# command name -> "module:attribute" of its click group or command
SUBCOMMANDS: dict[str, str] = {
    "keys": "signing.cli:keys",
    "image": "image_builder.cli:image",
    "bundle": "image_builder.cli:bundle",
    "demo": "chaos.demo:demo",
    "server": "server.cli.serve:server",
    "release": "server.cli.releases:release",
    "device": "server.cli.devices:device",
    "audit": "server.cli.audit:audit",
    "rollout": "server.cli.rollouts:rollout",
    "emergency-stop": "server.cli.rollouts:emergency_stop",
    "slo": "server.cli.slo:slo",
    "simulate": "chaos.cli:simulate",
    "chaos": "chaos.chaos_run:chaos",
}


# Exit statuses of every command; a command that has others declares them with ``exits``.
COMMON_EXITS: dict[int, str] = {
    0: "success",
    1: "an expected failure (one line, `Error: …`)",
    2: "a usage error",
}
_DECLARED_EXITS = "fleet_exit_statuses"


def exits(status: int, meaning: str) -> Callable[[click.Command], click.Command]:
    """Declare that a command (decorated after ``@…command()``) also exits ``status``, meaning
    ``meaning``: ``docs/cli.md`` lists every command's statuses from these declarations."""

    def declare(command: click.Command) -> click.Command:
        declared = dict(getattr(command, _DECLARED_EXITS, {}))
        declared[status] = meaning
        setattr(command, _DECLARED_EXITS, declared)
        return command

    return declare


def exit_statuses(command: click.Command) -> dict[int, str]:
    """Every status ``command`` exits with, and what each means."""
    declared: dict[int, str] = getattr(command, _DECLARED_EXITS, {})
    return dict(sorted({**COMMON_EXITS, **declared}.items()))


class FleetGroup(click.Group):
    """A click group that turns a :class:`FleetError` into a one-line error and exit status 1.

    Exit codes of every Metrica Fleet command: 0 success, 1 an expected failure (printed as
    ``Error: <message>``, one inert line: the message may quote a file, a server or a device,
    see :func:`fleet_core.text.printable`), 2 a usage error (click's convention). Anything that
    is not a ``FleetError`` is a bug and keeps its traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FleetError as err:
            raise click.ClickException(printable(str(err))) from err


class LazyGroup(FleetGroup):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            module_name, attribute = self._lazy[cmd_name].split(":")
            command = getattr(importlib.import_module(module_name), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self._lazy[cmd_name]} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, lazy=SUBCOMMANDS)
@click.version_option(package_name="metrica-fleet")
def fleet() -> None:
    """Metrica Fleet: signed A/B updates for fleets of Raspberry Pi devices."""


def main() -> None:
    """Entry point of the ``fleet`` console script."""
    fleet()
