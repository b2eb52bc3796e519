"""The uboot backend and the U-Boot firmware model, alone and driven together."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootloader_hooks import base, uboot, uboot_script, ubootenv
from bootloader_hooks.base import BootCause, BootEvent, BootOutcome
from bootloader_hooks.errors import (
    BootloaderError,
    BootStateCorruptError,
    BootStateMissingError,
    UnknownSlotError,
)
from bootloader_hooks.uboot import UBootBackend
from bootloader_hooks.uboot_model import OUR_ALTBOOTCMD, UBootModel
from bootloader_hooks.ubootenv import EnvLayout
from fleet_core import durable

SIZE = 0x1000
ATTEMPTS = 3
RESET = BootEvent(BootCause.RESET)
POWER_ON = BootEvent(BootCause.POWER_ON)
REBOOT = BootEvent(BootCause.REBOOT, ("reboot",))


def make_layout(tmp_path: Path, kind: str) -> EnvLayout:
    if kind == "file":
        return EnvLayout.single(tmp_path / "uboot.env", SIZE)
    image = tmp_path / "disk.img"
    image.write_bytes(b"\xa5" * (3 * SIZE))
    if kind == "offset":
        return EnvLayout.single(image, SIZE, SIZE)
    return EnvLayout.redundant_pair(image, SIZE, SIZE, 2 * SIZE)


class Device:
    """The firmware model and the backend on the same environment, Linux's view under root."""

    def __init__(self, tmp_path: Path, kind: str = "redundant") -> None:
        self.root = tmp_path / "root"
        self.layout = make_layout(tmp_path, kind)
        self.model = UBootModel(self.layout, attempts=ATTEMPTS)
        self.backend = UBootBackend(
            self.layout, cmdline=self.root / "proc" / "cmdline", attempts=ATTEMPTS
        )

    def boot(self, event: BootEvent = REBOOT) -> BootOutcome:
        outcome = self.model.boot(event)
        for relative, data in outcome.linux_view.items():
            path = self.root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        assert self.backend.booted() == outcome.slot
        assert self.backend.is_trial() == outcome.trial
        return outcome

    def healthy(self) -> BootOutcome:
        """Boot and run the boot check as the updater does: commit the booted root slot."""
        outcome = self.boot()
        if outcome.slot != base.SAFE_SLOT:
            self.backend.commit(outcome.slot)
        return outcome

    def env(self) -> Mapping[str, str]:
        return ubootenv.read_env(self.layout).variables


@pytest.fixture(params=["redundant", "offset", "file"])
def device(tmp_path: Path, request: pytest.FixtureRequest) -> Device:
    return Device(tmp_path, request.param)


@pytest.fixture
def installed(device: Device) -> Device:
    """A device whose first boot ran: slot a committed."""
    outcome = device.healthy()
    assert (outcome.slot, outcome.trial) == ("a", False)
    return device


# --- backend + model scenarios -------------------------------------------------------------------


def test_first_boot_starts_afresh_from_the_default_environment(device: Device) -> None:
    outcome = device.boot(POWER_ON)
    assert outcome == BootOutcome(
        "a", False, {"proc/cmdline": b"rootwait root=PARTLABEL=root_a fleet.slot=a\n"}
    )
    assert device.backend.primary() == "a"
    assert device.backend.attempts_left("a") == ATTEMPTS - 1


def test_trial_then_commit(installed: Device) -> None:
    installed.backend.try_once("b")
    assert installed.backend.primary() == "a"
    outcome = installed.boot()
    assert (outcome.slot, outcome.trial) == ("b", True)
    assert b"root=PARTLABEL=root_b fleet.slot=b" in outcome.linux_view["proc/cmdline"]
    installed.backend.commit("b")
    assert installed.backend.primary() == "b"
    assert not installed.backend.is_trial()
    for _ in range(5):
        outcome = installed.healthy()
        assert (outcome.slot, outcome.trial) == ("b", False)


def test_unhealthy_trial_is_marked_bad_and_the_old_slot_boots(installed: Device) -> None:
    installed.backend.try_once("b")
    assert installed.boot().trial
    installed.backend.mark_bad("b")
    assert installed.backend.attempts_left("b") == 0
    assert installed.backend.primary() == "a"
    for _ in range(4):
        outcome = installed.healthy()
        assert (outcome.slot, outcome.trial) == ("a", False)
    assert installed.backend.attempts_left("b") == 0


