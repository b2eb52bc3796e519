"""``fleet simulate``: a virtual fleet following a release server, on compressed time.

What it needs is a server URL and an enrollment token; the rest has defaults (docs/simulate.md).
The keys the devices trust come from the server (``GET /api/v1/keys/server`` and
``/api/v1/keys/release``) on first use and are pinned in ``WORKDIR/pinned/``: a later run
refuses a server whose keys differ from the pinned ones (trust on first use, as ssh does).
``--server-key`` and ``--release-key`` give the keys instead, and replace the pins.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from chaos.fleet import PLAIN_SLOT_SIZES, ROLES, MemberSpec
from chaos.virtual_device import FaultProfile
from chaos.workdir import WorkdirError, fresh_directory, marker_name
from fleet_core.errors import FleetError
from fleet_core.inputs import refuse_non_regular_input
from fleet_core.locks import LockHeld, holding
from fleet_core.params import FiniteFloatRange
from fleet_core.suggest import unknown_names
from fleet_core.text import printable
from image_builder.manifest import is_release_version
from signing.keyring import Keyring, set_threshold, trust_key
from updater.config import LABEL

PROFILE_KEYS = ("count", "role", "tags", "hang_on", "unhealthy_on", "offline", "clock_offset_s")
# What `fleet bundle create --compatible` is given in the README and the device configuration
# deploy/device/updater.toml names: the devices match the bundles a newcomer builds.
DEFAULT_COMPATIBLE = "metrica-rpi4"
KEYS_TIMEOUT_S = 10.0
MAX_DEVICES = 100_000
# The most a device's clock may be off in the faults file: ten years either way, beyond any
# board without a real-time clock (which starts at its build date); a clock far outside the
# range of a date stops the device from saying anything at all.
MAX_CLOCK_OFFSET_S = 10 * 366 * 86400
# The last second an offline window may name: ten years of simulated time.
MAX_SIMULATED_S = 10 * 366 * 86400


class FaultsFileError(FleetError):
    """The ``--faults`` file is not what ``fleet simulate`` understands."""


class SimulateError(FleetError):
    """``fleet simulate`` cannot start its fleet (keys, server)."""


# --- the faults file ------------------------------------------------------------------------


def read_specs(devices: int, faults: Path | None) -> list[MemberSpec]:
    """Member specifications: the groups of the faults file first, then plain members, roles
    taken in turn, up to ``devices``. The format: docs/simulate.md.

    Raises:
        FaultsFileError: unreadable, not TOML, an unknown key, a value of the wrong type or
            out of range (naming the file, the line and the key), more members than
            ``devices``.
    """
    specs: list[MemberSpec] = []
    if faults is not None:
        try:
            refuse_non_regular_input(faults, "--faults")
        except FleetError as err:
            raise FaultsFileError(str(err)) from err
        try:
            text = faults.read_text("utf-8")
            document = tomllib.loads(text)
        except (OSError, ValueError, RecursionError) as err:  # ValueError: TOML, UTF-8
            raise FaultsFileError(f"{faults}: {err}") from err
        unknown = unknown_names(document, {"devices"})
        if unknown:
            raise FaultsFileError(
                f"{faults}: unknown key {', '.join(unknown)}: the file holds [[devices]] tables"
            )
        groups = document.get("devices", [])
        if not isinstance(groups, list):
            raise FaultsFileError(f"{faults}: devices must be [[devices]] tables")
        headers = _header_lines(text)
        for index, group in enumerate(groups):
            start = headers[index] if len(headers) == len(groups) else None
            end = headers[index + 1] if start is not None and index + 1 < len(headers) else None
            specs += _group(group, _Where(faults, index, text, start, end), devices)
    if len(specs) > devices:
        raise FaultsFileError(
            f"{faults}: the faults file describes {len(specs)} devices, more than {devices} "
            "(--devices)"
        )
    specs += [MemberSpec(role=ROLES[i % len(ROLES)]) for i in range(devices - len(specs))]
    return specs


_HEADER = re.compile(r"^\s*\[\[\s*devices\s*\]\]")


def _header_lines(text: str) -> list[int]:
    """The line numbers (1-based) of the ``[[devices]]`` headers."""
    return [n for n, line in enumerate(text.splitlines(), start=1) if _HEADER.match(line)]


class _Where:
    """Where a group of the faults file is, for messages: ``FILE line N: devices[I].key``."""

    def __init__(
        self, path: Path, index: int, text: str, start: int | None, end: int | None
    ) -> None:
        self.path, self.index, self.lines = path, index, text.splitlines()
        self.start, self.end = start, end

    def __call__(self, key: str | None = None) -> str:
        line = self.start
        if key is not None and self.start is not None:
            pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
            stop = (self.end or len(self.lines) + 1) - 1
            line = next(
                (n for n in range(self.start + 1, stop + 1) if pattern.match(self.lines[n - 1])),
                self.start,
            )
        at = f" line {line}" if line is not None else ""
        name = f"devices[{self.index}]" + (f".{key}" if key else "")
        return f"{self.path}{at}: {name}"


def _group(group: Any, where: _Where, devices: int) -> list[MemberSpec]:
    if not isinstance(group, dict):
        raise FaultsFileError(f"{where()}: expected a table with keys {', '.join(PROFILE_KEYS)}")
    unknown = unknown_names(group, PROFILE_KEYS)
    if unknown:
        raise FaultsFileError(
            f"{where()}: unknown key {', '.join(unknown)}: expected a table with keys "
            f"{', '.join(PROFILE_KEYS)}"
        )
    count = group.get("count", 1)
    if type(count) is not int or count < 0:
        raise FaultsFileError(f"{where('count')}: a whole number, 0 or more, not {count!r}")
    if count > devices:  # before a list of that many is made
        raise FaultsFileError(f"{where('count')}: {count} devices, more than {devices} (--devices)")
    role = group.get("role", "camera")
    if role not in ROLES:
        raise FaultsFileError(
            f"{where('role')}: expected role one of {', '.join(ROLES)}, not {role!r}"
        )
    tags = _strings(group, "tags", where)
    bad = [t for t in tags if not LABEL.fullmatch(t)]
    if bad:
        raise FaultsFileError(
            f"{where('tags')}: {bad[0]!r} is not a label (lowercase letters, digits, _ . -)"
        )
    profile = FaultProfile(
        hang_on=frozenset(_versions(group, "hang_on", where)),
        unhealthy_on=frozenset(_versions(group, "unhealthy_on", where)),
    )
    offline = _windows(group.get("offline", []), where)
    offset = group.get("clock_offset_s", 0)
    if not _is_number(offset) or abs(offset) > MAX_CLOCK_OFFSET_S:
        raise FaultsFileError(
            f"{where('clock_offset_s')}: a number of seconds from -{MAX_CLOCK_OFFSET_S} to "
            f"{MAX_CLOCK_OFFSET_S} (ten years), not {offset!r}"
        )
    spec = MemberSpec(
        role=role, tags=tuple(tags), profile=profile, offline=offline,
        clock_offset_s=float(offset),
    )  # fmt: skip
    return [spec] * count


def _strings(group: dict[str, Any], key: str, where: _Where) -> list[str]:
    value = group.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FaultsFileError(f'{where(key)}: a list of strings, such as ["2.0.0"]')
    return value


def _versions(group: dict[str, Any], key: str, where: _Where) -> list[str]:
    versions = _strings(group, key, where)
    bad = [v for v in versions if not is_release_version(v)]
    if bad:
        raise FaultsFileError(
            f"{where(key)}: {printable(bad[0])!r} is not a release version (such as 2.0.0)"
        )
    return versions


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and value == value and abs(value) != float("inf")


def _windows(value: Any, where: _Where) -> tuple[tuple[float, float], ...]:
    windows = []
    for window in value if isinstance(value, list) else [value]:
        if (
            not isinstance(value, list)
            or not isinstance(window, list)
            or len(window) != 2
            or not all(_is_number(v) for v in window)
            or not 0 <= window[0] < window[1] <= MAX_SIMULATED_S
        ):
            raise FaultsFileError(
                f"{where('offline')}: a list of [from, to] windows in simulated seconds since "
                f"the start, 0 <= from < to <= {MAX_SIMULATED_S} (ten years), such as "
                f"[[0, 600]]; not {window!r}"
            )
        windows.append((float(window[0]), float(window[1])))
    return tuple(windows)


# --- the keys the devices trust -------------------------------------------------------------


def _fetch(servers: Sequence[str], kind: str) -> tuple[dict[str, Any], str]:
    """``GET /api/v1/keys/<kind>`` from the first server that answers; the answer and URL.

    Raises:
        SimulateError: no server answered with the keys.
    """
    import requests

    problems = []
    for server in servers:
        url = f"{server.rstrip('/')}/api/v1/keys/{kind}"
        try:
            answer = requests.get(url, timeout=KEYS_TIMEOUT_S)
            document = answer.json() if answer.content else {}
            if answer.status_code != 200:
                detail = document.get("detail") if isinstance(document, dict) else None
                problems.append(f"{url}: {answer.status_code} {detail or answer.reason}")
                continue
            if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
                problems.append(f"{url}: not a key list")
                continue
            return document, url
        except (requests.RequestException, ValueError) as err:
            problems.append(f"{url}: {err}")
    raise SimulateError("; ".join(problems))


def keyring_from(document: dict[str, Any], url: str, target: Path) -> None:
    """Write the keys of a ``/api/v1/keys/...`` answer as the keyring ``target``, each key
    checked against the id the server gave it.

    Raises:
        SimulateError: a key is malformed or not the key its id names.
    """
    staging = Path(tempfile.mkdtemp(prefix=".keys-", dir=target.parent))
    try:
        keyring = staging / "keyring"
        if not document["keys"]:
            raise SimulateError(f"{url}: publishes no key")
        for number, entry in enumerate(document["keys"]):
            pem = staging / f"{number}.pub"
            if not isinstance(entry, dict) or not isinstance(entry.get("public_key"), str):
                raise SimulateError(f"{url}: key {number} is malformed")
            pem.write_text(entry["public_key"])
            try:
                kid = trust_key(keyring, pem)
            except FleetError as err:
                raise SimulateError(f"{url}: key {number}: {err}") from err
            if kid != entry.get("key_id"):
                raise SimulateError(f"{url}: key {number} is not the key its id names")
        threshold = document.get("threshold", 1)
        if type(threshold) is not int:
            raise SimulateError(f"{url}: the threshold is not a number")
        try:
            set_threshold(keyring, threshold)
        except FleetError as err:
            raise SimulateError(f"{url}: {err}") from err
        _replace(target, keyring)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(target: Path, keyring: Path) -> None:
    """Put the complete ``keyring`` (made beside ``target``) in place of ``target``: never half
    a pin, and a failure keeps the old one. Only a kill between the two renames leaves none;
    the next run then fetches the keys as on first use, and says so."""
    if not target.exists():
        keyring.rename(target)
        return
    old = keyring.with_name(f"{keyring.name}.old")
    target.rename(old)  # the staging directory is removed with it afterwards
    try:
        keyring.rename(target)
    except OSError:
        old.rename(target)
        raise


def _describe(keyring: Keyring) -> str:
    ids = ", ".join(kid[:16] for kid in keyring.active_key_ids)
    return ids + (f" (threshold {keyring.threshold})" if keyring.threshold > 1 else "")


def pin_keys(
    pinned: Path, servers: Sequence[str], kind: str, given: Sequence[Path], option: str
) -> str:
    """The keyring ``pinned`` for ``kind`` (``server`` or ``release``): made from ``given``
    keys when there are any; else, the first time, fetched from the server; later, checked
    against what the server publishes now. Returns a line saying where the keys came from.

    Raises:
        SimulateError: nothing pinned and the server does not publish the keys; or the server
            now publishes other keys than the pinned ones.
    """
    what = "server key" if kind == "server" else "release keyring"
    pinned.parent.mkdir(parents=True, exist_ok=True)
    if given:
        staging = Path(tempfile.mkdtemp(prefix=".keys-", dir=pinned.parent))
        try:
            for path in given:
                try:
                    trust_key(staging / "keyring", path)
                except FleetError as err:
                    raise SimulateError(f"{option} {path}: {err}") from err
            _replace(pinned, staging / "keyring")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return f"{what} {_describe(Keyring.load(pinned))} from {option} (pinned in {pinned})"
    if not pinned.exists():
        try:
            document, url = _fetch(servers, kind)
        except SimulateError as err:
            raise SimulateError(
                f"cannot fetch the {what} from the server ({err}): give it with {option}"
            ) from err
        keyring_from(document, url, pinned)
        return (
            f"{what} {_describe(Keyring.load(pinned))} fetched from {url} and pinned in "
            f"{pinned} (trust on first use: later runs refuse other keys)"
        )
    mine = Keyring.load(pinned)
    try:
        document, url = _fetch(servers, kind)
    except SimulateError as err:
        return f"{what} {_describe(mine)} as pinned in {pinned} (not compared: {err})"
    fresh = pinned.parent / f".{pinned.name}.fetched"
    try:
        keyring_from(document, url, fresh)
        theirs = Keyring.load(fresh)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    if (theirs.active_key_ids, theirs.threshold) != (mine.active_key_ids, mine.threshold):
        raise SimulateError(
            f"{url} publishes {what} {_describe(theirs)}, not the {_describe(mine)} pinned in "
            f"{pinned}: if the change is expected (a key rotation, another server), remove "
            f"{pinned} or give the keys with {option}"
        )
    return f"{what} {_describe(mine)} as pinned in {pinned}, the same on {url}"


# --- the work directory ---------------------------------------------------------------------

# Held (flock) by the run that uses the work directory; it holds that run's process id.
LOCK_FILE = ".lock"
# Written in WORKDIR/devices when this command makes it: only a directory holding it is removed
# wholesale by the next run, never one that holds someone else's files.
DEVICES_MARKER = marker_name("fleet simulate")


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold ``WORKDIR/.lock`` for the block: a second simulation on the same work directory
    would remove the devices the first one is running on.

    Raises:
        SimulateError: another process holds the lock (named by its process id).
    """
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with holding(workdir / LOCK_FILE):
            yield
    except LockHeld as held:
        raise SimulateError(
            f"work directory {workdir} is in use by another fleet simulate (pid {held.holder}): "
            "stop it, or give another --workdir"
        ) from None
    except OSError as err:
        raise SimulateError(f"work directory {workdir}: {err.strerror}") from err


