"""The ``uboot`` backend: A/B boot selection with U-Boot, a boot script and its environment.

The state lives in the U-Boot environment (``bootloader_hooks.ubootenv``: ``uboot.env`` on the
boot partition or a raw offset, one or two copies with CRC32), in these variables:

- ``FLEET_ENV=1``: the version of this scheme; the boot script starts afresh without it;
- ``BOOT_ORDER="A B"``: the root slots in order of preference (``A`` is slot ``a``);
- ``BOOT_A_LEFT`` / ``BOOT_B_LEFT``: boots the firmware will still try for each slot (0-9);
- ``FLEET_TRIAL=<letter>``: set while that slot is on trial;
- U-Boot's own ``upgrade_available`` (1 during a trial, 0 otherwise), ``bootcount`` (0, or
  during a trial ``bootlimit`` minus the trial slot's attempts left), ``bootlimit`` (= attempts)
  and ``altbootcmd``, so that a board built with ``CONFIG_BOOTCOUNT_LIMIT`` and
  ``CONFIG_BOOTCOUNT_ENV`` also falls back by itself.

The boot script (:mod:`bootloader_hooks.uboot_script`, installed as ``boot.scr``) runs at every
boot: it takes the first slot of ``BOOT_ORDER`` with attempts left, decrements its counter with
``setexpr``, runs ``saveenv`` and boots it with ``root=PARTLABEL=root_x fleet.slot=x`` on the
command line. With no slot left it boots the safe-mode slot (``fleet.slot=safe``). U-Boot's
bootcount runs in lockstep: ``try_once`` resets ``bootcount`` to 0 with ``bootlimit`` equal to the
attempts, so the boot after the last attempt is exactly the one where ``bootcount`` exceeds
``bootlimit``; U-Boot then runs ``altbootcmd`` (``setenv fleet_altboot 1; run bootcmd``) and the
script, seeing ``fleet_altboot``, ends the trial (its counter to 0, ``upgrade_available=0``)
before choosing as usual.

Meanings for this firmware:

- *primary*: the first slot of ``BOOT_ORDER`` with attempts left that is not on trial, i.e. the
  slot U-Boot falls back to (``None``: safe mode);
- *trial*: ``FLEET_TRIAL`` names the booted slot: it was armed by ``try_once`` and not committed;
- *good*: committed: first in ``BOOT_ORDER`` with its attempts reset. ``commit`` runs on every
  healthy boot, so a committed slot that stops booting uses up its attempts and falls back too;
- *bad*: attempts 0 and out of ``BOOT_ORDER`` until the next ``try_once``.

Each action is one read-modify-write of the environment that keeps every other variable
(``bootcmd``, Mender's, the board's) as it was. Power cuts: with a redundant environment the
write goes to the copy not in use, so a cut at any point leaves the old state or the new one
(see ``bootloader_hooks.ubootenv``). With a single copy in a file the file is replaced
atomically; a single copy at a raw offset can be torn, and U-Boot then starts from its default
environment, where the script finds no ``FLEET_ENV`` and starts afresh (both slots, full
attempts): the device still boots.

A damaged environment: with one bad copy the other is used and the next write repairs it. With
no valid copy every action raises :class:`BootStateCorruptError`, and a valid environment
without ``FLEET_ENV`` (a reset one, in which the script would start afresh with both slots,
one of them perhaps given up) :class:`BootStateMissingError`; nothing is guessed. The explicit
way out is :meth:`UBootBackend.repair`, which writes a fresh state naming the primary and the
fallback the caller knows to be good (the updater's state store) on top of the board's default
environment.

:meth:`UBootBackend.takeover_from_mender` converts a device that Mender's U-Boot integration
runs (``mender_boot_part`` et al.) to this scheme in one write.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootloader_hooks import ubootenv
from bootloader_hooks.base import (
    ROOT_SLOTS,
    SAFE_SLOT,
    check_root_slot,
    other_slot,
    read_kernel_cmdline_slot,
    register,
)
from bootloader_hooks.errors import (
    BootloaderError,
    BootStateCorruptError,
    BootStateMissingError,
    UnknownSlotError,
)
from bootloader_hooks.options import (
    CMDLINE,
    DEFAULT_CMDLINE,
    check_attempts,
    check_known,
    declare,
    path_option,
)
from bootloader_hooks.ubootenv import EnvLayout, EnvState
from fleet_core import durable
from fleet_core.settings import Setting

NAME = "uboot"
WHO = "uboot backend"
BOOTED = "booted"  # repair's default primary: the slot the kernel command line names
SCHEME_VERSION = "1"
MAX_ATTEMPTS = 9  # setexpr computes in hex: single digits read the same in hex and decimal
DEFAULT_ATTEMPTS = 3
DEFAULT_FW_ENV_CONFIG = "/etc/fw_env.config"
DEFAULT_ENV_SIZE = 0x4000
DEFAULT_INITIAL_ENV = Path("/etc/u-boot-initial-env")  # where libubootenv's fw_setenv looks
DEFAULT_MENDER_PARTITIONS: Mapping[int, str] = {2: "a", 3: "b"}
ENV_FILE = "uboot.env"  # what provisioning writes on the boot partition
INITIAL_ENV_FILE = "u-boot-initial-env"  # and the board's default environment beside it
ALTBOOTCMD = "setenv fleet_altboot 1; run bootcmd"
LETTERS = {"a": "A", "b": "B"}
SLOTS = {letter: slot for slot, letter in LETTERS.items()}

VAR_VERSION = "FLEET_ENV"
VAR_ORDER = "BOOT_ORDER"
VAR_TRIAL = "FLEET_TRIAL"
LEFT_VARS = {slot: f"BOOT_{letter}_LEFT" for slot, letter in LETTERS.items()}


def parse_decimal(text: str | None) -> int:
    """A counter as U-Boot's ``test`` reads it: leading sign and digits, anything else 0."""
    match = re.match(r"\s*([+-]?\d+)", text or "")
    return int(match.group(1)) if match else 0


