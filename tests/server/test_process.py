"""The real thing: ``fleet server run`` as a process, a device with a key on disk, a restart."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fleet_core.cli import fleet
from signing.keyring import Keyring
from signing.keys import generate_key, key_id, load_private_key, load_public_key
from signing.signature import SignatureEnvelope
from tests.server.conftest import FakeDevice, listening_socket

MakeBundle = Callable[..., Path]


class HttpClient:
    """The little of TestClient's interface FakeDevice uses, over real HTTP."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = requests.Session()

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.post(self.base + path, timeout=10, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.get(self.base + path, timeout=10, **kwargs)


class ServerProcess:
    """``fleet server run`` in a child process, logging to a file, serving on a socket the
    test binds and hands down (``--fd``, see listening_socket): :attr:`url` is known before
    the process starts and no other process can answer on it.

    The child keeps the only copy of the socket, so a stopped server refuses connections as
    a dead one does; :meth:`start` after :meth:`stop` binds the same port again, and fails
    loudly if another process took it in between."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.listener: socket.socket | None = listening_socket()
        self.port: int = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        listener = self.listener or listening_socket(self.port)
        self.listener = None
        fd = listener.fileno()
        command = [sys.executable, "-c", "from fleet_core.cli import main; main()", *self.args,
                   "--fd", str(fd)]  # fmt: skip
        try:
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, pass_fds=[fd]
                )
        finally:
            listener.close()  # the child's copy is the socket now
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                pytest.fail(
                    f"server exited with {self.process.returncode}:\n{self.log.read_text()}"
                )
            try:
                # the socket listens from the start: a request waits in its queue until the
                # server accepts it (or the timeout ends this try)
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not come up:\n{self.log.read_text()}")
            time.sleep(0.05)  # poll interval of the wait above, bounded by its deadline

    def stop(self) -> None:
        if self.listener is not None:  # never started
            self.listener.close()
            self.listener = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def server_process(
    tmp_path: Path, keyring_dir: Path, database_url: str | None
) -> Iterator[tuple[ServerProcess, str, list[str]]]:
    data_dir = tmp_path / "data"
    shutil.copytree(keyring_dir, data_dir / "keyring")
    db_args = ["--data-dir", str(data_dir)]
    if database_url is not None:
        db_args += ["--database-url", database_url]
    process = ServerProcess(["server", "run", *db_args], tmp_path / "server.log")
    try:
        yield process, process.url, db_args
    finally:
        process.stop()


def cli(*args: str | Path) -> str:
    result = CliRunner().invoke(fleet, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def verify_answer(response: requests.Response, server_keyring: Keyring, nonce: str) -> Any:
    assert response.status_code == 200, response.text
    body = response.json()
    envelope = SignatureEnvelope.from_bytes(body["signatures"].encode())
    server_keyring.verify(body["answer"].encode(), envelope, "assignment")
    answer = json.loads(body["answer"])
    assert answer["nonce"] == nonce
    assert response.headers["ETag"] == f'"{answer["etag"]}"'
    return answer


def test_upload_enroll_assign_checkin_download_restart(
    server_process: tuple[ServerProcess, str, list[str]],
    make_bundle: MakeBundle,
    tmp_path: Path,
) -> None:
    process, url, db_args = server_process
    token = cli("server", "token", "create", "--role", "operator", "--name", "ci", *db_args)
    enrollment_token = cli("server", "enrollment-token", "create", "--uses", "1", *db_args)
    process.start()
    api = ["--server", url, "--token", token]

    bundle = make_bundle(version="2.0.0", size=300_000)
    assert cli("release", "upload", bundle, *api).startswith("release 2.0.0 accepted")

    generate_key(tmp_path / "device" / "device")  # the device's identity, as on its data partition
    device = FakeDevice(
        HttpClient(url), key=load_private_key(tmp_path / "device" / "device.pem").private_key
    )
    enrolled = device.enroll(enrollment_token)
    assert enrolled.status_code == 200, enrolled.text
    server_public = load_public_key(Path(db_args[1]) / "server-key.pub")
    raw_server_key = server_public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert enrolled.json()["server_keys"] == [raw_server_key.hex()]
    server_keyring = Keyring({key_id(server_public): server_public})
    device.login()
    cli("device", "assign", device.id, "2.0.0", *api)

    nonce = secrets.token_hex(16)
    response = device.checkin(nonce)
    assert "Date" in response.headers  # the device's clock skew comes from it
    answer = verify_answer(response, server_keyring, nonce)
    etag = response.headers["ETag"]
    assert answer["assignment"]["version"] == "2.0.0"
    assert device.checkin(etag=etag).status_code == 304

    blob = answer["assignment"]["blobs"][0]
    whole = requests.get(url + blob["url"], timeout=10)
    assert hashlib.sha256(whole.content).hexdigest() == blob["sha256"]
    part = requests.get(
        url + blob["url"],
        headers={"Range": "bytes=1000-1999", "If-Range": f'"{blob["sha256"]}"'},
        timeout=10,
    )
    assert part.status_code == 206
    assert part.content == whole.content[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{blob['size']}"

    process.stop()
    process.start()

    listed = json.loads(cli("device", "list", "--json", *api))
    assert [(d["id"], d["assigned_version"]) for d in listed] == [(device.id, "2.0.0")]
    assert device.checkin(etag=etag).status_code == 304  # the session survived, so did the ETag
    again = secrets.token_hex(32)
    assert verify_answer(device.checkin(again), server_keyring, again) == {**answer, "nonce": again}
    assert requests.get(url + blob["url"], timeout=10).content == whole.content
    assert cli("audit", "verify", *db_args).startswith("audit trail intact")


def test_fd_must_be_a_bound_tcp_socket_and_excludes_host_and_port() -> None:
    def refused(*args: str) -> str:
        result = CliRunner().invoke(fleet, ["server", "run", *args])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        return result.output.strip().splitlines()[-1]

    with socket.socket(type=socket.SOCK_DGRAM) as udp, socket.socket() as unbound:
        udp.bind(("127.0.0.1", 0))
        assert "not a TCP socket" in refused("--fd", str(udp.fileno()))
        assert "a TCP socket bound to no port" in refused("--fd", str(unbound.fileno()))
    with tempfile.TemporaryFile() as plain_file:
        assert "not an open socket (Socket operation on non-socket)" in refused(
            "--fd", str(plain_file.fileno())
        )
    assert "not an open socket (Bad file descriptor)" in refused("--fd", "987")
    with listening_socket() as sock:
        for option in ("--host", "--port"):
            value = "127.0.0.1" if option == "--host" else "8081"
            assert f"leave out {option}" in refused("--fd", str(sock.fileno()), option, value)


def test_the_demo_starts_its_server_on_a_socket_it_bound_first(tmp_path: Path) -> None:
    from chaos.demo import start_server

    # ready as soon as it returns: it waited through the connections the socket queued early
    process, url = start_server(tmp_path / "data", tmp_path / "server.log")
    try:
        assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
        assert "--fd" in process.args  # type: ignore[operator]
    finally:
        process.terminate()
        process.wait(10)


def test_the_demo_never_leaves_a_server_behind_a_failed_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import chaos.demo

    started: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def recorded(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        process = popen(*args, **kwargs)
        started.append(process)
        return process

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the readiness check itself failed")

    monkeypatch.setattr(subprocess, "Popen", recorded)
    monkeypatch.setattr(requests, "get", broken)
    with pytest.raises(RuntimeError, match="readiness check itself failed"):
        chaos.demo.start_server(tmp_path / "data", tmp_path / "server.log")
    (process,) = started
    assert process.poll() is not None  # terminated and reaped, not running on


def test_a_time_origin_outside_the_last_day_is_a_usage_error(tmp_path: Path) -> None:
    for origin in ("0", f"{time.time() - 2 * 86400:.0f}", f"{time.time() + 3600:.0f}"):
        result = CliRunner().invoke(
            fleet, ["server", "run", "--data-dir", str(tmp_path / "data"), "--time-origin", origin]
        )
        assert result.exit_code == 2, result.output
        assert "'--time-origin'" in result.output and "within the last day" in result.output
        assert not (tmp_path / "data").exists()  # refused before anything was made
