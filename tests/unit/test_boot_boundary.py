"""The boot selection boundary the three backends share: one provisioning call that writes what
``repair`` writes, one registry, the same shape of options and methods in every backend."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import ModuleType

import pytest

from bootloader_hooks import grub, tryboot, uboot, ubootenv
from bootloader_hooks.base import (
    BACKENDS,
    OPTION_CHECKS,
    PROVISIONERS,
    BootSelector,
    check_options,
    provision,
    provisioned_files,
)
from bootloader_hooks.errors import BootloaderError, UnknownBackendError, UnknownSlotError
from bootloader_hooks.grub_script import DEFAULT_ENTRIES, SlotEntry, grub_cfg
from bootloader_hooks.tryboot import TrybootBackend, TrybootConfig
from bootloader_hooks.uboot import UBootBackend
from bootloader_hooks.ubootenv import EnvLayout

MODULES: dict[str, ModuleType] = {"grub": grub, "tryboot": tryboot, "uboot": uboot}
BACKEND_CLASSES = {"grub": grub.GrubBackend, "tryboot": TrybootBackend, "uboot": UBootBackend}
BOARD_ENV = {"bootcmd": "run distro_bootcmd", "ethaddr": "02:00:00:00:00:01", "bootdelay": "2"}
ENV_SIZE = 0x2000
PRIMARIES = ["a", "b", None]


# --- provisioning writes what repair writes ------------------------------------------------------


@pytest.mark.parametrize("primary", PRIMARIES)
@pytest.mark.parametrize("attempts", [1, 3, 9])
def test_grub_provisioning_is_a_repaired_block_beside_our_grub_cfg(
    tmp_path: Path, primary: str | None, attempts: int
) -> None:
    files = provision("grub", tmp_path / "esp", primary=primary, attempts=attempts)
    assert sorted(files) == ["EFI/fleet/grub.cfg", "EFI/fleet/grubenv"]
    assert files["EFI/fleet/grubenv"] == tmp_path / "esp" / "EFI" / "fleet" / "grubenv"
    repaired = tmp_path / "repaired"
    grub.GrubBackend(repaired, attempts=attempts).repair(primary)
    assert files["EFI/fleet/grubenv"].read_bytes() == repaired.read_bytes()
    assert files["EFI/fleet/grub.cfg"].read_text() == grub_cfg(DEFAULT_ENTRIES)


def test_grub_provisioning_takes_the_entries_and_kernel_options(tmp_path: Path) -> None:
    entries = {**DEFAULT_ENTRIES, "a": SlotEntry("(hd1,gpt5)/vmlinuz", "", "PARTUUID=1-5")}
    files = provision("grub", tmp_path, entries=entries, kernel_options="ro console=ttyS0")
    expected = {slot: SlotEntry(e.kernel, e.initrd, e.root, "ro console=ttyS0")
                for slot, e in entries.items()}  # fmt: skip
    assert files["EFI/fleet/grub.cfg"].read_text() == grub_cfg(expected)


def test_grub_provisioning_replaces_whatever_boot_state_was_there(tmp_path: Path) -> None:
    grubenv = provision("grub", tmp_path)["EFI/fleet/grubenv"]
    backend = grub.GrubBackend(grubenv)
    backend.mark_bad("a")
    grubenv.write_bytes(b"damaged")
    provision("grub", tmp_path, primary="b")
    assert (backend.primary(), backend.attempts_left("a")) == ("b", 0)


def tryboot_backend(autoboot_txt: Path, state_dir: Path) -> TrybootBackend:
    return TrybootBackend(TrybootConfig(autoboot_txt=autoboot_txt, state_dir=state_dir))


def tryboot_answers(backend: TrybootBackend) -> tuple[object, ...]:
    return (
        backend.primary(),
        backend.attempts_left("a"),
        backend.attempts_left("b"),
        backend.last_trial_result(),
    )


@pytest.mark.parametrize("primary", PRIMARIES)
def test_tryboot_provisioning_is_a_repaired_autoboot_txt(
    tmp_path: Path, primary: str | None
) -> None:
    state = tmp_path / "data" / "boot"
    files = provision("tryboot", tmp_path / "p1", primary=primary, state_dir=state)
    assert files == {"autoboot.txt": tmp_path / "p1" / "autoboot.txt"}
    repaired = tryboot_backend(tmp_path / "repaired" / "autoboot.txt", tmp_path / "repaired")
    (tmp_path / "repaired").mkdir()
    repaired.repair(primary)
    assert files["autoboot.txt"].read_bytes() == repaired.autoboot.path.read_bytes()
    provisioned = tryboot_backend(files["autoboot.txt"], state)
    for name in (tryboot.STATE_FILE, tryboot.SHADOW_FILE):
        assert (state / name).read_bytes() == (tmp_path / "repaired" / name).read_bytes()
    assert tryboot_answers(provisioned) == tryboot_answers(repaired)


@pytest.mark.parametrize("primary", PRIMARIES)
def test_tryboot_provisioning_without_a_state_dir_reads_the_same(
    tmp_path: Path, primary: str | None
) -> None:
    files = provision("tryboot", tmp_path / "p1", primary=primary)
    assert sorted(path.name for path in (tmp_path / "p1").iterdir()) == ["autoboot.txt"]
    provisioned = tryboot_backend(files["autoboot.txt"], tmp_path / "empty")
    (tmp_path / "repaired").mkdir()
    repaired = tryboot_backend(tmp_path / "repaired" / "autoboot.txt", tmp_path / "repaired")
    repaired.repair(primary)
    assert tryboot_answers(provisioned) == tryboot_answers(repaired)


def test_tryboot_provisioning_takes_the_partitions(tmp_path: Path) -> None:
    partitions = {"a": 5, "b": 6, "safe": 7}
    files = provision("tryboot", tmp_path, primary="b", partitions=partitions)
    config = TrybootConfig(autoboot_txt=files["autoboot.txt"], partitions=partitions)
    assert TrybootBackend(config).autoboot.load().boot_partition == 6
    with pytest.raises(BootloaderError, match="option 'partitions'"):
        provision("tryboot", tmp_path, partitions={"a": 5, "b": 5, "safe": 7})


@pytest.mark.parametrize("primary", PRIMARIES)
@pytest.mark.parametrize("redundant", [True, False])
def test_uboot_provisioning_is_a_repaired_blank_environment(
    tmp_path: Path, primary: str | None, redundant: bool
) -> None:
    boot = tmp_path / "boot"
    files = provision(
        "uboot", boot, primary=primary, initial_env=BOARD_ENV, env_size=ENV_SIZE,
        redundant=redundant, attempts=4,
    )  # fmt: skip
    assert files == {
        "uboot.env": boot / "uboot.env",
        "u-boot-initial-env": boot / "u-boot-initial-env",
    }
    assert ubootenv.read_initial_env(files["u-boot-initial-env"]) == BOARD_ENV
    # what repair makes of a blank environment on a board with that default environment
    env, initial = tmp_path / "uboot.env", tmp_path / "u-boot-initial-env"
    initial.write_text("".join(f"{k}={v}\n" for k, v in BOARD_ENV.items()))
    env.write_bytes(bytes((2 if redundant else 1) * ENV_SIZE))
    layout = (
        EnvLayout.redundant_pair(env, ENV_SIZE, 0, ENV_SIZE, None)
        if redundant
        else EnvLayout.single(env, ENV_SIZE, 0)
    )
    UBootBackend(layout, attempts=4, initial_env=initial).repair(primary)
    assert files["uboot.env"].read_bytes() == env.read_bytes()
    provisioned = UBootBackend(
        EnvLayout.redundant_pair(files["uboot.env"], ENV_SIZE, 0, ENV_SIZE, None)
        if redundant
        else EnvLayout.single(files["uboot.env"], ENV_SIZE, 0),
        attempts=4,
    )
    assert provisioned.primary() == primary
    assert ubootenv.read_env(provisioned.layout).variables["bootcmd"] == BOARD_ENV["bootcmd"]


def test_uboot_provisioning_refuses_a_default_environment_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(BootloaderError, match="is not one line"):
        provision("uboot", tmp_path, initial_env={"bootcmd": "run a\nrun b"})


def test_provisioned_files_are_the_bytes_provision_writes(tmp_path: Path) -> None:
    for name, specifics in (("grub", {"kernel_options": "ro quiet"}), ("tryboot", {})):
        written = provision(name, tmp_path / name, primary="b", attempts=2, **specifics)
        files = provisioned_files(name, primary="b", attempts=2, **specifics)
        assert files == {relative: path.read_bytes() for relative, path in written.items()}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_provisioning_names_a_root_slot(tmp_path: Path, name: str) -> None:
    specifics = {"initial_env": BOARD_ENV} if name == "uboot" else {}
    with pytest.raises(UnknownSlotError):
        provision(name, tmp_path, primary="safe", **specifics)


def test_provisioning_an_unknown_backend(tmp_path: Path) -> None:
    with pytest.raises(UnknownBackendError, match="unknown boot backend 'lilo'"):
        provision("lilo", tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- every backend registers and reads alike -----------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_backend_registers_its_factory_check_and_provisioner(name: str) -> None:
    module = MODULES[name]
    assert name == module.NAME
    assert BACKENDS[name] == BACKEND_CLASSES[name].from_options
    assert OPTION_CHECKS[name] is module.check_options
    assert PROVISIONERS[name] is module.provision
    assert set(BACKENDS) == set(OPTION_CHECKS) == set(PROVISIONERS) == set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_backend_names_itself_in_its_option_errors(name: str) -> None:
    module = MODULES[name]
    assert f"{name} backend" == module.WHO
    for options in ({"colour": "red"}, {"attempts": 0}, {"attempts": "3"}, {"cmdline": 3}):
        extra = {"env_file": "/x"} if name == "uboot" else {}
        with pytest.raises(BootloaderError) as caught:
            check_options(name, {**extra, **options})
        assert str(caught.value).startswith(f"{module.WHO}: ")


SELECTOR_ORDER = [
    name for name, _ in sorted(
        ((n, m) for n, m in vars(BootSelector).items()
         if inspect.isfunction(m) and not n.startswith("_")),
        key=lambda item: item[1].__code__.co_firstlineno,
    )
]  # fmt: skip


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_backend_lists_its_methods_in_the_boundarys_order(name: str) -> None:
    methods = [n for n, m in vars(BACKEND_CLASSES[name]).items() if inspect.isfunction(m)]
    boundary = [*SELECTOR_ORDER, "repair", "state_files"]
    assert [m for m in methods if m in boundary] == boundary
    last_public = max(i for i, m in enumerate(methods) if not m.startswith("_"))
    first_private = min(i for i, m in enumerate(methods) if m.startswith("_") and m != "__init__")
    assert methods.index("state_files") < first_private
    assert last_public < first_private
