"""A rollout's maintenance windows: given by API, CLI (``--window``), kept in canonical text,
shown in ``fleet rollout status`` and on the console's rollout page, with the count of its
devices waiting for a window; malformed entries and deadlines too short for the wait are
refused naming the problem."""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tests.server.test_rollouts as rollout_tests
from server.rollout_text import waiting_text, windows_text
from tests.server.conftest import FakeDevice, Harness, LiveServer
from tests.server.test_rollouts import Fleet, run, start, status
from tests.server.test_ui_rollout_pages import browser

Enrolled = Callable[..., FakeDevice]
MakeBundle = Callable[..., Path]
DAY = 86400
fleet_of = rollout_tests.fleet_of  # releases 1.0.0 and 2.0.0, and N devices running 1.0.0


def test_a_rollout_keeps_its_windows_and_counts_the_devices_waiting(
    harness: Harness, fleet_of: Callable[[int], Fleet]
) -> None:
    fleet = fleet_of(3)
    rollout = start(harness, version="2.0.0", stages=[100], install_deadline_s=3 * DAY,
                    windows=["mon-fri 2:00-5:00", "Sat 00:00-24:00", "2:00-5:00"])  # fmt: skip
    assert rollout["windows"] == ["Mon-Fri 02:00-05:00", "Sat 00:00-24:00", "02:00-05:00"]
    assert rollout["waiting_window"] == 0
    # two assigned devices report they wait for their window; the third installs
    for device in fleet.devices[:2]:
        assert device.heartbeat(updater_state="waiting_window").status_code == 204
    [view] = status(harness)["rollouts"]
    assert view["waiting_window"] == 2
    assert view["counts"]["pending"] == 3
    # a device that moved on is no longer counted
    assert fleet.devices[0].heartbeat(updater_state="idle").status_code == 204
    assert status(harness)["rollouts"][0]["waiting_window"] == 1


def test_a_rollout_without_windows_has_none(
    harness: Harness, fleet_of: Callable[[int], Fleet]
) -> None:
    fleet_of(1)
    rollout = start(harness, version="2.0.0", stages=[100])
    assert rollout["windows"] == [] and rollout["waiting_window"] == 0


@pytest.mark.parametrize(
    ("windows", "message"),
    [
        (["02:00-05:00", "Sta 01:00-02:00"], "windows[1]: window 'Sta 01:00-02:00': unknown day"),
        (["25:00-26:00"], "window '25:00-26:00': '25:00' is not a time of day"),
        (["02:00-02:00"], "starts and ends at the same time"),
        ("02:00-05:00", "windows"),
        ([5], "windows"),
        (["02:00-05:00"] * 17, "windows"),
        (["x" * 65], "windows"),
    ],
)
def test_a_malformed_window_is_refused_naming_it(
    harness: Harness, fleet_of: Callable[[int], Fleet], windows: Any, message: str
) -> None:
    fleet_of(1)
    refused = harness.client.post(
        "/api/v1/rollouts", headers=harness.operator,
        json={"version": "2.0.0", "install_deadline_s": 7 * DAY, "windows": windows},
    )  # fmt: skip
    assert refused.status_code == 422, refused.text
    assert message in refused.json()["detail"]
    assert status(harness)["rollouts"] == []  # nothing stored


def test_a_deadline_shorter_than_the_wait_for_a_window_is_refused(
    harness: Harness, fleet_of: Callable[[int], Fleet]
) -> None:
    """The install deadline counts from the assignment: shorter than the longest wait for a
    window, it would fail every device assigned outside one."""
    fleet_of(1)
    refused = harness.client.post(
        "/api/v1/rollouts", headers=harness.operator,
        json={"version": "2.0.0", "windows": ["02:00-05:00"], "install_deadline_s": 22 * 3600},
    )  # fmt: skip
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"] == (
        "install deadline: with windows 02:00-05:00 a device may wait 22h for one to open, "
        "and the deadline counts from the assignment: give at least 23h"
    )
    assert start(harness, version="2.0.0", windows=["02:00-05:00"], install_deadline_s=23 * 3600)


