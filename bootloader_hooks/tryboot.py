"""The ``tryboot`` backend: Raspberry Pi 4/5/CM4 EEPROM bootloader, ``autoboot.txt`` A/B.

**The firmware's part.** Partition 1 (``autoboot``, FAT32) holds only ``autoboot.txt``
(:mod:`bootloader_hooks.autoboot`). Its ``[all]`` ``boot_partition`` is what every normal boot
starts; its ``[tryboot]`` ``boot_partition`` is what the *next* boot starts if Linux reboots
with ``reboot "0 tryboot"``. The tryboot flag lives in volatile memory and is consumed by that
one boot: a power cut, a crash or a watchdog reset during the try, or any later reboot, starts
``[all]`` again. The firmware has no counter and no notion of "bad"; it tells Linux what it did
in ``/proc/device-tree/chosen/bootloader/partition`` and ``.../tryboot`` (big-endian u32).

**Meanings here.**

- *primary*: the slot of ``[all]`` ``boot_partition`` (``None`` when that is the safe slot's
  partition: the firmware boots safe mode).
- *trial*: a boot with the device-tree ``tryboot`` flag set, of the slot we armed, which is
  not (yet) the primary.
- *good*: a slot committed since it was last written or marked bad. A slot we know nothing
  about (the other slot of a freshly provisioned device) is not good.
- *bad*: not good; only a new :meth:`~TrybootBackend.try_once` makes the firmware start it
  again.

**Where the state lives.** ``autoboot.txt`` (what the firmware obeys) and, in ``state_dir`` on
the data partition, ``autoboot.txt.shadow`` (its repair copy) and ``tryboot-state.json``: the
armed slot and the boot that armed it, the software attempt counter, the trial-started marker,
the good slots and the result of the last finished trial. Boots are told apart by the kernel's
``boot_id``.

**The software attempt counter.** The firmware gives a trial exactly one boot. So that a power
cut or a one-off crash does not reject a release, :meth:`~TrybootBackend.rearm` (called by the
boot check when the device is back on the primary after an armed trial that did not commit)
arms the same trial again, up to ``attempts`` trial boots in all; then it marks the slot bad.
Both kinds of failed trial count, so an inert firmware cannot cause an endless reboot loop.

**Trial-started marker.** :meth:`~TrybootBackend.mark_trial_started` runs very early in a trial
boot (a unit ordered right after the data partition is mounted) and records the boot. After a
fall-back, :meth:`~TrybootBackend.last_trial_result` reports:

- ``NEVER_STARTED`` (marker absent): our code never ran in the trial. The power was lost
  before the reboot, the reboot did not carry ``tryboot``, the bootloader does not support
  tryboot, the trial's boot files did not load (the bootloader walked to another partition),
  or the trial kernel died before user space. The updater reports it as
  ``trial.never_started``: look at the reboot path and the bootloader version first.
- ``STARTED_AND_DIED`` (marker present): the trial reached user space and the board was then
  reset without a verdict: a crash, a hang caught by the watchdog, a power cut during the
  trial. The updater reports it as ``trial.died``: the release itself is suspect.

Other results: ``NONE`` (no trial yet), ``PENDING`` (armed in this boot, reboot not done),
``RUNNING`` (this boot is the trial), ``COMMITTED``, ``REJECTED`` (marked bad before or during
its trial boot: failed health checks). A trial given up after a fall-back, by ``mark_bad`` or
by :meth:`~TrybootBackend.rearm` running out of attempts, keeps ``NEVER_STARTED`` or
``STARTED_AND_DIED``.

**A committed slot that keeps failing** in user space is given up with ``mark_bad(primary)``:
``[all]`` moves to the other root slot if it is good, else to the safe slot's partition. What
our code cannot see is a kernel that dies *before user space*: on a trial boot that is harmless
(any reset falls back), but a committed kernel that hangs early loops forever. Only something
armed before Linux runs can catch that:

- the EEPROM bootloader watchdog, ``BOOT_WATCHDOG_TIMEOUT=<s>`` in the EEPROM configuration
  (``rpi-eeprom-config --edit``), resets the board when the firmware does not start the Arm
  CPU in time; it is cancelled at the hand-over, so it covers a stuck firmware stage only.
  Keep ``BOOT_WATCHDOG_PARTITION=0`` so the reset goes through ``autoboot.txt`` again;
- U-Boot (see the ``uboot`` backend) can start the SoC watchdog before it starts the kernel
  and keep a boot counter across resets, so a kernel that hangs silently is reset and, after
  ``bootlimit`` tries, the other slot boots;
- without U-Boot, shrink the blind window: ``panic=10 panic_on_oops=1`` on every slot's
  ``cmdline.txt`` turn a kernel panic into a reset, ``RuntimeWatchdogSec=`` in systemd's
  ``system.conf`` opens the SoC watchdog as soon as PID 1 starts (within the driver's limit,
  see ``wdctl``).

Also set ``PARTITION=<safe partition>`` in the EEPROM configuration, so an ``autoboot.txt``
that lost its ``boot_partition`` boots safe mode rather than the first bootable partition, and
keep ``PARTITION_WALK=1`` (the default since 2025-08), so unloadable boot files walk on to the
next partition instead of stopping.

**Where partition 1 is mounted.** Raspberry Pi OS mounts *the* boot partition (``config.txt``,
kernel, firmware) at ``/boot/firmware`` since Bookworm; with A/B that role belongs to the
running slot's ``boot_a``/``boot_b``, where kernel packages install. Partition 1 must never
receive those files: it is tiny, and a ``start4.elf`` on it would make it bootable for the
firmware's "first bootable partition" default and partition walk. So partition 1 has its own
mount point and the default is ``/boot/autoboot/autoboot.txt``
(``PARTLABEL=autoboot /boot/autoboot vfat noatime 0 0``).

**Power cuts**, per durable write (``fleet_core.durable``; see also
:class:`~bootloader_hooks.autoboot.AutobootFile`):

- ``try_once``: state (armed), then ``autoboot.txt`` ``[tryboot]``. A cut between the two
  leaves ``[tryboot]`` on the primary: no trial happens, the result is ``NEVER_STARTED`` and
  ``rearm`` writes ``[tryboot]`` again. ``[all]`` is never touched.
- ``commit``: ``autoboot.txt`` (``[all]`` and ``[tryboot]`` in one in-place write), then the
  state. A torn write boots the old or the new primary, and the next load completes it from
  the shadow; a cut before the state write is recognised (the armed slot is the primary) and
  reported as ``COMMITTED``.
- ``mark_bad``: state first (so a rejected trial is never re-armed), then ``autoboot.txt``.
  A cut between the two boots the old primary once more; its failure calls ``mark_bad``
  again, which completes.
- ``rearm`` and ``mark_trial_started``: the state only (plus ``[tryboot]`` if it is not on the
  armed slot), one atomic write.
"""

