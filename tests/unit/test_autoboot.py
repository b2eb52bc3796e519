"""autoboot.txt as we write it: fixed size, rewritten in place, checked, repaired from a shadow."""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bootloader_hooks.autoboot import (
    AUTOBOOT_SIZE,
    AutobootConfig,
    AutobootFile,
    install_file,
    parse,
    render,
)
from bootloader_hooks.errors import BootloaderError, BootStateCorruptError
from bootloader_hooks.tryboot_model import evaluate_autoboot
from fleet_core import durable

KNOWN = {2, 3, 4}
CONFIGS = [AutobootConfig(p, t) for p, t in itertools.product(sorted(KNOWN), repeat=2)]


def make_file(tmp_path: Path, config: AutobootConfig | None = None) -> AutobootFile:
    path = tmp_path / "p1" / "autoboot.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if config is not None:
        path.write_bytes(render(config))
    return AutobootFile(path, tmp_path / "data" / "autoboot.txt.shadow", KNOWN)


class PowerCut(Exception):
    pass


# --- the format -----------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_round_trip_at_a_fixed_size(config: AutobootConfig) -> None:
    data = render(config)
    assert len(data) == AUTOBOOT_SIZE <= 512
    assert parse(data, KNOWN, "autoboot.txt") == config


def test_the_firmware_reads_what_we_mean() -> None:
    data = render(AutobootConfig(2, 3))
    assert evaluate_autoboot(data, tryboot=False)["boot_partition"] == "2"
    assert evaluate_autoboot(data, tryboot=True)["boot_partition"] == "3"
    assert evaluate_autoboot(data, tryboot=True)["tryboot_a_b"] == "1"


def test_renderings_differ_only_in_the_digits_and_the_checksum() -> None:
    renderings = [render(c) for c in CONFIGS]
    differing = {
        i for one, two in itertools.combinations(renderings, 2) for i in range(AUTOBOOT_SIZE)
        if one[i] != two[i]
    }  # fmt: skip
    first = renderings[0]
    crc_start = first.index(b"crc32=") + len("crc32=")
    primary_digit = first.index(b"boot_partition=") + len("boot_partition=")
    trial_digit = first.index(b"boot_partition=", primary_digit) + len("boot_partition=")
    crc = set(range(crc_start, crc_start + 8))
    assert differing - crc == {primary_digit, trial_digit}


@pytest.mark.parametrize(("old", "new"), list(itertools.permutations(CONFIGS, 2)))
def test_a_write_torn_at_any_byte_is_old_or_new_to_the_firmware_and_detected(
    old: AutobootConfig, new: AutobootConfig
) -> None:
    before, after = render(old), render(new)
    for cut in range(AUTOBOOT_SIZE + 1):
        torn = after[:cut] + before[cut:]
        seen = evaluate_autoboot(torn, tryboot=False)["boot_partition"]
        assert seen in (str(old.boot_partition), str(new.boot_partition))
        tried = evaluate_autoboot(torn, tryboot=True)["boot_partition"]
        assert tried in (str(old.tryboot_partition), str(new.tryboot_partition))
        with contextlib.suppress(BootStateCorruptError):
            assert parse(torn, KNOWN, "autoboot.txt") in (old, new)


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"", "has 0 bytes"),
        (render(AutobootConfig(2, 3))[:-1], "has 255 bytes"),
        (b"\xff" * AUTOBOOT_SIZE, "not an autoboot.txt written by Metrica Fleet"),
        (
            render(AutobootConfig(2, 3)).replace(b"[tryboot]\nboot_partition=3\n", b"#" * 27),
            "missing or altered",
        ),
        (render(AutobootConfig(2, 3)).replace(b"=3", b"=4"), "fails its checksum"),
    ],
)
def test_corrupt_files_are_named(data: bytes, complaint: str) -> None:
    with pytest.raises(BootStateCorruptError, match=complaint) as caught:
        parse(data, KNOWN, "/boot/autoboot/autoboot.txt")
    assert "tryboot backend: /boot/autoboot/autoboot.txt" in str(caught.value)


