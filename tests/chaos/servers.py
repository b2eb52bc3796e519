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
        self.processes = [
            ServerProcess(["server", "run", *self.db_args, *server_args], root / f"s{i}.log")
            for i in range(2)
        ]
        self.ports = tuple(process.port for process in self.processes)
        self.urls = tuple(process.url for process in self.processes)
        try:
            self.start(0)
            self.token = run("server", "token", "create", "--role", "admin", "--name", "e2e",
                             *self.db_args).splitlines()[0]  # fmt: skip
            self.start(1)
        except BaseException:
            for process in self.processes:  # no fixture will stop what was never returned
                process.stop()
            raise

    def start(self, index: int) -> None:
        self.processes[index].start()

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
