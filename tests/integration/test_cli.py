"""The ``fleet`` command as operators use it: exit codes, one-line errors, no partial files."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fleet_core.cli import fleet
from tests.conftest import assert_one_line_error

MakeBundle = Callable[..., Path]


def invoke(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(fleet, [str(a) for a in args], env=env)


def test_keys_generate_trust_list_revoke_threshold(tmp_path: Path) -> None:
    result = invoke("keys", "generate", "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    key_a = result.output.split()[-1]
    assert stat.S_IMODE((tmp_path / "a.pem").stat().st_mode) == 0o600
    assert invoke("keys", "id", tmp_path / "a.pub").output.strip() == key_a
    assert invoke("keys", "id", tmp_path / "a.pem").output.strip() == key_a
    invoke("keys", "generate", "--out", tmp_path / "b")
    ring = tmp_path / "ring"
    for name in ("a", "b"):
        assert invoke("keys", "trust", tmp_path / f"{name}.pub", "--keyring", ring).exit_code == 0
    assert invoke("keys", "threshold", "2", "--keyring", ring).exit_code == 0
    assert_one_line_error(invoke("keys", "threshold", "3", "--keyring", ring), "only 2 trusted")
    assert invoke("keys", "threshold", "1", "--keyring", ring).exit_code == 0
    assert invoke("keys", "revoke", key_a, "--keyring", ring).exit_code == 0
    listing = invoke("keys", "list", "--keyring", ring).output
    assert f"{key_a} revoked" in listing
    assert "threshold 1" in listing
    key_b = invoke("keys", "id", tmp_path / "b.pub").output.strip()
    as_json = json.loads(invoke("keys", "list", "--keyring", ring, "--json").output)
    assert as_json == {"trusted": [key_b], "revoked": [key_a], "threshold": 1}


def test_encrypted_key_with_passphrase_file_and_environment(tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text("s3cret\n")
    result = invoke("keys", "generate", "--out", tmp_path / "k", "--passphrase-file", secret)
    assert result.exit_code == 0, result.output
    assert b"ENCRYPTED" in (tmp_path / "k.pem").read_bytes()
    by_file = invoke("keys", "id", tmp_path / "k.pem", "--passphrase-file", secret)
    by_env = invoke("keys", "id", tmp_path / "k.pem", env={"FLEET_KEY_PASSPHRASE": "s3cret"})
    assert by_file.output == by_env.output
    assert_one_line_error(
        invoke("keys", "id", tmp_path / "k.pem", env={"FLEET_KEY_PASSPHRASE": "wrong"}),
        "wrong passphrase",
    )


def test_bundle_create_verify_info(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    invoke("keys", "generate", "--out", tmp_path / "k")
    invoke("keys", "trust", tmp_path / "k.pub", "--keyring", tmp_path / "ring")
    rootfs, bootfs = make_image("root.ext4", 50_000), make_image("boot.vfat", 20_000)
    output = tmp_path / "r.bundle"
    result = invoke(
        "bundle", "create", "--compatible", "metrica-rpi4", "--version", "2.1.0",
        "--security-version", "3", "--image", f"rootfs={rootfs}", "--image", f"bootfs={bootfs}",
        "--key", tmp_path / "k.pem", "--compress", "zstd", "-o", output, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    created = json.loads(result.output)
    assert created["manifest"]["version"] == "2.1.0" and created["size"] == output.stat().st_size
    key_id = invoke("keys", "id", tmp_path / "k.pub").output.strip()
    assert created["signed_by"] == [key_id]
    verified = json.loads(invoke("bundle", "verify", output, "--keyring", tmp_path / "ring",
                                 "--json").output)  # fmt: skip
    assert verified["ok"] is True and verified["signed_by"] == [key_id]
    assert verified["manifest"] == created["manifest"]
    wrong = invoke("bundle", "verify", output, "--keyring", tmp_path / "ring", "--json",
                   "--compatible", "x86")  # fmt: skip
    assert wrong.exit_code == 1
    assert json.loads(wrong.stdout) == {
        "ok": False, "problem": f"{output}: built for 'metrica-rpi4', not 'x86'",
    }  # fmt: skip
    result = invoke("bundle", "verify", output, "--keyring", tmp_path / "ring")
    assert result.exit_code == 0, result.output
    assert "OK: metrica-fleet 2.1.0 for metrica-rpi4, security version 3" in result.output
    info = json.loads(invoke("bundle", "info", output, "--json").output)
    assert info["manifest"]["version"] == "2.1.0"
    assert [i["slot_class"] for i in info["manifest"]["images"]] == ["rootfs", "bootfs"]
    assert info["verified"] is False
    text = invoke("bundle", "info", output).output
    assert "security version: 3" in text and "not verified" in text
    assert_one_line_error(
        invoke("bundle", "verify", output, "--keyring", tmp_path / "ring", "--compatible", "x86"),
        "built for 'metrica-rpi4', not 'x86'",
    )


@pytest.fixture
def signed(tmp_path: Path, make_bundle: MakeBundle, keyring_dir: Path) -> tuple[Path, Path]:
    return make_bundle(), keyring_dir


def test_verify_errors_are_one_line(tmp_path: Path, signed: tuple[Path, Path]) -> None:
    bundle, ring = signed
    data = bundle.read_bytes()
    with tarfile.open(bundle) as archive:
        image = archive.getmembers()[2]  # the first image, after manifest.json and manifest.sig
    at = image.offset_data + image.size // 2
    cases = {
        "flipped": (data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :], "SHA-256"),
        "truncated": (data[:-700], "truncated"),
        "trailing": (data + b"junk", "trailing data"),
        "empty": (b"", "truncated"),
        "not-a-bundle": (b"PK\x03\x04" + bytes(2000), "not a ustar header"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.bundle"
        path.write_bytes(content)
        assert_one_line_error(invoke("bundle", "verify", path, "--keyring", ring), message)
    assert_one_line_error(
        invoke("bundle", "verify", tmp_path / "missing.bundle", "--keyring", ring), "cannot open"
    )
    assert_one_line_error(
        invoke("bundle", "verify", bundle, "--keyring", tmp_path / "nope"), "no such directory"
    )


def test_wrong_and_revoked_keys(tmp_path: Path, signed: tuple[Path, Path]) -> None:
    bundle, ring = signed
    invoke("keys", "generate", "--out", tmp_path / "other")
    invoke("keys", "trust", tmp_path / "other.pub", "--keyring", tmp_path / "other-ring")
    assert_one_line_error(
        invoke("bundle", "verify", bundle, "--keyring", tmp_path / "other-ring"), "none trusted"
    )
    invoke("keys", "trust", tmp_path / "other.pub", "--keyring", ring)
    key_id = invoke("keys", "id", tmp_path / "keys" / "release.pub").output.strip()
    invoke("keys", "revoke", key_id, "--keyring", ring)
    assert_one_line_error(invoke("bundle", "verify", bundle, "--keyring", ring), "revoked")


def test_failed_create_leaves_no_output(
    tmp_path: Path, key: object, make_image: Callable[..., Path]
) -> None:
    image = make_image()
    output = tmp_path / "out.bundle"
    base = ["bundle", "create", "--compatible", "c", "--security-version", "1",
            "--key", tmp_path / "keys" / "release.pem", "-o", output]  # fmt: skip
    cases = [
        ([*base, "--version", "1.0", "--image", f"rootfs={image}"], "semantic version"),
        ([*base, "--version", "1.0.0", "--image", f"rootfs={tmp_path}/nope"], "not a regular file"),
        ([*base, "--version", "1.0.0", "--image", f"rootfs={image}", "--image", f"rootfs={image}"],
         "two images"),
    ]  # fmt: skip
    for args, message in cases:
        assert_one_line_error(invoke(*args), message)
        assert not output.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = invoke("bundle", "create", "--version", "1.0.0")
    assert result.exit_code == 2
    args = ["--compatible", "c", "--version", "1.0.0", "--security-version", "1"]
    result = invoke("bundle", "create", *args, "--image", "kernel=x", "--key", "k", "-o", "o")
    assert result.exit_code == 2
    assert "slot class must be one of" in result.output


def test_console_script_prints_no_traceback(tmp_path: Path, signed: tuple[Path, Path]) -> None:
    bundle, ring = signed
    damaged = tmp_path / "damaged.bundle"
    damaged.write_bytes(bundle.read_bytes()[:-1])
    process = subprocess.run(
        [sys.executable, "-c", "from fleet_core.cli import main; main()",
         "bundle", "verify", str(damaged), "--keyring", str(ring)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert process.returncode == 1
    assert process.stdout == ""
    assert process.stderr.count("\n") == 1 and "Traceback" not in process.stderr
    assert process.stderr.startswith(f"Error: {damaged}: truncated")


def test_image_rootfs_and_import(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text('NAME="test"\n')
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    for name in ("one.ext4", "two.ext4"):
        result = invoke("image", "rootfs", tree, "--type", "ext4", "--size", "8M", "-o",
                        tmp_path / name, env=env)  # fmt: skip
        assert result.exit_code == 0, result.output
    assert (tmp_path / "one.ext4").read_bytes() == (tmp_path / "two.ext4").read_bytes()
    bad = invoke("image", "rootfs", tree, "--size", "lots", "-o", tmp_path / "x.ext4")
    assert bad.exit_code == 2 and "--size" in bad.output
    assert_one_line_error(
        invoke("image", "rootfs", tmp_path / "nope", "--size", "8M", "-o", tmp_path / "y.ext4"),
        "nope",
    )
    assert not (tmp_path / "y.ext4").exists()
    assert_one_line_error(
        invoke("image", "import", tmp_path / "one.ext4", "--out-dir", tmp_path / "slots"),
        "it looks like a bare ext4 filesystem",
    )
    assert not (tmp_path / "slots").exists() or not list((tmp_path / "slots").iterdir())


def test_demo_runs_to_the_end(tmp_path: Path) -> None:
    """The demo with a small fleet (make demo runs 50 devices)."""
    result = invoke("demo", "--workdir", tmp_path / "demo", "--devices", "8")
    assert result.exit_code == 0, result.output
    assert "every byte verified" in result.output
    assert "rollout 3.0.0: halted" in result.output
    assert "done: 8 of 8 devices on 2.0.0" in result.output
    assert "audit trail intact" in result.output
    # the web console's address and a token to watch the rollouts live, before they start
    console = result.output.index("web console: http://127.0.0.1:")
    assert "/ui/  sign in with this operator token: fleet_op_" in result.output
    assert "a console page nobody clicks signs out after 3 minutes" in result.output
    assert console < result.output.index("release 2.0.0: upload, then roll out")
