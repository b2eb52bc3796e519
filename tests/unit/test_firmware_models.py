"""The firmware models read and write the boot state on disk with their own code.

A model checks that what the backends write leaves a bootable device; if it decoded the state
with the backend's own codec, a mistake in that codec would be read back the way it was
written and go unseen. So the models import nothing of the code they check, and the bytes here
are written out by hand from the firmware's format, never produced by ``grubenv`` or
``ubootenv``.
"""

from __future__ import annotations

import ast
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootloader_hooks import grub_model, tryboot_model, uboot_model
from bootloader_hooks.base import BootCause, BootEvent
from bootloader_hooks.errors import BootloaderError
from bootloader_hooks.grub_model import (
    GrubModel,
    envblk_delete,
    envblk_iterate,
    envblk_open,
    envblk_set,
)
from bootloader_hooks.grub_script import grub_cfg
from bootloader_hooks.uboot_model import OUR_ALTBOOTCMD, UBootModel, hexport, himport

REBOOT = BootEvent(BootCause.REBOOT, ("reboot",))

# ---------------------------------------------------------------------------------------------
# What the models may import.

MODELS = [grub_model, uboot_model, tryboot_model]
# Of the project's own packages, only these: the shared vocabulary, the errors, durable writes.
ALLOWED_FIRST_PARTY = {"bootloader_hooks.base", "bootloader_hooks.errors", "fleet_core.durable"}
PROJECT = Path(grub_model.__file__).resolve().parents[1]


def imported_modules(source: str, package: str) -> set[str]:
    """Every module a source file imports, relative imports resolved against ``package``;
    ``from pkg import name`` counts as ``pkg.name`` too (it may be a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            found.add("<importlib.import_module>")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            found.add("<__import__>")
    return found


def first_party(module: str) -> bool:
    top = module.split(".")[0]
    return module.startswith("<") or (PROJECT / top).is_dir() or (PROJECT / f"{top}.py").exists()


@pytest.mark.parametrize("model", MODELS, ids=lambda module: module.__name__)
def test_a_model_imports_none_of_the_code_it_checks(model: object) -> None:
    path = Path(str(getattr(model, "__file__", "")))
    modules = imported_modules(path.read_text(), "bootloader_hooks")
    own = {module for module in modules if first_party(module)}
    # "from bootloader_hooks.base import X" also yields "bootloader_hooks.base.X": allowed.
    outside = {
        module
        for module in own
        if module not in ("bootloader_hooks", "fleet_core")
        and not any(module == ok or module.startswith(f"{ok}.") for ok in ALLOWED_FIRST_PARTY)
    }
    assert outside == set(), f"{path.name} imports {sorted(outside)}"


def test_the_import_check_sees_the_ways_of_importing() -> None:
    source = (
        "import bootloader_hooks.grubenv\n"
        "from bootloader_hooks import ubootenv\n"
        "from . import grub\n"
        "from .autoboot import X\n"
        "import importlib; importlib.import_module('bootloader_hooks.tryboot')\n"
    )
    modules = imported_modules(source, "bootloader_hooks")
    assert {
        "bootloader_hooks.grubenv",
        "bootloader_hooks.ubootenv",
        "bootloader_hooks.grub",
        "bootloader_hooks.autoboot",
        "<importlib.import_module>",
    } <= modules
    assert all(first_party(module) for module in modules - {"importlib"})


# ---------------------------------------------------------------------------------------------
# GRUB: the environment block written out by hand.

SIGNATURE = b"# GRUB Environment Block\n"


def block(body: bytes, size: int = 1024) -> bytes:
    """A block: the signature, ``body`` (complete lines), ``#`` up to ``size``."""
    data = SIGNATURE + body
    return data + b"#" * (size - len(data))


