"""``fleet simulate``'s input is bounded before anything starts: every number of the faults
file (a count within --devices, a clock offset within ten years, offline windows), release
versions where versions are meant, and --step, --speed and --duration finite and in range (a
step of 0 would never end, a speed of 0 divides by zero). Nothing here reaches a server."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from chaos.cli import FaultsFileError, read_specs
from fleet_core.cli import fleet


def simulate(tmp_path: Path, *args: str) -> Result:
    return CliRunner().invoke(fleet, [
        "simulate", "--server", "http://127.0.0.1:9", "--enrollment-token", "t",
        "--workdir", str(tmp_path / "sim"), *args,
    ])  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[devices]]\ncount = 99999999999999999999\n", r"line 2: devices\[0\]\.count: .* 0 to 3"),
        ("[[devices]]\ncount = 4\n", r"line 2: devices\[0\]\.count: .* 0 to 3 \(--devices\)"),
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
