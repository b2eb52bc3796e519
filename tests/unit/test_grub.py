"""The grub backend and the GRUB model, alone and driven together through boot scenarios."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootloader_hooks import grub, grubenv
from bootloader_hooks.base import (
    BACKENDS,
    BootCause,
    BootEvent,
    BootOutcome,
    create_backend,
    provision,
)
from bootloader_hooks.errors import (
    BootloaderError,
    BootStateCorruptError,
    BootStateMissingError,
    UnknownSlotError,
)
from bootloader_hooks.grub import GrubBackend, default_block
from bootloader_hooks.grub_model import GrubModel, GrubModelError, parse_script
from bootloader_hooks.grub_script import DEFAULT_ENTRIES, SlotEntry, grub_cfg, install_files
from bootloader_hooks.grubenv import EnvBlock, GrubenvFullError
from fleet_core import durable
from fleet_core.durable import rewrite_in_place

REBOOT = BootEvent(BootCause.REBOOT, ("reboot",))
RESET = BootEvent(BootCause.RESET)
POWER_ON = BootEvent(BootCause.POWER_ON)


class Device:
    """An ESP with our grub.cfg and grubenv, a root for /proc/cmdline, GRUB, and the backend."""

    def __init__(
        self,
        base: Path,
        attempts: int = 3,
        kernel_present: Callable[[str], bool] | None = None,
    ) -> None:
        self.esp = base / "esp"
        self.grubenv = provision("grub", self.esp, attempts=attempts)["EFI/fleet/grubenv"]
        self.root = base / "root"
        (self.root / "proc").mkdir(parents=True)
        self.firmware = GrubModel(self.esp, kernel_present=kernel_present)
        self.backend = GrubBackend(self.grubenv, self.root / "proc" / "cmdline", attempts)

    def boot(self, event: BootEvent = REBOOT) -> BootOutcome:
        outcome = self.firmware.boot(event)
        for relative, data in outcome.linux_view.items():
            (self.root / relative).write_bytes(data)
        assert self.backend.booted() == outcome.slot
        assert self.backend.is_trial() == outcome.trial
        return outcome

    def variables(self) -> dict[str, str]:
        return grubenv.read(self.grubenv).variables()

    def set_variables(self, changes: dict[str, str | None]) -> None:
        grubenv.write(self.grubenv, grubenv.read(self.grubenv).update(changes))


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path)


def write_cmdline(device: Device, text: str) -> None:
    (device.root / "proc" / "cmdline").write_text(text)


# ---------------------------------------------------------------------------------------------
# Configuration.


def test_registered_and_built_from_options(tmp_path: Path) -> None:
    assert BACKENDS["grub"] == GrubBackend.from_options
    backend = create_backend(
        "grub", {"grubenv": str(tmp_path / "env"), "cmdline": tmp_path / "c", "attempts": 5}
    )
    assert isinstance(backend, GrubBackend)
    assert (backend.grubenv_path, backend.cmdline, backend.attempts) == (
        tmp_path / "env",
        tmp_path / "c",
        5,
    )
    assert backend.name == "grub"
    assert backend.reboot_command() == ["reboot"]


def test_defaults_are_the_production_paths() -> None:
    backend = GrubBackend.from_options({})
    assert backend.grubenv_path == Path("/boot/efi/EFI/fleet/grubenv")
    assert backend.cmdline == Path("/proc/cmdline")
    assert backend.attempts == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"grubenvs": "/x"}, "unknown option 'grubenvs'"),
        ({"attempts": "3"}, "'attempts' must be an integer"),
        ({"attempts": True}, "'attempts' must be an integer"),
        ({"attempts": 0}, "attempts must be 1 to 9"),
        ({"attempts": 10}, "attempts must be 1 to 9"),
        ({"grubenv": 5}, "option 'grubenv' must be a path"),
        ({"cmdline": ""}, "option 'cmdline' must be a path"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, Any], message: str) -> None:
    with pytest.raises(BootloaderError, match=f"^grub backend: .*{message}"):
        GrubBackend.from_options(options)


# ---------------------------------------------------------------------------------------------
# The backend alone.


def test_a_missing_grubenv_is_reported_never_made_up(tmp_path: Path) -> None:
    backend = GrubBackend(tmp_path / "grubenv", tmp_path / "cmdline")
    (tmp_path / "cmdline").write_text("root=PARTLABEL=root_a fleet.slot=a\n")
    for action in (backend.primary, backend.is_trial, lambda: backend.commit("a")):
        with pytest.raises(BootStateMissingError, match=r"^grub backend: .*grubenv is missing$"):
            action()
    assert not (tmp_path / "grubenv").exists()
    backend.repair("a")
    assert (tmp_path / "grubenv").read_bytes() == default_block("a").encode()
    assert grubenv.read(tmp_path / "grubenv").variables() == {
        "BOOT_ORDER": "A B",
        "BOOT_A_LEFT": "3",
        "BOOT_B_LEFT": "0",
    }


@pytest.mark.parametrize(
    ("primary", "fallback", "expected"),
    [
        ("b", "a", {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}),
        ("b", None, {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "0", "BOOT_B_LEFT": "3"}),
        (None, None, {"BOOT_ORDER": "", "BOOT_A_LEFT": "0", "BOOT_B_LEFT": "0"}),
    ],
)
def test_a_repair_names_the_primary_and_the_fallback(
    tmp_path: Path, primary: str | None, fallback: str | None, expected: dict[str, str]
) -> None:
    backend = GrubBackend(tmp_path / "grubenv", tmp_path / "cmdline")
    backend.repair(primary, fallback)
    assert grubenv.read(tmp_path / "grubenv").variables() == expected
    assert backend.primary() == primary
    with pytest.raises(UnknownSlotError, match="fallback 'b' is not the other root slot"):
        backend.repair("b", "b")


def test_booted_comes_from_the_kernel_command_line(device: Device) -> None:
    write_cmdline(device, "BOOT_IMAGE=/vmlinuz root=PARTLABEL=root_b fleet.slot=b quiet\n")
    assert device.backend.booted() == "b"
    write_cmdline(device, "root=/dev/sda2\n")
    with pytest.raises(BootloaderError, match=r"^grub backend: .* has no fleet.slot="):
        device.backend.booted()
    (device.root / "proc" / "cmdline").unlink()
    with pytest.raises(BootloaderError, match="^grub backend: cannot read"):
        device.backend.booted()


def test_try_once_commit_mark_bad_write_the_scheme(device: Device) -> None:
    backend = device.backend
    backend.try_once("b")
    assert device.variables() == {
        "BOOT_ORDER": "B A",
        "BOOT_A_LEFT": "3",
        "BOOT_B_LEFT": "3",
        "FLEET_TRIAL": "B",
    }
    assert backend.primary() == "a"
    backend.commit("b")
    assert device.variables() == {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}
    assert backend.primary() == "b"
    backend.mark_bad("a")
    assert device.variables() == {"BOOT_ORDER": "B", "BOOT_A_LEFT": "0", "BOOT_B_LEFT": "3"}
    backend.try_once("a")  # a marked-bad slot comes back only through a new trial
    assert device.variables()["BOOT_ORDER"] == "A B"
    backend.mark_bad("a")
    assert "FLEET_TRIAL" not in device.variables()
    assert backend.primary() == "b"


def test_mark_bad_keeps_the_trial_mark_of_the_other_slot(device: Device) -> None:
    device.backend.try_once("b")
    device.backend.mark_bad("a")
    assert device.variables()["FLEET_TRIAL"] == "B"
    assert device.variables()["BOOT_ORDER"] == "B"
    assert device.backend.primary() is None


def test_commit_of_the_primary_resets_its_count(device: Device) -> None:
    device.set_variables({"BOOT_A_LEFT": "1"})
    device.backend.commit("a")
    assert device.backend.attempts_left("a") == 3
    assert device.variables()["BOOT_ORDER"] == "A B"


@pytest.mark.parametrize(
    ("variables", "primary"),
    [
        ({"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}, "a"),
        ({"BOOT_ORDER": "B A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}, "b"),
        ({"BOOT_ORDER": "A B", "BOOT_A_LEFT": "0", "BOOT_B_LEFT": "2"}, "b"),
        ({"BOOT_ORDER": "B A", "BOOT_B_LEFT": "3", "FLEET_TRIAL": "B", "BOOT_A_LEFT": "1"}, "a"),
        ({"BOOT_ORDER": "B", "BOOT_B_LEFT": "3", "FLEET_TRIAL": "B"}, None),
        ({"BOOT_ORDER": "", "BOOT_A_LEFT": "3"}, None),
        ({"BOOT_ORDER": "C a A", "BOOT_A_LEFT": "7"}, "a"),
        ({"BOOT_ORDER": "A B", "BOOT_A_LEFT": "x", "BOOT_B_LEFT": "10"}, None),
        ({"BOOT_A_LEFT": "3"}, None),
    ],
)
def test_primary(tmp_path: Path, variables: dict[str, str], primary: str | None) -> None:
    """What GRUB's script makes of the variables (primary_in); the backend answers the same
    for a block our writers could have left, and calls any other block damaged: it would
    boot the safe-mode slot for ever, which only a repair from the state store ends."""
    assert grub.primary_in(variables) == primary
    path = tmp_path / "grubenv"
    grubenv.write(path, EnvBlock.new().update(dict(variables)))
    backend = GrubBackend(path, tmp_path / "cmdline")
    if set(variables) >= {"BOOT_ORDER", "BOOT_A_LEFT", "BOOT_B_LEFT"} and not (
        {"C", "a"} & set(variables["BOOT_ORDER"].split()) or variables["BOOT_A_LEFT"] == "x"
    ):
        assert backend.primary() == primary
    else:
        with pytest.raises(BootStateCorruptError, match=f"^grub backend: {path}"):
            backend.primary()


@pytest.mark.parametrize(("value", "left"), [("7", 7), ("0", 0), ("", 0), ("10", 0), ("-1", 0)])
def test_attempts_left_is_zero_for_anything_but_one_digit(
    device: Device, value: str, left: int
) -> None:
    """GRUB's script counts anything but one digit as 0; to the backend it is damage."""
    variables = {**device.variables(), "BOOT_B_LEFT": value}
    assert grub.attempts_in(variables, "b") == left
    device.set_variables({"BOOT_B_LEFT": value})
    if len(value) == 1:
        assert device.backend.attempts_left("b") == left
    else:
        with pytest.raises(
            BootStateCorruptError, match=f"BOOT_B_LEFT={value!r} is not a count of 0 to 9$"
        ):
            device.backend.attempts_left("b")