from __future__ import annotations

import enum
import json
import logging
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bootloader_hooks.autoboot import (
    MAX_PARTITION,
    MIN_PARTITION,
    AutobootConfig,
    AutobootFile,
)
from bootloader_hooks.base import ALL_SLOTS, ROOT_SLOTS, SAFE_SLOT, check_root_slot, register
from bootloader_hooks.errors import BootloaderError
from bootloader_hooks.options import (
    check_attempts,
    check_known,
    command_option,
    declare,
    path_option,
)
from fleet_core import durable
from fleet_core.settings import Setting

NAME = "tryboot"
AUTOBOOT_FILE = "autoboot.txt"  # alone on partition 1, which provisioning writes
WHO = "tryboot backend"
STATE_FILE = "tryboot-state.json"
SHADOW_FILE = "autoboot.txt.shadow"
STATE_FORMAT = "metrica-fleet tryboot state"
STATE_VERSION = 1
DEFAULT_ATTEMPTS = 3  # trial boots per try_once, counting the first

log = logging.getLogger(__name__)


class TrialResult(enum.Enum):
    """What became of the most recent trial; see the module docstring."""

    NONE = "none"
    PENDING = "pending"
    RUNNING = "running"
    COMMITTED = "committed"
    REJECTED = "rejected"
    NEVER_STARTED = "never-started"
    STARTED_AND_DIED = "started-and-died"


@dataclass(frozen=True)
class TrybootConfig:
    """The ``[bootloader]`` options of the tryboot backend, with production defaults."""

    autoboot_txt: Path = Path("/boot/autoboot/autoboot.txt")
    device_tree: Path = Path("/proc/device-tree")
    state_dir: Path = Path("/var/lib/fleet/boot")
    boot_id: Path = Path("/proc/sys/kernel/random/boot_id")
    partitions: Mapping[str, int] = field(default_factory=lambda: {"a": 2, "b": 3, "safe": 4})
    reboot_command: tuple[str, ...] = ("reboot", "0 tryboot")  # into an armed trial
    plain_reboot_command: tuple[str, ...] = ("reboot",)
    attempts: int = DEFAULT_ATTEMPTS


