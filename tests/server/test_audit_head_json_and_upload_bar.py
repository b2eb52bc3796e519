"""``fleet audit head --json`` (one document a script can store or check) and the progress bar
of ``fleet release upload``: drawn on a terminal, never in --json mode."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner, Result
from sqlalchemy import delete

from fleet_core.cli import fleet
from server import audit
from server.anchor import SignedHead
from server.models import AuditRow
from signing.keys import load_private_key
from tests.conftest import assert_one_line_error
from tests.server.conftest import Harness, LiveServer
from tests.server.test_audit import fill
from tests.server.test_audit_anchors import data_dir_args
from tests.terminal import run_on_terminal


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(fleet, [str(a) for a in args])


def test_audit_head_as_json_printed_and_written(harness: Harness, tmp_path: Path) -> None:
    fill(harness)
    with harness.db.read() as session:
        last = audit.entries(session)[-1]
    server_key = load_private_key(harness.settings.server_key_path).public_key

    printed = run("audit", "head", *data_dir_args(harness), "--json")
    assert printed.exit_code == 0, printed.output
    assert printed.stderr == "" and printed.stdout.isascii()
    document = json.loads(printed.stdout)
    assert document["out"] is None
    head = SignedHead.from_dict(document["head"])
    assert (head.seq, head.hash) == (last.seq, last.hash)
    assert head.problem(server_key) is None

    out = tmp_path / "head.json"
    written = run("audit", "head", *data_dir_args(harness), "--out", out, "--json")
    assert written.exit_code == 0, written.output
    assert written.stderr == ""
    document = json.loads(written.stdout)
    assert document == {"head": json.loads(out.read_text()), "out": str(out)}
    assert SignedHead.from_dict(document["head"]).problem(server_key) is None
    # the file written is what a later verify checks
    verified = run("audit", "verify", *data_dir_args(harness), "--expect-signed-head", out)
    assert verified.exit_code == 0, verified.output


def test_audit_head_of_an_empty_trail_in_json_mode_is_one_error_line(
    harness: Harness, tmp_path: Path
) -> None:
    with harness.db.write() as session:
        session.execute(delete(AuditRow))
    out = tmp_path / "head.json"
    result = run("audit", "head", *data_dir_args(harness), "--out", out, "--json")
    assert_one_line_error(result, "the audit trail is empty")
    assert result.stdout == "" and not out.exists()


def test_release_upload_draws_a_bar_on_a_terminal_and_none_with_json(
    live_server: LiveServer, make_bundle: Callable[..., Path]
) -> None:
    token = live_server.harness.headers["operator"]["Authorization"].split()[1]
    api = ["--server", live_server.url, "--token", token]
    bundle = make_bundle(
        "two.bundle", version="2.0.0", size=1_500_000
    )  # under the test upload limit
    uploaded = run_on_terminal(["release", "upload", bundle, *api])
    assert uploaded.returncode == 0, uploaded.terminal
    assert uploaded.stdout.startswith("release 2.0.0 accepted")
    assert "uploading two.bundle" in uploaded.terminal and "100%" in uploaded.terminal

    quiet = run_on_terminal(["release", "upload", make_bundle("three.bundle", version="3.0.0"),
                             *api, "--json"])  # fmt: skip
    assert quiet.returncode == 0 and quiet.terminal == ""
    assert json.loads(quiet.stdout)["version"] == "3.0.0"

    plain = run("release", "upload", make_bundle("four.bundle", version="4.0.0"), *api)
    assert plain.exit_code == 0 and plain.stderr == ""
