"""Rollouts from the console, on devices running the real updater: one started from the form
advances to completion on the open page without a reload, and the emergency stop, confirmed by
typing STOP, stops every install from starting."""

from __future__ import annotations

import time
from collections.abc import Callable

from playwright.sync_api import Page, expect

from tests.browser.conftest import Console, ConsoleServer, LiveFleet, login
from tests.chaos.conftest import Releases

CHECKIN_S = 66  # the updater's check-in interval (60 s) with its jitter (10 %)


def until(done: Callable[[], bool], limit_s: float) -> None:
    """Wait until ``done()``.

    Raises:
        AssertionError: not done within ``limit_s`` seconds.
    """
    deadline = time.monotonic() + limit_s
    while not done():
        assert time.monotonic() < deadline, f"not done within {limit_s} s"
        time.sleep(0.1)


def watch(page: Page, until: str, limit_s: float) -> list[tuple[str, str]]:
    """The (state, stage) pairs the open rollout page shows, each once in order, until its state
    is ``until`` or ``limit_s`` passed."""
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        state = page.get_by_test_id("rollout-state").inner_text().strip()
        stage = page.get_by_test_id("rollout-stage").inner_text().split()[0]
        if not seen or seen[-1] != (state, stage):
            seen.append((state, stage))
        if state == until:
            break
        time.sleep(0.1)
    return seen


def test_a_rollout_started_from_the_form_advances_to_completion_without_a_reload(
    console: Console,
    server: ConsoleServer,
    live_fleet: Callable[[int], LiveFleet],
    releases: Releases,
) -> None:
    fleet = live_fleet(4)
    server.fleet("release", "upload", str(releases.bundle("2.0.0")))
    login(console)
    page = console.page
    console.goto("/ui/rollouts/new", "new-rollout")
    page.select_option("#f-version", "2.0.0")
    page.fill("#f-stages", "50,100")
    page.fill("#f-soak", "20")
    console.submit(lambda: page.get_by_role("button", name="Start the rollout").click(),
                   "rollout-started")  # fmt: skip
    started = server.rollouts()["rollouts"][0]
    assert page.url.endswith(f"/ui/rollouts/{started['id']}")
    assert started["version"] == "2.0.0" and started["stages"] == ["50%", "100%"]
    assert page.get_by_test_id("rollout-state").inner_text() == "running"

    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    console.mark()
    fleet.start()
    seen = watch(page, until="completed", limit_s=90)
    console.shot("rollout-completed")
    assert seen[-1][0] == "completed", seen
    assert ("running", "50%") in seen and ("running", "100%") in seen, seen
    fleet.stop()
    assert console.marked(), "the page was reloaded"
    assert navigations == []
    assert server.api(f"/api/v1/rollouts/{started['id']}")["state"] == "completed"
    assert fleet.versions() == {"2.0.0": 4}
    assert "4 succeeded, 0 pending, 0 failed" in page.get_by_test_id("rollout-counts").inner_text()


def test_the_emergency_stop_needs_the_typed_word_and_then_no_install_starts(
    console: Console,
    server: ConsoleServer,
    live_fleet: Callable[[int], LiveFleet],
    releases: Releases,
) -> None:
    fleet = live_fleet(6)
    server.fleet("release", "upload", str(releases.bundle("2.0.0")))
    canary = fleet.fleet.members[0].device_id
    server.fleet("rollout", "start", "2.0.0", "--canary", canary, "--stages", "100",
                 "--soak", "90s")  # fmt: skip
    fleet.start()
    reported = lambda: {r["id"]: r["version"] for r in server.devices()}[canary]  # noqa: E731
    until(lambda: reported() == "2.0.0", limit_s=60)  # committed, and soaking
    fleet.stop()  # the devices stop checking in: the next stage's assignments wait for them
    until(lambda: server.rollouts()["rollouts"][0]["stage_name"] == "100%", limit_s=30)
    waiting = {row["id"] for row in server.devices() if row["id"] != canary}
    assert all(row["assigned_version"] == "2.0.0" for row in server.devices())
    assert fleet.installs_started() == 1

    login(console)
    page = console.page
    stop_form = page.locator("form[action='/ui/emergency-stop']")
    page.get_by_text("Emergency stop", exact=True).click()  # opens the form
    page.fill("#estop-reason", "bad batch of sensors")
    button = stop_form.get_by_role("button", name="Stop every rollout")
    page.fill("#estop-confirm", "stop")
    expect(button).to_be_disabled()  # the word is STOP, in capitals
    page.fill("#estop-confirm", "STOP")
    expect(button).to_be_enabled()
    console.submit(button.click, "stopped")
    expect(page.get_by_role("alert")).to_contain_text("Emergency stop is on")
    assert "bad batch of sensors" in page.locator("#estop-state").inner_text()
    assert server.emergency_stopped()
    assert server.rollouts()["rollouts"][0]["state"] == "paused"
    for row in server.devices():
        if row["id"] in waiting:
            assert row["assigned_version"] != "2.0.0", row

    began = fleet.clock_s()
    fleet.start()  # every device checks in again, several times (once a minute at most)
    time.sleep(4)
    until(lambda: fleet.clock_s() - began >= 3 * CHECKIN_S, limit_s=60)
    fleet.stop()
    assert fleet.installs_started() == 1
    assert fleet.versions() == {"2.0.0": 1, "1.0.0": 5}
    assert server.rollouts()["rollouts"][0]["state"] == "paused"


def test_a_wrong_confirmation_word_is_refused_by_the_server_too(
    new_console: Callable[..., Console], server: ConsoleServer
) -> None:
    # a browser without the script: the button is never disabled there, so the server's own
    # check is all that stands between the wrong word and the stop
    console = login(new_console(java_script_enabled=False))
    page = console.page
    page.get_by_text("Emergency stop", exact=True).click()
    page.fill("#estop-reason", "testing the confirmation")
    page.fill("#estop-confirm", "stop")
    status = console.submit(
        page.locator("form[action='/ui/emergency-stop'] button[type=submit]").click,
        "wrong-word",
    )
    assert status in (400, 422), status
    assert "STOP" in page.get_by_role("alert").first.inner_text()
    assert not server.emergency_stopped()
