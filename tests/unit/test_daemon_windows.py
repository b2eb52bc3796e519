"""The daemon and the maintenance windows: outside them an assigned release is not downloaded,
the wait is reported (an event, the heartbeat's ``waiting_window``, ``systemctl status``), and
the install starts once a window is open; a rollout's windows narrow the device's own.

The lab's wall clock stands at 1.7e9: Tuesday 2023-11-14 22:13:20 UTC."""

from __future__ import annotations

import dataclasses
from datetime import UTC
from typing import Any

import tests.unit.test_daemon as lab_module
from fleet_core.windows import parse_windows
from tests.unit.test_daemon import Lab, assignment
from updater.bandwidth import UpdateSchedule
from updater.daemon import WAITING_STATE, Daemon

# the lab of the daemon's tests: a virtual device and the server simulator
template = lab_module.template
lab = lab_module.lab


def waiting(daemon: Daemon) -> dict[str, Any] | None:
    return daemon.waiting


def told(daemon: Daemon) -> dict[str, Any]:
    news = daemon.waiting
    assert news is not None, "not waiting"
    return news


def rebooting(lab: Lab) -> bool:
    return lab.device.pending_reboot is not None


def schedule(*entries: str) -> UpdateSchedule:
    return UpdateSchedule(parse_windows(list(entries)), UTC)


def test_outside_its_window_a_device_waits_and_says_so(lab: Lab) -> None:
    release = lab.release("2.0.0")
    lab.server.assign(lab.device_id, release)
    daemon = lab.daemon(schedule=schedule("02:00-05:00"))
    daemon.run_once()
    assert not lab.local("install.started") and not rebooting(lab)
    [news] = lab.local("daemon.waiting_for_window")
    assert news["version"] == "2.0.0"
    assert news["next_open"] == "2023-11-15T02:00:00+00:00"
    assert news["windows"] == ["02:00-05:00"]
    # the server hears it at once, not a heartbeat interval later
    daemon.run_once()
    assert lab.heartbeats()[-1]["updater_state"] == WAITING_STATE
    assert "waiting for its window: 2023-11-15T02:00:00+00:00" in daemon.status_line()
    assert "daemon.waiting_for_window" in lab.names()
    # check-ins go on; the news is told once per wait
    lab.clock.now += 61
    daemon.run_once()
    assert len(lab.local("daemon.waiting_for_window")) == 1
    assert not lab.local("install.started")
    # the window opens: the next check-in installs, after a heartbeat that ends the wait
    daemon.schedule = schedule("22:00-23:00")
    lab.clock.now += 61
    daemon.run_once()
    states = [h["updater_state"] for h in lab.heartbeats()]
    last_wait = len(states) - 1 - states[::-1].index(WAITING_STATE)
    assert states[last_wait + 1] == "idle"  # sent before the download began
    assert len(lab.local("install.started")) == 1 and rebooting(lab)
    assert waiting(daemon) is None
    assert lab.reboot()[-1].action == "committed"


def test_inside_its_window_a_device_installs_at_once(lab: Lab) -> None:
    lab.server.assign(lab.device_id, lab.release("2.0.0"))
    daemon = lab.daemon(schedule=schedule("Tue 22:00-02:00"))  # crosses midnight
    daemon.run_once()
    assert not lab.local("daemon.waiting_for_window")
    assert len(lab.local("install.started")) == 1 and rebooting(lab)


def test_a_withdrawn_assignment_ends_the_wait(lab: Lab) -> None:
    lab.server.assign(lab.device_id, lab.release("2.0.0"))
    daemon = lab.daemon(schedule=schedule("02:00-05:00"))
    daemon.run_once()
    assert waiting(daemon) is not None
    lab.server.assign(lab.device_id, None)
    lab.clock.now += 61
    daemon.run_once()
    assert waiting(daemon) is None
    assert lab.heartbeats()[-1]["updater_state"] == "idle"


def test_the_configured_windows_and_time_zone_are_the_daemons(lab: Lab) -> None:
    lab.device.config = dataclasses.replace(
        lab.device.config,
        update_windows=parse_windows(["Wed 00:00-24:00"]),
        time_zone="Asia/Tokyo",  # 07:13 on Wednesday there
    )
    lab.server.assign(lab.device_id, lab.release("2.0.0"))
    daemon = lab.daemon()
    assert str(daemon.schedule.tz) == "Asia/Tokyo"
    daemon.run_once()
    assert not lab.local("daemon.waiting_for_window")
    assert len(lab.local("install.started")) == 1


def test_a_rollouts_windows_narrow_the_devices_own(lab: Lab) -> None:
    daemon = lab.daemon(schedule=schedule("20:00-24:00"))
    inside_both = dataclasses.replace(assignment(), windows=("Tue 22:00-23:00",))
    assert daemon._window_open(inside_both)
    outside_rollout = dataclasses.replace(assignment(), windows=("Sat 22:00-23:00",))
    assert not daemon._window_open(outside_rollout)
    assert told(daemon)["next_open"] == "2023-11-18T22:00:00+00:00"
    assert told(daemon)["rollout_windows"] == ["Sat 22:00-23:00"]
    # windows that never meet: the device says there is none ahead, at warning level
    apart = dataclasses.replace(assignment(), windows=("04:00-05:00",))
    assert not daemon._window_open(apart)
    [*_, never] = lab.local("daemon.waiting_for_window")
    assert never["next_open"] is None and never["level"] == "warning"


def test_a_rollout_window_the_device_cannot_read_is_waited_on(lab: Lab) -> None:
    daemon = lab.daemon(schedule=schedule())
    unreadable = dataclasses.replace(assignment(), windows=("weekdays 02:00-05:00",))
    assert not daemon._window_open(unreadable)
    assert "cannot read the rollout's windows" in told(daemon)["problem"]
    assert "weekdays" in told(daemon)["problem"]