@pytest.mark.parametrize("event", [RESET, POWER_ON], ids=["hang", "power-on"])
def test_a_trial_that_never_commits_falls_back_by_itself(
    installed: Device, event: BootEvent
) -> None:
    installed.backend.try_once("b")
    slots = [installed.boot(event) for _ in range(ATTEMPTS + 2)]
    assert [(o.slot, o.trial) for o in slots] == [("b", True)] * ATTEMPTS + [("a", False)] * 2
    assert installed.backend.primary() == "a"
    assert installed.backend.attempts_left("b") == 0
    assert installed.env()["upgrade_available"] == "0"


def test_u_boot_bootcount_alone_also_ends_a_trial(installed: Device) -> None:
    """Even if the counters went out of step, bootcount > bootlimit ends the trial."""
    installed.backend.try_once("b")
    ubootenv.update_env(installed.layout, {"BOOT_B_LEFT": "9"})
    outcomes = [installed.boot(RESET).slot for _ in range(ATTEMPTS + 1)]
    assert outcomes == ["b"] * ATTEMPTS + ["a"]
    env = installed.env()
    assert (env["BOOT_B_LEFT"], env["upgrade_available"], env["bootcount"]) == ("0", "0", "0")


def test_both_root_slots_bad_boots_safe_mode(installed: Device) -> None:
    installed.backend.mark_bad("b")
    installed.backend.mark_bad("a")
    assert installed.backend.primary() is None
    outcome = installed.boot()
    assert (outcome.slot, outcome.trial) == ("safe", False)
    assert b"root=PARTLABEL=root_safe fleet.slot=safe" in outcome.linux_view["proc/cmdline"]
    assert installed.backend.booted() == "safe"
    # Safe mode repairs the device by installing a slot and trying it.
    installed.backend.try_once("a")
    outcome = installed.boot()
    assert (outcome.slot, outcome.trial) == ("a", True)
    installed.backend.commit("a")
    assert installed.healthy().slot == "a"


def test_both_root_slots_hanging_ends_in_safe_mode(installed: Device) -> None:
    installed.backend.try_once("b")
    slots = [installed.boot(RESET).slot for _ in range(2 * ATTEMPTS + 1)]
    assert slots == ["b"] * ATTEMPTS + ["a"] * ATTEMPTS + ["safe"]


def test_a_committed_slot_that_stops_booting_falls_back(installed: Device) -> None:
    installed.backend.try_once("b")
    installed.boot()
    installed.backend.commit("b")
    installed.healthy()
    slots = [installed.boot(RESET) for _ in range(ATTEMPTS + 1)]
    assert [(o.slot, o.trial) for o in slots] == [("b", False)] * ATTEMPTS + [("a", False)]
    installed.backend.commit("a")
    assert installed.backend.primary() == "a"
    assert installed.healthy().slot == "a"


def test_a_corrupted_environment_boots_and_linux_needs_an_explicit_repair(
    installed: Device,
) -> None:
    for copy in installed.layout.copies:
        durable.write_at(copy.path, copy.offset, b"\0" * 16)
    for action in (
        installed.backend.primary,
        installed.backend.is_trial,
        lambda: installed.backend.commit("a"),
    ):
        with pytest.raises(BootStateCorruptError):
            action()
    # U-Boot uses its default environment and the script starts afresh.
    assert installed.boot().slot == "a"
    assert installed.backend.primary() == "a"


@pytest.mark.parametrize("cut", [0, 4, 5, 40, SIZE // 2, SIZE - 1])
def test_a_power_cut_during_try_once_leaves_a_bootable_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int
) -> None:
    device = Device(tmp_path, "redundant")
    device.healthy()
    real_at = durable.write_at

    def torn(path: Any, offset: int, data: bytes) -> None:
        real_at(path, offset, data[:cut])
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable, "write_at", torn)
    with pytest.raises(BootloaderError):
        device.backend.try_once("b")
    monkeypatch.undo()
    # A copy torn after its last meaningful byte is complete: then the trial was armed.
    armed = device.env().get("FLEET_TRIAL") == "B"
    outcome = device.boot(POWER_ON)
    assert (outcome.slot, outcome.trial) == (("b", True) if armed else ("a", False))
    assert armed == (cut >= 200)  # our variables take about 250 bytes