@dataclass(frozen=True)
class SlotState:
    """The scheme's view of an environment: order, attempts left, slot on trial."""

    order: tuple[str, ...]
    left: Mapping[str, int]
    trial: str | None

    @classmethod
    def from_variables(cls, variables: Mapping[str, str], attempts: int) -> SlotState:
        """Read the scheme; an environment without ``FLEET_ENV`` reads as the boot script's
        fresh start (both slots, full attempts), which is what U-Boot would do with it."""
        if variables.get(VAR_VERSION) != SCHEME_VERSION:
            return cls(ROOT_SLOTS, dict.fromkeys(ROOT_SLOTS, attempts), None)
        order: list[str] = []
        for letter in variables.get(VAR_ORDER, "").split():
            slot = SLOTS.get(letter)
            if slot is not None and slot not in order:
                order.append(slot)
        left = {slot: parse_decimal(variables.get(LEFT_VARS[slot])) for slot in ROOT_SLOTS}
        return cls(tuple(order), left, SLOTS.get(variables.get(VAR_TRIAL, "")))

    def primary(self) -> str | None:
        for slot in self.order:
            if self.left[slot] > 0 and slot != self.trial:
                return slot
        return None

    def first(self, slot: str) -> tuple[str, ...]:
        return (slot, *(other for other in self.order if other != slot))


def scheme_variables(state: SlotState, attempts: int) -> dict[str, str]:
    """The variables that store ``state`` (an empty value means "unset").

    ``bootcount`` is kept in lockstep with the trial slot's counter (``bootlimit`` minus its
    attempts left), so U-Boot's limit is exceeded exactly when the trial's attempts run out.
    """
    on_trial = state.trial is not None
    bootcount = attempts - min(max(state.left[state.trial], 0), attempts) if state.trial else 0
    variables = {
        VAR_VERSION: SCHEME_VERSION,
        VAR_ORDER: " ".join(LETTERS[slot] for slot in state.order),
        VAR_TRIAL: LETTERS[state.trial] if state.trial else "",
        "upgrade_available": "1" if on_trial else "0",
        "bootcount": str(bootcount),
        "bootlimit": str(attempts),
        "altbootcmd": ALTBOOTCMD,
    }
    variables.update({LEFT_VARS[slot]: str(state.left[slot]) for slot in ROOT_SLOTS})
    return variables


