#!/usr/bin/env python3
"""Network per device-day: the bytes a device sends and receives in a simulated day, measured on
the virtual fleet (real updater daemons, a real ``fleet server run`` process).

Every device talks to the server through a counting relay on loopback (``chaos.net_meter``):
the figures are the HTTP bytes both ways, request and status lines, headers and bodies
included, split by what they were for (enrollment, session, check-in, heartbeat, events,
blobs). The relay closes a device's connection when it has been idle for longer than the
keep-alive of the proxy in front of the server (HAProxy's ``timeout http-keep-alive``, read from
deploy/proxy/haproxy.cfg), so a device opens a connection where it really would. Not seen
by the relay, and given beside the HTTP figures, which a metered SIM pays too: TCP/IP
headers, estimated (52 bytes a packet, a packet per MSS of data and an ACK for it, 7 packets
to open and close a connection), and TLS: a full handshake per connection and a record's
overhead per message, both measured through the same relay against a loopback TLS server set
up as deploy/proxy/haproxy.cfg sets HAProxy up.

The fleet (``--devices``) leaves the factory running a lab image, then, in this order:

1. enrolls, and runs ``--days`` simulated days with nothing to install (idle: check-ins,
   heartbeats, events, sessions);
2. installs release 1.1.0 through a rollout: a ``--image-mib`` MiB ext4 root filesystem built
   by ``fleet image rootfs`` (about half full of files, binaries and text), bundled
   ``--format 2 --compress zstd``. It shares nothing with the factory image: the full-image
   download;
3. installs release 1.2.0 through a rollout: the same tree with one file changed (a 1 MiB
   shared library rebuilt), the weekly patch release. With the chunk index listed in the
   assignment, the device fetches only the chunks it lacks (``install.delta_planned`` and
   ``install.delta_written`` say what); without, the whole image.

The rollouts run on the server's clock, ten times real time, and the fleet's clock is held to
the same pace while they run. A release costs what its rollout phase carried beyond the idle
traffic of the same simulated time (faster check-ins while a rollout is active included). The
per device-day total is idle plus one patch release a week, against the operator's budget
(under 100 MB per device per day) and the aim (under 5 MB).

    python benchmarks/device_network.py [--devices 5] [--days 1] [--image-mib 64]
        [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from bootloader_hooks.base import BootCause, BootEvent  # noqa: E402
from chaos.demo import TIME_SCALE, start_server  # noqa: E402
from chaos.fleet import Member, MemberSpec, VirtualFleet  # noqa: E402
from chaos.net_meter import Exchange, NetMeter  # noqa: E402
from signing.keyring import trust_key  # noqa: E402
from signing.keys import generate_key  # noqa: E402

FLEET = [sys.executable, "-c", "from fleet_core.cli import main; main()"]
COMPATIBLE = "lab-device"
EPOCH = "1700000000"  # SOURCE_DATE_EPOCH of every image: two builds differ only where the tree does
MiB = 1 << 20
MB = 1_000_000
DAY_S = 86_400.0
BUDGET_MB = 100.0  # the operator's budget per device per day
AIM_MB = 5.0
PATCHES_PER_WEEK = 1
# deploy/proxy/haproxy.cfg: devices reach the server through HAProxy, which closes a connection
# idle for longer than its `timeout http-keep-alive` and offers no TLS session tickets
# (no-tls-tickets): a connection after a longer pause is a new TCP connection and a full TLS
# handshake
HAPROXY_CFG = Path(__file__).resolve().parents[1] / "deploy/proxy/haproxy.cfg"


def proxy_keepalive_s(config: Path = HAPROXY_CFG) -> float:
    """The proxy's ``timeout http-keep-alive``, in seconds."""
    match = re.search(r"^\s*timeout http-keep-alive (\d+)s\s*$", config.read_text(), re.M)
    if match is None:
        raise SystemExit(f"{config}: no 'timeout http-keep-alive <N>s'")
    return float(match.group(1))


