"""The web console's read queries (server/ui/queries.py): parsing the device list's URL, the list
against an independent count in Python, the overview's counts, a device's detail, and the
alerts read from an Alertmanager on 127.0.0.1."""

from __future__ import annotations

import itertools
import json
import random
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.database import Database
from server.devices import record_events
from server.errors import InvalidRequestError, UnknownDeviceError
from server.models import Device, Release, Rollout, RolloutDevice
from server.rollouts import offline
from server.schemas import Event
from server.ui import queries
from server.ui.queries import (
    OFFLINE_AFTER_S,
    PER_PAGE,
    SORT_KEYS,
    DeviceQuery,
    ascii_lower,
    device_detail,
    device_page,
    firing_alerts,
    overview,
)

NOW = datetime(2026, 12, 3, 20, 0, tzinfo=UTC)
HOSTILE = ["%", "_", "\\", "<script>", "é", "É", "%_", "a%b", "A_B", "ü-ß", "cam", "CAM", "x"]
STATES = [None, "idle", "downloading", "trial", "safe_mode", "enrolled"]
VERSIONS = [None, "1.0", "1.1", "1%", "v_2", "unknown", "<b>"]
ROLES = [None, "camera", "gate_way", "gatexway"]
TAGS = ["lab", "a_b", "axb", "eu", "prod", "p.r"]
STATUSES = ["active", "active", "active", "quarantined", "decommissioned"]
AGES_S = [0, 60, OFFLINE_AFTER_S - 1, OFFLINE_AFTER_S, OFFLINE_AFTER_S + 1, 3600, 86400, 8 * 86400]


def _database(path: Path) -> Database:
    db = Database(f"sqlite:///{path / 'fleet.db'}")
    db.migrate()
    return db


def _seed(db: Database, count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)  # noqa: S311 (test data)
    devices: list[dict[str, Any]] = []
    for i in range(count):
        name = "".join(rng.choice(HOSTILE) for _ in range(rng.randrange(1, 4))) + f"-{i}"
        heartbeat = {"temperature_c": rng.choice([None, 41.5]), "free_space_mb": 900.0}
        tags = sorted(set(rng.sample(TAGS, rng.randrange(0, 3))))
        devices.append(
            {
                "id": f"{rng.getrandbits(256):064x}",
                "hostname": name,
                "version": rng.choice(VERSIONS),
                "state": rng.choice(STATES),
                "role": rng.choice(ROLES),
                "tags": json.dumps(tags) if tags else None,
                "tag_list": tags,
                "last_seen": NOW - timedelta(seconds=rng.choice(AGES_S)),
                # many ties, so the order's tie-break on the id shows
                "enrolled": NOW - timedelta(days=rng.randrange(3)),
                "status": rng.choice(STATUSES),
                "last_heartbeat": json.dumps(heartbeat),
            }
        )
    with db.write() as session:
        for d in devices:
            session.add(
                Device(
                    id=d["id"], public_key="00" * 32, compatible="cam", hostname=d["hostname"],
                    enrolled=d["enrolled"], last_seen=d["last_seen"], version=d["version"],
                    state=d["state"], role=d["role"], tags=d["tags"], status=d["status"],
                    last_heartbeat=d["last_heartbeat"],
                )
            )  # fmt: skip
    return devices


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Database, list[dict[str, Any]]]:
    db = _database(tmp_path_factory.mktemp("queries"))
    return db, _seed(db, 300, seed=7)


def _matches(d: dict[str, Any], q: DeviceQuery) -> bool:
    """The filters, written again in Python from the documented rules."""
    online = not offline(d["last_seen"], NOW, OFFLINE_AFTER_S)
    state = d["state"] or "enrolled"
    checks = [
        q.q is None
        or d["id"].startswith(ascii_lower(q.q))
        or ascii_lower(q.q) in ascii_lower(d["hostname"]),
        q.version is None
        or d["version"] == q.version
        or (q.version == "unknown" and d["version"] is None),
        q.state is None
        or {"online": online, "offline": not online, "unhealthy": state == "safe_mode"}.get(
            q.state, state == q.state
        ),
        q.role is None or d["role"] == q.role,
        q.tag is None or q.tag in d["tag_list"],
        q.seen_within is None or NOW - d["last_seen"] <= timedelta(seconds=q.seen_within),
        q.not_seen_within is None or NOW - d["last_seen"] > timedelta(seconds=q.not_seen_within),
        q.status is None or d["status"] == q.status,
    ]  # fmt: skip
    return all(checks)