@pytest.mark.parametrize(
    ("variables", "problem"),
    [
        ({"BOOT_ORDER": "C D"}, "BOOT_ORDER='C D' is no boot order (each of A B at most once)"),
        ({"BOOT_ORDER": "A A"}, "BOOT_ORDER='A A' is no boot order"),
        ({"BOOT_ORDER": "a b"}, "BOOT_ORDER='a b' is no boot order"),
        ({"BOOT_A_LEFT": "9999"}, "BOOT_A_LEFT='9999' is not a count of 0 to 9"),
        ({"BOOT_B_LEFT": "-1"}, "BOOT_B_LEFT='-1' is not a count of 0 to 9"),
        ({"FLEET_TRIAL": "SAFE"}, "FLEET_TRIAL='SAFE' names no root slot"),
        ({"BOOT_ORDER": None}, "lacks BOOT_ORDER"),
        ({"BOOT_A_LEFT": None, "BOOT_B_LEFT": None}, "lacks BOOT_A_LEFT, BOOT_B_LEFT"),
    ],
)
def test_a_block_that_parses_but_is_no_boot_state_of_ours_is_damage(
    device: Device, variables: dict[str, str | None], problem: str
) -> None:
    write_cmdline(device, "fleet.slot=a")
    device.set_variables(variables)
    for read in (device.backend.primary, device.backend.is_trial):
        with pytest.raises(BootStateCorruptError, match=re.escape(problem)):
            read()
    with pytest.raises(BootStateCorruptError):
        device.backend.try_once("b")  # nothing is written over it either
    device.backend.repair("a")
    assert device.backend.primary() == "a"