@dataclass(frozen=True)
class MenderTakeover:
    """What :meth:`UBootBackend.takeover_from_mender` found and wrote."""

    partition: int
    slot: str
    trial: bool
    variables: Mapping[str, str]


class UBootBackend:
    """Boot selection through the U-Boot environment; see the module docstring."""

    name = NAME

    def __init__(
        self,
        layout: EnvLayout,
        *,
        cmdline: Path = Path(DEFAULT_CMDLINE),
        attempts: int = DEFAULT_ATTEMPTS,
        mender_partitions: Mapping[int, str] = DEFAULT_MENDER_PARTITIONS,
        bootcmd: str | None = None,
        initial_env: Path = DEFAULT_INITIAL_ENV,
    ) -> None:
        check_attempts(WHO, attempts, MAX_ATTEMPTS)
        self.layout = layout
        self.cmdline = cmdline
        self.attempts = attempts
        self.mender_partitions = dict(mender_partitions)
        self.bootcmd = bootcmd
        self.initial_env = initial_env

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> UBootBackend:
        """Build from the ``[bootloader]`` table; see :func:`parse_options` for the keys.

        Raises:
            BootloaderError: an unknown key, a value of the wrong type, an unreadable
                ``fw_env.config``.
        """
        return cls(**parse_options(options))

    # --- questions (BootSelector) -------------------------------------------------------------

    def booted(self) -> str:
        return read_kernel_cmdline_slot(self.cmdline, WHO)

    def primary(self) -> str | None:
        return self._state().primary()

    def is_trial(self) -> bool:
        booted = self.booted()
        return booted != SAFE_SLOT and self._state().trial == booted

    def attempts_left(self, slot: str) -> int:
        check_root_slot(WHO, slot)
        return max(self._state().left[slot], 0)

    # --- actions (BootSelector) ---------------------------------------------------------------

    def try_once(self, slot: str) -> None:
        """Arm one trial of ``slot``: first in order, full attempts, ``upgrade_available=1``."""
        check_root_slot(WHO, slot)

        def change(state: SlotState) -> SlotState:
            left = {**state.left, slot: self.attempts}
            return SlotState(state.first(slot), left, slot)

        self._update(change)

    def commit(self, slot: str) -> None:
        """Make ``slot`` the primary: first in order, full attempts, no trial."""
        check_root_slot(WHO, slot)

        def change(state: SlotState) -> SlotState:
            return SlotState(state.first(slot), {**state.left, slot: self.attempts}, None)

        self._update(change)

    def mark_bad(self, slot: str) -> None:
        """Never boot ``slot`` again until the next ``try_once``; ends its trial."""
        check_root_slot(WHO, slot)

        def change(state: SlotState) -> SlotState:
            order = tuple(other for other in state.order if other != slot)
            trial = None if state.trial == slot else state.trial
            return SlotState(order, {**state.left, slot: 0}, trial)

        self._update(change)

    def reboot_command(self) -> list[str]:
        return ["reboot"]

    # --- repair and the state files (Repairable, StateFiles) ----------------------------------

    def repair(self, primary: str | None = BOOTED, fallback: str | None = None) -> None:
        """Write a fresh state whatever the environment holds: the explicit way past
        :class:`BootStateCorruptError` (and :class:`BootStateMissingError`).

        ``primary`` (default: the booted root slot, which the kernel command line names
        reliably; ``None``: no root slot) becomes the committed primary with full attempts; the
        other slot stays in the order, with full attempts when it is ``fallback``, else none (the
        same choice as the GRUB backend's ``repair``). Booted in safe mode with the default, no
        root slot is left bootable: the device stays in safe mode until a slot is installed.
        Variables of a still valid copy are kept. With no valid copy the rest comes from the
        board's default environment (``initial_env``, a ``u-boot-initial-env`` file): once a
        copy is valid U-Boot uses it whole, so an environment of our variables alone would lose
        ``bootcmd`` and everything else the board needs. (Without any repair U-Boot starts from
        its built-in default at the next boot and the boot script starts afresh: the device
        boots.)

        Raises:
            UnknownSlotError: ``primary`` is not a root slot.
            BootloaderError: the booted slot is unknown, no copy is valid and the default
                environment cannot be read, or the write failed.
        """
        if primary == BOOTED:
            booted = self.booted()
            primary = None if booted == SAFE_SLOT else booted
        if primary is None:
            state = SlotState((), dict.fromkeys(ROOT_SLOTS, 0), None)
        else:
            check_root_slot(WHO, primary)
            other = other_slot(primary)
            if fallback not in (None, other):
                raise UnknownSlotError(f"{WHO}: fallback {fallback!r} is not the other root slot")
            left = {primary: self.attempts, other: self.attempts if fallback == other else 0}
            state = SlotState((primary, other), left, None)
        previous: EnvState | None
        try:
            previous = ubootenv.read_env(self.layout)
            variables = dict(previous.variables)
        except BootStateCorruptError:
            previous = None
            variables = ubootenv.read_initial_env(self.initial_env)
        if self.bootcmd is not None:
            variables["bootcmd"] = self.bootcmd
        self._write(variables, state, previous)

    def state_files(self) -> tuple[Path, ...]:
        """The environment's files (a block device among them is never replaced, so it has no
        temporaries beside it; sweeping its directory finds none)."""
        return tuple(dict.fromkeys(copy.path for copy in self.layout.copies))

    # --- Mender -------------------------------------------------------------------------------

    def takeover_from_mender(self) -> MenderTakeover:
        """Convert the environment of a Mender-managed device to this scheme, in one write.

        Mender keeps the partition to boot in ``mender_boot_part`` (decimal) and
        ``mender_boot_part_hex``, and uses U-Boot's ``upgrade_available``/``bootcount``/
        ``bootlimit``. The partition is mapped to a slot with the ``mender_partitions`` option.
        Without an update in progress that slot becomes committed (the other slot behind it,
        both with full attempts). During a Mender trial (``upgrade_available=1``) the trial
        carries over: the slot stays on trial with the boots Mender still allowed
        (``bootlimit - bootcount``), and ``bootcount``/``bootlimit`` are rescaled so U-Boot's
        own fallback stays in lockstep. Mender's variables are left in place, so a Mender boot
        script that still runs before ours is installed finds them consistent; ``altbootcmd``
        becomes ours, and ``bootcmd`` too when the backend was given one.

        Raises:
            BootStateCorruptError: no valid environment.
            BootloaderError: not a Mender environment, inconsistent Mender variables, a
                partition not in the map, or Mender's saveenv canary says that U-Boot never
                wrote this environment (so U-Boot and Linux disagree on where it is).
        """
        previous = ubootenv.read_env(self.layout)
        variables = previous.variables
        partition = mender_boot_partition(variables)
        slot = self.mender_partitions.get(partition)
        if slot is None:
            raise BootloaderError(
                f"{WHO}: Mender boots partition {partition}, which mender_partitions does not map"
            )
        check_root_slot(WHO, slot)
        trial = _env_flag(variables.get("upgrade_available"))
        other = other_slot(slot)
        if trial:
            limit = parse_decimal(variables.get("bootlimit")) or 1
            remaining = min(
                max(limit - parse_decimal(variables.get("bootcount")), 0), self.attempts
            )
            state = SlotState((slot, other), {slot: remaining, other: self.attempts}, slot)
        else:
            state = SlotState((slot, other), dict.fromkeys(ROOT_SLOTS, self.attempts), None)
        new = dict(variables)
        if self.bootcmd is not None:
            new["bootcmd"] = self.bootcmd
        written = self._write(new, state, previous)
        return MenderTakeover(partition, slot, trial, written)

    # --- internals ----------------------------------------------------------------------------

    def _state(self) -> SlotState:
        return self._ours(ubootenv.read_env(self.layout))

    def _update(self, change: Callable[[SlotState], SlotState]) -> None:
        previous = ubootenv.read_env(self.layout)
        self._write(dict(previous.variables), change(self._ours(previous)), previous)

    def _ours(self, env: EnvState) -> SlotState:
        """Our state in ``env``. Without ``FLEET_ENV`` U-Boot's script starts afresh (both slots,
        full attempts), which may boot a slot the updater gave up: the updater neither reads
        nor changes such an environment before a repair from its state store."""
        if env.variables.get(VAR_VERSION) != SCHEME_VERSION:
            raise BootStateMissingError(
                f"{WHO}: the environment holds no state of ours ({VAR_VERSION} unset)"
            )
        return SlotState.from_variables(env.variables, self.attempts)

    def _write(
        self,
        variables: dict[str, str],
        state: SlotState,
        previous: EnvState | None,
    ) -> Mapping[str, str]:
        for name, value in scheme_variables(state, self.attempts).items():
            if value:
                variables[name] = value
            else:
                variables.pop(name, None)
        return ubootenv.write_env(self.layout, variables, previous).variables


