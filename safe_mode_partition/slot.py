"""The safe-mode slot: what it holds and how it is built.

The firmware boots the safe-mode slot when no root slot can boot (DESIGN.md, "Boot selection").
It is the device's last resort, so it is read-only (squashfs: nothing at run time can damage
it) and holds only what it takes to phone home and be repaired:

- a base root filesystem (Raspberry Pi OS or Debian, with Python and the updater installed),
  given by the caller; for Raspberry Pi OS devices it carries the device's compose stack under
  :data:`STACK_DIR` (SSH, Netdata for metrics, the log shipper), which starts as on a root slot;
- the updater's configuration and the keyring of trusted release keys (copied here, so a
  damaged data partition or root slot cannot take them away);
- ``/etc/fleet/safe-mode``: tells every tool that this is the safe-mode slot (format version);
- on systemd roots, ``fleet-safe-mode.service``: recovery mode
  (:mod:`updater.recovery`) from the bundle an operator or the server left on the data
  partition at :data:`RECOVERY_BUNDLE`. The boot check reports ``safe_mode`` and the updater
  daemon (``fleet-updater.service``, from the base root) keeps heartbeating, so the device
  shows as ``safe_mode`` on the dashboard.

:func:`build_safe_mode_image` refuses a tree that could not recover a device: no valid
configuration, no trusted key, no ``fleet-updater``.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from image_builder.filesystem import FilesystemImage, build_filesystem_image
from safe_mode_partition.errors import SafeModeBuildError
from signing.errors import KeyringError
from signing.keyring import Keyring
from updater.config import parse_config
from updater.errors import ConfigError

FORMAT = 1
MARKER = "etc/fleet/safe-mode"
CONFIG = "etc/fleet/updater.toml"
KEYRING = "etc/fleet/keyring"
STACK_DIR = "opt/fleet/stack"
RECOVERY_BUNDLE = "/var/lib/fleet/recovery.bundle"
UPDATER_PATHS = ("usr/bin/fleet-updater", "usr/local/bin/fleet-updater")
UNIT_DIR = "etc/systemd/system"

RECOVERY_UNIT = f"""\
# Safe mode: put the last known-good release back into a root slot and boot it.
[Unit]
Description=Metrica Fleet recovery (safe mode)
After=local-fs.target fleet-boot-check.service
ConditionPathExists=/{MARKER}
ConditionPathExists={RECOVERY_BUNDLE}

[Service]
Type=oneshot
ExecStart=/usr/bin/fleet-updater recover {RECOVERY_BUNDLE}
StandardOutput=journal
StandardError=journal

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class SafeModeContents:
    """What the safe-mode slot adds to its base root.

    ``updater_config`` is the device's ``updater.toml`` (the same settings as the root slots:
    compatible string, keyring path, boot backend, slots); ``stack_dir``, if given, is the
    compose project copied to :data:`STACK_DIR`; ``systemd`` installs and enables the recovery
    unit (a base root without systemd starts recovery from its own init).
    """

    keyring: Path
    updater_config: str
    stack_dir: Path | None = None
    systemd: bool = True


def stage_tree(base_root: Path, contents: SafeModeContents, staging: Path) -> None:
    """Copy ``base_root`` to ``staging`` (which must not exist) and add the safe-mode files.

    Raises:
        SafeModeBuildError: the base root is missing, or a file cannot be written.
    """
    if not base_root.is_dir():
        raise SafeModeBuildError(f"safe-mode slot: base root {base_root} is not a directory")
    try:
        shutil.copytree(base_root, staging, symlinks=True)
        (staging / MARKER).parent.mkdir(parents=True, exist_ok=True)
        (staging / MARKER).write_text(f"format={FORMAT}\n")
        (staging / CONFIG).write_text(contents.updater_config)
        keyring = staging / KEYRING
        shutil.rmtree(keyring, ignore_errors=True)
        shutil.copytree(contents.keyring, keyring)
        if contents.stack_dir is not None:
            stack = staging / STACK_DIR
            shutil.rmtree(stack, ignore_errors=True)
            shutil.copytree(contents.stack_dir, stack, symlinks=True)
        if contents.systemd:
            units = staging / UNIT_DIR
            (units / "multi-user.target.wants").mkdir(parents=True, exist_ok=True)
            (units / "fleet-safe-mode.service").write_text(RECOVERY_UNIT)
            wanted = units / "multi-user.target.wants" / "fleet-safe-mode.service"
            wanted.unlink(missing_ok=True)
            wanted.symlink_to("../fleet-safe-mode.service")
    except OSError as err:
        raise SafeModeBuildError(f"safe-mode slot: cannot stage {staging}: {err}") from err


def check_tree(root: Path, *, updater_paths: tuple[str, ...] = UPDATER_PATHS) -> list[str]:
    """What keeps the tree at ``root`` from recovering a device; empty when nothing does."""
    problems: list[str] = []
    try:
        config = parse_config((root / CONFIG).read_bytes(), f"/{CONFIG}")
    except OSError as err:
        problems.append(f"/{CONFIG}: {err.strerror}")
    except ConfigError as err:
        problems.append(str(err))
    else:
        if not config.compatible:
            problems.append(f"/{CONFIG}: no compatible string (recovery would refuse)")
    try:
        if not Keyring.load(root / KEYRING).active_key_ids:
            problems.append(f"/{KEYRING}: no trusted key")
    except KeyringError as err:
        problems.append(f"/{KEYRING}: {err}")
    if updater_paths and not any((root / path).exists() for path in updater_paths):
        problems.append(f"no fleet-updater (looked for /{', /'.join(updater_paths)})")
    return problems


def build_safe_mode_image(
    base_root: Path,
    contents: SafeModeContents,
    output: Path,
    *,
    updater_paths: tuple[str, ...] = UPDATER_PATHS,
    source_date_epoch: int | None = None,
) -> FilesystemImage:
    """Build the safe-mode slot's squashfs image at ``output`` from ``base_root`` plus
    ``contents``. ``updater_paths`` are where ``fleet-updater`` may be in the tree (empty: the
    base root runs it from elsewhere, as the QEMU reference device does).

    Power cut or failure: ``output`` keeps its old content until the finished image replaces
    it (see :func:`image_builder.filesystem.build_filesystem_image`).

    Raises:
        SafeModeBuildError: the tree could not recover a device (every problem is named).
        ImageBuildError: mksquashfs missing or failing.
    """
    with tempfile.TemporaryDirectory(prefix="fleet-safe-mode-") as scratch:
        staging = Path(scratch) / "root"
        stage_tree(base_root, contents, staging)
        problems = check_tree(staging, updater_paths=updater_paths)
        if problems:
            raise SafeModeBuildError(
                "safe-mode slot cannot recover a device: " + "; ".join(problems)
            )
        return build_filesystem_image(
            staging, output, "squashfs", source_date_epoch=source_date_epoch
        )
