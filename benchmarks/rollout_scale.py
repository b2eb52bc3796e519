#!/usr/bin/env python3
"""A staged rollout across a virtual fleet on compressed time: wall time, the server's CPU, and
check-ins per second, against plain requests to ``/healthz`` measured in the same run.

The server is a real ``fleet server run`` process (SQLite, clock x20, rollouts evaluated every
second); the devices run the real daemon in this process (see chaos/fleet.py), ``--workers`` of
them at a time so requests overlap as from a real fleet. Device-side work shares this
machine's two cores with the server: the figures are a floor for the server, not its ceiling.

    python benchmarks/rollout_scale.py [--devices 1000] [--workers 8] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from chaos.demo import fleet_command, lab_bundle, start_server
from chaos.fleet import MemberSpec, VirtualFleet
from signing.keyring import trust_key
from signing.keys import generate_key


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def requests_served(url: str, route_part: str = "") -> float:
    """Requests the server counted (``fleet_server_requests_total``) whose route contains
    ``route_part``."""
    total = 0.0
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("fleet_server_requests_total{") and route_part in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def baseline(url: str, pid: int, seconds: float = 3.0) -> tuple[float, float]:
    """Plain GET /healthz from one client: requests per second, and server CPU seconds per
    request (the same HTTP path and a database ping, no work)."""
    session = requests.Session()
    cpu = cpu_seconds(pid)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.get(f"{url}/healthz", timeout=10)
        count += 1
    return count / (time.perf_counter() - start), (cpu_seconds(pid) - cpu) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="rollout-bench-", dir=args.workdir))
    server = None
    try:
        key = generate_key(workdir / "release-key")
        data = workdir / "server"
        trust_key(data / "keyring", workdir / "release-key.pub")
        server, url = start_server(data, workdir / "server.log", rollout_interval_s=1.0)
        admin = fleet_command("server", "token", "create", "--role", "admin", "--name", "bench",
                              "--data-dir", str(data)).splitlines()[0]  # fmt: skip
        operator = ["--server", url, "--token", admin]
        created = fleet_command(
            "server", "enrollment-token", "create", "--uses", str(args.devices),
            "--data-dir", str(data),
        )  # fmt: skip
        token = created.splitlines()[0]
        made = time.perf_counter()
        fleet = VirtualFleet(
            workdir / "fleet", [MemberSpec() for _ in range(args.devices)], server_urls=(url,),
            server_key=data / "server-key.pub", release_key=workdir / "release-key.pub",
            enrollment_token=token, workers=args.workers,
        )  # fmt: skip
        made = time.perf_counter() - made
        healthz_rate, healthz_cpu = baseline(url, server.pid)
        fleet_command("release", "upload", str(lab_bundle(workdir, key, "2.0.0", "healthy")),
                      *operator)  # fmt: skip
        canaries = [arg for m in fleet.members[:2] for arg in ("--canary", m.device_id)]
        fleet.step(1)  # enroll everybody
        start_wall, start_cpu = time.perf_counter(), cpu_seconds(server.pid)
        start_checkins, start_requests = requests_served(url, "checkin"), requests_served(url)
        fleet_command("rollout", "start", "2.0.0", *canaries, "--soak", "60s", *operator)

        api = requests.Session()
        api.headers["Authorization"] = f"Bearer {admin}"

        def rollout() -> dict[str, Any]:
            answer = api.get(f"{url}/api/v1/rollouts", timeout=60)
            answer.raise_for_status()
            latest: dict[str, Any] = answer.json()["rollouts"][0]
            return latest

        steps, stage = 0, ""
        while (now := rollout())["state"] != "completed":
            if now["state"] != "running":
                raise SystemExit(f"the rollout stopped: {now['state']}: {now['reason']}")
            if now["stage_name"] != stage:
                stage = now["stage_name"]
                print(f"  {time.perf_counter() - start_wall:6.1f} s: stage {stage}", flush=True)
            fleet.step(15)
            steps += 1
        wall = time.perf_counter() - start_wall
        cpu = cpu_seconds(server.pid) - start_cpu
        served = requests_served(url) - start_requests
        rate = (requests_served(url, "checkin") - start_checkins) / wall
        simulated = fleet.clock() - 1000
        print(f"devices: {args.devices} (made in {made:.1f} s, {args.workers} at a time); "
              f"rollout to 100 %: {wall:.1f} s wall, {simulated:.0f} simulated s, "
              f"{steps} fleet steps")  # fmt: skip
        print(
            f"server CPU: {cpu:.1f} s ({cpu / wall:.0%} of one core) for {served:.0f} requests "
            f"({served / wall:.0f}/s): {cpu / served * 1000:.2f} ms each, "
            f"{cpu / served / healthz_cpu:.2f}x a GET /healthz ({healthz_cpu * 1000:.2f} ms)"
        )
        print(f"check-ins: {rate:.0f}/s sustained (the devices' side, in this process, is the "
              f"limit); GET /healthz from one client: {healthz_rate:.0f}/s")  # fmt: skip
        print(f"fleet: {dict(fleet.versions())}")
        # the server alone: unchanged check-ins (ETag / 304) as fast as one client can send
        client = fleet.members[0].daemon.client
        client.checkin()
        before = cpu_seconds(server.pid)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 3.0:
            assert client.checkin().unchanged
            count += 1
        unchanged = count / (time.perf_counter() - start)
        per = (cpu_seconds(server.pid) - before) / count
        print(f"unchanged check-ins (304) from one client: {unchanged:.0f}/s, "
              f"{per * 1000:.2f} ms server CPU each = {per / healthz_cpu:.2f}x a GET /healthz; "
              f"one core would answer {1 / per:.0f}/s")  # fmt: skip
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