KEEPALIVE_S = proxy_keepalive_s()
# Estimated: what the relay does not see
IP_TCP_HEADER = 52  # IPv4 20 + TCP 20 + timestamps 12
MSS = 1448
OPEN_CLOSE_PACKETS = 7  # SYN, SYN-ACK, ACK; FIN, ACK, FIN, ACK
KINDS = ("enroll", "session", "checkin", "heartbeat", "events", "blobs", "other")
PATCHED_FILE = "usr/lib/aarch64-linux-gnu/libfleetdemo.so.1"


# --- the releases -------------------------------------------------------------------------


def make_tree(root: Path, image_mib: int) -> None:
    """A root filesystem tree filling about half of an image of ``image_mib`` MiB: binaries
    (random bytes, which compress a little, as code does), text (configuration, scripts,
    documentation) and one shared library the patch release changes. The same every time."""
    rng = random.Random(7)  # noqa: S311 - test data, not secrets
    budget = image_mib * MiB // 2
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
             for _ in range(2000)]  # fmt: skip
    number = 0
    while budget > 0:
        size = min(budget, rng.choice((4, 8, 16, 32, 64, 128, 256, 512)) << 10)
        directory = root / rng.choice(("usr/bin", "usr/lib/python3", "usr/share/doc", "etc"))
        directory.mkdir(parents=True, exist_ok=True)
        if rng.random() < 0.5:  # binary: half random, half runs of a few bytes
            half = size // 2
            data = rng.randbytes(half) + bytes(rng.choices(b"\0\0\0\x01\xff", k=size - half))
        else:
            line_words = rng.choices(words, k=size // 5)
            data = b" ".join(line_words)[:size]
        (directory / f"file{number:05d}").write_bytes(data)
        budget -= size
        number += 1
    write_library(root, "1")


def write_library(root: Path, build: str) -> None:
    """The shared library the patch release rebuilds: 1 MiB, every byte changed by a rebuild
    (code compresses about 2:1: half of it random, half runs of a few bytes)."""
    library = root / PATCHED_FILE
    library.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"library {build}")  # noqa: S311 - test data, not secrets
    runs = bytes(rng.choices(b"\0\0\0\x01\xff", k=MiB // 2))
    library.write_bytes(rng.randbytes(MiB // 2) + runs)


def fleet_cli(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [*FLEET, *args], capture_output=True, text=True, check=False, env=env, cwd=ROOT
    )
    if done.returncode != 0:
        raise SystemExit(f"fleet {' '.join(args[:3])}: {done.stderr.strip()}")
    return done.stdout


def build_image(tree: Path, image: Path, image_mib: int) -> Path:
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH}
    fleet_cli("image", "rootfs", str(tree), "--type", "ext4", "--size", f"{image_mib}M",
              "--label", "rootfs", "-o", str(image), env=env)  # fmt: skip
    return image


@dataclass
class Release:
    version: str
    bundle: Path
    image: dict[str, Any]  # the manifest's image entry


def bundle(image: Path, key: Path, version: str, out: Path, fmt: int = 2) -> Release:
    answer = fleet_cli(
        "bundle", "create", "--compatible", COMPATIBLE, "--version", version,
        "--security-version", "1", "--image", f"rootfs={image}", "--key", str(key),
        "--compress", "zstd", "--format", str(fmt), "-o", str(out), "--json",
    )  # fmt: skip
    manifest = json.loads(answer)
    manifest = manifest.get("manifest", manifest)
    (entry,) = manifest["images"]
    return Release(version, out, entry)


# --- TLS, measured --------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsCost:
    handshake_up: int  # a full handshake and the close, client to server
    handshake_down: int
    record: int  # bytes a TLS record adds to what it carries
    describe: str


def _certificate(subject: str, key: Any, issuer: tuple[str, Any] | None, ca: bool) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    issuer_name, issuer_key = issuer or (subject, key)
    import datetime

    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )  # fmt: skip
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("fleet.example.com")]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def measure_tls(directory: Path) -> TlsCost:
    """The bytes of a full TLS handshake as the devices' reverse proxy would make it (TLS 1.3,
    no session tickets, an RSA-2048 leaf certificate sent with its intermediate, as a public
    CA issues them), counted by the same relay: one connection with nothing sent, one with
    1000 bytes sent and 996 received, one record each."""
    import socket
    import ssl
    import threading

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    directory.mkdir(parents=True)
    keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]
    root = _certificate("Bench Root CA", keys[0], None, ca=True)
    middle = _certificate("Bench Intermediate CA", keys[1], ("Bench Root CA", keys[0]), ca=True)
    leaf = _certificate("fleet.example.com", keys[2], ("Bench Intermediate CA", keys[1]),
                        ca=False)  # fmt: skip
    pem = serialization.Encoding.PEM
    (directory / "chain.pem").write_bytes(leaf.public_bytes(pem) + middle.public_bytes(pem))
    (directory / "key.pem").write_bytes(keys[2].private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    (directory / "root.pem").write_bytes(root.public_bytes(pem))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(directory / "chain.pem", directory / "key.pem")
    server_context.num_tickets = 0  # HAProxy's no-tls-tickets
    client_context = ssl.create_default_context(cafile=str(directory / "root.pem"))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(rounds: int) -> None:
        for _ in range(rounds):
            connection, _ = listener.accept()
            with server_context.wrap_socket(connection, server_side=True) as tls:
                size = int.from_bytes(tls.recv(4) or b"\0\0\0\0", "big")
                if size:
                    tls.sendall(b"x" * size)

    server = threading.Thread(target=serve, args=(2,), daemon=True)
    server.start()
    totals = []
    with NetMeter(f"http://127.0.0.1:{port}") as meter:
        for size in (0, 996):
            before = meter.totals()
            with (
                socket.create_connection(urlsplit_port(meter.url)) as raw,
                client_context.wrap_socket(raw, server_hostname="fleet.example.com") as tls,
            ):
                tls.sendall(size.to_bytes(4, "big") + b"y" * size)
                received = 0
                while received < size:
                    received += len(tls.recv(65536))
            deadline = time.monotonic() + 5  # until the relay has counted the last bytes
            while not meter.connections()[-1].closed and time.monotonic() < deadline:
                time.sleep(0.01)
            up, down = meter.totals()
            totals.append((up - before[0], down - before[1]))
    server.join(10)
    listener.close()
    (up0, down0), (up1, down1) = totals
    # the client sent one record either way (4 bytes, then 1000); the server none, then one
    record = down1 - down0 - 996
    if up1 - up0 != 996:
        raise SystemExit(f"TLS measurement: the client's records differ by {up1 - up0} bytes")
    return TlsCost(
        up0 - 4 - record,
        down0,
        record,
        "TLS 1.3, no session tickets, RSA-2048 leaf and intermediate",
    )


def urlsplit_port(url: str) -> tuple[str, int]:
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    return host, int(port)


# --- the lab --------------------------------------------------------------------------------


def kind_of(target: str) -> str:
    path = target.split("?", 1)[0]
    if path.startswith("/blobs/"):
        return "blobs"
    last = path.rstrip("/").rsplit("/", 1)[-1]
    if path.startswith("/api/v1/devices/"):
        if last in ("challenge", "session"):
            return "session"
        if last in ("enroll", "checkin", "heartbeat", "events"):
            return last
    return "other"


@dataclass
class Tally:
    """Bytes and requests by device and kind, and connections by device, at one moment."""

    up: Counter[tuple[str, str]] = field(default_factory=Counter)
    down: Counter[tuple[str, str]] = field(default_factory=Counter)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    heads: Counter[tuple[str, str]] = field(default_factory=Counter)  # request and status
    packets: Counter[str] = field(default_factory=Counter)  # estimated, by device
    connections: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int | None]] = field(default_factory=Counter)  # (kind, code)

    @classmethod
    def of(cls, meter: NetMeter) -> Tally:
        tally = cls()
        for connection in meter.connections():
            tally.connections[connection.label] += 1
            tally.packets[connection.label] += OPEN_CLOSE_PACKETS
        for exchange in meter.exchanges():
            tally.add(exchange)
        return tally

    def add(self, exchange: Exchange) -> None:
        key = (exchange.label, kind_of(exchange.target))
        self.up[key] += exchange.up
        self.down[key] += exchange.down
        self.requests[key] += 1
        self.heads[key] += exchange.up_head + exchange.down_head
        self.statuses[(key[1], exchange.status)] += 1
        # data packets and their ACKs, both ways
        self.packets[exchange.label] += 2 * (math.ceil(exchange.up / MSS) +
                                             math.ceil(exchange.down / MSS))  # fmt: skip

    def minus(self, other: Tally) -> Tally:
        return Tally(*(getattr(self, n) - getattr(other, n) for n in
                       ("up", "down", "requests", "heads", "packets", "connections",
                        "statuses")))  # fmt: skip