# --- backend semantics ---------------------------------------------------------------------------


def test_try_once_commit_mark_bad_write_the_scheme(installed: Device) -> None:
    backend = installed.backend
    backend.try_once("b")
    env = installed.env()
    assert {k: env[k] for k in ("BOOT_ORDER", "BOOT_B_LEFT", "FLEET_TRIAL")} == {
        "BOOT_ORDER": "B A",
        "BOOT_B_LEFT": "3",
        "FLEET_TRIAL": "B",
    }
    assert (env["upgrade_available"], env["bootcount"], env["bootlimit"]) == ("1", "0", "3")
    assert env["altbootcmd"] == OUR_ALTBOOTCMD == uboot.ALTBOOTCMD
    assert env["FLEET_ENV"] == "1"
    backend.commit("b")
    env = installed.env()
    assert "FLEET_TRIAL" not in env
    assert (env["BOOT_ORDER"], env["upgrade_available"], env["bootcount"]) == ("B A", "0", "0")
    backend.mark_bad("a")
    env = installed.env()
    assert (env["BOOT_ORDER"], env["BOOT_A_LEFT"]) == ("B", "0")
    backend.mark_bad("b")
    assert "BOOT_ORDER" not in installed.env()
    assert backend.primary() is None


def test_marking_the_trial_slot_bad_ends_the_trial(installed: Device) -> None:
    installed.backend.try_once("b")
    installed.backend.mark_bad("b")
    env = installed.env()
    assert "FLEET_TRIAL" not in env and env["upgrade_available"] == "0"


def test_writes_during_a_trial_keep_bootcount_in_lockstep(installed: Device) -> None:
    installed.backend.try_once("b")
    installed.boot(RESET)  # attempt 1 of 3 used
    installed.backend.mark_bad("a")  # some other write during the trial
    env = installed.env()
    assert (env["BOOT_B_LEFT"], env["bootcount"], env["bootlimit"]) == ("2", "1", "3")


def test_other_variables_are_kept(installed: Device) -> None:
    ubootenv.update_env(installed.layout, {"bootcmd": "run distro_bootcmd", "ethaddr": "x"})
    installed.backend.try_once("b")
    installed.backend.commit("b")
    env = installed.env()
    assert (env["bootcmd"], env["ethaddr"]) == ("run distro_bootcmd", "x")


def test_an_environment_without_our_state_is_neither_read_nor_changed(tmp_path: Path) -> None:
    # U-Boot's script would start afresh with both slots, one of them perhaps given up: the
    # updater waits for a repair that knows which slots are good
    layout = make_layout(tmp_path, "file")
    ubootenv.write_env(layout, {"bootcmd": "boot"}, None)
    before = ubootenv.read_env(layout).variables
    backend = UBootBackend(layout, cmdline=tmp_path / "cmdline")
    for action in (
        backend.primary,
        lambda: backend.attempts_left("b"),
        lambda: backend.try_once("b"),
        lambda: backend.commit("a"),
        lambda: backend.mark_bad("b"),
    ):
        with pytest.raises(BootStateMissingError, match="holds no state of ours"):
            action()
    assert ubootenv.read_env(layout).variables == before
    backend.repair("b", "a")
    assert backend.primary() == "b" and backend.attempts_left("a") == ATTEMPTS
    assert ubootenv.read_env(layout).variables["bootcmd"] == "boot"  # the board's, kept
    backend.repair("a")
    assert backend.primary() == "a" and backend.attempts_left("b") == 0
    backend.repair(None)
    assert backend.primary() is None


@pytest.mark.parametrize("slot", ["c", "A", "safe", "", "a "])
def test_unknown_slot_names(installed: Device, slot: str) -> None:
    backend = installed.backend
    before = installed.env()
    for action in (backend.try_once, backend.commit, backend.mark_bad, backend.attempts_left):
        with pytest.raises(UnknownSlotError, match="uboot backend: unknown slot"):
            action(slot)
    assert installed.env() == before