def test_a_block_without_any_boot_variable_is_missing_boot_state(device: Device) -> None:
    grubenv.write(device.grubenv, EnvBlock.new().update({"saved_entry": "x"}))
    with pytest.raises(BootStateMissingError, match="holds none of the boot variables$"):
        device.backend.primary()


def test_is_trial_only_for_the_booted_slot(device: Device) -> None:
    device.set_variables({"FLEET_TRIAL": "B"})
    write_cmdline(device, "fleet.slot=b")
    assert device.backend.is_trial()
    write_cmdline(device, "fleet.slot=a")
    assert not device.backend.is_trial()
    write_cmdline(device, "fleet.slot=safe")
    assert not device.backend.is_trial()


@pytest.mark.parametrize("slot", ["safe", "c", "A", ""])
@pytest.mark.parametrize("method", ["try_once", "commit", "mark_bad", "attempts_left", "repair"])
def test_unknown_slots_are_refused(device: Device, method: str, slot: str) -> None:
    before = device.grubenv.read_bytes()
    with pytest.raises(UnknownSlotError, match=f"^grub backend: unknown slot {slot!r}"):
        getattr(device.backend, method)(slot)
    assert device.grubenv.read_bytes() == before


def test_writes_keep_foreign_variables_in_place(device: Device) -> None:
    device.grubenv.write_bytes(
        EnvBlock.new()
        .update({"saved_entry": "x", "BOOT_ORDER": "A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "0"})
        .encode()
    )
    device.backend.try_once("b")
    lines = grubenv.read(device.grubenv).lines
    assert [getattr(line, "name", None) for line in lines] == [
        None,
        "saved_entry",
        "BOOT_ORDER",
        "BOOT_A_LEFT",
        "BOOT_B_LEFT",
        "FLEET_TRIAL",
    ]


# Damaged and full blocks.

DAMAGED = [
    b"",
    b"\0" * 1024,
    grubenv.SIGNATURE + b"BOOT_ORDER=A B\n" + b"#" * 10,
    default_block().encode()[:-1] + b"x",
    default_block().encode().replace(b"BOOT_A_LEFT=3\n", b"BOOT_A_LEFT=3\0"),
]


@pytest.mark.parametrize("data", DAMAGED)
def test_a_damaged_grubenv_is_reported_and_never_overwritten(device: Device, data: bytes) -> None:
    device.grubenv.write_bytes(data)
    write_cmdline(device, "fleet.slot=a")
    for question in (
        device.backend.primary,
        device.backend.is_trial,
        lambda: device.backend.attempts_left("a"),
        lambda: device.backend.try_once("b"),
        lambda: device.backend.commit("a"),
        lambda: device.backend.mark_bad("b"),
    ):
        with pytest.raises(BootStateCorruptError, match=f"^grub backend: {device.grubenv}: "):
            question()
        assert device.grubenv.read_bytes() == data
    device.backend.repair("b")
    assert device.backend.primary() == "b"
    assert device.variables() == {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "0", "BOOT_B_LEFT": "3"}


def test_a_full_grubenv_refuses_the_write_and_keeps_the_file(device: Device) -> None:
    room = 1024 - len(device.grubenv.read_bytes().rstrip(b"#")) - len("junk=\n")
    device.set_variables({"junk": "j" * room})
    before = device.grubenv.read_bytes()
    with pytest.raises(GrubenvFullError, match=r"^grub backend: .*grubenv full: \d+ bytes needed"):
        device.backend.try_once("b")
    assert device.grubenv.read_bytes() == before
    assert device.backend.primary() == "a"


def test_an_unwritable_grubenv_is_one_clear_error(tmp_path: Path) -> None:
    backend = GrubBackend(tmp_path / "missing-dir" / "grubenv", tmp_path / "cmdline")
    with pytest.raises(BootloaderError, match=r"^grub backend: cannot write .*: No such file"):
        backend.repair("a")


SLOT_METHODS = ("try_once", "commit", "mark_bad", "attempts_left")
QUESTIONS = ("primary", "is_trial")
DEFAULT = default_block().encode()


def one_byte_changed(offset: int, byte: int) -> bytes:
    return DEFAULT[:offset] + bytes([byte]) + DEFAULT[offset + 1 :]


@settings(max_examples=60, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=1100),
        st.builds(one_byte_changed, st.integers(0, 1023), st.integers(0, 255)),
    ),
    operations=st.lists(
        st.tuples(st.sampled_from(SLOT_METHODS + QUESTIONS), st.sampled_from("ab")),
        min_size=1,
        max_size=4,
    ),
)
def test_any_grubenv_gives_an_answer_or_a_bootloader_error(
    data: bytes, operations: list[tuple[str, str]]
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "grubenv"
        path.write_bytes(data)
        (Path(directory) / "cmdline").write_text("fleet.slot=a\n")
        backend = GrubBackend(path, Path(directory) / "cmdline")
        for name, slot in operations:
            before = path.read_bytes()
            method = getattr(backend, name)
            arguments = (slot,) if name in SLOT_METHODS else ()
            try:
                method(*arguments)
            except BootloaderError:
                assert path.read_bytes() == before
            else:
                grubenv.read(path)  # whatever we wrote or accepted parses


# ---------------------------------------------------------------------------------------------
# The generated grub.cfg.


def test_grub_cfg_boots_each_slot_with_its_name_on_the_command_line() -> None:
    text = grub_cfg()
    assert 'load_env --file "$fleet_env" BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT' in text
    assert "linux (hd0,gpt2)/vmlinuz root=PARTLABEL=root_a ro fleet.slot=a" in text
    assert "linux (hd0,gpt4)/vmlinuz root=PARTLABEL=root_safe ro fleet.slot=safe" in text
    assert '\n        if [ "$BOOT_B_LEFT" = "9" ]; then\n          set BOOT_B_LEFT=8\n' in text
    assert 'elif [ "$BOOT_B_LEFT" = "1" ]; then\n          set BOOT_B_LEFT=0' in text
    assert "set fallback=2" in text  # GRUB takes fallback entries by number only
    parse_script(text)


def test_grub_cfg_takes_entries() -> None:
    entries = dict(DEFAULT_ENTRIES)
    entries["a"] = SlotEntry("(hd1,gpt5)/boot/vmlinuz-6.1", "", "PARTUUID=1234-5", "ro quiet")
    text = grub_cfg(entries, env_file="(hd1,gpt1)/grubenv")
    assert "linux (hd1,gpt5)/boot/vmlinuz-6.1 root=PARTUUID=1234-5 ro quiet fleet.slot=a\n}" in text
    assert 'set fleet_env="(hd1,gpt1)/grubenv"' in text


@pytest.mark.parametrize(
    "entry",
    [
        SlotEntry("(hd0,gpt2)/vmlinuz; reboot", "", "x"),
        SlotEntry("/vmlinuz", "/initrd$x", "x"),
        SlotEntry("/vmlinuz", "", 'x"'),
        SlotEntry("/vmlinuz", "", "x", "ro  quiet"),
        SlotEntry("/vmlinuz", "", "x", "a\nb"),
        SlotEntry("/vmlinuz", "", "x", "{"),
    ],
)
def test_grub_cfg_refuses_fields_grub_would_interpret(entry: SlotEntry) -> None:
    with pytest.raises(BootloaderError, match="^grub backend: .* may hold only"):
        grub_cfg({**DEFAULT_ENTRIES, "b": entry})


def test_grub_cfg_needs_every_slot() -> None:
    with pytest.raises(BootloaderError, match="needs exactly the entries a, b, safe"):
        grub_cfg({"a": DEFAULT_ENTRIES["a"], "b": DEFAULT_ENTRIES["b"]})
    with pytest.raises(BootloaderError, match="env_file"):
        grub_cfg(env_file='/x"; reboot')


def test_install_files_keeps_an_existing_grubenv(tmp_path: Path) -> None:
    cfg, env = install_files(tmp_path)
    assert cfg == tmp_path / "EFI" / "fleet" / "grub.cfg"
    assert cfg.read_text() == grub_cfg()
    assert env.read_bytes() == default_block("a").encode()
    GrubBackend(env, tmp_path / "cmdline").commit("b")
    state = env.read_bytes()
    install_files(tmp_path, primary="a")
    assert env.read_bytes() == state


# ---------------------------------------------------------------------------------------------
# The interpreter.


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("if [ a = a ]; then\nfi\n", "empty 'if'"),
        ("if [ a = a ]; then set x=1\n", "unexpected end"),
        ("for x in a b; set x=1; done\n", "expected 'do'"),
        ("echo hi | cat\n", "outside the subset"),
        ('set x="open\n', "unterminated double quote"),
        ("fi\n", "unexpected 'fi'"),
        ("set x={\n", "'{' outside a menuentry"),
        ("menuentry x {\n", "end of file"),
        ("}\n", "unexpected '}'"),
    ],
)
def test_the_interpreter_rejects_what_it_cannot_run(script: str, message: str) -> None:
    with pytest.raises(GrubModelError, match=message):
        parse_script(script)