def _env_flag(value: str | None) -> bool:
    """U-Boot's ``env_get_ulong(name, 10, 0) != 0``."""
    return parse_decimal(value) != 0


def mender_boot_partition(variables: Mapping[str, str]) -> int:
    """The partition Mender's U-Boot integration boots, checked for consistency.

    Raises:
        BootloaderError: missing or inconsistent variables, or a failed saveenv canary.
    """
    part = variables.get("mender_boot_part", "")
    if not part.isdigit():
        raise BootloaderError(f"{WHO}: no Mender environment (mender_boot_part={part!r})")
    partition = int(part)
    part_hex = variables.get("mender_boot_part_hex")
    if part_hex is not None and (
        not re.fullmatch(r"[0-9a-fA-F]+", part_hex) or int(part_hex, 16) != partition
    ):
        raise BootloaderError(
            f"{WHO}: Mender variables disagree: mender_boot_part={part}, "
            f"mender_boot_part_hex={part_hex}"
        )
    if variables.get("mender_check_saveenv_canary") == "1" and (
        variables.get("mender_saveenv_canary") != "1"
    ):
        raise BootloaderError(
            f"{WHO}: Mender's saveenv canary is missing: U-Boot never saved this environment"
        )
    return partition


# --- options -------------------------------------------------------------------------------------