@dataclass
class Phase:
    """What the fleet's devices sent and received in one phase, per device."""

    name: str
    simulated_s: float
    devices: int
    tally: Tally

    def bytes_by_kind(self) -> dict[str, dict[str, float]]:
        n = self.devices
        return {
            kind: {
                "up": sum(v for (_, k), v in self.tally.up.items() if k == kind) / n,
                "down": sum(v for (_, k), v in self.tally.down.items() if k == kind) / n,
                "requests": sum(v for (_, k), v in self.tally.requests.items() if k == kind) / n,
                "headers": sum(v for (_, k), v in self.tally.heads.items() if k == kind) / n,
            }
            for kind in KINDS
        }

    def total(self) -> float:
        """HTTP bytes both ways, per device."""
        return (sum(self.tally.up.values()) + sum(self.tally.down.values())) / self.devices

    def connections(self) -> float:
        return sum(self.tally.connections.values()) / self.devices

    def messages(self) -> float:
        return 2 * sum(self.tally.requests.values()) / self.devices

    def overhead(self, tls: TlsCost) -> dict[str, float]:
        """Bytes under and around HTTP, per device (module docstring): TCP/IP headers
        estimated, TLS from ``tls``."""
        tcp = sum(self.tally.packets.values()) / self.devices * IP_TCP_HEADER
        handshakes = self.connections() * (tls.handshake_up + tls.handshake_down)
        return {"tcp_ip": tcp, "tls": handshakes + self.messages() * tls.record}

    def per_day(self, value: float) -> float:
        return value * DAY_S / self.simulated_s

    def to_dict(self, tls: TlsCost) -> dict[str, Any]:
        return {
            "simulated_s": self.simulated_s, "devices": self.devices,
            "http_bytes_per_device": self.total(), "by_kind": self.bytes_by_kind(),
            "connections_per_device": self.connections(),
            "estimated_overhead_per_device": self.overhead(tls),
            "statuses": {f"{kind} {code}": n for (kind, code), n in
                         sorted(self.tally.statuses.items(), key=str)},
        }  # fmt: skip