def fresh_devices_dir(fleet_dir: Path) -> None:
    """Make ``fleet_dir`` empty for a new fleet (:func:`chaos.workdir.fresh_directory`: an
    earlier run's devices are removed, an empty directory is reused, anything else is refused).

    Raises:
        SimulateError: ``fleet_dir`` is not a directory this command made.
    """
    try:
        fresh_directory(fleet_dir, "fleet simulate")
    except WorkdirError as err:
        raise SimulateError(str(err)) from err


# --- the command ----------------------------------------------------------------------------


@click.command()
@click.option("--server", "servers", multiple=True, required=True, help="Server URL (repeat).")
@click.option("--enrollment-token", required=True, envvar="FLEET_ENROLLMENT_TOKEN",
              help="From `fleet server enrollment-token create` (or $FLEET_ENROLLMENT_TOKEN); "
              "one use per device.")  # fmt: skip
@click.option("--devices", type=click.IntRange(1, MAX_DEVICES), default=10, show_default=True)
@click.option("--compatible", default=DEFAULT_COMPATIBLE, show_default=True,
              help="The devices' compatible string: bundles built with `fleet bundle create "
              "--compatible` the same install on them.")  # fmt: skip
@click.option("--base-version", default="1.0.0", show_default=True,
              help="The release the devices leave the factory with (security "
              "version 1).")  # fmt: skip
