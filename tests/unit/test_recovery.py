"""Recovery mode (updater.recovery) on plain files: the GRUB backend's grubenv, slot files, and
``fleet-updater recover`` in process."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner

from bootloader_hooks import grub, grubenv
from bootloader_hooks.base import BootSelector
from bootloader_hooks.errors import BootStateCorruptError
from image_builder.errors import BundleCompatibilityError
from signing.errors import VerificationError
from signing.keys import SigningKey
from tests.conftest import assert_one_line_error
from updater.cli import EXIT_REBOOT_REQUIRED, main
from updater.config import LoadedConfig, UpdaterConfig
from updater.errors import InstallError, SlotError
from updater.install import Installer
from updater.log import EventLog
from updater.recovery import Recovery
from updater.runtime import Runtime
from updater.state import DeviceState, StateStore

SLOT_SIZE = 64 * 1024


class Device:
    """A device on files: grubenv, kernel command line, two slot files, a data directory."""

    def __init__(self, root: Path, keyring_dir: Path) -> None:
        self.root = root
        self.grubenv = root / "esp" / "grubenv"
        self.cmdline = root / "cmdline"
        self.grubenv.parent.mkdir(parents=True)
        self.booted("safe")
        for slot in ("a", "b"):
            self.slot(slot).write_bytes(bytes(SLOT_SIZE))
        self.config = UpdaterConfig(
            compatible="metrica-rpi4",
            keyring=keyring_dir,
            data_dir=root / "data",
            bootloader={"backend": "grub", "grubenv": str(self.grubenv),
                        "cmdline": str(self.cmdline)},
            slots={s: {"rootfs": str(self.slot(s))} for s in ("a", "b")},
        )  # fmt: skip
        self.reboots: list[Sequence[str]] = []
        self.backend = grub.GrubBackend(self.grubenv, self.cmdline)

    def slot(self, name: str) -> Path:
        return self.root / f"slot_{name}.img"

    def booted(self, slot: str) -> None:
        self.cmdline.write_text(f"BOOT_IMAGE=/vmlinuz ro fleet.slot={slot}\n")

    def runtime(self) -> Runtime:
        return Runtime(
            LoadedConfig(self.config, "test"), EventLog(keep=True), reboot=self.reboots.append
        )

    def recovery(self) -> Recovery:
        return Recovery(self.runtime().installer())

    @property
    def state(self) -> DeviceState:
        return StateStore(self.config.data_dir).load().state


@pytest.fixture
def device(tmp_path: Path, keyring_dir: Path) -> Device:
    made = Device(tmp_path / "device", keyring_dir)
    # Both root slots used up: GRUB boots safe mode.
    made.backend.repair("a")
    made.backend.mark_bad("b")
    made.backend.mark_bad("a")
    StateStore(made.config.data_dir).save(
        DeviceState().with_slot("a", status="bad", version="2.0.0").with_slot("b", status="bad")
    )
    return made


def test_recovery_writes_a_root_slot_and_arms_its_trial(
    device: Device, make_bundle: Callable[..., Path]
) -> None:
    bundle = make_bundle(size=5000, version="1.4.0")
    result = device.recovery().recover(str(bundle))
    assert (result.slot, result.version, result.armed, result.rebooting) == (
        "a", "1.4.0", "trial", True,
    )  # fmt: skip
    image = (Path(bundle).parent / "images" / "rootfs.ext4").read_bytes()
    assert device.slot("a").read_bytes()[: len(image)] == image
    assert device.backend.primary() is None  # a trial, not committed: safe mode stays behind it
    variables = grubenv.read(device.grubenv).variables()
    assert grub.trial_in(variables) == "a"
    assert grub.attempts_in(variables, "a") == grub.DEFAULT_ATTEMPTS
    assert device.state.slot("a").status == "trial"
    assert device.state.slot("a").version == "1.4.0"
    assert device.reboots == [["reboot"]]


def test_the_trial_boot_commits_the_recovered_slot(
    device: Device, make_bundle: Callable[..., Path]
) -> None:
    device.recovery().recover(str(make_bundle()), reboot=False)
    device.booted("a")
    runtime = device.runtime()
    verdict = runtime.boot_checker().run()
    assert (verdict.situation, verdict.action) == ("trial", "committed")
    assert device.backend.primary() == "a"
    assert device.state.slot("a").status == "good"


def test_a_damaged_boot_state_is_repaired_with_the_recovered_slot_committed(
    device: Device, make_bundle: Callable[..., Path]
) -> None:
    device.grubenv.write_bytes(b"# GRUB Environment Block\nBOOT_ORDER=\x00" + bytes(990))
    result = device.recovery().recover(str(make_bundle()), slot="b", reboot=False)
    assert (result.slot, result.armed) == ("b", "repaired")
    assert device.backend.primary() == "b"
    assert device.state.slot("b").status == "good"


def test_recovery_refuses_to_run_from_a_root_slot(
    device: Device, make_bundle: Callable[..., Path]
) -> None:
    device.booted("a")
    before = device.slot("b").read_bytes()
    with pytest.raises(SlotError, match="safe mode only"):
        device.recovery().recover(str(make_bundle()))
    assert device.slot("b").read_bytes() == before


def test_recovery_refuses_a_downgrade_and_a_foreign_or_unsigned_bundle(
    device: Device, make_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    StateStore(device.config.data_dir).save(
        DeviceState(installed_security_version=5).with_slot("a", status="bad")
    )
    with pytest.raises(BundleCompatibilityError, match="below the installed 5"):
        device.recovery().recover(str(make_bundle(security_version=4)))
    with pytest.raises(BundleCompatibilityError, match="metrica-cm4"):
        device.recovery().recover(str(make_bundle("other.bundle", compatible="metrica-cm4",
                                                  security_version=5)))  # fmt: skip
    from signing.keys import generate_key

    stranger = generate_key(tmp_path / "stranger")
    with pytest.raises(VerificationError):
        device.recovery().recover(
            str(make_bundle("stranger.bundle", keys=[stranger], security_version=5))
        )
    assert device.slot("a").read_bytes() == bytes(SLOT_SIZE)
    assert device.slot("b").read_bytes() == bytes(SLOT_SIZE)


def test_recover_command(device: Device, make_bundle: Callable[..., Path]) -> None:
    config = device.root / "updater.toml"
    config.write_text(
        f'compatible = "metrica-rpi4"\nkeyring = "{device.config.keyring}"\n'
        f'data_dir = "{device.config.data_dir}"\n'
        f'[bootloader]\nbackend = "grub"\ngrubenv = "{device.grubenv}"\n'
        f'cmdline = "{device.cmdline}"\n'
        f'[slots.a]\nrootfs = "{device.slot("a")}"\n[slots.b]\nrootfs = "{device.slot("b")}"\n'
    )
    runner = CliRunner()
    bundle = make_bundle(version="1.4.0")
    result = runner.invoke(
        main, ["--config", str(config), "recover", str(bundle), "--slot", "b", "--no-reboot"]
    )
    assert result.exit_code == EXIT_REBOOT_REQUIRED, result.output
    assert "recovered 1.4.0 into slot b (trial)" in result.stderr
    assert grub.trial_in(grubenv.read(device.grubenv).variables()) == "b"

    device.booted("b")
    result = runner.invoke(main, ["--config", str(config), "recover", str(bundle)])
    assert_one_line_error(result, "recovery runs in safe mode only")


# --- the install pipeline on the recovery route -----------------------------------------------


def events_of(recovery: Recovery) -> list[dict[str, Any]]:
    log = recovery.log
    assert isinstance(log, EventLog)
    return [{k: v for k, v in e.items() if k not in ("ts", "level")} for e in log.events]


@pytest.mark.parametrize("damaged", [False, True], ids=["intact", "damaged"])
def test_a_recovery_logs_the_pipeline_steps_under_its_own_name(
    device: Device, make_bundle: Callable[..., Path], key: SigningKey, damaged: bool
) -> None:
    if damaged:
        device.grubenv.unlink()
    bundle = make_bundle(size=3000, version="1.4.0", security_version=2)
    recovery = device.recovery()
    result = recovery.recover(str(bundle))

    armed = "repaired" if damaged else "trial"
    events = events_of(recovery)
    names = [e["event"] for e in events if e["event"] not in ("install.image_started",
                                                                "install.progress")]  # fmt: skip
    assert names == [
        "recovery.started", "recovery.verified", "recovery.slot_marked",
        "recovery.boot_state_repaired" if damaged else "recovery.trial_armed",
        "recovery.finished", "recovery.rebooting",
    ]  # fmt: skip
    verified = next(e for e in events if e["event"] == "recovery.verified")
    assert verified == {
        "event": "recovery.verified", "version": "1.4.0", "security_version": 2, "slot": "a",
        "signed_by": [key.key_id], "boot_state_damaged": damaged,
    }  # fmt: skip
    armed_event = "recovery.boot_state_repaired" if damaged else "recovery.trial_armed"
    assert next(e for e in events if e["event"] == armed_event) == {
        "event": armed_event, "slot": "a",
    }  # fmt: skip
    finished = next(e for e in events if e["event"] == "recovery.finished")
    assert (finished["slot"], finished["armed"], finished["bytes"]) == ("a", armed, 3000)
    assert (result.slot, result.armed, result.bytes_written, result.rebooting) == (
        "a", armed, 3000, True,
    )  # fmt: skip
    assert device.reboots == [["reboot"]]
    status = device.state.slot("a").status
    assert status == ("good" if damaged else "trial")


def test_a_recovery_that_fails_while_writing_leaves_its_target_bad(
    device: Device, make_bundle: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = make_bundle(size=3000)

    def full(self: Any, data: bytes) -> bool:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("updater.install._SlotWriter.write", full)
    recovery = device.recovery()
    with pytest.raises(
        InstallError, match=r"^recovery into slot a failed: \[Errno 28\] No space left on device$"
    ):
        recovery.recover(str(bundle))

    failed = [e for e in events_of(recovery) if e["event"] == "recovery.failed"]
    assert failed == [{"event": "recovery.failed", "slot": "a",
                       "error": "[Errno 28] No space left on device"}]  # fmt: skip

    assert device.state.slot("a").status == "bad"
    assert device.reboots == []


def test_a_damaged_boot_state_a_backend_cannot_repair_stops_the_recovery(
    device: Device, make_bundle: Callable[..., Path]
) -> None:
    class Unrepairable:
        """The GRUB backend without its repair."""

        name = "unrepairable"

        def __getattr__(self, attribute: str) -> Any:
            if attribute == "repair":
                raise AttributeError(attribute)
            return getattr(device.backend, attribute)

    device.grubenv.unlink()
    runtime = device.runtime()
    installer = Installer(
        device.config, lambda: cast(BootSelector, Unrepairable()), runtime.store, runtime.log,
        runtime.sensors(), reboot=device.reboots.append,
    )  # fmt: skip

    with pytest.raises(
        BootStateCorruptError,
        match="^boot state is damaged and the unrepairable backend cannot repair it$",
    ):
        Recovery(installer).recover(str(make_bundle()))

    assert device.reboots == []
    assert not device.grubenv.exists()


def test_a_recovery_writes_the_first_slot_the_store_does_not_call_good(
    device: Device, make_bundle: Callable[..., Path]
) -> None:
    # slot a still bootable and good in the store (a crash loop brought safe mode): b is
    # the one to write, and a stays as it is
    device.backend.repair("a")
    StateStore(device.config.data_dir).save(
        DeviceState().with_slot("a", status="good", version="2.0.0").with_slot("b", status="bad")
    )
    before = device.slot("a").read_bytes()
    result = device.recovery().recover(str(make_bundle(size=3000)), reboot=False)
    assert result.slot == "b"
    assert device.slot("a").read_bytes() == before
    assert device.state.slot("b").status == "trial"
