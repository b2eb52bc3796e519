"""Keyring changes made at once by separate processes: none is lost, and the threshold rule
holds against what the others wrote (every change runs under the keyring's lock)."""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from signing.errors import KeyringError
from signing.keyring import Keyring, revoke_key, set_threshold, trust_key
from signing.keys import SigningKey, generate_key

ROUNDS = 6
REFUSED = 3  # exit status of a change the keyring refused (a KeyringError)
DEADLINE_S = 60.0
_FORK = multiprocessing.get_context("fork")


def _run(barrier: Any, change: Callable[..., object], args: tuple[object, ...]) -> None:
    barrier.wait(DEADLINE_S)
    try:
        change(*args)
    except KeyringError:
        sys.exit(REFUSED)


def at_once(changes: Sequence[tuple[Callable[..., object], tuple[object, ...]]]) -> list[int]:
    """Run each change in its own process, all released together; their exit statuses."""
    barrier = _FORK.Barrier(len(changes))
    processes = [_FORK.Process(target=_run, args=(barrier, *change)) for change in changes]
    for process in processes:
        process.start()
    for process in processes:
        process.join(DEADLINE_S)
    statuses = [process.exitcode for process in processes]
    assert all(status is not None for status in statuses), "a change did not finish"
    return [status for status in statuses if status is not None]


def keys(tmp_path: Path, count: int) -> list[SigningKey]:
    """``count`` key pairs, ``keys/k<i>.pem`` and ``keys/k<i>.pub``."""
    return [generate_key(tmp_path / "keys" / f"k{i}") for i in range(count)]


def pub(tmp_path: Path, index: int) -> Path:
    return tmp_path / "keys" / f"k{index}.pub"


def new_ring(tmp_path: Path, name: str, trusted: range, threshold: int) -> Path:
    """A keyring trusting keys ``k<i>`` for i in ``trusted``, with ``threshold``."""
    directory = tmp_path / name
    for index in trusted:
        trust_key(directory, pub(tmp_path, index))
    set_threshold(directory, threshold)
    return directory


def test_revocations_and_trusts_made_at_once_are_all_kept(tmp_path: Path) -> None:
    all_keys = keys(tmp_path, 8)
    revoked, left = all_keys[:5], all_keys[5:]  # k0..k5 trusted first, k6 and k7 meanwhile
    for round_number in range(ROUNDS):
        ring = new_ring(tmp_path, f"ring{round_number}", range(6), 1)
        statuses = at_once(
            [(revoke_key, (ring, key.key_id)) for key in revoked]
            + [(trust_key, (ring, pub(tmp_path, index))) for index in (6, 7)]
        )
        assert statuses == [0] * 7, statuses
        keyring = Keyring.load(ring)
        assert keyring.revoked == {key.key_id for key in revoked}, f"round {round_number}"
        assert keyring.active_key_ids == tuple(sorted(key.key_id for key in left))


def test_revocations_at_once_never_leave_the_keyring_below_its_threshold(
    tmp_path: Path,
) -> None:
    three = keys(tmp_path, 3)
    for round_number in range(ROUNDS):
        ring = new_ring(tmp_path, f"ring{round_number}", range(3), 2)
        statuses = at_once(
            [(revoke_key, (ring, three[0].key_id)), (revoke_key, (ring, three[1].key_id))]
        )
        assert sorted(statuses) == [0, REFUSED], f"round {round_number}: {statuses}"
        keyring = Keyring.load(ring)  # usable: it would raise below its threshold
        assert len(keyring.revoked) == 1 and keyring.threshold == 2


def test_raising_the_threshold_while_revoking_keeps_the_threshold_rule(tmp_path: Path) -> None:
    three = keys(tmp_path, 3)
    for round_number in range(ROUNDS):
        ring = new_ring(tmp_path, f"ring{round_number}", range(3), 1)
        statuses = at_once([(set_threshold, (ring, 3)), (revoke_key, (ring, three[0].key_id))])
        assert sorted(statuses) == [0, REFUSED], f"round {round_number}: {statuses}"
        keyring = Keyring.load(ring)
        assert (keyring.threshold, len(keyring.revoked)) in {(3, 0), (1, 1)}
