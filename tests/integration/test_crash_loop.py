"""The updater daemon crash-looping for real: ``fleet-updater daemon`` processes on a virtual
device against the real release server, killed as a crash kills them and started again at once
as ``fleet-updater.service`` restarts them (``Restart=on-failure``, no start limit).

What the product promises (docs/runbooks/AgentCrashLoop.md): the fourth start within 5 minutes
suspends updates; every start still phones home and reports ``suspended``, so the server keeps
seeing the device and the alert stays on; nothing assigned is installed however long the loop
lasts, and the state kept about it does not grow; an operator's ``fleet-updater resume`` ends
the suspension and the next start installs what is assigned."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.integration import test_device_protocol as protocol
from tests.integration.test_device_protocol import Lab
from updater.cli import main
from updater.state import CRASH_LOOP_STARTS

# the real server and the virtual device of the protocol tests
real_server, real, template, lab = (
    protocol.real_server,
    protocol.real,
    protocol.template,
    protocol.lab,
)
START_LIMIT_S = 60.0  # a start that has not reached the server by then is a failure here


def updater_command() -> list[str]:
    script = Path(sys.executable).with_name("fleet-updater")
    return (
        [sys.executable, str(script)] if script.exists() else [sys.executable, "-m", "updater.cli"]
    )


class Service:
    """``fleet-updater daemon`` as systemd runs it: one process at a time, its output kept."""

    def __init__(self, lab: Lab, tmp_path: Path) -> None:
        self.lab = lab
        self.config = lab.device.root / "updater.toml"
        keyring = lab.device.config.server_keyring
        self.config.write_text(
            lab.device.config_toml(
                extra=f'[server]\nurls = ["{lab.real.url}"]\nkeyring = "{keyring}"\n'
                f'enrollment_token = "{lab.device.config.enrollment_token}"\n'
            )
        )
        self.logs = tmp_path / "daemon-logs"
        self.logs.mkdir()
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.starts += 1
        log = (self.logs / f"start-{self.starts}.jsonl").open("wb")
        self.process = subprocess.Popen(
            [*updater_command(), "--config", str(self.config), "daemon"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()

    def events(self, start: int | None = None) -> list[dict[str, object]]:
        path = self.logs / f"start-{start or self.starts}.jsonl"
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait_for(self, what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_LIMIT_S
        while not done():
            assert self.process is not None and self.process.poll() is None, (
                f"the daemon exited waiting for {what}: {self.events()[-3:]}"
            )
            assert time.monotonic() < deadline, f"no {what} within {START_LIMIT_S:.0f} s"
            time.sleep(0.05)

    def crash(self) -> None:
        """SIGKILL, as the kernel's OOM killer or a segfault ends it, and no clean-up."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def service(lab: Lab, tmp_path: Path) -> Iterator[Service]:
    running = Service(lab, tmp_path)
    yield running
    running.stop()


def heartbeats_seen(lab: Lab) -> int:
    return len(lab.heartbeats())


def run_until_heartbeat(service: Service) -> dict[str, object]:
    """Start the daemon and wait for its first heartbeat to reach the server."""
    before = heartbeats_seen(service.lab)
    service.start()
    service.wait_for("a heartbeat", lambda: heartbeats_seen(service.lab) > before)
    return service.lab.heartbeats()[-1]


def test_a_daemon_crash_looping_suspends_updates_keeps_reporting_and_resumes(
    lab: Lab, service: Service
) -> None:
    states = []
    for _ in range(CRASH_LOOP_STARTS + 1):  # the fourth start within 5 minutes trips the guard
        states.append(run_until_heartbeat(service)["updater_state"])
        service.crash()
    assert states == ["idle"] * CRASH_LOOP_STARTS + ["suspended"], states
    assert [e["event"] for e in service.events() if e["event"] == "updater.crash_loop"] == [
        "updater.crash_loop"
    ]
    state = lab.device.state()
    assert state.suspended is not None and "crash loop" in state.suspended

    # a release is assigned while the loop goes on: it is never installed
    lab.assign(lab.real.release("2.0.0"))
    for _ in range(2 * CRASH_LOOP_STARTS):  # the loop persists: twice as long again
        beat = run_until_heartbeat(service)
        assert beat["updater_state"] == "suspended"
        service.wait_for(
            "the install refused",
            lambda: any(e["event"] == "daemon.install_skipped" for e in service.events()),
        )
        service.crash()
    assert lab.slot("b").status == "empty" and not lab.downloads()
    assert "install.started" not in {
        str(e["event"]) for n in range(service.starts) for e in service.events(n + 1)
    }
    assert len(lab.device.state().restarts) == CRASH_LOOP_STARTS + 1  # bounded, however long
    assert lab.real.device(lab.device_id)["state"] == "suspended"

    # the operator resumes: the next start installs what is assigned
    result = CliRunner().invoke(main, ["--config", str(service.config), "resume"])
    assert result.exit_code == 0, result.output
    assert lab.device.state().suspended is None and lab.device.state().restarts == ()
    service.start()
    service.wait_for(
        "the install", lambda: lab.slot("b").status != "empty" and lab.slot("b").version == "2.0.0"
    )
    service.stop()
    assert lab.device.state().suspended is None
