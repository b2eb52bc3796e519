"""The safe-mode slot's image (safe_mode_partition.slot), built with mksquashfs and read back
with unsquashfs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from safe_mode_partition.errors import SafeModeBuildError
from safe_mode_partition.slot import (
    CONFIG,
    KEYRING,
    MARKER,
    RECOVERY_BUNDLE,
    STACK_DIR,
    SafeModeContents,
    build_safe_mode_image,
)

CONFIG_TOML = 'compatible = "metrica-rpi4"\nkeyring = "/etc/fleet/keyring"\n'


@pytest.fixture
def base_root(tmp_path: Path) -> Path:
    root = tmp_path / "base"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "fleet-updater").write_text("#!/usr/bin/python3\n")
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("device\n")
    return root


def listing(image: Path) -> dict[str, str]:
    """Path -> first field of ``unsquashfs -lls`` (type and permissions)."""
    out = subprocess.run(["unsquashfs", "-lls", "-d", "", str(image)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    entries = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[-1].startswith("/"):
            entries[fields[-1]] = fields[0]
        elif len(fields) >= 8 and fields[-2] == "->":
            entries[fields[-3]] = fields[0]
    return entries


def read(image: Path, path: str, tmp_path: Path) -> str:
    target = tmp_path / "out"
    subprocess.run(["unsquashfs", "-f", "-d", str(target), str(image), path],
                   capture_output=True, check=True)  # fmt: skip
    return (target / path).read_text()


def test_the_slot_holds_config_keyring_marker_stack_and_recovery_unit(
    tmp_path: Path, base_root: Path, keyring_dir: Path
) -> None:
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "docker-compose.yml").write_text("services: {}\n")
    output = tmp_path / "safe.squashfs"
    contents = SafeModeContents(keyring_dir, CONFIG_TOML, stack_dir=stack)
    image = build_safe_mode_image(base_root, contents, output)
    assert image.fs_type == "squashfs"
    assert output.read_bytes()[:4] == b"hsqs"
    entries = listing(output)
    for path in (MARKER, CONFIG, f"{STACK_DIR}/docker-compose.yml", "etc/hostname",
                 "usr/bin/fleet-updater"):  # fmt: skip
        assert f"/{path}" in entries, path
    assert any(p.startswith(f"/{KEYRING}/") and p.endswith(".pub") for p in entries)
    assert read(output, MARKER, tmp_path) == "format=1\n"
    unit = read(output, "etc/systemd/system/fleet-safe-mode.service", tmp_path)
    assert f"fleet-updater recover {RECOVERY_BUNDLE}" in unit
    assert entries["/etc/systemd/system/multi-user.target.wants/fleet-safe-mode.service"][0] == "l"
    # Read-only: the base tree is not changed by staging.
    assert not (base_root / MARKER).exists()


def test_the_same_inputs_give_the_same_image(
    tmp_path: Path, base_root: Path, keyring_dir: Path
) -> None:
    contents = SafeModeContents(keyring_dir, CONFIG_TOML)
    one = build_safe_mode_image(base_root, contents, tmp_path / "one.squashfs")
    two = build_safe_mode_image(base_root, contents, tmp_path / "two.squashfs")
    assert one.path.read_bytes() == two.path.read_bytes()


def test_a_tree_that_could_not_recover_a_device_is_refused(tmp_path: Path, base_root: Path) -> None:
    empty_keyring = tmp_path / "empty-keyring"
    empty_keyring.mkdir()
    (base_root / "usr" / "bin" / "fleet-updater").unlink()
    contents = SafeModeContents(empty_keyring, "compatible = 7\n")
    output = tmp_path / "safe.squashfs"
    with pytest.raises(SafeModeBuildError) as raised:
        build_safe_mode_image(base_root, contents, output)
    message = str(raised.value)
    assert "compatible" in message
    assert "keyring" in message
    assert "no fleet-updater" in message
    assert not output.exists()