def run_script(tmp_path: Path, script: str) -> BootOutcome:
    (tmp_path / "EFI" / "fleet").mkdir(parents=True, exist_ok=True)
    (tmp_path / "EFI" / "fleet" / "grub.cfg").write_text(script)
    return GrubModel(tmp_path).boot(REBOOT)


def test_the_interpreter_expands_quotes_and_splits_unquoted_variables(tmp_path: Path) -> None:
    script = r"""
set list="x  y"
set n=0
for w in $list 'q r' "$list"z; do
  if [ "$n" = "0" ]; then set w0="$w"; set n=1
  elif [ "$n" = "1" ]; then set w1="$w"; set n=2
  elif [ "$n" = "2" ]; then set w2="$w"; set n=3
  else set w3="$w"
  fi
done
set default=e  # a comment
menuentry "e" {
  linux /k fleet.slot=a "$w0|$w1|$w2|$w3" \$x '$y' ${config_directory}
}
"""
    outcome = run_script(tmp_path, script)
    assert outcome.linux_view["proc/cmdline"] == (
        b"BOOT_IMAGE=/k fleet.slot=a x|y|q r|x  yz $x $y (hd0,gpt1)/EFI/fleet\n"
    )


def test_the_interpreter_refuses_unknown_commands(tmp_path: Path) -> None:
    with pytest.raises(GrubModelError, match="command 'insmod' is outside the subset"):
        run_script(tmp_path, "insmod loadenv\n")