class Lab:
    """The server, the meter in front of it and the fleet behind it; the fleet's clock moves
    from one device's next duty to the next (each daemon says when it is due)."""

    def __init__(self, workdir: Path, devices: int, image_mib: int, key_pub: Path) -> None:
        self.workdir = workdir
        data = workdir / "server"
        trust_key(data / "keyring", key_pub)
        self.process, self.url = start_server(data, workdir / "server.log")
        self.meter: NetMeter | None = None
        try:
            self.token = fleet_cli("server", "token", "create", "--role", "admin", "--name",
                                   "bench", "--data-dir", str(data)).splitlines()[0]  # fmt: skip
            enrollment = fleet_cli(
                "server", "enrollment-token", "create", "--uses", str(devices), "--data-dir",
                str(data),
            ).splitlines()[0]  # fmt: skip
            self.meter = NetMeter(self.url)
            slot = max(2 * image_mib * MiB, 64 * MiB)
            self.fleet = VirtualFleet(
                workdir / "fleet", [MemberSpec(role="camera") for _ in range(devices)],
                server_urls=(self.meter.url,), server_key=data / "server-key.pub",
                release_key=key_pub, enrollment_token=enrollment, plain_images=True,
                slot_sizes={"rootfs": slot},
            )  # fmt: skip
        except BaseException:
            self.close()
            raise
        now = self.fleet.clock()
        self.due = {m.device_id: now for m in self.fleet.members}
        self.last_contact = {m.device_id: -math.inf for m in self.fleet.members}

    def close(self) -> None:
        if self.meter is not None:
            self.meter.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    # the operator's side, straight to the server

    def api(self, path: str) -> Any:
        answer = requests.get(self.url + path, timeout=30,
                              headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip
        answer.raise_for_status()
        return answer.json()

    def operator(self, *args: str) -> str:
        return fleet_cli(*args, "--server", self.url, "--token", self.token)

    # the fleet's side

    def _run(self, member: Member) -> None:
        assert self.meter is not None
        now = self.fleet.clock()
        if now - self.last_contact[member.device_id] > KEEPALIVE_S:
            self.meter.hang_up(member.device_id)  # the server closed it meanwhile
        self.meter.label = member.device_id
        wait = member.daemon.run_once()
        device = member.device
        if device.pending_reboot is not None:
            command = tuple(device.pending_reboot)
            member.boots += device.settle(BootEvent(BootCause.REBOOT, command))
            wait = 0.0
        self.last_contact[member.device_id] = self.fleet.clock()
        self.due[member.device_id] = self.fleet.clock() + max(wait, 0.1)

    def advance(self, seconds: float, pace: float | None = None) -> None:
        """Move the fleet's clock ``seconds`` on, each device doing what is due when it is
        due; with ``pace``, no faster than ``pace`` simulated seconds a real second."""
        clock = self.fleet.clock
        end = clock() + seconds
        real_start, sim_start = time.monotonic(), clock()
        while True:
            nearest = min(self.due.values())
            if nearest > end:
                clock.sleep(end - clock())
                return
            clock.sleep(nearest - clock())
            if pace is not None:
                ahead = (clock() - sim_start) / pace - (time.monotonic() - real_start)
                if ahead > 0:
                    time.sleep(ahead)
            for member in self.fleet.members:
                if self.due[member.device_id] <= clock():
                    self._run(member)

    def run_until(self, done: Callable[[], bool], limit_s: float, *, pace: float | None = None,
                  every_s: float = 15.0) -> float:  # fmt: skip
        start = self.fleet.clock()
        while not done():
            if self.fleet.clock() - start > limit_s:
                raise SystemExit(f"not done after {limit_s:.0f} simulated seconds")
            self.advance(every_s, pace)
        return self.fleet.clock() - start

    @contextmanager
    def phase(self, name: str, phases: list[Phase]) -> Iterator[None]:
        assert self.meter is not None
        before, start = Tally.of(self.meter), self.fleet.clock()
        yield
        after = Tally.of(self.meter)
        phases.append(Phase(name, self.fleet.clock() - start, len(self.fleet.members),
                            after.minus(before)))  # fmt: skip

    def roll_out(self, release: Release) -> dict[str, Any]:
        """Upload and roll ``release`` out to every device; wait until all run it."""
        self.operator("release", "upload", str(release.bundle))
        self.operator("rollout", "start", release.version, "--stages", "100", "--soak", "30s")
        version = release.version
        took = self.run_until(
            lambda: self.fleet.versions()[version] == len(self.fleet.members)
            and self.api("/api/v1/rollouts")["rollouts"][0]["state"] == "completed",
            limit_s=6 * 3600, pace=TIME_SCALE,
        )  # fmt: skip
        # the devices hear that the rollout is over and report what they did
        self.advance(60, pace=TIME_SCALE)
        return {"rollout_s": took, **self.install_figures(version)}

    def install_figures(self, version: str) -> dict[str, Any]:
        """What each device's updater said it fetched for ``version``: per device."""
        planned, written = [], []
        for member in self.fleet.members:
            events = member.device.log.events
            started = [i for i, e in enumerate(events) if e["event"] == "daemon.install"
                       and e.get("version") == version]  # fmt: skip
            if not started:
                continue
            tail = events[started[-1] :]
            planned += [e for e in tail if e["event"] == "install.delta_planned"][:1]
            written += [e for e in tail if e["event"] == "install.delta_written"][:1]

        def mean(
            rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], float]
        ) -> float | None:
            return sum(map(key, rows)) / len(rows) if rows else None

        return {
            "delta_planned": len(planned), "delta_written": len(written),
            "planned_fetch_bytes": mean(planned, lambda e: e["fetch_bytes"]),
            "written_fetched_bytes": mean(written, lambda e: e["fetched"]),
            "written_reused_bytes": mean(written, lambda e: sum(e["reused"].values())),
        }  # fmt: skip


