"""The tryboot backend driven against the EEPROM bootloader model, boot after boot."""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootloader_hooks.base import (
    BACKENDS,
    BootCause,
    BootEvent,
    BootOutcome,
    create_backend,
    provision,
)
from bootloader_hooks.errors import BootloaderError, BootStateCorruptError, UnknownSlotError
from bootloader_hooks.tryboot import (
    STATE_FILE,
    TrialResult,
    TrybootBackend,
    TrybootConfig,
)
from bootloader_hooks.tryboot_model import (
    BOOT_ID,
    NoBootablePartitionError,
    TrybootFirmware,
    parse_reboot_argument,
)
from fleet_core import durable

TRYBOOT = ("reboot", "0 tryboot")


class Device:
    """A Pi: the firmware model boots, its view of the boot lands under ``root``, the backend
    reads it from there."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        attempts: int = 3,
        partition_walk: bool = True,
        primary: int = 2,
    ) -> None:
        self.root = tmp_path / "root"
        self.autoboot_txt = tmp_path / "p1" / "autoboot.txt"
        slot = {p: s for s, p in TrybootConfig().partitions.items()}[primary]
        provision("tryboot", self.autoboot_txt.parent, primary=slot)
        self.firmware = TrybootFirmware(self.autoboot_txt, partition_walk=partition_walk)
        self.config = TrybootConfig(
            autoboot_txt=self.autoboot_txt,
            device_tree=self.root / "proc" / "device-tree",
            state_dir=tmp_path / "data" / "boot",
            boot_id=self.root / BOOT_ID,
            attempts=attempts,
        )
        self.backend = TrybootBackend(self.config)
        self.boots: list[BootOutcome] = []
        self.power_on()

    def boot(self, cause: BootCause, command: Sequence[str] = ()) -> BootOutcome:
        outcome = self.firmware.boot(BootEvent(cause, tuple(command)))
        for relative, data in outcome.linux_view.items():
            path = self.root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.boots.append(outcome)
        return outcome

    def reboot(self) -> BootOutcome:
        return self.boot(BootCause.REBOOT, self.backend.reboot_command())

    def power_on(self) -> BootOutcome:
        return self.boot(BootCause.POWER_ON)

    def reset(self) -> BootOutcome:
        return self.boot(BootCause.RESET)

    def install(self, slot: str) -> None:
        """What the updater does: mark the target bad, write it, arm one trial."""
        self.backend.mark_bad(slot)
        self.backend.try_once(slot)

    def trial_boot(self) -> BootOutcome:
        outcome = self.reboot()
        assert outcome.trial
        assert self.backend.is_trial()
        assert self.backend.mark_trial_started()
        return outcome

    def commit_b(self) -> None:
        self.install("b")
        self.trial_boot()
        self.backend.commit("b")


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path)


# --- options and registry -------------------------------------------------------------------


def test_registered_with_production_defaults() -> None:
    backend = create_backend("tryboot", {})
    assert isinstance(backend, TrybootBackend)
    assert BACKENDS["tryboot"] == TrybootBackend.from_options
    config = backend.config
    assert config.autoboot_txt == Path("/boot/autoboot/autoboot.txt")
    assert config.device_tree == Path("/proc/device-tree")
    assert config.state_dir == Path("/var/lib/fleet/boot")
    assert dict(config.partitions) == {"a": 2, "b": 3, "safe": 4}
    assert config.reboot_command == ("reboot", "0 tryboot")
    assert config.attempts == 3


def test_options_are_taken(tmp_path: Path) -> None:
    backend = TrybootBackend.from_options(
        {
            "backend": "tryboot",
            "autoboot_txt": str(tmp_path / "autoboot.txt"),
            "device_tree": str(tmp_path / "dt"),
            "state_dir": str(tmp_path / "state"),
            "boot_id": str(tmp_path / "boot_id"),
            "partitions": {"a": 5, "b": 6, "safe": 7},
            "reboot_command": ["systemctl", "reboot", "0 tryboot"],
            "plain_reboot_command": ["systemctl", "reboot"],
            "attempts": 1,
        }
    )
    assert backend.config.state_dir == tmp_path / "state"
    assert backend.config.partitions == {"a": 5, "b": 6, "safe": 7}
    assert backend.config.attempts == 1


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"grubenv": "/x"}, "unknown option 'grubenv'"),
        ({"backend": "grub"}, "option 'backend'"),
        ({"autoboot_txt": 3}, "option 'autoboot_txt' must be a path"),
        ({"state_dir": ""}, "option 'state_dir' must be a path"),
        ({"attempts": 0}, "option 'attempts' must be an integer >= 1"),
        ({"attempts": True}, "option 'attempts'"),
        ({"attempts": "3"}, "option 'attempts'"),
        ({"reboot_command": "reboot"}, "option 'reboot_command' must be a non-empty list"),
        ({"reboot_command": ["reboot"]}, "must pass 'tryboot'"),
        ({"plain_reboot_command": []}, "option 'plain_reboot_command'"),
        ({"partitions": {"a": 2, "b": 3}}, "option 'partitions' must map exactly"),
        ({"partitions": {"a": 2, "b": 3, "safe": 10}}, "slot safe must be a partition number"),
        ({"partitions": {"a": 2, "b": 2, "safe": 4}}, "two slots one partition"),
        ({"partitions": [2, 3, 4]}, "option 'partitions'"),
    ],
)
def test_bad_options_are_named(options: dict[str, Any], complaint: str) -> None:
    with pytest.raises(BootloaderError, match=complaint) as caught:
        TrybootBackend.from_options(options)
    assert str(caught.value).startswith("tryboot backend: ")


# --- what the firmware tells Linux ----------------------------------------------------------


def test_booted_reads_the_device_tree(device: Device) -> None:
    partition = device.root / "proc/device-tree/chosen/bootloader/partition"
    assert partition.read_bytes() == struct.pack(">I", 2)
    assert device.backend.booted() == "a"
    partition.write_bytes(struct.pack(">I", 4))
    assert device.backend.booted() == "safe"
    partition.write_bytes(struct.pack(">I", 7))
    with pytest.raises(BootloaderError, match="booted partition 7, no slot's boot partition"):
        device.backend.booted()
    partition.write_bytes(b"\x02")
    with pytest.raises(BootloaderError, match="holds 1 bytes, not a 32-bit integer"):
        device.backend.booted()
    partition.unlink()
    with pytest.raises(BootloaderError, match="is missing"):
        device.backend.booted()


def test_a_tryboot_flag_alone_is_no_trial(device: Device) -> None:
    outcome = device.boot(BootCause.REBOOT, TRYBOOT)  # nothing armed: [tryboot] is the primary
    assert (outcome.slot, outcome.trial) == ("a", False)
    assert (device.root / "proc/device-tree/chosen/bootloader/tryboot").read_bytes() == (
        b"\0\0\0\1"
    )
    assert device.backend.is_trial() is False
    assert device.backend.mark_trial_started() is False


def test_slots_and_argument_checks(device: Device) -> None:
    with pytest.raises(UnknownSlotError):
        device.backend.try_once("safe")
    with pytest.raises(UnknownSlotError):
        device.backend.attempts_left("c")
    with pytest.raises(BootloaderError, match="cannot try slot a: it is running now"):
        device.backend.try_once("a")
    with pytest.raises(BootloaderError, match="refusing to commit slot b: the running slot is a"):
        device.backend.commit("b")


# --- scenarios --------------------------------------------------------------------------------


def test_install_trial_healthy_commit(device: Device) -> None:
    backend = device.backend
    assert (backend.booted(), backend.primary(), backend.is_trial()) == ("a", "a", False)
    assert backend.last_trial_result() is TrialResult.NONE
    device.install("b")
    assert backend.reboot_command() == list(TRYBOOT)
    assert backend.last_trial_result() is TrialResult.PENDING
    assert backend.attempts_left("b") == 3
    assert backend.primary() == "a"

    outcome = device.trial_boot()
    assert (outcome.slot, backend.booted()) == ("b", "b")
    assert backend.last_trial_result() is TrialResult.RUNNING
    backend.commit("b")
    assert (backend.primary(), backend.is_trial()) == ("b", False)
    assert backend.last_trial_result() is TrialResult.COMMITTED
    assert backend.reboot_command() == ["reboot"]
    assert backend.attempts_left("a") == backend.attempts_left("b") == 3

    assert device.reboot().slot == "b"
    assert device.power_on().slot == "b"
    assert device.boot(BootCause.REBOOT, TRYBOOT).slot == "b"  # a stray tryboot stays on b
    backend.commit("b")  # every healthy boot confirms; nothing changes
    assert backend.primary() == "b"


def test_unhealthy_trial_is_marked_bad_and_the_old_slot_boots(device: Device) -> None:
    backend = device.backend
    device.install("b")
    device.trial_boot()
    backend.mark_bad("b")
    assert backend.reboot_command() == ["reboot"]
    assert backend.last_trial_result() is TrialResult.REJECTED
    assert device.reboot().slot == "a"
    assert (backend.booted(), backend.primary(), backend.is_trial()) == ("a", "a", False)
    assert backend.attempts_left("b") == 0
    assert backend.rearm() is False
    assert device.boot(BootCause.REBOOT, TRYBOOT).slot == "a"  # b is never chosen again


@pytest.mark.parametrize("cause", [BootCause.RESET, BootCause.POWER_ON])
def test_a_trial_that_dies_falls_back_by_itself(device: Device, cause: BootCause) -> None:
    device.install("b")
    device.trial_boot()
    outcome = device.boot(cause)  # a hang caught by the watchdog, or the power goes
    assert (outcome.slot, outcome.trial) == ("a", False)
    assert device.backend.is_trial() is False
    assert device.backend.primary() == "a"
    assert device.backend.last_trial_result() is TrialResult.STARTED_AND_DIED


def test_power_lost_before_the_trial_reboot_never_started(device: Device) -> None:
    device.install("b")
    assert device.power_on().slot == "a"
    assert device.backend.last_trial_result() is TrialResult.NEVER_STARTED
    assert device.backend.reboot_command() == ["reboot"]  # armed in an earlier boot


def test_a_trial_kernel_dying_before_user_space_counts_as_never_started(device: Device) -> None:
    device.install("b")
    assert device.reboot().trial  # the firmware starts b, whose kernel then panics
    assert device.reset().slot == "a"
    assert device.backend.last_trial_result() is TrialResult.NEVER_STARTED


def test_giving_up_after_a_fall_back_keeps_what_happened(device: Device) -> None:
    device.install("b")
    device.power_on()
    device.backend.mark_bad("b")  # a boot check that does not re-arm
    assert device.backend.last_trial_result() is TrialResult.NEVER_STARTED
    assert device.backend.attempts_left("b") == 0
    assert device.power_on().slot == "a"


def test_the_software_counter_rearms_then_gives_up(tmp_path: Path) -> None:
    device = Device(tmp_path, attempts=3)
    backend = device.backend
    device.install("b")
    trial_boots = 0
    for left in (2, 1):
        device.trial_boot()
        trial_boots += 1
        device.reset()
        assert backend.last_trial_result() is TrialResult.STARTED_AND_DIED
        assert backend.rearm() is True
        assert backend.attempts_left("b") == left
        assert backend.last_trial_result() is TrialResult.PENDING
        assert backend.reboot_command() == list(TRYBOOT)
    device.trial_boot()
    trial_boots += 1
    device.reset()
    assert backend.rearm() is False
    assert trial_boots == 3
    assert backend.attempts_left("b") == 0
    assert backend.last_trial_result() is TrialResult.STARTED_AND_DIED
    assert backend.reboot_command() == ["reboot"]
    assert device.reboot().slot == "a"
    assert device.boot(BootCause.REBOOT, TRYBOOT).slot == "a"
    assert backend.rearm() is False


def test_an_inert_firmware_cannot_cause_a_reboot_loop(tmp_path: Path) -> None:
    """A bootloader without tryboot (or a reboot path that drops the argument)."""
    device = Device(tmp_path, attempts=3)
    backend = device.backend
    device.install("b")
    rearmed = 0
    for _ in range(10):
        assert device.boot(BootCause.REBOOT, ["reboot"]).slot == "a"
        assert backend.last_trial_result() is TrialResult.NEVER_STARTED
        if not backend.rearm():
            break
        rearmed += 1
    assert rearmed == 2
    assert backend.attempts_left("b") == 0
    assert backend.last_trial_result() is TrialResult.NEVER_STARTED


def test_never_started_and_died_are_told_apart_across_attempts(device: Device) -> None:
    backend = device.backend
    device.install("b")
    device.power_on()
    assert backend.last_trial_result() is TrialResult.NEVER_STARTED
    assert backend.rearm()
    device.trial_boot()
    device.power_on()
    assert backend.last_trial_result() is TrialResult.STARTED_AND_DIED
    assert backend.rearm()
    device.trial_boot()
    backend.commit("b")
    assert backend.last_trial_result() is TrialResult.COMMITTED


def test_a_failing_committed_slot_goes_to_the_other_slot_then_safe_mode(device: Device) -> None:
    backend = device.backend
    device.commit_b()
    backend.mark_bad("b")  # b keeps failing its checks in user space
    assert backend.primary() == "a"
    assert device.reboot().slot == "a"
    backend.mark_bad("a")
    assert backend.primary() is None
    outcome = device.reboot()
    assert outcome.slot == "safe"
    assert (backend.booted(), backend.is_trial()) == ("safe", False)
    assert device.power_on().slot == "safe"
    # Safe mode repairs the device: install a, try it, commit it.
    device.install("a")
    device.trial_boot()
    backend.commit("a")
    assert backend.primary() == "a"
    assert device.power_on().slot == "a"


def test_a_fresh_device_with_a_failing_primary_goes_to_safe_mode(device: Device) -> None:
    device.backend.mark_bad("a")  # b never held anything we know of
    assert device.backend.primary() is None
    assert device.reboot().slot == "safe"


def test_a_failed_install_leaves_the_other_slot_not_good(device: Device) -> None:
    backend = device.backend
    device.commit_b()
    device.install("a")  # a is being rewritten
    backend.mark_bad("b")  # and now b fails: a is unproven, so safe mode
    assert backend.primary() is None
    assert device.reboot().slot == "safe"


@pytest.mark.parametrize(("broken", "walked_to"), [(2, "b"), (3, "safe")])
def test_a_committed_slot_whose_boot_files_break_falls_back(
    tmp_path: Path, broken: int, walked_to: str
) -> None:
    device = Device(tmp_path, primary=broken)
    device.firmware.bootable.discard(broken)
    assert device.power_on().slot == walked_to
    assert device.backend.booted() == walked_to
    assert device.backend.is_trial() is False


def test_without_partition_walk_broken_boot_files_stop_the_board(tmp_path: Path) -> None:
    device = Device(tmp_path, partition_walk=False)
    device.firmware.bootable.discard(2)
    with pytest.raises(NoBootablePartitionError):
        device.power_on()


def test_a_trial_whose_boot_files_do_not_load_never_started(device: Device) -> None:
    device.install("b")
    device.firmware.bootable.discard(3)
    outcome = device.reboot()  # the walk goes on to partition 4
    assert (outcome.slot, outcome.trial, device.backend.is_trial()) == ("safe", False, False)
    assert device.backend.last_trial_result() is TrialResult.NEVER_STARTED


def test_the_primary_failing_during_an_armed_trial_cancels_it(device: Device) -> None:
    backend = device.backend
    device.commit_b()
    device.install("a")
    backend.mark_bad("b")
    assert backend.attempts_left("a") == 0
    assert backend.rearm() is False
    assert backend.reboot_command() == ["reboot"]


def test_confirming_the_primary_keeps_an_armed_trial(device: Device) -> None:
    backend = device.backend
    device.install("b")
    device.power_on()
    backend.commit("a")  # the boot check confirms the healthy primary first
    assert backend.last_trial_result() is TrialResult.NEVER_STARTED
    assert backend.rearm() is True
    assert device.trial_boot().slot == "b"


def test_a_damaged_state_file_starts_from_the_primary_only(
    device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    device.commit_b()
    (device.config.state_dir / STATE_FILE).write_bytes(b"{not json")
    with caplog.at_level(logging.WARNING):
        assert device.backend.attempts_left("a") == 0
    assert "is damaged" in caplog.text
    assert device.backend.attempts_left("b") == 3
    device.backend.mark_bad("b")
    assert device.backend.primary() is None  # a unproven after the loss: safe mode


def test_a_corrupt_autoboot_txt_without_shadow_is_reported(device: Device) -> None:
    device.autoboot_txt.write_bytes(b"[all]\nboot_partition=2\n")
    with pytest.raises(BootStateCorruptError, match="autoboot.txt has 23 bytes"):
        device.backend.primary()


def test_a_missing_boot_id_is_an_error(device: Device) -> None:
    (device.root / BOOT_ID).unlink()
    with pytest.raises(BootloaderError, match="cannot read .*boot_id"):
        device.backend.try_once("b")


# --- the firmware model on its own ------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["reboot"], (0, False)),
        (["reboot", "0 tryboot"], (0, True)),
        (["systemctl", "reboot", "0 tryboot"], (0, True)),
        (["reboot", "3"], (3, False)),
        (["reboot", "tryboot"], (0, False)),  # the partition number must come first
        ([], (0, False)),
    ],
)
def test_reboot_arguments(command: list[str], expected: tuple[int, bool]) -> None:
    assert parse_reboot_argument(command) == expected


def test_the_model_reads_autoboot_txt_like_config_txt(tmp_path: Path) -> None:
    autoboot = tmp_path / "autoboot.txt"
    firmware = TrybootFirmware(autoboot)
    assert firmware.boot(BootEvent(BootCause.POWER_ON)).slot == "a"  # no file: first bootable
    autoboot.write_text("[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n")
    assert firmware.boot(BootEvent(BootCause.POWER_ON)).slot == "b"
    tried = firmware.boot(BootEvent(BootCause.REBOOT, TRYBOOT))
    assert (tried.slot, tried.trial) == ("a", True)
    assert firmware.boot(BootEvent(BootCause.REBOOT, ("reboot", "4"))).slot == "safe"
    autoboot.write_text("[none]\nboot_partition=3\n[pi4]\nboot_partition=4\n")
    assert firmware.boot(BootEvent(BootCause.POWER_ON)).slot == "a"
    autoboot.write_text("[all]\nboot_partition=3\n[tryboot]\nboot_partition=2\n")
    tried = firmware.boot(BootEvent(BootCause.REBOOT, TRYBOOT))  # no tryboot_a_b: no tryboot.txt
    assert tried.slot == "b"


def test_the_eeprom_partition_applies_without_boot_partition(tmp_path: Path) -> None:
    firmware = TrybootFirmware(tmp_path / "autoboot.txt", eeprom_partition=4)
    assert firmware.boot(BootEvent(BootCause.POWER_ON)).slot == "safe"
    firmware.bootable.clear()
    with pytest.raises(NoBootablePartitionError):
        firmware.boot(BootEvent(BootCause.POWER_ON))


# --- power cuts at every durable write ------------------------------------------------------


class PowerCut(Exception):
    pass


@contextmanager
def cut_at(monkeypatch: pytest.MonkeyPatch, write: int, how: str) -> Iterator[None]:
    """Cut the power at the ``write``-th durable write: before it, after it, or tearing it."""
    real_atomic, real_in_place = durable.atomic_write, durable.rewrite_in_place
    count = 0

    def hit() -> bool:
        nonlocal count
        count += 1
        return count == write

    def atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
        if hit():
            if how == "after":
                real_atomic(path, data, mode)
            raise PowerCut
        real_atomic(path, data, mode)

    def in_place(path: Path, data: bytes) -> None:
        if hit():
            if how == "after":
                real_in_place(path, data)
            elif how.startswith("torn"):
                cut = int(how.removeprefix("torn"))
                old = Path(path).read_bytes()
                Path(path).write_bytes(data[:cut] + old[cut:])
            raise PowerCut
        real_in_place(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(durable, "atomic_write", atomic)
        patch.setattr(durable, "rewrite_in_place", in_place)
        yield


def _armed(device: Device) -> None:
    device.install("b")


def _in_trial(device: Device) -> None:
    device.install("b")
    device.trial_boot()


def _fell_back(device: Device) -> None:
    device.install("b")
    device.trial_boot()
    device.reset()


def _committed_b(device: Device) -> None:
    device.commit_b()


def _trial_before_the_marker(device: Device) -> None:
    device.install("b")
    device.reboot()


CRASH_TABLE: list[tuple[str, Callable[[Device], None], Callable[[TrybootBackend], Any], set[str]]]
CRASH_TABLE = [
    ("try_once", lambda d: None, lambda b: b.try_once("b"), {"a"}),
    ("commit", _in_trial, lambda b: b.commit("b"), {"a", "b"}),
    ("mark_bad trial", _in_trial, lambda b: b.mark_bad("b"), {"a"}),
    ("mark_bad primary", _committed_b, lambda b: b.mark_bad("b"), {"a", "b"}),
    ("mark_bad last slot", lambda d: None, lambda b: b.mark_bad("a"), {"a", "safe"}),
    ("rearm", _fell_back, lambda b: b.rearm(), {"a"}),
    ("mark_trial_started", _trial_before_the_marker, lambda b: b.mark_trial_started(), {"a"}),
    ("try_once again", _armed, lambda b: b.try_once("b"), {"a"}),
]


@pytest.mark.parametrize("how", ["before", "after", "torn100", "torn125", "torn150"])
@pytest.mark.parametrize(
    ("setup", "action", "allowed"),
    [row[1:] for row in CRASH_TABLE],
    ids=[row[0] for row in CRASH_TABLE],
)
def test_a_power_cut_at_any_write_leaves_a_bootable_consistent_device(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    setup: Callable[[Device], None],
    action: Callable[[TrybootBackend], Any],
    allowed: set[str],
    how: str,
) -> None:
    for write in range(1, 10):
        device = Device(tmp_path / f"{write}")
        setup(device)
        with cut_at(monkeypatch, write, how):
            try:
                action(device.backend)
            except PowerCut:
                pass
            else:
                assert write > 1, "the action wrote nothing durable"
                return  # it finished before this write: every cut point was tried
        outcome = device.power_on()
        assert outcome.slot in allowed
        _assert_consistent(device)
    raise AssertionError("the action kept writing")


def _assert_consistent(device: Device) -> None:
    backend = device.backend
    booted = backend.booted()
    try:
        primary = backend.primary()
    except BootStateCorruptError:
        # a torn autoboot.txt: reads never write; the boot check rebuilds it from what the
        # updater knows (here, that the running slot booted)
        backend.repair(None if booted == "safe" else booted)
        primary = backend.primary()
    assert primary in ("a", "b", None)
    assert backend.is_trial() is False  # a power-on never carries the tryboot flag
    backend.last_trial_result()
    for slot in ("a", "b"):
        assert 0 <= backend.attempts_left(slot) <= 3
    backend.rearm()
    assert backend.reboot_command() in (["reboot"], list(TRYBOOT))
    if booted == primary:
        backend.commit(booted)
    assert device.reboot().slot in ("a", "b", "safe")


# --- damaged state never crashes with anything but BootloaderError -------------------------


@settings(max_examples=60, deadline=None)
@given(state=st.binary(max_size=200), autoboot=st.one_of(st.none(), st.binary(max_size=300)))
def test_damaged_state_only_ever_raises_bootloader_errors(
    tmp_path_factory: pytest.TempPathFactory, state: bytes, autoboot: bytes | None
) -> None:
    device = Device(tmp_path_factory.mktemp("device"))
    device.install("b")
    (device.config.state_dir / STATE_FILE).write_bytes(state)
    if autoboot is not None:
        device.autoboot_txt.write_bytes(autoboot)
        (device.config.state_dir / "autoboot.txt.shadow").unlink()
    questions: Iterable[Callable[[], Any]] = (
        device.backend.booted,
        device.backend.primary,
        device.backend.is_trial,
        device.backend.last_trial_result,
        device.backend.reboot_command,
        lambda: device.backend.attempts_left("b"),
        device.backend.rearm,
        lambda: device.backend.commit("a"),
    )
    for question in questions:
        with suppress(BootloaderError):
            question()
