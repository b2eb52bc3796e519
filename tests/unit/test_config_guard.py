"""Config drift repaired: the configuration file put back to what the daemon runs once it has
differed for the repair time (updater.config_guard), whatever the file became meanwhile."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_core import durable
from updater.config import LAST_GOOD_NAME, LoadedConfig, load_config
from updater.config_guard import (
    MAX_CONFIG_BYTES,
    REPLACED_NAME,
    ConfigGuard,
    Drift,
    Repair,
    file_sha256,
)
from updater.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def config_text(data_dir: Path, repair_after_s: int = 300, min_free_mb: int = 0) -> bytes:
    return (
        f'compatible = "metrica-test"\nkeyring = "/etc/fleet/keyring"\n'
        f'data_dir = "{data_dir}"\n[limits]\nmin_free_mb = {min_free_mb}\n'
        f"config_repair_after_s = {repair_after_s}\n"
    ).encode()


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, LoadedConfig, ConfigGuard, Clock]:
    path = tmp_path / "updater.toml"
    path.write_bytes(config_text(tmp_path / "data"))
    loaded = load_config(path)
    assert loaded.source == str(path) and not loaded.problems
    clock = Clock()
    return path, loaded, ConfigGuard(clock), clock


def test_a_file_holding_what_runs_is_left_alone(
    setup: tuple[Path, LoadedConfig, ConfigGuard, Clock],
) -> None:
    path, loaded, guard, clock = setup
    before = path.stat()
    for _ in range(3):
        clock.now += 1000
        assert guard.check(loaded) is None
    assert path.stat().st_mtime_ns == before.st_mtime_ns


def test_an_edit_is_written_over_once_it_has_stood_for_the_repair_time(
    setup: tuple[Path, LoadedConfig, ConfigGuard, Clock],
) -> None:
    path, loaded, guard, clock = setup
    running = path.read_bytes()
    edited = config_text(loaded.config.data_dir, min_free_mb=200)
    path.write_bytes(edited)
    assert guard.check(loaded) == Drift(1000.0, None)  # it loads: an edit, not damage
    clock.now += 299
    assert guard.check(loaded) == Drift(1000.0, None)
    assert path.read_bytes() == edited
    clock.now += 1
    repair = guard.check(loaded)
    assert isinstance(repair, Repair)
    assert path.read_bytes() == running
    assert repair.replaced == loaded.config.data_dir / REPLACED_NAME
    assert repair.replaced.read_bytes() == edited
    assert repair.problem is None
    assert repair.loaded == LoadedConfig(loaded.config, str(path), (), str(path), running)
    assert path.stat().st_mode & 0o777 == 0o600
    assert guard.check(repair.loaded) is None


def test_a_file_changing_again_starts_the_count_again(
    setup: tuple[Path, LoadedConfig, ConfigGuard, Clock],
) -> None:
    path, loaded, guard, clock = setup
    for minutes in range(10):  # an editor saving every minute is never overwritten
        path.write_bytes(config_text(loaded.config.data_dir, min_free_mb=minutes + 1))
        drift = guard.check(loaded)
        assert drift == Drift(clock.now, None)
        clock.now += 60
    assert isinstance(guard.check(loaded), Drift)
    clock.now += 300
    assert isinstance(guard.check(loaded), Repair)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda p: p.write_bytes(b"\x00\xff[limits\n"), "not UTF-8"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"compatible = 1\n"), "compatible"),
        (lambda p: p.unlink(), "missing"),
        (lambda p: (p.unlink(), os.mkfifo(p)), "not a regular file"),
        (lambda p: (p.unlink(), p.mkdir()), "not a regular file"),
        (lambda p: p.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1)), "larger than"),
    ],
)
def test_a_damaged_or_missing_file_is_named_and_repaired(
    setup: tuple[Path, LoadedConfig, ConfigGuard, Clock], damage: object, problem: str
) -> None:
    path, loaded, guard, clock = setup
    running = path.read_bytes()
    damage(path)  # type: ignore[operator]
    started = time.monotonic()
    drift = guard.check(loaded)
    assert time.monotonic() - started < 1  # a FIFO is never waited on
    assert isinstance(drift, Drift) and drift.problem is not None and problem in drift.problem
    clock.now += 300
    if path.is_dir():  # a directory cannot be replaced by a file: an error, tried again
        errors = set()
        for _ in range(3):
            with pytest.raises(ConfigError, match="cannot write the repair") as raised:
                guard.check(loaded)
            errors.add(str(raised.value))
        assert len(errors) == 1  # the same words each time: logged once
        assert path.is_dir()
        return
    repair = guard.check(loaded)
    assert isinstance(repair, Repair) and repair.problem == drift.problem
    assert path.read_bytes() == running
    kept = loaded.config.data_dir / REPLACED_NAME
    assert (repair.replaced is None) == (not kept.exists())


def test_a_repair_time_of_zero_never_writes(tmp_path: Path) -> None:
    path = tmp_path / "updater.toml"
    path.write_bytes(config_text(tmp_path / "data", repair_after_s=0))
    loaded = load_config(path)
    clock = Clock()
    guard = ConfigGuard(clock)
    path.write_bytes(b"garbage")
    for _ in range(5):
        clock.now += 86400
        assert isinstance(guard.check(loaded), Drift)
    assert path.read_bytes() == b"garbage"


def test_the_defaults_are_never_written_into_a_file(tmp_path: Path) -> None:
    path = tmp_path / "updater.toml"
    path.write_bytes(b"not toml [")
    loaded = load_config(path, data_dir=tmp_path / "data")
    assert loaded.source == "defaults" and loaded.text is None
    clock = Clock()
    guard = ConfigGuard(clock)
    clock.now += 86400
    assert guard.check(loaded) is None
    assert path.read_bytes() == b"not toml ["


def test_a_symbolic_link_at_the_path_stays_one_and_its_target_is_repaired(
    tmp_path: Path,
) -> None:
    managed = tmp_path / "site" / "updater.toml"
    managed.parent.mkdir()
    running = config_text(tmp_path / "data")
    managed.write_bytes(running)
    path = tmp_path / "updater.toml"
    path.symlink_to(managed)
    loaded = load_config(path)
    clock = Clock()
    guard = ConfigGuard(clock)
    managed.write_bytes(b"garbage")
    assert isinstance(guard.check(loaded), Drift)
    clock.now += 300
    assert isinstance(guard.check(loaded), Repair)
    assert path.is_symlink() and managed.read_bytes() == running


def test_an_edit_saved_while_the_repair_is_written_wins(
    setup: tuple[Path, LoadedConfig, ConfigGuard, Clock],
) -> None:
    path, loaded, guard, clock = setup
    path.write_bytes(b"garbage")
    assert isinstance(guard.check(loaded), Drift)
    clock.now += 300
    second = config_text(loaded.config.data_dir, min_free_mb=7)

    def save_meanwhile(point: str, where: Path) -> None:
        if point == "atomic:begin" and where == path:
            path.write_bytes(second)

    previous = durable.set_boundary_hook(save_meanwhile)
    try:
        assert guard.check(loaded) == Drift(clock.now, None)
    finally:
        durable.set_boundary_hook(previous)
    assert path.read_bytes() == second  # not written over: its count starts now
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert guard.check(loaded) == Drift(clock.now, None)


def test_garbage_changing_at_every_read_is_repaired_all_the_same(
    setup: tuple[Path, LoadedConfig, ConfigGuard, Clock],
) -> None:
    path, loaded, guard, clock = setup
    running = path.read_bytes()
    for n in range(6):
        path.write_bytes(b"\xff garbage %d" % n)
        verdict = guard.check(loaded)
        clock.now += 60
    assert isinstance(verdict, Repair)
    assert path.read_bytes() == running


def test_a_kept_file_holding_the_same_bytes_is_not_written_again(
    setup: tuple[Path, LoadedConfig, ConfigGuard, Clock],
) -> None:
    path, loaded, guard, clock = setup
    kept = loaded.config.data_dir / REPLACED_NAME
    for _ in range(2):
        path.write_bytes(b"garbage")
        guard.check(loaded)
        clock.now += 300
        assert isinstance(guard.check(loaded), Repair)
        if _ == 0:
            first = kept.stat()
    assert kept.stat().st_ino == first.st_ino and kept.read_bytes() == b"garbage"


def test_a_repair_keeps_the_problems_of_the_running_bytes(tmp_path: Path) -> None:
    path = tmp_path / "updater.toml"
    path.write_bytes(config_text(tmp_path / "data"))

    def refuse(config: object) -> None:
        raise ConfigError("backend: no such environment file")

    loaded = load_config(path, build=refuse)
    assert loaded.source == str(path) and loaded.problems
    clock = Clock()
    guard = ConfigGuard(clock)
    path.write_bytes(b"garbage")
    guard.check(loaded)
    clock.now += 300
    repair = guard.check(loaded)
    assert isinstance(repair, Repair) and repair.loaded.problems == loaded.problems


def test_on_the_last_good_copy_a_usable_fix_is_left_for_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "updater.toml"
    good = config_text(tmp_path / "data")
    path.write_bytes(good)
    load_config(path)  # kept as the last good copy
    path.write_bytes(b"[limits\n")
    loaded = load_config(path, data_dir=tmp_path / "data")
    assert loaded.source != loaded.path
    clock = Clock()
    guard = ConfigGuard(clock)
    fixed = config_text(tmp_path / "data", min_free_mb=50)
    path.write_bytes(fixed)  # the operator's fix, not yet applied by a restart
    for _ in range(5):
        assert guard.check(loaded) == Drift(1000.0, None)
        clock.now += 3600
    assert path.read_bytes() == fixed


def test_a_daemon_on_its_last_good_copy_repairs_the_damaged_file_from_it(tmp_path: Path) -> None:
    path = tmp_path / "updater.toml"
    good = config_text(tmp_path / "data")
    path.write_bytes(good)
    load_config(path)  # kept as the last good copy
    assert (tmp_path / "data" / LAST_GOOD_NAME).read_bytes() == good
    path.write_bytes(b"[limits\n")
    loaded = load_config(path, data_dir=tmp_path / "data")
    assert loaded.source == str(tmp_path / "data" / LAST_GOOD_NAME) and loaded.problems
    clock = Clock()
    guard = ConfigGuard(clock)
    assert isinstance(guard.check(loaded), Drift)
    clock.now += 300
    repair = guard.check(loaded)
    assert isinstance(repair, Repair)
    assert path.read_bytes() == good
    assert repair.loaded.source == str(path) and repair.loaded.problems == ()
    assert file_sha256(str(path)) == file_sha256(str(tmp_path / "data" / LAST_GOOD_NAME))


@settings(max_examples=60, deadline=None)
@given(garbage=st.binary(max_size=512))
def test_whatever_the_file_becomes_the_running_configuration_comes_back(
    tmp_path_factory: pytest.TempPathFactory, garbage: bytes
) -> None:
    root = tmp_path_factory.mktemp("guard")
    path = root / "updater.toml"
    running = config_text(root / "data")
    path.write_bytes(running)
    loaded = load_config(path)
    clock = Clock()
    guard = ConfigGuard(clock)
    path.write_bytes(garbage)
    first = guard.check(loaded)
    assert first is None if garbage == running else isinstance(first, Drift)
    clock.now += 300
    guard.check(loaded)
    assert path.read_bytes() == running
