"""``fleet-updater`` on virtual devices: ``status --json`` is the oracle, as RAUC's tests use
``rauc status``. Bad input of every kind is refused with one clear line, and leaves the booted
slot and the bootloader's primary as they were."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from bootloader_hooks import grub_script, uboot_script, ubootenv
from bootloader_hooks.tryboot import SHADOW_FILE, STATE_FILE
from chaos.http_faults import Fault, FlakyHttpServer
from chaos.virtual_device import VirtualDevice
from fleet_core.errors import FleetError
from signing.keyring import revoke_key, trust_key
from signing.keys import generate_key
from tests.chaos.conftest import FIRMWARES, BootView, MakeDevice, Releases, boot_view
from updater.cli import EXIT_REBOOT_REQUIRED, EXIT_UNHEALTHY, main
from updater.errors import DownloadError
from updater.runtime import Runtime
from updater.state import update_lock


def updater(device: VirtualDevice, *args: str, extra: str = "") -> Result:
    config = device.root / "updater.toml"
    config.write_text(device.config_toml(extra=extra))
    return CliRunner().invoke(main, ["--config", str(config), *args])


def status(device: VirtualDevice, exit_code: int = 0) -> dict[str, Any]:
    """The device's ``status --json``; it exits 1 when the configuration or the boot state is
    unusable, the document naming the problem all the same."""
    result = updater(device, "status", "--json")
    assert result.exit_code == exit_code, result.output
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def one_line_error(result: Result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and fragment in errors[0], lines
    assert "Traceback" not in result.output


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A device as ``status --json`` reports it and as its firmware will boot it."""

    status: dict[str, Any]
    boot: BootView


def snapshot(device: VirtualDevice) -> Snapshot:
    return Snapshot(status(device), boot_view(device))