OPTIONS = declare(
    NAME,
    (
        Setting(
            "fw_env_config", "path", f'"{DEFAULT_FW_ENV_CONFIG}"',
            "Where the environment is, as `fw_setenv` reads it; excludes the `env_*` and "
            "`redundant_*` options.",
            '"/etc/fw_env.config"',
        ),
        Setting(
            "env_file", "path", None,
            "The environment's file or device, instead of `fw_env_config`.",
            '"/boot/uboot.env"',
        ),
        Setting(
            "env_offset", "integer (bytes)", "0",
            "Where the environment starts in `env_file`.",
            "0x3f8000",
        ),
        Setting(
            "env_size", "integer (bytes)", "0x4000",
            "The size of one copy of the environment, as U-Boot was built with.",
            "0x2000",
        ),
        Setting(
            "redundant_offset", "integer (bytes)", None,
            "Where the second copy starts: the environment is then redundant. Unset with "
            "`redundant_file` given: `env_offset`.",
            "0x4000",
        ),
        Setting(
            "redundant_file", "path", None,
            "The second copy's file or device: the environment is then redundant. Unset with "
            "`redundant_offset` given: `env_file`.",
            '"/boot/uboot-redund.env"',
        ),
        CMDLINE,
        Setting(
            "attempts", f"integer, 1 to {MAX_ATTEMPTS}", str(DEFAULT_ATTEMPTS),
            "Boots a trial slot is given before the boot script falls back.",
            "2",
        ),
        Setting(
            "mender_partitions", "table of partition numbers to slots", '{ 2 = "a", 3 = "b" }',
            "Which root partition is which slot, when taking over from Mender.",
            '{ 2 = "a", 3 = "b" }',
        ),
        Setting(
            "bootcmd", "string", None,
            "The `bootcmd` that the take-over from Mender and `repair` write. Unset: left "
            "alone.",
            '"run fleet_boot"',
        ),
        Setting(
            "initial_env", "path", f'"{DEFAULT_INITIAL_ENV}"',
            "The board's default environment, which `repair` starts from.",
            '"/etc/u-boot-initial-env"',
        ),
    ),
)  # fmt: skip
# the type check of each option; the names are OPTIONS
_OPTION_TYPES: Mapping[str, tuple[type, ...]] = {
    "fw_env_config": (str, os.PathLike),
    "env_file": (str, os.PathLike),
    "env_offset": (int,),
    "env_size": (int,),
    "redundant_offset": (int,),
    "redundant_file": (str, os.PathLike),
    "cmdline": (str, os.PathLike),
    "attempts": (int,),
    "mender_partitions": (Mapping,),
    "bootcmd": (str,),
    "initial_env": (str, os.PathLike),
}


