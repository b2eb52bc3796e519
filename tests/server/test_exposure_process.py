"""``fleet server run --api-docs --metrics-token-file FILE``: the options reach a real process."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from fleet_core.cli import fleet
from server.headers import API_POLICY, DOCS_POLICY
from tests.server.conftest import SCRAPE_TOKEN
from tests.server.test_process import ServerProcess


@pytest.fixture
def data_args(tmp_path: Path, keyring_dir: Path) -> list[str]:
    data_dir = tmp_path / "data"
    shutil.copytree(keyring_dir, data_dir / "keyring")
    return ["--data-dir", str(data_dir)]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "scrape-token"
    path.write_text(SCRAPE_TOKEN + "\n")
    return path


def serve(tmp_path: Path, args: list[str]) -> Iterator[str]:
    process = ServerProcess(["server", "run", *args], tmp_path / "server.log")
    try:
        process.start()
        yield process.url
    finally:
        process.stop()


def test_the_run_options_reach_the_server(
    tmp_path: Path, data_args: list[str], token_file: Path
) -> None:
    for url in serve(tmp_path, [*data_args, "--api-docs", "--metrics-token-file", str(token_file)]):
        docs = requests.get(url + "/docs", timeout=10)
        assert docs.status_code == 200
        assert docs.headers["content-security-policy"] == DOCS_POLICY
        assert requests.get(url + "/openapi.json", timeout=10).status_code == 200
        bearer = {"Authorization": f"Bearer {SCRAPE_TOKEN}"}
        assert requests.get(url + "/metrics", headers=bearer, timeout=10).status_code == 200
        wrong = {"Authorization": f"Bearer {SCRAPE_TOKEN}0"}
        assert requests.get(url + "/metrics", headers=wrong, timeout=10).status_code == 401


def test_by_default_no_docs_and_no_scrape_token(tmp_path: Path, data_args: list[str]) -> None:
    for url in serve(tmp_path, data_args):
        for path in ("/docs", "/redoc", "/openapi.json"):
            answer = requests.get(url + path, timeout=10)
            assert answer.status_code == 404, path
            assert answer.headers["content-security-policy"] == API_POLICY
            assert answer.headers["x-content-type-options"] == "nosniff"
        bearer = {"Authorization": f"Bearer {SCRAPE_TOKEN}"}
        assert requests.get(url + "/metrics", headers=bearer, timeout=10).status_code == 401
        assert requests.get(url + "/metrics", timeout=10).status_code == 200


def test_an_unusable_token_file_stops_the_start(tmp_path: Path, data_args: list[str]) -> None:
    short = tmp_path / "short"
    short.write_text("abc\n")
    for path in (short, tmp_path / "missing"):
        result = CliRunner().invoke(
            fleet, ["server", "run", *data_args, "--metrics-token-file", str(path)]
        )
        assert result.exit_code == 1, result.output
        assert f"metrics token file {path}" in result.output
        assert len(result.output.strip().splitlines()) == 1
