"""The grubenv format: exact bytes, escaping, strict parsing, and writes that fail cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bootloader_hooks import grubenv
from bootloader_hooks.errors import BootloaderError, BootStateCorruptError
from bootloader_hooks.grubenv import (
    BLOCK_SIZE,
    EDITENV_WARNING,
    SIGNATURE,
    Comment,
    EnvBlock,
    GrubenvFullError,
    Variable,
)

HEADER = SIGNATURE + EDITENV_WARNING


def block_bytes(body: bytes) -> bytes:
    return (SIGNATURE + body).ljust(BLOCK_SIZE, b"#")


names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="=\n\0"), min_size=1, max_size=12
).filter(lambda name: not name.startswith("#"))
values = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), max_size=40)


def test_new_block_is_what_grub_editenv_create_writes() -> None:
    data = EnvBlock.new().encode()
    assert data == HEADER + b"#" * (BLOCK_SIZE - len(HEADER))
    assert len(data) == BLOCK_SIZE


def test_values_are_escaped_as_grub_does() -> None:
    block = EnvBlock.new().update({"bs": "a\\b", "nl": "1\n2", "eq": "x=y", "sp": "a b", "e": ""})
    data = block.encode()
    assert data.startswith(HEADER + b"bs=a\\\\b\nnl=1\\\n2\neq=x=y\nsp=a b\ne=\n#")
    assert grubenv.parse(data).variables() == block.variables()


def test_a_backslash_makes_any_next_byte_literal() -> None:
    assert grubenv.parse(block_bytes(b"k=\\a\\#\\\\\n")).get("k") == "a#\\"


def test_set_replaces_in_place_appends_new_and_unset_closes_the_gap() -> None:
    block = EnvBlock.new().update({"A": "1", "B": "2", "C": "3"})
    block = block.set("A", "longer").unset("B").set("B", "9")
    assert block.encode().startswith(HEADER + b"A=longer\nC=3\nB=9\n#")
    assert block.unset("missing") == block


def test_update_with_none_removes() -> None:
    block = EnvBlock.new().update({"A": "1", "B": "2"}).update({"A": None, "C": "3"})
    assert block.variables() == {"B": "2", "C": "3"}


def test_comments_and_their_positions_survive_a_rewrite() -> None:
    data = block_bytes(b"x=1\n# kept\ny=2\n")
    block = grubenv.parse(data)
    assert block.lines == (Variable("x", "1"), Comment(b"# kept\n"), Variable("y", "2"))
    assert block.encode() == data
    assert block.set("x", "3").encode() == block_bytes(b"x=3\n# kept\ny=2\n")


def test_a_block_filled_to_the_last_byte_fits() -> None:
    room = BLOCK_SIZE - len(HEADER) - len(b"k=\n")
    data = EnvBlock.new().set("k", "x" * room).encode()
    assert len(data) == BLOCK_SIZE and data.endswith(b"x\n")
    assert grubenv.parse(data).get("k") == "x" * room


def test_a_full_block_names_the_file_and_the_sizes() -> None:
    room = BLOCK_SIZE - len(HEADER) - len(b"k=\n")
    block = EnvBlock.new().set("k", "x" * (room + 1))
    with pytest.raises(GrubenvFullError, match=r"^/esp/grubenv: grubenv full: 1025 bytes needed"):
        block.encode("/esp/grubenv")
    assert issubclass(GrubenvFullError, BootStateCorruptError)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (HEADER, "94 bytes, a grubenv has 1024"),
        (block_bytes(b"") + b"#", "1025 bytes"),
        (b"# GRUB Environment Blok\n".ljust(BLOCK_SIZE, b"#"), "missing the '# GRUB Environment"),
        (b"\0" * BLOCK_SIZE, "missing the"),
        (block_bytes(b"a=1\0\n"), "NUL byte at offset 28"),
        (block_bytes(b"novalue\nk=v\n"), "line at offset 25 has no '='"),
        (block_bytes(b"\nk=v\n"), "no '='"),
        ((SIGNATURE + b"k=v").ljust(BLOCK_SIZE, b"v"), "unterminated line at offset 25"),
        ((SIGNATURE + b"k=").ljust(BLOCK_SIZE - 1, b"v") + b"\\", "unterminated line"),
        (block_bytes(b"k=v\n").replace(b"#####", b"##x##", 1), "damaged padding at offset"),
        (block_bytes(b"k=v\nk=w\n"), "variable 'k' appears twice"),
    ],
)
def test_damage_raises_corrupt_naming_the_file(data: bytes, message: str) -> None:
    with pytest.raises(BootStateCorruptError, match=r"^/esp/grubenv: ") as caught:
        grubenv.parse(data, "/esp/grubenv")
    assert message in str(caught.value)


def test_comment_only_and_empty_name_blocks_parse_as_grub_reads_them() -> None:
    assert grubenv.parse(block_bytes(b"")).variables() == {}
    assert grubenv.parse(block_bytes(b"=v\n")).variables() == {"": "v"}


@pytest.mark.parametrize("name", ["", "a=b", "a\nb", "#x", "a\0"])
def test_names_grub_would_read_differently_are_refused(name: str) -> None:
    with pytest.raises(BootloaderError, match="invalid variable name"):
        EnvBlock.new().set(name, "v")


def test_nul_in_a_value_is_refused() -> None:
    with pytest.raises(BootloaderError, match="NUL"):
        EnvBlock.new().set("k", "a\0b")


def test_bytes_that_are_not_utf8_survive_a_round_trip() -> None:
    data = block_bytes(b"k=\xff\xfe caf\xc3\xa9\n")
    block = grubenv.parse(data)
    assert block.get("k") == "\udcff\udcfe café"
    assert block.encode() == data


@example({"big": "v" * 1020})  # the drawn variables never fill the block: the full branch
@given(st.dictionaries(names, values, max_size=8))
def test_round_trip(variables: dict[str, str]) -> None:
    block = EnvBlock.new().update(dict(variables))
    try:
        data = block.encode()
    except GrubenvFullError:
        return
    assert grubenv.parse(data).variables() == variables
    assert grubenv.parse(data).encode() == data


def _parses_or_is_corrupt(data: bytes) -> None:
    try:
        block = grubenv.parse(data)
    except BootStateCorruptError:
        return
    # Whatever parsed re-encodes (escapes only ever shrink) and means the same.
    again = grubenv.parse(block.encode())
    assert again.variables() == block.variables()


@given(st.binary(min_size=0, max_size=1100))
def test_random_bytes_never_raise_anything_but_corrupt(data: bytes) -> None:
    _parses_or_is_corrupt(data)


@given(st.binary(min_size=BLOCK_SIZE - len(SIGNATURE), max_size=BLOCK_SIZE - len(SIGNATURE)))
def test_random_blocks_with_a_signature_never_raise_anything_but_corrupt(body: bytes) -> None:
    _parses_or_is_corrupt(SIGNATURE + body)


VALID = (
    EnvBlock.new()
    .update({"BOOT_ORDER": "A B", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "0", "x": "a\\b\nc"})
    .encode()
)


@given(st.integers(0, BLOCK_SIZE - 1), st.integers(0, 255))
def test_any_single_byte_change_parses_or_is_corrupt(offset: int, byte: int) -> None:
    _parses_or_is_corrupt(VALID[:offset] + bytes([byte]) + VALID[offset + 1 :])


def test_read_write_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    block = EnvBlock.new().set("k", "v")
    grubenv.write(path, block)
    assert path.read_bytes() == block.encode()
    assert grubenv.read(path) == block
    assert [p.name for p in tmp_path.iterdir()] == ["grubenv"]


def test_read_reports_missing_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        grubenv.read(tmp_path / "none")
    with pytest.raises(BootloaderError, match=r"cannot read .*: Is a directory"):
        grubenv.read(tmp_path)


def test_read_names_the_file_of_a_damaged_block(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    path.write_bytes(b"garbage")
    with pytest.raises(BootStateCorruptError, match=f"^{path}: 7 bytes"):
        grubenv.read(path)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=30)
@example({"big": "v" * 1020})  # a write that cannot fit: the unchanged-file branch
@given(
    st.dictionaries(
        names,
        st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=400),
        max_size=4,
    )
)
def test_a_failed_write_leaves_the_file_unchanged(
    tmp_path: Path, variables: dict[str, str]
) -> None:
    path = tmp_path / "grubenv"
    old = EnvBlock.new().set("keep", "me")
    grubenv.write(path, old)
    before = path.read_bytes()
    try:
        grubenv.write(path, old.update(dict(variables)))
    except GrubenvFullError:
        assert path.read_bytes() == before
    else:
        assert grubenv.read(path).variables() == {"keep": "me", **variables}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grubenv"]


def test_an_io_error_while_writing_leaves_the_file_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "grubenv"
    grubenv.write(path, EnvBlock.new())
    before = path.read_bytes()

    def no_space(fd: int) -> None:
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(BootloaderError, match=f"cannot write {path}: No space left on device"):
        grubenv.write(path, EnvBlock.new().set("k", "v"))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["grubenv"]


def test_a_block_is_rewritten_in_place_and_a_missing_one_created(tmp_path: Path) -> None:
    """In place, as GRUB's save_env: on the ESP's FAT no cluster, FAT entry or directory
    entry changes (a rename would allocate and could be cut half done)."""
    path = tmp_path / "grubenv"
    grubenv.write(path, EnvBlock.new())  # none there: created whole, then renamed
    inode = path.stat().st_ino
    grubenv.write(path, EnvBlock.new().set("BOOT_ORDER", "B A"))
    assert path.stat().st_ino == inode
    assert grubenv.read(path).get("BOOT_ORDER") == "B A"
    path.write_bytes(b"short")  # another size: not a block to overwrite, a new file
    grubenv.write(path, EnvBlock.new())
    assert path.stat().st_size == 1024 and grubenv.read(path).get("BOOT_ORDER") is None
