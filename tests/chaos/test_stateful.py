"""Random sequences of everything that happens to a device, per firmware, with the real updater.

One state machine, run once per lab firmware (GRUB, the Raspberry Pi's tryboot, U-Boot): it
installs healthy releases and releases whose health checks fail, offers bundles that must be
refused (a stranger's key, another device's, damaged, below the anti-rollback floor), arms
trials and lets the boot check decide them, marks slots bad with ``fleet-updater mark-bad``,
rolls back, cuts the power at a random write boundary of an install and its boots, loses or
damages the boot state (grubenv deleted or garbled, the U-Boot environment reset to the
board's defaults, a torn ``autoboot.txt``), loads broken configurations, reboots, and recovers
from safe mode. After every step:

- the bytes of a root slot change only in an install, and only in the slot it writes, which is
  never the booted one;
- whenever the boot state reads intact, the firmware's next boot (its committed slot, and the
  armed trial) lands on a complete image of a release at or above the floor
  (``installed_security_version``), or on safe mode; a slot the store marks bad or half
  written is never bootable;
- after a boot check (a boot that settled): the boot state is intact, the committed slot is
  the booted one and the store calls it good (or the device runs safe mode and the firmware
  commits no root slot), and no trial is pending.

Budget: ``FLEET_STATEFUL_STEPS`` steps per firmware (default :data:`CI_STEPS`), seeded by
the ``ci`` profile's derandomisation (a failure prints the blob for ``@reproduce_failure``);
the steps run per firmware are printed at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from bootloader_hooks.base import BootCause, BootEvent
from bootloader_hooks.errors import BootStateCorruptError
from chaos.lab_image import read_lab_image
from chaos.virtual_device import (
    FACTORY_SECURITY_VERSION,
    BootRecord,
    PowerCut,
    PowerSwitch,
    VirtualDevice,
)
from fleet_core.errors import FleetError
from signing.keys import generate_key
from tests.chaos.conftest import (
    FIRMWARES,
    STATEFUL_STEPS,
    BootView,
    MakeDevice,
    Releases,
    boot_view,
)
from tests.chaos.test_updater_cli import lose_boot_state
from updater.cli import main

CI_STEPS = 10_000  # per firmware
STEPS = int(os.environ.get("FLEET_STATEFUL_STEPS", CI_STEPS))
STEPS_PER_EXAMPLE = 50
IMAGE_SIZE = 80 * 1024  # a flush at 64 KiB and one at the end: two cut points in the slot
# The write boundary a power cut hits is drawn from 0..MAX_CUT: the install's, then those of
# the boots after it; one drawn past the last leaves the install and its boots whole.
MAX_CUT = 48

# Releases the machine installs: security version -> versions; a version names one image.
SECURITY_VERSIONS = (1, 2, 3)
HEALTHY = {sv: [f"{sv + 1}.{minor}.0" for minor in range(2)] for sv in SECURITY_VERSIONS}
UNHEALTHY = {sv: f"{sv + 1}.9.0" for sv in SECURITY_VERSIONS}
SECURITY = {"1.0.0": FACTORY_SECURITY_VERSION}
SECURITY.update({v: sv for sv, versions in HEALTHY.items() for v in versions})
SECURITY.update({v: sv for sv, v in UNHEALTHY.items()})
UNBOOTABLE = ("bad", "installing")  # store statuses the firmware must never start


def cli(device: VirtualDevice, *args: str, config: str | None = None) -> Result:
    """``fleet-updater`` on ``device`` (its own configuration unless ``config`` is given)."""
    path = device.root / "updater.toml"
    path.write_text(device.config_toml() if config is None else config)
    return CliRunner().invoke(main, ["--config", str(path), *args])


def reboot_event(device: VirtualDevice) -> BootEvent:
    return BootEvent(BootCause.REBOOT, tuple(device.runtime().backend.reboot_command()))


@dataclass(frozen=True)
class Snapshot:
    """Everything a refused action must leave as it was."""

    slots: dict[str, bytes]
    store: Any
    boot: dict[str, bytes | None]


def boot_files(device: VirtualDevice) -> list[Path]:
    options = device.config.bootloader
    keys = ("grubenv", "env_file", "autoboot_txt")
    return [Path(options[k]) for k in keys if k in options]


def snapshot(device: VirtualDevice) -> Snapshot:
    return Snapshot(
        {s: device.slot_path(s).read_bytes() for s in "ab"},
        device.state(),
        {str(p): p.read_bytes() if p.exists() else None for p in boot_files(device)},
    )


def damage_boot_state(device: VirtualDevice, how: int) -> str:
    """Lose or damage the boot state as a careless operator or a failing card would."""
    firmware = device.lab.backend
    options = device.config.bootloader
    if firmware == "grub":
        grubenv = Path(options["grubenv"])
        if how % 2 == 0:
            grubenv.unlink(missing_ok=True)
            return "grubenv deleted"
        data = bytearray(grubenv.read_bytes() if grubenv.exists() else b"")
        grubenv.write_bytes(bytes(b"\xff" * len(data) or b"garbage"))
        return "grubenv overwritten with garbage"
    if firmware == "uboot":
        with contextlib.suppress(FleetError):
            lose_boot_state(device, firmware)
            return "U-Boot environment reset to the board's defaults"
        return "U-Boot environment already lost"
    # Torn, as an in-place write cut short leaves it. Not emptied or deleted: the firmware then
    # boots its default partition whatever it holds, and with no boot counting outside a trial
    # a half-written slot there keeps the board in a reset loop (see
    # test_committed_slot_whose_kernel_hangs in test_update_cycle.py).
    autoboot = Path(options["autoboot_txt"])
    data = bytearray(autoboot.read_bytes())
    if how % 2 == 0:  # in the padding: the firmware reads the same settings
        data[-2] = ord("x")
        what = "autoboot.txt torn (padding)"
    else:
        data[data.index(b"=") + 1] ^= 0x01
        what = "autoboot.txt torn (checksum)"
    autoboot.write_bytes(bytes(data))
    return what


def make_machine(
    firmware: str, make_device: MakeDevice, releases: Releases, stranger: Any
) -> type[RuleBasedStateMachine]:
    def bundle(version: str, **options: Any) -> Path:
        behaviour = "unhealthy" if version in UNHEALTHY.values() else "healthy"
        return releases.bundle(
            version, behaviour, security_version=SECURITY[version], size=IMAGE_SIZE, **options
        )

    class DeviceMachine(RuleBasedStateMachine):
        """See the module docstring."""

        def __init__(self) -> None:
            super().__init__()
            self.device = make_device(firmware)
            self.slots = {s: self.device.slot_path(s).read_bytes() for s in "ab"}
            self.damaged = False  # the boot state was damaged, no boot check since
            self.settled: list[BootRecord] | None = None  # the boots of this step, if any
            self.trace: list[str] = []
            self.generation = 0  # of the slots' bytes: one more at every write accepted
            self.checked: tuple[Any, ...] | None = None  # what the last boot state check read
            self.view: BootView | None = None  # and what it found

        # --- helpers -------------------------------------------------------------------------

        def step(self, what: str) -> None:
            STATEFUL_STEPS[firmware] = STATEFUL_STEPS.get(firmware, 0) + 1
            self.trace.append(what)
            self.settled = None

        def booted(self) -> str:
            return str(self.device.runtime().backend.booted())

        def floor(self) -> int:
            return self.device.state().installed_security_version

        def wrote(self, target: str | None) -> None:
            """Accept the bytes the last step left in ``target`` (an install's); every other
            slot must be as it was."""
            for slot in "ab":
                data = self.device.slot_path(slot).read_bytes()
                if slot == target:
                    self.generation += data != self.slots[slot]
                    self.slots[slot] = data
                else:
                    assert data == self.slots[slot], f"slot {slot} written: {self.trace}"

        def settle(self, records: list[BootRecord]) -> None:
            self.settled = records
            self.damaged = False

        def assert_unchanged(self, before: Snapshot, what: str) -> None:
            after = snapshot(self.device)
            assert after.slots == before.slots, f"{what}: a slot was written"
            assert after.store == before.store, f"{what}: the state store changed"
            assert after.boot == before.boot, f"{what}: the boot state changed"

        def install(self, path: Path, *, reboot: bool) -> list[BootRecord]:
            booted = self.booted()
            target = "a" if booted == "b" else "b"
            try:
                records = self.device.install(path, reboot=reboot)
            except FleetError:
                records = []
            self.wrote(None if booted == "safe" else target)
            if records:
                self.settle(records)
            return records

        # --- installs ------------------------------------------------------------------------

        @rule(
            sv=st.sampled_from(SECURITY_VERSIONS),
            minor=st.integers(0, 1),
            reboot=st.booleans(),
        )
        def install_healthy(self, sv: int, minor: int, reboot: bool) -> None:
            self.step(f"install {HEALTHY[sv][minor]} reboot={reboot}")
            self.install(bundle(HEALTHY[sv][minor]), reboot=reboot)

        @rule(sv=st.sampled_from(SECURITY_VERSIONS), reboot=st.booleans())
        def install_unhealthy(self, sv: int, reboot: bool) -> None:
            self.step(f"install unhealthy {UNHEALTHY[sv]} reboot={reboot}")
            records = self.install(bundle(UNHEALTHY[sv]), reboot=reboot)
            if records:  # its trial failed its health checks: never the release that runs
                final = records[-1]
                assert final.image is None or final.image.version != UNHEALTHY[sv], records

        @rule(kind=st.sampled_from(["stranger", "other device", "below floor"]))
        def install_refused_bundle(self, kind: str) -> None:
            if kind == "stranger":
                path = bundle("2.0.0", key=stranger)
            elif kind == "other device":
                path = bundle("2.0.0", compatible="other-device")
            else:
                below = [sv for sv in SECURITY_VERSIONS if sv < self.floor()]
                if not below:
                    return
                path = bundle(HEALTHY[below[-1]][0])
            self.step(f"install a bundle of {kind}")
            before = snapshot(self.device)
            with pytest.raises(FleetError):
                self.device.install(path)
            self.assert_unchanged(before, f"install of a bundle of {kind}")

        @rule(where=st.floats(0.0, 1.0))
        def install_damaged_bundle(self, where: float) -> None:
            """A damaged bundle is refused; once its image is being written, the slot it
            wrote is bad, and the running slot and its boot selection are as they were."""
            self.step(f"install a bundle damaged at {where:.3f}")
            data = bytearray(bundle("2.1.0").read_bytes())
            data[min(int(where * len(data)), len(data) - 1)] ^= 0xFF
            path = self.device.root / "damaged.bundle"
            path.write_bytes(bytes(data))
            booted = self.booted()
            backend = self.device.runtime().backend
            primary = None if self.damaged else backend.primary()
            with pytest.raises(FleetError):
                self.device.install(path)
            self.wrote(None if booted == "safe" else "ab".replace(booted, ""))
            after = self.device.runtime().backend
            assert after.booted() == booted
            if primary is not None:
                assert after.primary() == primary and not after.is_trial(), self.trace

        @rule(cut_at=st.integers(0, MAX_CUT), sv=st.sampled_from(SECURITY_VERSIONS),
              unhealthy=st.booleans())  # fmt: skip
        def power_cut_during_install(self, cut_at: int, sv: int, unhealthy: bool) -> None:
            version = UNHEALTHY[sv] if unhealthy else HEALTHY[sv][0]
            self.step(f"install {version}, power cut at boundary {cut_at}")
            booted = self.booted()
            target = None if booted == "safe" else "ab".replace(booted, "")
            records: list[BootRecord] = []
            with (
                PowerSwitch(cut_at=cut_at).installed() as switch,
                contextlib.suppress(PowerCut, FleetError),
            ):
                records = self.device.install(bundle(version))
            if not switch.off:
                self.wrote(target)
                if records:
                    self.settle(records)
                return
            # cut during the install, or during one of the boots after it: check the boot
            # state as the firmware finds it, then switch on again
            self.wrote(target)
            self.check_boot_state()
            self.settle(self.device.power_on())

        # --- boots ---------------------------------------------------------------------------

        @rule()
        def power_cycle(self) -> None:
            self.step("power cut and on")
            self.settle(self.device.power_cut())
            self.wrote(None)

        @rule()
        def reboot(self) -> None:
            self.step("reboot")
            try:
                event = reboot_event(self.device)
            except FleetError:  # no boot state to name a trial: a plain reboot
                event = BootEvent(BootCause.REBOOT)
            self.settle(self.device.settle(event))
            self.wrote(None)

        # --- fleet-updater --------------------------------------------------------------------

        @rule(slot=st.sampled_from(["booted", "other"]), force=st.booleans())
        def mark_bad(self, slot: str, force: bool) -> None:
            booted = self.booted()
            state = self.device.state()
            self.step(f"mark-bad {slot}{' --force' if force else ''}")
            before = snapshot(self.device)
            result = cli(self.device, "mark-bad", slot, *(["--force"] if force else []))
            self.wrote(None)
            if booted == "safe":
                assert result.exit_code != 0
                self.assert_unchanged(before, "mark-bad in safe mode")
                return
            chosen = booted if slot == "booted" else "ab".replace(booted, "")
            other = "ab".replace(chosen, "")
            left = state.slot(other)  # the fallback: good, and not below the floor
            vouched = (
                left.status == "good"
                and (left.security_version or 0) >= state.installed_security_version
            )
            if not force and not vouched:
                assert result.exit_code == 1, result.output
                assert "use --force" in result.output or self.damaged, result.output
                self.assert_unchanged(before, "mark-bad of the last good slot")
            elif result.exit_code == 0:
                assert self.device.state().slot(chosen).status == "bad"
                assert chosen not in boot_view(self.device).bootable, self.trace
            else:
                assert self.damaged, result.output  # only a lost boot state stops it
                self.assert_unchanged(before, "mark-bad over a lost boot state")

        @rule()
        def rollback(self) -> None:
            self.step("rollback")
            before = snapshot(self.device)
            result = cli(self.device, "rollback", "--no-reboot")
            self.wrote(None)
            if result.exit_code != 3:
                assert result.exit_code == 1, result.output
                self.assert_unchanged(before, "a refused rollback")
                return
            self.settle(self.device.settle(reboot_event(self.device)))
            self.wrote(None)

        @precondition(lambda self: not self.damaged and self.booted() == "safe")
        @rule(sv=st.sampled_from(SECURITY_VERSIONS))
        def recover(self, sv: int) -> None:
            """Safe mode recovers the assigned release (here: given by hand)."""
            self.step(f"recover {HEALTHY[sv][1]}")
            result = cli(self.device, "recover", str(bundle(HEALTHY[sv][1])), "--no-reboot")
            assert result.exit_code in (1, 3), result.output
            self.wrote(self.written_slot())
            if result.exit_code == 3:
                self.settle(self.device.settle(reboot_event(self.device)))
            self.wrote(None)

        def written_slot(self) -> str | None:
            changed = [s for s in "ab" if self.device.slot_path(s).read_bytes() != self.slots[s]]
            assert len(changed) <= 1, f"recovery wrote both slots: {self.trace}"
            return changed[0] if changed else None

        @rule(how=st.integers(0, 1))
        def damage_boot_state(self, how: int) -> None:
            self.step(damage_boot_state(self.device, how))
            self.damaged = True

        @rule(mistake=st.sampled_from(["aliased slots", "unknown option", "empty file"]))
        def broken_configuration(self, mistake: str) -> None:
            self.step(f"install with a configuration of {mistake}")
            good = self.device.config_toml()
            if mistake == "aliased slots":
                a = self.device.config.slots["a"]["rootfs"]
                config = good.replace(self.device.config.slots["b"]["rootfs"], a)
                assert config != good
            elif mistake == "unknown option":
                config = good.replace("[limits]", "rollback_everything = true\n[limits]")
            else:
                config = ""
            before = snapshot(self.device)
            result = cli(self.device, "install", str(bundle("2.0.0")), config=config)
            assert result.exit_code != 0 and "Traceback" not in result.output, result.output
            self.assert_unchanged(before, f"a configuration of {mistake}")

        # --- invariants ----------------------------------------------------------------------

        def check_boot_state(self) -> BootView | None:
            """:meth:`read_boot_state`, read again only when what it reads changed."""
            inputs = self.boot_inputs()
            if inputs == self.checked:  # the same files as last checked: the same answer
                return self.view
            self.checked, self.view = inputs, self.read_boot_state()
            return self.view

        def boot_inputs(self) -> tuple[Any, ...]:
            """Everything :meth:`check_boot_state` reads: the boot state, the state store,
            what Linux sees of the boot (not boot_id), and the slots' bytes (by generation)."""
            root = self.device.root
            files = [*boot_files(self.device), root / "data" / "state.json",
                     root / "linux" / "proc" / "cmdline"]  # fmt: skip
            for directory in (root / "data" / "boot", root / "linux" / "proc" / "device-tree"):
                if directory.exists():
                    files.extend(sorted(p for p in directory.rglob("*") if p.is_file()))
            data = tuple((str(p), p.read_bytes() if p.exists() else None) for p in files)
            return (self.generation, self.damaged, data)

        def read_boot_state(self) -> BootView | None:
            """The firmware's next boot lands on a complete release at or above the floor, or
            on safe mode; nothing the store calls bad or half written is bootable. Returns the
            boot state read (``None``: damaged, as a step before made it)."""
            if self.damaged:  # as the backend reads it: still damaged, or repaired since
                try:
                    self.device.runtime().backend.primary()
                except BootStateCorruptError:
                    return None
            view = boot_view(self.device)
            state = self.device.state()
            floor = state.installed_security_version
            chosen = {s for s in (view.committed, view.trial) if s is not None}
            for slot in sorted(chosen):
                image = read_lab_image(self.device.slot_path(slot))
                assert image is not None, f"slot {slot} boots next, incomplete: {self.trace}"
                assert image.version in SECURITY, image
                assert SECURITY[image.version] >= floor, (
                    f"slot {slot} boots next with {image.version}, below the floor {floor}: "
                    f"{self.trace}"
                )
            for slot in sorted(view.bootable):
                status = state.slot(slot).status
                assert status not in UNBOOTABLE, (
                    f"slot {slot} is {status} in the store but bootable ({view.env}): {self.trace}"
                )
            return view

        @invariant()
        def device_is_safe(self) -> None:
            view = self.check_boot_state()
            if not self.settled:
                return
            # a boot check ran: it repaired what it found lost, and it decided every trial
            assert view is not None, f"a boot check left the boot state damaged: {self.trace}"
            final = self.settled[-1]
            state = self.device.state()
            assert view.trial is None, f"a trial pending after a boot check: {self.trace}"
            if final.slot == "safe":
                assert view.committed is None, (view.env, self.trace)
                return
            assert final.action in ("committed", "confirmed"), (self.settled, self.trace)
            assert view.committed == final.slot, (view.env, self.settled, self.trace)
            assert state.slot(final.slot).status == "good", (state, self.trace)

        def teardown(self) -> None:
            shutil.rmtree(self.device.root, ignore_errors=True)

    return DeviceMachine


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_random_sequences_keep_the_device_safe(
    firmware: str,
    make_device: MakeDevice,
    releases: Releases,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Power cuts are the PowerSwitch's, at the write boundaries; a real fsync adds nothing
    # here but time.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    STATEFUL_STEPS.pop(firmware, None)
    stranger = generate_key(tmp_path / "stranger")
    machine = make_machine(firmware, make_device, releases, stranger)
    run_state_machine_as_test(
        machine,
        settings=settings(
            # a run may end before its last step, and a step with nothing to do is not
            # counted: a quarter more runs than STEPS would need
            max_examples=-(-STEPS * 5 // 4 // STEPS_PER_EXAMPLE),
            stateful_step_count=STEPS_PER_EXAMPLE,
            derandomize=True,
            database=None,
            deadline=None,
            print_blob=True,
            suppress_health_check=list(HealthCheck),
        ),
    )
