"""Real network faults: a release server in a network namespace behind a veth pair that
nftables cuts and heals, and the user-space fault proxy (latency, a slow link, lost
connections, resets).

The namespace tests need root; without it they are skipped. A missing ``nft`` or ``ip`` fails
them (``make deps`` installs both).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests

from chaos.fault_proxy import FaultProxy, Faults
from chaos.fleet import LabClock, Member, MemberSpec, VirtualFleet
from chaos.http_faults import FlakyHttpServer
from chaos.netlab import (
    INSIDE_LINK,
    NAMESPACE_PREFIX,
    TABLE,
    LabNamespace,
    NetlabUnavailable,
    check_environment,
    lab_namespace,
    sweep,
)
from signing.keyring import trust_key
from tests.chaos.conftest import Releases
from tests.chaos.servers import run
from tests.conftest import require_tools
from updater.client import ServerUnavailableError
from updater.fetch import HttpStream

SERVER_PORT = 8080
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="network namespaces need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
)


@pytest.fixture
def netlab() -> None:
    require_tools(ip=shutil.which("ip") is not None, nft=shutil.which("nft") is not None)
    check_environment()


def python(*args: str) -> list[str]:
    return [sys.executable, "-c", "from fleet_core.cli import main; main()", *args]


class NamespacedServer:
    """``fleet server run`` inside ``namespace``, listening on its end of the veth pair, on
    SQLite in ``data`` (several may share one data directory, as the servers of one fleet)."""

    def __init__(self, namespace: LabNamespace, data: Path, log: Path) -> None:
        self.namespace = namespace
        self.data = data
        self.url = namespace.url(SERVER_PORT)
        self.log = log
        with open(log, "ab") as out:
            self.process = namespace.popen(
                python("server", "run", "--data-dir", str(data), "--host", namespace.address,
                       "--port", str(SERVER_PORT)),
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{log.read_text()}")
            try:
                if requests.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not come up:\n{log.read_text()}")
            time.sleep(0.1)  # poll interval of the wait above, bounded by its deadline


class Site:
    """A server's data directory with the release key trusted, an admin token and an
    enrollment token."""

    def __init__(self, root: Path, releases: Releases) -> None:
        self.data = root / "server"
        trust_key(self.data / "keyring", releases.directory / "release-key.pub")
        self.db_args = ["--data-dir", str(self.data)]
        self.token = ""
        self.enrollment = ""

    def tokens(self) -> None:
        """Made once a server has made the database."""
        self.token = run("server", "token", "create", "--role", "admin", "--name", "lab",
                         *self.db_args).splitlines()[0]  # fmt: skip
        self.enrollment = run(
            "server", "enrollment-token", "create", "--uses", "20", *self.db_args
        ).splitlines()[0]

    def fleet(self, url: str, *args: str) -> str:
        return run(*args, "--server", url, "--token", self.token)

    def events(self, url: str, device_id: str) -> list[dict[str, Any]]:
        answer = requests.get(
            f"{url}/api/v1/devices/{device_id}/events", params={"limit": 1000},
            headers={"Authorization": f"Bearer {self.token}"}, timeout=10,
        )  # fmt: skip
        answer.raise_for_status()
        entries: list[dict[str, Any]] = answer.json()["entries"]
        return entries


def make_fleet(root: Path, site: Site, releases: Releases, urls: list[str], count: int,
               clock: LabClock | None = None) -> VirtualFleet:  # fmt: skip
    return VirtualFleet(
        root / "fleet", [MemberSpec(role="sensor") for _ in range(count)], server_urls=urls,
        server_key=site.data / "server-key.pub",
        release_key=releases.directory / "release-key.pub", enrollment_token=site.enrollment,
        clock=clock,
    )  # fmt: skip


def booted_slot(member: Member) -> str:
    running = member.device.running
    assert running is not None, f"{member.hostname} is not running"
    return running.slot


class RealClock(LabClock):
    """The fleet's clock, running in real time: failover is measured in real seconds."""

    def __call__(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


# --- netlab: namespaces, cuts, clean-up --------------------------------------------------------


def test_environment_check_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetlabUnavailable, match="need root"):
        check_environment()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "nft" else real_which(name))
    with pytest.raises(NetlabUnavailable, match="'nft' command is missing: install nftables"):
        check_environment()