def _check_option_types(options: Mapping[str, Any]) -> None:
    check_known(WHO, options, OPTIONS)
    for key, value in options.items():
        types = _OPTION_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join("path" if t is os.PathLike else t.__name__ for t in types)
            raise BootloaderError(f"{WHO}: option {key!r} must be a {expected}")


def _layout_from_options(options: Mapping[str, Any], read_files: bool = True) -> EnvLayout | None:
    file_keys = {"env_file", "env_offset", "env_size", "redundant_offset", "redundant_file"}
    given = file_keys & options.keys()
    if "fw_env_config" in options and given:
        raise BootloaderError(f"{WHO}: option 'fw_env_config' excludes {', '.join(sorted(given))}")
    if given and "env_file" not in options:
        raise BootloaderError(f"{WHO}: option 'env_file' is needed with {', '.join(sorted(given))}")
    if "env_file" not in options:
        if not read_files:
            return None
        return ubootenv.read_fw_env_config(options.get("fw_env_config", DEFAULT_FW_ENV_CONFIG))
    size = options.get("env_size", DEFAULT_ENV_SIZE)
    offset = options.get("env_offset", 0)
    if "redundant_offset" in options or "redundant_file" in options:
        return EnvLayout.redundant_pair(
            options["env_file"],
            size,
            offset,
            options.get("redundant_offset", offset),
            options.get("redundant_file"),
        )
    return EnvLayout.single(options["env_file"], size, offset)


def _mender_partitions(raw: Mapping[Any, Any]) -> dict[int, str]:
    partitions: dict[int, str] = {}
    for key, slot in raw.items():
        text = str(key)
        if isinstance(key, bool) or not text.isdigit() or not isinstance(slot, str):
            raise BootloaderError(
                f"{WHO}: option 'mender_partitions' maps partition numbers to slots, "
                f"not {key!r} to {slot!r}"
            )
        try:
            partitions[int(text)] = check_root_slot(WHO, slot)
        except UnknownSlotError as err:
            raise BootloaderError(f"{WHO}: option 'mender_partitions': {err}") from err
    return partitions


