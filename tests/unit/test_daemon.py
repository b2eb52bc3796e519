"""The updater daemon: its decision table, the heartbeat, the persistent outbox, systemd
notifications, and, on a virtual device against the server simulator, what only the simulator
can stage: an assignment the real server would refuse to make, blobs missing or corrupted, a
release withdrawn in the middle of its download, outages, a failing events endpoint, a server
that forgot the device, check-in intervals no real server sends.

Enrollment, installs end to end, events resent after a lost acknowledgement and the other
install decisions are tested against the real server: tests/integration/test_device_protocol.py."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import chaos.lab_firmwares  # noqa: F401 (fills LAB_FIRMWARES)
from bootloader_hooks.base import BootCause, BootEvent
from chaos.virtual_device import BootRecord, VirtualDevice
from server import schemas
from signing.keyring import Keyring, trust_key
from signing.keys import SigningKey
from tests.chaos.conftest import Releases, provision_template
from tests.server_simulator import FakeClock, ServerSimulator, SimRelease
from tests.unit.conftest import ADMISSION
from updater.cli import main
from updater.client import Assignment, ServerClient
from updater.config import LoadedConfig, parse_config
from updater.daemon import Daemon
from updater.decision import decide
from updater.errors import ConfigError
from updater.heartbeat import heartbeat_document
from updater.history import ReleaseHistory, ReleaseRecord
from updater.identity import load_or_create_identity
from updater.log import EventLog
from updater.outbox import Outbox, OutboxLog
from updater.state import DeviceState, SlotState
from updater.systemd import SystemdNotifier

# --- the lab --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, releases: Releases) -> Path:
    """A provisioned GRUB device running 1.0.0 from slot a: copied, never used."""
    return provision_template(tmp_path_factory.mktemp("template"), "grub", releases)


class Lab:
    """One virtual device, the server simulator, and a fake clock shared by both sides."""

    def __init__(
        self, root: Path, server: ServerSimulator, server_key: SigningKey, releases: Releases
    ) -> None:
        self.server = server
        self.releases = releases
        self.clock = FakeClock()
        keyring = root / "server-keyring"
        trust_key(keyring, server_key_pub(server_key, root))
        self.device = VirtualDevice(root, "grub")
        self.device.config = dataclasses.replace(
            self.device.config,
            server_urls=(server.url,),
            server_keyring=keyring,
            enrollment_token=ADMISSION,
        )
        self.identity = load_or_create_identity(self.device.config.data_dir)[0]
        self.device_id = self.identity.device_id

    def daemon(self, **options: Any) -> Daemon:
        config = self.device.config
        assert config.server_keyring is not None
        client = ServerClient(
            config.server_urls, self.identity.key, Keyring.load(config.server_keyring),
            clock=self.clock, rng=lambda: 0.5, timeout_s=2.0,
        )  # fmt: skip
        return Daemon(
            self.device.runtime(), client, self.clock, self.clock.sleep, lambda: 0.5,
            hostname="lab-device", wall_clock=lambda: 1.7e9, **options,
        )  # fmt: skip

    def release(self, version: str, behaviour: str = "healthy", **options: Any) -> SimRelease:
        bundle = self.releases.bundle(version, behaviour, **options)
        return self.server.add_bundle(bundle, version=version)

    def reboot(self) -> list[BootRecord]:
        assert self.device.pending_reboot is not None, "no reboot was asked for"
        return self.device.settle(BootEvent(BootCause.REBOOT, tuple(self.device.pending_reboot)))

    def server_events(self) -> list[dict[str, Any]]:
        events = self.server.devices[self.device_id].events
        return [events[seq] for seq in sorted(events)]

    def names(self) -> list[str]:
        return [e["event"] for e in self.server_events()]

    def heartbeats(self) -> list[dict[str, Any]]:
        return self.server.devices[self.device_id].heartbeats

    def slot(self, name: str) -> SlotState:
        return self.device.state().slot(name)

    def local(self, name: str) -> list[dict[str, Any]]:
        return self.device.events(name)


def server_key_pub(key: SigningKey, root: Path) -> Path:
    from signing.keys import public_key_pem

    path = root / "server.pub"
    path.write_bytes(public_key_pem(key.public_key))
    return path


@pytest.fixture
def lab(
    tmp_path: Path, template: Path, server: ServerSimulator, server_key: SigningKey,
    releases: Releases,
) -> Lab:  # fmt: skip
    root = tmp_path / "device"
    shutil.copytree(template, root)
    return Lab(root, server, server_key, releases)


# --- installs that go wrong ------------------------------------------------------------------


def test_an_install_that_fails_is_not_retried(lab: Lab) -> None:
    release = lab.release("2.0.0", compatible="another-device")
    lab.server.assign(lab.device_id, release)
    daemon = lab.daemon()
    daemon.run_once()
    lab.clock.now += 61
    daemon.run_once()
    assert len(lab.local("install.started")) == 1
    failed = [e for e in lab.server_events() if e["event"] == "daemon.release_failed"]
    assert len(failed) == 1 and "another-device" in failed[0]["fields"]["reason"]
    assert lab.slot("a").status == "good" and lab.device.pending_reboot is None


def test_a_download_that_fails_is_retried_later_and_the_device_keeps_its_release(
    lab: Lab,
) -> None:
    release = lab.release("2.0.0")
    [sha] = release.image_blobs
    blob = lab.server.blobs.pop(sha)
    lab.server.assign(lab.device_id, release)
    daemon = lab.daemon()
    daemon.run_once()
    assert lab.local("daemon.install_retry") and lab.device.pending_reboot is None
    assert lab.slot("a").status == "good"
    lab.server.blobs[sha] = blob
    lab.clock.now += 61  # the next check-in is within the retry delay: nothing yet
    daemon.run_once()
    assert len(lab.local("install.started")) == 1
    lab.clock.now += 120
    daemon.run_once()
    assert len(lab.local("install.started")) == 2 and lab.device.pending_reboot is not None
    assert lab.reboot()[-1].action == "committed"


def test_blob_bytes_that_do_not_match_are_fetched_again_later(lab: Lab) -> None:
    """A mirror or proxy that serves wrong bytes once must not cost the device the release:
    the manifest is signed, so the bytes, not the release, were at fault."""
    release = lab.release("2.0.0")
    [sha] = release.image_blobs
    good = lab.server.blobs[sha]
    lab.server.blobs[sha] = good[:-1] + bytes([good[-1] ^ 1])
    lab.server.assign(lab.device_id, release)
    daemon = lab.daemon()
    daemon.run_once()
    assert lab.local("daemon.install_retry") and lab.device.pending_reboot is None
    assert not lab.local("daemon.release_failed")
    lab.server.blobs[sha] = good
    lab.clock.now += 200
    daemon.run_once()
    assert lab.device.pending_reboot is not None
    assert lab.reboot()[-1].action == "committed"


def test_an_undecodable_field_is_escaped_for_the_wire() -> None:
    """A lone surrogate (an undecodable file name in an error) is not UTF-8: sent as it is,
    the server would refuse the whole batch of events it travels in."""
    from updater.outbox import _plain

    wire = _plain({"error": "cannot open /data/\udcff.img", "nul": "a\0b"})
    json.dumps(wire, ensure_ascii=False).encode("utf-8")
    assert wire == {"error": "cannot open /data/\\udcff.img", "nul": "a\\0b"}


HOSTILE = "a\x1b[2J\x9b31m\u2028b\u202ec\nd\te\u200b\ue000"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_every_event_field_is_text_the_server_accepts(text: str) -> None:
    """A control, format or separator character in one event field (tool output, a file
    name) would make the server refuse the whole batch of events it travels in."""
    from updater.outbox import _wire_fields

    wire = _wire_fields("info", {"error": text, text: [text, {"k": text}]})
    body = json.dumps({"events": [{"event": "install.failed", "seq": 1, "fields": wire}]})
    schemas.parse(schemas.EventsRequest, body.encode())


def test_a_hostile_field_is_sent_as_visible_escapes() -> None:
    from updater.outbox import _plain

    assert _plain({"error": HOSTILE}) == {
        "error": "a\\x1b[2J\\x9b31m\\u2028b\\u202ec\\nd\\te\\u200b\\ue000"
    }


def test_a_hostile_version_in_the_state_file_still_makes_a_heartbeat_the_server_accepts(
    lab: Lab,
) -> None:
    snapshot = lab.device.runtime().snapshot()
    slots = {**snapshot["slots"], "a": {**snapshot["slots"]["a"], "version": HOSTILE}}
    document = heartbeat_document(
        {**snapshot, "slots": slots}, health=[(HOSTILE, True)], temperature_c=None,
        free_space_mb=None, uptime_s=None, clock=0.0, clock_skew_s=None,
    )  # fmt: skip
    schemas.parse(schemas.Heartbeat, json.dumps(document).encode())
    assert document["version"] == document["slots"]["a"]["version"]
    assert document["version"].startswith("a\\x1b[2J")


# --- outages and the outbox -------------------------------------------------------------------


def test_through_an_outage_the_device_keeps_its_release_and_resyncs_after(lab: Lab) -> None:
    daemon = lab.daemon()
    lab.clock.sleep(daemon.run_once())
    lab.server.faults.down = True
    delays = []
    start = lab.clock.now
    while lab.clock.now - start < 3 * 3600:
        delays.append(daemon.run_once())
        lab.clock.sleep(delays[-1])
        assert len(delays) < 200
    # full jitter (the lab's dice always roll 0.5): half of 1, 2, 4, ... up to the 300 s cap
    assert delays[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0] and max(delays) == 150
    assert daemon.last_error is not None and "no answer" in daemon.last_error
    assert len(lab.local("daemon.server_unreachable")) == 1
    # meanwhile a release was assigned; the device stayed on its own
    lab.server.assign(lab.device_id, lab.release("2.0.0"))
    assert lab.slot("b").status == "empty" and lab.device.pending_reboot is None
    lab.server.faults.down = False
    lab.clock.sleep(daemon.run_once())
    daemon.run_once()
    assert daemon.last_error is None and lab.local("daemon.server_back")
    assert lab.device.pending_reboot is not None
    assert "daemon.server_unreachable" not in lab.names()  # kept local: news of its own outage


def test_a_failing_events_endpoint_does_not_stop_check_ins(lab: Lab) -> None:
    daemon = lab.daemon()
    daemon.run_once()
    daemon.log.event("install.started", source="queued")
    checkins = lab.server.devices[lab.device_id].checkins
    lab.server.faults.next_statuses.append(503)  # the queued events are refused first
    lab.clock.now += 61
    daemon.run_once()
    assert lab.server.devices[lab.device_id].checkins == checkins + 1
    assert "install.started" in lab.names()  # sent again at the end of the same step


def test_a_device_the_server_forgot_enrolls_again(lab: Lab) -> None:
    daemon = lab.daemon()
    daemon.run_once()
    lab.server.forget_devices()
    lab.clock.now += 61
    daemon.run_once()
    assert lab.local("daemon.enrollment_lost")
    lab.clock.sleep(daemon.run_once() or 1.0)
    daemon.run_once()
    assert lab.device_id in lab.server.devices and daemon.last_error is None
    assert lab.heartbeats()


def test_the_server_table_of_the_configuration(tmp_path: Path) -> None:
    required = b'compatible = "metrica-rpi4"\nkeyring = "/etc/fleet/keyring"\n'
    text = (
        required
        + b"""
