"""``fleet simulate`` as the README leads a newcomer to it: only a server URL and an enrollment
token (the keys fetched from the server and pinned on first use), devices whose compatible string
is the one the README's bundles carry, an ordinary bundle (ext4 root, FAT boot, made by
``fleet image`` and ``fleet bundle create``) rolled out to them to the end; a faults file that
is wrong is one error naming its line and key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from chaos.cli import FaultsFileError, SimulateError, keyring_from, pin_keys, read_specs
from chaos.fleet import copy_sparse
from chaos.lab_image import make_lab_image
from chaos.virtual_device import VirtualDevice
from fleet_core.cli import fleet
from signing.keyring import Keyring, trust_key
from signing.keys import generate_key, key_id, load_public_key
from tests.chaos.conftest import Releases
from tests.chaos.servers import Fleet, run

FLEET = [sys.executable, "-c", "from fleet_core.cli import main; main()"]


def wait_for(condition: Callable[[], bool], what: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {limit_s:.0f} s: {what}")
        time.sleep(0.2)  # polling interval of the condition, not a wait for an outcome


def ordinary_bundle(tmp_path: Path, releases: Releases, version: str) -> Path:
    """A release made as the README makes one: ``fleet image`` for the root (ext4) and boot
    (FAT) file systems, ``fleet bundle create --compatible metrica-rpi4``."""
    tree, boot = tmp_path / "rootfs-tree", tmp_path / "boot-tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text(f'VERSION_ID="{version}"\n')
    boot.mkdir()
    (boot / "config.txt").write_text("arm_64bit=1\n")
    run("image", "rootfs", str(tree), "--type", "ext4", "--size", "8M",
        "-o", str(tmp_path / "rootfs.ext4"))  # fmt: skip
    run("image", "rootfs", str(boot), "--type", "vfat", "--size", "4M",
        "-o", str(tmp_path / "bootfs.vfat"))  # fmt: skip
    bundle = tmp_path / f"release-{version}.bundle"
    run("bundle", "create", "--compatible", "metrica-rpi4", "--version", version,
        "--security-version", "3", "--image", f"rootfs={tmp_path / 'rootfs.ext4'}",
        "--image", f"bootfs={tmp_path / 'bootfs.vfat'}",
        "--key", str(releases.directory / "release-key.pem"), "--compress", "zstd",
        "-o", str(bundle))  # fmt: skip
    return bundle


def test_a_fleet_from_a_server_and_a_token_takes_an_ordinary_release_to_the_end(
    tmp_path: Path, releases: Releases
) -> None:
    servers = Fleet(
        tmp_path, None, releases, server_args=("--time-scale", "10", "--rollout-interval", "0.2")
    )
    simulation: subprocess.Popen[str] | None = None
    try:
        token = run("server", "enrollment-token", "create", "--uses", "3", *servers.db_args)
        servers.fleet("release", "upload", str(ordinary_bundle(tmp_path, releases, "1.4.0")))
        output = tmp_path / "simulate.out"
        with output.open("w") as out:
            simulation = subprocess.Popen(
                [*FLEET, "simulate", "--server", servers.urls[0], "--enrollment-token",
                 token.splitlines()[0], "--devices", "3", "--workdir", str(tmp_path / "sim"),
                 "--step", "15", "--speed", "1000000", "--duration", "10000000"],
                stdout=out, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip

        def devices() -> list[dict[str, object]]:
            rows: list[dict[str, object]] = json.loads(servers.fleet("device", "list", "--json"))
            return rows

        wait_for(lambda: len(devices()) == 3 or simulation.poll() is not None, "3 devices")
        assert simulation.poll() is None, output.read_text()
        assert {row["compatible"] for row in devices()} == {"metrica-rpi4"}
        canary = str(devices()[0]["id"])
        servers.fleet("rollout", "start", "1.4.0", "--canary", canary, "--soak", "10s")

        def state() -> str:
            answer = json.loads(servers.fleet("rollout", "status", "--json"))
            return str(answer["rollouts"][0]["state"])

        wait_for(
            lambda: state() not in ("running", "paused") or simulation.poll() is not None,
            "the rollout",
        )
        assert state() == "completed", output.read_text()
        wait_for(lambda: "1.4.0: 3" in output.read_text(), "the report of 1.4.0 on 3 devices")
        printed = output.read_text()
        assert "fetched from" in printed and "trust on first use" in printed, printed
        assert {row["version"] for row in devices()} == {"1.4.0"}
    finally:
        if simulation is not None:
            simulation.terminate()
            simulation.wait(30)
        for process in servers.processes:
            process.stop()


def test_keys_are_pinned_on_first_use_and_a_different_key_is_refused(
    fleet_servers: Fleet, tmp_path: Path
) -> None:
    urls, data = fleet_servers.urls, fleet_servers.data
    server_key = key_id(load_public_key(data / "server-key.pub"))
    pinned = tmp_path / "pinned" / "server-keyring"
    assert "trust on first use" in pin_keys(pinned, urls, "server", (), "--server-key")
    assert Keyring.load(pinned).active_key_ids == (server_key,)
    assert "the same on" in pin_keys(pinned, urls, "server", (), "--server-key")
    # the pin names another key than the server's now: the run is refused
    for path in pinned.glob("*.pub"):
        path.unlink()
    generate_key(tmp_path / "other")
    trust_key(pinned, tmp_path / "other.pub")
    with pytest.raises(SimulateError, match="remove .* or give the keys with --server-key"):
        pin_keys(pinned, urls, "server", (), "--server-key")
    # a key given on the command line replaces the pin
    given = pin_keys(pinned, urls, "server", (data / "server-key.pub",), "--server-key")
    assert "from --server-key" in given
    assert Keyring.load(pinned).active_key_ids == (server_key,)
    # the release keyring: the server's, fetched and pinned the same way
    releases = tmp_path / "pinned" / "release-keyring"
    assert "trust on first use" in pin_keys(releases, urls, "release", (), "--release-key")
    assert Keyring.load(releases).active_key_ids == Keyring.load(data / "keyring").active_key_ids


def test_a_published_key_that_is_not_the_key_its_id_names_is_refused(tmp_path: Path) -> None:
    real, other = generate_key(tmp_path / "real"), generate_key(tmp_path / "other")
    lying = {"keys": [{"key_id": real.key_id, "public_key": (tmp_path / "other.pub").read_text()}]}
    with pytest.raises(SimulateError, match="not the key its id names"):
        keyring_from(lying, "http://server", tmp_path / "pinned")
    assert not (tmp_path / "pinned").exists()
    honest = {
        "keys": [{"key_id": other.key_id, "public_key": (tmp_path / "other.pub").read_text()}]
    }
    keyring_from(honest, "http://server", tmp_path / "pinned")
    assert Keyring.load(tmp_path / "pinned").active_key_ids == (other.key_id,)


def test_a_pin_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    """Keys given on the command line, or fetched, replace the pin only once all of them are
    good: a bad one keeps the old pin as it was, and no staging directory is left behind."""
    first, second = generate_key(tmp_path / "first"), generate_key(tmp_path / "second")
    pinned = tmp_path / "pinned" / "server-keyring"
    pin_keys(pinned, [], "server", (tmp_path / "first.pub",), "--server-key")
    before = {p.name: p.read_bytes() for p in pinned.iterdir()}
    (tmp_path / "bad.pub").write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n")
    with pytest.raises(SimulateError, match="--server-key .*bad.pub"):
        pin_keys(
            pinned, [], "server", (tmp_path / "second.pub", tmp_path / "bad.pub"), "--server-key"
        )
    assert {p.name: p.read_bytes() for p in pinned.iterdir()} == before
    lying = {
        "keys": [{"key_id": first.key_id, "public_key": (tmp_path / "second.pub").read_text()}]
    }
    with pytest.raises(SimulateError, match="not the key its id names"):
        keyring_from(lying, "http://server", pinned)
    assert {p.name: p.read_bytes() for p in pinned.iterdir()} == before
    assert Keyring.load(pinned).active_key_ids == (first.key_id,)
    pin_keys(pinned, [], "server", (tmp_path / "second.pub",), "--server-key")
    assert Keyring.load(pinned).active_key_ids == (second.key_id,)
    assert sorted(p.name for p in pinned.parent.iterdir()) == ["server-keyring"]


def test_without_keys_and_without_a_server_that_publishes_them_the_error_says_what_to_give(
    tmp_path: Path,
) -> None:
    with pytest.raises(SimulateError, match="give it with --server-key"):
        pin_keys(tmp_path / "k", ["http://127.0.0.1:9"], "server", (), "--server-key")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[devices]]\ncount = 1\nhang_on = "2.0.0"\n', r"line 3: devices\[0\]\.hang_on: a list"),
        ('[[devices]]\nrole = "camera"\n\n[[devices]]\noffline = [[600, 0]]\n',
         r"line 5: devices\[1\]\.offline: .* 0 <= from < to"),
        ("[[devices]]\ncount = true\n", r"line 2: devices\[0\]\.count: a whole number"),
        ("[[devices]]\ncount = -1\n", r"line 2: devices\[0\]\.count"),
        ('[[devices]]\nclock_offset_s = "5y"\n', r"line 2: devices\[0\]\.clock_offset_s"),
        ('[[device]]\nrole = "camera"\n', r"unknown key device \(did you mean devices\?\)"),
        ('[[devices]]\nrole = "camera"\nhangon = ["2.0.0"]\n',
         r"line 1: devices\[0\]: unknown key hangon \(did you mean hang_on\?\)"),
        ('[[devices]]\ntags = ["North"]\n', r"line 2: devices\[0\]\.tags: 'North' is not a label"),
    ],
)  # fmt: skip
def test_a_wrong_faults_file_names_the_line_and_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    faults = tmp_path / "faults.toml"
    faults.write_text(text)
    with pytest.raises(FaultsFileError, match=message):
        read_specs(10, faults)


def test_a_wrong_faults_file_is_one_error_line_before_anything_starts(tmp_path: Path) -> None:
    faults = tmp_path / "faults.toml"
    faults.write_text('[[devices]]\ncount = 2\nunhealthy_on = "3.0.0"\n')
    result = CliRunner().invoke(fleet, [
        "simulate", "--server", "http://127.0.0.1:9", "--enrollment-token", "t",
        "--workdir", str(tmp_path / "sim"), "--faults", str(faults),
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1, result.output
    assert result.output.startswith(f"Error: {faults} line 3: devices[0].unhealthy_on:")
    assert not (tmp_path / "sim").exists()


def test_the_documented_example_is_read_as_documented(tmp_path: Path) -> None:
    doc = Path(__file__).parents[2] / "docs" / "simulate.md"
    example = doc.read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "faults.toml"
    path.write_text(example)
    specs = read_specs(10, path)
    assert len(specs) == 10
    assert any(s.profile.hang_on for s in specs) and any(s.offline for s in specs)
    assert any(s.clock_offset_s for s in specs) and any(s.tags for s in specs)


def test_an_ordinary_image_boots_only_once_the_updater_wrote_it_to_its_end(
    tmp_path: Path,
) -> None:
    import chaos.lab_firmwares  # noqa: F401 (fills LAB_FIRMWARES)

    device = VirtualDevice(tmp_path / "d", "grub", plain_images=True)
    device.provision(make_lab_image("1.0.0"), "1.0.0")
    device.slot_path("b").write_bytes(os.urandom(4096) + bytes((1 << 20) - 4096))
    state = device.store.load().state
    for status, expected in [
        ("installing", None),
        ("bad", None),
        ("empty", None),
        ("installed", "1.4.0"),
        ("trial", "1.4.0"),
        ("good", "1.4.0"),
    ]:
        device.store.save(state.with_slot("b", status=status, version="1.4.0"))
        image = device.image("b")
        assert (image.version if image else None) == expected, status
        assert image is None or image.behaviour == "healthy"
    # a lab image that is not whole stays a broken lab image, whatever the state says
    damaged = bytearray(make_lab_image("2.0.0"))
    damaged[-1] ^= 1
    device.slot_path("b").write_bytes(bytes(damaged))
    assert device.image("b") is None
    # and without plain_images, only lab images boot
    strict = VirtualDevice(tmp_path / "d", "grub")
    device.slot_path("b").write_bytes(bytes(1 << 20))
    assert strict.image("b") is None


def test_template_copies_keep_slot_files_sparse(tmp_path: Path) -> None:
    source = tmp_path / "slot.img"
    with source.open("wb") as handle:
        handle.truncate(256 << 20)
        handle.seek(100 << 20)
        handle.write(b"data" * 1024)
    target = tmp_path / "copy.img"
    copy_sparse(str(source), str(target))
    assert target.read_bytes() == source.read_bytes()
    assert target.stat().st_blocks * 512 < 16 << 20
