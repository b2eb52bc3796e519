"""``fleet server run`` against clients that hold on: headers or a body sent too slowly, more
uploads than allowed at once; its data at rest (modes, what a kill leaves behind).

Every timeout here is configured short; every wait is on a condition with a deadline. The slow
clients pace themselves by waiting for an answer (``recv`` with a timeout), so a client learns
it was cut off the moment it is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from fleet_core.cli import fleet
from tests.server.test_process import ServerProcess

MakeBundle = Callable[..., Path]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)  # poll interval of the wait above, bounded by its deadline


def cli(*args: str | Path) -> str:
    result = CliRunner().invoke(fleet, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


class Servers:
    """Starts ``fleet server run`` processes on ``data_dir`` with extra options; stops them all."""

    def __init__(self, tmp_path: Path) -> None:
        self.data_dir = tmp_path / "data"
        self.log = tmp_path / "server.log"
        self.started: list[ServerProcess] = []

    def start(self, *options: str) -> ServerProcess:
        process = ServerProcess(
            ["server", "run", "--data-dir", str(self.data_dir), *options], self.log
        )
        self.started.append(process)
        process.start()
        return process

    def stop(self) -> None:
        for process in self.started:
            process.stop()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    try:
        yield started
    finally:
        started.stop()


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=5)


def answer_of(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection (failing past the deadline)."""
    deadline = time.monotonic() + timeout_s
    received = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"connection still open after {timeout_s}s; received {received!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def drip(sock: socket.socket, data: bytes, every_s: float, timeout_s: float) -> tuple[bytes, float]:
    """Send ``data`` a byte at a time, one every ``every_s`` (waiting that long for the server
    to answer or close), until the server closes the connection; returns what it sent and when
    (seconds after the first byte). Fails if the connection outlives ``timeout_s``."""
    started = time.monotonic()
    received = b""
    for byte in data:
        sock.settimeout(every_s)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            chunk = None
        except ConnectionResetError:
            chunk = b""
        if chunk is not None:
            received += chunk
            if not chunk:
                return received, time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"a client sending a byte every {every_s}s was served {timeout_s}s")
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
    return received + answer_of(sock, timeout_s), time.monotonic() - started


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def test_headers_sent_too_slowly_are_cut_off_while_others_are_served(servers: Servers) -> None:
    server = servers.start("--header-timeout", "1.5")
    with connect(server) as idle, connect(server) as slow:
        opened = time.monotonic()
        healthy = []

        def served_meanwhile() -> bool:
            healthy.append(requests.get(server.url + "/healthz", timeout=2).status_code)
            return True

        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: fleet\r\n")
        served_meanwhile()
        # a byte every 0.1 s: the keep-alive timeout, cancelled by each byte, would never fire
        answer, _ = drip(slow, b"X-Slow: " + b"a" * 400 + b"\r\n\r\n", 0.1, 8)
        cut_after = time.monotonic() - opened
        served_meanwhile()
        idle_answer = answer_of(idle, 8)  # connected, never sent a byte
    assert status_of(answer) == 408, answer
    assert b"request_timeout" in answer
    assert 1.3 < cut_after < 4.5
    assert status_of(idle_answer) == 408
    assert healthy == [200, 200]
    # a client that sends its requests in time is served as before: on a kept-alive
    # connection each request has its own deadline, counted from the previous answer
    with connect(server) as prompt:
        began = time.monotonic()
        for _ in range(3):
            prompt.sendall(b"GET /healthz HTTP/1.1\r\nHost: fleet\r\n\r\n")
            assert status_of(response_of(prompt)) == 200
            with pytest.raises(TimeoutError):  # the client's pace: silent for 0.8 s
                prompt.settimeout(0.8)
                prompt.recv(1)
        assert time.monotonic() - began > 2.4


def enroll_request(length: int) -> bytes:
    return (
        b"POST /api/v1/devices/enroll HTTP/1.1\r\nHost: fleet\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length
    )


def test_bodies_sent_too_slowly_are_cut_off_while_others_are_served(servers: Servers) -> None:
    server = servers.start("--body-read-timeout", "1", "--min-body-rate", "200")
    # 1 of 100 declared bytes, then nothing: the read timeout
    with connect(server) as stalled:
        stalled.sendall(enroll_request(100) + b"{")
        started = time.monotonic()
        assert requests.get(server.url + "/healthz", timeout=2).status_code == 200
        answer = answer_of(stalled, 6)
        stalled_for = time.monotonic() - started
    assert status_of(answer) == 408, answer
    assert b"the request body came in too slowly" in answer
    assert 0.8 < stalled_for < 4
    # a byte every 0.3 s: every read in time, but far below 200 bytes/s once the first second
    # of grace has passed
    with connect(server) as dripping:
        dripping.sendall(enroll_request(2000))
        answer, dripped_for = drip(dripping, b" " * 2000, 0.3, 6)
    assert status_of(answer) == 408, answer
    assert 0.8 < dripped_for < 4