# --- the report -----------------------------------------------------------------------------


def human(value: float) -> str:
    for unit, size in (("MB", MB), ("kB", 1000)):
        if abs(value) >= size:
            return f"{value / size:,.2f} {unit}"
    return f"{value:,.0f} B"


def print_phase(phase: Phase, per_day: bool, tls: TlsCost) -> None:
    scale = phase.per_day if per_day else (lambda v: v)
    where = "per device-day" if per_day else "per device"
    print(f"\n{phase.name}: {phase.simulated_s / 3600:,.2f} simulated hours, {where}")
    print(
        f"  {'':<10} {'requests':>10} {'sent':>12} {'received':>12} {'both':>12} "
        f"{'of it headers':>14}"
    )
    for kind, row in phase.bytes_by_kind().items():
        if row["requests"]:
            print(f"  {kind:<10} {scale(row['requests']):>10,.0f} {human(scale(row['up'])):>12} "
                  f"{human(scale(row['down'])):>12} "
                  f"{human(scale(row['up'] + row['down'])):>12} "
                  f"{human(scale(row['headers'])):>14}")  # fmt: skip
    overhead = phase.overhead(tls)
    print(f"  {'HTTP total':<10} {'':>10} {'':>12} {'':>12} {human(scale(phase.total())):>12}")
    print(f"  connections: {scale(phase.connections()):,.0f}; beneath HTTP: TCP/IP headers "
          f"{human(scale(overhead['tcp_ip']))} (estimated), TLS "
          f"{human(scale(overhead['tls']))}")  # fmt: skip