def test_no_bootable_entry_stops_at_the_menu(tmp_path: Path) -> None:
    with pytest.raises(GrubModelError, match="no menu entry booted"):
        run_script(tmp_path, "set default=missing\n")
    with pytest.raises(GrubModelError, match="cannot read"):
        GrubModel(tmp_path / "nothing").boot(REBOOT)


FALLBACK_MENU = """
set default=first
menuentry "broken" --id first {
  linux /missing fleet.slot=a
}
menuentry "second" --id second {
  linux /k fleet.slot=b
}
menuentry "third" --id third {
  linux /k fleet.slot=safe
}
"""


@pytest.mark.parametrize(
    ("fallback", "slot"),
    [
        ("1", "b"),
        ("2 1", "safe"),
        ("7 2", "safe"),
        ("second", None),
        ("1x", "b"),
        ("x 1", None),
        ("", None),
    ],
)
def test_fallback_names_entries_by_number_only(
    tmp_path: Path, fallback: str, slot: str | None
) -> None:
    """GRUB 2.06 (normal/menu.c) reads `fallback` as numbers, unlike `default`: an id or a
    title there ends the list, and GRUB stops at its menu (seen under QEMU)."""
    (tmp_path / "EFI" / "fleet").mkdir(parents=True)
    (tmp_path / "EFI" / "fleet" / "grub.cfg").write_text(
        f"set fallback='{fallback}'\n" + FALLBACK_MENU
    )
    model = GrubModel(tmp_path, kernel_present=lambda file: file != "/missing")
    if slot is None:
        with pytest.raises(GrubModelError, match="no menu entry booted"):
            model.boot(REBOOT)
    else:
        assert model.boot(REBOOT).slot == slot


