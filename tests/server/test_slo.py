"""``fleet slo report``: the figures of a known history, exactly; invariants over random
histories; the silences the contacts record; the command's table, JSON and bad input."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from fleet_core.cli import fleet
from server import contacts, rollouts, slo
from server import devices as device_records
from server.errors import InvalidRolloutError, RolloutConflictError
from server.models import ContactGap, RecordEpoch
from server.rollouts import RolloutRequest
from server.schemas import Heartbeat
from server.settings import utc
from tests.conftest import assert_one_line_error
from tests.server.conftest import (
    START,
    FakeClock,
    FakeDevice,
    Harness,
    at_once,
    serve_harness,
)
from tests.server.test_audit_anchors import data_dir_args

Enrolled = Callable[..., FakeDevice]
MakeBundle = Callable[..., Path]
RULES = Path(__file__).parents[2] / "deploy/monitoring/prometheus/rules/fleet.rules.yml"


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(START + seconds, UTC)


def slots(version: str) -> dict[str, Any]:
    return {"a": {"status": "good", "version": version}, "b": {"status": "good"}}


@dataclass
class History:
    """A fleet driven by the test: its devices, their roles and versions, and every contact the
    test made (each one a write of ``last_seen``), to check the report against."""

    harness: Harness
    devices: dict[str, FakeDevice] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    contacts: dict[str, list[float]] = field(default_factory=dict)

    def at(self, seconds: float) -> None:
        self.harness.clock.now = START + seconds

    @property
    def t(self) -> float:
        return self.harness.clock.now - START

    def add(self, enrolled: Enrolled, name: str, role: str) -> FakeDevice:
        device = enrolled(hostname=name)
        self.devices[name], self.roles[name], self.versions[name] = device, role, "1.0.0"
        self.contacts[name] = [self.t]
        self.heartbeat(name)
        return device

    def heartbeat(self, name: str, version: str | None = None) -> None:
        if version is not None:
            self.versions[name] = version
        version = self.versions[name]
        device = self.devices[name]
        answer = device.heartbeat(role=self.roles[name], version=version, slots=slots(version))
        if answer.status_code == 401:  # its session expired (an hour): it opens another
            device.login()
            answer = device.heartbeat(role=self.roles[name], version=version, slots=slots(version))
        assert answer.status_code == 204, answer.text
        self.contacts[name].append(self.t)

    def fail(self, name: str, seq: int) -> None:
        answer = self.devices[name].events(("install.failed", seq))
        if answer.status_code == 401:
            self.devices[name].login()
            answer = self.devices[name].events(("install.failed", seq))
        assert answer.status_code == 204, answer.text
        self.contacts[name].append(self.t)

    def evaluate(self) -> None:
        rollouts.evaluate(self.harness.db, utc(self.harness.clock))

    def report(self, since: float, until: float) -> dict[str, Any]:
        window = slo.Window(since=at(since), until=at(until), now=utc(self.harness.clock))
        return slo.report(self.harness.db, window)


@pytest.fixture
def harness(
    tmp_path: Path, keyring_dir: Path, database_url: str | None, clock: FakeClock
) -> Iterator[Harness]:
    """The server tests' harness without the rollout evaluation in the background: these tests
    evaluate at the moments of their histories, and figures to the second depend on that."""
    yield from serve_harness(tmp_path, keyring_dir, database_url, clock, rollout_interval_s=None)


@pytest.fixture
def history(harness: Harness, make_bundle: MakeBundle) -> History:
    for version in ("1.0.0", "2.0.0"):
        answer = harness.upload(make_bundle(f"{version}.bundle", version=version))
        assert answer.status_code == 201, answer.text
    return History(harness)


def live(history: History, until: float, silent: dict[str, tuple[float, float]]) -> None:
    """Every device heartbeats every 100 s up to ``until`` (from now), except within its
    ``silent`` span."""
    start = history.t
    for tick in range(int(start) + 100 - int(start) % 100, int(until), 100):
        history.at(tick)
        for name in history.devices:
            quiet = silent.get(name)
            if quiet is None or not quiet[0] < tick < quiet[1]:
                history.heartbeat(name)


def known_history(history: History, enrolled: Enrolled) -> int:
    """The history docs/slo.md walks through; returns its rollout's id.

    cam-a and cam-b are cameras, gw-1, gw-2 and gw-3 gateways, all enrolled at 0. cam-b is
    silent from 0 to 1000. A rollout of 2.0.0 to cam-a, cam-b and gw-1 starts at 1200 (one
    failed device of five is not more than the fleet guard's 20 %), cam-a its canary: cam-a
    commits at 1250 and
    succeeds at 1310, when the 100 % stage starts. cam-b reports install.failed at 1380; the
    evaluation at 1400 fails it and halts the rollout; an operator resumes it at 1700. gw-1
    commits at 1730 and succeeds at 1800, which completes the rollout.
    """
    for name, role in (
        ("cam-a", "camera"), ("cam-b", "camera"), ("gw-1", "gateway"), ("gw-2", "gateway"),
        ("gw-3", "gateway"),
    ):  # fmt: skip
        history.add(enrolled, name, role)
    live(history, 1200, {"cam-b": (0, 1000)})
    history.at(1000)
    history.heartbeat("cam-b")
    live(history, 1200, {})
    history.at(1200)
    for name in history.devices:
        history.heartbeat(name)
    db, ids = history.harness.db, {n: d.id for n, d in history.devices.items()}
    started = rollouts.start(
        db,
        RolloutRequest(
            version="2.0.0", device_ids=(ids["cam-a"], ids["cam-b"], ids["gw-1"]),
            canary_ids=(ids["cam-a"],), stages=(100,), soak_s=60,
        ),
        actor="operator:alice", now=at(1200),
    )  # fmt: skip
    history.at(1250)
    history.heartbeat("cam-a", "2.0.0")
    history.evaluate()
    history.at(1300)
    for name in history.devices:
        history.heartbeat(name)
    history.at(1310)
    history.evaluate()  # cam-a succeeded: the 100 % stage starts
    history.at(1380)
    history.fail("cam-b", 1)
    history.at(1400)
    for name in history.devices:
        history.heartbeat(name)
    history.evaluate()  # cam-b failed: halted
    live(history, 1700, {})
    history.at(1700)
    rollouts.transition(
        db, started["id"], "resume", actor="operator:alice", now=at(1700), reason="bad sd card"
    )
    history.at(1730)
    history.heartbeat("gw-1", "2.0.0")
    history.evaluate()
    history.at(1800)
    for name in history.devices:
        history.heartbeat(name)
    history.evaluate()  # gw-1 succeeded: completed
    live(history, 2000, {})
    history.at(2000)
    rollout_id: int = started["id"]
    return rollout_id


def objective(document: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(o for o in document["objectives"] if o["name"] == name)
    return found


def test_the_figures_of_a_known_history(history: History, enrolled: Enrolled) -> None:
    rollout_id = known_history(history, enrolled)
    document = history.report(0, 2000)

    uptime = document["uptime"]
    assert document["contact_record_since"] is None  # the record began before any device
    assert (uptime["devices"], uptime["observed_s"], uptime["down_s"]) == (5, 10000, 1000)
    assert uptime["uptime"] == pytest.approx(0.9)
    assert uptime["by_role"]["camera"] == {
        "devices": 2, "observed_s": 4000, "down_s": 1000, "uptime": 0.75,
    }  # fmt: skip
    assert uptime["by_role"]["gateway"]["uptime"] == 1.0

    updates = document["updates"]
    assert (updates["succeeded"], updates["failed"]) == (2, 1)
    assert updates["success_rate"] == pytest.approx(2 / 3)
    assert updates["failure_reasons"] == {"install.failed": 1}
    # cam-a: assigned 1200, committed 1250; gw-1: assigned again at the resume, 1700, committed
    # 1730
    assert updates["assignment_to_commit"] == {
        "count": 2, "p50_s": 30, "p95_s": 50, "max_s": 50, "mean_s": 40,
    }  # fmt: skip
    by_stage = updates["by_stage"]
    assert list(by_stage) == ["canary", "100%"]  # in a plan's order
    assert (by_stage["canary"]["succeeded"], by_stage["canary"]["failed"]) == (1, 0)
    assert (by_stage["100%"]["succeeded"], by_stage["100%"]["failed"]) == (1, 1)
    assert by_stage["100%"]["assignment_to_commit"]["max_s"] == 30
    by_role = updates["by_role"]
    assert (by_role["camera"]["succeeded"], by_role["camera"]["failed"]) == (1, 1)
    assert by_role["gateway"]["success_rate"] == 1.0

    assert document["releases"]["rollouts"] == [
        {
            "rollout": rollout_id, "version": "2.0.0", "uploaded": "2023-11-14T22:13:20Z",
            "full_stage": "2023-11-14T22:35:10Z", "upload_to_full_s": 1310,
            "completed": "2023-11-14T22:43:20Z", "upload_to_completed_s": 1800,
        }
    ]  # fmt: skip

    incidents = document["incidents"]
    listed = [
        (i["kind"], i["detection_s"], i["repair_s"], i["stage"], i["role"])
        for i in incidents["incidents"]
    ]
    assert listed == [
        ("device_offline", 360, 640, None, "camera"),  # silent at 0, alert at 360, back at 1000
        ("rollout_halt", 20, 300, "100%", None),  # failed at 1380, halt at 1400, resumed 1700
    ]
    assert (incidents["count"], incidents["open"]) == (2, 0)
    assert (incidents["mttd_s"], incidents["mttr_s"]) == (190, 470)
    assert incidents["by_kind"]["rollout_halt"]["mttd_s"] == 20
    assert incidents["by_stage"]["100%"]["mttr_s"] == 300
    assert incidents["by_role"]["camera"]["mttd_s"] == 360

    statuses = {o["name"]: (o["measured"], o["status"]) for o in document["objectives"]}
    assert statuses["uptime"] == (pytest.approx(0.9), "missed")
    assert statuses["update_success"] == (pytest.approx(2 / 3), "missed")
    assert statuses["mttd"] == (190, "missed")
    assert statuses["mttr"] == (470, "met")
    assert statuses["update_latency"] == (50, "met")
    assert statuses["agent_cpu"] == (None, "not measured")


def test_a_window_counts_only_what_was_recorded_inside_it(
    history: History, enrolled: Enrolled
) -> None:
    known_history(history, enrolled)
    document = history.report(500, 1500)  # made at 2000, of a window that ended at 1500
    assert (document["uptime"]["observed_s"], document["uptime"]["down_s"]) == (5000, 500)
    assert (document["updates"]["succeeded"], document["updates"]["failed"]) == (1, 1)
    incidents = document["incidents"]["incidents"]
    # the silence's alert fired at 360, before the window; the resume came after it
    assert [(i["kind"], i["repaired"]) for i in incidents] == [("rollout_halt", None)]
    assert document["incidents"]["open"] == 1
    assert document["incidents"]["mttr_s"] is None
    assert objective(document, "mttr")["status"] == "no data"
    assert document["releases"]["rollouts"][0]["completed"] is None


def test_a_halt_counts_from_the_failures_that_tripped_it(
    history: History, enrolled: Enrolled
) -> None:
    """A failure the rule tolerated long before is not the fault the halt detected."""
    for n in range(5):
        history.add(enrolled, f"cam-{n}", "camera")
    ids = [history.devices[f"cam-{n}"].id for n in range(3)]
    request = RolloutRequest(
        version="2.0.0", device_ids=tuple(ids), stages=(100,), max_failure_rate=0.5
    )
    rollouts.start(history.harness.db, request, actor="operator:alice", now=at(0))
    history.at(100)
    history.fail("cam-0", 1)
    history.at(120)
    history.evaluate()  # 1 failed of 3: tolerated
    history.at(250)
    history.fail("cam-1", 1)
    history.at(280)
    history.evaluate()  # 2 of 3: halted
    history.at(300)
    [halt] = [
        i for i in history.report(0, 300)["incidents"]["incidents"] if i["kind"] == "rollout_halt"
    ]
    assert (halt["fault"], halt["detected"], halt["detection_s"]) == (
        "2023-11-14T22:17:30Z", "2023-11-14T22:18:00Z", 30,
    )  # fmt: skip


def test_a_silence_still_going_at_the_end_of_the_window_is_down_time(
    history: History, enrolled: Enrolled
) -> None:
    history.add(enrolled, "cam-a", "camera")
    history.at(1000)  # nothing since 0
    document = history.report(0, 2000)  # made at 1000: what is after it is not known yet
    assert (document["uptime"]["observed_s"], document["uptime"]["down_s"]) == (1000, 1000)
    [incident] = document["incidents"]["incidents"]
    assert (incident["kind"], incident["detection_s"], incident["repaired"]) == (
        "device_offline", 360, None,
    )  # fmt: skip
    assert document["incidents"]["mttd_s"] == 360


def test_a_decommissioned_device_counts_until_it_was_decommissioned(
    history: History, enrolled: Enrolled
) -> None:
    device = history.add(enrolled, "cam-a", "camera")
    history.add(enrolled, "cam-b", "camera")
    live(history, 500, {})
    history.at(500)
    history.heartbeat("cam-b")
    device_records.change_status(
        history.harness.db, device.id, "decommission", "stolen", actor="operator:alice",
        now=at(500),
    )  # fmt: skip
    live(history, 2000, {"cam-a": (400, 2000)})  # refused from 500: it is silent from 400
    history.at(2000)
    uptime = history.report(0, 2000)["uptime"]
    assert (uptime["devices"], uptime["observed_s"], uptime["down_s"]) == (2, 2500, 0)
    assert history.report(0, 2000)["incidents"]["count"] == 0


def test_a_contact_after_a_silence_records_one_gap_and_a_heartbeat_none(
    history: History, enrolled: Enrolled
) -> None:
    history.add(enrolled, "cam-a", "camera")
    history.at(contacts.OFFLINE_AFTER_S)  # exactly the threshold: not a silence
    history.heartbeat("cam-a")
    history.at(contacts.OFFLINE_AFTER_S + 200)
    history.heartbeat("cam-a")
    assert gaps(history.harness) == []
    history.at(2000)
    device = history.devices["cam-a"]
    device.token = None
    device.login()  # back after the silence: its session open is its first contact
    history.heartbeat("cam-a")
    assert gaps(history.harness) == [(device.id, at(contacts.OFFLINE_AFTER_S + 200), at(2000))]


def gaps(harness: Harness) -> list[tuple[str, datetime, datetime]]:
    with harness.db.read() as session:
        rows = session.scalars(select(ContactGap).order_by(ContactGap.started))
        return [(g.device_id, g.started, g.ended) for g in rows]


def test_concurrent_contacts_after_one_silence_record_it_once(
    history: History, enrolled: Enrolled
) -> None:
    device = history.add(enrolled, "cam-a", "camera")
    history.at(1000)
    heartbeat = Heartbeat.model_validate(
        {"booted": "a", "primary": "a", "trial": False, "slots": {}, "updater_state": "idle"}
    )

    def contact(db: Any, offset: float) -> None:
        device_records.record_heartbeat(db, device.id, heartbeat, at(1000 + offset))

    at_once(history.harness, contact, [0.0, 0.5, 1.0, 1.5])
    recorded = gaps(history.harness)
    assert len(recorded) == 1, recorded
    assert recorded[0][1] == at(0)


def test_a_record_begun_after_the_devices_enrolled_says_so(
    history: History, enrolled: Enrolled
) -> None:
    history.add(enrolled, "cam-a", "camera")
    db = history.harness.db
    db.migrate("0010")  # a database from before the record, with a device in it
    db.migrate()
    with db.read() as session:
        epoch = session.get(RecordEpoch, contacts.CONTACT_GAPS)
    assert epoch is not None and epoch.since is not None
    assert abs((epoch.since - datetime.now(UTC)).total_seconds()) < 60
    document = history.report(0, 2000)  # years before the record began
    assert document["contact_record_since"] == epoch.since.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert document["uptime"]["uptime"] is None
    assert document["uptime"]["from"] is None
    assert objective(document, "uptime")["status"] == "no data"
    with db.write() as session:  # as if it began at 1500
        session.execute(update(RecordEpoch).values(since=at(1500)))
    history.at(2000)
    document = history.report(0, 2000)
    assert document["uptime"]["from"] == "2023-11-14T22:38:20Z"
    # silent since 0: down from 1500, when the record began, to 2000
    assert (document["uptime"]["observed_s"], document["uptime"]["down_s"]) == (500, 500)


def test_an_empty_database_reports_no_data(history: History) -> None:
    document = history.report(0, 2000)
    text = json.dumps(document, allow_nan=False)  # no NaN, no infinity
    assert "NaN" not in text
    assert {o["status"] for o in document["objectives"]} == {"no data", "not measured"}
    assert document["updates"]["assignment_to_commit"]["p95_s"] is None
    assert document["incidents"]["count"] == 0


def test_the_offline_threshold_is_the_alert_rules() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rule = next(r for g in groups for r in g["rules"] if r.get("alert") == "DeviceOffline")
    assert rule["expr"].endswith(f"> {contacts.OFFLINE_AFTER_S}")
    assert rule["for"] == f"{contacts.OFFLINE_ALERT_FOR_S // 60}m"


def test_percentiles_are_nearest_rank() -> None:
    assert slo.percentile([5.0], 95) == 5.0
    assert slo.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert slo.percentile([float(n) for n in range(1, 101)], 95) == 95.0
    assert slo.distribution([]) == {
        "count": 0, "p50_s": None, "p95_s": None, "max_s": None, "mean_s": None,
    }  # fmt: skip


# --- random histories ---------------------------------------------------------------------------

NAMES = ("cam-0", "cam-1", "cam-2", "gw-0", "gw-1")
# Each tick: seconds later, what each device does, then what an operator does, then the
# engine's evaluation. "commit" heartbeats the other release from then on.
DOINGS = ("beat", "beat", "beat", "quiet", "commit", "fail")
OPERATIONS = (None, None, None, None, "start", "resume", "abort", "rollback", "clear")
ticks = st.lists(
    st.tuples(
        st.integers(1, 400),
        st.tuples(*[st.sampled_from(DOINGS) for _ in NAMES]),
        st.sampled_from(OPERATIONS),
    ),
    min_size=1,
    max_size=20,
)


def expected_down(log: list[float], since: float, until: float, now: float) -> float:
    """Down seconds within ``[since, until)`` from the test's own ``log`` of one device's
    contacts, as known at ``now``: each silence longer than the threshold, from its last
    contact to the next one (or to the window's end, once it is that long at ``now``)."""
    end = min(until, now)
    threshold = contacts.OFFLINE_AFTER_S

    def inside(start: float, stop: float) -> float:
        return max(0.0, min(stop, end) - max(start, since))

    down = sum(inside(a, b) for a, b in itertools.pairwise(log) if b - a > threshold)
    if now - log[-1] > threshold:
        down += inside(log[-1], end)
    return down


def check_invariants(document: dict[str, Any]) -> None:
    json.dumps(document, allow_nan=False)
    uptime = document["uptime"]
    for view in [uptime, *uptime["by_role"].values()]:
        assert 0 <= view["down_s"] <= view["observed_s"] + 1e-6
        assert view["uptime"] is None or 0 <= view["uptime"] <= 1
    assert sum(v["observed_s"] for v in uptime["by_role"].values()) == pytest.approx(
        uptime["observed_s"], abs=0.01
    )  # each rounded to the millisecond
    updates = document["updates"]
    for group in ("by_stage", "by_role"):
        assert sum(v["succeeded"] for v in updates[group].values()) == updates["succeeded"]
        assert sum(v["failed"] for v in updates[group].values()) == updates["failed"]
    for view in [updates, *updates["by_stage"].values(), *updates["by_role"].values()]:
        assert view["success_rate"] is None or 0 <= view["success_rate"] <= 1
        spread = view["assignment_to_commit"]
        if spread["count"]:
            assert 0 <= spread["p50_s"] <= spread["p95_s"] <= spread["max_s"]
        else:
            assert spread["p50_s"] is None
    incidents = document["incidents"]
    for incident in incidents["incidents"]:
        assert incident["detection_s"] >= 0
        assert incident["repair_s"] is None or incident["repair_s"] >= 0
    assert (incidents["mttd_s"] is None) == (incidents["count"] == 0)
    assert incidents["open"] == sum(1 for i in incidents["incidents"] if i["repaired"] is None)
    for o in document["objectives"]:
        assert (o["measured"] is None) == (o["status"] in ("no data", "not measured"))


def operate(history: History, operation: str | None) -> None:
    """What an operator does: start a rollout of 2.0.0 (refused while another is active, or
    when no device runs another release), clear the emergency stop (the fleet guard's, after
    enough failures), or resume, abort or roll back the newest rollout (refused from states
    that do not allow it)."""
    db, now = history.harness.db, utc(history.harness.clock)
    if operation == "start":
        request = RolloutRequest(version="2.0.0", stages=(50, 100), soak_s=30)
        with contextlib.suppress(RolloutConflictError, InvalidRolloutError):
            rollouts.start(db, request, actor="operator:test", now=now)
    elif operation == "clear":
        rollouts.clear_emergency_stop(db, actor="operator:test", now=now)
    elif operation is not None:
        newest = rollouts.status(db, now)["rollouts"]
        if newest:
            with contextlib.suppress(RolloutConflictError):
                rollouts.transition(
                    db, newest[0]["id"], operation, actor="operator:test", now=now, reason=None
                )


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ticks=ticks, windows=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1,
                                     max_size=3))  # fmt: skip
