"""``fleet-updater`` in process: what it says about itself and about a device it cannot read."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import chaos.lab_firmwares  # noqa: F401 (fills LAB_FIRMWARES)
from chaos.lab_image import make_lab_image
from chaos.virtual_device import VirtualDevice
from fleet_core.cli import fleet
from tests.unit.test_config import KNOWN, shown_as, toml_key
from updater.cli import main
from updater.config import LAST_GOOD_NAME


def test_version_is_the_package_version_as_fleet_prints_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such.toml"  # --version reads no configuration
    result = CliRunner().invoke(main, ["--config", str(missing), "--version"], prog_name="x")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"x, version {version('metrica-fleet')}\n"
    assert CliRunner().invoke(fleet, ["--version"], prog_name="x").stdout == result.stdout
    assert not list(tmp_path.iterdir())


@pytest.fixture
def device(tmp_path: Path) -> VirtualDevice:
    """A GRUB device running 1.0.0 from slot a, confirmed, its configuration in updater.toml."""
    device = VirtualDevice(tmp_path / "device", "grub")
    device.provision(make_lab_image("1.0.0"), "1.0.0")
    assert device.power_on()[-1].action == "confirmed"
    (device.root / "updater.toml").write_text(device.config_toml())
    return device


def status(device: VirtualDevice, *args: str, config: Path | None = None) -> Result:
    path = config or device.root / "updater.toml"
    data_dir = str(device.config.data_dir)
    options = ["--config", str(path), "--data-dir", data_dir, "status", *args]
    return CliRunner().invoke(main, options)


def one_error_line(result: Result, fragment: str) -> None:
    """Exit 1 and one ``Error:`` line naming the problem on stderr (the log's warnings about
    the configuration go there too, one JSON object a line), no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr
    others = [line for line in result.stderr.splitlines() if not line.startswith("Error: ")]
    assert all(json.loads(line)["event"] == "config.fallback" for line in others), others


def tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def test_status_of_a_sound_device_exits_zero(device: VirtualDevice) -> None:
    plain = status(device)
    assert plain.exit_code == 0 and plain.stderr == "", plain.output
    assert "booted:    a" in plain.stdout.splitlines()
    as_json = status(device, "--json")
    assert as_json.exit_code == 0 and as_json.stderr == "", as_json.output
    document = json.loads(as_json.stdout)
    assert (document["booted"], document["primary"], document["config"]["problems"]) == (
        "a", "a", []
    )  # fmt: skip


def damage_config_missing(device: VirtualDevice) -> Path:
    return device.root / "no-such.toml"


def damage_config_unreadable(device: VirtualDevice) -> Path:
    (device.root / "a-directory.toml").mkdir()
    return device.root / "a-directory.toml"


def damage_config_invalid(device: VirtualDevice) -> Path:
    path = device.root / "updater.toml"
    path.write_text(path.read_text() + "surprise = 1\n")
    return path


def damage_config_invalid_with_last_good(device: VirtualDevice) -> Path:
    path = device.root / "updater.toml"
    (device.config.data_dir / LAST_GOOD_NAME).write_bytes(path.read_bytes())
    path.write_bytes(b"compatible = [\x00 broken")
    return path


def damage_boot_state(device: VirtualDevice) -> Path:
    Path(device.config.bootloader["grubenv"]).unlink()
    return device.root / "updater.toml"


@pytest.mark.parametrize(
    ("damage", "fragment", "where"),
    [
        (damage_config_missing, "no-such.toml: cannot read", "config"),
        (damage_config_unreadable, "a-directory.toml: cannot read", "config"),
        (damage_config_invalid, "surprise", "config"),
        (damage_config_invalid_with_last_good, "not valid TOML", "config"),
        (damage_boot_state, "grubenv is missing", "bootloader_problem"),
    ],
)
def test_status_exits_one_naming_the_problem_after_printing_what_it_found(
    device: VirtualDevice, damage: Callable[[VirtualDevice], Path], fragment: str, where: str
) -> None:
    config = damage(device)
    before = tree(device.root)
    plain = status(device, config=config)
    one_error_line(plain, fragment)
    assert any(line.startswith("config:") for line in plain.stdout.splitlines()), plain.stdout
    assert any(fragment in line for line in plain.stdout.splitlines()), plain.stdout

    as_json = status(device, "--json", config=config)
    one_error_line(as_json, fragment)
    document = json.loads(as_json.stdout)  # the whole document, and only it, on stdout
    named = document["config"]["problems"] if where == "config" else [document[where]]
    assert any(fragment in problem for problem in named), document
    assert tree(device.root) == before  # a read: nothing repaired, nothing kept


def test_status_on_the_last_good_configuration_still_reports_the_device(
    device: VirtualDevice,
) -> None:
    config = damage_config_invalid_with_last_good(device)
    result = status(device, "--json", config=config)
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["config"]["source"].endswith(LAST_GOOD_NAME)
    assert (document["booted"], document["primary"], document["bootloader_problem"]) == (
        "a", "a", None
    )  # fmt: skip


def test_a_damaged_state_store_is_reported_and_status_still_exits_zero(
    device: VirtualDevice,
) -> None:
    (device.config.data_dir / "state.json").write_bytes(b"{garbled")
    result = status(device, "--json")
    assert result.exit_code == 0, result.output
    assert "damaged" in json.loads(result.stdout)["state_problem"]


@settings(max_examples=25, deadline=None)
@given(key=st.text(st.characters(blacklist_categories=["Cs"]), max_size=16))
def test_an_unknown_key_is_one_error_line_never_a_traceback(key: str) -> None:
    assume(key not in KNOWN)
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "updater.toml"
        config.write_text(f'compatible = "lab"\nkeyring = "/k"\n{toml_key(key)} = 1\n')
        options = ["--config", str(config), "--data-dir", scratch, "install", "/no.bundle"]
        result = CliRunner().invoke(main, options)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert f"config: unknown setting {shown_as(key, quoted=False)}" in errors[0], errors
