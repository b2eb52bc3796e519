"""The test session's own guard (tests/conftest.py): a run that asked for PostgreSQL, as
`make test` does with FLEET_TEST_REQUIRE_POSTGRES=1, fails before any test when the database
URL is missing or the database does not answer, instead of running the "SQLite and PostgreSQL"
tests on SQLite alone. Each case runs pytest in a child process, collecting one small file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def collect(**env: str) -> subprocess.CompletedProcess[str]:
    """``pytest --collect-only`` of one unit test file, with ``env`` and no FLEET_TEST_* of
    this session's own environment."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_TEST_")}
    child_env.update(env)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
               "tests/unit/test_keys.py"]  # fmt: skip
    return subprocess.run(
        command, cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=120, check=False
    )


def test_a_run_that_requires_postgresql_fails_without_its_url() -> None:
    result = collect(FLEET_TEST_REQUIRE_POSTGRES="1")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "FLEET_TEST_DATABASE_URL is empty" in result.stderr


def test_a_run_that_requires_postgresql_fails_when_it_does_not_answer() -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        result = collect(
            FLEET_TEST_REQUIRE_POSTGRES="1",
            FLEET_TEST_DATABASE_URL=f"postgresql+psycopg2://fleet:fleet@127.0.0.1:{port}/fleet",
        )
    assert result.returncode == 4, result.stdout + result.stderr
    assert "cannot be reached" in result.stderr


def test_by_hand_a_run_without_the_url_is_a_sqlite_only_run() -> None:
    result = collect()
    assert result.returncode == 0, result.stdout + result.stderr
