#!/usr/bin/env python3
"""What the web console's live feed (server/ui/feed.py) costs the server: database queries per
second and CPU of the server process with no stream open and with ``--streams`` open, while the
fleet is quiet and while it changes every second (each change wakes every stream once).

The server is the real application behind uvicorn in a child process, its SQL statements
counted on its engine, its limit of streams per process (200) lifted so that more can be
measured; the streams are plain sockets held by this process, which reads what they are sent,
opened as browsers would open them: a few per session (the server's limit of streams per
session), a few sessions per operator token (its limit of sessions). A stream the server ends
during a measurement fails the run. CPU is the child's user+system time from /proc.

Each row is printed with its ratio to the row of no stream on the same fleet (quiet or
changing) measured in the same run, then the rows as one JSON line.

    python benchmarks/console_feed_cost.py [--streams 500] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = r"""
import os, sys, threading, time
import uvicorn
from sqlalchemy import event
from server.app import create_app
from server.settings import Settings
from server.ui.feed import StreamClosingServer, feed_of

app = create_app(Settings.create(sys.argv[1]), rollout_interval_s=None)
feed = feed_of(app)
feed.max_streams = 100_000
queries = [0]
def count(*_args):
    queries[0] += 1
event.listen(feed.db.engine, "before_cursor_execute", count)
out = open(sys.argv[2], "w")
def report():
    while True:
        out.write(f"{queries[0]}\n"); out.flush(); time.sleep(0.25)
