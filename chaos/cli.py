"""``fleet simulate``: a virtual fleet following a release server, on compressed time."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any

import click

from chaos.fleet import ROLES, MemberSpec
from chaos.virtual_device import FaultProfile
from fleet_core.errors import FleetError
from updater.config import LABEL

PROFILE_KEYS = {"count", "role", "tags", "hang_on", "unhealthy_on", "offline", "clock_offset_s"}


class FaultsFileError(FleetError):
    """The ``--faults`` file is not what ``fleet simulate`` understands."""


def read_specs(devices: int, faults: Path | None) -> list[MemberSpec]:
    """Member specifications: the groups of the faults file first, then plain members, roles
    taken in turn, up to ``devices``.

    The faults file is TOML, a list of groups::

        [[devices]]
        count = 3                      # members like this
        role = "camera"
        tags = ["north-site"]          # labels rollouts may select on
        hang_on = ["2.0.0"]            # releases they hang on at boot
        unhealthy_on = []              # releases whose health checks fail on them
        offline = [[0, 600]]           # offline windows, simulated seconds from the start
        clock_offset_s = -157680000    # a wall clock five years behind

    Raises:
        FaultsFileError: unreadable, unknown keys, wrong types, more members than ``devices``.
    """
    specs: list[MemberSpec] = []
    if faults is not None:
        try:
            document = tomllib.loads(faults.read_text())
        except (OSError, ValueError, RecursionError) as err:
            raise FaultsFileError(f"{faults}: {err}") from err
        for index, group in enumerate(document.get("devices", [])):
            specs += _group(group, f"{faults}: devices[{index}]")
    if len(specs) > devices:
        raise FaultsFileError(
            f"the faults file describes {len(specs)} devices, more than {devices}"
        )
    specs += [MemberSpec(role=ROLES[i % len(ROLES)]) for i in range(devices - len(specs))]
    return specs


def _group(group: Any, where: str) -> list[MemberSpec]:
    if not isinstance(group, dict) or set(group) - PROFILE_KEYS:
        raise FaultsFileError(f"{where}: expected a table with keys {sorted(PROFILE_KEYS)}")
    try:
        count = int(group.get("count", 1))
        role = str(group.get("role", "camera"))
        tags = group.get("tags", [])
        if not isinstance(tags, list) or not all(
            isinstance(t, str) and LABEL.fullmatch(t) for t in tags
        ):
            raise TypeError("tags must be a list of labels (lowercase letters, digits, _ . -)")
        profile = FaultProfile(
            hang_on=frozenset(str(v) for v in group.get("hang_on", [])),
            unhealthy_on=frozenset(str(v) for v in group.get("unhealthy_on", [])),
        )
        offline = tuple((float(a), float(b)) for a, b in group.get("offline", []))
        offset = float(group.get("clock_offset_s", 0.0))
    except (TypeError, ValueError) as err:
        raise FaultsFileError(f"{where}: {err}") from err
    if count < 0 or role not in ROLES:
        raise FaultsFileError(f"{where}: count must be >= 0 and role one of {', '.join(ROLES)}")
    spec = MemberSpec(
        role=role, tags=tuple(tags), profile=profile, offline=offline, clock_offset_s=offset
    )
    return [spec] * count


@click.command()
@click.option("--devices", type=click.IntRange(1, 100_000), default=10, show_default=True)
@click.option("--server", "servers", multiple=True, required=True, help="Server URL (repeat).")
@click.option("--server-key", required=True, type=click.Path(exists=True, path_type=Path),
              help="The server's server-key.pub (assignments are checked against it).")  # fmt: skip
@click.option("--release-key", required=True, type=click.Path(exists=True, path_type=Path),
              help="The release signing key's .pub the devices trust.")  # fmt: skip
@click.option("--enrollment-token", required=True, envvar="FLEET_ENROLLMENT_TOKEN")
@click.option("--workdir", default="build/fleet", type=click.Path(path_type=Path),
              show_default=True)  # fmt: skip
@click.option("--faults", type=click.Path(exists=True, path_type=Path))
@click.option("--firmware", type=click.Choice(["grub", "uboot", "tryboot"]), default="grub")
@click.option("--step", "step_s", type=float, default=5.0, show_default=True,
              help="Simulated seconds per step.")  # fmt: skip
@click.option("--speed", type=float, default=60.0, show_default=True,
              help="Simulated seconds per real second.")  # fmt: skip
@click.option("--duration", type=float, default=3600.0, show_default=True,
              help="Simulated seconds to run.")  # fmt: skip
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Devices that act at the same time (requests in flight at once).")  # fmt: skip
def simulate(
    devices: int,
    servers: tuple[str, ...],
    server_key: Path,
    release_key: Path,
    enrollment_token: str,
    workdir: Path,
    faults: Path | None,
    firmware: str,
    step_s: float,
    speed: float,
    duration: float,
    workers: int,
) -> None:
    """Run a virtual fleet of DEVICES devices that follows the release server."""
    import shutil

    from chaos.fleet import VirtualFleet

    specs = read_specs(devices, faults)
    if workdir.exists():
        shutil.rmtree(workdir)
    fleet = VirtualFleet(
        workdir, specs, server_urls=servers, server_key=server_key, release_key=release_key,
        enrollment_token=enrollment_token, firmware=firmware, workers=workers,
    )  # fmt: skip
    click.echo(f"{len(fleet.members)} virtual devices in {workdir}, following {', '.join(servers)}")
    elapsed = 0.0
    last_report = ""
    while elapsed < duration:
        started = time.monotonic()
        fleet.step(step_s)
        elapsed += step_s
        counts = sorted(fleet.versions().items(), key=lambda item: str(item[0]))
        versions = ", ".join(f"{version or 'none'}: {n}" for version, n in counts)
        if versions != last_report:
            click.echo(f"t+{elapsed:>7.0f}s  {versions}")
            last_report = versions
        pause = step_s / speed - (time.monotonic() - started)
        if pause > 0:
            time.sleep(pause)