class Esp:
    """Our grub.cfg and a hand-written grubenv on an ESP, booted by the GRUB model."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "esp"
        (self.dir / "EFI" / "fleet").mkdir(parents=True)
        (self.dir / "EFI" / "fleet" / "grub.cfg").write_text(grub_cfg())
        self.grubenv = self.dir / "EFI" / "fleet" / "grubenv"
        self.model = GrubModel(self.dir)

    def boot(self) -> tuple[str, bool]:
        outcome = self.model.boot(REBOOT)
        return outcome.slot, outcome.trial


def test_grub_reads_hand_written_lines_and_writes_the_count_in_place(tmp_path: Path) -> None:
    esp = Esp(tmp_path)
    before = block(
        b"# a comment line\n"
        b"saved_entry=C:\\\\dir\\\\\n"  # C:\dir\ : each backslash written with one before it
        b"BOOT_ORDER=B A\n"
        b"note=two\\\nlines\n"  # a newline in a value, escaped
        b"BOOT_A_LEFT=3\n"
        b"BOOT_B_LEFT=3\n"
        b"FLEET_TRIAL=B\n"
    )
    esp.grubenv.write_bytes(before)
    assert esp.boot() == ("b", True)
    after = esp.grubenv.read_bytes()
    assert after == before.replace(b"BOOT_B_LEFT=3\n", b"BOOT_B_LEFT=2\n")
    assert envblk_iterate(envblk_open(after) or bytearray()) == [
        ("saved_entry", "C:\\dir\\"),
        ("BOOT_ORDER", "B A"),
        ("note", "two\nlines"),
        ("BOOT_A_LEFT", "3"),
        ("BOOT_B_LEFT", "2"),
        ("FLEET_TRIAL", "B"),
    ]


def test_a_count_grub_adds_goes_after_the_last_line(tmp_path: Path) -> None:
    esp = Esp(tmp_path)
    # No BOOT_A_LEFT on disk: the script's default 0 is not saved; BOOT_B_LEFT is changed.
    before = block(b"BOOT_B_LEFT=1\nBOOT_ORDER=A B\n")
    esp.grubenv.write_bytes(before)
    assert esp.boot() == ("b", False)
    assert esp.grubenv.read_bytes() == block(b"BOOT_B_LEFT=0\nBOOT_ORDER=A B\n")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        SIGNATURE,  # GRUB wants more than the signature (sizeof counts the NUL)
        block(b"BOOT_ORDER=A\nBOOT_A_LEFT=3\n").replace(b"Block", b"block"),
        b"\0" * 1024,
        b"\xff" * 1024,
    ],
    ids=["empty", "signature-only", "header-case", "zeros", "erased"],
)
def test_a_block_without_its_header_loads_nothing(tmp_path: Path, data: bytes) -> None:
    esp = Esp(tmp_path)
    esp.grubenv.write_bytes(data)
    assert envblk_open(data) is None
    assert esp.boot() == ("safe", False)
    assert esp.grubenv.read_bytes() == data  # save_env cannot open it either


def test_grub_keeps_the_lines_before_a_broken_one(tmp_path: Path) -> None:
    """grub_envblk_iterate stops at the first line with no '=' or no end, keeping what came
    before (the integration tests check this against grub-editenv, which runs that code)."""
    esp = Esp(tmp_path)
    data = block(b"BOOT_ORDER=A B\nBOOT_A_LEFT=3\ndamaged line\nBOOT_B_LEFT=3\n")
    assert envblk_iterate(envblk_open(data) or bytearray()) == [
        ("BOOT_ORDER", "A B"),
        ("BOOT_A_LEFT", "3"),
        ("damaged line\nBOOT_B_LEFT", "3"),  # the name runs to the first '='
    ]
    cut = SIGNATURE + b"BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3"  # no end, no padding
    assert envblk_iterate(envblk_open(cut) or bytearray()) == [
        ("BOOT_ORDER", "A B"),
        ("BOOT_A_LEFT", "3"),
    ]
    esp.grubenv.write_bytes(cut)
    assert esp.boot() == ("safe", False)  # save_env refuses: the end is not a newline + '#'
    assert esp.grubenv.read_bytes() == cut


def test_a_line_without_an_equals_sign_ends_the_reading() -> None:
    data = block(b"A=1\nno equals sign here\n")  # none up to the end of the block
    assert envblk_iterate(envblk_open(data) or bytearray()) == [("A", "1")]


def test_grub_reads_a_block_of_any_size(tmp_path: Path) -> None:
    esp = Esp(tmp_path)
    for size in (64, 4096):
        data = block(b"BOOT_ORDER=A\nBOOT_A_LEFT=2\n", size)
        esp.grubenv.write_bytes(data)
        assert esp.boot() == ("a", False)
        assert esp.grubenv.read_bytes() == block(b"BOOT_ORDER=A\nBOOT_A_LEFT=1\n", size)


def test_names_and_values_end_at_a_nul_as_c_strings_do() -> None:
    data = block(b"A\0x=1\0y\nB=2\n")
    assert envblk_iterate(envblk_open(data) or bytearray()) == [("A", "1"), ("B", "2")]


def test_a_change_that_does_not_fit_writes_nothing_and_the_slot_is_not_booted(
    tmp_path: Path,
) -> None:
    esp = Esp(tmp_path)
    # BOOT_A_LEFT=1 becomes 0: same length, fits. Make the block exactly full and the count
    # need one more byte: a new variable line that cannot be appended.
    body = b"BOOT_ORDER=A\nBOOT_A_LEFT=1\n"
    filler = b"x=" + b"y" * (1024 - len(SIGNATURE) - len(body) - 3) + b"\n"
    full = SIGNATURE + filler + body
    assert len(full) == 1024
    buf = bytearray(full)
    assert not envblk_set(buf, "BOOT_B_LEFT", "0")
    assert buf == full
    assert envblk_set(buf, "BOOT_A_LEFT", "0")  # same length: fits
    assert not envblk_set(buf, "BOOT_A_LEFT", "10")  # one more byte: no room
    esp.grubenv.write_bytes(SIGNATURE + b"BOOT_ORDER=A\nBOOT_A_LEFT=1\n" + filler[:-2] + b"\n#")
    assert esp.boot() == ("a", False)  # one '#' of room: "1" -> "0" still fits


def test_set_and_delete_move_the_rest_and_keep_the_size() -> None:
    buf = bytearray(block(b"A=1\nB=22\nC=3\n", 64))
    assert envblk_set(buf, "B", "x\\y")
    assert bytes(buf) == block(b"A=1\nB=x\\\\y\nC=3\n", 64)
    assert envblk_set(buf, "B", "")
    assert bytes(buf) == block(b"A=1\nB=\nC=3\n", 64)
    envblk_delete(buf, "A")
    assert bytes(buf) == block(b"B=\nC=3\n", 64)
    envblk_delete(buf, "nothing")
    assert bytes(buf) == block(b"B=\nC=3\n", 64)
    padding_after_text = bytearray(SIGNATURE + b"A=1\nB=2" + b"#" * 20)
    assert not envblk_set(padding_after_text, "A", "2")  # GRUB: "Broken"


def test_a_shorter_value_pads_the_freed_room_even_when_little_padding_was_left() -> None:
    buf = bytearray(SIGNATURE + b"A=1234\n#")
    assert envblk_set(buf, "A", "1")
    assert bytes(buf) == SIGNATURE + b"A=1\n####"


def test_a_new_line_is_appended_only_when_it_fits_exactly_or_better() -> None:
    exact = bytearray(SIGNATURE + b"A=1\n" + b"#" * 4)
    assert envblk_set(exact, "B", "2")
    assert bytes(exact) == SIGNATURE + b"A=1\nB=2\n"
    short = bytearray(SIGNATURE + b"A=1\n" + b"#" * 3)
    assert not envblk_set(short, "B", "2")
    assert bytes(short) == SIGNATURE + b"A=1\n###"
    grow = bytearray(SIGNATURE + b"A=1\n" + b"#" * 2)
    assert envblk_set(grow, "A", "123")  # two more bytes, two bytes of padding
    assert bytes(grow) == SIGNATURE + b"A=123\n"
    assert not envblk_set(grow, "A", "1234")


# ---------------------------------------------------------------------------------------------
# U-Boot: environment copies written out by hand.

SIZE = 0x400


@dataclass(frozen=True)
class Copy:
    """A copy's place, given the way the backend's layout gives it (read by attribute)."""

    path: Path
    offset: int = 0


@dataclass(frozen=True)
class Layout:
    size: int
    copies: tuple[Copy, ...]


def entries(variables: Mapping[str, str]) -> bytes:
    return b"".join(f"{name}={value}".encode() + b"\0" for name, value in variables.items())


def env_copy(data: bytes, flags: int | None, size: int = SIZE, *, crc: int | None = None) -> bytes:
    """One copy: CRC-32 little-endian, the flags byte if redundant, data zero padded."""
    area = data + bytes(size - 4 - (flags is not None) - len(data))
    value = zlib.crc32(area) if crc is None else crc
    return value.to_bytes(4, "little") + (bytes([flags]) if flags is not None else b"") + area


def imported(data: bytes) -> dict[str, str]:
    variables = himport(data)
    assert variables is not None, "import failed"
    return variables


def split_copy(raw: bytes, redundant: bool) -> tuple[int | None, bytes]:
    """The flags and the data area of a copy whose CRC must match."""
    header = 5 if redundant else 4
    assert int.from_bytes(raw[:4], "little") == zlib.crc32(raw[header:]), "bad CRC written"
    return (raw[4] if redundant else None), raw[header:]


class Board:
    """Two copies at offsets 0 and SIZE of one image (or one copy), booted by the model."""

    def __init__(self, tmp_path: Path, redundant: bool = True) -> None:
        self.image = tmp_path / "env.img"
        self.image.write_bytes(b"\xa5" * (2 * SIZE))
        count = 2 if redundant else 1
        self.layout = Layout(SIZE, tuple(Copy(self.image, i * SIZE) for i in range(count)))
        self.model = UBootModel(self.layout, attempts=3)

    def put(self, index: int, raw: bytes) -> None:
        data = bytearray(self.image.read_bytes())
        data[index * SIZE : (index + 1) * SIZE] = raw
        self.image.write_bytes(bytes(data))

    def raw(self, index: int) -> bytes:
        return self.image.read_bytes()[index * SIZE : (index + 1) * SIZE]

    def boot(self) -> str:
        return self.model.boot(REBOOT).slot


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


@pytest.mark.parametrize(
    ("flags0", "flags1", "chosen"),
    [(7, 8, 1), (8, 7, 0), (255, 0, 1), (0, 255, 0), (254, 255, 1), (5, 5, 0), (0, 1, 1)],
)
def test_of_two_valid_copies_the_newer_serial_wins_with_wrap_around(
    tmp_path: Path, flags0: int, flags1: int, chosen: int
) -> None:
    board = Board(tmp_path)
    board.put(0, env_copy(entries(ours("A B", "3", "3")), flags0))
    board.put(1, env_copy(entries(ours("B A", "3", "3")), flags1))
    assert board.boot() == ("a" if chosen == 0 else "b")
    # saveenv wrote the other copy, with the serial of the chosen one plus one (mod 256)
    flags, _ = split_copy(board.raw(1 - chosen), redundant=True)
    assert flags == ((flags0, flags1)[chosen] + 1) & 0xFF


@pytest.mark.parametrize("bad", [0, 1])
def test_a_copy_with_a_bad_crc_is_ignored(tmp_path: Path, bad: int) -> None:
    board = Board(tmp_path)
    good_order, bad_order = ("A B", "B A") if bad == 1 else ("B A", "A B")
    board.put(1 - bad, env_copy(entries(ours(good_order, "3", "3")), 4))
    damaged = bytearray(env_copy(entries(ours(bad_order, "3", "3")), 9))  # the newer serial
    damaged[-1] ^= 0x01  # one bit of the padding: the CRC no longer matches
    board.put(bad, bytes(damaged))
    assert board.boot() == good_order[0].lower()


def test_a_crc_in_the_wrong_byte_order_is_a_bad_crc(tmp_path: Path) -> None:
    board = Board(tmp_path, redundant=False)
    area = entries(ours("B A", "3", "3"))
    big_endian = zlib.crc32(area + bytes(SIZE - 4 - len(area))).to_bytes(4, "big")
    board.put(0, big_endian + area + bytes(SIZE - 4 - len(area)))
    # no valid copy: the default environment, our script starts afresh (A first)
    assert board.boot() == "a"
    _, data = split_copy(board.raw(0), redundant=False)
    assert imported(data) == {
        **ours("A B", "2", "3"),
        "bootcmd": uboot_model.DEFAULT_ENVIRONMENT["bootcmd"],
        "bootdelay": "0",
        "bootcount": "0",
    }


def test_with_no_valid_copy_saveenv_writes_copy_0_twice_with_serials_1_and_2(
    tmp_path: Path,
) -> None:
    board = Board(tmp_path)
    board.put(0, env_copy(entries(ours("B A", "3", "3", upgrade_available="1")), 3, crc=0))
    board.put(1, b"\0" * SIZE)  # an erased, never written copy: CRC 0 over zeros is wrong
    assert board.boot() == "a"
    flags, data = split_copy(board.raw(0), redundant=True)
    assert flags == 1  # env_flags starts at 0 with the default environment: ++ gives 1
    assert imported(data)["BOOT_A_LEFT"] == "2"
    assert board.raw(1) == b"\0" * SIZE


def test_bootcount_saveenv_then_the_script_saveenv_walk_both_copies(tmp_path: Path) -> None:
    board = Board(tmp_path)
    board.put(0, env_copy(entries(ours("B A", "3", "3", upgrade_available="1")), 41))
    board.put(1, env_copy(entries(ours("A B", "3", "3")), 40))
    assert board.boot() == "b"
    flags1, data1 = split_copy(board.raw(1), redundant=True)
    flags0, data0 = split_copy(board.raw(0), redundant=True)
    assert (flags1, flags0) == (42, 43)  # bootcount first (copy 1), then the script (copy 0)
    assert imported(data1)["bootcount"] == "1" and imported(data1)["BOOT_B_LEFT"] == "3"
    assert imported(data0)["bootcount"] == "1" and imported(data0)["BOOT_B_LEFT"] == "2"


def test_saveenv_writes_sorted_escaped_zero_padded_entries(tmp_path: Path) -> None:
    board = Board(tmp_path, redundant=False)
    # on disk C:\\x: the backslash escaped, as saveenv writes it; U-Boot holds C:\x
    board.put(0, env_copy(entries({**ours("A", "1", "0"), "path": "C:\\\\x"}), None))
    assert board.boot() == "a"
    _, data = split_copy(board.raw(0), redundant=False)
    expected = (
        b"BOOT_A_LEFT=0\0BOOT_B_LEFT=0\0BOOT_ORDER=A\0FLEET_ENV=1\0"
        + f"altbootcmd={OUR_ALTBOOTCMD}".encode()
        + b"\0bootcount=1\0bootlimit=3\0path=C:\\\\x\0upgrade_available=0\0\0"
    )
    assert data == expected + bytes(SIZE - 4 - len(expected))
    assert imported(data)["path"] == "C:\\x"


def test_import_reads_the_data_area_as_himport_r_does() -> None:
    data = (
        b"  A=1\0"  # leading blanks skipped
        b"#comment=x\0"  # a comment
        b"B=2\0B\0"  # "B" alone deletes B
        b"C=3\0C=\0"  # "C=" deletes C
        b"D=x\\\\y\\z\0"  # a backslash makes the next byte literal
        b"E=tail\\\0"  # ...but not the NUL ending the entry
        b"\0F=after the end\0"
    )
    assert himport(data + bytes(16)) == {"A": "1", "D": "x\\yz", "E": "tail\\"}
    assert himport(b"=x\0\0") is None  # an empty name fails the whole import
    assert himport(b"G=no end marker") == {"G": "no end marker"}  # the area's end ends it


def test_an_environment_that_does_not_fit_is_not_saved() -> None:
    with pytest.raises(BootloaderError, match="Env export buffer too small"):
        hexport({"A": "x" * 10}, 13)
    assert hexport({"A": "x" * 9}, 13) == b"A=" + b"x" * 9 + b"\0\0"  # the entry, the end


def test_the_model_writes_a_copy_that_is_a_whole_file_in_place_of_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "uboot.env"
    path.write_bytes(env_copy(entries(ours("B", "0", "2")), None))
    model = UBootModel(Layout(SIZE, (Copy(path),)))
    assert model.boot(REBOOT).slot == "b"
    _, data = split_copy(path.read_bytes(), redundant=False)
    assert imported(data)["BOOT_B_LEFT"] == "1"