threading.Thread(target=report, daemon=True).start()
sock = __import__("socket").socket(fileno=int(sys.argv[3]))
StreamClosingServer(uvicorn.Config(app, log_level="warning"), feed).run(sockets=[sock])
"""


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def queries(path: Path) -> int:
    lines = path.read_text().split()
    return int(lines[-1]) if lines else 0


def open_stream(port: int, secret: str) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(
        f"GET /ui/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Cookie: fleet_ui={secret}\r\n\r\n".encode()
    )
    conn.setblocking(False)
    return conn


def stream_secrets(data_dir: Path, streams: int) -> list[str]:
    """Session secrets to open ``streams`` streams with, as many per session as the server
    keeps open and as many sessions per viewer token as it allows: one secret per stream."""
    from server.auth import Role, create_operator_token
    from server.database import Database
    from server.settings import Settings, utc
    from server.ui import sessions
    from server.ui.feed import MAX_STREAMS_PER_SESSION

    db = Database(Settings.create(data_dir).database_url)
    secrets: list[str] = []
    for number in range(math.ceil(streams / MAX_STREAMS_PER_SESSION)):
        if number % sessions.MAX_SESSIONS_PER_TOKEN == 0:
            token = create_operator_token(
                db, name=f"bench-{number}", role=Role.VIEWER, created_by="bench",
                now=utc(time.time),
            )  # fmt: skip
        secret, _ = sessions.create(db, token, utc(time.time))
        secrets += [secret] * MAX_STREAMS_PER_SESSION
    db.dispose()
    return secrets[:streams]


def ratio(value: float, base: float) -> str:
    """``value`` as a multiple of ``base`` ("-" when there is no base to divide by)."""
    return f"{value / base:.1f}x" if base > 0 else "-"


def first_answer(conn: socket.socket) -> bytes:
    """What the server sent first on a stream (its status line), waiting up to 30 s."""
    conn.settimeout(30)
    try:
        return conn.recv(65536)
    finally:
        conn.setblocking(False)


def measure(pid: int, counter: Path, seconds: float, change: bool, data_dir: Path,
            conns: list[socket.socket]) -> tuple[float, float, int]:  # fmt: skip
    """Queries per second, CPU percent of one core, and bytes the streams received.

    Raises:
        SystemExit: the server ended a stream (the figures would be of fewer streams).
    """
    from server import rollouts
    from server.database import Database
    from server.settings import Settings, utc

    db = Database(Settings.create(data_dir).database_url)
    selector = selectors.DefaultSelector()
    for conn in conns:
        selector.register(conn, selectors.EVENT_READ)
    received = ended = 0
    q0, c0, t0 = queries(counter), cpu_s(pid), time.monotonic()
    next_change = t0 + 1
    stopped = False
    while time.monotonic() - t0 < seconds:
        if change and time.monotonic() >= next_change:
            if stopped:
                rollouts.clear_emergency_stop(db, actor="bench", now=utc(time.time))
            else:
                rollouts.emergency_stop(db, "bench", actor="bench", now=utc(time.time))
            stopped, next_change = not stopped, next_change + 1
        for key, _ in selector.select(0.05):
            got = key.fileobj.recv(65536)  # type: ignore[union-attr]
            received += len(got)
            if not got:
                selector.unregister(key.fileobj)
                ended += 1
    elapsed = time.monotonic() - t0
    selector.close()
    db.dispose()
    if ended:
        raise SystemExit(f"the server ended {ended} of {len(conns)} streams while measuring")
    return (queries(counter) - q0) / elapsed, 100 * (cpu_s(pid) - c0) / elapsed, received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    if args.streams < 1 or args.seconds <= 0:
        parser.error("--streams must be at least 1 and --seconds more than 0")
    work = Path(tempfile.mkdtemp(prefix="feed-cost-"))
    try:
        run(work, args.streams, args.seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, streams: int, seconds: float) -> None:
    """Serve a new data directory in ``work`` and print the figures of no stream and of
    ``streams`` streams, on a quiet and on a changing fleet."""
    from server.database import Database
    from server.settings import Settings

    data_dir = work / "data"
    db = Database(Settings.create(data_dir).database_url)
    db.migrate()
    db.dispose()
    secrets = stream_secrets(data_dir, streams)

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    counter = work / "queries"
    child = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(data_dir), str(counter), str(listener.fileno())],
        pass_fds=[listener.fileno()],
    )
    listener.close()
    rows: list[dict[str, float | int | str]] = []
    conns: list[socket.socket] = []
    try:
        while not counter.exists() or not queries(counter):
            if child.poll() is not None:
                raise SystemExit(f"the server exited ({child.returncode})")
            time.sleep(0.1)
        time.sleep(2)
        print(f"{'streams':>8} {'fleet':>8} {'queries/s':>16} {'CPU %':>14} {'KiB/s out':>10}")
        base: dict[str, tuple[float, float]] = {}
        for count in (0, streams):
            conns += [open_stream(port, secret) for secret in secrets[len(conns) : count]]
            time.sleep(2)  # let the streams settle (hello)
            answered = [first_answer(conn) for conn in conns]
            refused = sum(not first.startswith(b"HTTP/1.1 200") for first in answered)
            if refused:
                raise SystemExit(f"{refused} of {count} streams were refused")
            for change in (False, True):
                rate, cpu, received = measure(child.pid, counter, seconds, change, data_dir, conns)
                kib = received / 1024 / seconds
                fleet = "changing" if change else "quiet"
                base.setdefault(fleet, (rate, cpu))
                rate_cell = f"{rate:.1f} ({ratio(rate, base[fleet][0])})"
                cpu_cell = f"{cpu:.1f} ({ratio(cpu, base[fleet][1])})"
                print(f"{count:>8} {fleet:>8} {rate_cell:>16} {cpu_cell:>14} {kib:>10.1f}")
                rows.append({
                    "streams": count, "fleet": fleet, "queries_per_s": round(rate, 2),
                    "cpu_percent": round(cpu, 2), "kib_per_s_out": round(kib, 2),
                })  # fmt: skip
    finally:
        for conn in conns:
            conn.close()
        child.terminate()
        child.wait(10)
    print(json.dumps({"benchmark": "console_feed_cost", "rows": rows}))


if __name__ == "__main__":
    main()
