"""benchmarks/device_network.py works: a run at the smallest size (one device, a short idle
spell, a 16 MiB image, a real server behind the counting relay) prints figures that add up,
and the relay splits a connection's bytes into its requests. The figures themselves are not
judged here: a missed aim is the benchmark's finding, not a failure."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chaos.net_meter import Connection, NetMeter

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device_network.py"


def test_a_smallest_run_measures_idle_days_and_both_releases(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--devices", "1", "--days", "0.02", "--image-mib", "16",
         "--workdir", str(tmp_path), "--json"],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    phases, releases = result["phases"], result["releases"]
    idle = phases["idle"]
    assert idle["simulated_s"] == pytest.approx(0.02 * 86_400)
    for kind in ("checkin", "heartbeat"):  # about one a minute each
        assert 20 <= idle["by_kind"][kind]["requests"] <= 40, idle["by_kind"]
    assert idle["by_kind"]["blobs"]["requests"] == 0
    assert (
        0
        < idle["by_kind"]["checkin"]["headers"]
        <= (idle["by_kind"]["checkin"]["up"] + idle["by_kind"]["checkin"]["down"])
    )
    # the kinds add up to the relay's total; the device keeps the connection it opened to
    # enroll (the proxy's keep-alive outlasts the minute between its duties): none more
    total = sum(row["up"] + row["down"] for row in idle["by_kind"].values())
    assert total == pytest.approx(idle["http_bytes_per_device"])
    requests = sum(row["requests"] for row in idle["by_kind"].values())
    assert requests > 40 and idle["connections_per_device"] == 0
    # the release that shares nothing comes whole; the patch through a delta plan, a part
    full, patch = phases["full"]["by_kind"]["blobs"], phases["patch"]["by_kind"]["blobs"]
    assert full["down"] >= releases["full_stored"]
    assert releases["patch"]["delta_planned"] == 1
    fetched = releases["patch"]["written_fetched_bytes"]
    assert 0 < fetched < releases["patch_stored"] / 2
    assert fetched <= patch["down"] < full["down"] / 2
    assert releases["format1_stored"] > releases["patch_stored"] / 2
    tls = result["tls"]
    assert tls["handshake_down"] > 1000 and 0 < tls["record"] < 64
    # the verdicts follow the figure
    day = result["per_device_day"]
    assert day["total"] == pytest.approx(day["idle"] + day["patch_amortised"])
    assert [a["met"] for a in result["aims"]] == [
        day["total_with_estimated_overhead"] < 100e6,
        day["total_with_estimated_overhead"] < 5e6,
    ]
    assert done.stdout.count("aim: ") == 2
    assert list(tmp_path.iterdir()) == []  # the work directory is removed


def test_bad_sizes_are_usage_errors() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--days", "0"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--days: give more than 0, at most 30" in done.stderr


def test_the_relay_splits_a_connections_bytes_into_its_requests() -> None:
    connection = Connection(0, "device")
    first = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
    second = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    stream = first + second
    answered = False
    for i in range(0, len(stream), 7):  # in pieces that cut heads and bodies, and span both
        connection.sent(stream[i : i + 7])
        if i + 7 >= len(first) and not answered:  # the first is sent: its answer comes
            connection.received(b"HTTP/1.1 204 No Content\r\n\r\n")
            answered = True
    connection.received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    a, b = connection.exchanges
    assert (a.method, a.target, a.up, a.up_head) == ("POST", "/a", len(first), len(first) - 5)
    assert (a.status, a.down, a.down_head) == (204, 27, 27)
    assert (b.method, b.target, b.up, b.status) == ("GET", "/b", len(second), 200)
    assert connection.up == len(stream) and connection.down == a.down + b.down


def test_a_chunked_request_body_counts_to_its_request() -> None:
    connection = Connection(0, "device")
    head = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    connection.sent(head + b"5\r\nhello\r\n0\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
    (only,) = connection.exchanges
    assert only.up == connection.up


def test_the_relay_relays_counts_and_hangs_up() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            peer, _ = listener.accept()
            with peer:
                while data := peer.recv(1024):
                    peer.sendall(data.upper())

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    with NetMeter(f"http://127.0.0.1:{port}") as meter:
        host, port_text = meter.url.removeprefix("http://").split(":")
        for label in ("one", "two"):
            meter.label = label
            client = socket.create_connection((host, int(port_text)), timeout=5)
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert client.recv(1024) == b"GET / HTTP/1.1\r\n\r\n".upper()
            assert meter.hang_up(label) == 1
            assert client.recv(1024) == b""  # hung up: the client sees the server close
            client.close()
        deadline = time.monotonic() + 5
        while not all(c.closed for c in meter.connections()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert meter.totals(["one"]) == (18, 18)
        assert meter.totals() == (36, 36)
        assert [c.label for c in meter.connections()] == ["one", "two"]
    server.join(5)
    listener.close()


def test_the_relay_takes_only_an_http_upstream() -> None:
    with pytest.raises(ValueError, match="give http://HOST:PORT"):
        NetMeter("https://example.com")
