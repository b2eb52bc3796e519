"""Recovery mode: from the safe-mode slot, put a known-good release back into a root slot.

The safe-mode slot boots when no root slot can (both marked bad or out of attempts, a damaged
boot state, a crash-looping system). It runs this to get the device back: the last known-good
release, from the server's assignment or a local bundle, is written into a root slot and the
slot gets a trial boot; the boot check of that boot commits it. The same steps as an install
(:mod:`updater.install`), each a method and a log event:

1. ``check_safe_mode``: only from the safe-mode slot, which no root slot write can touch
   (from a root slot, ``fleet-updater install`` is the tool);
2. ``verify``: signature against the keyring, ``compatible``, ``security_version`` not below
   the installed one (recovery never downgrades past anti-rollback);
3. ``choose_target``: ``--slot``, else the first root slot the firmware no longer boots
   (attempts 0, or a status other than ``good``), else ``a``;
4. mark the target ``installing`` (and bad in the boot state), write and verify the image,
   ``installed``;
5. arm: ``try_once(target)``, or, when the boot state itself is damaged, ``repair(target)``:
   a fresh boot state with the target committed (the damaged one names no slot any more, and
   the image just verified is the only one known to be whole);
6. reboot (unless told not to).

Suspended updates (crash-loop guard) do not stop a recovery: safe mode is where the device
goes *because* of a crash loop.

Power cut: before step 5 the boot state still boots safe mode (the target is marked bad, or the
block is damaged), which recovers again on the next boot; after it, the target is on trial and
falls back to safe mode if it does not commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from bootloader_hooks.base import ROOT_SLOTS, SAFE_SLOT, BootSelector, Repairable
from bootloader_hooks.errors import BootStateCorruptError
from fleet_core.errors import FleetError
from image_builder.bundle import BundleReader, SplitBundleReader
from image_builder.errors import BundleCompatibilityError
from image_builder.manifest import Manifest
from signing.errors import KeyringError
from signing.keyring import Keyring
from updater.config import UpdaterConfig
from updater.device import run_reboot
from updater.errors import InstallAbandonedError, InstallError, PreconditionError, SlotError
from updater.fetch import open_source
from updater.install import Installer, check_blob_urls, checked_targets
from updater.lifecycle import below_floor
from updater.log import EventSink
from updater.state import DeviceState, StateStore


@dataclass(frozen=True)
class RecoveryResult:
    slot: str
    version: str
    bytes_written: int
    seconds: float
    armed: str  # "trial", or "repaired" (a fresh boot state with the slot committed)
    rebooting: bool


class Recovery:
    """Recovers a device from safe mode; see the module docstring for the steps."""

    def __init__(
        self,
        config: UpdaterConfig,
        installer: Installer,
        store: StateStore,
        log: EventSink,
        *,
        reboot: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        self.config = config
        self.installer = installer
        self.store = store
        self.log = log
        self._reboot = reboot or run_reboot

    @property
    def backend(self) -> BootSelector:
        return self.installer.backend

    def check_safe_mode(self) -> None:
        """Raises: SlotError: not running from the safe-mode slot."""
        booted = self.backend.booted()
        if booted != SAFE_SLOT:
            raise SlotError(
                f"running from slot {booted!r}: recovery runs in safe mode only "
                "(use 'fleet-updater install' from a root slot)"
            )

    def verify(
        self, reader: BundleReader | SplitBundleReader, state: DeviceState
    ) -> tuple[Manifest, Keyring]:
        """Raises: PreconditionError, BundleError, VerificationError, BundleCompatibilityError."""
        if self.config.keyring is None or not self.config.compatible:
            raise PreconditionError("recovery needs a keyring and a compatible string")
        try:
            keyring = Keyring.load(self.config.keyring)
        except KeyringError as err:
            raise PreconditionError(f"cannot recover without a usable keyring: {err}") from err
        manifest = reader.verify(keyring)
        if manifest.compatible != self.config.compatible:
            raise BundleCompatibilityError(
                f"bundle is for {manifest.compatible!r}, this device is {self.config.compatible!r}"
            )
        below = below_floor(state, manifest.security_version)
        if below is not None:
            raise BundleCompatibilityError(f"{below}: recovery refused")
        if manifest.image("rootfs") is None:
            raise SlotError("bundle has no rootfs image")
        return manifest, keyring

    def choose_target(self, state: DeviceState, wanted: str | None) -> str:
        if wanted is not None:
            if wanted not in ROOT_SLOTS:
                raise SlotError(f"unknown slot {wanted!r} (root slots: {', '.join(ROOT_SLOTS)})")
            return wanted
        for slot in ROOT_SLOTS:
            try:
                attempts = self.backend.attempts_left(slot)
            except BootStateCorruptError:
                attempts = 0
            if attempts == 0 or state.slot(slot).status != "good":
                return slot
        return ROOT_SLOTS[0]

    def recover(self, source: str, *, slot: str | None = None,
                reboot: bool = True) -> RecoveryResult:  # fmt: skip
        """Recover from the bundle at ``source`` (a path or an http(s) URL). The caller holds
        the update lock.

        Raises:
            SlotError: not in safe mode, or no usable target.
            PreconditionError, BundleError, VerificationError, BundleCompatibilityError,
            DownloadError: refused before the target was touched.
            InstallError: writing failed; the target stays marked bad.
            BootStateCorruptError: the boot state is damaged and the backend cannot repair it.
        """
        started = time.monotonic()
        self.check_safe_mode()
        deadline = started + self.config.limits.update_deadline_s
        with open_source(source, deadline=deadline) as stream:
            return self._recover(BundleReader(stream, name=source), source, started, slot, reboot)

    def recover_parts(
        self,
        manifest_bytes: bytes,
        envelope_bytes: bytes,
        blob_urls: Mapping[str, Sequence[str]],
        *,
        name: str = "release",
        slot: str | None = None,
        reboot: bool = True,
        abandon: Callable[[], str | None] | None = None,
    ) -> RecoveryResult:
        """Recover from a release in parts (the server's assignment in safe mode): the
        manifest, its signatures and the URLs of each image, as
        :meth:`updater.install.Installer.install_parts` takes them; ``abandon`` may stop the
        writing (the server withdrew the release). Same steps and errors as :meth:`recover`."""
        started = time.monotonic()
        self.check_safe_mode()
        reader = self.installer.parts_reader(manifest_bytes, envelope_bytes, blob_urls, name)
        return self._recover(
            reader, name, started, slot, reboot,
            preflight=lambda manifest: check_blob_urls(manifest, blob_urls, name),
            abandon=abandon,
        )  # fmt: skip

    def _recover(
        self,
        reader: BundleReader | SplitBundleReader,
        source: str,
        started: float,
        slot: str | None,
        reboot: bool,
        *,
        preflight: Callable[[Manifest], None] | None = None,
        abandon: Callable[[], str | None] | None = None,
    ) -> RecoveryResult:
        loaded = self.store.load()
        if loaded.problem:
            self.log.event("state.damaged", level="warning", detail=loaded.problem)
        state = loaded.state
        self.log.event("recovery.started", source=source)
        manifest, _ = self.verify(reader, state)
        if preflight is not None:
            preflight(manifest)
        target = self.choose_target(state, slot)
        targets = checked_targets(self.config, manifest, target)
        damaged = self.installer.lifecycle.boot_state_problem() is not None
        self.log.event("recovery.verified", version=manifest.version, slot=target,
                       boot_state_damaged=damaged)  # fmt: skip
        state = self.installer.lifecycle.begin_install(
            state, target, version=manifest.version, bundle_sha256=reader.manifest_sha256,
            security_version=manifest.security_version, boot_state_damaged=damaged,
        )  # fmt: skip
        try:
            written = self.installer.write_images(reader, targets, abandon=abandon)
        except InstallAbandonedError as err:
            self.log.event("recovery.abandoned", level="warning", slot=target, error=str(err))
            self.installer.lifecycle.fail_install(state, target)
            raise
        except (FleetError, OSError) as err:
            self.log.event("recovery.failed", level="error", slot=target, error=str(err))
            self.installer.lifecycle.fail_install(state, target)
            raise InstallError(f"recovery into slot {target} failed: {err}") from err
        armed = self._arm(state, target, damaged)
        seconds = time.monotonic() - started
        self.log.event("recovery.finished", slot=target, version=manifest.version,
                       armed=armed, bytes=written, seconds=round(seconds, 3))  # fmt: skip
        if reboot:
            command = list(self.config.reboot_command or self.backend.reboot_command())
            self.log.event("recovery.rebooting", command=command)
            self._reboot(command)
        return RecoveryResult(target, manifest.version, written, seconds, armed, reboot)

    def _arm(self, state: DeviceState, target: str, damaged: bool) -> str:
        if not damaged:
            self.installer.arm_trial(state, target)
            return "trial"
        if not isinstance(self.backend, Repairable):
            raise BootStateCorruptError(
                f"boot state is damaged and the {self.backend.name} backend cannot repair it"
            )
        self.installer.lifecycle.repair_into(state, target, self.backend.repair)
        self.log.event("recovery.boot_state_repaired", slot=target)
        return "repaired"
