"""The boot selection boundary: what every firmware backend answers and does.

Modelled on RAUC's bootchooser. Slot names are ``"a"`` and ``"b"`` for the root slots and
``"safe"`` for the read-only safe-mode slot. Every backend implements :class:`BootSelector`:

- ``booted()``: the slot running now, as the firmware told Linux (kernel command line or
  device tree), never guessed from the mounted root;
- ``primary()``: the slot the firmware boots by default: the committed one (``None`` when no
  root slot is bootable, so the firmware would boot safe mode);
- ``is_trial()``: whether this boot is a trial of a slot that has not been committed;
- ``attempts_left(slot)``: boots the firmware will still try before falling back;
- ``try_once(slot)``: arrange a trial boot of ``slot`` at the next reboot; if Linux never
  commits it, the firmware falls back to the primary on its own;
- ``commit(slot)``: make ``slot`` the primary and reset its attempts, in one atomic write;
  called on every healthy boot, so a committed slot that later stops booting falls back too;
- ``mark_bad(slot)``: never choose ``slot`` again until it is rewritten (a new ``try_once``);
- ``reboot_command()``: the command that reboots into what has been arranged (the Raspberry Pi
  firmware needs ``reboot "0 tryboot"`` for a trial; the others a plain ``reboot``).

Each backend's docstring states what "good", "trial" and "primary" mean for its firmware and
where its state lives. Backends are looked up by name in :data:`BACKENDS`; each takes its
configuration in its constructor (``from_options``) and touches nothing global, so tests point
it at plain files. Each backend module registers itself with :func:`register`: its factory,
its ``check_options`` and its ``provision``.

A fresh boot state (``primary`` committed, the other slot not bootable) is made in one way
only: :func:`provision` writes the boot files of a backend's firmware into the directory the
firmware reads (the ESP for ``grub``: ``EFI/fleet/grub.cfg`` and ``grubenv``; the ``autoboot``
partition for ``tryboot``: ``autoboot.txt``; the boot partition for ``uboot``: ``uboot.env``
over the board's default environment, ``u-boot-initial-env``). The state in them is the one
the backend's ``repair(primary)`` writes, because ``repair`` writes it. :func:`provisioned_files`
gives the same files as bytes, for a disk image.

Firmware models (:class:`FirmwareModel`) are pure-Python descriptions of what the real firmware
does at boot, written from the firmware's documentation; the virtual device uses them in place
of real hardware.
"""

from __future__ import annotations

import enum
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from bootloader_hooks.errors import BootloaderError, UnknownBackendError, UnknownSlotError

ROOT_SLOTS = ("a", "b")
SAFE_SLOT = "safe"
ALL_SLOTS = (*ROOT_SLOTS, SAFE_SLOT)


def check_root_slot(backend: str, slot: str) -> str:
    """Return ``slot`` if it is a root slot, else raise :class:`UnknownSlotError`."""
    if slot not in ROOT_SLOTS:
        raise UnknownSlotError(
            f"{backend}: unknown slot {slot!r} (root slots: {', '.join(ROOT_SLOTS)})"
        )
    return slot


def other_slot(slot: str) -> str:
    """The other root slot of an A/B pair."""
    return "b" if check_root_slot("slots", slot) == "a" else "a"


class BootSelector(Protocol):
    """The seven questions and actions every boot firmware backend supports."""

    name: str

    def booted(self) -> str: ...

    def primary(self) -> str | None: ...

    def is_trial(self) -> bool: ...

    def attempts_left(self, slot: str) -> int: ...

    def try_once(self, slot: str) -> None: ...

    def commit(self, slot: str) -> None: ...

    def mark_bad(self, slot: str) -> None: ...

    def reboot_command(self) -> list[str]: ...


