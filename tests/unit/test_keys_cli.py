"""``fleet keys`` in process: a refused revocation is one line and leaves the keyring usable."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from fleet_core.cli import fleet
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