@dataclass(frozen=True)
class TrialState:
    """``tryboot-state.json``: what the firmware cannot remember for us."""

    good: frozenset[str] = frozenset()
    armed: str | None = None  # slot whose trial is arranged and not finished
    armed_boot: str | None = None  # boot_id of the boot that (re)armed it
    attempts_left: int = 0  # trial boots of ``armed`` still allowed, counting the armed one
    started_boot: str | None = None  # boot_id of the trial boot that reached user space
    last_result: TrialResult = TrialResult.NONE  # of the last finished trial

    def to_bytes(self) -> bytes:
        record = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "good": sorted(self.good),
            "armed": self.armed,
            "armed_boot": self.armed_boot,
            "attempts_left": self.attempts_left,
            "started_boot": self.started_boot,
            "last_result": self.last_result.value,
        }
        return (json.dumps(record, indent=2) + "\n").encode()

    @classmethod
    def from_dict(cls, record: Any) -> TrialState:
        """Raises ValueError (or TypeError) on anything but a record of ours."""
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        if record.get("format") != STATE_FORMAT or record.get("version") != STATE_VERSION:
            raise ValueError("unknown format or version")
        good = record["good"]
        if not isinstance(good, list) or not set(good) <= set(ROOT_SLOTS):
            raise ValueError("bad 'good'")
        attempts = record["attempts_left"]
        if type(attempts) is not int or attempts < 0:
            raise ValueError("bad 'attempts_left'")
        return cls(
            good=frozenset(good),
            armed=_optional(record["armed"], ROOT_SLOTS),
            armed_boot=_optional(record["armed_boot"]),
            attempts_left=attempts,
            started_boot=_optional(record["started_boot"]),
            last_result=TrialResult(record["last_result"]),
        )


