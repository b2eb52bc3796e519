"""Where each backend's boot script goes when a device is provisioned, and that an existing
one is never overwritten (bootloader_hooks.boot_scripts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bootloader_hooks import boot_scripts, grub_script, uboot_script
from bootloader_hooks.errors import BootloaderError
from bootloader_hooks.grub import GrubBackend
from bootloader_hooks.tryboot import TrybootBackend
from bootloader_hooks.uboot import UBootBackend
from bootloader_hooks.ubootenv import EnvLayout

ENV_SIZE = 0x4000


def uboot_file(tmp_path: Path, offset: int = 0) -> UBootBackend:
    env = tmp_path / "boot" / "uboot.env"
    env.parent.mkdir(parents=True, exist_ok=True)
    env.write_bytes(bytes(2 * ENV_SIZE + offset))
    return UBootBackend(EnvLayout.redundant_pair(env, ENV_SIZE, offset, offset + ENV_SIZE, None))


def test_grub_cfg_goes_beside_the_configured_grubenv(tmp_path: Path) -> None:
    env = tmp_path / "esp" / "boot" / "state.env"
    (script,) = boot_scripts.plan(GrubBackend(env))
    assert (script.name, script.path, script.action) == ("grub.cfg", env.parent / "grub.cfg",
                                                         "write")  # fmt: skip
    assert not env.parent.exists()  # a plan writes nothing
    assert boot_scripts.install([script]) == (env.parent / "grub.cfg",)
    expected = grub_script.grub_cfg(env_file="${config_directory}/state.env")
    assert (env.parent / "grub.cfg").read_text() == expected


def test_a_grubenv_name_grub_would_interpret_fails_the_plan(tmp_path: Path) -> None:
    with pytest.raises(BootloaderError, match="holds characters GRUB interprets"):
        boot_scripts.plan(GrubBackend(tmp_path / "grub env;reboot"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("firmware", ["grub", "uboot"])
def test_an_existing_script_is_kept_whatever_it_holds(tmp_path: Path, firmware: str) -> None:
    if firmware == "grub":
        backend: GrubBackend | UBootBackend = GrubBackend(tmp_path / "grubenv")
        existing = tmp_path / "grub.cfg"
    else:
        backend = uboot_file(tmp_path)
        existing = tmp_path / "boot" / "boot.scr"
    existing.write_bytes(b"")  # even an empty one: only the device knows what it boots
    (script,) = boot_scripts.plan(backend)
    assert (script.path, script.action) == (existing, "keep")
    assert script.to_dict()["action"] == "kept"
    assert boot_scripts.install([script]) == ()
    assert existing.read_bytes() == b""


def test_a_script_that_appeared_since_the_plan_is_kept(tmp_path: Path) -> None:
    (script,) = boot_scripts.plan(GrubBackend(tmp_path / "grubenv"))
    (tmp_path / "grub.cfg").write_bytes(b"# someone else's\n")
    assert boot_scripts.install([script]) == ()
    assert (tmp_path / "grub.cfg").read_bytes() == b"# someone else's\n"
    assert script.to_dict(written=False)["action"] == "kept"


def test_boot_scr_goes_beside_a_file_backed_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    backend = uboot_file(tmp_path)
    backend.attempts = 2
    (script,) = boot_scripts.plan(backend)
    scr = tmp_path / "boot" / "boot.scr"
    assert (script.name, script.path, script.action) == ("boot.scr", scr, "write")
    assert "devtype mmc, devnum 0, kernel Image, boot_command booti" in script.detail
    assert boot_scripts.install([script]) == (scr,)
    text = uboot_script.boot_script(attempts=2)
    assert scr.read_bytes() == uboot_script.script_image(text, timestamp=1_700_000_000)
    assert script.to_dict(written=True)["action"] == "written"


@pytest.mark.parametrize("where", ["offset", "device", "no-directory"])
def test_no_boot_scr_where_no_boot_partition_is_known(tmp_path: Path, where: str) -> None:
    if where == "offset":  # an environment inside a disk image, at an offset
        backend = uboot_file(tmp_path, offset=0x10000)
        reason = f"not a file of its own ({tmp_path / 'boot' / 'uboot.env'}@0x10000)"
    elif where == "device":
        backend = UBootBackend(EnvLayout.single(os.devnull, ENV_SIZE))
        reason = "not a file of its own (/dev/null)"
    else:
        backend = UBootBackend(EnvLayout.single(tmp_path / "missing" / "uboot.env", ENV_SIZE))
        reason = "does not exist"
    before = sorted(tmp_path.rglob("*"))
    (script,) = boot_scripts.plan(backend)
    assert (script.name, script.path, script.action) == ("boot.scr", None, "none")
    assert script.detail.startswith("not written: ") and reason in script.detail
    assert boot_scripts.install([script]) == ()
    assert sorted(tmp_path.rglob("*")) == before


def test_tryboot_needs_no_script() -> None:
    assert boot_scripts.plan(TrybootBackend()) == ()