def assert_untouched(device: VirtualDevice, before: Snapshot, booted: str = "a") -> None:
    """A refused or failed install left the running slot as it was, in ``status --json``, in
    its bytes and in the boot state read by the backend and by the firmware's own tools. The
    other slot may only have become unbootable (a failed install marks it bad), never
    startable with other bytes; an install refused before it began changed no boot state."""
    after = status(device)
    assert (after["booted"], after["primary"]) == (
        before.status["booted"], before.status["primary"]
    ) == (booted, booted)  # fmt: skip
    assert after["slots"][booted] == before.status["slots"][booted]
    view = boot_view(device)
    assert view.slots[booted] == before.boot.slots[booted], "the running slot was written"
    assert view.committed == before.boot.committed == booted, view.env
    assert view.trial is None and not after["trial"], view.env
    assert view.bootable <= before.boot.bootable, (view.env, before.boot.env)
    running_entries = {k: v for k, v in view.env.items() if k.startswith(f"BOOT_{booted.upper()}")}
    assert running_entries == {
        k: v for k, v in before.boot.env.items() if k.startswith(f"BOOT_{booted.upper()}")
    }
    other = "b" if booted == "a" else "a"
    if view.slots[other] != before.boot.slots[other]:
        assert other not in view.bootable, f"slot {other} was written and may boot: {view.env}"
    if after["slots"][other] == before.status["slots"][other]:
        assert view.env == before.boot.env, "an install that never began changed the boot state"


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_status_install_and_boot_check(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device(firmware)
    before = status(device)
    assert before["backend"] == firmware
    assert (before["booted"], before["primary"], before["trial"]) == ("a", "a", False)
    assert before["slots"]["a"]["status"] == "good" and before["slots"]["a"]["version"] == "1.0.0"
    assert before["config"]["problems"] == [] and before["bootloader_problem"] is None

    result = updater(device, "install", str(releases.bundle("2.0.0")), "--no-reboot")
    assert result.exit_code == EXIT_REBOOT_REQUIRED, result.output
    events = [json.loads(line)["event"] for line in result.stdout.splitlines()]
    assert events[0] == "install.started" and "install.finished" in events
    armed = status(device)
    assert armed["slots"]["b"]["status"] == "trial" and armed["slots"]["b"]["version"] == "2.0.0"
    assert (armed["booted"], armed["primary"]) == ("a", "a")  # the primary changes only at commit

    device.boot(device_reboot_event(device), run_boot_check=False)
    result = updater(device, "boot-check")
    assert result.exit_code == 0, result.output
    committed = status(device)
    assert (committed["booted"], committed["primary"], committed["trial"]) == ("b", "b", False)
    assert committed["slots"]["b"]["status"] == "good"
    assert committed["installed_security_version"] == 1


def device_reboot_event(device: VirtualDevice) -> Any:
    from bootloader_hooks.base import BootCause, BootEvent

    command = device.runtime().backend.reboot_command()
    return BootEvent(BootCause.REBOOT, tuple(command))


def test_unhealthy_boot_check_exits_4_and_rolls_back(
    make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device("grub")
    updater(device, "install", str(releases.bundle("2.0.0")), "--no-reboot")
    device.boot(device_reboot_event(device), run_boot_check=False)
    result = updater(
        device, "boot-check", extra='[[health.checks]]\ntype = "command"\nargv = ["false"]'
    )
    assert result.exit_code == EXIT_UNHEALTHY, result.output
    document = status(device)
    assert document["slots"]["b"]["status"] == "bad" and document["primary"] == "a"


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_bad_bundles_are_refused_and_change_nothing(
    firmware: str, make_device: MakeDevice, releases: Releases, tmp_path: Path
) -> None:
    device = make_device(firmware)
    before = snapshot(device)
    stranger = generate_key(tmp_path / "stranger")
    cases = [
        (releases.bundle("2.0.0", compatible="other-device"), "bundle is for 'other-device'"),
        (releases.bundle("2.0.0", key=stranger), "none trusted"),
        (releases.bundle("2.0.0", size=4 << 20), "does not fit slot b"),
        (tmp_path / "missing.bundle", "cannot open"),
    ]
    damaged = tmp_path / "damaged.bundle"
    data = bytearray(releases.bundle("2.0.0").read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    cases.append((damaged, "install into slot b failed"))
    for bundle, message in cases:
        one_line_error(updater(device, "install", str(bundle), "--no-reboot"), message)
        assert_untouched(device, before)


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_a_failed_second_install_leaves_the_previous_release_bad_in_the_bootloader(
    firmware: str, make_device: MakeDevice, releases: Releases, tmp_path: Path
) -> None:
    """After one committed update, the other slot holds the previous release and is the
    running slot's fallback. An install into it that fails halfway must take it out of the
    firmware's choices; one refused before it began must leave it there."""
    device = make_device(firmware)
    assert device.install(releases.bundle("2.0.0"))[-1].action == "committed"
    before = snapshot(device)
    assert before.boot.committed == "b" and "a" in before.boot.bootable, before.boot.env

    refused = releases.bundle("3.0.0", compatible="other-device")
    one_line_error(updater(device, "install", str(refused), "--no-reboot"), "bundle is for")
    assert_untouched(device, before, booted="b")
    assert boot_view(device) == before.boot

    damaged = tmp_path / "damaged.bundle"
    data = bytearray(releases.bundle("3.0.0", security_version=2, compression="none").read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the image: its bytes are written before the hash is known
    damaged.write_bytes(bytes(data))
    result = updater(device, "install", str(damaged), "--no-reboot")
    one_line_error(result, "install into slot a failed")
    assert_untouched(device, before, booted="b")
    view = boot_view(device)
    assert view.slots["a"] != before.boot.slots["a"]  # written, then abandoned
    assert "a" not in view.bootable, view.env
    assert status(device)["slots"]["a"]["status"] == "bad"
    # the device still boots the running release, and the next install goes ahead
    assert device.power_on()[-1].image.version == "2.0.0"  # type: ignore[union-attr]
    records = device.install(releases.bundle("3.0.0", security_version=2))
    assert records[-1].action == "committed" and records[-1].slot == "a"


def test_downgrade_is_refused(make_device: MakeDevice, releases: Releases) -> None:
    device = make_device("grub")
    device.install(releases.bundle("2.0.0", security_version=5))
    result = updater(device, "install", str(releases.bundle("1.5.0", security_version=4)))
    one_line_error(result, "security version 4 is below the installed 5: downgrade refused")
    assert status(device)["primary"] == "b"


def test_revoked_key_is_refused(make_device: MakeDevice, releases: Releases) -> None:
    device = make_device("grub")
    other = generate_key(device.root / "next")
    trust_key(device.root / "keyring", device.root / "next.pub")
    revoke_key(device.root / "keyring", releases.key.key_id)
    before = snapshot(device)
    one_line_error(updater(device, "install", str(releases.bundle("2.0.0"))), "revoked")
    assert_untouched(device, before)
    assert other.key_id


def test_disk_full_while_writing(make_device: MakeDevice, releases: Releases) -> None:
    device = make_device("grub")
    mount = device.root / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)], check=True)
    try:
        slot = mount / "root_b.img"
        with slot.open("wb") as handle:
            handle.truncate(1 << 20)  # sparse: the slot claims 1 MiB, the disk holds 128 KiB
        slots = {"a": device.config.slots["a"], "b": {"rootfs": str(slot)}}
        device.config = dataclasses.replace(device.config, slots=slots)
        before = snapshot(device)
        result = updater(device, "install", str(releases.bundle("2.0.0")), "--no-reboot")
        one_line_error(result, "No space left on device")
        assert_untouched(device, before)
        assert status(device)["slots"]["b"]["status"] == "bad"
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_network_dropping_mid_download(make_device: MakeDevice, releases: Releases) -> None:
    device = make_device("grub")
    data = releases.bundle("2.0.0", compression="none").read_bytes()
    with FlakyHttpServer({"/r.bundle": data}) as server:
        server.add_faults(Fault(drop_after=70_000), Fault(status=503), Fault(drop_after=1000))
        records = device.install_url(server.url("/r.bundle"))
        assert records[-1].action == "committed"
        ranges = [r.get("Range") for r in server.requests]
        assert ranges == [None, "bytes=65536-", "bytes=65536-", "bytes=65536-"]
        device2 = make_device("grub")
        before = snapshot(device2)
        server.add_faults(*[Fault(drop_after=10)] * 20)
        with pytest.raises(DownloadError, match="gave up after 9 attempts"):
            device2.install_url(server.url("/r.bundle"))
        assert_untouched(device2, before)


def test_corrupted_config_is_reported_not_fatal(make_device: MakeDevice) -> None:
    device = make_device("grub")
    config = device.root / "updater.toml"
    config.write_text(device.config_toml())
    # any command but status keeps a configuration that loaded cleanly (status writes nothing)
    assert CliRunner().invoke(main, ["--config", str(config), "repair"]).exit_code == 0
    config.write_bytes(b"compatible = [\x00 broken")
    data_dir = str(device.config.data_dir)
    result = CliRunner().invoke(
        main, ["--config", str(config), "--data-dir", data_dir, "status", "--json"]
    )
    assert result.exit_code == 1, result.output  # the device runs on; status says it is amiss
    assert "Error: " in result.stderr and "not valid TOML" in result.stderr
    document = json.loads(result.stdout)
    assert document["config"]["source"].endswith("updater.last-good.toml")
    assert "not valid TOML" in document["config"]["problems"][0]


def test_a_config_whose_backend_cannot_be_built_is_not_kept(make_device: MakeDevice) -> None:
    device = make_device("grub")
    config = device.root / "updater.toml"
    config.write_text(device.config_toml())
    # any command but status keeps a configuration that loaded cleanly (status writes nothing)
    assert CliRunner().invoke(main, ["--config", str(config), "repair"]).exit_code == 0
    last_good = device.config.data_dir / "updater.last-good.toml"
    kept = last_good.read_bytes()
    missing = device.root / "missing-fw_env.config"
    uboot = f'[bootloader]\nbackend = "uboot"\nfw_env_config = "{missing}"\n'
    text = device.config_toml().split("[bootloader]")[0] + uboot
    config.write_text(text)
    result = CliRunner().invoke(main, ["--config", str(config), "status", "--json"])
    assert result.exit_code == 1, result.output
    problems = json.loads(result.stdout)["config"]["problems"]
    assert len(problems) == 1 and "not kept as the last good configuration" in problems[0]
    assert str(missing) in problems[0]
    assert last_good.read_bytes() == kept


def test_no_keyring_no_install(releases: Releases, tmp_path: Path) -> None:
    config = tmp_path / "bare.toml"
    config.write_text(f'compatible = "lab-device"\ndata_dir = "{tmp_path}"\n')
    result = CliRunner().invoke(
        main, ["--config", str(config), "install", str(releases.bundle("2.0.0"))]
    )
    # the file's own problem, not what the built-in defaults lack
    one_line_error(result, f"{config}: names no keyring")
    assert "no last good configuration to fall back to" in result.stderr


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "updater.toml: empty"),
        (b"compatible = [\x00 broken", "not valid TOML"),
        (b'compatible = "x"\nkeyring = "/k"\n[bootloader]\nbakend = "grub"\n', "bakend"),
    ],
)
@pytest.mark.parametrize("command", [["install", "/nonexistent.bundle"], ["rollback"],
                                     ["mark-good"], ["repair"], ["resume"]])  # fmt: skip