def report(
    phases: dict[str, Phase], releases: dict[str, Any], tls: TlsCost, args: argparse.Namespace
) -> dict[str, Any]:
    idle, full, patch = phases["idle"], phases["full"], phases["patch"]
    print(
        f"TLS as measured on loopback: a full handshake {tls.handshake_up:,} B sent, "
        f"{tls.handshake_down:,} B received ({tls.describe}); {tls.record} B a record"
    )
    print(
        f"\ndevices {args.devices}, idle {args.days:g} simulated day(s), image "
        f"{args.image_mib} MiB ext4 (compressed image {human(releases['full_stored'])})"
    )
    print_phase(idle, per_day=True, tls=tls)
    for phase, name in ((full, "full"), (patch, "patch")):
        print_phase(phase, per_day=False, tls=tls)
        figures = releases[name]
        idle_rate = idle.total() / idle.simulated_s
        extra = phase.total() - idle_rate * phase.simulated_s
        figures["extra_bytes_per_device"] = extra
        stored = releases["full_stored"]
        blobs = phase.bytes_by_kind()["blobs"]["down"]
        print(f"  install ({figures['delta_planned']} delta plans of {args.devices} devices): "
              f"blobs {human(blobs)} = {100 * blobs / stored:.2f} % of the compressed image; "
              f"the rollout beyond idle traffic: {human(extra)} "
              f"({100 * extra / stored:.2f} %)")  # fmt: skip
        if figures["delta_planned"]:
            print(f"  delta: planned fetch {human(figures['planned_fetch_bytes'])}, fetched "
                  f"{human(figures['written_fetched_bytes'])}, reused on the device "
                  f"{human(figures['written_reused_bytes'])}")  # fmt: skip
        else:
            print(
                "  no delta plan: the image came as one stream (no chunk index assigned, "
                "or nothing on the device to reuse)"
            )
    print(
        f"\nformat 1 (no chunks) of the patch release: the device would download "
        f"{human(releases['format1_stored'])}"
    )
    idle_day = idle.per_day(idle.total())
    patch_day = releases["patch"]["extra_bytes_per_device"] * PATCHES_PER_WEEK / 7
    total = idle_day + patch_day
    o = idle.overhead(tls)
    total_estimated = total + idle.per_day(o["tcp_ip"] + o["tls"])
    print(f"\nper device-day: idle {human(idle_day)} + patch release amortised over a week "
          f"{human(patch_day)} = {human(total)} of HTTP; with TCP/IP (estimated) and TLS "
          f"{human(total_estimated)}")  # fmt: skip
    aims = []
    for name, limit in (("budget", BUDGET_MB), ("aim", AIM_MB)):
        met = total_estimated < limit * MB
        aims.append({"aim": f"under {limit:g} MB per device-day ({name})",
                     "figure": total_estimated, "met": met})  # fmt: skip
        print(f"aim: under {limit:g} MB per device-day ({name}): {human(total_estimated)}, "
              f"{'met' if met else 'MISSED'}")  # fmt: skip
    return {
        "devices": args.devices, "days": args.days, "image_mib": args.image_mib,
        "phases": {name: phase.to_dict(tls) for name, phase in phases.items()},
        "tls": asdict(tls),
        "releases": releases,
        "per_device_day": {"idle": idle_day, "patch_amortised": patch_day, "total": total,
                           "total_with_estimated_overhead": total_estimated},
        "aims": aims,
    }  # fmt: skip