@runtime_checkable
class TrialRetry(Protocol):
    """Optional, for firmware that gives a trial exactly one boot (Raspberry Pi tryboot).

    The backend re-arms the trial in software up to its attempts, and tells a trial that never
    started (inert firmware, power lost before the boot) from one that started and died:

    - ``mark_trial_started()``: called as early as possible in a trial boot;
    - ``last_trial_result()``: what became of the last trial (an enum whose ``value`` is
      ``"never-started"``, ``"started-and-died"``, ...);
    - ``rearm()``: after a fall-back, arm the trial again if attempts remain (``True``); else
      mark it bad (``False``). Then reboot with ``reboot_command()``.
    """

    def mark_trial_started(self) -> bool: ...

    def last_trial_result(self) -> enum.Enum: ...

    def rearm(self) -> bool: ...


@runtime_checkable
class Repairable(Protocol):
    """What every backend of this package answers (optional for stand-ins in tests):

    - ``repair(primary, fallback=None)``: replace the boot state, damaged, missing or not, by a
      fresh one: ``primary`` committed (``None``: no root slot, so the firmware boots the
      safe-mode slot) and ``fallback`` bootable behind it (``None``: not bootable). Only the
      caller knows which slots hold a good system (the updater's state store does); reads
      never repair, so that what ``status`` shows is what the firmware will find.
    """

    def repair(self, primary: str | None, fallback: str | None = None) -> None: ...


@runtime_checkable
class StateFiles(Protocol):
    """What every backend of this package answers (optional for stand-ins in tests):

    - ``state_files()``: the files the backend rewrites with ``fleet_core.durable.atomic_write``,
      so that the temporaries a power cut left beside them can be swept away (and nothing else
      in those directories, a boot partition being shared with the firmware's own files).
    """

    def state_files(self) -> tuple[Path, ...]: ...


BackendFactory = Callable[[Mapping[str, Any]], BootSelector]
OptionCheck = Callable[[Mapping[str, Any]], object]
# directory, primary=, attempts=, backend specifics -> {path relative to directory: path written}
Provisioner = Callable[..., Mapping[str, Path]]
BACKENDS: dict[str, BackendFactory] = {}
OPTION_CHECKS: dict[str, OptionCheck] = {}
PROVISIONERS: dict[str, Provisioner] = {}
AUTO = "auto"  # the configuration's "find out from the machine" (updater.runtime.detect_backend)


def register(
    name: str, check: OptionCheck | None = None, provision: Provisioner | None = None
) -> Callable[[BackendFactory], BackendFactory]:
    """Class or function decorator: make a backend factory available under ``name``.

    ``check`` validates the backend's options (the ``[bootloader]`` table) without touching
    the machine, raising :class:`BootloaderError` naming the option; without one, the factory
    itself must be free of side effects and is the check. ``provision`` is what
    :func:`provision` runs for this backend.
    """

    def add(factory: BackendFactory) -> BackendFactory:
        BACKENDS[name] = factory
        OPTION_CHECKS[name] = check or factory
        if provision is not None:
            PROVISIONERS[name] = provision
        return factory

    return add


