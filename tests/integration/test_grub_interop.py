"""The grubenv we write and read against grub-editenv, and our grub.cfg against grub-script-check.

Both tools come from grub-common; a missing tool fails these tests.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootloader_hooks import grubenv
from bootloader_hooks.base import BootCause, BootEvent, provision
from bootloader_hooks.grub import GrubBackend
from bootloader_hooks.grub_model import GrubModel
from bootloader_hooks.grub_script import DEFAULT_ENTRIES, SlotEntry, grub_cfg
from bootloader_hooks.grubenv import BLOCK_SIZE, EnvBlock, GrubenvFullError

TRICKY = {
    "plain": "A B",
    "spaces": "  two  spaces ",
    "equals": "a=b=c",
    "backslash": "C:\\path\\",
    "trailing_backslash": "x\\",
    "newline": "line1\nline2\n",
    "empty": "",
    "utf8": "café ☃",
    "hash": "#not a comment",
    "quotes": "'single' \"double\" $var ${x}",
}


def editenv(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["grub-editenv", str(path), *args], capture_output=True, text=True, check=False
    )


def editenv_ok(path: Path, *args: str) -> str:
    result = editenv(path, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def created_by_editenv(path: Path) -> Path:
    editenv_ok(path, "create")
    return path


def test_our_empty_block_is_grub_editenv_create(tmp_path: Path) -> None:
    path = created_by_editenv(tmp_path / "grubenv")
    assert path.read_bytes() == EnvBlock.new().encode()
    assert grubenv.read(path) == EnvBlock.new()


def test_grub_editenv_writes_we_read(tmp_path: Path) -> None:
    path = created_by_editenv(tmp_path / "grubenv")
    editenv_ok(path, "set", *(f"{name}={value}" for name, value in TRICKY.items()))
    assert grubenv.read(path).variables() == TRICKY


def test_we_write_grub_editenv_lists(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    grubenv.write(path, EnvBlock.new().update(dict(TRICKY)))
    listed = editenv_ok(path, "list")
    assert listed == "".join(f"{name}={value}\n" for name, value in TRICKY.items())


def test_same_variables_same_bytes(tmp_path: Path) -> None:
    path = created_by_editenv(tmp_path / "grubenv")
    editenv_ok(path, "set", *(f"{name}={value}" for name, value in TRICKY.items()))
    assert path.read_bytes() == EnvBlock.new().update(dict(TRICKY)).encode()


def test_a_full_block_is_full_for_both(tmp_path: Path) -> None:
    path = created_by_editenv(tmp_path / "grubenv")
    room = BLOCK_SIZE - len(path.read_bytes().rstrip(b"#")) - len("k=\n")
    assert room % 3 == 0
    value = "v\\" * (room // 3)  # 3 bytes each once the backslash is escaped
    editenv_ok(path, "set", "k=" + value)
    ours = EnvBlock.new().set("k", value)
    assert path.read_bytes() == ours.encode()
    assert len(path.read_bytes().rstrip(b"#")) == BLOCK_SIZE
    assert grubenv.read(path) == ours
    before = path.read_bytes()
    refused = editenv(path, "set", "z=")
    assert refused.returncode != 0 and "too small" in refused.stderr
    assert path.read_bytes() == before
    with pytest.raises(GrubenvFullError, match="grubenv full: 1027 bytes needed, 1024 available"):
        ours.set("z", "").encode(path)


names = st.sampled_from(["A", "B", "saved_entry", "x_1", "long_variable_name"])
values = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\0", max_codepoint=0x2FF),
    max_size=30,
)
changes = st.lists(st.tuples(names, st.one_of(st.none(), values)), min_size=1, max_size=8)


@settings(max_examples=25, deadline=None)
@given(changes)
def test_any_sequence_of_changes_gives_grub_editenv_bytes(
    steps: list[tuple[str, str | None]],
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = created_by_editenv(Path(directory) / "grubenv")
        block = EnvBlock.new()
        for name, value in steps:
            if value is None:
                editenv_ok(path, "unset", name)
            else:
                editenv_ok(path, "set", f"{name}={value}")
            block = block.update({name: value})
            assert path.read_bytes() == block.encode()
            assert grubenv.read(path) == block


def test_backend_writes_are_grub_editenv_changes(tmp_path: Path) -> None:
    ours = provision("grub", tmp_path / "esp")["EFI/fleet/grubenv"]
    theirs = tmp_path / "theirs"
    backend = GrubBackend(ours, tmp_path / "cmdline")
    created_by_editenv(theirs)
    editenv_ok(theirs, "set", "BOOT_ORDER=A B", "BOOT_A_LEFT=3", "BOOT_B_LEFT=0")
    assert ours.read_bytes() == theirs.read_bytes()

    backend.try_once("b")
    editenv_ok(theirs, "set", "BOOT_ORDER=B A", "BOOT_B_LEFT=3", "FLEET_TRIAL=B")
    assert ours.read_bytes() == theirs.read_bytes()

    backend.commit("b")
    editenv_ok(theirs, "set", "BOOT_ORDER=B A", "BOOT_B_LEFT=3")
    editenv_ok(theirs, "unset", "FLEET_TRIAL")
    assert ours.read_bytes() == theirs.read_bytes()

    backend.mark_bad("a")
    editenv_ok(theirs, "set", "BOOT_ORDER=B", "BOOT_A_LEFT=0")
    assert ours.read_bytes() == theirs.read_bytes()


def test_grub_editenv_changes_are_seen_by_the_backend(tmp_path: Path) -> None:
    path = created_by_editenv(tmp_path / "grubenv")
    (tmp_path / "cmdline").write_text("fleet.slot=b\n")
    editenv_ok(path, "set", "BOOT_ORDER=B A", "BOOT_A_LEFT=3", "BOOT_B_LEFT=2", "FLEET_TRIAL=B")
    backend = GrubBackend(path, tmp_path / "cmdline")
    assert (backend.primary(), backend.is_trial(), backend.attempts_left("b")) == ("a", True, 2)


def test_the_block_grub_rewrote_in_place_is_read_by_grub_editenv(tmp_path: Path) -> None:
    env = provision("grub", tmp_path)["EFI/fleet/grubenv"]
    GrubModel(tmp_path).boot(BootEvent(BootCause.POWER_ON))
    assert editenv_ok(env, "list") == "BOOT_ORDER=A B\nBOOT_A_LEFT=2\nBOOT_B_LEFT=0\n"


def script_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["grub-script-check", str(path)], capture_output=True, text=True, check=False
    )


def test_grub_script_check_accepts_our_grub_cfg(tmp_path: Path) -> None:
    cfg = provision("grub", tmp_path)["EFI/fleet/grub.cfg"]
    result = script_check(cfg)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grub_script_check_accepts_a_grub_cfg_with_other_entries(tmp_path: Path) -> None:
    entries = {
        **DEFAULT_ENTRIES,
        "a": SlotEntry("(hd1,gpt5)/boot/vmlinuz-6.1.0-28-amd64", "", "PARTUUID=ab-12", ""),
        "safe": SlotEntry("(hd0,gpt4)/vmlinuz", "(hd0,gpt4)/initrd.img", "/dev/sda4", "ro quiet"),
    }
    path = tmp_path / "grub.cfg"
    path.write_text(grub_cfg(entries, env_file="(hd0,gpt1)/EFI/fleet/grubenv"))
    result = script_check(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grub_script_check_is_not_a_rubber_stamp(tmp_path: Path) -> None:
    path = tmp_path / "grub.cfg"
    path.write_text(grub_cfg().replace("  done\n", "", 1))
    assert script_check(path).returncode != 0