def test_random_histories_keep_the_invariants(
    history: History, enrolled: Enrolled, ticks: list[tuple[Any, ...]],
    windows: list[tuple[float, float]],
) -> None:  # fmt: skip
    """Each example goes on from where the last left the fleet: the invariants hold over any
    history, and uptime matches the test's own log of the contacts."""
    if not history.devices:
        for name in NAMES:
            history.add(enrolled, name, "gateway" if name.startswith("gw") else "camera")
    for seconds, doings, operation in [(1, ("beat",) * len(NAMES), "start"), *ticks]:
        history.at(history.t + seconds)
        for name, doing in zip(NAMES, doings, strict=True):
            if doing == "beat":
                history.heartbeat(name)
            elif doing == "commit":
                history.heartbeat(name, "2.0.0" if history.versions[name] == "1.0.0" else "1.0.0")
            elif doing == "fail":
                history.fail(name, len(history.contacts[name]))
        operate(history, operation)
        history.evaluate()
    span = history.t + 1
    for a, b in windows:
        since, until = sorted((a * span, b * span))
        until = max(until, since + 1)
        document = history.report(since, until)
        check_invariants(document)
        expected = sum(
            expected_down(log, since, until, history.t) for log in history.contacts.values()
        )
        assert document["uptime"]["down_s"] == pytest.approx(expected, abs=0.01)


