"""Hostile text: refused on the way in (422 naming the field, nothing stored), escaped on the way
out (what the ``fleet`` commands print holds no control, format or separator character, even
for rows an older server stored)."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from fleet_core.cli import fleet
from fleet_core.text import REFUSED_CATEGORIES, printable, refused_character
from server import audit
from server.app import create_app
from server.auth import Role, create_operator_token
from server.errors import SettingsError
from server.models import (
    AuditRow,
    Device,
    EnrollmentToken,
    FleetControl,
    OperatorToken,
    Release,
    Rollout,
)
from server.scrape import parse_networks
from server.settings import Settings, utc
from tests.conftest import assert_one_line_error
from tests.server.conftest import FakeClock, FakeDevice, Harness, LiveServer, make_settings

Enrolled = Callable[..., FakeDevice]
MakeBundle = Callable[..., Path]

# One of each class the rule refuses, by name (the test ids say which one failed).
HOSTILE = {
    "nul": "\x00",
    "esc": "\x1b[2J",
    "tab": "\t",
    "newline": "\n",
    "del": "\x7f",
    "c1-csi": "\x9b31m",
    "line-separator": "\u2028",
    "paragraph-separator": "\u2029",
    "rlo": "\u202e",
    "lri": "\u2066",
    "zero-width-space": "\u200b",
    "lrm": "\u200e",
    "bom": "\ufeff",
    "private-use": "\ue000",
    "private-use-plane-15": "\U000f0000",
    "tag-character": "\U000e0041",
    "unassigned": "\u0378",
}
FRIENDLY = ["é", "東京", "Ünïcödé ok", "cam 🚀", "a\u00a0b", "ﬁx ∑ ß", "Ελλάδα", "שלום"]


def with_hostile(char: str) -> str:
    return f"v{char}1"


def is_raw(char: str) -> bool:
    return unicodedata.category(char) in REFUSED_CATEGORIES and char != "\n"


def assert_inert(output: str) -> None:
    """No character a terminal would obey or that would reorder a line; only the output's own
    newlines."""
    raw = [f"U+{ord(c):04X}" for c in output if is_raw(c)]
    assert not raw, f"raw characters in the output: {raw}\n{output!r}"


def assert_refused(response: Any, field: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_request", body
    assert body["detail"].startswith(field + ":"), body
    assert refused_character(body["detail"]) is None, body  # the detail echoes nothing raw


# --- the rule and the escaping ------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE)
def test_the_rule_refuses_each_class_and_the_escaping_shows_it(name: str) -> None:
    text = with_hostile(HOSTILE[name])
    assert refused_character(text) is not None
    shown = printable(text)
    assert refused_character(shown) is None
    assert "\\" in shown and shown.startswith("v") and shown.endswith("1")


def test_ordinary_unicode_is_kept_as_it_is() -> None:
    for text in FRIENDLY:
        assert refused_character(text) is None, text
        assert printable(text) == text


def test_escapes_are_visible_and_distinct() -> None:
    assert printable("a\x9bb") == "a\\x9bb"
    assert printable("\x1b[31m") == "\\x1b[31m"
    assert printable("x\u202ey") == "x\\u202ey"
    assert printable("\t\n\r") == "\\t\\n\\r"
    assert printable("\U000e0041") == "\\U000e0041"
    assert printable("\ud800") == "\\ud800"  # a lone surrogate, as an older store could hold
    assert refused_character("a\tb", allow="\t") is None


# --- every free-text field of every request schema ---------------------------------------------


def heartbeat_field(device: FakeDevice, path: str, text: str) -> Any:
    changes: dict[str, Any] = {
        "version": {"version": text},
        "slots.a.version": {"slots": {"a": {"status": "good", "version": text}}},
        "health.0.name": {"health": [{"name": text, "ok": True}]},
        "role": {"role": text},
        "tags.0": {"tags": [text]},
        "metrics_address": {"metrics_address": f"cam{text}:9101"},
    }[path]
    return device.heartbeat(**changes)


HEARTBEAT_FIELDS = ["version", "slots.a.version", "health.0.name", "role", "tags.0",
                    "metrics_address"]  # fmt: skip


@pytest.mark.parametrize("path", HEARTBEAT_FIELDS)
def test_heartbeat_text_fields_refuse_each_class_and_store_nothing(
    harness: Harness, enrolled: Enrolled, path: str
) -> None:
    device = enrolled()
    assert device.heartbeat().status_code == 204
    before = harness.client.get(f"/api/v1/devices/{device.id}", headers=harness.viewer).json()
    for name, char in HOSTILE.items():
        response = heartbeat_field(device, path, with_hostile(char))
        assert_refused(response, path)
        after = harness.client.get(f"/api/v1/devices/{device.id}", headers=harness.viewer)
        assert after.json() == before, name


def test_the_enrollment_hostname_refuses_each_class(harness: Harness) -> None:
    for name, char in HOSTILE.items():
        device = FakeDevice(harness.client, hostname=f"cam{char}1")
        assert_refused(device.enroll(harness.enrollment_token()), "hostname")
        assert harness.count(Device) == 0, name


def events_of(harness: Harness, device: FakeDevice) -> list[dict[str, Any]]:
    entries = harness.client.get("/api/v1/audit?limit=1000", headers=harness.viewer).json()
    return [
        e
        for e in entries["entries"]
        if e["actor"] == f"device:{device.id}" and e["action"] == "install.failed"
    ]


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        (lambda t: {"error": t}, "fields.error"),
        (lambda t: {t: "x"}, "fields.v"),
        (lambda t: {"nested": {"deeper": [1, t]}}, "fields.nested.deeper[1]"),
        (lambda t: {"nested": {t: 1}}, "fields.nested.v"),
    ],
    ids=["value", "key", "nested-value", "nested-key"],
)
def test_event_field_keys_and_values_refuse_each_class(
    harness: Harness, enrolled: Enrolled, fields: Callable[[str], Any], where: str
) -> None:
    device = enrolled()
    for name, char in HOSTILE.items():
        if char == "\t" and where in ("fields.error", "fields.nested.deeper[1]"):
            continue  # a log line keeps its tabs: see the next test
        event = {"event": "install.failed", "seq": 1, "fields": fields(with_hostile(char))}
        body = {"events": [event]}
        response = harness.client.post(
            f"/api/v1/devices/{device.id}/events", json=body, headers=device.headers
        )
        assert_refused(response, "events.0.fields")
        assert response.json()["detail"].startswith(f"events.0.fields: Value error, {where}"), (
            name,
            response.json(),
        )
        assert events_of(harness, device) == [], name


def test_event_values_keep_tabs_and_unicode_keys_do_not_take_tabs(
    harness: Harness, enrolled: Enrolled
) -> None:
    device = enrolled()
    fields = {"error": "step\tfailed: 東京 é", "названия": ["ok"]}
    body = {"events": [{"event": "install.failed", "seq": 1, "fields": fields}]}
    url = f"/api/v1/devices/{device.id}/events"
    assert harness.client.post(url, json=body, headers=device.headers).status_code == 204
    assert [e["details"]["fields"] for e in events_of(harness, device)] == [fields]
    tabbed = {"events": [{"event": "install.failed", "seq": 2, "fields": {"a\tb": 1}}]}
    assert_refused(harness.client.post(url, json=tabbed, headers=device.headers), "events.0.fields")


def test_operator_text_fields_refuse_each_class(
    harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle
) -> None:
    assert harness.upload(make_bundle(version="2.0.0")).status_code == 201
    device = enrolled()
    post = harness.client.post
    entries = harness.count(AuditRow)
    for name, char in HOSTILE.items():
        text = with_hostile(char)
        checks = [
            (f"/api/v1/devices/{device.id}/assignment", {"version": text}, "version"),
            ("/api/v1/operator-tokens", {"name": text, "role": "viewer"}, "name"),
            ("/api/v1/rollouts", {"version": text}, "version"),
            ("/api/v1/emergency-stop", {"reason": text}, "reason"),
        ]
        for url, body, field in checks:
            assert_refused(post(url, json=body, headers=harness.admin), field)
        assert harness.count(AuditRow) == entries, name  # nothing of it was done
    rollout = post("/api/v1/rollouts", json={"version": "2.0.0"}, headers=harness.operator)
    assert rollout.status_code == 201, rollout.text
    pause = f"/api/v1/rollouts/{rollout.json()['id']}/pause"
    for char in HOSTILE.values():
        refused = post(pause, json={"reason": with_hostile(char)}, headers=harness.operator)
        assert_refused(refused, "reason")
    paused = post(pause, json={"reason": "東京 maintenance"}, headers=harness.operator)
    assert paused.status_code == 200, paused.text


def test_ordinary_unicode_is_accepted_and_stored_as_sent(
    harness: Harness, enrolled: Enrolled
) -> None:
    device = enrolled()
    for text in FRIENDLY:
        response = device.heartbeat(version=text, health=[{"name": text, "ok": True}])
        assert response.status_code == 204, (text, response.text)
        shown = harness.client.get(f"/api/v1/devices/{device.id}", headers=harness.viewer).json()
        assert shown["version"] == text
        assert shown["last_heartbeat"]["health"] == [{"name": text, "ok": True}]
        created = harness.client.post(
            "/api/v1/operator-tokens", json={"name": text, "role": "viewer"}, headers=harness.admin
        )
        assert created.status_code == 201, created.text


def test_a_lone_surrogate_is_refused(harness: Harness, enrolled: Enrolled) -> None:
    device = enrolled()
    body = json.dumps({"version": "v\ud800", "booted": "a", "primary": "a", "trial": False,
                       "slots": {}, "updater_state": "idle"})  # fmt: skip
    assert '"v\\ud800"' in body  # JSON's escape of a lone surrogate
    response = harness.client.post(
        f"/api/v1/devices/{device.id}/heartbeat",
        content=body,
        headers={**device.headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    shown = harness.client.get(f"/api/v1/devices/{device.id}", headers=harness.viewer).json()
    assert shown["last_heartbeat"] is None


# --- what the fleet commands print ----------------------------------------------------------


def run(*args: str | Path) -> Result:
    # color=True: click would otherwise strip ESC [ sequences from the output itself, and a
    # test of the escaping would pass without it
    return CliRunner().invoke(fleet, [str(a) for a in args], color=True)


def api(live: LiveServer, role: str = "operator") -> list[str]:
    token = live.harness.headers[role]["Authorization"].split()[1]
    return ["--server", live.url, "--token", token]


# Everything but NUL, which PostgreSQL cannot store (an older server could not have either).
EVIL = "".join(char for name, char in HOSTILE.items() if name != "nul")


def plant_old_rows(harness: Harness, device_id: str, rollout_id: int) -> None:
    """What an older server, without the rule, could have stored."""
    with harness.db.write() as session:
        session.execute(
            update(Device)
            .where(Device.id == device_id)
            .values(
                hostname=f"cam{EVIL}",
                version=f"1.0{EVIL}",
                state=f"idle{EVIL}",
                compatible=f"rpi{EVIL}",
            )
        )
        session.execute(update(Release).values(version=f"2.0.0{EVIL}"))
        session.execute(update(Rollout).where(Rollout.id == rollout_id).values(reason=EVIL))
        session.execute(update(FleetControl).values(reason=f"stop{EVIL}"))
        session.execute(
            update(OperatorToken)
            .where(OperatorToken.name == "test-viewer")
            .values(name=f"viewer{EVIL}", created_by=f"by{EVIL}")
        )
        session.execute(update(EnrollmentToken).values(created_by=f"enroller{EVIL}"))
        audit.append(
            harness.db, session, at=utc(harness.clock), actor=f"device:{EVIL}",
            action=f"install.failed{EVIL}", subject=f"s{EVIL}",
            details={"fields": {f"k{EVIL}": f"v{EVIL}"}},
        )  # fmt: skip


def test_rows_stored_by_an_older_server_print_inertly(
    live_server: LiveServer, enrolled: Enrolled, make_bundle: MakeBundle
) -> None:
    harness = live_server.harness
    device = enrolled()
    assert device.heartbeat().status_code == 204
    assert harness.upload(make_bundle(version="2.0.0")).status_code == 201
    post = harness.client.post
    rollout = post("/api/v1/rollouts", json={"version": "2.0.0"}, headers=harness.operator).json()
    post(f"/api/v1/rollouts/{rollout['id']}/pause", json={"reason": "x"}, headers=harness.operator)
    assert post("/api/v1/emergency-stop", json={}, headers=harness.operator).status_code == 200
    plant_old_rows(harness, device.id, rollout["id"])

    outputs = {
        "device list": run("device", "list", *api(live_server, "viewer")),
        "audit list": run("audit", "list", "--last", "1000", *api(live_server, "viewer")),
        "release list": run("release", "list", *api(live_server, "viewer")),
        "rollout status": run("rollout", "status", *api(live_server, "viewer")),
        "emergency-stop": run("emergency-stop", *api(live_server)),
        "pause": run("rollout", "pause", str(rollout["id"]), *api(live_server)),
        "token list": run("server", "token", "list", *api(live_server, "admin")),
        "enrollment-token list": run(
            "server", "enrollment-token", "list", "--database-url", harness.settings.database_url
        ),
    }
    for what, result in outputs.items():
        assert result.exit_code == (1 if what == "pause" else 0), (what, result.output)
        assert_inert(result.output)
    assert "cam\\x1b[2J\\t\\n\\x7f\\x9b31m\\u2028" in outputs["device list"].output
    assert "\\u202e" in outputs["audit list"].output
    assert "2.0.0\\x1b" in outputs["release list"].output
    assert "stop\\x1b" in outputs["rollout status"].output
    assert "\\U000e0041" in outputs["rollout status"].output
    assert "viewer\\x1b[2J" in outputs["token list"].output
    assert "enroller\\x1b[2J" in outputs["enrollment-token list"].output
    device_rows = [line for line in outputs["device list"].output.splitlines() if device.id in line]
    assert len(device_rows) == 1  # the hostile newlines forged no line
    audit_rows = [ln for ln in outputs["audit list"].output.splitlines() if "install.failed" in ln]
    assert len(audit_rows) == 1

    for command in (["device", "list"], ["release", "list"], ["rollout", "status"],
                    ["audit", "list"]):  # fmt: skip
        as_json = run(*command, "--json", *api(live_server, "viewer"))
        assert as_json.exit_code == 0, as_json.output
        assert as_json.output.isascii(), command  # no raw U+2028 inside JSON strings either
        assert_inert(as_json.output)


def test_ordinary_unicode_prints_as_it_is(live_server: LiveServer, enrolled: Enrolled) -> None:
    harness = live_server.harness
    device = enrolled()
    assert device.heartbeat(version="東京-é 1.0").status_code == 204
    with harness.db.write() as session:
        session.execute(update(Device).values(hostname="caméra-東京"))
    listed = run("device", "list", *api(live_server, "viewer"))
    assert listed.exit_code == 0, listed.output
    assert "caméra-東京" in listed.output and "東京-é 1.0" in listed.output


TEXT = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(version=TEXT, name=TEXT, value=TEXT)
def test_any_text_is_refused_or_printed_inertly(
    live_server: LiveServer, enrolled: Enrolled, version: str, name: str, value: str
) -> None:
    harness = live_server.harness
    if "device" not in harness.scratch:
        harness.scratch["device"] = enrolled()
        harness.scratch["seq"] = 0
    device: FakeDevice = harness.scratch["device"]
    harness.scratch["seq"] += 1
    beat = device.heartbeat(version=version, health=[{"name": name, "ok": True}])
    if refused_character(version) or refused_character(name):
        assert beat.status_code == 422, beat.text
    else:
        assert beat.status_code == 204, beat.text
    event = {"event": "health.failed", "seq": harness.scratch["seq"], "fields": {name: value}}
    sent = harness.client.post(
        f"/api/v1/devices/{device.id}/events", json={"events": [event]}, headers=device.headers
    )
    if refused_character(name) or refused_character(value, allow="\t"):
        assert sent.status_code == 422, sent.text
    else:
        assert sent.status_code == 204, sent.text
    for command in (["device", "list"], ["audit", "list", "--last", "3"]):
        result = run(*command, *api(live_server, "viewer"))
        assert result.exit_code == 0, result.output
        assert_inert(result.output)


def test_token_create_refuses_hostile_names(harness: Harness) -> None:
    url = harness.settings.database_url
    for name, char in HOSTILE.items():
        result = run("server", "token", "create", "--role", "viewer", "--name",
                     with_hostile(char), "--database-url", url)  # fmt: skip
        assert result.exit_code == 2, (name, result.output)
        assert_inert(result.output)
    made = run("server", "token", "create", "--role", "viewer", "--name", "Zoë 東京",
               "--database-url", url)  # fmt: skip
    assert made.exit_code == 0, made.output


# --- metrics_address ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254:80",  # the metadata service
        "[::ffff:169.254.169.254]:80",  # the same, mapped into IPv6
        "[64:ff9b::a9fe:a9fe]:80",  # the same, through NAT64
        "[fd00:ec2::254]:80",  # the metadata service over IPv6
        "100.100.100.200:80",
        "metadata.google.internal:80",
        "169.254.10.20:9101",  # link-local
        "[fe80::1]:9101",
        "[fe80::1%eth0]:9101",  # a zone
        "[2001:db8::7%eth0]:9101",
        "127.0.0.1:9101",  # loopback
        "[::1]:9101",
        "localhost:9101",
        "224.0.0.1:9101",  # multicast
        "[ff02::1]:9101",
        "0.0.0.0:9101",  # unspecified
        "[::]:9101",
        "255.255.255.255:9101",
        "127.1:9101",  # numeric "names" a resolver reads as addresses
        "2130706433:9101",
        "0x7f000001:9101",
        "010.0.0.1:9101",
        "host:0",
        "host:65536",
        "host:09101",
        "10.1.2.3",
        "garbage",
        ":9101",
        "[10.1.2.3]:9101",
        "2001:db8::1:9101",
        "cam_1.lan:9101",
        "a..b:9101",
        "cam-1.lan.:9101",
        "x" * 64 + ".lan:9101",
    ],
)
def test_refused_metrics_addresses(harness: Harness, enrolled: Enrolled, address: str) -> None:
    device = enrolled()
    assert device.heartbeat(version="1.0.0").status_code == 204
    response = device.heartbeat(version="2.0.0", metrics_address=address)
    assert_refused(response, "metrics_address")
    shown = harness.client.get(f"/api/v1/devices/{device.id}", headers=harness.viewer).json()
    assert shown["version"] == "1.0.0"  # nothing of the refused heartbeat was stored
    assert shown["last_heartbeat"]["metrics_address"] is None


@pytest.mark.parametrize(
    "address",
    ["10.1.2.3:9101", "192.168.1.20:1", "[2001:db8::7]:65535", "cam-1.lan:9101", "cam1:9101",
     "[::ffff:10.1.2.3]:9101", "8.8.8.8:9101"],
)  # fmt: skip
def test_admitted_metrics_addresses_by_default(
    harness: Harness, enrolled: Enrolled, address: str
) -> None:
    device = enrolled()
    assert device.heartbeat(metrics_address=address).status_code == 204
    targets = harness.client.get("/api/v1/sd/prometheus", headers=harness.viewer).json()
    assert [group["targets"] for group in targets] == [[address]]


@pytest.fixture
def networked(
    tmp_path: Path, keyring_dir: Path, database_url: str | None, clock: FakeClock
) -> Iterator[Harness]:
    """A server run with --metrics-networks 10.0.0.0/8,127.0.0.0/8,fd00::/8."""
    settings = replace(
        make_settings(tmp_path, keyring_dir, database_url, clock),
        metrics_networks=parse_networks("10.0.0.0/8,127.0.0.0/8,fd00::/8"),
    )
    app = create_app(settings)
    with TestClient(app) as client:
        h = Harness(app, client, settings, clock)
        for role in Role:
            secret = create_operator_token(
                h.db, name=f"test-{role.label}", role=role, created_by="test", now=utc(clock)
            )
            h.headers[role.label] = {"Authorization": f"Bearer {secret}"}
        yield h
    h.db.dispose()


@pytest.mark.parametrize(
    ("address", "admitted"),
    [
        ("10.1.2.3:9101", True),
        ("127.0.0.1:9101", True),  # loopback, allowed on purpose (a lab)
        ("[fd00::5]:9101", True),
        ("[::ffff:10.9.8.7]:9101", True),
        ("192.168.1.20:9101", False),  # not in the networks
        ("[2001:db8::7]:9101", False),
        ("cam-1.lan:9101", False),  # a name cannot be checked against networks
        ("169.254.169.254:80", False),
        ("[fd00:ec2::254]:80", False),  # the metadata service, though inside fd00::/8
        ("10.0.0.0:0", False),
    ],
)
def test_metrics_addresses_with_networks_configured(
    networked: Harness, address: str, admitted: bool
) -> None:
    device = FakeDevice(networked.client)
    assert device.enroll(networked.enrollment_token()).status_code == 200
    device.login()
    response = device.heartbeat(metrics_address=address)
    if admitted:
        assert response.status_code == 204, response.text
    else:
        assert_refused(response, "metrics_address")
    targets = networked.client.get("/api/v1/sd/prometheus", headers=networked.viewer).json()
    assert [group["targets"] for group in targets] == ([[address]] if admitted else [])


def test_service_discovery_lists_only_addresses_the_rule_admits_now(
    harness: Harness, enrolled: Enrolled
) -> None:
    kept, planted = enrolled(hostname="cam-1"), enrolled(hostname="cam-2")
    assert kept.heartbeat(metrics_address="192.168.1.20:9101").status_code == 204
    assert planted.heartbeat(metrics_address="192.168.1.21:9101").status_code == 204
    with harness.db.write() as session:  # as an older server would have stored it
        row = session.scalars(select(Device).where(Device.id == planted.id)).one()
        beat = json.loads(row.last_heartbeat or "{}")
        row.last_heartbeat = json.dumps({**beat, "metrics_address": "169.254.169.254:80"})
    targets = harness.client.get("/api/v1/sd/prometheus", headers=harness.viewer).json()
    assert [group["targets"] for group in targets] == [["192.168.1.20:9101"]]
    assert targets[0]["labels"]["device"] == kept.id


def test_metrics_networks_setting(tmp_path: Path) -> None:
    made = Settings.create(tmp_path / "d", metrics_networks=" 10.0.0.0/8, fd00::/8 ,")
    assert [str(n) for n in made.metrics_networks] == ["10.0.0.0/8", "fd00::/8"]
    assert Settings.create(tmp_path / "d").metrics_networks == ()
    for bad in ("10.0.0.1/8", "10.0.0.0", "cam.lan/8", "10.0.0.0/33"):
        with pytest.raises(SettingsError, match="metrics networks"):
            Settings.create(tmp_path / "d", metrics_networks=bad)


class _Stop(Exception):
    """Raised in place of serving: the test wants the settings, not a running server."""


def test_server_run_passes_the_metrics_networks_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Settings] = []

    def create_app(settings: Settings, **_options: Any) -> None:
        seen.append(settings)
        raise _Stop

    monkeypatch.setattr("server.app.create_app", create_app)
    monkeypatch.setattr("server.logs.configure", lambda *_args: None)  # this process's logging
    data = str(tmp_path / "data")
    given_option = CliRunner().invoke(
        fleet, ["server", "run", "--data-dir", data, "--metrics-networks", "10.0.0.0/8"]
    )
    from_env = CliRunner().invoke(
        fleet, ["server", "run", "--data-dir", data], env={"FLEET_METRICS_NETWORKS": "fd00::/8"}
    )
    assert isinstance(given_option.exception, _Stop), given_option.output
    assert isinstance(from_env.exception, _Stop), from_env.output
    assert [[str(n) for n in s.metrics_networks] for s in seen] == [["10.0.0.0/8"], ["fd00::/8"]]

    bad = CliRunner().invoke(
        fleet, ["server", "run", "--data-dir", data, "--metrics-networks", "10.0.0.1/8"]
    )
    assert_one_line_error(bad, "metrics networks: '10.0.0.1/8'")
    bad_env = CliRunner().invoke(
        fleet, ["server", "run", "--data-dir", data], env={"FLEET_METRICS_NETWORKS": "x/8"}
    )
    assert_one_line_error(bad_env, "metrics networks: 'x/8'")
    assert len(seen) == 2  # no server was made from a bad setting
