"""Key files against other processes: two key generations racing for one name, and a key file
or keyring file that is a FIFO no process writes to (read, it would block the command for
ever)."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fleet_core.cli import fleet
from signing.errors import KeyFileError, KeyringError
from signing.keyring import Keyring, revoke_key, set_threshold, trust_key
from signing.keys import (
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    private_key_is_encrypted,
)

ROUNDS = 8
RACERS = 4
REFUSED = 3  # exit status of a child whose call raised KeyFileError
DEADLINE_S = 30.0
BLOCKED_AFTER_S = 10.0  # a key file is read in milliseconds: a child still reading is blocked
_FORK = multiprocessing.get_context("fork")


def _generate(barrier: Any, out: Path, passphrase: bytes | None) -> None:
    barrier.wait(DEADLINE_S)
    try:
        generate_key(out, passphrase)
    except KeyFileError as err:
        assert "already exists" in str(err), err
        sys.exit(REFUSED)


@pytest.mark.parametrize("passphrase", [None, b"correct horse"])
def test_generations_racing_for_one_name_leave_one_key_pair(
    tmp_path: Path, passphrase: bytes | None
) -> None:
    for round_number in range(ROUNDS):
        out = tmp_path / f"round{round_number}" / "release"
        barrier = _FORK.Barrier(RACERS)
        racers = [
            _FORK.Process(target=_generate, args=(barrier, out, passphrase)) for _ in range(RACERS)
        ]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(DEADLINE_S)
        statuses = sorted(racer.exitcode for racer in racers if racer.exitcode is not None)
        assert statuses == [0] + [REFUSED] * (RACERS - 1), f"round {round_number}: {statuses}"
        private = load_private_key(out.with_name("release.pem"), passphrase)
        assert key_id(load_public_key(out.with_name("release.pub"))) == private.key_id
        assert sorted(p.name for p in out.parent.iterdir()) == ["release.pem", "release.pub"]


def _call_and_exit(call: Callable[[], object]) -> None:
    try:
        call()
    except KeyFileError as err:
        assert "not a regular file" in str(err), err
        sys.exit(REFUSED)


def finishes(call: Callable[[], object]) -> int | None:
    """Run ``call`` in a child process; its exit status, or None if it is still blocked
    after ``BLOCKED_AFTER_S`` (the child is then killed)."""
    child = _FORK.Process(target=_call_and_exit, args=(call,))
    child.start()
    child.join(BLOCKED_AFTER_S)
    if child.exitcode is None:
        child.kill()
        child.join()
        return None
    return child.exitcode


def _cli(*args: str | Path) -> Callable[[], object]:
    def run() -> None:
        result = CliRunner().invoke(fleet, [str(a) for a in args])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
        assert "not a regular file" in lines[0] and "Traceback" not in result.output
        sys.exit(REFUSED if result.exit_code == 1 else 1)

    return run


def test_a_fifo_given_as_a_key_file_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "key.pem"
    os.mkfifo(fifo)
    ring = tmp_path / "ring"
    calls: list[Callable[[], object]] = [
        lambda: load_private_key(fifo),
        lambda: load_public_key(fifo),
        lambda: private_key_is_encrypted(fifo),
        _cli("keys", "id", fifo),
        _cli("keys", "trust", fifo, "--keyring", ring),
    ]
    assert [finishes(call) for call in calls] == [REFUSED] * len(calls)
    assert not ring.exists()


def test_a_directory_given_as_a_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_public_key(tmp_path)


def _keyring_call(call: Callable[[], object]) -> Callable[[], object]:
    def run() -> None:
        try:
            call()
        except KeyringError as err:
            assert "not a regular file" in str(err), err
            sys.exit(REFUSED)

    return run


@pytest.mark.parametrize("name", ["revoked.txt", "keyring.toml"])
def test_a_keyring_file_that_is_a_fifo_is_refused_without_blocking(
    tmp_path: Path, name: str
) -> None:
    key = generate_key(tmp_path / "a")
    ring = tmp_path / "ring"
    trust_key(ring, tmp_path / "a.pub")
    os.mkfifo(ring / name)
    calls = [
        lambda: Keyring.load(ring),
        lambda: revoke_key(ring, key.key_id),
        lambda: trust_key(ring, tmp_path / "a.pub"),  # reads revoked.txt only
        lambda: set_threshold(ring, 1),  # replaces keyring.toml, reads revoked.txt
    ]
    statuses = [finishes(_keyring_call(call)) for call in calls]
    if name == "revoked.txt":
        assert statuses == [REFUSED] * 4
    else:
        assert statuses == [REFUSED, REFUSED, 0, 0]
        assert Keyring.load(ring).threshold == 1