def parse_options(options: Mapping[str, Any], read_files: bool = True) -> dict[str, Any]:
    """Validate the ``[bootloader]`` options of the ``uboot`` backend; constructor arguments.

    Keys: ``fw_env_config`` (path, default ``/etc/fw_env.config``) *or* ``env_file`` with
    ``env_offset`` (bytes, default 0), ``env_size`` (bytes, default 0x4000),
    ``redundant_offset`` and ``redundant_file`` (either makes the environment redundant);
    ``cmdline`` (default ``/proc/cmdline``); ``attempts`` (1-9, default 3);
    ``mender_partitions`` (partition number -> slot, default ``{2: "a", 3: "b"}``);
    ``bootcmd`` (written by ``takeover_from_mender`` and ``repair``; default: left alone);
    ``initial_env`` (the board's default environment for ``repair``, default
    ``/etc/u-boot-initial-env``).

    Without ``read_files``, only what can be checked without reading the machine is checked
    (the ``fw_env.config`` named is not read): the check of a configuration as it loads.

    Raises:
        BootloaderError: naming the offending key.
    """
    _check_option_types(options)
    arguments: dict[str, Any] = {"layout": _layout_from_options(options, read_files)}
    if "cmdline" in options:
        arguments["cmdline"] = path_option(WHO, "cmdline", options["cmdline"])
    if "attempts" in options:
        arguments["attempts"] = check_attempts(WHO, options["attempts"], MAX_ATTEMPTS)
    if "mender_partitions" in options:
        arguments["mender_partitions"] = _mender_partitions(options["mender_partitions"])
    if "bootcmd" in options:
        arguments["bootcmd"] = options["bootcmd"]
    if "initial_env" in options:
        arguments["initial_env"] = path_option(WHO, "initial_env", options["initial_env"])
    return arguments


def check_options(options: Mapping[str, Any]) -> None:
    """The options' check as a configuration loads: :func:`parse_options`, reading nothing
    (the ``fw_env.config`` named is read when the backend is built)."""
    parse_options(options, read_files=False)


# --- provisioning --------------------------------------------------------------------------------


def provision(
    boot_dir: Path,
    *,
    primary: str | None = "a",
    attempts: int = DEFAULT_ATTEMPTS,
    initial_env: Mapping[str, str],
    env_size: int = DEFAULT_ENV_SIZE,
    redundant: bool = True,
    bootcmd: str | None = None,
) -> dict[str, Path]:
    """The fresh boot files on the boot partition mounted at ``boot_dir`` (see
    :func:`bootloader_hooks.base.provision`), as a board fresh from the factory has them:
    ``u-boot-initial-env`` holding the board's default environment ``initial_env``, and
    ``uboot.env`` (two copies of ``env_size`` bytes, or one if not ``redundant``) holding that
    environment with our state, as :meth:`UBootBackend.repair` writes it on a blank one.

    The backend's options for these files: ``env_file`` (and ``redundant_offset`` =
    ``env_size`` when redundant), ``env_size`` and ``initial_env``.

    Raises:
        UnknownSlotError: ``primary`` is not a root slot.
        BootloaderError: a file cannot be written, or a variable cannot be written as a line.
    """
    env_path, initial_path = boot_dir / ENV_FILE, boot_dir / INITIAL_ENV_FILE
    lines = []
    for name, value in initial_env.items():
        if not name or "=" in name or "\n" in name or "\n" in value:
            raise BootloaderError(f"{WHO}: initial_env: {name!r}={value!r} is not one line")
        lines.append(f"{name}={value}\n")
    copies = 2 if redundant else 1
    try:
        boot_dir.mkdir(parents=True, exist_ok=True)
        durable.atomic_write(initial_path, "".join(lines).encode())
        durable.atomic_write(env_path, bytes(copies * env_size))
    except OSError as err:
        raise BootloaderError(f"{WHO}: cannot write in {boot_dir}: {err.strerror}") from err
    if redundant:
        layout = EnvLayout.redundant_pair(env_path, env_size, 0, env_size, None)
    else:
        layout = EnvLayout.single(env_path, env_size, 0)
    backend = UBootBackend(layout, attempts=attempts, bootcmd=bootcmd, initial_env=initial_path)
    backend.repair(primary)
    return {INITIAL_ENV_FILE: initial_path, ENV_FILE: env_path}


register(NAME, check_options, provision)(UBootBackend.from_options)
