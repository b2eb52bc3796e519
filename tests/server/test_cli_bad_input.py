"""Bad input to the server side's commands is one Error line (exit 1) or a usage error (exit 2),
never a traceback, and nothing is stored for a command that then fails."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from fleet_core.cli import fleet
from fleet_core.params import FiniteFloatRange
from server.models import AuditAnchorRow
from tests.conftest import assert_one_line_error
from tests.server.conftest import Harness, listening_socket
from tests.server.test_audit import fill
from tests.server.test_audit_anchors import data_dir_args


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(fleet, [str(a) for a in args])


def server_side_options() -> list[tuple[str, click.Option]]:
    """Every option of every command of the server side (server/cli), by its command's path."""
    found: list[tuple[str, click.Option]] = []

    def walk(command: click.Command, path: str, context: click.Context) -> None:
        if isinstance(command, click.Group):
            for name in command.list_commands(context):
                sub = command.get_command(context, name)
                assert sub is not None
                walk(sub, f"{path} {name}", click.Context(sub, parent=context, info_name=name))
            return
        module = getattr(command.callback, "__module__", "") or ""
        if module.startswith("server.cli"):
            found.extend((path, p) for p in command.params if isinstance(p, click.Option))

    walk(fleet, "fleet", click.Context(fleet, info_name="fleet"))
    return found


def test_every_float_option_of_the_server_side_is_finite() -> None:
    options = server_side_options()
    assert any(path == "fleet server run" for path, _ in options)  # the walk reached them
    floats = [(path, o.name) for path, o in options if isinstance(o.type, click.FloatRange)]
    assert ("fleet rollout status", "interval") in floats
    assert ("fleet server run", "time_scale") in floats
    loose = [(p, n) for p, n in floats if not any(
        isinstance(o.type, FiniteFloatRange) for q, o in options if (q, o.name) == (p, n)
    )]  # fmt: skip
    assert loose == [], "nan passes click.FloatRange: use fleet_core.params.FiniteFloatRange"


@pytest.mark.parametrize(
    "args",
    [
        ["rollout", "status", "5", "--watch", "--interval", "nan"],
        ["rollout", "status", "5", "--watch", "--interval", "inf"],
        ["server", "run", "--time-scale", "nan"],
        ["server", "run", "--rollout-interval", "nan"],
        ["server", "run", "--header-timeout", "inf"],
    ],
)
def test_a_number_that_is_not_finite_is_a_usage_error(args: list[str], tmp_path: Path) -> None:
    with listening_socket() as busy:  # a server run that got past the options stops at once
        port = str(busy.getsockname()[1])
        result = (
            run(*args, "--server", f"http://127.0.0.1:{port}")
            if args[0] == "rollout"
            else run(*args, "--data-dir", tmp_path / "data", "--host", "127.0.0.1", "--port", port)
        )
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{args[-2]}'" in result.stderr
    assert not (tmp_path / "data").exists()


def test_audit_head_out_in_a_missing_directory_is_one_error_line_and_signs_nothing(
    harness: Harness, tmp_path: Path
) -> None:
    fill(harness)
    out = tmp_path / "missing" / "head.json"
    result = run("audit", "head", *data_dir_args(harness), "--out", out, "--json")
    assert_one_line_error(result, f"--out {out}: no such directory")
    assert result.stdout == ""
    assert harness.count(AuditAnchorRow) == 0
    assert not out.parent.exists()


def test_audit_head_out_that_cannot_be_written_is_one_error_line(
    harness: Harness, tmp_path: Path
) -> None:
    fill(harness)
    heads = tmp_path / "heads"
    heads.mkdir()
    too_long = heads / ("x" * 300)  # (the tests run as root: no permission stops them)
    result = run("audit", "head", *data_dir_args(harness), "--out", too_long)
    # refused by the check every output gets, before anything is signed or written
    assert_one_line_error(result, f"--out {too_long}: cannot check it: File name too long")
    assert harness.count(AuditAnchorRow) == 0
    assert list(heads.iterdir()) == []


def test_audit_head_out_never_overwrites_a_private_key(harness: Harness, tmp_path: Path) -> None:
    """--out is the rule of every output (fleet_core.outputs): a signing key named by mistake
    stays as it was, and nothing is signed."""
    from signing.keys import generate_key

    generate_key(tmp_path / "release")
    key = tmp_path / "release.pem"
    before = key.read_bytes()
    fill(harness)
    result = run("audit", "head", *data_dir_args(harness), "--out", key)
    assert_one_line_error(result, "private key")
    assert key.read_bytes() == before
    assert harness.count(AuditAnchorRow) == 0