# --- main -------------------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    generate_key(workdir / "release-key")
    tree = workdir / "tree"
    make_tree(tree, args.image_mib)
    images = workdir / "images"
    images.mkdir()
    v1 = build_image(tree, images / "rootfs-1.1.0.ext4", args.image_mib)
    write_library(tree, "2")
    v2 = build_image(tree, images / "rootfs-1.2.0.ext4", args.image_mib)
    shutil.rmtree(tree)
    pem = workdir / "release-key.pem"
    full = bundle(v1, pem, "1.1.0", images / "1.1.0.bundle")
    patch = bundle(v2, pem, "1.2.0", images / "1.2.0.bundle")
    format1 = bundle(v2, pem, "1.2.0", images / "1.2.0-format1.bundle", fmt=1)
    for image in (v1, v2):
        image.unlink()
    releases: dict[str, Any] = {
        "full_stored": full.image["size"],
        "patch_stored": patch.image["size"],
        "format1_stored": format1.image["size"],
        "chunk_index": (patch.image.get("chunk_index") or {}).get("size"),
    }
    print(f"releases built in {time.monotonic() - started:.1f} s: compressed image "
          f"{human(full.image['size'])}, chunk index "
          f"{human(releases['chunk_index'] or 0)}", file=sys.stderr)  # fmt: skip

    phases: list[Phase] = []
    lab = Lab(workdir, args.devices, args.image_mib, workdir / "release-key.pub")
    try:
        with lab.phase("enrollment", phases):
            lab.run_until(lambda: len(lab.api("/api/v1/devices")["devices"]) == args.devices,
                          limit_s=3600)  # fmt: skip
            lab.advance(600)  # the factory's events reach the server
        with lab.phase("idle", phases):
            lab.advance(args.days * DAY_S)
        print(f"idle days done at {time.monotonic() - started:.1f} s", file=sys.stderr)
        with lab.phase("full", phases):
            releases["full"] = lab.roll_out(full)
        with lab.phase("patch", phases):
            releases["patch"] = lab.roll_out(patch)
        print(f"rollouts done at {time.monotonic() - started:.1f} s", file=sys.stderr)
    finally:
        lab.close()
    by_name = {phase.name: phase for phase in phases}
    result = report(by_name, releases, measure_tls(workdir / "tls"), args)
    result["seconds"] = time.monotonic() - started
    print(f"\nreal time {result['seconds']:.1f} s")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--days", type=float, default=1.0, help="simulated idle days")
    parser.add_argument("--image-mib", type=int, default=64)
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON last")
    args = parser.parse_args(argv)
    if not 1 <= args.devices <= 200:
        parser.error("--devices: give 1 to 200")
    if not (math.isfinite(args.days) and 0 < args.days <= 30):
        parser.error("--days: give more than 0, at most 30")
    if not 16 <= args.image_mib <= 4096:
        parser.error("--image-mib: give 16 to 4096")
    parent = args.workdir
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="device-network-", dir=parent) as workdir:
        result = run(args, Path(workdir))
    if args.json:
        print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