def test_a_slow_but_live_upload_is_accepted(
    servers: Servers, keyring_dir: Path, make_bundle: MakeBundle
) -> None:
    shutil.copytree(keyring_dir, servers.data_dir / "keyring")
    token = cli("server", "token", "create", "--role", "operator", "--name", "ci",
                "--data-dir", servers.data_dir)  # fmt: skip
    server = servers.start("--body-read-timeout", "1", "--min-body-rate", "50000")
    data = make_bundle(version="1.0.0", size=200_000).read_bytes()

    def paced() -> Iterator[bytes]:
        for start in range(0, len(data), 40_000):
            yield data[start : start + 40_000]
            time.sleep(0.4)  # the client's pace (the behaviour under test), not a wait

    started = time.monotonic()
    response = requests.post(
        server.url + "/api/v1/releases",
        data=paced(),
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    assert time.monotonic() - started > 2  # longer than a read timeout, within the rate


def upload_start(token: str, length: int) -> bytes:
    return (
        b"POST /api/v1/releases HTTP/1.1\r\nHost: fleet\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n" % (token.encode(), length)
    )


def partial_uploads(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "uploads").glob("upload-*.bundle"))


def test_uploads_beyond_the_limit_get_503_while_other_routes_are_served(
    servers: Servers, keyring_dir: Path, make_bundle: MakeBundle
) -> None:
    shutil.copytree(keyring_dir, servers.data_dir / "keyring")
    token = cli("server", "token", "create", "--role", "operator", "--name", "ci",
                "--data-dir", servers.data_dir)  # fmt: skip
    auth = {"Authorization": f"Bearer {token}"}
    server = servers.start("--max-concurrent-uploads", "2")
    bundles = [make_bundle(f"{n}.bundle", version=f"{n}.0.0", size=50_000) for n in (1, 2, 3, 4)]
    held = [connect(server), connect(server)]
    try:
        for sock, bundle in zip(held, bundles, strict=False):
            data = bundle.read_bytes()
            sock.sendall(upload_start(token, len(data)) + data[:1000])
        wait_for(lambda: len(partial_uploads(servers.data_dir)) == 2, 10, "two uploads")

        third = requests.post(
            server.url + "/api/v1/releases", data=bundles[2].read_bytes(), headers=auth, timeout=10
        )
        assert third.status_code == 503, third.text
        assert third.json()["error"] == "too_many_uploads"
        assert int(third.headers["Retry-After"]) > 0
        assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
        listed = requests.get(server.url + "/api/v1/releases", headers=auth, timeout=5)
        assert listed.status_code == 200 and listed.json() == {"releases": []}

        # one upload ends: its place is free for the next
        first = bundles[0].read_bytes()
        held[0].sendall(first[1000:])
        assert status_of(response_of(held[0])) == 201
    finally:
        for sock in held:
            sock.close()
    fourth = requests.post(
        server.url + "/api/v1/releases", data=bundles[3].read_bytes(), headers=auth, timeout=10
    )
    assert fourth.status_code == 201, fourth.text


