"""``fleet keys`` in process: refusals are one line, and a keyring that verifies nothing can
still be seen and repaired."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from fleet_core.cli import fleet
from signing.cli import PASSPHRASE_ENV
from signing.keys import generate_key
from tests.conftest import assert_one_line_error


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(fleet, [str(a) for a in args])


def test_revoke_below_the_threshold_is_refused_and_list_still_works(tmp_path: Path) -> None:
    a, b = generate_key(tmp_path / "a"), generate_key(tmp_path / "b")
    ring = tmp_path / "ring"
    for name in ("a", "b"):
        assert invoke("keys", "trust", tmp_path / f"{name}.pub", "--keyring", ring).exit_code == 0
    assert invoke("keys", "threshold", "2", "--keyring", ring).exit_code == 0

    refused = invoke("keys", "revoke", a.key_id, "--keyring", ring)
    assert_one_line_error(refused, "below the threshold 2")
    assert "fleet keys threshold 1" in refused.stderr and "trust another key" in refused.stderr

    listing = invoke("keys", "list", "--keyring", ring)
    assert listing.exit_code == 0, listing.output
    assert listing.stdout.splitlines() == [
        *sorted(f"{k.key_id} trusted" for k in (a, b)),
        "threshold 2",
    ]

    assert invoke("keys", "threshold", "1", "--keyring", ring).exit_code == 0
    revoked = invoke("keys", "revoke", a.key_id, "--keyring", ring)
    assert revoked.exit_code == 0 and revoked.stdout == f"revoked {a.key_id}\n"
    assert f"{a.key_id} revoked" in invoke("keys", "list", "--keyring", ring).stdout


def test_threshold_above_the_trusted_keys_is_refused(tmp_path: Path) -> None:
    generate_key(tmp_path / "a")
    ring = tmp_path / "ring"
    assert invoke("keys", "trust", tmp_path / "a.pub", "--keyring", ring).exit_code == 0
    assert_one_line_error(invoke("keys", "threshold", "2", "--keyring", ring), "only 1 trusted")
    assert not (ring / "keyring.toml").exists()
    assert invoke("keys", "list", "--keyring", ring).stdout.endswith("threshold 1\n")


def test_a_keyring_below_its_threshold_is_listed_with_a_warning_and_repaired(
    tmp_path: Path,
) -> None:
    a, b, c = (generate_key(tmp_path / name) for name in ("a", "b", "c"))
    ring = tmp_path / "ring"
    for name in ("a", "b", "c"):
        assert invoke("keys", "trust", tmp_path / f"{name}.pub", "--keyring", ring).exit_code == 0
    assert invoke("keys", "threshold", "2", "--keyring", ring).exit_code == 0
    (ring / "revoked.txt").write_text(f"{a.key_id}\n{b.key_id}\n")  # as a lost race left it

    for extra in ((), ("--json",)):
        listing = invoke("keys", "list", "--keyring", ring, *extra)
        assert listing.exit_code == 0, listing.output
        warning = listing.stderr.strip().splitlines()
        assert len(warning) == 1 and warning[0].startswith("warning: "), warning
        assert "threshold 2 but only 1 trusted" in warning[0]
        assert "fleet keys threshold 1" in warning[0]
        assert c.key_id in listing.stdout and a.key_id in listing.stdout
    assert invoke("keys", "list", "--keyring", ring).stdout.splitlines() == [
        *sorted([f"{a.key_id} revoked", f"{b.key_id} revoked", f"{c.key_id} trusted"]),
        "threshold 2",
    ]

    repaired = invoke("keys", "threshold", "1", "--keyring", ring)
    assert repaired.exit_code == 0 and repaired.stdout == "threshold 1\n", repaired.output
    listing = invoke("keys", "list", "--keyring", ring)
    assert listing.stderr == "" and listing.stdout.endswith("threshold 1\n")


def test_trust_into_a_keyring_that_is_a_file_is_one_error_line(tmp_path: Path) -> None:
    generate_key(tmp_path / "a")
    result = invoke("keys", "trust", tmp_path / "a.pub", "--keyring", tmp_path / "a.pem")
    assert_one_line_error(result, f"keyring {tmp_path / 'a.pem'}: exists but is not a directory")


def test_an_empty_passphrase_is_refused_naming_where_it_came_from(tmp_path: Path) -> None:
    empty, newline = tmp_path / "empty.txt", tmp_path / "newline.txt"
    empty.write_bytes(b"")
    newline.write_bytes(b"\n")
    for source in (empty, newline):
        result = invoke("keys", "generate", "--out", tmp_path / "k", "--passphrase-file", source)
        assert_one_line_error(result, f"{source}: the passphrase is empty")
    by_env = CliRunner().invoke(
        fleet, ["keys", "generate", "--out", str(tmp_path / "k")], env={PASSPHRASE_ENV: ""}
    )
    assert_one_line_error(by_env, f"${PASSPHRASE_ENV} is set but empty")
    prompted = CliRunner().invoke(
        fleet, ["keys", "generate", "--out", str(tmp_path / "k"), "--ask-passphrase"], input="\n\n"
    )
    assert prompted.exit_code != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "newline.txt"]

    unset = CliRunner().invoke(
        fleet, ["keys", "generate", "--out", str(tmp_path / "plain")], env={PASSPHRASE_ENV: None}
    )
    assert unset.exit_code == 0, unset.output
    assert b"ENCRYPTED" not in (tmp_path / "plain.pem").read_bytes()