[server]
urls = ["https://fleet.example.net/", "https://fleet-2.example.net"]
keyring = "/etc/fleet/server-keyring"
mirrors = ["https://cdn.example.net/fleet"]
enrollment_token = " tok "
checkin_interval_s = 30
heartbeat_interval_s = 15.5
failover_after_s = 20
"""
    )
    config = parse_config(text, "updater.toml")
    assert config.server_urls == ("https://fleet.example.net", "https://fleet-2.example.net")
    assert config.server_keyring == Path("/etc/fleet/server-keyring")
    assert config.server_mirrors == ("https://cdn.example.net/fleet",)
    assert config.enrollment_token == "tok"  # noqa: S105 (a test value)
    assert (config.checkin_interval_s, config.heartbeat_interval_s) == (30.0, 15.5)
    assert config.failover_after_s == 20.0
    defaults = parse_config(required, "x")
    assert (defaults.checkin_interval_s, defaults.heartbeat_interval_s) == (60.0, 60.0)
    assert defaults.failover_after_s == 30.0 and defaults.server_keyring is None
    for bad, message in [
        (b"[server]\nmirrors = ['ftp://x']", "server.mirrors"),
        (b"[server]\ncheckin_interval_s = 0", "must be a number above 0"),
        (b"[server]\nfailover_after_s = inf", "must be a number above 0"),
        (b"[server]\nheartbeat_interval_s = true", "must be int or float"),
        (b"[server]\nenrollment_token = ' '", "must not be empty"),
        (b"[server]\nkeyring = 3", "server.keyring"),
        (b"[server]\nsurprise = 1", "unknown setting"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config(bad, "x")


def test_while_a_rollout_is_active_the_server_sets_a_shorter_checkin_interval(lab: Lab) -> None:
    asked: list[Any] = [15]
    lab.server.answer_hook = lambda document: {**document, "checkin_interval_s": asked[0]}
    daemon = lab.daemon()
    assert daemon.run_once() == pytest.approx(15.0)  # jitter at its middle (rng 0.5)
    assert daemon.checkin_every_s == 15.0
    # never below the floor, never above the device's own setting
    for value, expected in ((1, 5.0), (600, 60.0), (None, 60.0)):
        asked[0] = value
        lab.clock.now += 120
        lab.server.forget_etags()
        daemon.run_once()
        assert daemon.checkin_every_s == expected, value
    asked[0] = "soon"
    lab.clock.now += 120
    lab.server.forget_etags()
    daemon.run_once()
    assert daemon.last_error is not None and "checkin_interval_s" in daemon.last_error


def test_a_download_in_progress_is_abandoned_when_the_server_withdraws_the_release(
    lab: Lab,
) -> None:
    release = lab.release("2.0.0")
    lab.server.assign(lab.device_id, release)

    def emergency_stop(path: str) -> None:  # while the blob is being fetched
        lab.server.assign(lab.device_id, None)
        lab.clock.now += 120  # a check-in is due
        lab.server.blob_hook = None

    lab.server.blob_hook = emergency_stop
    daemon = lab.daemon()
    daemon.run_once()
    assert lab.device.pending_reboot is None
    assert lab.slot("b").status == "bad"  # half written: never bootable
    assert lab.slot("a").status == "good"
    names = lab.names()
    assert "install.abandoned" in names and "daemon.install_abandoned" in names
    assert "install.failed" not in names  # not the release's fault: nothing counts against it
    # assigned again later, it installs
    lab.server.assign(lab.device_id, release)
    lab.clock.now += 120
    daemon.run_once()
    assert (lab.slot("b").status, lab.slot("b").bundle_sha256) == ("trial", release.manifest_sha256)


# --- the decision table -----------------------------------------------------------------------

SHA = "5" * 64


def assignment(sha: str = SHA) -> Assignment:
    class Fixed(Assignment):
        @property
        def manifest_sha256(self) -> str:
            return sha

    return Fixed(1, "2.0.0", 1, b"m", b"s", ())


def state(b: SlotState | None = None, *, suspended: str | None = None) -> DeviceState:
    good = SlotState(status="good", version="1.0.0", bundle_sha256="1" * 64)
    return DeviceState(slots={"a": good, "b": b or SlotState()}, suspended=suspended)


def b_holds(status: str, sha: str = SHA) -> DeviceState:
    return state(SlotState(status, "2.0.0", sha, security_version=1))


def history(outcome: str | None = None, interrupted: int = 0) -> ReleaseHistory:
    if outcome is None:
        return ReleaseHistory()
    return ReleaseHistory({SHA: ReleaseRecord(outcome, "2.0.0", interrupted=interrupted)})


NEW = assignment()


@pytest.mark.parametrize(
    ("situation", "action", "fail"),
    [
        ((None, state(), "a", False, history()), "none", False),
        ((assignment("1" * 64), state(), "a", False, history()), "none", False),
        ((NEW, state(), "a", False, history()), "install", False),
        ((NEW, state(), "a", False, history("failed")), "skip", False),
        ((NEW, state(suspended="crash loop"), "a", False, history()), "skip", False),
        ((NEW, state(), "safe", False, history()), "recover", False),
        ((NEW, state(suspended="crash loop"), "safe", False, history()), "recover", False),
        ((NEW, state(), "safe", False, history("armed")), "skip", True),
        ((NEW, state(), "safe", False, history("failed")), "skip", False),
        ((NEW, state(), "a", True, history()), "skip", False),
        ((NEW, b_holds("trial"), "a", False, history()), "skip", False),
        ((NEW, b_holds("good"), "a", False, history()), "flip", False),
        ((NEW, b_holds("bad"), "a", False, history()), "skip", True),
        ((NEW, b_holds("bad"), "a", False, history("armed")), "skip", True),
        ((NEW, b_holds("bad"), "a", False, history("interrupted", 1)), "install", False),
        ((NEW, b_holds("bad"), "a", False, history("interrupted", 3)), "skip", True),
        ((NEW, b_holds("bad"), "a", False, history("download_failed")), "install", False),
        ((NEW, b_holds("installing"), "a", False, history("installing")), "install", False),
        ((NEW, b_holds("bad", "9" * 64), "a", False, history()), "install", False),
    ],
)
def test_what_is_done_with_an_assignment(situation: Any, action: str, fail: bool) -> None:
    decision = decide(*situation)
    assert (decision.action, decision.fail) == (action, fail), decision.reason


def test_a_flip_below_the_installed_security_version_is_refused() -> None:
    device = dataclasses.replace(
        state(SlotState("good", "2", SHA, security_version=1)), installed_security_version=2
    )
    decision = decide(assignment(), device, "a", False, history())
    assert (decision.action, decision.fail) == ("skip", True)


# --- the heartbeat ------------------------------------------------------------------------------


def test_the_heartbeat_is_what_the_server_accepts(lab: Lab) -> None:
    snapshot = lab.device.runtime().snapshot()
    document = heartbeat_document(
        snapshot, health=[("systemd:camera.service", True), ("x" * 300, False)],
        temperature_c=51.2, free_space_mb=2048, uptime_s=86400.5, clock=1.7e9,
        clock_skew_s=-3.2,
    )  # fmt: skip
    assert document["version"] == "1.0.0" and document["booted"] == "a"
    assert len(document["health"][1]["name"]) == 128
    unknown = heartbeat_document(
        {**snapshot, "booted": None, "primary": None, "bootloader_problem": "x"}, health=[],
        temperature_c=None, free_space_mb=None, uptime_s=None, clock=0.0, clock_skew_s=None,
    )  # fmt: skip
    assert (unknown["booted"], unknown["primary"], unknown["version"]) == ("unknown",) * 2 + (None,)
    for doc in (document, unknown):
        schemas.parse(schemas.Heartbeat, json.dumps(doc).encode())


# --- outbox -----------------------------------------------------------------------------------


def test_the_outbox_numbers_keeps_and_forgets_events(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.jsonl", limit=3, wall_clock=lambda: 0.0)
    assert [outbox.append("a.b", {"n": n}) for n in range(5)] == [1, 2, 3, 4, 5]
    assert [e.seq for e in outbox.pending()] == [3, 4, 5]
    assert outbox.counts() == (3, 6, 2)
    outbox.ack(4)
    reopened = Outbox(tmp_path / "outbox.jsonl")
    assert [e.to_wire() for e in reopened.pending()] == [
        {"event": "a.b", "seq": 5, "fields": {"n": 4}}
    ]
    reopened.ack(5)
    assert reopened.append("c.d", {}) == 6  # numbering survives an empty outbox


def test_a_new_outbox_numbers_from_the_clock_so_the_server_never_sees_a_step_back(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.jsonl"
    assert Outbox(path, wall_clock=lambda: 1_700_000_000.5).append("a.b", {}) == 1_700_000_000_500
    path.unlink()  # removed to make room on a full disk: numbers go on from the clock
    assert Outbox(path, wall_clock=lambda: 1_700_000_060.0).append("a.b", {}) == 1_700_000_060_000
    assert Outbox(path, wall_clock=lambda: float("nan")).append("a.b", {}) == 1_700_000_060_001


def test_a_damaged_outbox_is_set_aside_and_numbering_continues_above_it(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"
    outbox = Outbox(path, wall_clock=lambda: 0.0)
    for n in range(7):
        outbox.append("a.b", {"n": n})
    outbox.ack(3)
    path.write_bytes(path.read_bytes()[:-30])
    again = Outbox(path, wall_clock=lambda: 0.0)
    assert again.append("c.d", {}) == 8  # the header, still legible, said 8 comes next
    path.write_bytes(b'{"format": 1, "next_s\n{"seq": 41, "event": "a.b", "fi')
    assert Outbox(path, wall_clock=lambda: 0.0).append("c.d", {}) == 42
    assert again.problem is not None and "damaged" in again.problem
    assert (tmp_path / "outbox.jsonl.damaged").exists()


def test_appends_from_several_threads_get_distinct_numbers(tmp_path: Path) -> None:
    seqs: list[int] = []
    outboxes = [Outbox(tmp_path / "outbox.jsonl", wall_clock=lambda: 0.0) for _ in range(4)]

    def work(outbox: Outbox) -> None:
        for _ in range(10):
            seqs.append(outbox.append("a.b", {}))

    threads = [threading.Thread(target=work, args=(o,)) for o in outboxes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seqs) == list(range(1, 41))


def test_the_tee_keeps_what_the_server_should_see_and_never_raises(tmp_path: Path) -> None:
    inner = EventLog(io.StringIO(), keep=True)
    outbox = Outbox(tmp_path / "outbox.jsonl")
    log = OutboxLog(inner, outbox)
    log.event("install.failed", level="error", error=ValueError("bad\0byte"), path=tmp_path)
    log.event("install.progress", level="debug", bytes=1)
    log.event("daemon.server_unreachable", level="warning", error="x")
    log.event("x.big", text="y" * 20_000)
    [failed, big] = outbox.pending()
    assert failed.fields == {"level": "error", "error": "bad\\0byte", "path": str(tmp_path)}
    assert set(big.fields) == {"level", "truncated"}
    broken = OutboxLog(inner, Outbox(tmp_path / "outbox.jsonl" / "not-a-dir" / "o.jsonl"))
    broken.event("install.started", source="x")
    assert inner.events[-1]["event"] == "outbox.write_failed"


# --- systemd ----------------------------------------------------------------------------------


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, Callable[[], list[str]]]]:
    name = f"@fleet-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:])
    sock.setblocking(False)

    def received() -> list[str]:
        messages = []
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                return messages

    try:
        yield name, received
    finally:
        sock.close()


def test_run_forever_tells_systemd_ready_then_feeds_the_watchdog(
    lab: Lab, notify_socket: tuple[str, Callable[[], list[str]]]
) -> None:
    name, received = notify_socket
    notifier = SystemdNotifier.from_environment(
        {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "300000000"}, pid=1
    )
    assert notifier.watchdog_interval_s == 150
    daemon = lab.daemon(notifier=notifier)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        lab.clock.sleep(seconds)
        if len(sleeps) == 3:
            daemon.stop()

    daemon._sleep = sleep
    restarts = len(lab.device.state().restarts)
    daemon.run_forever()
    messages = received()
    assert messages[0].startswith("READY=1\nSTATUS=server http://127.0.0.1:")
    assert [m.split("\n")[0] for m in messages[1:]] == ["WATCHDOG=1"] * 3 + ["STOPPING=1"]
    assert "event(s) queued" in messages[1]
    assert len(lab.device.state().restarts) == restarts + 1  # the crash-loop guard counted it
    assert all(0 < s <= 150 for s in sleeps)


def test_the_watchdog_is_fed_during_a_long_task_and_not_without_systemd(
    notify_socket: tuple[str, Callable[[], list[str]]],
) -> None:
    name, received = notify_socket
    notifier = SystemdNotifier(name, watchdog_usec=20_000)
    with notifier.keep_alive(limit_s=10):
        threading.Event().wait(0.1)
    assert received().count("WATCHDOG=1") >= 3
    with notifier.keep_alive(limit_s=0.0):
        threading.Event().wait(0.05)
    assert received() == []
    assert not SystemdNotifier(None).ready("x")
    other = SystemdNotifier.from_environment(
        {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}, pid=2
    )
    assert other.watchdog_interval_s is None  # the watchdog is another process's


# --- the command ------------------------------------------------------------------------------


def test_fleet_updater_daemon_once(lab: Lab) -> None:
    config = lab.device.root / "updater.toml"
    keyring = lab.device.config.server_keyring
    config.write_text(
        lab.device.config_toml(
            extra=f'[server]\nurls = ["{lab.server.url}"]\nkeyring = "{keyring}"\n'
            f'enrollment_token = "{ADMISSION}"\nfailover_after_s = 5\n'
        )
    )
    device = lab.device

    def runtime(loaded: LoadedConfig, log: EventLog) -> Any:
        return dataclasses.replace(device.runtime(), loaded=loaded, log=log)

    obj = {"runtime_factory": runtime}
    result = CliRunner().invoke(main, ["--config", str(config), "daemon", "--once"], obj=obj)
    assert result.exit_code == 0, result.output
    assert lab.device_id in lab.server.devices and lab.heartbeats()
    assert '"event": "daemon.enrolled"' in result.stdout
    lab.server.faults.down = True
    result = CliRunner().invoke(main, ["--config", str(config), "daemon", "--once"], obj=obj)
    assert result.exit_code == 1 and "Error: daemon: no answer" in result.stderr
    config.write_text(device.config_toml())
    result = CliRunner().invoke(main, ["--config", str(config), "daemon", "--once"], obj=obj)
    assert result.exit_code == 1 and "no release server configured" in result.stderr


def daemon_from_file(lab: Lab) -> tuple[Daemon, Path, bytes]:
    """A daemon running the configuration of ``updater.toml`` in the device's root, as
    ``fleet-updater daemon`` loads it; the file and its bytes."""
    path = lab.device.root / "updater.toml"
    text = lab.device.config_toml().encode()
    path.write_bytes(text)
    daemon = lab.daemon()
    daemon.runtime = dataclasses.replace(
        daemon.runtime, loaded=LoadedConfig(daemon.runtime.config, str(path), (), str(path), text),
        config_sha256=None,
    )  # fmt: skip
    return daemon, path, text


@pytest.mark.parametrize("offline", [False, True])
def test_config_drift_is_told_once_then_repaired_while_the_device_carries_on(
    lab: Lab, offline: bool
) -> None:
    daemon, path, text = daemon_from_file(lab)
    runtime = daemon.runtime
    lab.clock.sleep(daemon.run_once())
    edited = text.replace(b"min_free_mb = 0", b"min_free_mb = 200")
    assert edited != text
    path.write_bytes(edited)
    lab.server.faults.down = offline  # repaired without the server too
    beats = len(lab.heartbeats())
    start = lab.clock.now
    while lab.clock.now - start < 900:
        lab.clock.sleep(max(1.0, daemon.run_once()))
    assert path.read_bytes() == text
    assert (daemon.runtime.config.data_dir / "updater.replaced.toml").read_bytes() == edited
    (drift,) = lab.local("config.drift")
    assert drift["problem"] is None and drift["repair_in_s"] == 300
    (repaired,) = lab.local("config.repaired")
    assert repaired["path"] == str(path) and repaired["problem"] is None
    assert daemon.runtime.loaded.text == text and daemon.runtime.config == runtime.config
    assert (len(lab.heartbeats()) > beats) is not offline


def test_a_file_changing_at_every_step_is_told_of_once(lab: Lab) -> None:
    daemon, path, text = daemon_from_file(lab)
    for n in range(10):  # two configuration tools fighting over the file
        path.write_bytes(text.replace(b"min_free_mb = 0", b"min_free_mb = %d" % (n % 2 + 1)))
        lab.clock.sleep(max(1.0, daemon.run_once()))
    assert len(lab.local("config.drift")) == 1 and not lab.local("config.repaired")
    path.write_bytes(text)
    lab.clock.sleep(max(1.0, daemon.run_once()))
    path.write_bytes(b"garbage")
    lab.clock.sleep(max(1.0, daemon.run_once()))
    assert len(lab.local("config.drift")) == 2  # a new drift after the file was right again


def test_a_repair_cut_short_is_swept_at_the_next_start(lab: Lab) -> None:
    path = lab.device.root / "etc" / "updater.toml"
    path.parent.mkdir()
    text = lab.device.config_toml().encode()
    path.write_bytes(text)
    runtime = dataclasses.replace(
        lab.device.runtime(), loaded=LoadedConfig(lab.device.config, str(path), (), str(path), text)
    )
    old = 1.7e9 - 3600
    leftover = path.parent / ".updater.toml.k3j4h5g6.tmp"
    other = path.parent / ".hosts.a1b2c3d4.tmp"
    for file in (leftover, other):
        file.write_bytes(b"enrollment_token = ...")
        os.utime(file, (old, old))
    runtime.sweep_temporaries()
    assert not leftover.exists() and other.exists()  # only the configuration's own
