"""The U-Boot environment and boot script against the real tools: fw_printenv/fw_setenv
(libubootenv), mkenvimage, mkimage and dumpimage (u-boot-tools)."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

from bootloader_hooks import uboot, uboot_script, ubootenv
from bootloader_hooks.base import BootCause, BootEvent
from bootloader_hooks.uboot import UBootBackend
from bootloader_hooks.uboot_model import UBootModel
from bootloader_hooks.ubootenv import EnvLayout
from tests.conftest import UBOOT_LAYOUT_KINDS, uboot_layout

SIZE = 0x4000
RESET = BootEvent(BootCause.RESET)
VARIABLES = {
    "bootcmd": "run distro_bootcmd",
    "bootargs": "console=ttyS0,115200 root=/dev/mmcblk0p2 rootwait",
    "equals": "a=b=c",
    "BOOT_ORDER": "A B",
    "Zebra": "1",
}


def run(*command: str, stdin: str | None = None) -> str:
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result.stdout


def layout_of(tmp_path: Path, kind: str) -> EnvLayout:
    return uboot_layout(tmp_path, kind, SIZE)


class Tools:
    """fw_printenv and fw_setenv on a layout, through a fw_env.config the test writes."""

    def __init__(self, tmp_path: Path, layout: EnvLayout) -> None:
        self.config = tmp_path / "fw_env.config"
        self.config.write_text(ubootenv.format_fw_env_config(layout))
        self.default = tmp_path / "default-env.txt"
        self.default.write_text("")

    def printenv(self) -> dict[str, str]:
        lines = run("fw_printenv", "-c", str(self.config)).splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def setenv(self, variables: Mapping[str, str]) -> None:
        script = "".join(f"{name}={value}\n" for name, value in variables.items())
        run("fw_setenv", "-c", str(self.config), "-f", str(self.default), "-s", "-", stdin=script)


KINDS = UBOOT_LAYOUT_KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_fw_printenv_reads_what_we_write(tmp_path: Path, kind: str) -> None:
    layout = layout_of(tmp_path, kind)
    tools = Tools(tmp_path, layout)
    ubootenv.write_env(layout, VARIABLES, None)
    assert tools.printenv() == VARIABLES
    for n in range(3):  # walk the serials and both copies
        ubootenv.update_env(layout, {"n": str(n)})
        assert tools.printenv() == {**VARIABLES, "n": str(n)}


@pytest.mark.parametrize("kind", KINDS)
def test_we_read_what_fw_setenv_writes(tmp_path: Path, kind: str) -> None:
    layout = layout_of(tmp_path, kind)
    tools = Tools(tmp_path, layout)
    tools.setenv(VARIABLES)
    assert ubootenv.read_env(layout).variables == VARIABLES
    for n in range(3):
        tools.setenv({"n": str(n), "Zebra": ""})  # an empty value deletes
        expected = {**VARIABLES, "n": str(n)}
        del expected["Zebra"]
        assert ubootenv.read_env(layout).variables == expected


@pytest.mark.parametrize("kind", ["file", "redundant"])
def test_writes_are_bit_exact_with_fw_setenv(tmp_path: Path, kind: str) -> None:
    """Same copy, same serial, same bytes up to the end marker. Past it libubootenv 0.3.2 writes
    whatever malloc returned (not always zeros, and its CRC covers them), so the rest of the
    copy, and the CRC, are compared against mkenvimage below instead."""
    layout = layout_of(tmp_path, kind)
    tools = Tools(tmp_path, layout)
    tools.setenv({"seed": "1"})
    variables = {"seed": "1"}
    for step in ({"b": "2", "a": "1"}, {"a": "", "long": "x" * 300}, {"B": "upper"}):
        before = ubootenv.read_env(layout)
        tools.setenv(step)
        variables = {k: v for k, v in {**variables, **step}.items() if v}
        if layout.redundant:
            target, serial = 1 - before.active, ((before.serial or 0) + 1) & 0xFF
        else:
            target, serial = 0, None
        ours = ubootenv.encode_copy(variables, SIZE, serial)
        copy = layout.copies[target]
        theirs = copy.path.read_bytes()[copy.offset : copy.offset + SIZE]
        meaningful = layout.header_size + ours[layout.header_size :].index(b"\0\0") + 2
        assert theirs[4:meaningful] == ours[4:meaningful]
        assert ubootenv.read_copy(layout, target) == (variables, serial)


@pytest.mark.parametrize("pad", [None, "0x00", "0x5a"])
def test_mkenvimage_single_is_readable(tmp_path: Path, pad: str | None) -> None:
    source = tmp_path / "env.txt"
    source.write_text("".join(f"{k}={v}\n" for k, v in VARIABLES.items()))
    image = tmp_path / "uboot.env"
    padding = ["-p", pad] if pad else []
    run("mkenvimage", *padding, "-s", hex(SIZE), "-o", str(image), str(source))
    assert ubootenv.read_env(EnvLayout.single(image, SIZE)).variables == VARIABLES


def test_mkenvimage_redundant_is_readable_from_either_copy(tmp_path: Path) -> None:
    source = tmp_path / "env.txt"
    source.write_text("".join(f"{k}={v}\n" for k, v in VARIABLES.items()))
    copy = tmp_path / "copy.bin"
    run("mkenvimage", "-r", "-s", hex(SIZE), "-o", str(copy), str(source))
    layout = layout_of(tmp_path, "redundant")

    def place(index: int) -> None:
        with open(layout.copies[index].path, "r+b") as disk:
            disk.seek(layout.copies[index].offset)
            disk.write(copy.read_bytes())

    place(1)  # copy 0 is still zeros: a bad CRC
    state = ubootenv.read_env(layout)
    assert (state.variables, state.active, state.serial, state.damaged) == (VARIABLES, 1, 1, True)
    place(0)  # both hold serial 1: a tie goes to copy 0
    state = ubootenv.read_env(layout)
    assert (state.variables, state.active, state.serial, state.damaged) == (VARIABLES, 0, 1, False)


@pytest.mark.parametrize("redundant", [False, True])
def test_our_encoding_equals_mkenvimage_with_zero_padding(tmp_path: Path, redundant: bool) -> None:
    source = tmp_path / "env.txt"
    ordered = dict(sorted(VARIABLES.items(), key=lambda item: item[0].encode()))
    source.write_text("".join(f"{k}={v}\n" for k, v in ordered.items()))
    image = tmp_path / "uboot.env"
    flags = ["-r"] if redundant else []
    run("mkenvimage", *flags, "-p", "0", "-s", hex(SIZE), "-o", str(image), str(source))
    assert image.read_bytes() == ubootenv.encode_copy(VARIABLES, SIZE, 1 if redundant else None)


@pytest.mark.parametrize("damaged", [0, 1])
def test_one_corrupted_copy_is_read_around_and_repaired(tmp_path: Path, damaged: int) -> None:
    layout = layout_of(tmp_path, "redundant")
    tools = Tools(tmp_path, layout)
    tools.setenv({"n": "1"})
    tools.setenv({"n": "2"})
    newest = ubootenv.read_env(layout).active
    copy = layout.copies[damaged]
    with open(copy.path, "r+b") as disk:
        disk.seek(copy.offset + 10)
        disk.write(b"\xff\x00\xff")
    expected = "1" if damaged == newest else "2"
    assert tools.printenv()["n"] == expected
    state = ubootenv.read_env(layout)
    assert state.variables["n"] == expected and state.damaged
    ubootenv.update_env(layout, {"n": "3"})
    assert tools.printenv()["n"] == "3"
    for index in (0, 1):
        ubootenv.read_copy(layout, index)  # both copies valid again
    assert not ubootenv.read_env(layout).damaged


def test_fw_env_config_read_like_libubootenv(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * SIZE))
    config = tmp_path / "fw_env.config"
    config.write_text(
        "# device  offset  size  sector\n"
        f"{image}\t020000\t4000\t200\n"  # octal offset (0x2000), hex size without 0x
        f"{image} 0x6000 0x4000 # second copy\n"
    )
    run("fw_setenv", "-c", str(config), "-f", "/dev/null", "where", "here")
    layout = ubootenv.read_fw_env_config(config)
    assert [c.offset for c in layout.copies] == [0x2000, 0x6000]
    assert ubootenv.read_env(layout).variables == {"where": "here"}


def test_backend_state_as_fw_printenv_sees_it(tmp_path: Path) -> None:
    layout = layout_of(tmp_path, "redundant")
    tools = Tools(tmp_path, layout)
    tools.setenv({"bootcmd": "run distro_bootcmd"})
    backend = UBootBackend.from_options(
        {"fw_env_config": str(tools.config), "cmdline": str(tmp_path / "cmdline")}
    )
    backend.repair("a")  # provisioning: our state, slot a committed, the board's variables kept
    backend.try_once("b")
    env = tools.printenv()
    assert {k: env[k] for k in ("BOOT_ORDER", "BOOT_B_LEFT", "FLEET_TRIAL")} == {
        "BOOT_ORDER": "B A",
        "BOOT_B_LEFT": "3",
        "FLEET_TRIAL": "B",
    }
    assert (env["upgrade_available"], env["bootcount"], env["bootlimit"]) == ("1", "0", "3")
    assert env["bootcmd"] == "run distro_bootcmd"
    tools.setenv({"bootcount": "1"})  # what U-Boot's bootcount_inc saves on the next boot
    backend.commit("b")
    env = tools.printenv()
    assert "FLEET_TRIAL" not in env
    assert (env["BOOT_ORDER"], env["upgrade_available"], env["bootcount"]) == ("B A", "0", "0")


MENDER_DEFAULT_ENV = {
    "bootcmd": "run mender_setup; run mmcboot",
    "altbootcmd": "run mender_altbootcmd; run bootcmd",
    "mender_altbootcmd": "if test ${mender_boot_part} = 2; then setenv mender_boot_part 3; "
    "setenv mender_boot_part_hex 3; else setenv mender_boot_part 2; "
    "setenv mender_boot_part_hex 2; fi; setenv upgrade_available 0; saveenv; run mender_setup",
    "mender_boot_part": "2",
    "mender_boot_part_hex": "2",
    "mender_check_saveenv_canary": "1",
    "mender_saveenv_canary": "1",
    "upgrade_available": "0",
    "bootcount": "0",
    "bootlimit": "1",
}


def mender_device(tmp_path: Path) -> tuple[EnvLayout, Tools]:
    """A redundant environment as U-Boot with Mender's integration leaves it, then updated the
    way the Mender client does it: ``fw_setenv -s -`` with ``name=value`` lines."""
    layout = layout_of(tmp_path, "redundant")
    source = tmp_path / "mender-env.txt"
    source.write_text("".join(f"{k}={v}\n" for k, v in MENDER_DEFAULT_ENV.items()))
    copy = tmp_path / "copy.bin"
    run("mkenvimage", "-r", "-s", hex(SIZE), "-o", str(copy), str(source))
    with open(layout.copies[0].path, "r+b") as disk:
        disk.seek(layout.copies[0].offset)
        disk.write(copy.read_bytes())
    tools = Tools(tmp_path, layout)
    install = "mender_boot_part=3\nmender_boot_part_hex=3\nupgrade_available=1\nbootcount=0\n"
    run("fw_setenv", "-c", str(tools.config), "-s", "-", stdin=install)
    tools.setenv({"bootcount": "1"})  # U-Boot counted the first boot of partition 3
    return layout, tools


def takeover_backend(tools: Tools, tmp_path: Path) -> UBootBackend:
    return UBootBackend.from_options(
        {
            "fw_env_config": str(tools.config),
            "cmdline": str(tmp_path / "proc" / "cmdline"),
            "mender_partitions": {"2": "a", "3": "b"},
            "bootcmd": "load mmc 0:1 ${scriptaddr} boot.scr; source ${scriptaddr}",
        }
    )


def test_mender_takeover_after_mender_committed(tmp_path: Path) -> None:
    layout, tools = mender_device(tmp_path)
    run("fw_setenv", "-c", str(tools.config), "-s", "-", stdin="upgrade_available=0\n")
    result = takeover_backend(tools, tmp_path).takeover_from_mender()
    assert (result.partition, result.slot, result.trial) == (3, "b", False)
    env = tools.printenv()
    assert (env["BOOT_ORDER"], env["BOOT_A_LEFT"], env["BOOT_B_LEFT"]) == ("B A", "3", "3")
    assert env["altbootcmd"] == uboot.ALTBOOTCMD
    assert env["mender_boot_part"] == "3" and env["FLEET_ENV"] == "1"
    outcome = UBootModel(layout).boot(RESET)
    assert (outcome.slot, outcome.trial) == ("b", False)


def test_mender_takeover_during_a_mender_trial(tmp_path: Path) -> None:
    layout, tools = mender_device(tmp_path)
    result = takeover_backend(tools, tmp_path).takeover_from_mender()
    assert (result.slot, result.trial) == ("b", True)
    env = tools.printenv()
    # Mender's bootlimit=1 was used up by the boot running now: no attempt left for b.
    assert (env["FLEET_TRIAL"], env["BOOT_B_LEFT"], env["bootcount"]) == ("B", "0", "3")
    outcome = UBootModel(layout).boot(RESET)
    assert (outcome.slot, outcome.trial) == ("a", False)


def test_boot_script_compiles_with_mkimage(tmp_path: Path) -> None:
    text = uboot_script.boot_script()
    image = tmp_path / "boot.scr"
    uboot_script.compile_boot_script(text, image, timestamp=1_700_000_000)
    listing = run("dumpimage", "-l", str(image))
    assert "Image Type:   ARM Linux Script (uncompressed)" in listing
    assert f"Image Name:   {uboot_script.SCRIPT_NAME}" in listing
    assert "Image 0:" in listing
    extracted = tmp_path / "extracted"
    run("dumpimage", "-T", "script", "-p", "0", "-o", str(extracted), str(image))
    assert extracted.read_bytes()[8:] == text.encode()  # after the length table
    assert image.read_bytes() == uboot_script.script_image(text, timestamp=1_700_000_000)