def response_of(sock: socket.socket) -> bytes:
    """One whole response (with a Content-Length) read from a kept-alive connection."""
    sock.settimeout(10)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {received!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_new_data_directory_is_private(servers: Servers) -> None:
    server = servers.start()
    assert server.process is not None
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    assert "Umask:\t0077" in status  # whatever it creates later is private too
    data = servers.data_dir
    assert mode(data) == 0o700
    for directory in ("blobs", "uploads", "keyring"):
        assert mode(data / directory) == 0o700, directory
    for name in ("data.db", "data.db-wal", "data.db-shm", "server-key.pem"):
        assert mode(data / name) == 0o600, name


def test_an_existing_data_directory_is_tightened_and_what_it_stores_is_private(
    servers: Servers, keyring_dir: Path, make_bundle: MakeBundle
) -> None:
    data = servers.data_dir
    shutil.copytree(keyring_dir, data / "keyring")
    token = cli("server", "token", "create", "--role", "operator", "--name", "ci",
                "--data-dir", data)  # fmt: skip
    data.chmod(0o755)  # as an older server, or an administrator, left them
    (data / "data.db").chmod(0o644)
    server = servers.start()
    assert mode(data) == 0o700
    assert "tightened" in servers.log.read_text()
    for name in ("data.db", "data.db-wal", "data.db-shm"):
        assert mode(data / name) == 0o600, name

    bundle = make_bundle(version="1.0.0", size=20_000)
    uploaded = requests.post(
        server.url + "/api/v1/releases",
        data=bundle.read_bytes(),
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert uploaded.status_code == 201, uploaded.text
    # a chunked image: its index is a blob, the image its chunks and a recipe (server/chunkstore.py)
    (image,) = uploaded.json()["images"]
    index = image["chunk_index"]["sha256"]
    stored = [data / "blobs" / index[:2] / index, data / "chunks" / "images" / image["sha256"]]
    stored += list((data / "chunks").glob("??/*"))
    assert len(stored) > 2
    for path in stored:
        assert mode(path) == 0o600, path
        assert mode(path.parent) == 0o700, path
    assert mode(data / "chunks") == 0o700


# A copy into the blob store that never ends: the source gives one chunk, says so on stdout,
# and then waits for ever, so the parent can kill the process in the middle of the copy.
_INTERRUPTED_COPY = """
import sys
from pathlib import Path
from server.blobs import BlobStore

class Source:
    sent = False
    def seek(self, offset):
        pass
    def read(self, size):
        if not self.sent:
            self.sent = True
            return b"x" * size
        print("copying", flush=True)
        sys.stdin.read()
        return b""

BlobStore(Path(sys.argv[1])).put_range(Source(), 0, 10 * 1024 * 1024, "ab" * 32)
"""


def kill_during_blob_copy(blob_dir: Path) -> list[Path]:
    """A process killed in the middle of a blob copy; returns the temporary files it left."""
    child = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED_COPY, str(blob_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"copying\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return list(blob_dir.glob("ab/.*.tmp"))


def test_leftovers_of_a_killed_server_are_removed_at_start_and_releases_are_intact(
    servers: Servers, keyring_dir: Path, make_bundle: MakeBundle
) -> None:
    data = servers.data_dir
    shutil.copytree(keyring_dir, data / "keyring")
    token = cli("server", "token", "create", "--role", "operator", "--name", "ci",
                "--data-dir", data)  # fmt: skip
    auth = {"Authorization": f"Bearer {token}"}
    server = servers.start("--startup-leftover-age", "0")
    kept = requests.post(
        server.url + "/api/v1/releases",
        data=make_bundle(version="1.0.0", size=300_000).read_bytes(),
        headers=auth,
        timeout=10,
    )
    assert kept.status_code == 201, kept.text

    # killed while receiving an upload...
    second = make_bundle("second.bundle", version="2.0.0", size=3_000_000).read_bytes()
    with connect(server) as uploading:
        uploading.sendall(upload_start(token, len(second)) + second[:2_500_000])

        def received_a_batch() -> bool:
            leftovers = partial_uploads(data)
            return bool(leftovers) and leftovers[0].stat().st_size > 0

        wait_for(received_a_batch, 10, "the upload to reach the disk")
        assert server.process is not None
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    # ...and a process killed in the middle of a blob copy
    interrupted_copies = kill_during_blob_copy(data / "blobs")
    assert interrupted_copies and partial_uploads(data)

    server.start()
    assert not partial_uploads(data)
    assert not any(path.exists() for path in interrupted_copies)
    assert "removed leftover of an interrupted write" in servers.log.read_text()
    listed = requests.get(server.url + "/api/v1/releases", headers=auth, timeout=5).json()
    assert [release["version"] for release in listed["releases"]] == ["1.0.0"]
    for image in kept.json()["images"]:
        blob = requests.get(server.url + image["url"], timeout=10)
        assert hashlib.sha256(blob.content).hexdigest() == image["sha256"]


def test_at_start_a_leftover_younger_than_the_start_age_is_kept(servers: Servers) -> None:
    (servers.data_dir / "uploads").mkdir(parents=True)
    fresh = servers.data_dir / "uploads" / "upload-another.bundle"
    fresh.write_bytes(b"being written by another process sharing the data directory")
    servers.start()  # the default start-up age: a minute
    assert fresh.exists()


def test_the_periodic_sweep_removes_an_old_partial_upload_but_not_one_being_received(
    servers: Servers, keyring_dir: Path, make_bundle: MakeBundle
) -> None:
    data = servers.data_dir
    shutil.copytree(keyring_dir, data / "keyring")
    token = cli("server", "token", "create", "--role", "operator", "--name", "ci",
                "--data-dir", data)  # fmt: skip
    age_s = 2.0
    server = servers.start("--leftover-age", str(age_s))
    bundle = make_bundle(version="1.0.0", size=10 * 1024 * 1024).read_bytes()
    batch = 1024 * 1024
    old = data / "uploads" / "upload-crashed.bundle"
    with connect(server) as uploading:
        uploading.sendall(upload_start(token, len(bundle)) + bundle[:batch])
        wait_for(lambda: len(partial_uploads(data)) == 1, 10, "the upload to begin")
        (live,) = partial_uploads(data)
        old.write_bytes(b"what a crash left an hour ago")
        an_hour_ago = time.time() - 3600
        os.utime(old, (an_hour_ago, an_hour_ago))
        began = time.monotonic()
        sent = batch
        # the upload goes on, a megabyte at a time, for longer than the leftover age
        while len(bundle) - sent > batch:
            uploading.sendall(bundle[sent : sent + batch])
            sent += batch
            deadline = time.monotonic() + 0.4
            while time.monotonic() < deadline and live.exists():
                time.sleep(0.02)  # the client's pace: a megabyte per 0.4 s
            assert live.exists(), "the sweep removed an upload still being received"
        uploading.sendall(bundle[sent:])
        assert time.monotonic() - began > age_s + 0.5
        assert not old.exists()
        assert status_of(response_of(uploading)) == 201
