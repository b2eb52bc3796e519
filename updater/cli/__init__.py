"""``fleet-updater``: the device side.

Exit codes: 0 success; 1 failure (one line, ``Error: …``); 2 usage error;
3 (``EXIT_REBOOT_REQUIRED``) installed and armed, reboot required (``install --no-reboot``);
4 (``EXIT_UNHEALTHY``) the boot check found this boot unhealthy and is rebooting.

Every command but ``daemon`` takes ``--json``: one JSON document on stdout describing the
outcome (printed before the exit status 3 or 4 too), the events going to stderr instead of
stdout. A command that fails prints no document: its ``Error:`` line is on stderr.

The group is here; its commands are in one module per area:

=============== ==========================================================================
module          commands
=============== ==========================================================================
status          ``status``
slots           ``install``, ``recover``, ``rollback``, ``mark-good``, ``mark-bad``,
                ``repair``, ``resume``
provision       ``provision``
services        ``boot-check``, ``daemon`` (what the systemd units run)
common          the exit statuses, ``--json`` and the updater every command runs on
=============== ==========================================================================
"""

from __future__ import annotations

from pathlib import Path

import click

from fleet_core.cli import FleetGroup
from updater.cli.common import EXIT_REBOOT_REQUIRED, EXIT_UNHEALTHY
from updater.cli.provision import provision
from updater.cli.services import boot_check, daemon
from updater.cli.slots import install, mark_bad, mark_good, recover, repair, resume, rollback
from updater.cli.status import status
from updater.config import DEFAULT_CONFIG_PATH, UpdaterConfig

__all__ = ["EXIT_REBOOT_REQUIRED", "EXIT_UNHEALTHY", "main"]


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


main.add_command(status)
main.add_command(install)
main.add_command(boot_check)
main.add_command(mark_good)
main.add_command(mark_bad)
main.add_command(repair)
main.add_command(provision)
main.add_command(rollback)
main.add_command(recover)
main.add_command(resume)
main.add_command(daemon)
