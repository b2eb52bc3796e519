"""The U-Boot environment format: encoding, redundancy, fw_env.config, power cuts, corruption."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootloader_hooks import ubootenv
from bootloader_hooks.errors import BootloaderError, BootStateCorruptError
from bootloader_hooks.ubootenv import EnvCopy, EnvLayout, EnvState
from fleet_core import durable

SIZE = 0x400


def raw_copy(body: bytes, size: int = SIZE, serial: int | None = None, pad: int = 0) -> bytes:
    header = 4 if serial is None else 5
    data = body + bytes([pad]) * (size - header - len(body))
    flags = b"" if serial is None else bytes([serial])
    return zlib.crc32(data).to_bytes(4, "little") + flags + data


def redundant(tmp_path: Path) -> EnvLayout:
    image = tmp_path / "disk.img"
    if not image.exists():
        image.write_bytes(b"\xa5" * (4 * SIZE))  # not zeros: a torn write must show
    return EnvLayout.redundant_pair(image, SIZE, SIZE, 2 * SIZE)


def write_raw(layout: EnvLayout, index: int, block: bytes) -> None:
    copy = layout.copies[index]
    with open(copy.path, "r+b") as disk:
        disk.seek(copy.offset)
        disk.write(block)


# --- one copy ------------------------------------------------------------------------------------


def test_encoding_is_sorted_zero_padded_with_little_endian_crc() -> None:
    block = ubootenv.encode_copy({"b": "2", "a": "1", "B": "3"}, SIZE)
    body = b"B=3\0a=1\0b=2\0\0"
    assert block == raw_copy(body)
    assert block[:4] == zlib.crc32(block[4:]).to_bytes(4, "little")
    assert len(block) == SIZE


def test_redundant_copy_carries_the_serial_after_the_crc() -> None:
    block = ubootenv.encode_copy({"a": "1"}, SIZE, serial=7)
    assert block[4] == 7
    assert block == raw_copy(b"a=1\0\0", serial=7)
    assert ubootenv.decode_copy(block, redundant=True) == ({"a": "1"}, 7)


def test_empty_environment_is_just_the_end_marker() -> None:
    assert ubootenv.encode_copy({}, SIZE) == raw_copy(b"\0")
    assert ubootenv.decode_copy(raw_copy(b"\0"), redundant=False) == ({}, None)


@pytest.mark.parametrize("pad", [0x00, 0xFF, 0x41])
def test_reader_does_not_assume_the_padding_byte(pad: int) -> None:
    block = raw_copy(b"a=1\0b=x=y\0\0", pad=pad)
    assert ubootenv.decode_copy(block, redundant=False) == ({"a": "1", "b": "x=y"}, None)


def test_garbage_after_the_end_marker_is_ignored() -> None:
    block = raw_copy(b"a=1\0\0c=3\0junk\xff\x01")
    assert ubootenv.decode_copy(block, redundant=False)[0] == {"a": "1"}


def test_entries_without_equals_are_skipped_and_empty_values_unset() -> None:
    block = raw_copy(b"lonely\0a=1\0b=\0a=2\0\0")
    assert ubootenv.decode_copy(block, redundant=False)[0] == {"a": "2"}


@pytest.mark.parametrize(
    "body", [b"=value\0\0", b"a=1\0" + b"x" * (SIZE - 8)], ids=["empty-name", "no-end"]
)
def test_malformed_data_is_corruption(body: bytes) -> None:
    with pytest.raises(BootStateCorruptError):
        ubootenv.decode_copy(raw_copy(body), redundant=False)


def test_crc_mismatch_is_corruption() -> None:
    block = bytearray(raw_copy(b"a=1\0\0"))
    block[6] ^= 0x01
    with pytest.raises(BootStateCorruptError, match="CRC"):
        ubootenv.decode_copy(bytes(block), redundant=False)


def test_values_that_are_not_utf8_survive_a_round_trip() -> None:
    block = raw_copy(b"blob=\xff\xfe\x80\0\0")
    variables, _ = ubootenv.decode_copy(block, redundant=False)
    assert ubootenv.encode_copy(variables, SIZE) == block


@pytest.mark.parametrize("name", ["", "a=b", "a\0b", " a", "#a"])
def test_names_u_boot_cannot_import_are_refused(name: str) -> None:
    with pytest.raises(BootloaderError, match="invalid environment variable name"):
        ubootenv.encode_copy({name: "1"}, SIZE)


def test_text_without_a_byte_encoding_is_refused() -> None:
    with pytest.raises(BootloaderError, match="no bytes"):
        ubootenv.encode_copy({"a": "\ud800"}, SIZE)


def test_an_environment_that_does_not_fit_is_refused() -> None:
    with pytest.raises(BootloaderError, match="only"):
        ubootenv.encode_copy({"a": "x" * SIZE}, SIZE)


@pytest.mark.parametrize(
    ("serial0", "serial1", "winner"),
    [(1, 2, 1), (2, 1, 0), (5, 5, 0), (255, 0, 1), (0, 255, 0), (254, 255, 1), (0, 1, 1)],
)
def test_newer_copy_follows_the_incremental_serial(serial0: int, serial1: int, winner: int) -> None:
    assert ubootenv.newer_copy(serial0, serial1) == winner


# --- files and offsets ---------------------------------------------------------------------------


def test_single_file_round_trip(tmp_path: Path) -> None:
    layout = EnvLayout.single(tmp_path / "uboot.env", SIZE)
    written = ubootenv.write_env(layout, {"a": "1"}, None)
    assert (tmp_path / "uboot.env").read_bytes() == raw_copy(b"a=1\0\0")
    state = ubootenv.read_env(layout)
    assert state == EnvState({"a": "1"}, 0, None, ())
    assert written.variables == {"a": "1"}


def test_missing_file_is_corruption(tmp_path: Path) -> None:
    with pytest.raises(BootStateCorruptError, match="missing"):
        ubootenv.read_env(EnvLayout.single(tmp_path / "uboot.env", SIZE))


def test_short_file_is_corruption(tmp_path: Path) -> None:
    (tmp_path / "uboot.env").write_bytes(raw_copy(b"a=1\0\0")[:100])
    with pytest.raises(BootStateCorruptError, match="100 of"):
        ubootenv.read_env(EnvLayout.single(tmp_path / "uboot.env", SIZE))


def test_unreadable_device_is_not_called_corruption(tmp_path: Path) -> None:
    with pytest.raises(BootloaderError, match="cannot read") as caught:
        ubootenv.read_env(EnvLayout.single(tmp_path, SIZE))
    assert not isinstance(caught.value, BootStateCorruptError)


def test_redundant_writes_alternate_and_serials_increase(tmp_path: Path) -> None:
    layout = redundant(tmp_path)
    state = ubootenv.write_env(layout, {"n": "0"}, None)
    assert (state.active, state.serial) == (0, 1)
    for n in range(1, 5):
        state = ubootenv.write_env(layout, {"n": str(n)}, ubootenv.read_env(layout))
        assert state.active == n % 2
        assert state.serial == n + 1
        assert ubootenv.read_env(layout) == EnvState({"n": str(n)}, n % 2, n + 1)


def test_serial_wraps_from_255_to_0_and_0_wins(tmp_path: Path) -> None:
    layout = redundant(tmp_path)
    write_raw(layout, 0, raw_copy(b"n=old\0\0", serial=254))
    write_raw(layout, 1, raw_copy(b"n=new\0\0", serial=255))
    state = ubootenv.read_env(layout)
    assert (state.active, state.serial, state.variables["n"]) == (1, 255, "new")
    state = ubootenv.write_env(layout, {"n": "wrapped"}, state)
    assert (state.active, state.serial) == (0, 0)
    assert ubootenv.read_env(layout).variables == {"n": "wrapped"}


def test_one_bad_copy_is_read_around_and_repaired_by_the_next_write(tmp_path: Path) -> None:
    layout = redundant(tmp_path)
    write_raw(layout, 0, raw_copy(b"n=1\0\0", serial=3))
    write_raw(layout, 1, raw_copy(b"n=2\0\0", serial=4))
    write_raw(layout, 1, b"\xde\xad")  # the newer copy is damaged
    state = ubootenv.read_env(layout)
    assert (state.variables, state.active, state.damaged) == ({"n": "1"}, 0, True)
    assert "CRC" in state.problems[0]
    ubootenv.write_env(layout, {"n": "3"}, state)
    for index, expected in ((0, ({"n": "1"}, 3)), (1, ({"n": "3"}, 4))):
        assert ubootenv.read_copy(layout, index) == expected
    assert not ubootenv.read_env(layout).damaged


def test_both_copies_bad_is_corruption(tmp_path: Path) -> None:
    layout = redundant(tmp_path)
    with pytest.raises(BootStateCorruptError, match="no valid environment"):
        ubootenv.read_env(layout)


def test_update_env_sets_and_unsets_in_one_write(tmp_path: Path) -> None:
    layout = EnvLayout.single(tmp_path / "uboot.env", SIZE)
    ubootenv.write_env(layout, {"keep": "1", "drop": "2"}, None)
    ubootenv.update_env(layout, {"drop": None, "new": "3", "empty": ""})
    assert ubootenv.read_env(layout).variables == {"keep": "1", "new": "3"}


def test_negative_offsets_count_from_the_end(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * SIZE))
    layout = EnvLayout.redundant_pair(image, SIZE, -2 * SIZE, -SIZE)
    ubootenv.write_env(layout, {"a": "1"}, None)
    assert image.read_bytes()[2 * SIZE : 3 * SIZE] == raw_copy(b"a=1\0\0", serial=1)
    assert ubootenv.read_env(layout).variables == {"a": "1"}


def test_whole_files_are_replaced_and_offsets_written_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_atomic, real_at = durable.atomic_write, durable.write_at

    def atomic(path: Any, data: bytes, mode: int = 0o644) -> None:
        calls.append("atomic_write")
        real_atomic(path, data, mode)

    def at(path: Any, offset: int, data: bytes) -> None:
        calls.append("write_at")
        real_at(path, offset, data)

    monkeypatch.setattr(durable, "atomic_write", atomic)
    monkeypatch.setattr(durable, "write_at", at)
    ubootenv.write_env(EnvLayout.single(tmp_path / "uboot.env", SIZE), {"a": "1"}, None)
    ubootenv.write_env(EnvLayout.single(tmp_path / "uboot.env", SIZE), {"a": "2"}, None)
    layout = redundant(tmp_path)
    ubootenv.write_env(layout, {"a": "1"}, None)
    big = tmp_path / "big.img"
    big.write_bytes(bytes(2 * SIZE))
    ubootenv.write_env(EnvLayout.single(big, SIZE), {"a": "1"}, None)
    assert calls == ["atomic_write", "atomic_write", "write_at", "write_at"]


def test_write_failure_names_the_path(tmp_path: Path) -> None:
    layout = EnvLayout.single(tmp_path / "missing-dir" / "disk.img", SIZE, offset=512)
    with pytest.raises(BootloaderError, match=r"cannot write .*disk.img@0x200"):
        ubootenv.write_env(layout, {"a": "1"}, None)


# --- power cuts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 1, 4, 5, 64, SIZE // 2, SIZE - 1])
def test_a_cut_during_a_redundant_write_leaves_the_old_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int
) -> None:
    layout = redundant(tmp_path)
    ubootenv.write_env(layout, {"n": "old"}, None)
    real_at = durable.write_at

    def torn(path: Any, offset: int, data: bytes) -> None:
        real_at(path, offset, data[:cut])
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable, "write_at", torn)
    with pytest.raises(BootloaderError, match="Input/output error"):
        ubootenv.update_env(layout, {"n": "new"})
    monkeypatch.undo()
    assert ubootenv.read_env(layout).variables == {"n": "old"}
    ubootenv.update_env(layout, {"n": "new"})
    assert ubootenv.read_env(layout).variables == {"n": "new"}
    assert not ubootenv.read_env(layout).damaged


# --- fw_env.config -------------------------------------------------------------------------------


def test_fw_env_config_single_and_redundant() -> None:
    text = """# MMC: device offset size sector-size
    # indented comment