def test_unknown_partition_numbers_are_corrupt() -> None:
    data = render(AutobootConfig(2, 7))
    with pytest.raises(BootStateCorruptError, match=r"\[tryboot\] boot_partition=7 is no slot"):
        parse(data, KNOWN, "autoboot.txt")


def test_partition_numbers_are_single_digits() -> None:
    with pytest.raises(ValueError, match="partition number 1-9"):
        AutobootConfig(10, 2)
    with pytest.raises(ValueError, match="partition number 1-9"):
        AutobootConfig(2, True)


@example(render(CONFIGS[1]))  # random bytes are never a valid file: the round trip, too
@example(render(CONFIGS[-2]))  # primary and trial differ in both
@given(st.binary(max_size=600))
def test_random_bytes_only_ever_raise_corruption(data: bytes) -> None:
    try:
        config = parse(data, KNOWN, "autoboot.txt")
    except BootStateCorruptError:
        return
    assert render(config) == data


@given(
    st.sampled_from(CONFIGS),
    st.integers(min_value=0, max_value=AUTOBOOT_SIZE - 1),
    st.integers(min_value=1, max_value=255),
)
def test_any_changed_byte_is_detected(config: AutobootConfig, offset: int, delta: int) -> None:
    data = bytearray(render(config))
    data[offset] = (data[offset] + delta) % 256
    with pytest.raises(BootStateCorruptError):
        parse(bytes(data), KNOWN, "autoboot.txt")


# --- the file on partition 1 and its shadow -------------------------------------------------


def test_store_rewrites_in_place_and_keeps_a_shadow(tmp_path: Path) -> None:
    file = make_file(tmp_path, AutobootConfig(2, 2))
    before = file.path.stat()
    file.store(AutobootConfig(2, 3))
    after = file.path.stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert file.path.read_bytes() == render(AutobootConfig(2, 3))
    assert file.shadow.read_bytes() == render(AutobootConfig(2, 3))
    assert file.load() == AutobootConfig(2, 3)


def test_provisioning_creates_the_file_later_writes_keep_it(tmp_path: Path) -> None:
    path = tmp_path / "p1" / "autoboot.txt"
    install_file(path, AutobootConfig(2, 2))
    inode = path.stat().st_ino
    file = AutobootFile(path, tmp_path / "shadow", KNOWN)
    assert file.load() == AutobootConfig(2, 2)
    file.store(AutobootConfig(3, 2))
    assert path.stat().st_ino == inode


def test_store_goes_through_the_durable_helpers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = make_file(tmp_path, AutobootConfig(2, 2))
    calls: list[tuple[str, Path]] = []
    real_atomic, real_in_place = durable.atomic_write, durable.rewrite_in_place

    def atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
        calls.append(("atomic_write", Path(path)))
        real_atomic(path, data, mode)

    def in_place(path: Path, data: bytes) -> None:
        calls.append(("rewrite_in_place", Path(path)))
        real_in_place(path, data)

    monkeypatch.setattr(durable, "atomic_write", atomic)
    monkeypatch.setattr(durable, "rewrite_in_place", in_place)
    file.store(AutobootConfig(3, 3))
    assert calls == [("atomic_write", file.shadow), ("rewrite_in_place", file.path)]
    calls.clear()
    file.store(AutobootConfig(3, 3))
    assert calls == []  # nothing to change, nothing written


def test_a_write_that_does_not_read_back_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = make_file(tmp_path, AutobootConfig(2, 2))

    def lossy(path: Path, data: bytes) -> None:
        pass  # the medium swallowed the write

    monkeypatch.setattr(durable, "rewrite_in_place", lossy)
    with pytest.raises(BootloaderError, match="reads back differently"):
        file.store(AutobootConfig(2, 3))


def test_write_errors_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = make_file(tmp_path, AutobootConfig(2, 2))

    def full(path: Path, data: bytes) -> None:
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(durable, "rewrite_in_place", full)
    with pytest.raises(BootloaderError, match=r"cannot write .*autoboot.txt: No space left"):
        file.store(AutobootConfig(2, 3))


