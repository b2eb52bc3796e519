"""Release server processes for lab tests: ``fleet server run`` on loopback, two of them on one
database and data directory, with an admin token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from click.testing import CliRunner

from fleet_core.cli import fleet
from signing.keyring import trust_key
from tests.server.conftest import free_port
from tests.server.test_process import ServerProcess

if TYPE_CHECKING:
    from tests.chaos.conftest import Releases


def run(*args: str) -> str:
    result = CliRunner().invoke(fleet, list(args))
    assert result.exit_code == 0, result.output
    return result.output


class Fleet:
    """Two server processes sharing one database and blob store, and the operator's token."""

    def __init__(
        self,
        root: Path,
        database: str | None,
        releases: Releases,
        server_args: tuple[str, ...] = (),
    ) -> None:
        self.data = root / "server"
        self.db_args = ["--data-dir", str(self.data)]
        if database:
            self.db_args += ["--database-url", database]
        trust_key(self.data / "keyring", releases.directory / "release-key.pub")
        self.ports = (free_port(), free_port())
        self.urls = tuple(f"http://127.0.0.1:{port}" for port in self.ports)
        self.processes = [
            ServerProcess(
                ["server", "run", *self.db_args, "--port", str(port), *server_args],
                root / f"s{i}.log",
            )
            for i, port in enumerate(self.ports)
        ]
        self.start(0)
        self.token = run("server", "token", "create", "--role", "admin", "--name", "e2e",
                         *self.db_args).splitlines()[0]  # fmt: skip
        self.start(1)

    def start(self, index: int) -> None:
        self.processes[index].start(self.urls[index])

    def stop(self, index: int) -> None:
        self.processes[index].stop()

    def fleet(self, *args: str, server: int = 0) -> str:
        return run(*args, "--server", self.urls[server], "--token", self.token)

    def api(self, path: str, server: int = 0) -> Any:
        answer = requests.get(
            self.urls[server] + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=10
        )
        answer.raise_for_status()
        return answer.json()


@pytest.fixture
def fleet_servers(
    tmp_path: Path,
    database_url: str | None,
    releases: Releases,
) -> Iterator[Fleet]:
    fleet_ = Fleet(tmp_path, database_url, releases)
    try:
        yield fleet_
    finally:
        for process in fleet_.processes:
            process.stop()


def device_row(fleet_: Fleet, device_id: str, server: int = 0) -> dict[str, Any]:
    rows = json.loads(fleet_.fleet("device", "list", "--json", server=server))
    rows = rows.get("devices", rows) if isinstance(rows, dict) else rows
    return next(r for r in rows if r["id"] == device_id)