def test_cmdline_without_our_slot(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    backend = UBootBackend(make_layout(tmp_path, "file"), cmdline=cmdline)
    with pytest.raises(BootloaderError, match="cannot read"):
        backend.booted()
    cmdline.write_text("root=/dev/mmcblk0p2 rootwait\n")
    with pytest.raises(BootloaderError, match="no fleet.slot="):
        backend.booted()
    cmdline.write_text("fleet.slot=c\n")
    with pytest.raises(BootloaderError, match="unknown slot 'c'"):
        backend.booted()


def test_reboot_command(tmp_path: Path) -> None:
    backend = UBootBackend(make_layout(tmp_path, "file"))
    assert backend.reboot_command() == ["reboot"]
    assert backend.name == "uboot"


def test_repair_after_corruption_commits_the_booted_slot(installed: Device, tmp_path: Path) -> None:
    installed.backend.try_once("b")
    installed.boot()
    for copy in installed.layout.copies:
        durable.write_at(copy.path, copy.offset, b"\x01\x02")
    with pytest.raises(BootStateCorruptError):
        installed.backend.commit("b")
    installed.backend.initial_env = tmp_path / "u-boot-initial-env"
    before = [copy.path.read_bytes() for copy in installed.layout.copies]
    with pytest.raises(BootloaderError, match="cannot read .*u-boot-initial-env"):
        installed.backend.repair()  # ours alone would make U-Boot lose its bootcmd
    assert [copy.path.read_bytes() for copy in installed.layout.copies] == before
    installed.backend.initial_env.write_text(
        "# board defaults\nbootcmd=run distro_bootcmd\nbootdelay=2\nempty=\n\nnot a variable\n"
    )
    installed.backend.repair()
    env = installed.env()
    assert (env["BOOT_ORDER"], env["BOOT_A_LEFT"], env["BOOT_B_LEFT"]) == ("B A", "0", "3")
    assert (env["bootcmd"], env["bootdelay"], "empty" in env) == ("run distro_bootcmd", "2", False)
    assert installed.healthy().slot == "b"


def test_repair_with_an_explicit_primary(installed: Device) -> None:
    installed.backend.repair("b")
    assert (installed.backend.primary(), installed.backend.attempts_left("a")) == ("b", 0)
    with pytest.raises(UnknownSlotError):
        installed.backend.repair("safe")


def test_repair_keeps_a_valid_environment(installed: Device) -> None:
    ubootenv.update_env(installed.layout, {"ethaddr": "x"})
    installed.backend.repair()
    assert installed.env()["ethaddr"] == "x"


def test_repair_in_safe_mode_stays_in_safe_mode(installed: Device) -> None:
    installed.backend.mark_bad("a")
    installed.backend.mark_bad("b")
    installed.boot()
    installed.backend.repair()
    assert installed.backend.primary() is None
    assert installed.boot().slot == "safe"


# --- options -------------------------------------------------------------------------------------


def test_registered_under_its_name() -> None:
    assert base.BACKENDS["uboot"] == UBootBackend.from_options


def test_options_with_a_fw_env_config(tmp_path: Path) -> None:
    config = tmp_path / "fw_env.config"
    config.write_text(f"{tmp_path}/disk.img 0x1000 0x2000\n{tmp_path}/disk.img 0x3000 0x2000\n")
    backend = UBootBackend.from_options(
        {"fw_env_config": str(config), "cmdline": str(tmp_path / "c"), "attempts": 5,
         "initial_env": str(tmp_path / "initial"), "bootcmd": "boot"}
    )  # fmt: skip
    assert backend.layout.redundant and backend.layout.size == 0x2000
    assert (backend.cmdline, backend.attempts) == (tmp_path / "c", 5)
    assert (backend.initial_env, backend.bootcmd) == (tmp_path / "initial", "boot")


def test_options_with_an_env_file(tmp_path: Path) -> None:
    backend = UBootBackend.from_options({"env_file": str(tmp_path / "uboot.env")})
    assert backend.layout == EnvLayout.single(tmp_path / "uboot.env", uboot.DEFAULT_ENV_SIZE)
    assert backend.cmdline == Path("/proc/cmdline")
    backend = UBootBackend.from_options(
        {"env_file": "/dev/mmcblk0", "env_offset": 0x400000, "env_size": 0x2000,
         "redundant_offset": 0x402000}
    )  # fmt: skip
    assert backend.layout == EnvLayout.redundant_pair("/dev/mmcblk0", 0x2000, 0x400000, 0x402000)
    backend = UBootBackend.from_options(
        {"env_file": "/boot/uboot.env", "redundant_file": "/boot/uboot-redund.env"}
    )
    assert backend.layout.copies[1] == ubootenv.EnvCopy(Path("/boot/uboot-redund.env"), 0)


def test_default_options_read_etc_fw_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake(path: str) -> EnvLayout:
        seen.append(path)
        return EnvLayout.single("/x", SIZE)

    monkeypatch.setattr(ubootenv, "read_fw_env_config", fake)
    UBootBackend.from_options({})
    assert seen == ["/etc/fw_env.config"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"env_file": "/x", "colour": "red"}, "unknown option 'colour'"),
        ({"env_file": "/x", "attempts": "3"}, "option 'attempts' must be a int"),
        ({"env_file": "/x", "attempts": True}, "option 'attempts' must be a int"),
        ({"env_file": "/x", "attempts": 0}, "attempts must be 1 to 9"),
        ({"env_file": "/x", "attempts": 10}, "attempts must be 1 to 9"),
        ({"env_file": 3}, "option 'env_file' must be a str or path"),
        ({"env_file": "/x", "env_size": "0x4000"}, "option 'env_size' must be a int"),
        ({"fw_env_config": "/x", "env_file": "/y"}, "'fw_env_config' excludes env_file"),
        ({"env_offset": 5}, "option 'env_file' is needed"),
        ({"env_file": "/x", "env_size": 3}, "too small"),
        ({"fw_env_config": "/nonexistent/fw_env.config"}, "cannot read"),
        ({"env_file": "/x", "mender_partitions": {"two": "a"}}, "mender_partitions"),
        ({"env_file": "/x", "mender_partitions": {2: "c"}}, "unknown slot 'c'"),
        ({"env_file": "/x", "mender_partitions": ["a"]}, "must be a Mapping"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(BootloaderError, match=message):
        UBootBackend.from_options(options)


# --- Mender --------------------------------------------------------------------------------------

MENDER_ENV = {
    "bootcmd": "run mender_setup; run mmcboot",
    "altbootcmd": "run mender_altbootcmd; run bootcmd",
    "mender_altbootcmd": "if test ${mender_boot_part} = 2; then ...; fi",
    "mender_boot_part": "2",
    "mender_boot_part_hex": "2",
    "mender_check_saveenv_canary": "1",
    "mender_saveenv_canary": "1",
    "upgrade_available": "0",
    "bootcount": "0",
    "bootlimit": "1",
}


def mender_device(tmp_path: Path, **changes: str) -> Device:
    device = Device(tmp_path, "redundant")
    ubootenv.write_env(device.layout, {**MENDER_ENV, **changes}, None)
    device.backend = UBootBackend(
        device.layout,
        cmdline=device.root / "proc" / "cmdline",
        mender_partitions={2: "a", 3: "b"},
        bootcmd="load mmc 0:1 ${scriptaddr} boot.scr; source ${scriptaddr}",
    )
    return device


def test_takeover_of_a_settled_mender_device(tmp_path: Path) -> None:
    device = mender_device(tmp_path, mender_boot_part="3", mender_boot_part_hex="3")
    result = device.backend.takeover_from_mender()
    assert (result.partition, result.slot, result.trial) == (3, "b", False)
    env = device.env()
    assert env["BOOT_ORDER"] == "B A" and "FLEET_TRIAL" not in env
    assert (env["BOOT_A_LEFT"], env["BOOT_B_LEFT"], env["bootlimit"]) == ("3", "3", "3")
    assert env["altbootcmd"] == OUR_ALTBOOTCMD
    assert env["bootcmd"].endswith("source ${scriptaddr}")
    assert env["mender_boot_part"] == "3"  # left for a Mender script that may still run
    assert result.variables == env
    outcome = device.healthy()
    assert (outcome.slot, outcome.trial) == ("b", False)


def test_takeover_during_a_mender_trial_keeps_the_trial(tmp_path: Path) -> None:
    device = mender_device(
        tmp_path, mender_boot_part="3", mender_boot_part_hex="3", upgrade_available="1",
        bootcount="1", bootlimit="2",
    )  # fmt: skip
    result = device.backend.takeover_from_mender()
    assert (result.slot, result.trial) == ("b", True)
    env = device.env()
    assert (env["FLEET_TRIAL"], env["BOOT_B_LEFT"], env["bootcount"]) == ("B", "1", "2")
    assert device.backend.primary() == "a"
    # Mender allowed one more boot of the trial; then U-Boot falls back.
    assert [device.boot(RESET).slot for _ in range(3)] == ["b", "a", "a"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mender_boot_part": ""}, "no Mender environment"),
        ({"mender_boot_part_hex": "3"}, "disagree"),
        ({"mender_saveenv_canary": ""}, "canary"),
        ({"mender_boot_part": "5", "mender_boot_part_hex": "5"}, "does not map"),
    ],
)
def test_takeover_refuses_what_it_cannot_trust(
    tmp_path: Path, changes: dict[str, str], message: str
) -> None:
    device = mender_device(tmp_path, **changes)
    before = device.env()
    with pytest.raises(BootloaderError, match=message):
        device.backend.takeover_from_mender()
    assert device.env() == before