@needs_root
def test_one_way_cuts_and_heal(netlab: None, tmp_path: Path) -> None:
    """A UDP listener in the namespace writes down what reaches it and answers: ``in`` stops
    the datagram, ``out`` only the answer; heal lets both through; a reject refuses a TCP
    connection at once."""
    heard = tmp_path / "heard"
    script = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind((sys.argv[1],9999))\n"
        "while True:\n"
        "    d,a=s.recvfrom(100)\n"
        "    open(sys.argv[2],'ab').write(d+b'\\n')\n"
        "    try: s.sendto(d.upper(),a)\n"
        "    except OSError: pass\n"  # a cut outgoing way: EPERM
    )
    with lab_namespace() as ns:
        ns.popen([sys.executable, "-c", script, ns.address, str(heard)])

        def ping(word: bytes) -> bytes | None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(0.5)
                sock.sendto(word, (ns.address, 9999))
                try:
                    return sock.recv(100)
                except TimeoutError:
                    return None

        def got() -> list[bytes]:
            return heard.read_bytes().split() if heard.exists() else []

        deadline = time.monotonic() + 10
        while ping(b"hello") != b"HELLO":  # the listener may not be bound yet
            assert time.monotonic() < deadline, "the listener in the namespace never answered"
        ns.cut("drop", "in")
        assert ping(b"in") is None and b"in" not in got()
        ns.cut("drop", "out")
        assert ping(b"out") is None
        assert b"out" in got()  # it arrived: only the answer was stopped
        ns.cut("drop", "both")
        assert ping(b"both") is None and b"both" not in got()
        assert f'iifname "{INSIDE_LINK}" drop' in ns.rules()
        ns.heal()
        assert TABLE not in ns.rules()
        assert ping(b"healed") == b"HEALED"
        ns.cut("reject")
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((ns.address, 9999), timeout=5)
        assert time.monotonic() - started < 1.0  # a reset, not a timeout
        with pytest.raises(ValueError, match="reject or drop"):
            ns.cut("sideways")  # type: ignore[arg-type]


@needs_root
def test_a_namespace_is_gone_after_a_crash_and_leftovers_are_swept(netlab: None) -> None:
    from pyroute2 import IPRoute, netns

    with pytest.raises(RuntimeError, match="crash"), lab_namespace() as ns:
        name, link = ns.name, ns.host_link
        child = ns.popen(["sleep", "600"])
        raise RuntimeError("crash")
    assert name not in netns.listnetns()
    with IPRoute() as ipr:
        assert not ipr.link_lookup(ifname=link)
    assert child.poll() is not None
    # a run killed outright, with a process running in its namespace: the next run sweeps
    killed = subprocess.Popen(
        [sys.executable, "-c", (
            "import signal, sys, time\n"
            "from chaos.netlab import lab_namespace\n"
            "with lab_namespace() as ns:\n"
            "    inner = ns.popen(['sleep', '600'])\n"
            "    print(ns.name, ns.host_link, inner.pid, flush=True)\n"
            "    time.sleep(600)\n"
        )],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert killed.stdout is not None
    name, link, inner = killed.stdout.readline().split()
    killed.kill()
    killed.wait()
    assert name in netns.listnetns()  # nothing cleaned up after SIGKILL
    mine = f"{NAMESPACE_PREFIX}{os.getpid()}-999"  # a live run's: never swept
    netns.create(mine)
    try:
        swept = sweep()
        assert name in swept  # its veth pair went with it
        assert name not in netns.listnetns() and mine in netns.listnetns()
        with IPRoute() as ipr:
            assert not ipr.link_lookup(ifname=link)
        deadline = time.monotonic() + 5
        while _alive(int(inner)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(int(inner)), "the process left in the namespace still runs"
    finally:
        netns.remove(mine)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie whose parent has not reaped it yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- a real server across the veth -------------------------------------------------------------


@needs_root
def test_checkin_fails_across_a_cut_and_works_after_heal(
    netlab: None, tmp_path: Path, releases: Releases
) -> None:
    site = Site(tmp_path, releases)
    with lab_namespace() as ns:
        server = NamespacedServer(ns, site.data, tmp_path / "server.log")
        site.tokens()
        fleet = make_fleet(tmp_path, site, releases, [server.url], 1)
        (member,) = fleet.members
        client = member.daemon.client
        fleet.run_until(lambda: member.daemon.last_checkin is not None, limit_s=300)
        assert client.checkin().server_url == server.url

        ns.cut("reject")
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError, match="no answer to POST"):
            client.checkin()
        refused_s = time.monotonic() - started
        ns.cut("drop")
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError, match="no answer to POST"):
            client.checkin()
        dropped_s = time.monotonic() - started
        print(f"check-in across a reject: failed in {refused_s:.3f} s; "
              f"across a drop: {dropped_s:.2f} s (timeout {client.timeout_s} s)")  # fmt: skip
        assert refused_s < 1.0
        assert client.timeout_s - 0.5 <= dropped_s <= client.timeout_s + 2.0

        ns.heal()
        assert client.checkin().server_url == server.url
        fleet.step(3600)
        assert member.daemon.last_error is None