def test_a_command_on_an_unusable_config_names_the_config_problem(
    tmp_path: Path, content: bytes, problem: str, command: list[str]
) -> None:
    config = tmp_path / "updater.toml"
    config.write_bytes(content)
    result = CliRunner().invoke(
        main, ["--config", str(config), "--data-dir", str(tmp_path / "data"), *command]
    )
    one_line_error(result, f"{config}")
    assert problem in result.stderr and "no last good configuration" in result.stderr
    assert not (tmp_path / "data").exists()  # nothing was done on the defaults


def test_mark_bad_mark_good_rollback_resume(make_device: MakeDevice, releases: Releases) -> None:
    device = make_device("grub")
    device.install(releases.bundle("2.0.0", security_version=1))  # the factory release's
    assert status(device)["booted"] == "b"
    result = updater(device, "rollback", "--no-reboot")
    assert result.exit_code == EXIT_REBOOT_REQUIRED, result.output
    assert status(device)["slots"]["a"]["status"] == "trial"
    records = device.settle(device_reboot_event(device))
    assert records[-1].slot == "a" and records[-1].action == "committed"
    assert updater(device, "mark-bad", "other").exit_code == 0
    assert status(device)["slots"]["b"]["status"] == "bad"
    one_line_error(updater(device, "rollback"), "no intact previous release")
    assert updater(device, "mark-good").exit_code == 0
    assert status(device)["slots"]["a"]["status"] == "good"
    assert updater(device, "resume").exit_code == 0


def test_mark_good_commits_as_the_boot_check_does_floor_included(
    make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device("grub")
    device.install(releases.bundle("2.0.0", security_version=3), reboot=False)
    device.boot(device_reboot_event(device), run_boot_check=False)  # b on trial, unjudged
    assert status(device)["booted"] == "b"
    assert status(device)["installed_security_version"] == 1
    assert updater(device, "mark-good").exit_code == 0
    document = status(device)
    assert document["slots"]["b"]["status"] == "good"
    assert document["installed_security_version"] == 3  # as a committing boot check would
    # the factory release in the other slot is now below the floor: withdrawn, no rollback
    assert document["slots"]["a"]["status"] == "bad"
    one_line_error(updater(device, "rollback"), "slot a holds no intact previous release (bad)")


def test_mark_bad_of_the_last_good_slot_needs_force(make_device: MakeDevice) -> None:
    device = make_device("grub")
    before = snapshot(device)
    one_line_error(
        updater(device, "mark-bad"),
        "slot a is the only good root slot at or above the floor: marking it bad leaves the "
        "device to boot the safe-mode slot (use --force to do so)",
    )
    assert_untouched(device, before)
    assert updater(device, "mark-bad", "--force").exit_code == 0
    assert status(device)["slots"]["a"]["status"] == "bad"
    assert boot_view(device).committed is None  # the firmware boots safe mode next


def test_too_hot_or_too_full_defers_the_update(make_device: MakeDevice, releases: Releases) -> None:
    device = make_device("grub")
    zone = device.root / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("85123\n")
    paths = f'[paths]\nthermal_dir = "{device.root / "thermal"}"\n'
    before = snapshot(device)
    result = updater(device, "install", str(releases.bundle("2.0.0")), extra=paths)
    one_line_error(result, "CPU at 85.1 °C, above the 80.0 °C limit: update deferred")
    (zone / "temp").write_text("45000\n")
    config = device.root / "updater.toml"
    config.write_text(
        device.config_toml(extra=paths).replace("min_free_mb = 0", "min_free_mb = 16000000")
    )
    result = CliRunner().invoke(
        main, ["--config", str(config), "install", str(releases.bundle("2.0.0"))]
    )
    one_line_error(result, "MB free on the data partition, below 16000000 MB: update skipped")
    assert_untouched(device, before)


def test_metrics_textfile_after_install_and_boot_check(
    make_device: MakeDevice, releases: Releases
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    device = make_device("grub")
    textfile = device.root / "metrics" / "fleet.prom"
    extra = f'[metrics]\ntextfile = "{textfile}"\n'
    result = updater(device, "install", str(releases.bundle("2.0.0")), "--no-reboot", extra=extra)
    assert result.exit_code == EXIT_REBOOT_REQUIRED, result.output
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(textfile.read_text())
        for s in family.samples
    }
    assert samples[("fleet_updater_install_bytes_total", ())] == 256 * 1024
    assert samples[("fleet_updater_update_state", (("state", "installed"),))] == 1
    slot_b = [k for k in samples if k[0] == "fleet_updater_slot_info" and ("slot", "b") in k[1]]
    assert slot_b and ("status", "trial") in slot_b[0][1] and ("version", "2.0.0") in slot_b[0][1]
    device.boot(device_reboot_event(device), run_boot_check=False)
    assert updater(device, "boot-check", extra=extra).exit_code == 0
    text = textfile.read_text()
    assert 'fleet_updater_update_state{state="committed"} 1.0' in text
    assert not [p for p in textfile.parent.iterdir() if p.name != "fleet.prom"]


def test_install_from_safe_mode_is_refused(make_device: MakeDevice, releases: Releases) -> None:
    device = make_device("grub")
    (device.root / "linux" / "proc" / "cmdline").write_text("fleet.slot=safe\n")
    one_line_error(
        updater(device, "install", str(releases.bundle("2.0.0"))), "running from slot 'safe'"
    )


def split_bundle(path: Path) -> tuple[bytes, bytes, dict[str, bytes]]:
    """manifest.json, manifest.sig and the image blobs by SHA-256, as a server stores them."""
    import hashlib
    import tarfile

    with tarfile.open(path) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]
    manifest, signatures = members.pop("manifest.json"), members.pop("manifest.sig")
    return manifest, signatures, {hashlib.sha256(b).hexdigest(): b for b in members.values()}