def _factory(name: str) -> BackendFactory:
    # Importing the package registers every backend.
    import bootloader_hooks  # noqa: F401

    try:
        return BACKENDS[name]
    except KeyError:
        raise UnknownBackendError(
            f"unknown boot backend {name!r} (known: {', '.join(sorted(BACKENDS))}, or {AUTO})"
        ) from None


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Validate the options of backend ``name`` as a configuration loads, reading nothing.

    ``auto`` takes no options: which backend they are for is known only on the device.

    Raises:
        UnknownBackendError: no backend of that name.
        BootloaderError: an option is unknown, or of the wrong type or range.
    """
    if name == AUTO:
        if options:
            raise BootloaderError(
                f"option(s) {', '.join(sorted(options))} need a named backend "
                f"(backend = {' or '.join(repr(n) for n in sorted(BACKENDS))}), not {AUTO!r}"
            )
        return
    _factory(name)
    OPTION_CHECKS[name](options)


def create_backend(name: str, options: Mapping[str, Any]) -> BootSelector:
    """Build the backend ``name`` from its options (the ``[bootloader]`` config table).

    Raises:
        UnknownBackendError: no backend of that name.
        BootloaderError: the options are invalid.
    """
    return _factory(name)(options)


def provision(
    name: str,
    directory: Path,
    *,
    primary: str | None = "a",
    attempts: int | None = None,
    **specifics: Any,
) -> dict[str, Path]:
    """Write a fresh boot state of backend ``name``'s firmware into ``directory``, the directory
    the firmware reads (mounted, or a tree to copy): ``primary`` committed (``None``: no root
    slot, the firmware boots safe mode), the other slot not bootable, exactly as the backend's
    ``repair(primary)`` writes it. Whatever boot state was there is replaced.

    ``attempts`` defaults to the backend's. The backend's own keywords (``specifics``):

    - ``grub``: ``entries`` (how to boot each slot, default the reference disk's) and
      ``kernel_options`` (the kernel parameters of every entry);
    - ``tryboot``: ``partitions`` (each slot's boot partition) and ``state_dir`` (where the
      backend keeps the shadow copy and the trial state; default: not kept, the backend then
      reads the same state from ``autoboot.txt`` alone);
    - ``uboot``: ``initial_env`` (required: the board's default environment, as variables),
      ``env_size``, ``redundant`` and ``bootcmd``.

    Returns:
        The files written, by their path relative to ``directory`` (``EFI/fleet/grubenv``).

    Raises:
        UnknownBackendError: no backend of that name, or one that cannot be provisioned.
        UnknownSlotError: ``primary`` is not a root slot.
        BootloaderError: a file cannot be written, or a keyword is invalid.
    """
    _factory(name)
    try:
        provisioner = PROVISIONERS[name]
    except KeyError:
        raise UnknownBackendError(f"boot backend {name!r} cannot be provisioned") from None
    if attempts is not None:
        specifics["attempts"] = attempts
    return dict(provisioner(Path(directory), primary=primary, **specifics))


def provisioned_files(
    name: str, *, primary: str | None = "a", attempts: int | None = None, **specifics: Any
) -> dict[str, bytes]:
    """The bytes :func:`provision` writes, by path relative to its directory, written nowhere
    that lasts (for a disk image)."""
    with tempfile.TemporaryDirectory(prefix="fleet-provision-") as scratch:
        written = provision(name, Path(scratch), primary=primary, attempts=attempts, **specifics)
        return {relative: path.read_bytes() for relative, path in written.items()}


class BootCause(enum.Enum):
    """Why the firmware is starting."""

    POWER_ON = "power-on"  # cold start: anything held in volatile memory is gone
    RESET = "reset"  # watchdog or crash reset: warm, but nobody asked for anything
    REBOOT = "reboot"  # Linux ran a reboot command (see ``BootEvent.command``)


@dataclass(frozen=True)
class BootEvent:
    """A start of the firmware, with the reboot command Linux ran, if it ran one."""

    cause: BootCause
    command: Sequence[str] = ()


@dataclass(frozen=True)
class BootOutcome:
    """What the firmware booted, and what it tells Linux about it.

    ``linux_view`` maps paths relative to the device's filesystem root (``proc/cmdline``,
    ``proc/device-tree/chosen/bootloader/partition``) to the bytes Linux finds there.
    """

    slot: str
    trial: bool
    linux_view: Mapping[str, bytes] = field(default_factory=dict)


class FirmwareModel(Protocol):
    """The boot decision of a firmware, from its documentation: reads and updates the on-disk
    boot state the way the firmware would, and says which slot boots."""

    def boot(self, event: BootEvent) -> BootOutcome: ...


def read_kernel_cmdline_slot(cmdline: Path, backend: str) -> str:
    """The slot named by ``fleet.slot=`` on the kernel command line at ``cmdline``.

    Raises:
        BootloaderError: the file is unreadable or names no known slot.
    """
    try:
        words = cmdline.read_text().split()
    except OSError as err:
        raise BootloaderError(f"{backend}: cannot read {cmdline}: {err.strerror}") from err
    for word in words:
        if word.startswith("fleet.slot="):
            slot = word.removeprefix("fleet.slot=")
            if slot not in ALL_SLOTS:
                raise BootloaderError(f"{backend}: {cmdline} names unknown slot {slot!r}")
            return slot
    raise BootloaderError(
        f"{backend}: {cmdline} has no fleet.slot= (not booted by our boot script)"
    )