def test_takeover_maps_hex_partition_numbers(tmp_path: Path) -> None:
    device = mender_device(tmp_path, mender_boot_part="11", mender_boot_part_hex="b")
    device.backend.mender_partitions = {10: "a", 11: "b"}
    assert device.backend.takeover_from_mender().slot == "b"


# --- the model alone -----------------------------------------------------------------------------


def test_model_setexpr_counts_in_hex(tmp_path: Path) -> None:
    device = Device(tmp_path, "file")
    ubootenv.write_env(
        device.layout,
        {"FLEET_ENV": "1", "BOOT_ORDER": "A", "BOOT_A_LEFT": "12", "bootlimit": "3"},
        None,
    )
    device.model.boot(RESET)
    assert device.env()["BOOT_A_LEFT"] == "11"  # 0x12 - 1, which is why attempts stay below 10


def test_model_stops_at_the_prompt_without_altbootcmd(tmp_path: Path) -> None:
    device = Device(tmp_path, "file")
    env = {"FLEET_ENV": "1", "upgrade_available": "1", "bootcount": "3", "bootlimit": "3"}
    ubootenv.write_env(device.layout, env, None)
    with pytest.raises(BootloaderError, match="stays at its prompt"):
        device.model.boot(RESET)
    ubootenv.write_env(device.layout, {**env, "altbootcmd": "run mender_altbootcmd"}, None)
    with pytest.raises(BootloaderError, match="not modelled"):
        device.model.boot(RESET)