@click.option("--server-key", "server_keys", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The server's server-key.pub. Default: fetched from the server on first use "
              "and pinned in WORKDIR/pinned (trust on first use).")  # fmt: skip
@click.option("--release-key", "release_keys", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A release key .pub the devices trust (repeat). Default: the server's "
              "release keyring, fetched and pinned like the server key.")  # fmt: skip
@click.option("--workdir", default="build/fleet", type=click.Path(path_type=Path),
              show_default=True,
              help="The devices (WORKDIR/devices, made afresh each run) and the "
              "pinned keys (WORKDIR/pinned); one run at a time uses it, and a devices "
              "directory holding files it did not make is refused.")  # fmt: skip
@click.option("--faults", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="What goes wrong on which devices (TOML; docs/simulate.md).")  # fmt: skip
@click.option("--firmware", type=click.Choice(["grub", "uboot", "tryboot"]), default="grub",
              show_default=True)  # fmt: skip
@click.option("--step", "step_s", type=FiniteFloatRange(0.1, 3600.0), default=5.0,
              show_default=True, help="Simulated seconds per step.")  # fmt: skip
@click.option("--speed", type=FiniteFloatRange(0.01, 1_000_000.0), default=60.0,
              show_default=True, help="Simulated seconds per real second.")  # fmt: skip
