"""The sweep of temporaries that interrupted atomic writes left (fleet_core.durable)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet_core.durable import SWEEP_MIN_AGE_S, TEMPORARY, sweep_temporaries

OLD = time.time() - 2 * SWEEP_MIN_AGE_S


def leftover(directory: Path, name: str, mtime: float = OLD) -> Path:
    path = directory / name
    path.write_bytes(b"half")
    os.utime(path, (mtime, mtime))
    return path


def killed_during_atomic_write(target: Path) -> Path:
    """The temporary a process killed in the middle of ``atomic_write(target)`` leaves."""
    code = (
        "import os, signal, sys\n"
        "from fleet_core.durable import atomic_output\n"
        "with atomic_output(sys.argv[1]) as out:\n"
        "    out.write(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(target)], check=False)
    assert run.returncode == -signal.SIGKILL
    (temporary,) = target.parent.glob(f".{target.name}.*.tmp")
    os.utime(temporary, (OLD, OLD))
    return temporary


def test_what_a_killed_atomic_write_leaves_is_swept(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"committed")
    temporary = killed_during_atomic_write(target)
    match = TEMPORARY.fullmatch(temporary.name)
    assert match is not None and match["name"] == "state.json"
    assert sweep_temporaries(tmp_path, ["state.json"]) == ([temporary], [])
    assert not temporary.exists()
    assert target.read_bytes() == b"committed"


def test_only_temporaries_of_the_named_files_are_removed(tmp_path: Path) -> None:
    mine = leftover(tmp_path, ".grubenv.ab_c1234.tmp")
    others = [
        leftover(tmp_path, ".grub.cfg.ab_c1234.tmp"),  # another file's
        leftover(tmp_path, "grubenv"),
        leftover(tmp_path, ".grubenv.tmp"),  # not mkstemp's name
        leftover(tmp_path, ".grubenv.abc123.tmp"),  # six characters, not eight
        leftover(tmp_path, ".grubenv.ABCD1234.tmp"),  # mkstemp's are lowercase
        leftover(tmp_path, ".grubenv.abcd1234.tmp.swp"),
        leftover(tmp_path, "grubenv.abcd1234.tmp"),  # not hidden
    ]
    assert sweep_temporaries(tmp_path, ["grubenv"]) == ([mine], [])
    assert all(path.exists() for path in others)


def test_in_our_own_directory_any_files_temporaries_go(tmp_path: Path) -> None:
    removed = [
        leftover(tmp_path, ".state.json.k3j4h5g6.tmp"),
        leftover(tmp_path, ".x.00000000.tmp"),
    ]
    kept = leftover(tmp_path, "notes.tmp")
    assert sweep_temporaries(tmp_path)[0] == sorted(removed)
    assert kept.exists()


def test_a_write_in_flight_is_never_touched(tmp_path: Path) -> None:
    now = time.time()
    young = leftover(tmp_path, ".state.json.aaaaaaaa.tmp", mtime=now - SWEEP_MIN_AGE_S + 5)
    future = leftover(tmp_path, ".state.json.bbbbbbbb.tmp", mtime=now + 86400 * 365)
    old = leftover(tmp_path, ".state.json.cccccccc.tmp", mtime=now - SWEEP_MIN_AGE_S - 1)
    assert sweep_temporaries(tmp_path, ["state.json"], now=now) == ([old], [])
    assert young.exists() and future.exists()


def test_what_is_not_a_plain_file_stays(tmp_path: Path) -> None:
    directory = tmp_path / ".state.json.dddddddd.tmp"
    directory.mkdir()
    os.utime(directory, (OLD, OLD))
    outside = leftover(tmp_path, "precious")
    link = tmp_path / ".state.json.eeeeeeee.tmp"
    link.symlink_to(outside)
    os.utime(link, (OLD, OLD), follow_symlinks=False)
    assert sweep_temporaries(tmp_path) == ([], [])
    assert directory.is_dir() and link.is_symlink() and outside.exists()


def test_a_missing_directory_has_nothing_to_sweep(tmp_path: Path) -> None:
    assert sweep_temporaries(tmp_path / "missing") == ([], [])
    plain = leftover(tmp_path, "plain")
    removed, problems = sweep_temporaries(plain)
    assert removed == [] and problems == [f"{plain}: cannot list: Not a directory"]


def test_a_file_that_cannot_be_removed_is_a_problem_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = leftover(tmp_path, ".a.aaaaaaaa.tmp")
    second = leftover(tmp_path, ".b.bbbbbbbb.tmp")
    unlink = Path.unlink

    def read_only(path: Path, missing_ok: bool = False) -> None:
        if path.name == first.name:
            raise PermissionError(30, "Read-only file system")
        unlink(path, missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only)
    removed, problems = sweep_temporaries(tmp_path)
    assert removed == [second]
    assert problems == [f"{first}: cannot remove: Read-only file system"]


def test_an_exclusive_atomic_write_never_replaces_what_is_there(tmp_path: Path) -> None:
    from fleet_core.durable import atomic_write

    target = tmp_path / "chunk"
    atomic_write(target, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk"]
    atomic_write(target, b"third")  # without it, a replacement as ever
    assert target.read_bytes() == b"third"
