"""``fleet simulate``'s input is bounded before anything starts: every number of the faults
file (a count within --devices, a clock offset within ten years, offline windows), release
versions where versions are meant, and --step, --speed and --duration finite and in range (a
step of 0 would never end, a speed of 0 divides by zero). Nothing here reaches a server."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from chaos.cli import (
    DEVICES_MARKER,
    FaultsFileError,
    SimulateError,
    fresh_devices_dir,
    read_specs,
    workdir_lock,
)
from fleet_core.cli import fleet
from signing.keys import generate_key


def simulate(tmp_path: Path, *args: str) -> Result:
    return CliRunner().invoke(fleet, [
        "simulate", "--server", "http://127.0.0.1:9", "--enrollment-token", "t",
        "--workdir", str(tmp_path / "sim"), *args,
    ])  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[devices]]\ncount = 99999999999999999999\n",
         r"line 2: devices\[0\]\.count: 99999999999999999999 devices, more than 3"),
        ("[[devices]]\ncount = 4\n",
         r"line 2: devices\[0\]\.count: 4 devices, more than 3 \(--devices\)"),
        ("[[devices]]\nclock_offset_s = 1e300\n", r"line 2: devices\[0\]\.clock_offset_s: .*ten"),
        ("[[devices]]\nclock_offset_s = -99999999999999999\n", r"devices\[0\]\.clock_offset_s"),
        ("[[devices]]\nclock_offset_s = 316224001\n", r"devices\[0\]\.clock_offset_s"),
        ('[[devices]]\nhang_on = ["not a version"]\n',
         r"line 2: devices\[0\]\.hang_on: 'not a version' is not a release version"),
        ('[[devices]]\nunhealthy_on = ["2.0"]\n', r"devices\[0\]\.unhealthy_on: '2.0' is not a"),
        ("[[devices]]\noffline = [[0, 1e300]]\n", r"line 2: devices\[0\]\.offline"),
    ],
)  # fmt: skip
def test_every_number_and_version_of_the_faults_file_is_bounded(
    tmp_path: Path, text: str, message: str
) -> None:
    faults = tmp_path / "faults.toml"
    faults.write_text(text)
    with pytest.raises(FaultsFileError, match=message):
        read_specs(3, faults)


def test_values_at_the_bounds_are_accepted(tmp_path: Path) -> None:
    faults = tmp_path / "faults.toml"
    faults.write_text(
        "[[devices]]\ncount = 2\nclock_offset_s = -316224000\nhang_on = ['2.0.0-rc.1']\n"
        "[[devices]]\nclock_offset_s = 316224000\noffline = [[0, 316224000]]\n"
        "unhealthy_on = ['3.0.0']\n"
    )
    specs = read_specs(3, faults)
    assert [s.clock_offset_s for s in specs] == [-316224000.0, -316224000.0, 316224000.0]
    assert specs[0].profile.hang_on == {"2.0.0-rc.1"}


def test_a_huge_count_is_one_error_line_through_the_command(tmp_path: Path) -> None:
    faults = tmp_path / "faults.toml"
    faults.write_text("[[devices]]\ncount = 99999999999999999999\n")
    result = simulate(tmp_path, "--devices", "3", "--faults", str(faults))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1
    assert result.output.startswith(f"Error: {faults} line 2: devices[0].count:")
    assert not (tmp_path / "sim").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--step", "0"), ("--step", "-1"), ("--step", "inf"), ("--step", "nan"),
        ("--step", "1e300"),
        ("--speed", "0"), ("--speed", "-5"), ("--speed", "nan"), ("--speed", "inf"),
        ("--duration", "nan"), ("--duration", "-1"), ("--duration", "0"), ("--duration", "inf"),
    ],
)  # fmt: skip
def test_step_speed_and_duration_out_of_range_are_usage_errors(
    tmp_path: Path, option: str, value: str
) -> None:
    result = simulate(tmp_path, option, value)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"Invalid value for '{option}'" in result.output
    assert not (tmp_path / "sim").exists()


# --- the work directory: one simulation at a time, and only its own files removed ------------


def keys(tmp_path: Path) -> list[str]:
    generate_key(tmp_path / "server-key")
    generate_key(tmp_path / "release-key")
    return [
        "--server-key", str(tmp_path / "server-key.pub"),
        "--release-key", str(tmp_path / "release-key.pub"),
        "--duration", "5", "--speed", "1000",  # short, should a refusal ever fail to happen
    ]  # fmt: skip


def test_a_second_simulation_on_a_workdir_in_use_is_refused_and_touches_nothing(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "sim"
    running = workdir / "devices" / "camera-0000"
    running.mkdir(parents=True)
    (workdir / "devices" / DEVICES_MARKER).write_text("")
    (running / "disk").write_bytes(b"running")
    with workdir_lock(workdir):
        result = simulate(tmp_path, *keys(tmp_path))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1
    assert result.output.startswith(f"Error: work directory {workdir} is in use")
    assert f"(pid {os.getpid()})" in result.output
    assert (running / "disk").read_bytes() == b"running"
    assert not (workdir / "pinned").exists()


def test_the_lock_is_released_when_the_run_ends(tmp_path: Path) -> None:
    with workdir_lock(tmp_path / "sim"):
        pass
    with workdir_lock(tmp_path / "sim"):
        pass


def test_a_devices_directory_it_did_not_make_is_refused_and_kept(tmp_path: Path) -> None:
    precious = tmp_path / "sim" / "devices" / "important" / "notes.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("precious\n")
    result = simulate(tmp_path, *keys(tmp_path))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.splitlines()[-1] == (
        f"Error: {tmp_path / 'sim' / 'devices'} holds files fleet simulate did not make (no "
        f"{DEVICES_MARKER}): move them away or give another --workdir"
    )
    assert precious.read_text() == "precious\n"


def test_its_own_devices_directory_is_made_afresh_and_marked(tmp_path: Path) -> None:
    fleet_dir = tmp_path / "devices"
    fresh_devices_dir(fleet_dir)
    assert [p.name for p in fleet_dir.iterdir()] == [DEVICES_MARKER]
    (fleet_dir / "camera-0000").mkdir()
    fresh_devices_dir(fleet_dir)
    assert [p.name for p in fleet_dir.iterdir()] == [DEVICES_MARKER]
    (fleet_dir / DEVICES_MARKER).unlink()
    fresh_devices_dir(fleet_dir)  # empty: nothing of anyone's to lose
    assert [p.name for p in fleet_dir.iterdir()] == [DEVICES_MARKER]


def test_a_devices_path_that_is_a_link_or_a_file_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / DEVICES_MARKER).write_text("")
    (elsewhere / "keep").write_text("k")
    (tmp_path / "link").symlink_to(elsewhere)
    (tmp_path / "file").write_text("f")
    for path in (tmp_path / "link", tmp_path / "file"):
        with pytest.raises(SimulateError, match="is not a directory fleet simulate made"):
            fresh_devices_dir(path)
    assert (elsewhere / "keep").read_text() == "k"
    assert (tmp_path / "file").read_text() == "f"


def test_a_faults_file_that_is_a_fifo_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "faults.toml"
    os.mkfifo(fifo)
    # a writer that closes at once: were the FIFO opened, it would read as empty, not block
    writer = threading.Thread(target=lambda: open(fifo, "wb").close(), daemon=True)
    writer.start()
    try:
        with pytest.raises(FaultsFileError, match=r"--faults .*: not a regular file \(a FIFO\)"):
            read_specs(3, fifo)
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(timeout=10)
