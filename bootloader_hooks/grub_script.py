"""The ``grub.cfg`` of the ``grub`` backend: the script GRUB runs at every boot.

At boot the script loads ``BOOT_ORDER`` and the ``BOOT_<letter>_LEFT`` counts from ``grubenv``
(and nothing else: the block cannot set other variables), takes the first slot of the order
with a count of 1-9, saves that count less one, and boots the slot with ``fleet.slot=<slot>``
on the kernel command line. A count that cannot be saved moves on to the next slot; with no
slot left, no readable ``grubenv``, or a kernel that does not load (GRUB's ``fallback``), it
boots the safe-mode slot. The scheme, and what Linux reads from the block, are described in
:mod:`bootloader_hooks.grub`.

:func:`grub_cfg` renders the script from the three boot entries (:class:`SlotEntry`),
:func:`write_grub_cfg` writes it on the ESP (:func:`write_cfg_file` at any path), and
:func:`install_files` installs it keeping an existing ``grubenv``. A fresh ESP is made by
:func:`bootloader_hooks.base.provision`.

GRUB needs the modules ``normal``, ``test``, ``loadenv``, ``linux``, ``part_gpt``, ``fat``,
``ext2`` and ``squash4`` (built into the image or found under ``$prefix``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bootloader_hooks.base import ALL_SLOTS, ROOT_SLOTS, SAFE_SLOT
from bootloader_hooks.errors import BootloaderError
from bootloader_hooks.grub import (
    CFG_FILE,
    DEFAULT_ATTEMPTS,
    ENV_FILE,
    ESP_DIRECTORY,
    MAX_ATTEMPTS,
    ORDER_VAR,
    WHO,
    left_var,
    provision,
)
from fleet_core import durable


@dataclass(frozen=True)
class SlotEntry:
    """How GRUB boots one slot.

    ``kernel`` and ``initrd`` are GRUB file names, device included (``(hd0,gpt2)/vmlinuz``);
    ``initrd`` may be empty. ``root`` is the kernel's ``root=`` value and ``options`` the other
    kernel parameters; ``fleet.slot=`` is added by :func:`grub_cfg`.
    """

    kernel: str
    initrd: str
    root: str
    options: str = "ro"


# The reference disk: 1 esp, 2 root_a, 3 root_b, 4 root_safe, 5 data (DESIGN.md).
DEFAULT_ENTRIES: Mapping[str, SlotEntry] = {
    "a": SlotEntry("(hd0,gpt2)/vmlinuz", "(hd0,gpt2)/initrd.img", "PARTLABEL=root_a"),
    "b": SlotEntry("(hd0,gpt3)/vmlinuz", "(hd0,gpt3)/initrd.img", "PARTLABEL=root_b"),
    SAFE_SLOT: SlotEntry("(hd0,gpt4)/vmlinuz", "(hd0,gpt4)/initrd.img", "PARTLABEL=root_safe"),
}
DEFAULT_ENV_FILE = "${config_directory}/grubenv"

# Characters that mean nothing to GRUB's parser outside quotes (its metacharacters are
# { } | & $ ; < > and blanks), so entry fields can be written as plain words.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_.,/()=:+@%-]+")
_ENV_FILE = re.compile(r"[A-Za-z0-9_.,/()=:+@%${}-]+")


def _plain(field: str, value: str, *, words: bool = False) -> str:
    parts = value.split(" ") if words else [value]
    if not all(_PLAIN_WORD.fullmatch(part) for part in parts):
        raise BootloaderError(
            f"{WHO}: {field} {value!r} may hold only letters, digits and '_.,/()=:+@%-'"
            + (" (words separated by single spaces)" if words else "")
        )
    return value


def _linux_line(slot: str, entry: SlotEntry) -> str:
    kernel = _plain(f"kernel of slot {slot}", entry.kernel)
    root = _plain(f"root of slot {slot}", entry.root)
    options = _plain(f"options of slot {slot}", entry.options, words=True) if entry.options else ""
    return " ".join(
        word for word in ("  linux", kernel, f"root={root}", options, f"fleet.slot={slot}") if word
    )


def _menuentry(slot: str, entry: SlotEntry) -> list[str]:
    title = "safe mode" if slot == SAFE_SLOT else f"slot {slot.upper()}"
    lines = [f'menuentry "Metrica Fleet {title}" --id fleet-{slot} {{', _linux_line(slot, entry)]
    if entry.initrd:
        lines.append(f"  initrd {_plain(f'initrd of slot {slot}', entry.initrd)}")
    lines.append("}")
    return lines


def _choose(slot: str) -> list[str]:
    """Script lines: if ``slot`` is the current word of BOOT_ORDER and has attempts left, take
    one, save it, and choose the slot."""
    letter, var = slot.upper(), left_var(slot)
    lines = [f'      if [ "$fleet_slot" = "{letter}" ]; then']
    for count in range(MAX_ATTEMPTS, 0, -1):
        keyword = "if" if count == MAX_ATTEMPTS else "elif"
        lines += [
            f'        {keyword} [ "${var}" = "{count}" ]; then',
            f"          set {var}={count - 1}",
            f"          set fleet_boot={slot}",
        ]
    lines += [
        "        fi",
        f'        if [ "$fleet_boot" = "{slot}" ]; then',
        "          # Boot the slot only if the spent attempt is on disk.",
        "          set fleet_boot=safe",
        f'          if save_env --file "$fleet_env" {var}; then',
        f"            set fleet_boot={slot}",
        "          fi",
        "        fi",
        "      fi",
    ]
    return lines


def grub_cfg(
    entries: Mapping[str, SlotEntry] = DEFAULT_ENTRIES, *, env_file: str = DEFAULT_ENV_FILE
) -> str:
    """The ``grub.cfg`` text that implements the scheme of this module.

    ``entries`` says how to boot each of ``a``, ``b`` and ``safe``; ``env_file`` is the GRUB
    file name of the block (by default ``grubenv`` beside ``grub.cfg``).

    Raises:
        BootloaderError: an entry is missing, or a field holds characters that GRUB's parser
            would interpret.
    """
    missing = [slot for slot in ALL_SLOTS if slot not in entries]
    if missing or len(entries) != len(ALL_SLOTS):
        raise BootloaderError(f"{WHO}: grub.cfg needs exactly the entries {', '.join(ALL_SLOTS)}")
    if not _ENV_FILE.fullmatch(env_file):
        raise BootloaderError(f"{WHO}: env_file {env_file!r} holds characters GRUB interprets")
    left_vars = " ".join(left_var(slot) for slot in ROOT_SLOTS)
    lines = [
        "# Metrica Fleet boot selection, installed by the grub backend (bootloader_hooks.grub).",
        "# Generated: edits are lost. State lives in grubenv: BOOT_ORDER (letters to try, in",
        "# order) and BOOT_<letter>_LEFT (boots the slot may still take, one digit). Each boot",
        "# takes one attempt from the first slot with one left and saves that before booting;",
        "# with none left, or no readable grubenv, the safe-mode slot boots.",
        "set timeout=0",
        "set timeout_style=hidden",
        # GRUB 2.06 takes `fallback` as entry numbers only (its manual says "as for default",
        # but an id or a title there is dropped, and no fallback is tried).
        f"set fallback={ALL_SLOTS.index(SAFE_SLOT)}",
        f'set fleet_env="{env_file}"',
        "set fleet_boot=safe",
        'set BOOT_ORDER=""',
        *(f"set {left_var(slot)}=0" for slot in ROOT_SLOTS),
        f'if load_env --file "$fleet_env" {ORDER_VAR} {left_vars}; then',
        f"  for fleet_slot in ${ORDER_VAR}; do",
        '    if [ "$fleet_boot" = "safe" ]; then',
    ]
    for slot in ROOT_SLOTS:
        lines += _choose(slot)
    lines += [
        "    fi",
        "  done",
        "fi",
        'set default="fleet-$fleet_boot"',
    ]
    for slot in ALL_SLOTS:
        lines += ["", *_menuentry(slot, entries[slot])]
    return "\n".join(lines) + "\n"


def write_grub_cfg(esp_dir: Path, entries: Mapping[str, SlotEntry] = DEFAULT_ENTRIES) -> Path:
    """Write :func:`grub_cfg` of ``entries`` as ``EFI/fleet/grub.cfg`` under the ESP mounted at
    ``esp_dir``, atomically; return its path.

    Raises:
        BootloaderError: the file cannot be written, or ``entries`` are invalid.
    """
    return write_cfg_file(esp_dir / ESP_DIRECTORY / CFG_FILE, entries)


def write_cfg_file(
    cfg_path: Path,
    entries: Mapping[str, SlotEntry] = DEFAULT_ENTRIES,
    *,
    env_file: str = DEFAULT_ENV_FILE,
) -> Path:
    """Write :func:`grub_cfg` of ``entries`` and ``env_file`` as ``cfg_path``, atomically (its
    directory made if need be); return ``cfg_path``. Power cut: the old file or the new one.

    Raises:
        BootloaderError: the file cannot be written, or ``entries`` or ``env_file`` are invalid.
    """
    text = grub_cfg(entries, env_file=env_file)
    try:
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        durable.atomic_write(cfg_path, text.encode())
    except OSError as err:
        raise BootloaderError(f"{WHO}: cannot write {cfg_path}: {err.strerror}") from err
    return cfg_path


def install_files(
    esp_dir: Path,
    entries: Mapping[str, SlotEntry] = DEFAULT_ENTRIES,
    *,
    primary: str = "a",
    attempts: int = DEFAULT_ATTEMPTS,
) -> tuple[Path, Path]:
    """Install ``EFI/fleet/grub.cfg`` under the ESP mounted at ``esp_dir``, keeping its boot
    state; return the paths of ``grub.cfg`` and ``grubenv``.

    An existing grubenv is kept, damaged or not: it records which slot is committed, and
    reinstalling the boot script must not forget that. Without one, the ESP is provisioned
    (:func:`bootloader_hooks.base.provision`: a fresh grubenv with ``primary`` committed).

    Power cut: each file is replaced atomically; a cut between the two leaves the new
    grub.cfg with the old (or no) grubenv, and GRUB then boots the safe-mode slot.

    Raises:
        BootloaderError: a file cannot be written, or ``entries`` are invalid.
    """
    env_path = esp_dir / ESP_DIRECTORY / ENV_FILE
    if env_path.exists():
        return write_grub_cfg(esp_dir, entries), env_path
    files = provision(esp_dir, primary=primary, attempts=attempts, entries=entries)
    return files[f"{ESP_DIRECTORY}/{CFG_FILE}"], files[f"{ESP_DIRECTORY}/{ENV_FILE}"]