def test_model_saves_bootcount_only_with_upgrade_available(tmp_path: Path) -> None:
    device = Device(tmp_path, "file")
    ubootenv.write_env(device.layout, {"FLEET_ENV": "1", "bootcount": "7"}, None)
    device.model.boot(RESET)  # safe mode: no slot, nothing for the script to save
    assert device.env()["bootcount"] == "7"
    ubootenv.write_env(device.layout, {"FLEET_ENV": "1", "BOOT_ORDER": "A", "BOOT_A_LEFT": "2"},
                       None)  # fmt: skip
    device.model.boot(RESET)  # the script's saveenv stores the RAM bootcount of 1
    assert device.env()["bootcount"] == "1"


def test_model_saves_twice_into_copy_0_after_a_default_environment(tmp_path: Path) -> None:
    """U-Boot's env_valid toggling after "bad CRC": both saves of that boot land in copy 0."""
    device = Device(tmp_path, "redundant")
    device.model.default_environment = {"upgrade_available": "1", "bootlimit": "5"}
    device.model.boot(POWER_ON)
    assert ubootenv.read_copy(device.layout, 0)[1] == 2
    with pytest.raises(BootStateCorruptError):
        ubootenv.read_copy(device.layout, 1)


def test_model_ignores_a_copy_with_a_bad_crc_and_uses_the_serial(tmp_path: Path) -> None:
    device = Device(tmp_path, "redundant")
    layout = device.layout
    for index, (serial, order) in enumerate(((9, "B"), (10, "A"))):
        block = ubootenv.encode_copy(
            {"FLEET_ENV": "1", "BOOT_ORDER": order, "BOOT_A_LEFT": "1", "BOOT_B_LEFT": "1"},
            SIZE,
            serial,
        )
        durable.write_at(layout.copies[index].path, layout.copies[index].offset, block)
    assert device.model.boot(RESET).slot == "a"  # copy 1 has the larger serial
    assert ubootenv.read_copy(layout, 0)[1] == 11  # saveenv went to the other copy
    copy = layout.copies[0]
    durable.write_at(copy.path, copy.offset + 100, b"\xff")
    # Back to copy 1, where A still has its attempt: the lost save is lost, nothing else.
    assert device.model.boot(RESET).slot == "a"
    assert ubootenv.read_copy(layout, 0)[1] == 11