@needs_root
def test_failover_to_the_second_server_when_the_first_is_dropped(
    netlab: None, tmp_path: Path, releases: Releases
) -> None:
    site = Site(tmp_path, releases)
    with lab_namespace() as first_ns, lab_namespace() as second_ns:
        first = NamespacedServer(first_ns, site.data, tmp_path / "first.log")
        site.tokens()
        second = NamespacedServer(second_ns, site.data, tmp_path / "second.log")
        fleet = make_fleet(tmp_path, site, releases, [first.url, second.url], 1, RealClock())
        (member,) = fleet.members
        member.daemon.checkin_interval_s = 1.0
        member.daemon.heartbeat_interval_s = 1.0

        def reached(url: str) -> bool:
            last = member.daemon.last_checkin
            return last is not None and last.server_url == url and member.daemon.last_error is None

        fleet.run_until(lambda: reached(first.url), limit_s=60, step_s=0.2)
        first_ns.cut("drop")
        cut_at = time.monotonic()
        member.daemon.last_checkin = None
        fleet.run_until(lambda: reached(second.url), limit_s=60, step_s=0.2)
        failover_s = time.monotonic() - cut_at
        print(f"failover across a dropping partition: {failover_s:.1f} s "
              f"(failover_after_s {member.daemon.client.failover_after_s})")  # fmt: skip
        assert failover_s <= 30.0
        assert member.daemon.client.active_url == second.url