def test_rollout_windows_on_the_cli(
    live_server: LiveServer, enrolled: Enrolled, make_bundle: MakeBundle
) -> None:
    harness = live_server.harness
    assert harness.upload(make_bundle(version="2.0.0")).status_code == 201
    devices = [enrolled(hostname=f"cam-{i}") for i in range(2)]
    started = run(live_server, "rollout", "start", "2.0.0", "--stages", "100",
                  "--window", "sat 22:00-02:00", "--window", "Sun 00:00-24:00",
                  "--install-deadline", "7d", "--json")  # fmt: skip
    assert started.exit_code == 0, started.output
    assert json.loads(started.stdout)["windows"] == ["Sat 22:00-02:00", "Sun 00:00-24:00"]
    assert devices[1].heartbeat(updater_state="waiting_window").status_code == 204
    shown = run(live_server, "rollout", "status").output.splitlines()
    assert "  windows: Sat 22:00-02:00, Sun 00:00-24:00 (each device's local time)" in shown
    assert (
        "  1 device waiting for a maintenance window (assigned; the install starts when one "
        "opens)" in shown
    )
    bad = run(live_server, "rollout", "start", "2.0.0", "--window", "Sta 02:00-05:00")
    assert bad.exit_code == 2 and "--window" in bad.output and "unknown day 'Sta'" in bad.output
    short = run(live_server, "rollout", "start", "2.0.0", "--window", "02:00-05:00")
    assert short.exit_code == 1 and "give at least 23h" in short.output


def test_the_console_shows_the_windows_and_the_waiting_devices(
    harness: Harness, fleet_of: Callable[[int], Fleet]
) -> None:
    fleet = fleet_of(2)
    start(harness, version="2.0.0", stages=[100], install_deadline_s=3 * DAY,
          windows=["Mon-Fri 02:00-05:00"])  # fmt: skip
    assert fleet.devices[0].heartbeat(updater_state="waiting_window").status_code == 204
    page = browser(harness).get("/ui/rollouts/1").text
    assert "Mon-Fri 02:00-05:00 (each device&#39;s local time)" in page
    assert html.escape(waiting_text(1)) in page


def test_rollout_texts() -> None:
    assert windows_text([]) is None
    assert waiting_text(2) == (
        "2 devices waiting for a maintenance window (assigned; the install starts when one opens)"
    )


def assignment_of(device: FakeDevice) -> tuple[dict[str, Any] | None, str, int | None]:
    answer = device.checkin()
    assert answer.status_code == 200, answer.text
    document = json.loads(answer.json()["answer"])
    return document["assignment"], document["etag"], document["checkin_interval_s"]


def test_a_rollouts_windows_reach_its_devices_in_the_signed_answer(
    harness: Harness, fleet_of: Callable[[int], Fleet]
) -> None:
    """The check-in answer carries the assigning rollout's windows (the device narrows its own
    by them); the ETag changes with them, and an answer without windows keeps the ETag it
    always had."""
    from server.assignment import assignment_etag

    fleet = fleet_of(2)
    device = fleet.devices[0]
    before, etag, interval = assignment_of(device)
    assert before is None
    assert etag == assignment_etag(device.id, None, interval)  # as it always was
    start(harness, version="2.0.0", stages=[100], install_deadline_s=3 * DAY,
          windows=["mon-fri 2:00-5:00"])  # fmt: skip
    assignment, etag, interval = assignment_of(device)
    assert assignment is not None and assignment["version"] == "2.0.0"
    assert assignment["windows"] == ["Mon-Fri 02:00-05:00"]
    manifest_sha = hashlib.sha256(base64.b64decode(assignment["manifest"])).hexdigest()
    assert etag == assignment_etag(device.id, manifest_sha, interval, ["Mon-Fri 02:00-05:00"])
    assert etag != assignment_etag(device.id, manifest_sha, interval)
    assert device.checkin(etag=f'"{etag}"').status_code == 304