def test_a_default_that_names_no_entry_boots_entry_0(tmp_path: Path) -> None:
    script = 'set default=nowhere\nmenuentry "zero" { linux /k fleet.slot=b\n}\n'
    assert run_script(tmp_path, script).slot == "b"


# ---------------------------------------------------------------------------------------------
# GRUB and the backend together: the scenarios of an update.


def left(device: Device) -> tuple[int, int]:
    return device.backend.attempts_left("a"), device.backend.attempts_left("b")


def test_first_boot_takes_an_attempt_and_commit_gives_it_back(device: Device) -> None:
    outcome = device.boot(POWER_ON)
    assert (outcome.slot, outcome.trial) == ("a", False)
    assert outcome.linux_view["proc/cmdline"].startswith(b"BOOT_IMAGE=(hd0,gpt2)/vmlinuz ")
    assert left(device) == (2, 0)
    device.backend.commit("a")
    assert left(device) == (3, 0)


def test_update_healthy_commits_the_new_slot(device: Device) -> None:
    device.boot()
    device.backend.commit("a")
    device.backend.try_once("b")
    assert device.backend.primary() == "a"
    outcome = device.boot()
    assert (outcome.slot, outcome.trial) == ("b", True)
    device.backend.commit("b")
    assert device.backend.primary() == "b"
    assert not device.backend.is_trial()
    outcome = device.boot()
    assert (outcome.slot, outcome.trial) == ("b", False)