@click.option("--duration", type=FiniteFloatRange(0.0, MAX_SIMULATED_S, min_open=True),
              default=3600.0, show_default=True, help="Simulated seconds to run.")  # fmt: skip
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Devices that act at the same time (requests in flight at once).")  # fmt: skip
def simulate(
    servers: tuple[str, ...],
    enrollment_token: str,
    devices: int,
    compatible: str,
    base_version: str,
    server_keys: tuple[Path, ...],
    release_keys: tuple[Path, ...],
    workdir: Path,
    faults: Path | None,
    firmware: str,
    step_s: float,
    speed: float,
    duration: float,
    workers: int,
) -> None:
    """Run a virtual fleet of DEVICES devices that follows the release server: each enrolls
    with the token, checks in, installs what it is assigned (ordinary bundles for its
    --compatible, or lab images) and reboots into it. docs/simulate.md."""
    from chaos.fleet import VirtualFleet

    specs = read_specs(devices, faults)
    with workdir_lock(workdir):
        pinned = workdir / "pinned"
        for line in (
            pin_keys(pinned / "server-keyring", servers, "server", server_keys, "--server-key"),
            pin_keys(pinned / "release-keyring", servers, "release", release_keys, "--release-key"),
        ):
            click.echo(printable(line))
        fleet_dir = workdir / "devices"
        fresh_devices_dir(fleet_dir)
        fleet = VirtualFleet(
            fleet_dir, specs, server_urls=servers, server_key=pinned / "server-keyring",
            release_key=pinned / "release-keyring", enrollment_token=enrollment_token,
            firmware=firmware, workers=workers, compatible=compatible, base_version=base_version,
            plain_images=True, slot_sizes=PLAIN_SLOT_SIZES,
        )  # fmt: skip
        click.echo(
            f"{len(fleet.members)} virtual devices ({compatible}, running {base_version}) in "
            f"{fleet_dir}, following {', '.join(servers)}"
        )
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