def test_install_from_parts_fails_over_to_a_mirror(
    make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device("grub")
    manifest, signatures, blobs = split_bundle(releases.bundle("2.0.0", compression="none"))
    # the image alone: without its chunk index the install is one stream (no delta planned)
    images = {image["sha256"] for image in json.loads(manifest)["images"]}
    files = {f"/blobs/{sha}": data for sha, data in blobs.items() if sha in images}
    blobs = {sha: data for sha, data in blobs.items() if sha in images}
    with FlakyHttpServer(files) as server, FlakyHttpServer(files) as mirror:
        server.add_faults(Fault(drop_after=100_000), *[Fault(status=503)] * 10)
        urls = {sha: [server.url(f"/blobs/{sha}"), mirror.url(f"/blobs/{sha}")] for sha in blobs}
        records = device.install_parts(manifest, signatures, urls)
        assert records[-1].action == "committed" and records[-1].image.version == "2.0.0"  # type: ignore[union-attr]
        assert [r.get("Range") for r in mirror.requests] == ["bytes=65536-"]
    assert device.events("download.mirror")


def test_install_from_parts_rejects_a_tampered_blob(
    make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device("grub")
    manifest, signatures, blobs = split_bundle(releases.bundle("2.0.0"))
    files = {f"/blobs/{sha}": data[:-1] + bytes([data[-1] ^ 1]) for sha, data in blobs.items()}
    before = snapshot(device)
    with FlakyHttpServer(files) as server:
        urls = {sha: [server.url(f"/blobs/{sha}")] for sha in blobs}
        with pytest.raises(FleetError, match="install into slot b failed"):
            device.install_parts(manifest, signatures, urls)
    assert_untouched(device, before)
    assert status(device)["slots"]["b"]["status"] == "bad"


def test_install_from_parts_rejects_an_image_that_decompresses_to_other_bytes(
    make_device: MakeDevice, releases: Releases
) -> None:
    """The blob is the one the signed manifest names (its stored SHA-256 matches), but the
    manifest's uncompressed SHA-256 is of another image: the decompressed bytes are checked
    too, and the install fails with the slot bad in the bootloader."""
    import hashlib

    from image_builder.bundle import SIGNATURE_PURPOSE
    from image_builder.manifest import Manifest
    from signing import sign

    device = make_device("uboot")
    manifest_bytes, _, blobs = split_bundle(releases.bundle("2.0.0", compression="zstd"))
    manifest = Manifest.from_bytes(manifest_bytes)
    entry = manifest.images[0]
    assert entry.compression == "zstd" and entry.sha256 in blobs
    other = hashlib.sha256(b"another image").hexdigest()
    forged = dataclasses.replace(
        manifest, images=(dataclasses.replace(entry, uncompressed_sha256=other),)
    ).to_bytes()
    signatures = sign(forged, [releases.key], SIGNATURE_PURPOSE).to_bytes()
    before = snapshot(device)
    files = {f"/blobs/{sha}": data for sha, data in blobs.items()}
    with FlakyHttpServer(files) as server:
        urls = {sha: [server.url(f"/blobs/{sha}")] for sha in blobs}
        with pytest.raises(FleetError, match="SHA-256 of image does not match"):
            device.install_parts(forged, signatures, urls)
    assert_untouched(device, before)
    assert status(device)["slots"]["b"]["status"] == "bad"
    assert "b" not in boot_view(device).bootable


def test_rollback_below_the_installed_security_version_is_refused(
    make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device("grub")
    device.install(releases.bundle("2.0.0", security_version=4))
    # the commit that raised the floor to 4 withdrew slot a's 1.0.0 (security version 1)
    assert status(device)["slots"]["a"]["status"] == "bad"
    one_line_error(updater(device, "rollback"), "slot a holds no intact previous release (bad)")
    assert status(device)["primary"] == "b"


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_no_install_during_an_undecided_trial(
    firmware: str, make_device: MakeDevice, releases: Releases
) -> None:
    """The other slot is the running trial's only fallback until the boot check decides."""
    device = make_device(firmware)
    device.install(releases.bundle("2.0.0"), reboot=False)
    device.boot(device_reboot_event(device), run_boot_check=False)  # the boot check died
    assert status(device)["trial"] is True
    before = boot_view(device)
    assert before.trial == "b" and before.committed == "a", before.env
    one_line_error(
        updater(device, "install", str(releases.bundle("3.0.0"))), "trial that is not committed"
    )
    assert boot_view(device) == before  # neither slot nor the boot state changed
    assert device.image("a") is not None and device.image("a").version == "1.0.0"  # type: ignore[union-attr]
    assert status(device)["slots"]["a"]["status"] == "good"


def test_install_from_parts_without_a_url_touches_nothing(
    make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device("grub")
    manifest, signatures, _ = split_bundle(releases.bundle("2.0.0"))
    before = snapshot(device)
    with pytest.raises(DownloadError, match="no URL for image"):
        device.install_parts(manifest, signatures, {})
    assert status(device) == before.status
    assert_untouched(device, before)


def test_install_past_its_deadline_is_abandoned(
    make_device: MakeDevice, releases: Releases, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = make_device("grub")
    before = snapshot(device)
    config = device.root / "updater.toml"
    config.write_text(device.config_toml().replace("min_free_mb = 0", "update_deadline_s = 60"))
    # the install's clock runs a minute per look: the deadline passes while it writes
    ticks = iter(range(0, 10**6, 61))
    installer = Runtime.installer
    monkeypatch.setattr(
        Runtime, "installer", lambda self, **o: installer(self, clock=lambda: next(ticks), **o)
    )
    result = CliRunner().invoke(
        main, ["--config", str(config), "install", str(releases.bundle("2.0.0"))]
    )
    one_line_error(result, "deadline: abandoned")
    assert_untouched(device, before)
    assert status(device)["slots"]["b"]["status"] == "bad"


def test_boot_check_verdicts_reach_the_daemons_outbox(
    make_device: MakeDevice, releases: Releases
) -> None:
    device = make_device("grub")
    server = '[server]\nurls = ["http://127.0.0.1:9"]\n'
    updater(device, "install", str(releases.bundle("2.0.0")), "--no-reboot", extra=server)
    device.boot(device_reboot_event(device), run_boot_check=False)
    assert updater(device, "boot-check", extra=server).exit_code == 0
    outbox = (device.config.data_dir / "outbox.jsonl").read_text().splitlines()[1:]
    events = [json.loads(line)["event"] for line in outbox]
    assert "install.finished" in events and "boot_check.committed" in events
    assert (device.config.data_dir / "updater.last-good.toml").stat().st_mode & 0o777 == 0o600


def test_metrics_served_over_http_follow_the_state(
    make_device: MakeDevice, releases: Releases
) -> None:
    import dataclasses as dc

    import requests
    from prometheus_client import CollectorRegistry

    from updater.metrics import UpdaterMetrics

    device = make_device("grub")
    live = UpdaterMetrics(CollectorRegistry())
    server = live.serve(0)
    try:
        runtime = dc.replace(device.runtime(), live_metrics=live)
        runtime.publish_metrics()
        text = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).text
        assert 'fleet_updater_slot_info{booted="true",primary="true",slot="a"' in text
        device.install(releases.bundle("2.0.0"))
        dc.replace(device.runtime(), live_metrics=live).publish_metrics()
        text = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).text
        assert 'slot="b",status="good",version="2.0.0"' in text
    finally:
        server.stop()


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_boot_check_sweeps_what_interrupted_writes_left(
    make_device: MakeDevice, firmware: str
) -> None:
    device = make_device(firmware)
    old = time.time() - 3600

    def leftover(path: Path) -> Path:
        path.write_bytes(b"half-written")
        os.utime(path, (old, old))
        return path

    data_dir = device.config.data_dir
    options = device.config.bootloader
    state_files = [
        Path(options[key]) for key in ("grubenv", "autoboot_txt", "env_file") if key in options
    ]
    if firmware == "tryboot":  # its trial state and the shadow copy of autoboot.txt
        state_files += [Path(options["state_dir"]) / name for name in (STATE_FILE, SHADOW_FILE)]
    assert len(state_files) == {"grub": 1, "tryboot": 3, "uboot": 1}[firmware]
    swept = [
        leftover(data_dir / ".state.json.k3j4h5g6.tmp"),
        leftover(data_dir / ".updater.last-good.toml.a1b2c3d4.tmp"),
        *(leftover(f.parent / f".{f.name}.zz_00001.tmp") for f in state_files),
    ]
    # beside the boot files, what is not ours stays: the firmware's, an editor's, a user's
    kept = [
        leftover(f.parent / name)
        for f in state_files
        for name in (".config.txt.abcdefgh.tmp", f".{f.name}.swp", "notes.tmp")
    ]
    result = updater(device, "boot-check")
    assert result.exit_code == 0, result.output
    assert not [path for path in swept if path.exists()]
    assert all(path.exists() for path in kept)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    reported = [name for e in events if e["event"] == "sweep.removed" for name in e["files"]]
    assert sorted(reported) == sorted(path.name for path in swept)
    # nothing left: the next start reports nothing
    again = updater(device, "boot-check")
    assert "sweep.removed" not in again.stdout


def test_the_daemon_sweeps_as_it_starts_unless_an_update_holds_the_lock(
    make_device: MakeDevice, refused_port: int
) -> None:
    device = make_device("grub")
    old = time.time() - 3600
    temporary = device.config.data_dir / ".outbox.jsonl.q1w2e3r4.tmp"
    server = f'[server]\nurls = ["http://127.0.0.1:{refused_port}"]\n'

    def start() -> Result:
        temporary.write_bytes(b"{")
        os.utime(temporary, (old, old))
        return updater(device, "daemon", "--once", extra=server)

    with update_lock(device.config.data_dir):  # an install runs: the daemon starts all the same
        result = start()
    assert "sweep.removed" not in result.stdout and "another update" not in result.output
    assert temporary.exists()
    result = start()
    assert result.exit_code == 1  # the server refuses: --once says so
    assert not temporary.exists() and "sweep.removed" in result.stdout


# --- a lost boot state is rebuilt from the state store, by an explicit step only ---------


def lose_boot_state(device: VirtualDevice, firmware: str) -> None:
    """What a careless operator or a failing card does: grubenv deleted; a U-Boot environment
    reset to the board's defaults (no state of ours in it, the script would start afresh)."""
    options = device.config.bootloader
    if firmware == "grub":
        Path(options["grubenv"]).unlink()
    else:
        backend = device.runtime().backend
        layout = backend.layout  # type: ignore[attr-defined]
        # the board's defaults saved over ours, as the newest copy of the redundant pair
        previous = ubootenv.read_env(layout)
        ubootenv.write_env(layout, {"bootcmd": "run distro_bootcmd"}, previous)


@pytest.mark.parametrize("firmware", ["grub", "uboot"])
def test_a_lost_boot_state_never_resurrects_a_slot_below_the_floor(
    make_device: MakeDevice, releases: Releases, firmware: str
) -> None:
    device = make_device(firmware)
    device.install(releases.bundle("2.0.0", security_version=2))  # committed in b: floor 2
    assert status(device)["installed_security_version"] == 2
    lose_boot_state(device, firmware)
    files = {path: path.read_bytes() if path.exists() else None for path in boot_files(device)}

    document = status(device, exit_code=1)  # a read: reports, writes nothing
    assert document["bootloader_problem"]
    assert document["booted"] == "b"  # the kernel still says which slot runs
    assert {p: p.read_bytes() if p.exists() else None for p in boot_files(device)} == files
    missing = {"grub": "grubenv is missing", "uboot": "holds no state of ours"}[firmware]
    one_line_error(updater(device, "mark-good"), missing)  # nor does any verb act on it

    records = device.power_on()  # the firmware boots what it finds; the boot check repairs
    final = records[-1]
    assert (final.slot, final.action) == ("b", "confirmed"), records
    assert final.image is not None and final.image.version == "2.0.0"
    assert all(r.image is None or r.image.version != "1.0.0" or r.action == "rolled_back"
               for r in records), records  # fmt: skip
    if firmware == "grub":  # GRUB boots safe mode without grubenv; the boot check rebuilds it
        (repaired,) = device.events("boot_state.repaired")
        assert (repaired["primary"], repaired["fallback"]) == ("b", None)
        assert missing in repaired["reason"]
    else:  # U-Boot's script starts afresh and boots slot a: the boot check disowns it
        (disowned,) = device.events("boot_check.disowned")
        assert (disowned["slot"], disowned["security_version"], disowned["floor"]) == ("a", 1, 2)
    assert boot_view(device).bootable == {"b"}  # 1.0.0, below the floor, stays out


def boot_files(device: VirtualDevice) -> list[Path]:
    options = device.config.bootloader
    return [Path(options[k]) for k in ("grubenv", "env_file") if k in options]


@pytest.mark.parametrize("firmware", ["grub", "uboot"])
def test_repair_rebuilds_the_boot_state_from_the_store(
    make_device: MakeDevice, releases: Releases, firmware: str
) -> None:
    device = make_device(firmware)
    device.install(releases.bundle("2.0.0", security_version=1))  # b committed, a still good
    result = updater(device, "repair")
    assert result.exit_code == 0 and "boot state intact: nothing to repair" in result.stdout
    lose_boot_state(device, firmware)
    result = updater(device, "repair")
    assert result.exit_code == 0, result.output
    assert "boot state rebuilt: primary b, fallback a" in result.stdout
    view = boot_view(device)
    assert view.committed == "b" and set(view.bootable) == {"a", "b"}
    result = updater(device, "repair", "--force")
    assert "boot state rebuilt: primary b, fallback a" in result.stdout


def test_a_damaged_boot_state_shows_in_the_metrics_until_repaired(
    make_device: MakeDevice, tmp_path: Path
) -> None:
    device = make_device("grub")
    textfile = tmp_path / "fleet_updater.prom"
    device.config = dataclasses.replace(device.config, metrics_textfile=textfile)
    device.runtime().publish_metrics()
    assert "fleet_updater_boot_state_problem 0.0" in textfile.read_text()
    Path(device.config.bootloader["grubenv"]).unlink()
    device.runtime().publish_metrics()
    assert "fleet_updater_boot_state_problem 1.0" in textfile.read_text()
    assert updater(device, "repair").exit_code == 0
    device.runtime().publish_metrics()
    assert "fleet_updater_boot_state_problem 0.0" in textfile.read_text()


def tree(root: Path) -> dict[str, tuple[bytes, int] | None]:
    """Every file under ``root`` with its bytes and modification time; directories too."""
    return {
        str(path.relative_to(root)): (path.read_bytes(), path.stat().st_mtime_ns)
        if path.is_file() else None
        for path in sorted(root.rglob("*"))
    }  # fmt: skip


@pytest.mark.parametrize(
    "damage", ["none", "state-garbled", "config-new", "config-invalid", "data-dir-missing"]
)
def test_status_writes_nothing_whatever_it_finds(make_device: MakeDevice, damage: str) -> None:
    device = make_device("grub")
    config = device.root / "updater.toml"
    extra = {  # appended to the [limits] table
        "config-new": "max_temperature_c = 79.0\n",  # valid, and not the last-good copy
        "config-invalid": 'role = "camera"\n',  # no setting of [limits]
    }.get(damage, "")
    config.write_text(device.config_toml(extra=extra))
    data_dir = device.config.data_dir
    if damage == "state-garbled":
        (data_dir / "state.json").write_bytes(b"{garbled")
    elif damage == "data-dir-missing":
        shutil.rmtree(data_dir)
    before = tree(device.root)
    for args in (["status"], ["status", "--json"]):
        result = CliRunner().invoke(main, ["--config", str(config), *args])
        assert result.exit_code == (1 if damage == "config-invalid" else 0), result.output
    assert tree(device.root) == before
    if damage == "state-garbled":
        assert "damaged" in json.loads(result.stdout)["state_problem"]


def test_status_prints_what_it_finds_inertly(make_device: MakeDevice) -> None:
    # a hand-edited state file and a configuration with a hostile key: no escape sequence, no
    # separator and no newline of theirs reaches the terminal, and no line is forged
    from fleet_core.text import refused_character

    device = make_device("grub")
    state_file = device.config.data_dir / "state.json"
    document = json.loads(state_file.read_text())
    document["slots"]["a"]["version"] = "1.0\x1b]0;owned\x07\x9b2J\u2028slot b:    good\u202e"
    state_file.write_text(json.dumps(document))
    config = device.root / "updater.toml"
    config.write_text(device.config_toml())
    hostile_key = device.root / "hostile.toml"
    hostile_key.write_text(device.config_toml() + '"evil\\u001b[2J\\nslot b: good" = 1\n')
    for path in (config, hostile_key):
        plain = CliRunner().invoke(main, ["--config", str(path), "status"])
        assert plain.exit_code == (0 if path == config else 1), plain.output  # unknown setting
        assert all(refused_character(line) is None for line in plain.stderr.splitlines())
        lines = plain.stdout.splitlines()
        assert all(refused_character(line) is None for line in lines), lines
        assert sum(line.startswith("slot b:") for line in lines) == 1, lines
        as_json = CliRunner().invoke(main, ["--config", str(path), "status", "--json"])
        assert as_json.stdout.isascii()
    plain = CliRunner().invoke(main, ["--config", str(config), "status"])
    assert "\\x1b]0;owned\\x07\\x9b2J\\u2028slot b:    good\\u202e" in plain.stdout


def test_python_m_updater_cli_is_the_command() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "updater.cli", "--help"], capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Metrica Fleet device updater" in result.stdout and "boot-check" in result.stdout


# --- provision ----------------------------------------------------------------------------------


def flashed(device: VirtualDevice) -> None:
    """A device as it leaves the factory: an image in slot a, no state of the updater's."""
    for name in ("state.json", "security-floor"):
        (device.config.data_dir / name).unlink(missing_ok=True)


def boot_script_line(device: VirtualDevice, firmware: str) -> str:
    """The plan's line for the boot script of a lab device: GRUB's grub.cfg is on its ESP
    already (kept), U-Boot's boot.scr is not (written beside uboot.env), tryboot has none."""
    if firmware == "grub":
        cfg = Path(device.config.bootloader["grubenv"]).parent / "grub.cfg"
        return f"boot script grub.cfg: {cfg}: kept, already there: never overwritten"
    if firmware == "uboot":
        scr = Path(device.config.bootloader["env_file"]).parent / "boot.scr"
        return (
            f"boot script boot.scr: {scr}: written, the scheme's script for the reference board "
            "(devtype mmc, devnum 0, kernel Image, boot_command booti)"
        )
    return "boot script: none needed (the tryboot firmware follows the boot state)"


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_provision_records_the_factory_release_and_writes_the_boot_state(
    make_device: MakeDevice, firmware: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # boot.scr's header time
    device = make_device(firmware)
    flashed(device)
    if firmware != "tryboot":  # and no boot state of ours yet (tryboot's firmware has its own)
        lose_boot_state(device, firmware)
    fresh = status(device, exit_code=0 if firmware == "tryboot" else 1)
    assert fresh["slots"]["a"]["status"] == "empty"
    config = device.root / "updater.toml"
    config.write_text(device.config_toml())
    before = tree(device.root)
    args = ["--config", str(config), "provision", "--version", "1.0.0", "--security-version", "2"]
    planned = CliRunner().invoke(main, [*args, "--dry-run"])
    assert planned.exit_code == 0, planned.output
    assert planned.stdout.splitlines()[1:] == [
        "running slot a: record 1.0.0, security version 2 (committed; the device's floor "
        "becomes 2)",
        boot_script_line(device, firmware),
        "boot state: written fresh, primary a, fallback none",
        "dry run: nothing changed",
    ]
    assert tree(device.root) == before
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    assert done.stdout.endswith("provisioned: slot a runs 1.0.0\n")
    after = tree(device.root)
    boot_files = {path for path in after if path.startswith("boot/")}
    new = {path for path in boot_files if path not in before} - {"boot/esp/EFI/fleet/grubenv"}
    assert new == ({"boot/boot.scr"} if firmware == "uboot" else set()), new  # and the state
    if firmware == "grub":  # the ESP's grub.cfg is kept as it was, bytes and time
        cfg = "boot/esp/EFI/fleet/grub.cfg"
        assert after[cfg] == before[cfg]
    if firmware == "uboot":
        text = uboot_script.boot_script(attempts=device.runtime().backend.attempts)  # type: ignore[attr-defined]
        expected = uboot_script.script_image(text, timestamp=1_700_000_000)
        assert (device.root / "boot" / "boot.scr").read_bytes() == expected
    document = status(device)
    assert document["slots"]["a"]["status"] == "good"
    assert document["slots"]["a"]["version"] == "1.0.0"
    assert document["installed_security_version"] == 2
    view = boot_view(device)
    assert view.committed == "a" and view.bootable == {"a"}
    again = CliRunner().invoke(main, args)  # the same release again: nothing new
    assert again.exit_code == 0, again.output
    other = CliRunner().invoke(
        main,
        ["--config", str(config), "provision", "--version", "1.1.0", "--security-version", "2"],
    )
    assert other.exit_code == 1
    assert "slot a holds 1.0.0 (security version 2) already" in other.stderr


def test_provision_refuses_a_bad_version_or_a_damaged_configuration(
    make_device: MakeDevice,
) -> None:
    device = make_device("grub")
    flashed(device)
    config = device.root / "updater.toml"
    config.write_text(device.config_toml())
    bad = CliRunner().invoke(
        main, ["--config", str(config), "provision", "--version", "1.0", "--security-version", "0"]
    )
    assert bad.exit_code == 2 and "'1.0' is not a semantic version" in bad.output
    config.write_text(device.config_toml(extra='colour = "blue"\n'))
    before = tree(device.root)
    damaged = CliRunner().invoke(
        main, ["--config", str(config), "provision", "--version", "1.0.0", "--security-version",
               "0"],
    )  # fmt: skip
    assert damaged.exit_code == 1, damaged.output
    assert damaged.stderr.startswith("Error: ")
    assert status_of_slot(device) == "empty"
    assert {k for k in tree(device.root) if k not in before} <= {"updater.toml"}


def status_of_slot(device: VirtualDevice) -> str:
    state = (
        json.loads((device.config.data_dir / "state.json").read_text())
        if (device.config.data_dir / "state.json").exists()
        else {"slots": {}}
    )
    return str(state["slots"].get("a", {}).get("status", "empty"))


def provision_args(device: VirtualDevice, *more: str) -> list[str]:
    config = device.root / "updater.toml"
    config.write_text(device.config_toml())
    return ["--config", str(config), "provision", "--version", "1.0.0", "--security-version",
            "1", *more]  # fmt: skip


def test_provision_writes_a_missing_grub_cfg_that_grub_boots(make_device: MakeDevice) -> None:
    """A device whose ESP holds no grub.cfg of ours beside the configured grubenv: the plan
    says it is written, a dry run writes nothing, provisioning writes the reference disk's
    grub.cfg, and GRUB (its model, and grub-script-check) runs it to boot the slot."""
    device = make_device("grub")
    flashed(device)
    grubenv = Path(device.config.bootloader["grubenv"])
    cfg = grubenv.parent / "grub.cfg"
    cfg.unlink()
    grubenv.unlink()
    args = provision_args(device)
    before = tree(device.root)
    line = f"boot script grub.cfg: {cfg}: written, the reference disk's entries"
    planned = CliRunner().invoke(main, [*args, "--dry-run"])
    assert planned.exit_code == 0, planned.output
    assert line in planned.stdout.splitlines()
    planned_json = CliRunner().invoke(main, [*args, "--dry-run", "--json"])
    assert planned_json.exit_code == 0, planned_json.output
    document = json.loads(planned_json.stdout)
    assert document["dry_run"] is True
    assert document["boot_scripts"] == [
        {"name": "grub.cfg", "path": str(cfg), "action": "write",
         "detail": "the reference disk's entries"},
    ]  # fmt: skip
    assert tree(device.root) == before  # neither dry run wrote anything

    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    assert line in done.stdout.splitlines()
    assert cfg.read_text() == grub_script.grub_cfg()
    checked = subprocess.run(
        ["grub-script-check", str(cfg)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
    records = device.power_on()
    assert (records[-1].slot, records[-1].action) == ("a", "confirmed"), records
    assert not [path for path in cfg.parent.iterdir() if path.name.endswith(".tmp")]


def test_provision_keeps_an_existing_grub_cfg_byte_for_byte(make_device: MakeDevice) -> None:
    """A device imaged with `fleet image disk` carries a grub.cfg of its own (its kernel
    options): provisioning says it keeps it and does, whatever it holds."""
    device = make_device("grub")
    flashed(device)
    cfg = Path(device.config.bootloader["grubenv"]).parent / "grub.cfg"
    imaged = grub_script.grub_cfg(
        {slot: dataclasses.replace(entry, options="ro quiet console=ttyS0")
         for slot, entry in grub_script.DEFAULT_ENTRIES.items()}
    ).encode() + b"# the disk image's own\n"  # fmt: skip
    cfg.write_bytes(imaged)
    old = time.time() - 3600
    os.utime(cfg, (old, old))
    stamp = cfg.stat().st_mtime_ns
    result = CliRunner().invoke(main, provision_args(device, "--json"))
    assert result.exit_code == 0, result.output
    (script,) = json.loads(result.stdout)["boot_scripts"]
    assert (script["path"], script["action"]) == (str(cfg), "kept")
    assert cfg.read_bytes() == imaged and cfg.stat().st_mtime_ns == stamp
    plain = CliRunner().invoke(main, provision_args(device))  # the same release again
    assert plain.exit_code == 0, plain.output
    assert f"boot script grub.cfg: {cfg}: kept, already there: never overwritten" in plain.stdout
    assert cfg.read_bytes() == imaged and cfg.stat().st_mtime_ns == stamp


def test_provision_names_grub_cfg_after_the_configured_grubenv(make_device: MakeDevice) -> None:
    """The grubenv may have another name: the grub.cfg written beside it loads that file."""
    device = make_device("grub")
    flashed(device)
    esp = Path(device.config.bootloader["grubenv"]).parent
    (esp / "grub.cfg").unlink()
    (esp / "grubenv").rename(esp / "fleet.env")
    device.config = dataclasses.replace(
        device.config, bootloader={**device.config.bootloader, "grubenv": str(esp / "fleet.env")}
    )
    result = CliRunner().invoke(main, provision_args(device))
    assert result.exit_code == 0, result.output
    text = (esp / "grub.cfg").read_text()
    assert text == grub_script.grub_cfg(env_file="${config_directory}/fleet.env")
    assert 'set fleet_env="${config_directory}/fleet.env"' in text


@pytest.mark.parametrize("firmware", ["grub", "uboot"])
def test_provision_survives_a_power_cut_at_every_write(
    make_device: MakeDevice, firmware: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut the power at each write boundary of a provisioning that writes the boot script:
    the script is absent or whole, never torn, and provisioning again (the factory line
    starts over) leaves the device booting the factory release."""
    from chaos.virtual_device import PowerCut, PowerSwitch

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # boot.scr's header time

    def prepared() -> tuple[VirtualDevice, Path]:
        device = make_device(firmware)
        flashed(device)
        options = device.config.bootloader
        if firmware == "grub":
            script = Path(options["grubenv"]).parent / "grub.cfg"
            script.unlink()
        else:
            script = Path(options["env_file"]).parent / "boot.scr"
        return device, script

    device, script = prepared()
    with PowerSwitch().installed() as counting:
        assert CliRunner().invoke(main, provision_args(device)).exit_code == 0
    whole = script.read_bytes()
    points = counting.points
    assert any(path == script for _, path in points), points  # written through durable
    for cut_at, (point, path) in enumerate(points):
        device, script = prepared()
        where = f"cut {cut_at}/{len(points)} at {point} {path.name}"
        with PowerSwitch(cut_at=cut_at).installed() as switch, contextlib.suppress(PowerCut):
            CliRunner().invoke(main, provision_args(device))
        assert switch.off, where
        assert not script.exists() or script.read_bytes() == whole, where
        again = CliRunner().invoke(main, provision_args(device))
        assert again.exit_code == 0, f"{where}: {again.output}"
        assert script.read_bytes() == whole, where
        records = device.power_on()
        assert (records[-1].slot, records[-1].image is not None) == ("a", True), where
        assert records[-1].action in ("confirmed", "committed"), f"{where}: {records}"
