"""The firmware models against the real tools for the same on-disk formats.

``grub-editenv`` (grub-common) runs GRUB's own ``envblk.c``, the code GRUB's ``load_env`` and
``save_env`` use: the GRUB model must read every block as ``grub-editenv list`` does and change
it byte for byte as ``grub-editenv set``/``unset`` do. ``fw_setenv``/``fw_printenv``
(libubootenv) read and write the U-Boot environment: the U-Boot model must boot from what they
write, and what it saves must be what they read, serial numbers and wrap-around included.
Neither side goes through the backends' codecs. A missing tool fails these tests.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bootloader_hooks.base import BootCause, BootEvent
from bootloader_hooks.grub_model import (
    GrubModel,
    envblk_delete,
    envblk_iterate,
    envblk_open,
    envblk_set,
)
from bootloader_hooks.grub_script import grub_cfg
from bootloader_hooks.uboot_model import OUR_ALTBOOTCMD, UBootModel
from bootloader_hooks.ubootenv import EnvCopy, EnvLayout
from tests.conftest import UBOOT_LAYOUT_KINDS, uboot_layout

REBOOT = BootEvent(BootCause.REBOOT, ("reboot",))
SIGNATURE = b"# GRUB Environment Block\n"
TEXT = ("utf-8", "surrogateescape")


def tool(*command: str, stdin: str | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        command, input=None if stdin is None else stdin.encode(), capture_output=True, check=False
    )


def tool_ok(*command: str, stdin: str | None = None) -> str:
    result = tool(*command, stdin=stdin)
    assert result.returncode == 0, f"{command}: {result.stderr.decode(errors='replace')}"
    return result.stdout.decode(*TEXT)


# ---------------------------------------------------------------------------------------------
# GRUB


def grub_esp(tmp_path: Path) -> tuple[Path, Path]:
    esp = tmp_path / "esp"
    (esp / "EFI" / "fleet").mkdir(parents=True)
    (esp / "EFI" / "fleet" / "grub.cfg").write_text(grub_cfg())
    return esp, esp / "EFI" / "fleet" / "grubenv"


FOREIGN = {
    "saved_entry": "C:\\path\\",
    "note": "line1\nline2",
    "hash": "#not a comment",
    "utf8": "café ☃",
}


def test_the_model_boots_from_what_grub_editenv_writes_and_grub_editenv_reads_its_save(
    tmp_path: Path,
) -> None:
    esp, env = grub_esp(tmp_path)
    tool_ok("grub-editenv", str(env), "create")
    tool_ok("grub-editenv", str(env), "set", *(f"{k}={v}" for k, v in FOREIGN.items()))
    state = {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3", "FLEET_TRIAL": "B"}
    tool_ok("grub-editenv", str(env), "set", *(f"{k}={v}" for k, v in state.items()))
    expected = tmp_path / "expected"
    shutil.copyfile(env, expected)
    tool_ok("grub-editenv", str(expected), "set", "BOOT_B_LEFT=2")

    outcome = GrubModel(esp).boot(REBOOT)

    assert (outcome.slot, outcome.trial) == ("b", True)
    assert env.read_bytes() == expected.read_bytes()  # save_env changed what grub-editenv would
    listed = tool_ok("grub-editenv", str(env), "list")
    assert listed == "".join(
        f"{k}={v}\n" for k, v in {**FOREIGN, **state, "BOOT_B_LEFT": "2"}.items()
    )


def test_the_model_and_grub_editenv_refuse_the_same_blocks(tmp_path: Path) -> None:
    esp, env = grub_esp(tmp_path)
    for data in (b"", SIGNATURE, SIGNATURE.replace(b"Block", b"block") + b"#" * 999):
        env.write_bytes(data)
        assert tool("grub-editenv", str(env), "list").returncode != 0
        assert envblk_open(data) is None
        assert GrubModel(esp).boot(REBOOT).slot == "safe"


# Blocks of any size and content, damaged ones included: lines of a few meaningful bytes.
line_bytes = st.sampled_from([b"a", b"b", b"=", b"\\", b"\n", b"#", b" ", b"\0", b"AB"])
lines = st.lists(line_bytes, max_size=12).map(b"".join)
blocks = st.builds(
    lambda header, body, end, padding: header + body + end + b"#" * padding,
    st.sampled_from([SIGNATURE] * 6 + [SIGNATURE[:-1], SIGNATURE.replace(b"#", b"%", 1)]),
    st.lists(lines, max_size=6).map(b"\n".join),
    st.sampled_from([b"\n", b"\n", b""]),  # mostly whole lines, sometimes a cut one
    st.integers(0, 40),
)
names = st.sampled_from(["a", "b", "ab", "a b", "#a", "\\"])
values = st.lists(st.sampled_from(["a", "b", "\\", "\n", "=", "#", " "]), max_size=6).map("".join)


def listing_of(data: bytes) -> str | None:
    buf = envblk_open(data)
    if buf is None:
        return None
    return "".join(f"{name}={value}\n" for name, value in envblk_iterate(buf))


def editenv_on(data: bytes, *args: str) -> tuple[bool, bytes, str]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "grubenv"
        path.write_bytes(data)
        result = tool("grub-editenv", str(path), *args)
        return result.returncode == 0, path.read_bytes(), result.stdout.decode(*TEXT)


@settings(max_examples=60, deadline=None)
@given(blocks)
def test_the_model_reads_any_block_as_grub_editenv_lists_it(data: bytes) -> None:
    ok, _, listed = editenv_on(data, "list")
    ours = listing_of(data)
    assert (ours is not None) == ok
    if ok:
        assert ours == listed


@settings(max_examples=80, deadline=None)
@given(blocks, names, values)
@example(SIGNATURE + b"a=1\n" + b"#" * 20, "a", "x\\y\n")  # escapes
@example(SIGNATURE + b"a=1234\n#", "a", "1")  # shorter, with little padding left
@example(SIGNATURE + b"a=1\n##", "a", "123")  # longer, fits exactly
@example(SIGNATURE + b"a=1\n#", "a", "123")  # longer, one byte short
@example(SIGNATURE + b"a=1\n####", "b", "2")  # a new line that fits exactly
def test_the_model_sets_a_variable_in_any_block_as_grub_editenv_does(
    data: bytes, name: str, value: str
) -> None:
    buf = envblk_open(data)
    ok, after, _ = editenv_on(data, "set", f"{name}={value}")
    assert (buf is not None and envblk_set(buf, name, value)) == ok
    assert after == (buf if ok else data)  # a refused change writes nothing


@settings(max_examples=60, deadline=None)
@given(blocks, names)
@example(SIGNATURE + b"a=1\nb=2\n#", "a")
def test_the_model_unsets_a_variable_in_any_block_as_grub_editenv_does(
    data: bytes, name: str
) -> None:
    buf = envblk_open(data)
    ok, after, _ = editenv_on(data, "unset", name)
    assert (buf is not None) == ok
    if buf is not None:
        envblk_delete(buf, name)
        assert after == buf


# ---------------------------------------------------------------------------------------------
# U-Boot

SIZE = 0x2000
KINDS = UBOOT_LAYOUT_KINDS


def layout_of(tmp_path: Path, kind: str) -> EnvLayout:
    return uboot_layout(tmp_path, kind, SIZE)


class Tools:
    """fw_printenv and fw_setenv through a fw_env.config written here by hand."""

    def __init__(self, tmp_path: Path, layout: EnvLayout) -> None:
        self.config = tmp_path / "fw_env.config"
        self.config.write_text(
            "".join(f"{copy.path} {copy.offset:#x} {SIZE:#x}\n" for copy in layout.copies)
        )
        self.default = tmp_path / "default-env.txt"
        self.default.write_text("")

    def printenv(self) -> dict[str, str]:
        lines = tool_ok("fw_printenv", "-c", str(self.config)).splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def setenv(self, variables: Mapping[str, str]) -> None:
        script = "".join(f"{name}={value}\n" for name, value in variables.items())
        tool_ok(
            "fw_setenv", "-c", str(self.config), "-f", str(self.default), "-s", "-", stdin=script
        )


def ours(order: str, a: str, b: str, **more: str) -> dict[str, str]:
    return {
        "FLEET_ENV": "1",
        "BOOT_ORDER": order,
        "BOOT_A_LEFT": a,
        "BOOT_B_LEFT": b,
        "altbootcmd": OUR_ALTBOOTCMD,
        "bootlimit": "3",
        "upgrade_available": "0",
        "bootcount": "0",
        **more,
    }


FOREIGN_UBOOT = {"bootargs": "console=ttyS0,115200 rootwait", "equals": "a=b=c", "utf8": "café"}


@pytest.mark.parametrize("kind", KINDS)
def test_the_model_boots_from_what_fw_setenv_writes_and_fw_printenv_reads_its_saves(
    tmp_path: Path, kind: str
) -> None:
    layout = layout_of(tmp_path, kind)
    tools = Tools(tmp_path, layout)
    tools.setenv({**FOREIGN_UBOOT, **ours("B A", "3", "3", FLEET_TRIAL="B")})
    tools.setenv({"upgrade_available": "1"})  # a second write: the other copy when redundant
    model = UBootModel(layout, attempts=3)

    outcome = model.boot(REBOOT)
    assert (outcome.slot, outcome.trial) == ("b", True)
    assert tools.printenv() == {
        **FOREIGN_UBOOT,
        **ours("B A", "3", "2", FLEET_TRIAL="B", upgrade_available="1", bootcount="1"),
    }
    for count in (2, 3):  # the boot keeps failing: counted, saved, seen by fw_printenv
        assert model.boot(REBOOT).slot == "b"
        assert tools.printenv()["bootcount"] == str(count)
    assert model.boot(REBOOT).slot == "a"  # bootlimit passed: altbootcmd ends the trial
    seen = tools.printenv()
    assert (seen["BOOT_B_LEFT"], seen["bootcount"], seen["upgrade_available"]) == ("0", "0", "0")
    tools.setenv({"BOOT_ORDER": "B A", "BOOT_B_LEFT": "1"})  # and fw_setenv's next write wins
    assert model.boot(REBOOT).slot == "b"


def copy_bytes(copy: EnvCopy) -> bytes:
    return copy.path.read_bytes()[copy.offset : copy.offset + SIZE]


@pytest.mark.parametrize("kind", ["redundant", "two-files"])
def test_a_copy_with_a_bad_crc_is_passed_over_by_both(tmp_path: Path, kind: str) -> None:
    layout = layout_of(tmp_path, kind)
    tools = Tools(tmp_path, layout)
    tools.setenv(ours("B A", "3", "3"))
    assert UBootModel(layout).boot(REBOOT).slot == "b"  # saves BOOT_B_LEFT=2
    tools.setenv({"BOOT_B_LEFT": "3"})
    serials = [copy_bytes(copy)[4] for copy in layout.copies]  # small: no wrap-around yet
    newest = layout.copies[serials.index(max(serials))]
    damaged = bytearray(newest.path.read_bytes())
    damaged[newest.offset + 100] ^= 0x10  # in the data area: the CRC no longer matches
    newest.path.write_bytes(bytes(damaged))
    assert tools.printenv()["BOOT_B_LEFT"] == "2"  # the other copy: the model's save
    assert UBootModel(layout).boot(REBOOT).slot == "b"
    assert tools.printenv()["BOOT_B_LEFT"] == "1"


@pytest.mark.parametrize("kind", ["redundant", "two-files"])
def test_serials_wrap_around_alike_in_the_model_and_libubootenv(tmp_path: Path, kind: str) -> None:
    """fw_setenv and the model's saveenv take turns for 300 writes, through 255 and 0: each
    must read the other's latest write, whichever copy and serial it went to."""
    layout = layout_of(tmp_path, kind)
    tools = Tools(tmp_path, layout)
    model = UBootModel(layout, attempts=3)
    tools.setenv(ours("A B", "3", "0"))
    for step in range(150):
        tools.setenv({"step": str(step), "BOOT_A_LEFT": "9"})  # libubootenv writes
        assert model.boot(REBOOT).slot == "a"  # the model saves BOOT_A_LEFT=8, serial + 1
        seen = tools.printenv()
        assert (seen["step"], seen["BOOT_A_LEFT"]) == (str(step), "8")


