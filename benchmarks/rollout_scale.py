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

from chaos.demo import fleet_command, free_port, lab_bundle, start_server
from chaos.fleet import MemberSpec, VirtualFleet
from signing.keyring import trust_key
from signing.keys import generate_key


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def checkins(url: str) -> float:
    total = 0.0
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("fleet_server_requests_total") and "checkin" in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def baseline_rate(url: str, seconds: float = 3.0) -> float:
    """Plain GET /healthz per second from one client: the same HTTP path, no work."""
    session = requests.Session()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.get(f"{url}/healthz", timeout=10)
        count += 1
    return count / (time.perf_counter() - start)


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
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(data, port, workdir / "server.log", rollout_interval_s=1.0)
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
        baseline = baseline_rate(url)
        fleet_command("release", "upload", str(lab_bundle(workdir, key, "2.0.0", "healthy")),
                      *operator)  # fmt: skip
        canaries = [arg for m in fleet.members[:2] for arg in ("--canary", m.device_id)]
        start_wall, start_cpu, start_checkins = time.perf_counter(), cpu_seconds(server.pid), 0.0
        fleet.step(1)  # enroll everybody
        start_checkins = checkins(url)
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
        rate = (checkins(url) - start_checkins) / wall
        simulated = fleet.clock() - 1000
        print(f"devices: {args.devices} (made in {made:.1f} s); rollout to 100 %: "
              f"{wall:.1f} s wall, {simulated:.0f} simulated s, {steps} fleet steps")  # fmt: skip
        print(f"server CPU: {cpu:.1f} s ({cpu / wall:.0%} of one core)")
        print(f"check-ins: {rate:.0f}/s sustained; baseline GET /healthz from one client: "
              f"{baseline:.0f}/s; ratio {rate / baseline:.2f}")  # fmt: skip
        print(f"fleet: {dict(fleet.versions())}")
        # the server alone: unchanged check-ins (ETag / 304) as fast as one client can send
        client = fleet.members[0].daemon.client
        client.checkin()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 3.0:
            assert client.checkin().unchanged
            count += 1
        unchanged = count / (time.perf_counter() - start)
        print(f"unchanged check-ins (304) from one client: {unchanged:.0f}/s; "
              f"ratio to GET /healthz {unchanged / baseline:.2f}")  # fmt: skip
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