# --- boot script ---------------------------------------------------------------------------------


def test_boot_script_implements_the_scheme() -> None:
    text = uboot_script.boot_script(attempts=4, devtype="mmc", devnum="1", fdt_file="board.dtb")
    for needle in (
        'test "${FLEET_ENV}" != "1"',
        "setenv BOOT_A_LEFT 4",
        "setenv bootlimit 4",
        "for fleet_s in ${BOOT_ORDER}; do",
        "setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1",
        "setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1",
        "saveenv",
        "fleet_slot=safe",
        "part number mmc 1 boot_${fleet_slot} fleet_part",
        "root=PARTLABEL=root_${fleet_slot} fleet.slot=${fleet_slot}",
        "load mmc 1:${fleet_part} ${fdt_addr_r} board.dtb",
        "booti ${kernel_addr_r} - ${fdt_addr_r}",
        f'setenv altbootcmd "{uboot.ALTBOOTCMD}"',
    ):
        assert needle in text
    assert text.index("saveenv") < text.index("setenv bootargs")  # bootargs are never saved
    with pytest.raises(BootloaderError, match="attempts must be 1 to 9"):
        uboot_script.boot_script(attempts=12)


def test_script_image_header() -> None:
    image = uboot_script.script_image("echo hi\n", timestamp=1_700_000_000)
    header, payload = image[:64], image[64:]
    assert header[:4] == bytes.fromhex("27051956")
    assert int.from_bytes(header[8:12], "big") == 1_700_000_000
    assert int.from_bytes(header[12:16], "big") == len(payload) == 16
    assert int.from_bytes(header[24:28], "big") == zlib.crc32(payload)
    assert header[28:32] == bytes([5, 2, 6, 0])  # Linux, ARM, script, uncompressed
    assert int.from_bytes(header[4:8], "big") == zlib.crc32(header[:4] + bytes(4) + header[8:])
    assert payload == bytes.fromhex("00000008 00000000") + b"echo hi\n"


def test_compile_boot_script_without_mkimage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234")
    uboot_script.compile_boot_script("echo hi\n", tmp_path / "boot.scr")
    assert (tmp_path / "boot.scr").read_bytes() == uboot_script.script_image(
        "echo hi\n", timestamp=1234
    )


# --- corruption never crashes and never half-writes ---------------------------------------------

ACTIONS: dict[str, Callable[[UBootBackend], object]] = {
    "primary": lambda b: b.primary(),
    "is_trial": lambda b: b.is_trial(),
    "attempts_left": lambda b: b.attempts_left("a"),
    "try_once": lambda b: b.try_once("b"),
    "commit": lambda b: b.commit("a"),
    "mark_bad": lambda b: b.mark_bad("b"),
    "takeover": lambda b: b.takeover_from_mender(),
}


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    damage=st.lists(
        st.tuples(st.integers(0, 3 * SIZE - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    action=st.sampled_from(sorted(ACTIONS)),
    garbage=st.dictionaries(
        st.sampled_from(["BOOT_ORDER", "BOOT_A_LEFT", "FLEET_TRIAL", "bootcount", "FLEET_ENV",
                         "mender_boot_part", "upgrade_available"]),
        st.text(alphabet="AB ab0123456789x-", max_size=6),
    ),
)  # fmt: skip
def test_random_corruption_only_raises_bootloader_errors(
    tmp_path_factory: pytest.TempPathFactory,
    damage: list[tuple[int, int]],
    action: str,
    garbage: dict[str, str],
) -> None:
    device = Device(tmp_path_factory.mktemp("dev"), "redundant")
    device.healthy()
    ubootenv.update_env(device.layout, garbage)
    image = device.layout.copies[0].path
    raw = bytearray(image.read_bytes())
    for position, byte in damage:
        raw[position] = byte
    image.write_bytes(bytes(raw))
    try:
        ACTIONS[action](device.backend)
    except BootloaderError:
        assert image.read_bytes() == bytes(raw)
        return
    ubootenv.read_env(device.layout)  # whatever was written is a whole, valid copy
    device.model.boot(RESET)  # and the firmware boots something from it