def _ordered(devices: list[dict[str, Any]], sort: str) -> list[dict[str, Any]]:
    key = sort.removeprefix("-")
    # no value sorts as the smallest, ties by id, either way
    ranked = sorted(
        devices, key=lambda d: (d[key] is not None, d[key] if d[key] is not None else "", d["id"])
    )
    return list(reversed(ranked)) if sort.startswith("-") else ranked


PARAM_NAMES = [
    "q", "version", "state", "role", "tag", "seen_within", "not_seen_within", "status", "sort",
    "page", "per_page", "unknown", "",
]  # fmt: skip
VALUES = st.one_of(
    st.sampled_from(
        [
            "", " ", "1h", "24h", "7d", "0h", "999999d", "30m", "1.5h", "-1", "0", "1", "2", "25",
            "200", "201", "hostname", "-last_seen", "--hostname", "online", "safe-mode",
            "never-reported", "Idle", "active", "quarantined", "lab", "a_b", "%", "\x00", "\n",
            "é", "<script>", "9" * 20,
        ]
    ),
    st.text(max_size=30),
)  # fmt: skip


@given(st.dictionaries(st.sampled_from(PARAM_NAMES), VALUES, max_size=8))
def test_any_parameters_give_a_query_or_a_clear_refusal(params: dict[str, str]) -> None:
    try:
        query = DeviceQuery.from_params(params)
    except InvalidRequestError as err:
        name = str(err).split(":", 1)[0]
        assert name in PARAM_NAMES and params.get(name, "").strip()
        return
    assert 1 <= query.page <= queries.MAX_PAGE
    assert query.per_page in PER_PAGE
    assert query.sort.removeprefix("-") in SORT_KEYS
    assert DeviceQuery.from_params(query.to_params()) == query


def test_bad_values_are_refused_naming_the_parameter() -> None:
    for params, name in [
        ({"per_page": "30"}, "per_page"),
        ({"page": "0"}, "page"),
        ({"page": "x"}, "page"),
        ({"sort": "public_key"}, "sort"),
        ({"status": "gone"}, "status"),
        ({"seen_within": "5y"}, "seen_within"),
        ({"tag": "A B"}, "tag"),
        ({"q": "a\x00"}, "q"),
        # free text as the API's: no bidi override, no C1 control, no unassigned code point
        ({"q": "cam\u202e"}, "q"),
        ({"q": "cam\x9b"}, "q"),
        ({"version": "1.0\u2028b"}, "version"),
        ({"version": "1.0\U000e0001"}, "version"),
    ]:
        with pytest.raises(InvalidRequestError, match=f"^{name}: "):
            DeviceQuery.from_params(params)
    assert DeviceQuery.from_params({"other": "x", "q": "  "}) == DeviceQuery()
    assert DeviceQuery.from_params({"state": "never-reported"}).state == "enrolled"
    assert DeviceQuery(seen_within=86400, page=3).to_params() == {"seen_within": "1d", "page": "3"}