def _optional(value: Any, allowed: Sequence[str] | None = None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or (allowed is not None and value not in allowed):
        raise ValueError(f"unexpected value {value!r}")
    return value


class TrybootBackend:
    """Boot selection through ``autoboot.txt`` and ``reboot "0 tryboot"``."""

    name: str = NAME

    def __init__(self, config: TrybootConfig | None = None) -> None:
        self.config = config or TrybootConfig()
        self._slot_of = {part: slot for slot, part in self.config.partitions.items()}
        self._state_path = self.config.state_dir / STATE_FILE
        self.autoboot = AutobootFile(
            self.config.autoboot_txt,
            self.config.state_dir / SHADOW_FILE,
            set(self.config.partitions.values()),
        )

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TrybootBackend:
        """Build from the ``[bootloader]`` table; see :func:`parse_options` for the keys.

        Raises:
            BootloaderError: an unknown key, or a value of the wrong type or range.
        """
        return cls(parse_options(options))

    # --- questions (BootSelector) -------------------------------------------------------------

    def booted(self) -> str:
        """The slot whose boot partition the firmware reports in the device tree."""
        partition = self._dt_u32("partition")
        if partition is None:
            raise BootloaderError(
                f"{WHO}: {self._dt_path('partition')} is missing "
                "(not started by the Raspberry Pi EEPROM bootloader?)"
            )
        try:
            return self._slot_of[partition]
        except KeyError:
            raise BootloaderError(
                f"{WHO}: the firmware booted partition {partition}, no slot's boot partition"
            ) from None

    def primary(self) -> str | None:
        """The slot every normal boot starts; ``None`` when that is safe mode."""
        slot = self._slot_of[self.autoboot.load().boot_partition]
        return None if slot == SAFE_SLOT else slot

    def is_trial(self) -> bool:
        """Whether the firmware set the tryboot flag and booted the slot we armed, uncommitted."""
        if not self._dt_u32("tryboot"):
            return False
        return self._in_trial(self._state(), self.booted(), self.autoboot.load())

    def attempts_left(self, slot: str) -> int:
        """Trial boots left for the armed slot; ``attempts`` for a good one; 0 for a bad one."""
        check_root_slot(WHO, slot)
        state = self._state()
        if state.armed == slot:
            return state.attempts_left
        return self.config.attempts if slot in state.good else 0

    # --- actions (BootSelector) ---------------------------------------------------------------

    def try_once(self, slot: str) -> None:
        """Arm one trial boot of ``slot`` (``attempts`` of them with :meth:`rearm`).

        Raises:
            UnknownSlotError: ``slot`` is not a root slot.
            BootloaderError: ``slot`` is running now, or the state cannot be written.
        """
        check_root_slot(WHO, slot)
        if self.booted() == slot:
            raise BootloaderError(f"{WHO}: cannot try slot {slot}: it is running now")
        config = self.autoboot.load()
        state = self._state()
        self._save(
            replace(
                state,
                good=state.good - {slot},
                armed=slot,
                armed_boot=self._boot_id(),
                attempts_left=self.config.attempts,
                started_boot=None,
            )
        )
        self.autoboot.store(replace(config, tryboot_partition=self._partition(slot)))
        log.info("%s: trial of slot %s armed (%d attempts)", NAME, slot, self.config.attempts)

    def commit(self, slot: str) -> None:
        """Make the running ``slot`` the primary, and the target of any stray tryboot.

        Committing the primary again while another slot's trial is armed changes nothing, so
        the boot check may confirm every healthy boot without cancelling a trial that
        :meth:`rearm` will retry.

        Raises:
            UnknownSlotError: ``slot`` is not a root slot.
            BootloaderError: ``slot`` is not the running slot (only a slot that booted and
                passed its checks is committed), or a write fails.
        """
        check_root_slot(WHO, slot)
        booted = self.booted()
        if booted != slot:
            raise BootloaderError(
                f"{WHO}: refusing to commit slot {slot}: the running slot is {booted}"
            )
        config = self.autoboot.load()
        state = self._state()
        partition = self._partition(slot)
        if config.boot_partition == partition and state.armed not in (None, slot):
            self._save_if_changed(state, replace(state, good=state.good | {slot}))
            return
        self.autoboot.store(AutobootConfig(partition, partition))
        finished = state.armed == slot
        committed = TrialState(
            good=state.good | {slot},
            last_result=TrialResult.COMMITTED if finished else state.last_result,
        )
        self._save_if_changed(state, committed)
        log.info("%s: slot %s committed (partition %d)", NAME, slot, partition)

    def mark_bad(self, slot: str) -> None:
        """Never start ``slot`` again until a new :meth:`try_once`.

        A bad primary hands ``[all]`` to the other root slot if it is good, else to safe mode.

        Raises:
            UnknownSlotError: ``slot`` is not a root slot.
            BootloaderError: a write fails.
        """
        check_root_slot(WHO, slot)
        result = TrialResult.REJECTED
        if self._state().armed == slot:
            # Given up after a fall-back: keep what the fall-back says about the trial.
            result = self.last_trial_result()
            if result not in (TrialResult.NEVER_STARTED, TrialResult.STARTED_AND_DIED):
                result = TrialResult.REJECTED
        self._give_up(slot, result)

    def reboot_command(self) -> list[str]:
        """``reboot "0 tryboot"`` when a trial was armed in this boot, else a plain reboot."""
        state = self._state()
        if state.armed is not None and state.armed_boot == self._boot_id():
            return list(self.config.reboot_command)
        return list(self.config.plain_reboot_command)

    # --- repair and the state files (Repairable, StateFiles) ----------------------------------

    def repair(self, primary: str | None, fallback: str | None = None) -> None:
        """Replace ``autoboot.txt`` and the trial state, damaged or not, by fresh ones: every
        boot starts ``primary`` (``None``: the safe-mode slot), no trial armed, ``primary`` and
        ``fallback`` known good (see ``bootloader_hooks.base.Repairable``).

        Raises:
            UnknownSlotError: ``primary`` or ``fallback`` is not a root slot.
            BootloaderError: a write fails.
        """
        for slot in (primary, fallback):
            if slot is not None:
                check_root_slot(WHO, slot)
        partition = self._partition(SAFE_SLOT if primary is None else primary)
        self.autoboot.store(AutobootConfig(partition, partition))
        self._save(TrialState(good=frozenset(s for s in (primary, fallback) if s is not None)))

    def state_files(self) -> tuple[Path, ...]:
        """The trial state, ``autoboot.txt`` and its shadow copy."""
        return (self._state_path, self.autoboot.path, self.autoboot.shadow)

    # --- trial retry (TrialRetry) -------------------------------------------------------------

    def mark_trial_started(self) -> bool:
        """Record that this trial boot reached user space; ``False`` if this is no trial.

        Run it as early as the data partition allows: everything that dies before it counts
        as ``NEVER_STARTED``.
        """
        if not self.is_trial():
            return False
        state = self._state()
        boot_id = self._boot_id()
        if state.started_boot != boot_id:
            self._save(replace(state, started_boot=boot_id))
        return True

    def last_trial_result(self) -> TrialResult:
        """What became of the most recent trial (see the module docstring for each value)."""
        state = self._state()
        config = self.autoboot.load()
        if state.armed is None:
            return state.last_result
        if self._partition(state.armed) == config.boot_partition:
            return TrialResult.COMMITTED
        if state.armed_boot == self._boot_id():
            return TrialResult.PENDING
        if self._dt_u32("tryboot") and self._in_trial(state, self.booted(), config):
            return TrialResult.RUNNING
        return self._fallback_result(state)

    def rearm(self) -> bool:
        """After a fall-back from an armed trial, arm it again if attempts remain.

        Call it in the boot check of a non-trial boot, after reporting
        :meth:`last_trial_result`; then reboot with :meth:`reboot_command`. When the attempts
        are used up, the slot is marked bad and ``False`` is returned.

        Returns:
            ``True`` if the trial is armed again; ``False`` if there was nothing to re-arm
            (no trial armed, the same boot that armed it, the trial running or committed) or
            the attempts are used up.
        """
        state = self._state()
        result = self.last_trial_result()
        if state.armed is None or result not in (
            TrialResult.NEVER_STARTED,
            TrialResult.STARTED_AND_DIED,
        ):
            return False
        left = state.attempts_left - 1
        if left <= 0:
            log.warning(
                "%s: trial of slot %s used up its attempts (last: %s)",
                NAME,
                state.armed,
                result.value,
            )
            self._give_up(state.armed, result)
            return False
        self._save(
            replace(
                state,
                armed_boot=self._boot_id(),
                attempts_left=left,
                started_boot=None,
                last_result=result,
            )
        )
        config = self.autoboot.load()
        self.autoboot.store(replace(config, tryboot_partition=self._partition(state.armed)))
        log.info(
            "%s: trial of slot %s re-armed after %s, %d attempts left",
            NAME,
            state.armed,
            result.value,
            left,
        )
        return True

    # --- internals ----------------------------------------------------------------------------

    def _give_up(self, slot: str, result: TrialResult) -> None:
        state = self._state()
        config = self.autoboot.load()
        good = state.good - {slot}
        new_config = config
        if config.boot_partition == self._partition(slot):
            other = "b" if slot == "a" else "a"
            fallback = other if other in good else SAFE_SLOT
            new_config = AutobootConfig(self._partition(fallback), self._partition(fallback))
            log.warning("%s: primary slot %s is bad, slot %s boots next", NAME, slot, fallback)
        elif config.tryboot_partition == self._partition(slot):
            new_config = replace(config, tryboot_partition=config.boot_partition)
        if state.armed == slot:
            state = TrialState(last_result=result)
        elif state.armed is not None and new_config.tryboot_partition != config.tryboot_partition:
            state = TrialState(last_result=state.last_result)  # the armed trial is cancelled
        self._save(replace(state, good=good))
        self.autoboot.store(new_config)

    def _in_trial(self, state: TrialState, booted: str, config: AutobootConfig) -> bool:
        return state.armed == booted and config.boot_partition != self._partition(booted)

    def _fallback_result(self, state: TrialState) -> TrialResult:
        started = state.started_boot is not None and state.started_boot != state.armed_boot
        return TrialResult.STARTED_AND_DIED if started else TrialResult.NEVER_STARTED

    def _partition(self, slot: str) -> int:
        return self.config.partitions[slot]

    def _dt_path(self, name: str) -> Path:
        return self.config.device_tree / "chosen" / "bootloader" / name

    def _dt_u32(self, name: str) -> int | None:
        """A big-endian u32 device-tree property, or ``None`` if the firmware did not set it."""
        path = self._dt_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise BootloaderError(f"{WHO}: cannot read {path}: {err.strerror}") from err
        if len(data) != 4:
            raise BootloaderError(f"{WHO}: {path} holds {len(data)} bytes, not a 32-bit integer")
        value: int = struct.unpack(">I", data)[0]
        return value

    def _boot_id(self) -> str:
        path = self.config.boot_id
        try:
            boot_id = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise BootloaderError(f"{WHO}: cannot read {path}: {reason}") from err
        if not boot_id:
            raise BootloaderError(f"{WHO}: {path} is empty")
        return boot_id

    def _state(self) -> TrialState:
        """The persisted state; a missing or damaged file gives the conservative default.

        The default knows only the primary as good and no armed trial: nothing is tried and
        nothing unproven becomes primary. A damaged file is logged, since it loses the
        counter and the marker.
        """
        try:
            data = self._state_path.read_bytes()
        except FileNotFoundError:
            return self._default_state()
        except OSError as err:
            raise BootloaderError(f"{WHO}: cannot read {self._state_path}: {err.strerror}") from err
        try:
            return TrialState.from_dict(json.loads(data))
        except (ValueError, TypeError, KeyError, RecursionError) as err:
            log.warning(
                "%s: %s is damaged (%s); starting from the primary only",
                NAME,
                self._state_path,
                err,
            )
            return self._default_state()

    def _default_state(self) -> TrialState:
        slot = self._slot_of[self.autoboot.load().boot_partition]
        return TrialState(good=frozenset({slot}) - {SAFE_SLOT})

    def _save_if_changed(self, old: TrialState, new: TrialState) -> None:
        if new != old:
            self._save(new)

    def _save(self, state: TrialState) -> None:
        try:
            self.config.state_dir.mkdir(parents=True, exist_ok=True)
            durable.atomic_write(self._state_path, state.to_bytes())
        except OSError as err:
            raise BootloaderError(
                f"{WHO}: cannot write {self._state_path}: {err.strerror}"
            ) from err


# --- options ------------------------------------------------------------------------------

_PATH_OPTIONS = ("autoboot_txt", "device_tree", "state_dir", "boot_id")
_COMMAND_OPTIONS = ("reboot_command", "plain_reboot_command")
# ``backend`` (if given, ``tryboot``) is the [bootloader] table's own key, documented there
OPTIONS = (
    *declare(
        NAME,
        (
            Setting(
                "autoboot_txt", "path", f'"{TrybootConfig.autoboot_txt}"',
                "The firmware's `autoboot.txt` (alone on partition 1, mounted), which names the "
                "boot partition of every normal boot and of a trial (`[tryboot]`).",
                '"/boot/autoboot/autoboot.txt"',
            ),
            Setting(
                "device_tree", "path", f'"{TrybootConfig.device_tree}"',
                "The device tree the firmware passes, which tells which partition booted and "
                "whether the boot was a trial.",
                '"/proc/device-tree"',
            ),
            Setting(
                "state_dir", "path", f'"{TrybootConfig.state_dir}"',
                "Where the backend keeps the shadow copy of `autoboot.txt` and the trial state "
                "(on the data partition).",
                '"/var/lib/fleet/boot"',
            ),
            Setting(
                "boot_id", "path", f'"{TrybootConfig.boot_id}"',
                "The kernel's boot id, which tells one boot from the next.",
                '"/proc/sys/kernel/random/boot_id"',
            ),
            Setting(
                "reboot_command", "non-empty array of strings", '["reboot", "0 tryboot"]',
                "The reboot into an armed trial: it must pass `tryboot` to the firmware.",
                '["systemctl", "reboot", "0 tryboot"]',
            ),
            Setting(
                "plain_reboot_command", "non-empty array of strings", '["reboot"]',
                "A reboot that is not a trial.",
                '["systemctl", "reboot"]',
            ),
            Setting(
                "partitions",
                f"table of the slots {', '.join(ALL_SLOTS)} to partition numbers "
                f"{MIN_PARTITION}-{MAX_PARTITION}",
                "{ a = 2, b = 3, safe = 4 }",
                "Each slot's boot partition, as `autoboot.txt` names it (`boot_partition`).",
                "{ a = 5, b = 6, safe = 7 }",
            ),
            Setting(
                "attempts", "integer, 1 or more", str(DEFAULT_ATTEMPTS),
                "Trial boots of an armed slot, counting the first, before it is given up.",
                "2",
            ),
        ),
    ),
    "backend",
)  # fmt: skip


def parse_options(options: Mapping[str, Any]) -> TrybootConfig:
    """Validate the ``[bootloader]`` options of the ``tryboot`` backend; its configuration.

    Keys: the paths ``autoboot_txt``, ``device_tree``, ``state_dir`` and ``boot_id``; the
    commands ``reboot_command`` (must pass ``tryboot``) and ``plain_reboot_command``;
    ``partitions`` (each slot's boot partition); ``attempts`` (>= 1); ``backend`` (if given,
    ``tryboot``). Defaults are :class:`TrybootConfig`'s. Reads nothing.

    Raises:
        BootloaderError: naming the offending key.
    """
    check_known(WHO, options, OPTIONS)
    if options.get("backend", NAME) != NAME:
        raise BootloaderError(f"{WHO}: option 'backend' is {options['backend']!r}")
    values: dict[str, Any] = {}
    for key in _PATH_OPTIONS:
        if key in options:
            values[key] = path_option(WHO, key, options[key])
    for key in _COMMAND_OPTIONS:
        if key in options:
            values[key] = command_option(WHO, key, options[key])
    if "partitions" in options:
        values["partitions"] = _partitions_option(options["partitions"])
    if "attempts" in options:
        values["attempts"] = check_attempts(WHO, options["attempts"], None)
    trial_command = values.get("reboot_command", TrybootConfig.reboot_command)
    if "tryboot" not in " ".join(trial_command).split():
        raise BootloaderError(
            f"{WHO}: option 'reboot_command' must pass 'tryboot' to the firmware "
            f'(like reboot "0 tryboot"), got {list(trial_command)!r}'
        )
    return TrybootConfig(**values)


def check_options(options: Mapping[str, Any]) -> None:
    """The options' check as a configuration loads: :func:`parse_options`."""
    parse_options(options)


def _partitions_option(value: Any) -> dict[str, int]:
    expected = ", ".join(ALL_SLOTS)
    if not isinstance(value, Mapping) or set(value) != set(ALL_SLOTS):
        raise BootloaderError(
            f"{WHO}: option 'partitions' must map exactly the slots {expected} "
            f"to partition numbers, got {value!r}"
        )
    for slot, partition in value.items():
        if type(partition) is not int or not MIN_PARTITION <= partition <= MAX_PARTITION:
            raise BootloaderError(
                f"{WHO}: option 'partitions': slot {slot} must be a partition number "
                f"{MIN_PARTITION}-{MAX_PARTITION}, got {partition!r}"
            )
    if len(set(value.values())) != len(ALL_SLOTS):
        raise BootloaderError(f"{WHO}: option 'partitions' gives two slots one partition")
    return dict(value)


# --- provisioning -------------------------------------------------------------------------


def provision(
    autoboot_dir: Path,
    *,
    primary: str | None = "a",
    attempts: int = DEFAULT_ATTEMPTS,
    partitions: Mapping[str, int] | None = None,
    state_dir: Path | None = None,
) -> dict[str, Path]:
    """The fresh boot files on the ``autoboot`` partition mounted at ``autoboot_dir`` (see
    :func:`bootloader_hooks.base.provision`): ``autoboot.txt`` as :meth:`TrybootBackend.repair`
    writes it, every boot starting ``primary``.

    ``repair`` also writes the shadow copy and the trial state into ``state_dir`` (on the data
    partition); without one they go to a scratch directory and are dropped: a backend that finds
    neither starts from ``autoboot.txt`` alone, with its primary good, which is the same state.

    Raises:
        UnknownSlotError: ``primary`` is not a root slot.
        BootloaderError: a file cannot be written, or ``partitions`` are invalid.
    """
    autoboot_txt = autoboot_dir / AUTOBOOT_FILE
    try:
        autoboot_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BootloaderError(f"{WHO}: cannot create {autoboot_dir}: {err.strerror}") from err
    values: dict[str, Any] = {"autoboot_txt": autoboot_txt, "attempts": attempts}
    if partitions is not None:
        values["partitions"] = _partitions_option(partitions)
    with tempfile.TemporaryDirectory(prefix="fleet-tryboot-") as scratch:
        values["state_dir"] = Path(scratch) if state_dir is None else state_dir
        TrybootBackend(TrybootConfig(**values)).repair(primary)
    return {AUTOBOOT_FILE: autoboot_txt}


register(NAME, check_options, provision)(TrybootBackend.from_options)
