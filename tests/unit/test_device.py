"""Device sensors against fake /sys and /proc trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from updater.device import (
    Throttled,
    boot_id,
    free_space_mb,
    read_temperature_c,
    read_throttled,
    run_reboot,
    uptime_s,
)


def zone(thermal: Path, name: str, content: str | bytes | None) -> None:
    directory = thermal / name
    directory.mkdir(parents=True)
    if isinstance(content, bytes):
        (directory / "temp").write_bytes(content)
    elif content is not None:
        (directory / "temp").write_text(content)


# --- temperature -------------------------------------------------------------------------


def test_temperature_is_the_hottest_zone(tmp_path: Path) -> None:
    zone(tmp_path, "thermal_zone0", "45123\n")
    zone(tmp_path, "thermal_zone1", "61000\n")
    zone(tmp_path, "thermal_zone2", "-5000\n")
    assert read_temperature_c(tmp_path) == 61.0


def test_temperature_ignores_garbage_and_missing_zones(tmp_path: Path) -> None:
    zone(tmp_path, "thermal_zone0", "52250\n")
    zone(tmp_path, "thermal_zone1", "hot\n")
    zone(tmp_path, "thermal_zone2", "")
    zone(tmp_path, "thermal_zone3", None)  # the zone exists, its temp file does not
    zone(tmp_path, "thermal_zone4", b"\xff\xfe9\n")
    zone(tmp_path, "thermal_zone5", "61.5\n")  # not an integer: not the kernel's format
    assert read_temperature_c(tmp_path) == 52.25


def test_temperature_ignores_implausible_readings(tmp_path: Path) -> None:
    zone(tmp_path, "thermal_zone0", "2147483647\n")
    zone(tmp_path, "thermal_zone1", "-273000\n")
    zone(tmp_path, "thermal_zone2", "48000\n")
    assert read_temperature_c(tmp_path) == 48.0


def test_temperature_reads_only_thermal_zones(tmp_path: Path) -> None:
    zone(tmp_path, "cooling_device0", "99000\n")
    zone(tmp_path, "thermal_zone0", "40000\n")
    assert read_temperature_c(tmp_path) == 40.0


def test_temperature_none_without_usable_zones(tmp_path: Path) -> None:
    assert read_temperature_c(tmp_path) is None
    assert read_temperature_c(tmp_path / "missing") is None
    zone(tmp_path, "thermal_zone0", "garbage")
    assert read_temperature_c(tmp_path) is None


def test_temperature_follows_a_symlinked_zone(tmp_path: Path) -> None:
    # /sys/class/thermal/thermal_zone0 is a symlink into /sys/devices on a real system
    zone(tmp_path / "devices", "thermal_zone0", "55000\n")
    thermal = tmp_path / "class"
    thermal.mkdir()
    (thermal / "thermal_zone0").symlink_to(tmp_path / "devices" / "thermal_zone0")
    assert read_temperature_c(thermal) == 55.0


# --- free space --------------------------------------------------------------------------


def test_free_space_of_a_real_directory(tmp_path: Path) -> None:
    stats = os.statvfs(tmp_path)
    expected = stats.f_bavail * stats.f_frsize // (1024 * 1024)
    assert abs(free_space_mb(tmp_path) - expected) <= 1  # other tests may write meanwhile


def test_free_space_counts_what_unprivileged_users_get(monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 KiB fragments: 1 GiB free in total, of which 900 MiB are not reserved for root
    fake = os.statvfs_result((4096, 4096, 10**6, 262144, 230400, 0, 0, 0, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda path: fake)
    assert free_space_mb(Path("/data")) == 900


def test_free_space_of_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        free_space_mb(tmp_path / "missing")


# --- throttling --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "value"),
    [
        ("50005\n", 0x50005),
        ("0\n", 0),
        ("throttled=0x50005\n", 0x50005),
        ("0x80008", 0x80008),
        ("e0000\n", 0xE0000),
        ("", None),
        ("not hex\n", None),
        ("throttled=\n", None),
        ("-1\n", None),
    ],
)
def test_read_throttled(tmp_path: Path, content: str, value: int | None) -> None:
    path = tmp_path / "get_throttled"
    path.write_text(content)
    assert read_throttled(path) == value


def test_read_throttled_missing_or_binary(tmp_path: Path) -> None:
    assert read_throttled(tmp_path / "get_throttled") is None
    (tmp_path / "binary").write_bytes(b"\xff\x00")
    assert read_throttled(tmp_path / "binary") is None


def test_throttled_bits() -> None:
    flags = Throttled(0x50005)
    assert flags.now == Throttled.UNDER_VOLTAGE | Throttled.THROTTLED
    assert flags.since_boot == Throttled.UNDER_VOLTAGE_OCCURRED | Throttled.THROTTLED_OCCURRED
    assert Throttled.SOFT_TEMPERATURE_LIMIT in Throttled(0x8)
    assert int(Throttled.FREQUENCY_CAPPED_OCCURRED) == 0x20000
    assert Throttled(0).now == Throttled(0)


# --- boot id and uptime ------------------------------------------------------------------


def fake_proc(tmp_path: Path, boot: str | None = None, uptime: str | None = None) -> Path:
    proc = tmp_path / "proc"
    random_dir = proc / "sys" / "kernel" / "random"
    random_dir.mkdir(parents=True)
    if boot is not None:
        (random_dir / "boot_id").write_text(boot)
    if uptime is not None:
        (proc / "uptime").write_text(uptime)
    return proc


def test_boot_id(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, boot="0f3c5d2e-6a1b-4c8d-9e7f-0123456789ab\n")
    assert boot_id(proc) == "0f3c5d2e-6a1b-4c8d-9e7f-0123456789ab"


def test_boot_id_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        boot_id(fake_proc(tmp_path / "one"))
    with pytest.raises(ValueError, match="empty"):
        boot_id(fake_proc(tmp_path / "two", boot="\n"))


def test_uptime(tmp_path: Path) -> None:
    assert uptime_s(fake_proc(tmp_path, uptime="12345.67 54321.00\n")) == 12345.67


@pytest.mark.parametrize("content", ["", "soon 1.0\n", "nan 1.0\n", "-3.0 1.0\n", "inf\n"])
def test_uptime_garbage(tmp_path: Path, content: str) -> None:
    with pytest.raises(ValueError, match="not an uptime"):
        uptime_s(fake_proc(tmp_path, uptime=content))


def test_uptime_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        uptime_s(fake_proc(tmp_path))


def test_the_real_proc_of_this_machine() -> None:
    assert len(boot_id()) == 36
    assert uptime_s() > 0


def test_what_the_reboot_command_prints_goes_to_standard_error(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Standard output belongs to the command that reboots (its ``--json`` document)."""
    run_reboot(["sh", "-c", "echo going down; echo warning >&2"])
    out, err = capfd.readouterr()
    assert out == "" and err.splitlines() == ["going down", "warning"]
