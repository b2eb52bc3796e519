#!/usr/bin/env python3
"""The device agent's footprint: CPU, peak memory and network of a real ``fleet-updater
daemon`` process over a device-day, idle and with one install, against a real ``fleet server
run`` process on loopback.

The daemon is the entry point a device runs (``fleet-updater --config FILE daemon``), started
as a process of its own on a virtual device (``chaos.virtual_device``: slot files, a GRUB
firmware model, a lab image in slot a). Its configuration is the shipped one as far as the
lab allows: the check-in, heartbeat and fail-over intervals of ``deploy/device/updater.toml``
(the built-in defaults where the file leaves a key out) and a node_exporter textfile written
at every heartbeat; health checks are left out (the lab has no systemd units or compose
stacks to check). Every byte between daemon and server goes through the counting relay of
``chaos.net_meter``: the HTTP bytes both ways, request and status lines, headers and bodies.

**How a day is compressed.** Between its duties the daemon blocks in one wait: what it costs
is a cost per duty (check-in, heartbeat, events sent, a session opened). So its intervals are
divided by ``--factor`` K and it runs for ``--cycles`` N check-in intervals of real time:
N x interval / K real seconds stand for N x interval seconds of device time. From a window
that starts once the daemon has enrolled, opened its session and done its first duties:

- CPU: the user + system CPU seconds of the daemon (and of any child it waited for, from
  ``/proc/PID/stat``) over the window, divided by the device time the window stands for: the
  share of one core the daemon keeps busy, the same over a day;
- network: the window's bytes, sessions excepted, per device second times 86 400, plus the
  bytes of one session opening (challenge and session) for every session a day takes (the
  server's session lifetime less the margin the client renews it early by). The server runs
  on real time, so no session expires within the window;
- peak RSS: ``VmHWM`` from ``/proc/PID/status`` at the end: the most the process ever held.

With an install: release 1.1.0, a lab image of ``--image-mib`` MiB (random bytes: the whole
image is downloaded), is assigned to the device while its daemon runs; the daemon downloads
and installs it and runs the reboot command (here a file is touched). The daemon is stopped,
the virtual device reboots into the trial (its boot check, a unit of its own, commits it),
and a new daemon process starts and reports the new release. The install's cost is what both
processes spent from the assignment until the server knows the device runs 1.1.0 and the
events are sent, less the idle cost of the same device time; the new process's start (its
imports, its new session) counts to the install: a reboot is part of it. The install day is
the idle day plus one install. Not included: the faster check-ins a running rollout asks for
(they depend on how long the operator's rollout lasts; ``device_network.py`` measures them),
the TCP/IP and TLS bytes beneath HTTP (``device_network.py`` estimates those too), and the CPU
of opening a connection and a TLS session: compressed, the daemon's requests come seconds
apart and keep one plain HTTP connection, as a device behind the proxy keeps one (its
keep-alive outlasts the minute between duties) until the proxy or the server restarts.

Baselines, measured the same way in the same run: the interpreter floor (a bare
``python3 -c 'import time; time.sleep(...)'`` started as the daemon is) and the daemon's imports
alone (``python3 -c 'import updater.cli, updater.daemon, ...; time.sleep(...)'``): peak RSS
is printed as a ratio to the floor, CPU per day as a ratio to one start of the interpreter.
The aims: CPU under 1 % of a core, peak RSS at most 40 MB, under 1 MB a day idle.

    python benchmarks/agent_footprint.py [--factor 20] [--cycles 120] [--image-mib 8]
        [--quick] [--json FILE] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

import chaos.lab_firmwares  # noqa: E402, F401 (fills LAB_FIRMWARES)
from chaos.lab_image import make_lab_image  # noqa: E402
from chaos.net_meter import Exchange, NetMeter  # noqa: E402
from chaos.virtual_device import VirtualDevice  # noqa: E402
from image_builder.bundle_writer import ImageSource, create_bundle  # noqa: E402
from server.settings import SESSION_TTL_S  # noqa: E402
from signing.keyring import trust_key  # noqa: E402
from signing.keys import generate_key  # noqa: E402
from updater.client import SESSION_MARGIN_S  # noqa: E402
from updater.config import UpdaterConfig  # noqa: E402
from updater.identity import load_or_create_identity  # noqa: E402
from updater.outbox import OUTBOX_NAME  # noqa: E402

FLEET = [sys.executable, "-c", "from fleet_core.cli import main; main()"]
SHIPPED_CONFIG = ROOT / "deploy" / "device" / "updater.toml"
COMPATIBLE = "lab-device"
MiB = 1 << 20
MB = 1_000_000
DAY_S = 86_400.0
CLOCK_TICK_S = 1 / os.sysconf("SC_CLK_TCK")
AIM_CPU_PERCENT = 1.0
AIM_RSS_MB = 40.0
AIM_IDLE_MB_PER_DAY = 1.0
# what the daemon imports as it starts, for the imports-only baseline
DAEMON_IMPORTS = "updater.cli, updater.daemon, updater.install, updater.metrics"
SESSION_DAY_COUNT = DAY_S / (SESSION_TTL_S - SESSION_MARGIN_S)  # sessions opened a day


# --- processes --------------------------------------------------------------------------


def updater_command() -> list[str]:
    """``fleet-updater`` as the package installs it beside this interpreter, else the module
    the entry point runs (the same code)."""
    script = Path(sys.executable).with_name("fleet-updater")
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "updater.cli"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and of the children it waited for."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return (utime + stime + cutime + cstime) * CLOCK_TICK_S


def memory_kib(pid: int, field: str) -> int:
    """A line of ``/proc/PID/status`` in KiB: ``VmHWM`` (the most resident memory the process
    ever had), ``RssAnon`` (its own memory now: heap, objects, stacks), ``RssFile`` (pages of
    files it maps now: the interpreter and the libraries, which other processes may share)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/{pid}/status has no {field} line")