@needs_root
def test_a_day_long_partition_keeps_releases_and_events_and_catches_up(
    netlab: None, tmp_path: Path, releases: Releases
) -> None:
    """Four devices lose their server for 24 simulated hours (a rejecting cut, so each try
    fails at once): nothing installs, and the events they log wait in the outbox; after the
    heal they deliver them and follow the assignment made during the partition.

    The updater itself queues nothing while the server is away (its reports of the outage
    are kept locally only), so a day of one event an hour fits the outbox (1,000 events) with
    room to spare. The fourth device's outbox is made to hold only 20, to check what the
    outbox documents for an outage that outlasts it: the oldest events are dropped and
    counted, the newest are kept and delivered."""
    site = Site(tmp_path, releases)
    with lab_namespace() as ns:
        server = NamespacedServer(ns, site.data, tmp_path / "server.log")
        site.tokens()
        site.fleet(server.url, "release", "upload", str(releases.bundle("2.0.0")))
        fleet = make_fleet(tmp_path, site, releases, [server.url], 4)
        members = fleet.members
        small = members[3]
        small.daemon.outbox.limit = 20
        fleet.run_until(
            lambda: all(m.daemon.last_checkin is not None for m in members), limit_s=600
        )
        fleet.run_until(lambda: all(m.daemon.outbox.counts()[0] == 0 for m in members),
                        limit_s=600)  # fmt: skip
        booted = {m.device_id: booted_slot(m) for m in members}
        started = time.monotonic()

        ns.cut("reject")
        # assigned on the server meanwhile, by an operator on its side of the cut
        for member in members:
            ns.run(python("device", "assign", member.device_id, "2.0.0", "--server", server.url,
                          "--token", site.token), check=True, capture_output=True)  # fmt: skip
        for hour in range(24):
            for member in members:  # what a device's own checks would report while cut off
                member.daemon.log.event("lab.partition_hour", hour=hour)
            for _ in range(12):
                fleet.step(300)
        assert fleet.installs_started() == 0
        queued = [m.daemon.outbox.counts()[0] for m in members]
        expected = {m.device_id: list(range(24)) for m in members}
        expected[small.device_id] = list(range(4, 24))
        for member in members:
            assert member.version == "1.0.0"
            assert booted_slot(member) == booted[member.device_id]
            assert member.daemon.last_error is not None  # it did try, and failed
            waiting, _, dropped = member.daemon.outbox.counts()
            kept = [e for e in member.daemon.outbox.pending(1000)
                    if e.event == "lab.partition_hour"]  # fmt: skip
            assert waiting == len(expected[member.device_id])  # nothing but the lab's events
            assert dropped == (4 if member is small else 0)
            assert [e.fields["hour"] for e in kept] == expected[member.device_id]
        partition_s = time.monotonic() - started

        ns.heal()
        fleet.run_until(lambda: fleet.versions()["2.0.0"] == 4, limit_s=3600)
        fleet.run_until(lambda: all(m.daemon.outbox.counts()[0] == 0 for m in members),
                        limit_s=600)  # fmt: skip
        for member in members:
            entries = site.events(server.url, member.device_id)
            hours = [e["details"]["fields"]["hour"] for e in entries
                     if e["action"] == "lab.partition_hour"]  # fmt: skip
            assert hours == expected[member.device_id], member.hostname
        print(f"24 simulated hours of partition took {partition_s:.1f} s of real time; "
              f"events queued per device at its end: {queued} (one an hour logged by the lab; "
              f"outbox cap {members[0].daemon.outbox.limit}, 20 for the last)")  # fmt: skip


# --- the fault proxy -----------------------------------------------------------------------


@pytest.fixture
def files() -> Iterator[FlakyHttpServer]:
    data = bytes(range(256)) * 1200  # 307,200 bytes
    with FlakyHttpServer({"/small": b"ok", "/big": data}) as server:
        yield server


def base(server: FlakyHttpServer) -> str:
    return server.url("").rstrip("/")


def test_latency_and_a_slow_link_are_measured(files: FlakyHttpServer) -> None:
    with FaultProxy(base(files)) as proxy:
        started = time.monotonic()
        assert requests.get(proxy.url + "/small", timeout=5).content == b"ok"
        plain_s = time.monotonic() - started
        proxy.set(latency_s=0.25)
        started = time.monotonic()
        assert requests.get(proxy.url + "/small", timeout=5).content == b"ok"
        latent_s = time.monotonic() - started
        proxy.set(latency_s=0.0, rate_bps=200_000)
        started = time.monotonic()
        body = requests.get(proxy.url + "/big", timeout=10).content
        slow_s = time.monotonic() - started
        print(f"plain {plain_s:.3f} s; 0.25 s latency: {latent_s:.3f} s; "
              f"{len(body)} B at 200 kB/s: {slow_s:.2f} s")  # fmt: skip
        assert body == files.files["/big"]
        assert latent_s >= 0.5 > plain_s  # the request and its answer each waited
        assert slow_s >= len(body) / 200_000
        counters = proxy.counters()
        assert counters.delayed >= 2 and counters.paced_bytes >= len(body)
        with pytest.raises(ValueError, match="rate_bps"):
            proxy.set(rate_bps=0)
        with pytest.raises(ValueError, match="unknown fault setting"):
            proxy.set(jitter=1)


