"""Recovery mode: from the safe-mode slot, put a known-good release back into a root slot.

The safe-mode slot boots when no root slot can (both marked bad or out of attempts, a damaged
boot state, a crash-looping system). It runs this to get the device back: the last known-good
release, from the server's assignment or a local bundle, is written into a root slot and the
slot gets a trial boot; the boot check of that boot commits it.

A recovery is the install pipeline (:meth:`updater.install.Installer.run`) on another route
(:class:`updater.install.Route`); what is its own here is the choice of that route:

- ``check_safe_mode``: only from the safe-mode slot, which no root slot write can touch
  (from a root slot, ``fleet-updater install`` is the tool);
- its keyring and ``compatible`` (the install's other preconditions do not apply: suspended
  updates do not stop a recovery, since safe mode is where the device goes *because* of a
  crash loop); a release below the floor is refused as always;
- ``choose_target``: ``--slot``, else the first root slot the firmware no longer boots
  (attempts 0, or a status other than ``good``), else ``a``;
- arming: ``try_once(target)``, or, when the boot state itself is damaged, ``repair(target)``:
  a fresh boot state with the target committed.

Power cut: before the arming the boot state still boots safe mode (the target is marked bad,
or the block is damaged), which recovers again on the next boot; after it, the target is on
trial and falls back to safe mode if it does not commit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from bootloader_hooks.base import ROOT_SLOTS, SAFE_SLOT, BootSelector
from bootloader_hooks.errors import BootStateCorruptError
from image_builder.bundle import BundleReader, SplitBundleReader
from image_builder.manifest import Manifest
from signing.errors import KeyringError
from signing.keyring import Keyring
from updater.errors import PreconditionError, SlotError
from updater.fetch import open_source
from updater.install import Installer, InstallResult, Route, check_blob_urls
from updater.state import DeviceState


class Recovery:
    """Recovers a device from safe mode; see the module docstring for the steps."""

    def __init__(self, installer: Installer) -> None:
        self.installer = installer
        self.config = installer.config
        self.log = installer.log

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

    def keyring(self) -> Keyring:
        """Raises: PreconditionError: no keyring or compatible configured, or no usable one."""
        if self.config.keyring is None or not self.config.compatible:
            raise PreconditionError("recovery needs a keyring and a compatible string")
        try:
            return Keyring.load(self.config.keyring)
        except KeyringError as err:
            raise PreconditionError(f"cannot recover without a usable keyring: {err}") from err

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
                reboot: bool = True) -> InstallResult:  # fmt: skip
        """Recover from the bundle at ``source`` (a path or an http(s) URL). The caller holds
        the update lock.

        Raises:
            SlotError: not in safe mode, or no usable target.
            PreconditionError, BundleError, VerificationError, BundleCompatibilityError,
            DownloadError: refused before the target was touched.
            InstallError: writing failed; the target stays marked bad.
            BootStateCorruptError: the boot state is damaged and the backend cannot repair it.
        """
        started = self.installer.clock()
        self.check_safe_mode()
        with open_source(source, **self.installer.http(started)) as stream:
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
    ) -> InstallResult:
        """Recover from a release in parts (the server's assignment in safe mode): the
        manifest, its signatures and the URLs of each image, as
        :meth:`updater.install.Installer.install_parts` takes them; ``abandon`` may stop the
        writing (the server withdrew the release). Same steps and errors as :meth:`recover`."""
        started = self.installer.clock()
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
    ) -> InstallResult:
        state = self.installer.load_state()
        self.log.event("recovery.started", source=source)
        keyring = self.keyring()
        route = Route(
            "recovery", "recovery refused", lambda state: self.choose_target(state, slot),
            boot_state_damaged=self.installer.lifecycle.boot_state_problem() is not None,
        )  # fmt: skip
        return self.installer.run(
            reader, keyring, state, started, route,
            reboot=reboot, preflight=preflight, abandon=abandon,
        )  # fmt: skip