def peak_rss_kib(pid: int) -> int:
    return memory_kib(pid, "VmHWM")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Baseline:
    name: str
    peak_rss_kib: int
    cpu_s: float  # its start: the interpreter, and the imports if any


def measure_baseline(name: str, code: str) -> Baseline:
    """A process running ``code`` and then sleeping, started as the daemon is: its peak RSS
    once it sleeps, and the CPU seconds of its life (from ``wait4``: to the microsecond)."""
    process = subprocess.Popen(
        [sys.executable, "-c", f"{code}\nimport sys, time\nsys.stdout.write('ready\\n')\n"
         "sys.stdout.flush()\ntime.sleep(60)"],
        stdout=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        if process.stdout.readline() != b"ready\n":
            raise SystemExit(f"baseline {name}: the process did not start")
        time.sleep(0.2)
        peak = peak_rss_kib(process.pid)
        process.send_signal(signal.SIGTERM)
        _, _, usage = os.wait4(process.pid, 0)
        process.returncode = -signal.SIGTERM  # reaped here
        return Baseline(name, peak, usage.ru_utime + usage.ru_stime)
    finally:
        stop(process)


# --- the lab ----------------------------------------------------------------------------


def fleet_cli(*args: str) -> str:
    done = subprocess.run([*FLEET, *args], capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"fleet {' '.join(args[:3])}: {done.stderr.strip()}")
    return done.stdout


def shipped_intervals() -> dict[str, float]:
    """The ``[server]`` intervals of the duties in the shipped device configuration; the
    built-in default for any it leaves out."""
    table = tomllib.loads(SHIPPED_CONFIG.read_text()).get("server", {})
    defaults = UpdaterConfig()
    return {
        key: float(table.get(key, getattr(defaults, key)))
        for key in ("checkin_interval_s", "heartbeat_interval_s")
    }


def start_server(data: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A ``fleet server run`` process on real time, on a loopback port bound here and handed
    down; its URL once it answers."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with log.open("ab") as output:
            process = subprocess.Popen(
                [*FLEET, "server", "run", "--data-dir", str(data), "--fd",
                 str(listener.fileno()), "--log-level", "warning"],
                stdout=output, stderr=subprocess.STDOUT, pass_fds=[listener.fileno()], cwd=ROOT,
            )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited; see {log}")
        try:
            if requests.get(f"{url}/healthz", timeout=1).ok:
                return process, url
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.1)
    stop(process)
    raise SystemExit(f"the server did not come up; see {log}")


def kind_of(exchange: Exchange) -> str:
    path = exchange.target.split("?", 1)[0]
    if path.startswith("/blobs/"):
        return "blobs"
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if path.startswith("/api/v1/devices/") and last in (
        "enroll", "challenge", "session", "checkin", "heartbeat", "events"
    ):  # fmt: skip
        return "session" if last == "challenge" else last
    return "other"


@dataclass
class Snapshot:
    """The daemon's CPU and the relay's counts at one moment."""

    at: float  # monotonic
    cpu_s: float
    exchanges: int  # how many the relay had seen


class Lab:
    """The server, the relay in front of it, the virtual device and its daemon process."""

    def __init__(self, workdir: Path, factor: float, image_mib: int) -> None:
        self.workdir = workdir
        self.factor = factor
        self.intervals = shipped_intervals()
        # not a duty's interval: how long an answer may take (not compressed)
        failover_s = float(tomllib.loads(SHIPPED_CONFIG.read_text()).get("server", {}).get(
            "failover_after_s", UpdaterConfig().failover_after_s))  # fmt: skip
        self.key = generate_key(workdir / "release-key")
        data = workdir / "server"
        trust_key(data / "keyring", workdir / "release-key.pub")
        self.server, self.url = start_server(data, workdir / "server.log")
        self.meter: NetMeter | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        try:
            self.token = fleet_cli("server", "token", "create", "--role", "admin", "--name",
                                   "bench", "--data-dir", str(data)).splitlines()[0]  # fmt: skip
            enrollment = fleet_cli("server", "enrollment-token", "create", "--uses", "1",
                                   "--data-dir", str(data)).splitlines()[0]  # fmt: skip
            self.meter = NetMeter(self.url)
            slot = max(2 * image_mib, 1) * MiB
            self.device = VirtualDevice(
                workdir / "device", "grub", compatible=COMPATIBLE, slot_sizes={"rootfs": slot}
            )
            trust_key(self.device.root / "keyring", workdir / "release-key.pub")
            trust_key(self.device.root / "server-keyring", data / "server-key.pub")
            self.device.provision(make_lab_image("1.0.0"), "1.0.0")
            self.device.power_on()
            self.device_id = load_or_create_identity(self.device.config.data_dir)[0].device_id
            self.reboot_marker = workdir / "rebooted"
            server = "\n".join([
                "[server]",
                f'urls = ["{self.meter.url}"]',
                f'keyring = "{self.device.root / "server-keyring"}"',
                f'enrollment_token = "{enrollment}"',
                *(f"{key} = {value / factor!r}" for key, value in self.intervals.items()),
                f"failover_after_s = {failover_s!r}",
                "[metrics]",
                f'textfile = "{self.device.root / "fleet.prom"}"',
            ])  # fmt: skip
            self.config = self.device.root / "updater.toml"
            self.config.write_text(self.device.config_toml(
                reboot_command=("touch", str(self.reboot_marker)), extra=server))  # fmt: skip
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.daemon is not None:
            stop(self.daemon)
        if self.meter is not None:
            self.meter.close()
        stop(self.server)

    # the operator's side, straight to the server

    def api(self, method: str, path: str, body: Any = None) -> Any:
        answer = requests.request(method, self.url + path, json=body, timeout=60,
                                  headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip
        answer.raise_for_status()
        return answer.json()

    # the device's side

    def start_daemon(self) -> subprocess.Popen[bytes]:
        log = (self.workdir / "daemon.log").open("ab")
        with log:
            self.daemon = subprocess.Popen(
                [*updater_command(), "--config", str(self.config), "daemon"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
        return self.daemon

    def exchanges(self) -> list[Exchange]:
        assert self.meter is not None
        return self.meter.exchanges()

    def snapshot(self, process: subprocess.Popen[bytes] | None = None) -> Snapshot:
        process = process or self.daemon
        cpu = cpu_seconds(process.pid) if process is not None and process.poll() is None else 0.0
        return Snapshot(time.monotonic(), cpu, len(self.exchanges()))

    def wait(self, what: str, done: Callable[[], bool], limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while not done():
            if self.daemon is not None and self.daemon.poll() is not None:
                raise SystemExit(f"the daemon exited while waiting for {what}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"no {what} within {limit_s:.0f} s; the daemon's log ends:\n"
                                 f"{self.log_tail()}")  # fmt: skip
            time.sleep(0.05)

    def log_tail(self, lines: int = 10) -> str:
        """The last lines the daemon processes wrote (the lab is removed at the end)."""
        log = self.workdir / "daemon.log"
        text = log.read_text(errors="replace") if log.exists() else "(nothing)"
        return "\n".join(text.splitlines()[-lines:])

    def count(self, kind: str, since: int = 0) -> int:
        """Answered requests of ``kind`` after the first ``since`` exchanges."""
        return sum(1 for e in self.exchanges()[since:]
                   if kind_of(e) == kind and e.status is not None)  # fmt: skip

    def outbox_empty(self) -> bool:
        """No event waits in the outbox (a header line, then one line an event)."""
        outbox = self.device.config.data_dir / OUTBOX_NAME
        return not outbox.exists() or len(outbox.read_bytes().splitlines()) <= 1

    @property
    def checkin_real_s(self) -> float:
        return self.intervals["checkin_interval_s"] / self.factor


def lab_release(workdir: Path, key: Any, version: str, image_mib: int) -> Path:
    """A lab image of ``image_mib`` MiB of random bytes (nothing shared: downloaded whole),
    bundled and signed."""
    body = random.Random(version).randbytes(image_mib * MiB - 128)  # noqa: S311 - test data
    image = workdir / f"lab-{version}.img"
    image.write_bytes(make_lab_image(version, body=body))
    bundle = workdir / f"release-{version}.bundle"
    create_bundle(bundle, images=[ImageSource("rootfs", image)], keys=[key],
                  compatible=COMPATIBLE, version=version, security_version=1,
                  compression="zstd")  # fmt: skip
    return bundle


# --- the measurement ----------------------------------------------------------------------


@dataclass
class Window:
    """What the daemon spent between two snapshots, and the device time that stands for."""

    cpu_s: float
    device_s: float
    bytes_by_kind: dict[str, int]
    requests_by_kind: dict[str, int]
    heads_by_kind: dict[str, int]  # of the bytes: request lines, status lines and headers

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_kind.values())


def window(lab: Lab, start: Snapshot, end: Snapshot, cpu_s: float | None = None) -> Window:
    by_kind: dict[str, int] = {}
    requests_by_kind: dict[str, int] = {}
    heads_by_kind: dict[str, int] = {}
    for exchange in lab.exchanges()[start.exchanges : end.exchanges]:
        kind = kind_of(exchange)
        by_kind[kind] = by_kind.get(kind, 0) + exchange.up + exchange.down
        requests_by_kind[kind] = requests_by_kind.get(kind, 0) + 1
        heads = exchange.up_head + exchange.down_head
        heads_by_kind[kind] = heads_by_kind.get(kind, 0) + heads
    return Window(
        end.cpu_s - start.cpu_s if cpu_s is None else cpu_s,
        (end.at - start.at) * lab.factor,
        by_kind,
        requests_by_kind,
        heads_by_kind,
    )


def session_bytes(lab: Lab) -> float:
    """The bytes of one session opening (challenge and session), as the relay counted them."""
    sessions = [e for e in lab.exchanges() if kind_of(e) == "session"]
    opened = sum(1 for e in sessions if e.target.endswith("/session"))
    if not opened:
        raise SystemExit("the daemon never opened a session")
    return sum(e.up + e.down for e in sessions) / opened


def measure_idle(lab: Lab, cycles: int) -> dict[str, Any]:
    """The idle day: a window of ``cycles`` check-in intervals after the first duties."""
    daemon = lab.start_daemon()
    lab.wait("enrollment and first duties", lambda: lab.count("heartbeat") >= 2
             and lab.count("checkin") >= 2 and lab.outbox_empty(), limit_s=120)  # fmt: skip
    start = lab.snapshot()
    started_cpu_s = start.cpu_s
    time.sleep(cycles * lab.checkin_real_s)
    end = lab.snapshot()
    w = window(lab, start, end)
    if "session" in w.bytes_by_kind or "enroll" in w.bytes_by_kind:
        raise SystemExit("a session was opened within the idle window: shorten it")
    per_session = session_bytes(lab)
    day_bytes = w.bytes / w.device_s * DAY_S + per_session * SESSION_DAY_COUNT
    return {
        "window": asdict(w),
        "cpu_percent": 100 * w.cpu_s / w.device_s,
        "cpu_s_per_day": w.cpu_s / w.device_s * DAY_S,
        "start_cpu_s": started_cpu_s,
        "peak_rss_kib": peak_rss_kib(daemon.pid),
        "rss_anon_kib": memory_kib(daemon.pid, "RssAnon"),
        "rss_file_kib": memory_kib(daemon.pid, "RssFile"),
        "session_bytes": per_session,
        "bytes_per_day": day_bytes,
        "requests_per_day": {
            kind: n / w.device_s * DAY_S for kind, n in w.requests_by_kind.items()
        },
        "bytes_per_day_by_kind": {
            **{kind: n / w.device_s * DAY_S for kind, n in w.bytes_by_kind.items()},
            "session": per_session * SESSION_DAY_COUNT,
        },
    }


def measure_install(lab: Lab, idle: dict[str, Any], image_mib: int) -> dict[str, Any]:
    """One install of release 1.1.0 by the running daemon, the reboot, and the new daemon's
    report; its cost beyond the idle cost of the same device time."""
    bundle = lab_release(lab.workdir, lab.key, "1.1.0", image_mib)
    fleet_cli("release", "upload", str(bundle), "--server", lab.url, "--token", lab.token)
    first = lab.daemon
    assert first is not None
    start = lab.snapshot()
    lab.api("POST", f"/api/v1/devices/{lab.device_id}/assignment", {"version": "1.1.0"})
    lab.wait("install and reboot command", lab.reboot_marker.exists, limit_s=600)
    # the reboot command ran: the daemon would be killed by the reboot now
    installed = lab.snapshot()
    first_cpu_s = installed.cpu_s - start.cpu_s
    first_peak = peak_rss_kib(first.pid)
    stop(first)
    lab.device.reboot()  # the firmware boots the trial; the boot check commits it
    booted = lab.device.state()
    if booted.slot("b").version != "1.1.0" or booted.slot("b").status != "good":
        raise SystemExit(f"the trial of 1.1.0 was not committed: {booted.slot('b')}")
    second = lab.start_daemon()
    lab.wait("the server to know 1.1.0 runs", lambda: lab.api(
        "GET", f"/api/v1/devices/{lab.device_id}")["version"] == "1.1.0", limit_s=120)  # fmt: skip
    since = len(lab.exchanges())
    lab.wait("the events and two heartbeats", lambda: lab.outbox_empty()
             and lab.count("heartbeat", since) >= 2, limit_s=120)  # fmt: skip
    end = lab.snapshot()
    second_cpu_s = end.cpu_s
    second_peak = peak_rss_kib(second.pid)
    w = window(lab, start, end, cpu_s=first_cpu_s + second_cpu_s)
    idle_cpu = idle["cpu_s_per_day"] / DAY_S * w.device_s
    idle_bytes = idle["window"]["bytes_by_kind"]
    idle_device_s = idle["window"]["device_s"]
    idle_rate = sum(idle_bytes.values()) / idle_device_s
    extra_bytes = w.bytes - idle_rate * w.device_s
    extra_cpu = w.cpu_s - idle_cpu
    return {
        "image_bytes": image_mib * MiB,
        "window": asdict(w),
        "cpu_s": extra_cpu,
        "cpu_s_before_reboot": first_cpu_s,
        "cpu_s_after_reboot": second_cpu_s,
        "bytes": extra_bytes,
        "peak_rss_kib": max(first_peak, second_peak),
        "peak_rss_kib_installing": first_peak,
        "peak_rss_kib_after_reboot": second_peak,
        "cpu_percent": idle["cpu_percent"] + 100 * extra_cpu / DAY_S,
        "bytes_per_day": idle["bytes_per_day"] + extra_bytes,
    }


# --- the report ---------------------------------------------------------------------------


def mib(kib: float) -> float:
    return kib / 1024


def report(result: dict[str, Any]) -> list[str]:
    floor, imports = (Baseline(**b) for b in result["baselines"])
    idle, install = result["idle"], result["install"]
    lines = [
        f"daemon intervals (shipped): check-in {result['intervals']['checkin_interval_s']:.0f} s, "
        f"heartbeat {result['intervals']['heartbeat_interval_s']:.0f} s; compressed "
        f"{result['factor']:g}x, idle window {idle['window']['device_s'] / 3600:.2f} h of "
        "device time",
        "",
        f"{'baseline':<34}{'peak RSS MiB':>14}{'start CPU s':>13}",
        f"{'interpreter floor':<34}{mib(floor.peak_rss_kib):>14.1f}{floor.cpu_s:>13.2f}",
        f"{'daemon imports only':<34}{mib(imports.peak_rss_kib):>14.1f}{imports.cpu_s:>13.2f}",
        "",
        f"{'daemon, per device-day':<26}{'CPU %':>8}{'CPU s':>8}{'x start':>9}"
        f"{'peak RSS MiB':>14}{'x floor':>9}{'MB/day':>9}",
    ]
    for name, row in (("idle", idle), ("one install", install)):
        cpu_day = row["cpu_percent"] / 100 * DAY_S
        lines.append(
            f"{name:<26}{row['cpu_percent']:>8.3f}{cpu_day:>8.1f}{cpu_day / floor.cpu_s:>9.0f}"
            f"{mib(row['peak_rss_kib']):>14.1f}{row['peak_rss_kib'] / floor.peak_rss_kib:>9.2f}"
            f"{row['bytes_per_day'] / MB:>9.3f}"
        )
    lines += [
        "",
        "idle bytes a day by kind: "
        + ", ".join(
            f"{kind} {n / MB:.3f} MB" for kind, n in sorted(idle["bytes_per_day_by_kind"].items())
        ),
        "idle requests a day: "
        + ", ".join(f"{kind} {n:.0f}" for kind, n in sorted(idle["requests_per_day"].items())),
        "idle bytes a request (of which headers): "
        + ", ".join(
            f"{kind} {idle['window']['bytes_by_kind'][kind] / n:.0f} "
            f"({idle['window']['heads_by_kind'][kind] / n:.0f})"
            for kind, n in sorted(idle["window"]["requests_by_kind"].items())
        ),
        f"idle daemon's memory at the end: {mib(idle['rss_anon_kib']):.1f} MiB its own "
        f"(RssAnon), {mib(idle['rss_file_kib']):.1f} MiB of mapped files (RssFile: the "
        "interpreter and libraries)",
        f"daemon start (imports, enrollment, session, first duties): {idle['start_cpu_s']:.2f} "
        "CPU s",
        f"the install of {install['image_bytes'] / MiB:.0f} MiB beyond idle: "
        f"{install['cpu_s']:.2f} CPU s, {install['bytes'] / MB:.2f} MB; peak RSS installing "
        f"{mib(install['peak_rss_kib_installing']):.1f} MiB, after the reboot "
        f"{mib(install['peak_rss_kib_after_reboot']):.1f} MiB",
        "",
    ]
    for aim in result["aims"]:
        lines.append(f"aim: {aim['what']}: {aim['figure']} ({'met' if aim['met'] else 'MISSED'})")
    return lines


def aims(idle: dict[str, Any], install: dict[str, Any]) -> list[dict[str, Any]]:
    """Each aim, met by the worse of the idle day and the install day."""
    cpu = max(idle["cpu_percent"], install["cpu_percent"])
    rss_mb = [row["peak_rss_kib"] * 1024 / MB for row in (idle, install)]
    day_mb = idle["bytes_per_day"] / MB
    return [
        {"what": f"CPU under {AIM_CPU_PERCENT:g} % of a core", "figure": f"{cpu:.3f} %",
         "met": cpu < AIM_CPU_PERCENT},
        {"what": f"peak RSS at most {AIM_RSS_MB:g} MB",
         "figure": f"{rss_mb[0]:.1f} MB idle, {rss_mb[1]:.1f} MB with the install",
         "met": max(rss_mb) <= AIM_RSS_MB},
        {"what": f"under {AIM_IDLE_MB_PER_DAY:g} MB a day idle (HTTP bytes)",
         "figure": f"{day_mb:.3f} MB", "met": day_mb < AIM_IDLE_MB_PER_DAY},
    ]  # fmt: skip


def positive(kind: type[int] | type[float], low: float, high: float, name: str) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: give a number, not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name}: give {low:g} to {high:g}, not {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--factor",
        type=positive(float, 1, 120, "--factor"),
        default=20.0,
        help="how many times faster than real the daemon's intervals run",
    )
    parser.add_argument(
        "--cycles",
        type=positive(int, 3, 10_000, "--cycles"),
        default=120,
        help="check-in intervals in the idle window",
    )
    parser.add_argument(
        "--image-mib",
        type=positive(int, 1, 1024, "--image-mib"),
        default=8,
        help="the size of the release installed",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a run of seconds (the smoke test): --factor 60 --cycles 5 --image-mib 1",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--workdir", type=Path, help="where the lab lives (removed after)")
    args = parser.parse_args(argv)  # fmt: skip
    if args.quick:
        args.factor, args.cycles, args.image_mib = 60.0, 5, 1
    workdir = Path(tempfile.mkdtemp(prefix="agent-footprint-", dir=args.workdir))
    try:
        baselines = [
            measure_baseline("interpreter floor", "pass"),
            measure_baseline("daemon imports only", f"import {DAEMON_IMPORTS}"),
        ]
        lab = Lab(workdir, args.factor, args.image_mib)
        try:
            idle = measure_idle(lab, args.cycles)
            install = measure_install(lab, idle, args.image_mib)
        finally:
            lab.close()
        result = {
            "factor": args.factor,
            "cycles": args.cycles,
            "intervals": lab.intervals,
            "baselines": [asdict(b) for b in baselines],
            "idle": idle,
            "install": install,
            "aims": aims(idle, install),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(report(result)))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