def test_a_reset_after_n_bytes_and_a_ranged_resume(files: FlakyHttpServer) -> None:
    """Each connection is reset after 100,000 bytes: the stream resumes with a Range request
    until it has every byte. (It reads 64 KiB at a time and a broken read keeps nothing, so
    a link that breaks before 64 KiB of body would make no progress at all.)"""
    data = files.files["/big"]
    with FaultProxy(base(files), Faults(reset_after=100_000)) as proxy:
        response = requests.get(proxy.url + "/big", timeout=5, stream=True)
        received = bytearray()
        with pytest.raises(requests.exceptions.ChunkedEncodingError) as caught:
            for chunk in response.iter_content(4096):
                received += chunk
        assert "reset" in str(caught.value).lower()
        assert len(received) < 100_000 and data.startswith(bytes(received))
        assert proxy.counters().resets == 1
        with HttpStream(proxy.url + "/big", backoff_s=0.01, max_backoff_s=0.05,
                        retries=20) as stream:  # fmt: skip
            fetched = b"".join(iter(lambda: stream.read(65536), b""))
            resumes = stream.resumes
        assert fetched == data
        assert resumes >= len(data) // 100_000
        assert proxy.counters().resets >= 1 + len(data) // 100_000


def outcomes(proxy: FaultProxy, count: int) -> list[bool]:
    """Whether each of ``count`` requests, one after another, was answered."""
    answered = []
    for _ in range(count):
        try:
            answered.append(requests.get(proxy.url + "/small", timeout=2).content == b"ok")
        except requests.ConnectionError:
            answered.append(False)
    return answered


def test_loss_with_a_seed_is_repeatable(files: FlakyHttpServer) -> None:
    lossy = Faults(loss=0.5, loss_mode="drop")
    with ExitStack() as stack:
        one, two, other = (stack.enter_context(FaultProxy(base(files), lossy, seed=seed))
                           for seed in (7, 7, 8))  # fmt: skip
        first, second, third = outcomes(one, 24), outcomes(two, 24), outcomes(other, 24)
    assert first == second
    assert first != third
    assert 0 < first.count(False) < 24
    assert one.counters().dropped == first.count(False)


def test_a_stalled_connection_makes_the_client_time_out(files: FlakyHttpServer) -> None:
    with FaultProxy(base(files), Faults(loss=1.0, loss_mode="stall", stall_s=30)) as proxy:
        started = time.monotonic()
        with pytest.raises(requests.Timeout):
            requests.get(proxy.url + "/small", timeout=0.5)
        assert time.monotonic() - started >= 0.5
        assert proxy.counters().stalled == 1
        proxy.set(loss=0.0)
        assert requests.get(proxy.url + "/small", timeout=5).content == b"ok"
        proxy.set(loss=1.0)
        host, port = proxy.url.removeprefix("http://").split(":")
        held = socket.create_connection((host, int(port)), timeout=5)
        deadline = time.monotonic() + 5
        while proxy.counters().stalled < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
    # closing the proxy reset the connection still stalled, without waiting for its stall_s
    assert time.monotonic() - started < 2.0
    with held, pytest.raises(ConnectionResetError):
        held.recv(10)


def test_connections_beyond_the_bound_wait_for_a_slot(files: FlakyHttpServer) -> None:
    with FaultProxy(base(files), max_connections=2) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(2)]
        deadline = time.monotonic() + 5
        while len(proxy.connections()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(requests.Timeout):
            requests.get(proxy.url + "/small", timeout=1)  # queued behind the two held
        for sock in held:
            sock.close()
        assert requests.get(proxy.url + "/small", timeout=5).content == b"ok"


def test_the_proxy_still_counts_bytes(files: FlakyHttpServer) -> None:
    with FaultProxy(base(files), Faults(latency_s=0.01)) as proxy:
        proxy.label = "dev"
        requests.get(proxy.url + "/small", timeout=5)
        exchanges = proxy.exchanges()
    assert [(e.label, e.method, e.target, e.status) for e in exchanges] == [
        ("dev", "GET", "/small", 200)
    ]
    assert exchanges[0].down > len(b"ok")
    assert json.dumps(proxy.totals())
