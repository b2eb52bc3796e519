"""The ``grub`` backend: A/B boot selection with GRUB, a boot counter per slot in ``grubenv``.

For x86 gateways and the QEMU reference device (UEFI firmware, GRUB on the ESP). The scheme is
RAUC's GRUB scheme, so that a U-Boot script can implement the same one.

State: the GRUB environment block (see :mod:`bootloader_hooks.grubenv`) next to the
``grub.cfg`` this module installs (``/boot/efi/EFI/fleet/grubenv`` by default). Variables:

``BOOT_ORDER``
    The slots GRUB tries, in order, as space-separated upper-case letters: ``"A B"``.
``BOOT_A_LEFT``, ``BOOT_B_LEFT``
    Boots the slot may still take: a single digit. Anything else counts as 0.
``FLEET_TRIAL``
    The letter of the slot on trial (not yet committed); absent otherwise. GRUB ignores it;
    it only tells Linux that the running slot is on trial.

What GRUB does on every boot (the ``grub.cfg`` of :mod:`bootloader_hooks.grub_script`; GRUB
keeps no state but the block, so power-on, reset and reboot all behave alike):

1. ``load_env`` the three boot variables (a whitelist: the block cannot set anything else).
   If the block cannot be loaded, boot the safe-mode slot.
2. For each letter in ``BOOT_ORDER``: skip it unless it is ``A`` or ``B`` with a count of 1-9;
   otherwise take one from its count (spelled out digit by digit: GRUB has no arithmetic),
   ``save_env`` that count, and boot the slot with ``fleet.slot=a`` (or ``b``) on the kernel
   command line. If the count cannot be saved, try the next letter rather than boot a slot
   whose attempts are not being used up.
3. With no slot left, boot the safe-mode slot (``fleet.slot=safe``). If the chosen kernel does
   not load, GRUB's ``fallback`` boots the safe-mode slot too. ``fallback`` names the safe-mode
   entry by its number (the entries are written in the order a, b, safe): GRUB 2.06 resolves
   ``default`` by number, title or id, but ``fallback`` by number only.

Meanings, for Linux:

- *primary*: the first slot of ``BOOT_ORDER`` with attempts left that is not ``FLEET_TRIAL``:
  the committed slot GRUB boots once no trial is pending; ``None`` when there is none (GRUB
  would boot the trial, then safe mode);
- *trial*: ``FLEET_TRIAL`` names the booted slot;
- *good* (``commit``): the slot is first in ``BOOT_ORDER`` with a full count and no trial mark.
  Called on every healthy boot, so a committed slot that stops booting uses up its count
  and GRUB falls back to the next slot of ``BOOT_ORDER`` on its own;
- *bad* (``mark_bad``): count 0 and out of ``BOOT_ORDER`` until the next ``try_once``.

``try_once(s)``: ``BOOT_ORDER`` = ``s`` then the other slot if it is still in the order (not
marked bad), ``BOOT_s_LEFT`` = attempts, ``FLEET_TRIAL`` = ``s``. ``commit(s)`` is the same
without the trial mark. Each is one write of the whole block. A ``commit`` of one slot
while the other is on trial (not yet booted) cancels that trial: the other slot keeps its count
behind ``s`` and becomes the fallback of ``s``, no longer marked as a trial.

Power cuts. Linux, like GRUB, rewrites the block in place (:func:`grubenv.write`): on the
ESP's FAT a rename is not atomic (a cut can leave the directory entry pointing at a cluster the
FAT marks free), while an in-place write changes neither clusters, nor the FAT, nor the
directory entry. Our variables sit in the first 512-byte sector and the rest is constant
padding, so after a cut the old block or the new one is there, and either is a consistent state
(before step 6 of an install the old slot is primary; a cut in ``commit`` leaves the trial
pending or committed). GRUB's decrement changes one byte of that sector; a lost decrement costs
one extra attempt, never a lost slot. A missing block (or one of another size) is written as a
new file, completely, before a rename.

Corruption: a damaged block raises :class:`BootStateCorruptError` for every read, and
``try_once``/``commit``/``mark_bad`` refuse to overwrite it: which slot is committed is exactly
what a damaged block no longer tells, and only the caller (the updater's state store, or an
operator) knows. :meth:`GrubBackend.repair` writes a fresh block naming a primary slot. GRUB,
meanwhile, boots the safe-mode slot, which can phone home. A missing block is no different
(:class:`BootStateMissingError`): GRUB boots safe mode without it, and only ``repair`` writes a
new one, so what Linux reports is what GRUB will find.

"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootloader_hooks import grubenv
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
from fleet_core.settings import Setting

if TYPE_CHECKING:
    from bootloader_hooks.grub_script import SlotEntry

NAME = "grub"
WHO = "grub backend"

DEFAULT_GRUBENV = "/boot/efi/EFI/fleet/grubenv"
DEFAULT_ATTEMPTS = 3
MAX_ATTEMPTS = 9  # the count is one digit, so that grub.cfg can spell out every decrement

ORDER_VAR = "BOOT_ORDER"
TRIAL_VAR = "FLEET_TRIAL"
# Where provisioning puts grub.cfg and grubenv, relative to the ESP.
ESP_DIRECTORY = "EFI/fleet"
CFG_FILE = "grub.cfg"
ENV_FILE = "grubenv"


def left_var(slot: str) -> str:
    """The grubenv variable holding the attempts left of a root slot: ``BOOT_A_LEFT``."""
    return f"BOOT_{slot.upper()}_LEFT"


# ---------------------------------------------------------------------------------------------
# The rules: pure functions from variables to answers and changes.


def boot_order(variables: Mapping[str, str]) -> list[str]:
    """The root slots of ``BOOT_ORDER``, lower case, in order; words GRUB skips are dropped."""
    letters = [slot.upper() for slot in ROOT_SLOTS]
    return [word.lower() for word in variables.get(ORDER_VAR, "").split() if word in letters]


def attempts_in(variables: Mapping[str, str], slot: str) -> int:
    """The count of ``slot``: a single digit, anything else is 0 (GRUB matches digits only)."""
    value = variables.get(left_var(slot), "")
    return int(value) if len(value) == 1 and value in "0123456789" else 0


def trial_in(variables: Mapping[str, str]) -> str | None:
    """The slot ``FLEET_TRIAL`` names, if it names one."""
    value = variables.get(TRIAL_VAR, "")
    return value.lower() if value in [slot.upper() for slot in ROOT_SLOTS] else None


def primary_in(variables: Mapping[str, str]) -> str | None:
    """The committed slot GRUB boots once no trial is pending (see the module docstring)."""
    trial = trial_in(variables)
    for slot in boot_order(variables):
        if slot != trial and attempts_in(variables, slot) > 0:
            return slot
    return None


def checked_scheme(variables: dict[str, str], path: Path) -> dict[str, str]:
    """``variables`` if they hold the scheme as this module and ``grub.cfg`` write it, else
    the error naming what is off. A block that merely parses can still make GRUB boot the
    safe-mode slot for ever (``BOOT_ORDER=C D``, counts of ``-1``): damage, to be repaired from
    the state store, not a boot state whose primary is "none".

    Raises:
        BootStateMissingError: none of the scheme's variables (a blank block).
        BootStateCorruptError: one of them is missing or holds what no writer of ours writes.
    """
    names = (ORDER_VAR, left_var("a"), left_var("b"))
    if not any(name in variables for name in (*names, TRIAL_VAR)):
        raise BootStateMissingError(f"{WHO}: {path} holds none of the boot variables")
    missing = [name for name in names if name not in variables]
    if missing:
        raise BootStateCorruptError(f"{WHO}: {path} lacks {', '.join(missing)}")
    words = variables[ORDER_VAR].split()
    letters = [slot.upper() for slot in ROOT_SLOTS]
    if any(word not in letters for word in words) or len(set(words)) != len(words):
        raise BootStateCorruptError(
            f"{WHO}: {path}: {ORDER_VAR}={variables[ORDER_VAR]!r} is no boot order "
            f"(each of {' '.join(letters)} at most once)"
        )
    for slot in ROOT_SLOTS:
        value = variables[left_var(slot)]
        if not (len(value) == 1 and value in "0123456789"):
            raise BootStateCorruptError(
                f"{WHO}: {path}: {left_var(slot)}={value!r} is not a count of 0 to 9"
            )
    trial = variables.get(TRIAL_VAR)
    if trial is not None and trial not in letters:
        raise BootStateCorruptError(f"{WHO}: {path}: {TRIAL_VAR}={trial!r} names no root slot")
    return variables


def _order_with_first(variables: Mapping[str, str], slot: str) -> str:
    """``BOOT_ORDER`` with ``slot`` first, the other slot after it unless it was marked bad."""
    other = other_slot(slot)
    order = [slot, other] if other in boot_order(variables) else [slot]
    return " ".join(letter.upper() for letter in order)


def try_once_changes(variables: Mapping[str, str], slot: str, attempts: int) -> dict[str, str]:
    """The variables :meth:`GrubBackend.try_once` writes, in the order it writes them."""
    return {
        ORDER_VAR: _order_with_first(variables, slot),
        left_var(slot): str(attempts),
        TRIAL_VAR: slot.upper(),
    }


def commit_changes(variables: Mapping[str, str], slot: str, attempts: int) -> dict[str, str | None]:
    """The variables :meth:`GrubBackend.commit` writes (``None``: removed)."""
    return {
        ORDER_VAR: _order_with_first(variables, slot),
        left_var(slot): str(attempts),
        TRIAL_VAR: None,
    }


def mark_bad_changes(variables: Mapping[str, str], slot: str) -> dict[str, str | None]:
    """The variables :meth:`GrubBackend.mark_bad` writes (``None``: removed)."""
    order = [s.upper() for s in boot_order(variables) if s != slot]
    changes: dict[str, str | None] = {ORDER_VAR: " ".join(order), left_var(slot): "0"}
    if trial_in(variables) == slot:
        changes[TRIAL_VAR] = None
    return changes


def default_block(
    primary: str | None = "a", attempts: int = DEFAULT_ATTEMPTS, fallback: str | None = None
) -> grubenv.EnvBlock:
    """A fresh block with ``primary`` committed (``None``: no root slot, GRUB boots safe mode)
    and the other slot in the order behind it, bootable only when it is ``fallback``."""
    if primary is None:
        return grubenv.EnvBlock.new().update(
            {ORDER_VAR: "", left_var("a"): "0", left_var("b"): "0"}
        )
    other = other_slot(primary)
    if fallback not in (None, other):
        raise UnknownSlotError(f"{WHO}: fallback {fallback!r} is not the other root slot")
    counts = {primary: attempts, other: attempts if fallback == other else 0}
    return grubenv.EnvBlock.new().update(
        {
            ORDER_VAR: f"{primary.upper()} {other.upper()}",
            left_var("a"): str(counts["a"]),
            left_var("b"): str(counts["b"]),
        }
    )


# ---------------------------------------------------------------------------------------------
# The backend: reads and writes the block.


class GrubBackend:
    """The boot selector for GRUB; see the module docstring for the scheme."""

    name: str = NAME

    def __init__(
        self,
        grubenv_path: Path = Path(DEFAULT_GRUBENV),
        cmdline: Path = Path(DEFAULT_CMDLINE),
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        check_attempts(WHO, attempts, MAX_ATTEMPTS)
        self.grubenv_path = grubenv_path
        self.cmdline = cmdline
        self.attempts = attempts

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> GrubBackend:
        """Build from the ``[bootloader]`` table; see :func:`parse_options` for the keys.

        Raises:
            BootloaderError: an unknown key or a value of the wrong type or range.
        """
        return cls(**parse_options(options))

    # --- questions (BootSelector) -------------------------------------------------------------

    def booted(self) -> str:
        return read_kernel_cmdline_slot(self.cmdline, WHO)

    def primary(self) -> str | None:
        return primary_in(self._variables())

    def is_trial(self) -> bool:
        booted = self.booted()
        return booted != SAFE_SLOT and trial_in(self._variables()) == booted

    def attempts_left(self, slot: str) -> int:
        check_root_slot(WHO, slot)
        return attempts_in(self._variables(), slot)

    # --- actions (BootSelector): each one write of the whole block ----------------------------

    def try_once(self, slot: str) -> None:
        """Arrange a trial of ``slot``: GRUB boots it up to ``attempts`` times, then falls back.

        Raises:
            UnknownSlotError: ``slot`` is not a root slot.
            BootStateCorruptError: the block is damaged (see :meth:`repair`) or full.
            BootloaderError: the block cannot be read or written.
        """
        check_root_slot(WHO, slot)
        block = self._load_ours()
        self._store(block.update(try_once_changes(block.variables(), slot, self.attempts)))

    def commit(self, slot: str) -> None:
        """Make ``slot`` primary with a full count; clears the trial mark.

        Raises: as :meth:`try_once`.
        """
        check_root_slot(WHO, slot)
        block = self._load_ours()
        self._store(block.update(commit_changes(block.variables(), slot, self.attempts)))

    def mark_bad(self, slot: str) -> None:
        """Never boot ``slot`` again until the next :meth:`try_once`.

        Raises: as :meth:`try_once`.
        """
        check_root_slot(WHO, slot)
        block = self._load_ours()
        self._store(block.update(mark_bad_changes(block.variables(), slot)))

    def reboot_command(self) -> list[str]:
        return ["reboot"]

    # --- repair and the state files (Repairable, StateFiles) ----------------------------------

    def repair(self, primary: str | None = "a", fallback: str | None = None) -> None:
        """Replace the block, damaged, missing or not, by a fresh one with ``primary``
        committed and ``fallback`` behind it (see ``bootloader_hooks.base.Repairable``).

        Everything else in the old block is dropped, foreign variables included. Only call this
        knowing which slot holds a good system (the updater's state store does).

        Raises:
            UnknownSlotError: ``primary`` or ``fallback`` is not a root slot (or not the other).
            BootloaderError: the block cannot be written.
        """
        if primary is not None:
            check_root_slot(WHO, primary)
        self._store(default_block(primary, self.attempts, fallback))

    def state_files(self) -> tuple[Path, ...]:
        return (self.grubenv_path,)

    # --- internals: the block -----------------------------------------------------------------

    def _variables(self) -> dict[str, str]:
        return self._load_ours().variables()

    def _load_ours(self) -> grubenv.EnvBlock:
        """The block, if it holds our scheme (see :func:`checked_scheme`)."""
        block = self._load()
        checked_scheme(block.variables(), self.grubenv_path)
        return block

    def _load(self) -> grubenv.EnvBlock:
        try:
            return grubenv.read(self.grubenv_path)
        except FileNotFoundError:
            # GRUB boots the safe-mode slot without it; which slot is good only the updater
            # knows: a read never makes one up (repair does, from the state store)
            raise BootStateMissingError(f"{WHO}: {self.grubenv_path} is missing") from None
        except BootloaderError as err:
            raise type(err)(f"{WHO}: {err}") from err

    def _store(self, block: grubenv.EnvBlock) -> None:
        try:
            grubenv.write(self.grubenv_path, block)
        except BootloaderError as err:
            raise type(err)(f"{WHO}: {err}") from err


# ---------------------------------------------------------------------------------------------
# Options.

OPTIONS = declare(
    NAME,
    (
        Setting(
            "grubenv", "path", f'"{DEFAULT_GRUBENV}"',
            "The GRUB environment block holding the boot order and the attempts left, on the "
            "ESP beside the `grub.cfg` that reads it.",
            '"/boot/efi/EFI/fleet/grubenv"',
        ),
        CMDLINE,
        Setting(
            "attempts", f"integer, 1 to {MAX_ATTEMPTS}", str(DEFAULT_ATTEMPTS),
            "Boots a trial slot is given before GRUB falls back to the committed one.",
            "2",
        ),
    ),
)  # fmt: skip


def parse_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the ``[bootloader]`` options of the ``grub`` backend; constructor arguments.

    Keys: ``grubenv`` (path, default ``/boot/efi/EFI/fleet/grubenv``), ``cmdline`` (default
    ``/proc/cmdline``), ``attempts`` (1-9, default 3). Reads nothing.

    Raises:
        BootloaderError: naming the offending key.
    """
    check_known(WHO, options, OPTIONS)
    return {
        "grubenv_path": path_option(WHO, "grubenv", options.get("grubenv", DEFAULT_GRUBENV)),
        "cmdline": path_option(WHO, "cmdline", options.get("cmdline", DEFAULT_CMDLINE)),
        "attempts": check_attempts(WHO, options.get("attempts", DEFAULT_ATTEMPTS), MAX_ATTEMPTS),
    }


def check_options(options: Mapping[str, Any]) -> None:
    """The options' check as a configuration loads: :func:`parse_options`."""
    parse_options(options)


# ---------------------------------------------------------------------------------------------
# Provisioning.


def provision(
    esp_dir: Path,
    *,
    primary: str | None = "a",
    attempts: int = DEFAULT_ATTEMPTS,
    entries: Mapping[str, SlotEntry] | None = None,
    kernel_options: str | None = None,
) -> dict[str, Path]:
    """The fresh boot files on the ESP mounted at ``esp_dir`` (see
    :func:`bootloader_hooks.base.provision`): ``EFI/fleet/grub.cfg`` for ``entries`` (default:
    the reference disk's), every entry with ``kernel_options`` if given, then
    ``EFI/fleet/grubenv`` as :meth:`GrubBackend.repair` writes it.

    Raises:
        UnknownSlotError: ``primary`` is not a root slot.
        BootloaderError: a file cannot be written, or ``entries`` are invalid.
    """
    # The script builder builds on this module, so it is imported when it is needed.
    from bootloader_hooks.grub_script import DEFAULT_ENTRIES, write_grub_cfg

    chosen = DEFAULT_ENTRIES if entries is None else entries
    if kernel_options is not None:
        chosen = {slot: replace(entry, options=kernel_options) for slot, entry in chosen.items()}
    cfg_path = write_grub_cfg(esp_dir, chosen)
    env_path = esp_dir / ESP_DIRECTORY / ENV_FILE
    GrubBackend(env_path, attempts=attempts).repair(primary)
    return {f"{ESP_DIRECTORY}/{CFG_FILE}": cfg_path, f"{ESP_DIRECTORY}/{ENV_FILE}": env_path}


register(NAME, check_options, provision)(GrubBackend.from_options)