def snapshot(layout: EnvLayout, directory: Path) -> EnvLayout:
    """The same layout over copies of its files, for a boot that must not change them."""
    directory.mkdir(exist_ok=True)
    copies = []
    for copy in layout.copies:
        shutil.copyfile(copy.path, directory / copy.path.name)
        copies.append(EnvCopy(directory / copy.path.name, copy.offset))
    return EnvLayout(layout.size, tuple(copies))


@pytest.mark.parametrize("kind", ["redundant", "two-files"])
@pytest.mark.parametrize("first", ["fw_setenv", "model"])
def test_the_model_takes_the_copy_fw_setenv_wrote_last_through_the_wrap(
    tmp_path: Path, kind: str, first: str
) -> None:
    """Serial 255 in one copy, 0 in the other: the 0 is newer. From blank copies fw_setenv
    writes serial 1 to copy 1 and the model writes it to copy 0; after that each write goes
    to the other copy with the next serial, so the first writer decides which copy holds 255."""
    layout = layout_of(tmp_path, kind)
    tools = Tools(tmp_path, layout)
    if first == "model":
        UBootModel(layout).boot(REBOOT)
        assert [copy_bytes(copy)[4] for copy in layout.copies] == [1, 0]
    tools.setenv(ours("A B", "9", "9"))
    for step in range(262):
        order = ("A B", "B A")[step % 2]
        tools.setenv({"BOOT_ORDER": order})
        if step >= 250:
            model = UBootModel(snapshot(layout, tmp_path / "snapshot"))
            assert model.boot(REBOOT).slot == order[0].lower(), f"step {step}"
