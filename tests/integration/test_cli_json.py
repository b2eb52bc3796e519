"""``--json`` on the ``fleet keys`` and ``fleet image`` commands, and the progress bars of
``fleet bundle create`` and ``verify``: one JSON document alone on stdout that a script can act
on, failures the module's way, a bar only for a person at a terminal."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from fleet_core.cli import fleet
from image_builder.filesystem import build_filesystem_image
from signing.keyring import Keyring
from signing.keys import key_id, load_private_key, load_public_key
from tests.conftest import assert_one_line_error
from tests.integration.test_disk_import import partition_disk, write_at
from tests.terminal import run_on_terminal

MIB = 1 << 20


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(fleet, [str(a) for a in args])


def as_json(*args: str | Path) -> Any:
    """Run a command with --json: exit 0, nothing on stderr, one ASCII JSON document."""
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.isascii()
    return json.loads(result.stdout)


def test_keys_generate_id_trust_threshold_revoke_as_json(tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text("s3cret\n")
    # a dot in OUT is kept, a .pem given in OUT is not doubled
    a = as_json("keys", "generate", "--out", tmp_path / "release-2024.1")
    b = as_json("keys", "generate", "--out", tmp_path / "b.pem", "--passphrase-file", secret)
    assert a == {
        "key_id": a["key_id"],
        "private_key": str(tmp_path / "release-2024.1.pem"),
        "public_key": str(tmp_path / "release-2024.1.pub"),
        "encrypted": False,
    }
    assert b["private_key"] == str(tmp_path / "b.pem") and b["encrypted"] is True
    assert b["public_key"] == str(tmp_path / "b.pub")
    for made in (a, b):
        assert key_id(load_public_key(made["public_key"])) == made["key_id"]
    assert load_private_key(b["private_key"], b"s3cret").key_id == b["key_id"]

    assert as_json("keys", "id", a["public_key"]) == {
        "key_id": a["key_id"],
        "path": a["public_key"],
    }
    assert as_json("keys", "id", b["private_key"], "--passphrase-file", secret) == {
        "key_id": b["key_id"],
        "path": b["private_key"],
    }

    ring = tmp_path / "ring-\u00e9"  # reported in ASCII all the same
    trusted = as_json("keys", "trust", a["public_key"], "--keyring", ring)
    assert trusted == {
        "key_id": a["key_id"],
        "keyring": str(ring),
        "trusted": [a["key_id"]],
        "revoked": [],
        "threshold": 1,
    }
    trusted = as_json("keys", "trust", b["public_key"], "--keyring", ring)
    assert trusted["key_id"] == b["key_id"]
    assert trusted["trusted"] == sorted([a["key_id"], b["key_id"]])
    raised = as_json("keys", "threshold", "2", "--keyring", ring)
    assert raised == {
        "keyring": str(ring),
        "trusted": sorted([a["key_id"], b["key_id"]]),
        "revoked": [],
        "threshold": 2,
    }
    assert Keyring.load(ring).threshold == 2
    as_json("keys", "threshold", "1", "--keyring", ring)
    revoked = as_json("keys", "revoke", a["key_id"].upper(), "--keyring", ring)
    assert revoked == {
        "key_id": a["key_id"],
        "keyring": str(ring),
        "trusted": [b["key_id"]],
        "revoked": [a["key_id"]],
        "threshold": 1,
    }
    # what the mutations report is what the keyring now holds
    listed = as_json("keys", "list", "--keyring", ring)
    assert {k: revoked[k] for k in ("trusted", "revoked", "threshold")} == listed


def test_keys_generate_asks_for_the_passphrase_on_stderr_in_json_mode(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        fleet,
        ["keys", "generate", "--out", str(tmp_path / "k"), "--ask-passphrase", "--json"],
        input="s3cret\ns3cret\n",
    )
    assert result.exit_code == 0, result.output
    assert "Passphrase" in result.stderr
    generated = json.loads(result.stdout)
    assert generated["encrypted"] is True
    assert load_private_key(generated["private_key"], b"s3cret").key_id == generated["key_id"]


def test_bundle_create_asks_for_a_key_passphrase_on_stderr_in_json_mode(
    tmp_path: Path, make_image: Callable[..., Path]
) -> None:
    secret = tmp_path / "pass"
    secret.write_text("s3cret\n")
    as_json("keys", "generate", "--out", tmp_path / "k", "--passphrase-file", secret)
    images = make_image("root.ext4", 10_000), make_image("boot.vfat", 5_000, seed=3)
    output = tmp_path / "r.bundle"
    result = CliRunner().invoke(
        fleet, [str(a) for a in create_args(tmp_path, images, output)] + ["--json"],
        input="s3cret\n",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"Passphrase for {tmp_path / 'k.pem'}" in result.stderr
    assert json.loads(result.stdout)["size"] == output.stat().st_size


def test_keys_failures_in_json_mode_are_one_error_line_and_no_json(tmp_path: Path) -> None:
    generated = as_json("keys", "generate", "--out", tmp_path / "k")
    ring = tmp_path / "ring"
    as_json("keys", "trust", generated["public_key"], "--keyring", ring)
    cases = [
        (("keys", "generate", "--out", tmp_path / "k"), "already exists"),
        (("keys", "id", tmp_path / "missing.pub"), "missing.pub"),
        (("keys", "trust", tmp_path / "missing.pub", "--keyring", ring), "missing.pub"),
        (("keys", "threshold", "2", "--keyring", ring), "only 1 trusted"),
        (("keys", "revoke", generated["key_id"], "--keyring", ring), "below the threshold 1"),
    ]
    for args, fragment in cases:
        result = invoke(*args, "--json")
        assert_one_line_error(result, fragment)
        assert result.stdout == ""
    assert as_json("keys", "list", "--keyring", ring)["trusted"] == [generated["key_id"]]


def test_image_rootfs_disk_and_import_as_json(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text('NAME="test"\n')
    root = as_json("image", "rootfs", tree, "--size", "4M", "--label", "root",
                   "-o", tmp_path / "root.ext4")  # fmt: skip
    assert root == {
        "path": str(tmp_path / "root.ext4"),
        "fs_type": "ext4",
        "size": 4 * MIB,
        "label": "root",
    }
    assert (tmp_path / "root.ext4").stat().st_size == root["size"]
    boot = as_json("image", "rootfs", tree, "--type", "vfat", "--size", "2M",
                   "-o", tmp_path / "boot.vfat")  # fmt: skip
    assert boot["fs_type"] == "vfat" and boot["size"] == 2 * MIB and boot["label"] is None
    safe = as_json("image", "rootfs", tree, "--type", "squashfs", "-o", tmp_path / "safe.squashfs")
    # no --size: the size reported is the one the image came out at
    assert safe["size"] == (tmp_path / "safe.squashfs").stat().st_size
    build_filesystem_image(tree, tmp_path / "safe-boot.vfat", "vfat", size_bytes=2 * MIB)

    disk = tmp_path / "disk.img"
    built = as_json(
        "image", "disk", "--layout", "rpi", "--rootfs", root["path"], "--bootfs", boot["path"],
        "--safe", tmp_path / "safe.squashfs", "--safe-bootfs", tmp_path / "safe-boot.vfat",
        "--root-size", "8M", "--data-size", "4M", "-o", disk,
    )  # fmt: skip
    assert built["path"] == str(disk) and built["layout"] == "rpi"
    assert built["size"] == disk.stat().st_size
    dump = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, check=True)
    table = json.loads(dump.stdout)["partitiontable"]["partitions"]
    assert [(p["number"], p["label"], p["offset"], p["size"]) for p in built["partitions"]] == [
        (n, p["name"], int(p["start"]) * 512, int(p["size"]) * 512)
        for n, p in enumerate(table, start=1)
    ]
    by_label = {p["label"]: p for p in built["partitions"]}
    assert by_label["root_a"]["size"] == 8 * MIB

    # a stock-style MBR disk holding the two images, for import
    stock = tmp_path / "stock.img"
    stock.write_bytes(bytes(8 * MIB))
    partition_disk(stock, "dos", [(2048, 4096, "c"), (6144, 8192, "83")])
    write_at(stock, 2048 * 512, Path(boot["path"]).read_bytes())
    write_at(stock, 6144 * 512, Path(root["path"]).read_bytes())
    imported = as_json("image", "import", stock, "--out-dir", tmp_path / "slots")
    assert imported["disk"] == str(stock)
    assert [
        (i["slot_class"], i["partition"], i["offset"], i["size"], i["fs_type"])
        for i in imported["images"]
    ] == [("bootfs", 1, 2048 * 512, 2 * MIB, "vfat"), ("rootfs", 2, 6144 * 512, 4 * MIB, "ext4")]
    for image, source in zip(imported["images"], (boot, root), strict=True):
        assert Path(image["path"]).parent == tmp_path / "slots"
        assert Path(image["path"]).read_bytes() == Path(source["path"]).read_bytes()


def test_image_failures_in_json_mode_are_one_error_line_and_no_json(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_text("x\n")
    build_filesystem_image(tree, tmp_path / "bare.ext4", "ext4", size_bytes=4 * MIB)
    cases = [
        (("image", "rootfs", tmp_path / "nope", "--size", "8M", "-o", tmp_path / "y.ext4"),
         "nope"),
        (("image", "import", tmp_path / "bare.ext4", "--out-dir", tmp_path / "slots"),
         "it looks like a bare ext4 filesystem"),
        (("image", "disk", "--layout", "rpi", "--rootfs", tmp_path / "bare.ext4",
          "--bootfs", tmp_path / "missing.vfat", "--safe", tmp_path / "bare.ext4",
          "--safe-bootfs", tmp_path / "missing.vfat", "-o", tmp_path / "disk.img"),
         "missing.vfat"),
    ]  # fmt: skip
    for args, fragment in cases:
        result = invoke(*args, "--json")
        assert_one_line_error(result, fragment)
        assert result.stdout == ""
    assert not (tmp_path / "y.ext4").exists() and not (tmp_path / "disk.img").exists()


def create_args(
    tmp_path: Path, images: tuple[Path, Path], output: Path, compress: str = "zstd"
) -> list[str | Path]:
    rootfs, bootfs = images
    return [
        "bundle", "create", "--compatible", "metrica-rpi4", "--version", "1.0.0",
        "--security-version", "1", "--image", f"rootfs={rootfs}", "--image", f"bootfs={bootfs}",
        "--key", tmp_path / "k.pem", "--compress", compress, "-o", output,
    ]  # fmt: skip


def test_bundle_create_and_verify_draw_a_bar_only_on_a_terminal(
    tmp_path: Path, make_image: Callable[..., Path]
) -> None:
    invoke("keys", "generate", "--out", tmp_path / "k")
    invoke("keys", "trust", tmp_path / "k.pub", "--keyring", tmp_path / "ring")
    images = make_image("root.ext4", 5 * MIB + 123), make_image("boot.vfat", 2 * MIB, seed=3)
    output = tmp_path / "r.bundle"

    created = run_on_terminal(create_args(tmp_path, images, output))
    assert created.returncode == 0, created.terminal
    assert created.stdout.startswith(f"{output}: metrica-fleet 1.0.0 for metrica-rpi4")
    assert "bundling r.bundle" in created.terminal
    assert "100%" in created.terminal  # every byte of both images counted
    stored = tmp_path / "stored.bundle"
    uncompressed = run_on_terminal(create_args(tmp_path, images, stored, compress="none"))
    assert uncompressed.returncode == 0, uncompressed.terminal
    assert "bundling stored.bundle" in uncompressed.terminal and "100%" in uncompressed.terminal

    verified = run_on_terminal(["bundle", "verify", output, "--keyring", tmp_path / "ring"])
    assert verified.returncode == 0, verified.terminal
    assert verified.stdout.startswith(f"{output}: OK: metrica-fleet 1.0.0")
    assert "verifying r.bundle" in verified.terminal
    assert "100%" in verified.terminal  # every byte of the bundle counted

    # --json: the same commands on the same terminal draw nothing
    again = tmp_path / "again.bundle"
    created = run_on_terminal([*create_args(tmp_path, images, again), "--json"])
    assert created.returncode == 0 and created.terminal == ""
    document = json.loads(created.stdout)
    assert document["bundle"] == str(again) and document["size"] == again.stat().st_size
    checked = run_on_terminal(["bundle", "verify", again, "--keyring", tmp_path / "ring", "--json"])
    assert checked.returncode == 0 and checked.terminal == ""
    assert json.loads(checked.stdout)["ok"] is True

    # and a failure in JSON mode is the verify's document, still without a bar
    damaged = tmp_path / "damaged.bundle"
    data = bytearray(again.read_bytes())
    data[-2 * 512 - 700] ^= 1
    damaged.write_bytes(bytes(data))
    failed = run_on_terminal(
        ["bundle", "verify", damaged, "--keyring", tmp_path / "ring", "--json"]
    )
    assert failed.returncode == 1 and failed.terminal == ""
    assert json.loads(failed.stdout)["ok"] is False

    # not a terminal (click.testing): the human output alone, no bar, no label
    plain = invoke("bundle", "verify", output, "--keyring", tmp_path / "ring")
    assert plain.exit_code == 0 and plain.stderr == ""
    assert plain.stdout.startswith(f"{output}: OK: metrica-fleet 1.0.0")
