"""A path named as an input file that is a FIFO (opening it would block until killed), a
directory or a device node is refused before it is opened: one ``Error:`` line naming it and
what it is."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fleet_core.cli import fleet
from fleet_core.inputs import InputPathError, refuse_non_regular_input
from signing.keys import generate_key
from tests.conftest import assert_one_line_error


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(fleet, [str(a) for a in args])


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO with a writer waiting on it that closes at once: a command that opened it would
    read an empty file and fail otherwise, rather than block the test run."""
    path = tmp_path / "pipe"
    os.mkfifo(path)
    writer = threading.Thread(target=lambda: open(path, "wb").close(), daemon=True)
    writer.start()
    yield path
    os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # releases the writer if still waiting
    writer.join(timeout=10)


def test_bundle_verify_and_info_refuse_a_fifo(tmp_path: Path, fifo: Path) -> None:
    generate_key(tmp_path / "release")
    ring = tmp_path / "ring"
    assert invoke("keys", "trust", tmp_path / "release.pub", "--keyring", ring).exit_code == 0
    assert_one_line_error(invoke("bundle", "verify", fifo, "--keyring", ring), "(a FIFO)")
    assert_one_line_error(invoke("bundle", "info", fifo, "--json"), f"{fifo}: not a regular file")
    as_json = invoke("bundle", "verify", fifo, "--keyring", ring, "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout) == {
        "ok": False,
        "problem": f"{fifo}: not a regular file (a FIFO)",
    }


def test_bundle_create_refuses_a_fifo_as_key(tmp_path: Path, fifo: Path) -> None:
    (tmp_path / "root.ext4").write_bytes(b"\1" * 4096)
    result = invoke(
        "bundle", "create", "--compatible", "c", "--version", "1.0.0",
        "--security-version", "1", "--image", f"rootfs={tmp_path / 'root.ext4'}",
        "--key", fifo, "-o", tmp_path / "b.bundle",
    )  # fmt: skip
    assert_one_line_error(result, f"--key {fifo}: not a regular file (a FIFO)")
    assert not (tmp_path / "b.bundle").exists()


def test_the_check_names_what_the_path_is_and_leaves_missing_paths_to_the_caller(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to("file")
    refuse_non_regular_input(tmp_path / "file")
    refuse_non_regular_input(tmp_path / "link")
    refuse_non_regular_input(tmp_path / "missing")
    with pytest.raises(InputPathError, match=r"--in .*: not a regular file \(a directory\)"):
        refuse_non_regular_input(tmp_path, "--in")
    with pytest.raises(InputPathError, match=r"\(a character device\)"):
        refuse_non_regular_input("/dev/null")