/dev/mmcblk0   0x400000   0x4000  0x200
/dev/mmcblk0 4210688 4000 # trailing words are ignored
/dev/mmcblk0 0x500000 0x4000
"""
    layout = ubootenv.parse_fw_env_config(text)
    assert layout.size == 0x4000
    assert layout.sector_size == 0x200
    assert layout.copies == (
        EnvCopy(Path("/dev/mmcblk0"), 0x400000),
        EnvCopy(Path("/dev/mmcblk0"), 4210688),
    )
    assert layout.redundant
    single = ubootenv.parse_fw_env_config("/boot/uboot.env 0 0x4000\n")
    assert single.copies == (EnvCopy(Path("/boot/uboot.env"), 0),) and not single.redundant


@pytest.mark.parametrize(
    ("token", "value"), [("0x10", 16), ("010", 8), ("10", 10), ("0", 0), ("-0x2000", -0x2000)]
)
def test_offsets_read_as_c_integers(token: str, value: int) -> None:
    layout = ubootenv.parse_fw_env_config(f"/dev/sda {token} 0x1000\n")
    assert layout.copies[0].offset == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no environment entry"),
        ("# only comments\n", "no environment entry"),
        ("/dev/sda 0x0\n", "line 1: need device"),
        ("/dev/sda zero 0x1000\n", "bad offset"),
        ("/dev/sda 0 0\n", "bad size"),
        ("/dev/sda 0 0x1000\n/dev/sda 0x1000 0x2000\n", "differ in size"),
        ("/dev/mtd0 0 0x1000\n", "MTD/UBI"),
        ("/dev/ubi0:env 0 0x1000\n", "MTD/UBI"),
    ],
)
def test_bad_fw_env_config(text: str, message: str) -> None:
    with pytest.raises(BootloaderError, match=message):
        ubootenv.parse_fw_env_config(text)


def test_fw_env_config_round_trip(tmp_path: Path) -> None:
    layout = EnvLayout.redundant_pair(tmp_path / "disk.img", 0x4000, 0x1000, -0x4000)
    path = tmp_path / "fw_env.config"
    path.write_text(ubootenv.format_fw_env_config(layout))
    assert ubootenv.read_fw_env_config(path) == layout


def test_unreadable_fw_env_config(tmp_path: Path) -> None:
    with pytest.raises(BootloaderError, match="cannot read"):
        ubootenv.read_fw_env_config(tmp_path / "nope")


def test_layout_sanity() -> None:
    with pytest.raises(BootloaderError, match="too small"):
        EnvLayout.single("/x", 4)
    with pytest.raises(BootloaderError, match="one or two copies"):
        EnvLayout(SIZE, ())


# --- corruption never crashes and never half-writes ---------------------------------------------


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    damage=st.lists(
        st.tuples(st.integers(0, 3 * SIZE - 1), st.integers(0, 255)), min_size=1, max_size=12
    ),
    truncate=st.one_of(st.none(), st.integers(0, 3 * SIZE)),
    value=st.text(alphabet=st.characters(blacklist_characters="\0"), max_size=40),
)
def test_random_corruption_only_raises_bootloader_errors_and_writes_whole_copies(
    tmp_path_factory: pytest.TempPathFactory,
    damage: list[tuple[int, int]],
    truncate: int | None,
    value: str,
) -> None:
    directory = tmp_path_factory.mktemp("env")
    image = directory / "disk.img"
    image.write_bytes(bytes(3 * SIZE))
    layout = EnvLayout.redundant_pair(image, SIZE, SIZE, 2 * SIZE)
    ubootenv.write_env(layout, {"a": "1", "b": "2"}, None)
    ubootenv.update_env(layout, {"a": "3"})
    raw = bytearray(image.read_bytes())
    for position, byte in damage:
        raw[position] = byte
    image.write_bytes(bytes(raw[:truncate] if truncate is not None else raw))
    before = image.read_bytes()
    try:
        ubootenv.update_env(layout, {"v": value})
    except BootloaderError:
        assert image.read_bytes() == before
        return
    state = ubootenv.read_env(layout)
    assert state.variables.get("v", "") == value
    assert not state.damaged or len(image.read_bytes()) < 3 * SIZE