def test_update_unhealthy_mark_bad_returns_to_the_old_slot(device: Device) -> None:
    device.boot()
    device.backend.commit("a")
    device.backend.try_once("b")
    assert device.boot().trial
    device.backend.mark_bad("b")
    assert device.backend.primary() == "a"
    outcome = device.boot(BootEvent(BootCause.REBOOT, device.backend.reboot_command()))
    assert (outcome.slot, outcome.trial) == ("a", False)
    device.backend.commit("a")
    assert device.variables() == {"BOOT_ORDER": "A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "0"}


@pytest.mark.parametrize("event", [RESET, POWER_ON, REBOOT])
def test_a_hanging_trial_falls_back_by_itself(device: Device, event: BootEvent) -> None:
    device.boot()
    device.backend.commit("a")
    device.backend.try_once("b")
    for expected_left in (2, 1, 0):  # Linux never gets to act
        outcome = device.boot(event)
        assert (outcome.slot, outcome.trial) == ("b", True)
        assert device.backend.attempts_left("b") == expected_left
    outcome = device.boot(event)
    assert (outcome.slot, outcome.trial) == ("a", False)
    assert device.backend.primary() == "a"
    device.backend.commit("a")  # the fallback boot is healthy: the trial mark goes
    assert "FLEET_TRIAL" not in device.variables()


def test_power_on_during_a_trial_continues_the_trial(device: Device) -> None:
    device.boot()
    device.backend.commit("a")
    device.backend.try_once("b")
    assert device.boot(REBOOT).trial
    outcome = device.boot(POWER_ON)  # power cut while the trial ran, before any commit
    assert (outcome.slot, outcome.trial) == ("b", True)
    device.backend.commit("b")
    assert (device.boot(POWER_ON).slot, device.backend.primary()) == ("b", "b")


def test_both_root_slots_bad_boots_safe_mode(device: Device) -> None:
    device.boot()
    device.backend.mark_bad("b")
    device.backend.mark_bad("a")
    assert device.backend.primary() is None
    outcome = device.boot()
    assert (outcome.slot, outcome.trial) == ("safe", False)
    assert b"root=PARTLABEL=root_safe" in outcome.linux_view["proc/cmdline"]
    assert device.backend.booted() == "safe"


def test_both_root_slots_exhausted_boots_safe_mode(device: Device) -> None:
    device.boot()
    device.backend.commit("a")
    device.backend.try_once("b")
    slots = [device.boot(RESET).slot for _ in range(7)]
    assert slots == ["b", "b", "b", "a", "a", "a", "safe"]


def test_a_committed_slot_that_stops_booting_falls_back(device: Device) -> None:
    device.boot()
    device.backend.commit("a")
    device.backend.try_once("b")
    device.boot()
    device.backend.commit("b")  # b is the new release, a the previous one
    for _ in range(3):
        assert device.boot(RESET).slot == "b"  # b's kernel panics: no commit any more
    outcome = device.boot(RESET)
    assert (outcome.slot, outcome.trial) == ("a", False)
    assert device.backend.primary() == "a"


def test_a_damaged_grubenv_boots_safe_mode_until_repaired(device: Device) -> None:
    device.grubenv.write_bytes(b"\0" * 1024)
    assert device.boot().slot == "safe"
    with pytest.raises(BootStateCorruptError):
        device.backend.commit("a")
    device.backend.repair("a")
    assert device.boot().slot == "a"


def test_a_missing_grubenv_boots_safe_mode_until_repaired(device: Device) -> None:
    device.grubenv.unlink()
    assert device.boot().slot == "safe"
    with pytest.raises(BootStateMissingError):
        device.backend.primary()  # nothing made up on a read
    assert device.boot().slot == "safe"
    device.backend.repair("a")
    assert device.boot().slot == "a"


def test_a_kernel_that_does_not_load_falls_back_to_safe_mode(tmp_path: Path) -> None:
    device = Device(tmp_path, kernel_present=lambda file: not file.startswith("(hd0,gpt2)"))
    outcome = device.boot()
    assert outcome.slot == "safe"
    assert device.backend.attempts_left("a") == 2  # the attempt was spent all the same


def test_no_kernel_at_all_stops_at_the_menu(tmp_path: Path) -> None:
    device = Device(tmp_path, kernel_present=lambda file: False)
    with pytest.raises(GrubModelError, match="no menu entry booted"):
        device.firmware.boot(REBOOT)


def test_a_count_grub_cannot_save_is_not_booted(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_disk(path: object, data: bytes) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable, "rewrite_in_place", failing_disk)
    assert device.boot().slot == "safe"
    assert device.backend.attempts_left("a") == 3


def test_grub_writes_the_block_in_place(device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[tuple[object, int]] = []

    def spy(path: Path, data: bytes) -> None:
        writes.append((path, len(data)))
        rewrite_in_place(path, data)

    monkeypatch.setattr(durable, "rewrite_in_place", spy)
    inode = device.grubenv.stat().st_ino
    before = device.grubenv.read_bytes()
    device.boot()
    after = device.grubenv.read_bytes()
    assert writes == [(device.grubenv, 1024)]
    assert device.grubenv.stat().st_ino == inode
    assert [i for i in range(1024) if before[i] != after[i]] == [after.index(b"BOOT_A_LEFT=") + 12]


@pytest.mark.parametrize("attempts", [1, 9])
def test_every_count_from_the_configured_attempts_down(tmp_path: Path, attempts: int) -> None:
    device = Device(tmp_path, attempts=attempts)
    device.backend.commit("a")
    device.backend.try_once("b")
    slots = [device.boot(RESET).slot for _ in range(attempts + 1)]
    assert slots == ["b"] * attempts + ["a"]


# ---------------------------------------------------------------------------------------------
# The script against the scheme, stated here on its own.


def scheme_boot(variables: dict[str, str]) -> tuple[str, dict[str, str]]:
    """What the grub backend's docstring says GRUB does: the slot, and the variables after."""
    for letter in variables.get("BOOT_ORDER", "").split(" "):
        count = variables.get(f"BOOT_{letter}_LEFT", "")
        if letter in ("A", "B") and count in list("123456789"):
            return letter.lower(), {**variables, f"BOOT_{letter}_LEFT": str(int(count) - 1)}
    return "safe", variables


counts = st.one_of(st.none(), st.sampled_from(["0", "1", "2", "3", "9", "10", "x", "", " 3"]))


@settings(max_examples=150, deadline=None)
@given(
    order=st.lists(st.sampled_from(["A", "B", "C", "a", "AB"]), max_size=3),
    count_a=counts,
    count_b=counts,
    trial=st.sampled_from([None, "A", "B", "x"]),
)
def test_the_script_implements_the_scheme(
    order: list[str], count_a: str | None, count_b: str | None, trial: str | None
) -> None:
    variables = {
        name: value
        for name, value in {
            "BOOT_ORDER": " ".join(order),
            "BOOT_A_LEFT": count_a,
            "BOOT_B_LEFT": count_b,
            "FLEET_TRIAL": trial,
        }.items()
        if value is not None
    }
    with tempfile.TemporaryDirectory() as directory:
        device = Device(Path(directory))
        grubenv.write(device.grubenv, EnvBlock.new().update(dict(variables)))
        outcome = device.firmware.boot(RESET)
        slot, after = scheme_boot(variables)
        assert outcome.slot == slot
        assert outcome.trial == (slot != "safe" and trial == slot.upper())
        assert device.variables() == after


operations = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["try_once", "commit", "mark_bad"]), st.sampled_from("ab")),
        st.tuples(st.just("boot"), st.sampled_from([REBOOT, RESET, POWER_ON])),
    ),
    max_size=14,
)


@settings(max_examples=60, deadline=None)
@given(operations)
def test_backend_and_firmware_agree_through_any_sequence(
    steps: list[tuple[str, Any]],
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        device = Device(Path(directory))
        device.boot()
        for name, argument in steps:
            if name != "boot":
                getattr(device.backend, name)(argument)
                continue
            variables = device.variables()
            expected, _ = scheme_boot(variables)
            if "FLEET_TRIAL" not in variables:
                # With no trial pending, GRUB boots what the backend calls primary.
                assert expected == (device.backend.primary() or "safe")
            outcome = device.boot(argument)
            assert outcome.slot == expected
            assert outcome.trial == (variables.get("FLEET_TRIAL") == expected.upper())