@pytest.mark.parametrize("cut", [40, 100, 121, 140, 148, 200, 255])
def test_a_torn_write_is_reported_and_completed_by_the_next_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int
) -> None:
    file = make_file(tmp_path, AutobootConfig(2, 3))
    inode = file.path.stat().st_ino

    def torn(path: Path, data: bytes) -> None:
        old = Path(path).read_bytes()
        Path(path).write_bytes(data[:cut] + old[cut:])
        raise PowerCut

    with monkeypatch.context() as patch:
        patch.setattr(durable, "rewrite_in_place", torn)
        with pytest.raises(PowerCut):
            file.store(AutobootConfig(3, 3))
    reopened = AutobootFile(file.path, file.shadow, KNOWN)
    torn_bytes = file.path.read_bytes()
    # a read reports the damage and what was being written (or, cut where no checksummed byte
    # changed, finds the old settings or the new ones whole), and writes nothing
    try:
        assert reopened.load() in (AutobootConfig(2, 3), AutobootConfig(3, 3))
    except BootStateCorruptError as damage:
        assert str(damage).endswith("holds the settings being written: boot_partition=3, "
                                    "tryboot_partition=3)")  # fmt: skip
    assert file.path.read_bytes() == torn_bytes
    # the next store (a repair's) writes the file whole again, in place
    reopened.store(AutobootConfig(3, 3))
    assert reopened.load() == AutobootConfig(3, 3)
    assert file.path.read_bytes() == render(AutobootConfig(3, 3))
    assert file.path.stat().st_ino == inode


def test_a_cut_after_the_shadow_keeps_the_file_in_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = make_file(tmp_path, AutobootConfig(2, 3))

    def cut(path: Path, data: bytes) -> None:
        raise PowerCut

    with monkeypatch.context() as patch:
        patch.setattr(durable, "rewrite_in_place", cut)
        with pytest.raises(PowerCut):
            file.store(AutobootConfig(3, 3))
    assert file.load() == AutobootConfig(2, 3)  # what the firmware obeys
    file.store(AutobootConfig(3, 3))
    assert file.load() == AutobootConfig(3, 3)


def test_damage_without_a_shadow_is_an_error_naming_the_file(tmp_path: Path) -> None:
    file = make_file(tmp_path)
    file.path.write_bytes(b"boot_partition=2\n")
    with pytest.raises(BootStateCorruptError, match=r"autoboot\.txt has 17 bytes"):
        file.load()
    file.path.unlink()
    with pytest.raises(BootStateCorruptError, match="does not exist"):
        file.load()


@pytest.mark.parametrize("damage", [None, b"", b"[all]\nboot_partition=2\n", b"x" * 300])
def test_a_missing_or_resized_file_is_reported_and_written_whole_by_the_next_store(
    tmp_path: Path, damage: bytes | None
) -> None:
    file = make_file(tmp_path, AutobootConfig(2, 2))
    file.store(AutobootConfig(4, 4))
    if damage is None:
        file.path.unlink()
    else:
        file.path.write_bytes(damage)
    with pytest.raises(BootStateCorruptError, match="its shadow .* holds the settings"):
        file.load()
    assert (None if damage is None else damage) == (
        file.path.read_bytes() if file.path.exists() else None
    )
    file.store(AutobootConfig(4, 4))
    assert file.load() == AutobootConfig(4, 4)
    assert file.path.read_bytes() == render(AutobootConfig(4, 4))


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.one_of(st.binary(max_size=300), st.binary(min_size=256, max_size=256)),
    shadow=st.one_of(st.none(), st.binary(max_size=300), st.sampled_from(CONFIGS)),
)
def test_loading_damaged_files_never_fails_otherwise(
    tmp_path_factory: pytest.TempPathFactory,
    content: bytes,
    shadow: bytes | AutobootConfig | None,
) -> None:
    file = make_file(tmp_path_factory.mktemp("autoboot"))
    file.path.write_bytes(content)
    if shadow is not None:
        file.shadow.parent.mkdir(parents=True, exist_ok=True)
        file.shadow.write_bytes(render(shadow) if isinstance(shadow, AutobootConfig) else shadow)
    try:
        config = file.load()
    except BootloaderError:
        assert file.path.read_bytes() == content  # nothing half-written
        return
    assert file.path.read_bytes() == render(config)