# --- the command --------------------------------------------------------------------------------


def run(*args: str) -> Result:
    return CliRunner().invoke(fleet, ["slo", "report", *args])


def test_the_command_prints_the_table_and_the_json(
    history: History, enrolled: Enrolled, monkeypatch: pytest.MonkeyPatch
) -> None:
    known_history(history, enrolled)
    monkeypatch.setattr("server.cli.slo.utc_now", lambda: at(2000))
    args = [*data_dir_args(history.harness), "--since", "2023-11-14T22:13:20Z"]
    table = run(*args)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0] == "window 2023-11-14T22:13:20Z to 2023-11-14T22:46:40Z (made " \
        "2023-11-14T22:46:40Z)"  # fmt: skip
    assert any(line.split() == ["Uptime", ">=", "99.900", "%", "90.000", "%", "missed"]
               for line in lines), lines  # fmt: skip
    assert any(line.split() == ["Mean", "time", "to", "recovery", "<", "15m00s", "7m50s", "met"]
               for line in lines), lines  # fmt: skip
    assert any(line.split()[:4] == ["100%", "1", "1", "50.00"] for line in lines), lines
    as_json = run(*args, "--json", "--until", "200s")  # 200 s before 2000: 1800
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.output)
    assert document["window"] == {"since": "2023-11-14T22:13:20Z", "until": "2023-11-14T22:43:20Z"}
    assert list(document) == [
        "window", "generated", "contact_record_since", "objectives", "uptime", "updates",
        "releases", "incidents",
    ]  # fmt: skip
    assert document == history.report(0, 1800) | {"generated": "2023-11-14T22:46:40Z"}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--since", "yesterday"], "Invalid value for '--since': 'yesterday': give a time"),
        (["--until", "2026-12-01T06:00"], "give the time's offset"),
        (["--since", "1d", "--until", "2d"], "the window ends (20"),
        (["--since", "0s"], "give a positive number of seconds"),
        (["--since", "0001-01-01T00:00:00+01:00"], "give a time from 1970-01-01"),
        (["--until", "0001-01-02"], "give a time from 1970-01-01"),
        (["--since", "9999-12-31T23:00:00-05:00"], "to before 9999-01-01"),
        (["--since", "1969-12-31T23:59:59Z"], "give a time from 1970-01-01"),
    ],
)
def test_bad_windows_are_usage_errors(harness: Harness, args: list[str], fragment: str) -> None:
    result = run(*data_dir_args(harness), *args)
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_a_database_that_is_not_migrated_is_one_error(harness: Harness) -> None:
    harness.db.migrate("0010")
    result = run(*data_dir_args(harness))
    assert_one_line_error(result, "its schema is at revision 0010, not 0011")
    assert_one_line_error(run("--data-dir", str(harness.settings.data_dir / "none")),
                          "no such directory")  # fmt: skip
    assert_one_line_error(run(), "give --data-dir or --database-url")
    missing = harness.settings.data_dir / "other.db"
    assert_one_line_error(run("--database-url", f"sqlite:///{missing}"), "no such database file")
    assert not missing.exists()  # a report creates nothing
