"""``fleet-updater <command> --json`` on virtual devices: one JSON document on stdout, whatever
the command logs (its events go to stderr), printed before the exit status 3 or 4 as well;
a failure prints no document, only its ``Error:`` line."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner, Result

from chaos.virtual_device import VirtualDevice
from tests.chaos.conftest import FIRMWARES, MakeDevice, Releases
from tests.chaos.test_updater_cli import device_reboot_event, lose_boot_state, status, updater
from updater.cli import EXIT_REBOOT_REQUIRED, EXIT_UNHEALTHY, main


def document(result: Result, exit_code: int = 0) -> dict[str, Any]:
    """The one document on stdout (``json.loads`` refuses anything after it: an event line
    would fail here)."""
    assert result.exit_code == exit_code, result.output
    parsed: dict[str, Any] = json.loads(result.stdout)
    assert result.stdout.isascii()
    return parsed


def events(result: Result) -> list[str]:
    """The events the command logged: JSON lines on stderr."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("{")]
    return [json.loads(line)["event"] for line in lines]


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_install_and_boot_check(firmware: str, make_device: MakeDevice, releases: Releases) -> None:
    device = make_device(firmware)
    bundle = str(releases.bundle("2.0.0"))
    result = updater(device, "install", bundle, "--no-reboot", "--json")
    assert document(result, EXIT_REBOOT_REQUIRED) == {
        "slot": "b",
        "version": "2.0.0",
        "armed": "trial",
        "bytes_written": 256 * 1024,
        "reboot_required": True,
        "rebooting": False,
    }
    logged = events(result)
    assert logged[0] == "install.started" and "install.finished" in logged

    device.boot(device_reboot_event(device), run_boot_check=False)
    result = updater(device, "boot-check", "--json")
    assert document(result) == {
        "situation": "trial",
        "slot": "b",
        "action": "committed",
        "healthy": True,
        "failed_checks": [],
        "rebooting": False,
    }
    assert "boot_check.committed" in events(result)
    assert status(device)["primary"] == "b"


def test_an_unhealthy_boot_check_prints_its_verdict_before_exit_4(
    make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device("grub")
    updater(device, "install", str(releases.bundle("2.0.0")), "--no-reboot")
    device.boot(device_reboot_event(device), run_boot_check=False)
    failing = '[[health.checks]]\ntype = "command"\nargv = ["false"]'
    result = updater(device, "boot-check", "--json", extra=failing)
    verdict = document(result, EXIT_UNHEALTHY)
    assert (verdict["slot"], verdict["action"], verdict["healthy"]) == ("b", "rolled_back", False)
    assert len(verdict["failed_checks"]) == 1 and verdict["rebooting"] is True
    assert "boot_check.rolled_back" in events(result)


def test_an_install_without_reboot_says_it_is_rebooting(
    make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device("grub")
    result = updater(device, "install", str(releases.bundle("2.0.0")), "--json")
    installed = document(result)
    assert (installed["reboot_required"], installed["rebooting"]) == (False, True)


def test_rollback_mark_bad_mark_good_and_resume(
    make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device("grub")
    device.install(releases.bundle("2.0.0", security_version=1))  # b committed, a still good
    result = updater(device, "rollback", "--no-reboot", "--json")
    assert document(result, EXIT_REBOOT_REQUIRED) == {
        "slot": "a",
        "version": "1.0.0",
        "armed": "trial",
        "reboot_required": True,
        "rebooting": False,
    }
    assert "rollback.armed" in events(result)
    device.settle(device_reboot_event(device))
    assert status(device)["booted"] == "a"

    result = updater(device, "mark-bad", "other", "--json")
    assert document(result) == {"slot": "b", "status": "bad", "forced": False}
    assert status(device)["slots"]["b"]["status"] == "bad"
    result = updater(device, "mark-good", "--json")
    assert document(result) == {"slot": "a", "status": "good", "security_floor": 1}
    result = updater(device, "resume", "--json")
    assert document(result) == {"resumed": True, "previously": None}


@pytest.mark.parametrize("firmware", ["grub", "uboot"])
def test_repair(firmware: str, make_device: MakeDevice, releases: Releases) -> None:
    device = make_device(firmware)
    device.install(releases.bundle("2.0.0", security_version=1))
    assert document(updater(device, "repair", "--json")) == {"repaired": False}
    lose_boot_state(device, firmware)
    repaired = document(updater(device, "repair", "--json"))
    assert (repaired["repaired"], repaired["primary"], repaired["fallback"]) == (True, "b", "a")
    assert repaired["reason"]
    forced = document(updater(device, "repair", "--force", "--json"))
    assert forced == {
        "repaired": True, "reason": "rebuilt on request", "primary": "b", "fallback": "a"
    }  # fmt: skip


def test_recover_in_safe_mode(make_device: MakeDevice, releases: Releases) -> None:
    device = make_device("grub")
    device.runtime().backend.mark_bad("a")  # the firmware has no root slot left: safe mode
    records = device.power_on()
    assert records[-1].slot == "safe", records
    result = updater(device, "recover", str(releases.bundle("2.0.0")), "--no-reboot", "--json")
    recovered = document(result, EXIT_REBOOT_REQUIRED)
    assert (recovered["version"], recovered["reboot_required"]) == ("2.0.0", True)
    assert recovered["slot"] in ("a", "b") and recovered["rebooting"] is False
    assert "recovery.started" in events(result)


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_provision(firmware: str, make_device: MakeDevice) -> None:
    device = make_device(firmware)
    for name in ("state.json", "security-floor"):
        (device.config.data_dir / name).unlink(missing_ok=True)
    config = device.root / "updater.toml"
    config.write_text(device.config_toml())
    args = ["--config", str(config), "provision", "--version", "1.0.0", "--security-version", "2"]
    planned = document(CliRunner().invoke(main, [*args, "--dry-run", "--json"]))
    done = document(CliRunner().invoke(main, [*args, "--json"]))
    assert (planned["dry_run"], done["dry_run"]) == (True, False)
    for provisioned in (planned, done):
        assert provisioned["configuration"]["backend"] == firmware
        assert provisioned["configuration"]["data_dir"] == str(device.config.data_dir)
        assert (provisioned["slot"], provisioned["version"]) == ("a", "1.0.0")
        assert (provisioned["security_version"], provisioned["security_floor"]) == (2, 2)
        assert provisioned["boot_state"] == {"primary": "a", "fallback": None}
    actions = {"grub": ["kept"], "uboot": ["write"], "tryboot": []}[firmware]
    assert [script["action"] for script in planned["boot_scripts"]] == actions
    done_actions = ["written" if action == "write" else action for action in actions]
    assert [script["action"] for script in done["boot_scripts"]] == done_actions
    assert status(device)["slots"]["a"]["version"] == "1.0.0"


@pytest.mark.parametrize(
    "command",
    [["install", "/nonexistent.bundle"], ["rollback"], ["mark-bad", "--json"], ["recover", "x"]],
)
def test_a_failure_prints_no_document(make_device: MakeDevice, command: list[str]) -> None:
    device = make_device("grub")
    result = updater(device, *command, "--json")
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert [line for line in result.stderr.splitlines() if line.startswith("Error: ")]


def test_without_json_the_events_stay_on_stdout(
    make_device: MakeDevice, releases: Releases
) -> None:
    device: VirtualDevice = make_device("grub")
    result = updater(device, "install", str(releases.bundle("2.0.0")), "--no-reboot")
    assert result.exit_code == EXIT_REBOOT_REQUIRED, result.output
    lines = [json.loads(line)["event"] for line in result.stdout.splitlines()]
    assert lines[0] == "install.started"


def test_a_rollback_that_reboots_says_so(make_device: MakeDevice, releases: Releases) -> None:
    device = make_device("grub")
    device.install(releases.bundle("2.0.0", security_version=1))
    rolled = document(updater(device, "rollback", "--json"))  # the lab's reboot command: true
    assert (rolled["slot"], rolled["reboot_required"], rolled["rebooting"]) == ("a", False, True)
    assert status(device)["slots"]["a"]["status"] == "trial"