QUERIES = st.builds(
    DeviceQuery,
    q=st.one_of(st.none(), st.sampled_from([*HOSTILE, "-1", "0", "a", "%-", "1-", "\\%"])),
    version=st.one_of(st.none(), st.sampled_from([v for v in VERSIONS if v] + ["1_0", "%"])),
    state=st.one_of(st.none(), st.sampled_from([*queries.DERIVED_STATES, *STATES[1:]])),
    role=st.one_of(st.none(), st.sampled_from([r for r in ROLES if r])),
    tag=st.one_of(st.none(), st.sampled_from(TAGS)),
    seen_within=st.one_of(st.none(), st.sampled_from([60, OFFLINE_AFTER_S, 3600, 86400])),
    not_seen_within=st.one_of(st.none(), st.sampled_from([60, OFFLINE_AFTER_S, 86400])),
    status=st.one_of(st.none(), st.sampled_from(["active", "quarantined", "decommissioned"])),
    sort=st.sampled_from([*SORT_KEYS, *(f"-{k}" for k in SORT_KEYS)]),
    page=st.integers(1, 4),
    per_page=st.sampled_from(PER_PAGE),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(QUERIES)
def test_a_page_holds_exactly_the_matching_devices_in_order(
    seeded: tuple[Database, list[dict[str, Any]]], query: DeviceQuery
) -> None:
    db, devices = seeded
    expected = _ordered([d for d in devices if _matches(d, query)], query.sort)
    page = device_page(db, NOW, query)
    assert page.total == len(expected)
    assert page.pages == max(1, -(-len(expected) // query.per_page))
    start = (query.page - 1) * query.per_page
    assert [r.id for r in page.rows] == [d["id"] for d in expected[start : start + query.per_page]]
    for row in page.rows:
        assert row.online == (
            not offline(datetime.fromisoformat(row.last_seen), NOW, OFFLINE_AFTER_S)
        )


def test_the_text_search_takes_wildcards_literally(tmp_path: Path) -> None:
    db = _database(tmp_path)
    _seed(db, 0, seed=0)
    with db.write() as session:
        for i, name in enumerate(["a%b", "axb", "a_b", "a\\b", "A%B-2"]):
            session.add(
                Device(id=f"{i:064x}", public_key="00" * 32, compatible="cam", hostname=name,
                       enrolled=NOW, last_seen=NOW)
            )  # fmt: skip
    hostnames = lambda q: sorted(r.hostname for r in device_page(db, NOW, DeviceQuery(q=q)).rows)  # noqa: E731
    assert hostnames("%") == ["A%B-2", "a%b"]
    assert hostnames("_") == ["a_b"]
    assert hostnames("\\") == ["a\\b"]
    assert hostnames("A%b") == ["A%B-2", "a%b"]
    assert hostnames("0000") == ["A%B-2", "a%b", "a\\b", "a_b", "axb"]  # an id prefix


def test_the_overview_counts_as_python_does(seeded: tuple[Database, list[dict[str, Any]]]) -> None:
    db, devices = seeded
    view = overview(db, NOW)
    online = [d for d in devices if not offline(d["last_seen"], NOW, OFFLINE_AFTER_S)]
    active = [d for d in devices if d["status"] == "active"]
    healthy = [d for d in active if d in online and d["state"] != "safe_mode"]
    assert view.total == len(devices)
    assert (view.online, view.offline) == (len(online), len(devices) - len(online))
    assert view.safe_mode == view.unhealthy == sum(d["state"] == "safe_mode" for d in devices)
    assert view.decommissioned == sum(d["status"] == "decommissioned" for d in devices)
    assert (view.active, view.healthy) == (len(active), len(healthy))
    assert view.health_percent == round(100 * len(healthy) / len(active), 1)
    assert "active devices" in view.health_rule
    versions = {v.version: v.count for v in view.versions}
    assert versions["unknown"] == sum(d["version"] in (None, "unknown") for d in devices)
    assert sum(versions.values()) == len(devices)
    assert [v.count for v in view.versions] == sorted(versions.values(), reverse=True)
    assert view.rollouts == () and view.emergency_stop["active"] is False


def test_a_device_detail_has_its_slots_boots_timeline_and_links(tmp_path: Path) -> None:
    db = _database(tmp_path)
    device_id = "ab" * 32
    heartbeat = {
        "version": "2.0", "booted": "b", "primary": "b", "trial": False, "updater_state": "idle",
        "slots": {"a": {"status": "good", "version": "1.0"},
                  "b": {"status": "good", "version": "2.0"}},
        "temperature_c": 55.0, "free_space_mb": 1200.0, "metrics_address": "[fd00::7]:9100",
    }  # fmt: skip
    with db.write() as session:
        session.add(
            Device(id=device_id, public_key="00" * 32, compatible="cam", hostname="cam-1",
                   enrolled=NOW, last_seen=NOW - timedelta(hours=1),
                   last_heartbeat=json.dumps(heartbeat), version="2.0", state="idle")
        )  # fmt: skip
        session.add(
            Release(version="2.0", product="p", compatible="cam", security_version=4,
                    manifest=b"{}", manifest_sha256="00" * 32, signature=b"", created=NOW,
                    uploaded_by="admin")
        )  # fmt: skip
    record_events(
        db, device_id,
        [Event(event="install.started", seq=1), Event(event="daemon.started", seq=2),
         Event(event="boot_check.committed", seq=3), Event(event="boot_check.fell_back", seq=4)],
        NOW,
    )  # fmt: skip
    settings_ = SimpleNamespace(grafana_url="https://grafana.example/", loki_url=None)
    detail = device_detail(db, device_id, NOW, settings_)
    assert detail["hostname"] == "cam-1" and detail["online"] is True  # its events: seen now
    assert [
        (s["name"], s["release"], s["security_version"], s["booted"]) for s in detail["slots"]
    ] == [
        ("a", "1.0", None, False),
        ("b", "2.0", 4, True),
    ]
    assert [b["kind"] for b in detail["boot_history"]] == ["fallback", "commit", "install"]
    assert [e["action"] for e in detail["timeline"]][:2] == [
        "boot_check.fell_back",
        "boot_check.committed",
    ]
    assert detail["figures"] == {"temperature_c": 55.0, "free_space_mb": 1200.0}
    assert detail["address"] == "fd00::7"
    assert (
        detail["grafana_url"] == f"https://grafana.example/d/fleet-device/?var-device={device_id}"
    )
    assert detail["loki_url"] is None
    with pytest.raises(UnknownDeviceError):
        device_detail(db, "cd" * 32, NOW)


@pytest.mark.parametrize(
    ("reported", "address"),
    [
        ("10.0.0.7:9100", "10.0.0.7"),
        ("[fd00::1]:9100", "fd00::1"),
        ("cam-1.lan:9100", "cam-1.lan"),
        ("-oProxyCommand=x:1", None),
        ("a;rm -rf /:1", None),
        ("<script>:1", None),
        (None, None),
        (7, None),
    ],
)
def test_only_an_ip_address_or_host_name_is_offered_for_ssh(reported: Any, address: Any) -> None:
    assert queries._address(reported) == address


class _Alertmanager(BaseHTTPRequestHandler):
    mode = "good"
    calls = 0

    def do_GET(self) -> None:
        type(self).calls += 1
        assert "active=true" in self.path and "silenced=false" in self.path
        if self.mode == "slow":
            time.sleep(3)
        if self.mode == "trickle":  # a byte now and then: each read is quick, the answer endless
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"[")
            for _ in range(40):
                time.sleep(0.25)
                self.wfile.write(b" ")
                self.wfile.flush()
            return
        body = {
            "good": json.dumps(
                [{"labels": {"alertname": f"DeviceOffline{i}", "severity": "warning"},
                  "annotations": {"summary": "<b>cam</b> offline"},
                  "startsAt": "2026-12-03T19:00:00Z"} for i in range(60)]
            ),
            "bad": "{not json",
            "slow": "[]",
        }[self.mode].encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def alertmanager() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Alertmanager)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    queries._alerts_cache.clear()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        queries._alerts_cache.clear()


def test_firing_alerts_good_bad_slow_and_cached(alertmanager: str) -> None:
    assert firing_alerts(SimpleNamespace(alertmanager_url=None)).configured is False
    clock = [100.0]
    settings_ = SimpleNamespace(alertmanager_url=alertmanager)
    _Alertmanager.mode, _Alertmanager.calls = "good", 0
    view = firing_alerts(settings_, clock=lambda: clock[0])
    assert view.configured and view.error is None and view.more
    assert len(view.alerts) == 50
    assert view.alerts[0] == queries.Alert(
        "DeviceOffline0", "warning", "<b>cam</b> offline", "2026-12-03T19:00:00Z"
    )
    _Alertmanager.mode = "bad"
    clock[0] += 9
    assert firing_alerts(settings_, clock=lambda: clock[0]) == view  # cached for 10 s
    assert _Alertmanager.calls == 1
    clock[0] += 2
    assert (
        firing_alerts(settings_, clock=lambda: clock[0]).error
        == "Alertmanager's answer is not JSON"
    )
    _Alertmanager.mode = "slow"
    clock[0] += 11
    started = time.monotonic()
    slow = firing_alerts(settings_, clock=lambda: clock[0])
    assert slow.error is not None and "2 s" in slow.error
    assert time.monotonic() - started < 2.9
    _Alertmanager.mode = "trickle"
    clock[0] += 11
    started = time.monotonic()
    trickled = firing_alerts(settings_, clock=lambda: clock[0])
    assert trickled.error is not None and "2 s" in trickled.error
    assert time.monotonic() - started < 2.9
    # and the asking stops too, its answer cut off
    time.sleep(1)
    assert not [t for t in threading.enumerate() if t.name == "alertmanager"]
    queries._alerts_cache.clear()
    gone = firing_alerts(SimpleNamespace(alertmanager_url="http://127.0.0.1:9"))
    assert gone.error is not None and gone.error.startswith("Alertmanager unreachable")


def test_unhealthy_is_the_fleet_guards_rule(tmp_path: Path) -> None:
    """Failed in an active rollout counts, failed in a halted one does not (its devices are on
    their way back), safe mode does: as server.rollouts.unhealthy says."""
    db = _database(tmp_path)
    devices = _seed(db, 0, seed=0)
    with db.write() as session:
        release = Release(
            version="2.0", product="p", compatible="cam", security_version=1, manifest=b"{}",
            manifest_sha256="00" * 32, signature=b"", created=NOW, uploaded_by="admin",
        )  # fmt: skip
        session.add(release)
        session.flush()
        for i, state in enumerate(["idle", "idle", "safe_mode", None]):
            session.add(
                Device(id=f"{i:064x}", public_key="00" * 32, compatible="cam", hostname=f"c{i}",
                       enrolled=NOW, last_seen=NOW, state=state)
            )  # fmt: skip
        for rollout_id, (rollout_state, member) in enumerate(
            [("running", 0), ("halted", 1)], start=1
        ):
            session.add(
                Rollout(id=rollout_id, release_id=release.id, canary_ids="[]", stages="[100]",
                        soak_s=0, max_failure_rate=0.0, install_deadline_s=60,
                        rollback_on_halt=False, state=rollout_state, stage=0, stage_started=NOW,
                        created=NOW, created_by="admin")
            )  # fmt: skip
            session.flush()
            session.add(
                RolloutDevice(rollout_id=rollout_id, device_id=f"{member:064x}", stage=0,
                              assigned_at=NOW, outcome="failed")
            )  # fmt: skip
    assert devices == []
    page = device_page(db, NOW, DeviceQuery(state="unhealthy"))
    assert [r.hostname for r in page.rows] == ["c0", "c2"]
    view = overview(db, NOW)
    assert (view.unhealthy, view.safe_mode, view.healthy) == (2, 1, 2)
    assert [r["id"] for r in view.rollouts] == [2, 1]  # a halted one waits for an operator


# One value of each filter, several for those that take different conditions.
FILTER_VALUES: dict[str, list[Any]] = {
    "q": ["ab"],
    "version": ["2.0", queries.UNKNOWN_VERSION],
    "state": ["idle", queries.NEVER_REPORTED, *queries.DERIVED_STATES],
    "role": ["camera"],
    "tag": ["eu"],
    "seen_within": [3600],
    "not_seen_within": [60],
    "status": ["active"],
}
# How the plan reads the devices: from an index holding every column it needs, or the one row
# of a device named by id (a device failed in an active rollout, for "unhealthy").
READS_DEVICES = re.compile(r"\b(SCAN|SEARCH) devices\b")
INDEX_ONLY = re.compile(r"USING COVERING INDEX |USING INDEX sqlite_autoindex_devices_1 \(id=\?\)$")


def _filter_combinations() -> Iterator[DeviceQuery]:
    names = list(FILTER_VALUES)
    for size in range(len(names) + 1):
        for chosen in itertools.combinations(names, size):
            for values in itertools.product(*(FILTER_VALUES[n] for n in chosen)):
                yield DeviceQuery(**dict(zip(chosen, values, strict=True)))


def test_the_count_under_any_filters_reads_an_index_alone(tmp_path: Path) -> None:
    """Every combination of filters: the count's plan (SQLite) never reads the table's wide rows
    (the last heartbeat's JSON), by a scan or through an index that lacks a column it needs."""
    db = _database(tmp_path)
    checked = 0
    with db.read() as session:
        connection = session.connection()
        for query in _filter_combinations():
            statement = queries.count_statement(query, NOW).compile(
                connection.engine, compile_kwargs={"literal_binds": True}
            )
            plan = [row[3] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}")]
            reads = [step for step in plan if READS_DEVICES.search(step)]
            assert reads, (query, plan)
            assert all(INDEX_ONLY.search(step) for step in reads), (query, plan)
            checked += 1
    assert checked == 2 * 3 * 6 * 2 * 2 * 2 * 2 * 2


def _plan(db: Database, statement: Any) -> list[str]:
    with db.read() as session:
        connection = session.connection()
        sql = statement.compile(connection.engine, compile_kwargs={"literal_binds": True})
        return [row[3] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")]


def test_the_reported_versions_and_states_are_the_fleets(
    seeded: tuple[Database, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """What DISTINCT gives, NULL aside (a state never reported is "enrolled"), read by seeks on
    the columns' indexes, never a scan of the table or of a whole index."""
    db, devices = seeded
    versions, states = queries.reported(db)
    assert versions == sorted({d["version"] for d in devices} - {None})
    assert states == sorted({d["state"] or queries.NEVER_REPORTED for d in devices})
    for column in (Device.version, Device.state):
        plan = _plan(db, queries.distinct_statement(column))
        reads = [step for step in plan if READS_DEVICES.search(step)]
        assert reads, plan
        assert all(step.startswith("SEARCH devices USING COVERING INDEX") for step in reads), plan
    empty = _database(tmp_path)
    assert queries.reported(empty) == ([], [])
    with empty.write() as session:
        session.add(
            Device(id="0" * 64, public_key="00" * 32, compatible="cam", hostname="a",
                   enrolled=NOW, last_seen=NOW, version="", state="idle")
        )  # fmt: skip
    assert queries.reported(empty) == ([""], ["idle"])
