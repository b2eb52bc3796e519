"""The console's fleet pages (server/ui/pages_fleet.py): the overview, the device list and a
device's page, read by every role and acted on by operators, against the API's own answers.

Every page is fetched through the app (TestClient) with a console session of the role under
test; numbers are compared with what ``/api/v1`` answers for the same fleet, and every action
with the audit trail it leaves.
"""

from __future__ import annotations

import dataclasses
import html
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import update

from server.models import Device
from server.rollout_text import failure_rule_text, stage_text
from server.rollouts import offline
from server.settings import utc
from tests.server.conftest import FakeDevice, Harness

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

Enrolled = Callable[..., FakeDevice]
MakeBundle = Callable[..., Path]
Console = Callable[[str], TestClient]
OFFLINE_AFTER_S = 300
HOSTILE = "<script>window.pwned=1</script>"
HOSTILE_IMG = '<img src=x onerror="window.pwned=1">'


@pytest.fixture
def console(harness: Harness) -> Iterator[Console]:
    """A client of the app signed in to the console with the role's token (one per role)."""
    clients: dict[str, TestClient] = {}

    def sign_in(role: str) -> TestClient:
        if role not in clients:
            client = TestClient(harness.app)
            token = harness.headers[role]["Authorization"].removeprefix("Bearer ")
            answer = client.post("/ui/login", data={"token": token}, follow_redirects=False)
            assert answer.status_code == 303, answer.text
            clients[role] = client
        return clients[role]

    yield sign_in
    for client in clients.values():
        client.close()


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "no form with a CSRF token on the page"
    return match.group(1)


class _Text(HTMLParser):
    """The text inside the first element with ``data-testid`` set to ``name``."""

    VOID = frozenset({"br", "input", "meta", "link", "img", "hr", "col", "source", "wbr"})

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.depth = 0  # open elements inside the one sought, itself included
        self.found = False
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.VOID:
            return
        if self.depth:
            self.depth += 1
        elif not self.found and dict(attrs).get("data-testid") == self.name:
            self.found, self.depth = True, 1

    def handle_endtag(self, tag: str) -> None:
        if self.depth and tag not in self.VOID:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.parts.append(data)


def text_of(page: str, name: str) -> str:
    """The text of the element with ``data-testid=name``, spaces collapsed."""
    parser = _Text(name)
    parser.feed(page)
    assert parser.found, f"no {name} on the page"
    return " ".join("".join(parser.parts).split())


def row_ids(page: str) -> list[str]:
    return re.findall(r'data-testid="device-row" data-device-id="([0-9a-f]{64})"', page)


def link(page: str, name: str) -> str:
    match = re.search(rf'<a href="([^"]*)"[^>]*data-testid="{re.escape(name)}"', page)
    assert match, f"no link {name} on the page"
    return html.unescape(match.group(1))


def params(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def api(harness: Harness, path: str) -> Any:
    answer = harness.client.get(f"/api/v1{path}", headers=harness.viewer)
    assert answer.status_code == 200, answer.text
    return answer.json()


def audit_of(harness: Harness, action: str) -> list[dict[str, Any]]:
    return [e for e in api(harness, "/audit?limit=1000")["entries"] if e["action"] == action]


def set_hostname(harness: Harness, device_id: str, hostname: str) -> None:
    """A hostname the API would refuse today, as one stored before its rule would be."""
    with harness.db.write() as session:
        session.execute(update(Device).where(Device.id == device_id).values(hostname=hostname))


@pytest.fixture
def small_fleet(harness: Harness, enrolled: Enrolled) -> list[FakeDevice]:
    """Five devices: two on 1.0.0 (one in safe mode), two on 2.0.0 (one a camera tagged
    north), one never reporting and decommissioned; the first and the last are offline."""
    devices = [enrolled(hostname=f"cam-{i:04d}") for i in range(5)]
    reports: list[dict[str, Any]] = [
        {"version": "1.0.0"},
        {"version": "1.0.0", "safe_mode": True},
        {"version": "2.0.0", "role": "camera", "tags": ["north"]},
        {"version": "2.0.0"},
    ]
    for device, report in zip(devices, reports, strict=False):
        assert device.heartbeat(**report).status_code == 204
    harness.clock.advance(OFFLINE_AFTER_S + 60)
    for device, report in zip(devices[1:], reports[1:], strict=False):
        assert device.heartbeat(**report).status_code == 204
    answer = harness.client.post(
        f"/api/v1/devices/{devices[4].id}/decommission", json={}, headers=harness.operator
    )
    assert answer.status_code == 200, answer.text
    return devices


# --- the overview --------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["viewer", "operator"])
def test_the_overview_counts_what_the_api_lists(
    harness: Harness, console: Console, small_fleet: list[FakeDevice], role: str
) -> None:
    page = console(role).get("/ui/")
    assert page.status_code == 200, page.text
    listed = api(harness, "/devices")["devices"]
    now = utc(harness.clock)
    online = [d for d in listed if not offline(_when(d["last_seen"]), now, OFFLINE_AFTER_S)]
    assert int(text_of(page.text, "count-total")) == len(listed) == 5
    assert int(text_of(page.text, "count-online")) == len(online) == 3
    assert int(text_of(page.text, "count-offline")) == len(listed) - len(online) == 2
    assert int(text_of(page.text, "count-safe_mode")) == 1
    assert int(text_of(page.text, "count-unhealthy")) == 1
    assert int(text_of(page.text, "count-decommissioned")) == 1
    # healthy: the active devices online and not unhealthy (the rule is on the page)
    active = [d for d in listed if d["status"] == "active"]
    assert text_of(page.text, "health-percent") == f"{100 * 2 / len(active):.1f} %"
    assert "as a share of all active devices" in page.text
    versions = Counter(d["version"] or "unknown" for d in listed)
    rows = re.findall(
        r'data-testid="version-row">\s*<td>(?:<a href="[^"]*">|<span class="unknown">)'
        r"([^<]*)</(?:a|span)></td>\s*<td class=\"num\">(\d+)</td>",
        page.text,
    )
    assert {version: int(count) for version, count in rows} == dict(versions)
    assert '<meter min="0" max="5" value="2"' in page.text
    assert "No rollout is running, paused or halted." in page.text
    assert text_of(page.text, "alerts-unconfigured").startswith("No Alertmanager configured")


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_the_overview_shows_a_rollout_in_the_words_of_fleet_rollout_status(
    harness: Harness, console: Console, enrolled: Enrolled, make_bundle: MakeBundle
) -> None:
    assert harness.upload(make_bundle(version="2.0.0")).status_code == 201
    devices = [enrolled(hostname=f"cam-{i:04d}") for i in range(3)]
    for device in devices:
        assert device.heartbeat().status_code == 204
    started = harness.client.post(
        "/api/v1/rollouts",
        json={"version": "2.0.0", "canary": [devices[0].id], "soak_s": 60},
        headers=harness.operator,
    )
    assert started.status_code == 201, started.text
    view = api(harness, f"/rollouts/{started.json()['id']}")
    page = console("viewer").get("/ui/")
    assert page.status_code == 200
    region = page.text[page.text.index('id="fleet-rollouts"') :]
    assert f"Failure rule: {html.escape(failure_rule_text(view['failure_rule']))}" in region
    for stage in view["stage_progress"]:
        assert html.escape(stage_text(stage)) in region
    assert f'href="/ui/rollouts/{view["id"]}"' in region
    assert 'aria-current="step"' in region  # the canary stage, where it stands


class _Regions(HTMLParser):
    """The ids of the page's live regions, and the regions a form starts inside."""

    VOID = frozenset({"br", "input", "meta", "link", "img", "hr", "col", "source", "wbr"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str | None] = []  # per open element: the live region it is (inside)
        self.ids: list[str | None] = []
        self.forms_inside: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        region = self.stack[-1] if self.stack else None
        if "data-live" in named:
            self.ids.append(named.get("id"))
            region = named.get("id") or "?"
        if tag == "form" and region is not None:
            self.forms_inside.add(region)
        if tag not in self.VOID:
            self.stack.append(region)

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.VOID and self.stack:
            self.stack.pop()


# The emergency-stop block holds its own form: its HTML changes only when the stop does, and
# console.js swaps only the regions whose HTML changed, so what an operator types stays.
FORM_REGIONS = {"estop"}


def test_live_regions_have_unique_ids_and_no_form(
    console: Console, small_fleet: list[FakeDevice]
) -> None:
    for role in ("viewer", "operator"):
        for path in ("/ui/", "/ui/devices", f"/ui/devices/{small_fleet[0].id}"):
            regions = _Regions()
            regions.feed(console(role).get(path).text)
            assert regions.ids and None not in regions.ids, path
            assert len(set(regions.ids)) == len(regions.ids), path
            # a refresh never swaps a form an operator is typing in
            assert regions.forms_inside <= FORM_REGIONS, (path, regions.forms_inside)


def test_the_pages_hold_nothing_the_policy_would_block(
    console: Console, small_fleet: list[FakeDevice]
) -> None:
    """No inline style or script, no javascript: link: the Content-Security-Policy allows
    neither, and a page relying on one would break in the browser."""
    for path in ("/ui/", "/ui/devices", f"/ui/devices/{small_fleet[0].id}"):
        page = console("operator").get(path)
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert not re.search(r"<[^>]+\sstyle=", page.text), path
        assert not re.search(r"<[^>]+\son[a-z]+=", page.text), path
        assert not re.search(r"<script(?![^>]*\ssrc=)", page.text), path
        assert "javascript:" not in page.text, path


# --- the device list -----------------------------------------------------------------------------


@pytest.fixture
def list_fleet(harness: Harness, enrolled: Enrolled) -> list[FakeDevice]:
    """Thirty devices: cam-0000..0029, even ones on 1.0.0, odd on 2.0.0, every third a
    camera."""
    devices = []
    for i in range(30):
        device = enrolled(hostname=f"cam-{i:04d}")
        role = "camera" if i % 3 == 0 else "sensor"
        version = "1.0.0" if i % 2 == 0 else "2.0.0"
        assert device.heartbeat(version=version, role=role).status_code == 204
        devices.append(device)
    return devices


def test_the_list_filters_by_version_and_role_as_the_api_counts(
    harness: Harness, console: Console, list_fleet: list[FakeDevice]
) -> None:
    listed = api(harness, "/devices")["devices"]
    page = console("viewer").get("/ui/devices?version=2.0.0&role=camera")
    assert page.status_code == 200, page.text
    expected = {d["id"] for d in listed if d["version"] == "2.0.0" and d["role"] == "camera"}
    assert set(row_ids(page.text)) == expected
    assert text_of(page.text, "device-total").startswith(f"{len(expected)} devices match")
    # the form shows the filters it applies
    assert '<option value="2.0.0" selected>' in page.text
    assert 'id="filter-role" name="role" value="camera"' in page.text
    for name in ("q", "version", "state", "role", "tag", "seen_within", "status", "per_page"):
        field = re.search(rf'id="([^"]+)" name="{name}"', page.text)
        assert field, name
        assert f'<label for="{field.group(1)}">' in page.text, name


def test_sorting_is_server_side_and_header_links_keep_the_filters(
    console: Console, list_fleet: list[FakeDevice]
) -> None:
    client = console("viewer")
    page = client.get("/ui/devices?role=sensor&per_page=25")
    hostnames = re.findall(r'data-testid="device-link">([^<]+)<', page.text)
    assert hostnames == sorted(hostnames) and len(hostnames) == 20
    descending = link(page.text, "sort-hostname")
    assert params(descending) == {"role": ["sensor"], "per_page": ["25"], "sort": ["-hostname"]}
    page = client.get(descending)
    hostnames = re.findall(r'data-testid="device-link">([^<]+)<', page.text)
    assert hostnames == sorted(hostnames, reverse=True)
    assert 'aria-sort="descending"' in page.text
    by_version = link(page.text, "sort-version")
    assert params(by_version)["role"] == ["sensor"] and params(by_version)["sort"] == ["version"]


def test_pages_link_to_each_other_keeping_the_filters(
    console: Console, list_fleet: list[FakeDevice]
) -> None:
    client = console("viewer")
    first = client.get("/ui/devices?per_page=25&sort=-hostname&q=cam")
    assert text_of(first.text, "page-of") == "Page 1 of 2"
    assert len(row_ids(first.text)) == 25
    following = link(first.text, "page-next")
    assert params(following) == {
        "q": ["cam"],
        "sort": ["-hostname"],
        "page": ["2"],
        "per_page": ["25"],
    }
    second = client.get(following)
    assert text_of(second.text, "page-of") == "Page 2 of 2"
    assert len(row_ids(second.text)) == 5
    assert not set(row_ids(first.text)) & set(row_ids(second.text))
    assert 'data-testid="page-next"' not in second.text
    assert params(link(second.text, "page-prev")) == {
        "q": ["cam"],
        "sort": ["-hostname"],
        "per_page": ["25"],
    }


def test_a_page_past_the_last_leads_back(console: Console, list_fleet: list[FakeDevice]) -> None:
    page = console("viewer").get("/ui/devices?per_page=25&page=9").text
    assert text_of(page, "past-last-page") == "Page 9 is past the last page (2)."
    assert params(link(page, "page-prev")) == {"per_page": ["25"], "page": ["2"]}


def test_rows_link_to_the_device_page(console: Console, list_fleet: list[FakeDevice]) -> None:
    page = console("viewer").get("/ui/devices?q=cam-0007")
    assert row_ids(page.text) == [list_fleet[7].id]
    assert f'href="/ui/devices/{list_fleet[7].id}"' in page.text


def test_no_match_says_so(console: Console, list_fleet: list[FakeDevice]) -> None:
    page = console("viewer").get("/ui/devices?q=nothing-like-this")
    assert page.status_code == 200
    assert text_of(page.text, "no-match") == "No device matches these filters."
    assert row_ids(page.text) == []


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("per_page=7", "per_page"),
        ("page=0", "page"),
        ("page=abc", "page"),
        ("sort=password", "sort"),
        ("status=gone", "status"),
        ("seen_within=forever", "seen_within"),
        ("role=%3Cscript%3E", "role"),
    ],
)
def test_a_bad_parameter_is_a_400_page_naming_it(console: Console, query: str, named: str) -> None:
    page = console("viewer").get(f"/ui/devices?{query}")
    assert page.status_code == 400, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert f"{named}:" in page.text
    assert "<script>" not in page.text


# --- a device ------------------------------------------------------------------------------------


def test_the_device_page_shows_slots_heartbeat_boots_and_timeline(
    harness: Harness, console: Console, enrolled: Enrolled
) -> None:
    device = enrolled(hostname="cam-0001")
    assert device.heartbeat(metrics_address="10.0.0.7:9100").status_code == 204
    answer = harness.client.post(
        f"/api/v1/devices/{device.id}/events",
        json={"events": [
            {"event": "install.started", "seq": 1, "fields": {"version": "2.0.0"}},
            {"event": "boot_check.fell_back", "seq": 2, "fields": {"msg": "fell back to a"}},
        ]},
        headers=device.headers,
    )  # fmt: skip
    assert answer.status_code == 204, answer.text
    page = console("viewer").get(f"/ui/devices/{device.id}")
    assert page.status_code == 200, page.text
    text = page.text
    assert text_of(text, "device-hostname") == "cam-0001"
    assert text_of(text, "device-status") == "active"
    assert text_of(text, "device-version") == "1.0.0"
    slots = re.findall(
        r'data-testid="slot-row">\s*<th scope="row">(\w+)</th>'
        r"\s*<td>([^<]*)</td>\s*<td>([^<]*)</td>",
        text,
    )
    assert slots == [("a", "1.0.0", "good"), ("b", "0.9.0", "good")]
    assert text_of(text, "figure-temperature_c") == "51.2 °C"
    assert text_of(text, "figure-free_space_mb") == "2048 MB"
    assert text_of(text, "ssh-command") == "ssh 10.0.0.7"
    kinds = re.findall(
        r'data-testid="boot-row">\s*<td><time[^>]*>[^<]*</time></td>\s*<td>([^<]*)</td>', text
    )
    assert kinds == ["fallback", "install"]
    # the timeline, newest first: the fallback, then the install, then the enrollment
    actions = re.findall(r'<code class="action">([^<]+)</code>', text)
    assert actions[:2] == ["boot_check.fell_back", "install.started"]
    assert "fell back to a" in text


def test_no_ssh_command_without_a_usable_address(console: Console, enrolled: Enrolled) -> None:
    device = enrolled()
    assert device.heartbeat().status_code == 204
    page = console("viewer").get(f"/ui/devices/{device.id}")
    assert 'data-testid="ssh-command"' not in page.text
    assert 'data-testid="no-ssh"' in page.text


def test_grafana_and_loki_links_open_without_the_console_as_referrer(
    harness: Harness, console: Console, enrolled: Enrolled
) -> None:
    device = enrolled()
    client = console("viewer")
    assert 'data-testid="grafana-link"' not in client.get(f"/ui/devices/{device.id}").text
    state = harness.app.state.fleet
    settings = dataclasses.replace(
        state.settings, grafana_url="https://grafana.example/", loki_url="https://loki.example"
    )
    harness.app.state.fleet = dataclasses.replace(state, settings=settings)
    try:
        page = client.get(f"/ui/devices/{device.id}").text
    finally:
        harness.app.state.fleet = state
    found = dict(
        re.findall(r'<a href="([^"]+)" rel="noopener noreferrer" data-testid="(\w+)-link"', page)
    )
    links = {name: html.unescape(url) for url, name in found.items()}
    assert links["grafana"].startswith("https://grafana.example/") and device.id in links["grafana"]
    assert links["loki"].startswith("https://loki.example/") and device.id in links["loki"]


def test_an_unknown_device_is_a_404_page(console: Console) -> None:
    for device_id in ("0" * 64, "not-an-id", "%3Cscript%3E"):
        page = console("viewer").get(f"/ui/devices/{device_id}")
        assert page.status_code == 404, page.text
        assert page.headers["content-type"].startswith("text/html")
        assert "<script>" not in page.text


# --- who may act ---------------------------------------------------------------------------------

ACTIONS = ("assign", "quarantine", "release", "decommission", "reinstate", "rename")


def test_a_viewer_sees_no_action_and_its_posts_are_refused(
    harness: Harness, console: Console, enrolled: Enrolled
) -> None:
    device = enrolled(hostname="cam-0001")
    client = console("viewer")
    page = client.get(f"/ui/devices/{device.id}").text
    assert 'data-testid="device-actions"' not in page
    assert "<form" not in page.split('id="main"', 1)[1]
    csrf = csrf_of(page)  # the sign-out form's: a valid token of the viewer's session
    for name in ACTIONS:
        answer = client.post(
            f"/ui/devices/{device.id}/{name}",
            data={"csrf": csrf, "version": "", "confirm": "cam-0001", "hostname": "cam-x"},
            follow_redirects=False,
        )
        assert answer.status_code == 403, (name, answer.text)
        assert "operator" in answer.text
    view = api(harness, f"/devices/{device.id}")
    assert (view["status"], view["hostname"]) == ("active", "cam-0001")
    assert not [e for e in api(harness, "/audit?limit=1000")["entries"]
                if e["actor"] == "operator:test-viewer"]  # fmt: skip


def test_an_action_without_the_session_csrf_token_is_refused(
    harness: Harness, console: Console, enrolled: Enrolled
) -> None:
    device = enrolled()
    client = console("operator")
    answer = client.post(
        f"/ui/devices/{device.id}/quarantine", data={"csrf": "x" * 43}, follow_redirects=False
    )
    assert answer.status_code == 403
    assert api(harness, f"/devices/{device.id}")["status"] == "active"


# --- operators' actions --------------------------------------------------------------------------


def _post(client: TestClient, device: FakeDevice, name: str, **fields: str) -> Any:
    csrf = csrf_of(client.get(f"/ui/devices/{device.id}").text)
    return client.post(
        f"/ui/devices/{device.id}/{name}", data={"csrf": csrf, **fields}, follow_redirects=False
    )


def test_an_operator_quarantines_releases_decommissions_and_reinstates(
    harness: Harness, console: Console, enrolled: Enrolled
) -> None:
    device = enrolled(hostname="cam-0001")
    client = console("operator")
    page = client.get(f"/ui/devices/{device.id}").text
    for form in ("assign-form", "quarantine-form", "decommission-form", "rename-form"):
        assert f'data-testid="{form}"' in page
    answer = _post(client, device, "quarantine", reason="flaky camera")
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/ui/devices/{device.id}"
    view = api(harness, f"/devices/{device.id}")
    assert (view["status"], view["status_reason"]) == ("quarantined", "flaky camera")
    page = client.get(answer.headers["location"]).text
    assert "device quarantined" in page  # the notice, once
    assert 'data-testid="release-form"' in page
    assert "by operator:test-operator" in page
    assert text_of(page, "device-status-since").endswith("UTC by operator:test-operator")
    assert _post(client, device, "release").status_code == 303
    assert api(harness, f"/devices/{device.id}")["status"] == "active"
    # decommission needs the hostname typed: a wrong one changes nothing
    wrong = _post(client, device, "decommission", confirm="cam-0002")
    assert wrong.status_code == 400
    assert "type cam-0001 to confirm" in text_of(wrong.text, "action-error")
    assert api(harness, f"/devices/{device.id}")["status"] == "active"
    assert _post(client, device, "decommission", confirm="cam-0001").status_code == 303
    assert api(harness, f"/devices/{device.id}")["status"] == "decommissioned"
    # a change the status does not allow is refused with the server's message
    conflict = _post(client, device, "quarantine")
    assert conflict.status_code == 409
    assert "cannot quarantine" in text_of(conflict.text, "action-error")
    assert _post(client, device, "reinstate", reason="repaired").status_code == 303
    assert api(harness, f"/devices/{device.id}")["status"] == "active"
    done = [e for e in api(harness, "/audit?limit=1000")["entries"] if e["subject"] == device.id]
    changes = [e for e in done if e["action"] != "device.enrolled"]
    assert [(e["action"], e["actor"]) for e in changes] == [
        ("device.quarantined", "operator:test-operator"),
        ("device.released", "operator:test-operator"),
        ("device.decommissioned", "operator:test-operator"),
        ("device.reinstated", "operator:test-operator"),
    ]


def test_an_operator_assigns_a_compatible_release(
    harness: Harness, console: Console, enrolled: Enrolled, make_bundle: MakeBundle
) -> None:
    assert harness.upload(make_bundle("a.bundle", version="2.0.0")).status_code == 201
    other = make_bundle("b.bundle", version="9.0.0", compatible="metrica-other")
    assert harness.upload(other).status_code == 201
    device = enrolled()
    client = console("operator")
    page = client.get(f"/ui/devices/{device.id}").text
    select = page.split('id="assign-version"')[1].split("</select>")[0]
    choices = re.findall(r'<option value="([^"]*)"', select)
    assert choices == ["", "2.0.0"]  # only what the device may run
    assert _post(client, device, "assign", version="2.0.0").status_code == 303
    assert api(harness, f"/devices/{device.id}")["assigned_version"] == "2.0.0"
    entry = audit_of(harness, "device.assigned")[-1]
    assert (entry["actor"], entry["subject"]) == ("operator:test-operator", device.id)
    # one the device cannot run, or none that exists, is the server's refusal on the page
    incompatible = _post(client, device, "assign", version="9.0.0")
    assert incompatible.status_code == 409
    assert "is for 'metrica-other'" in html.unescape(text_of(incompatible.text, "action-error"))
    unknown = _post(client, device, "assign", version="7.7.7")
    assert unknown.status_code == 404
    assert "no release '7.7.7'" in html.unescape(text_of(unknown.text, "action-error"))
    assert api(harness, f"/devices/{device.id}")["assigned_version"] == "2.0.0"
    assert _post(client, device, "assign", version="").status_code == 303
    assert api(harness, f"/devices/{device.id}")["assigned_version"] is None
    assert audit_of(harness, "device.unassigned")[-1]["actor"] == "operator:test-operator"


def test_an_operator_renames_by_the_api_rules(
    harness: Harness, console: Console, enrolled: Enrolled
) -> None:
    device = enrolled(hostname="cam-0001")
    enrolled(hostname="cam-0002")
    client = console("operator")
    renamed = _post(client, device, "rename", hostname="door-1")
    assert renamed.status_code == 303
    assert api(harness, f"/devices/{device.id}")["hostname"] == "door-1"
    shown = client.get(renamed.headers["location"]).text
    assert "device renamed to door-1" in shown
    assert text_of(shown, "device-hostname") == "door-1"
    assert audit_of(harness, "device.renamed")[-1]["actor"] == "operator:test-operator"
    taken = _post(client, device, "rename", hostname="CAM-0002")
    assert taken.status_code == 409
    assert 'value="CAM-0002"' in taken.text  # what was typed stays in the form
    bad = _post(client, device, "rename", hostname="<b>x</b>")
    assert bad.status_code == 422
    assert "hostname:" in text_of(bad.text, "action-error")
    assert "<b>x</b>" not in bad.text and "&lt;b&gt;x&lt;/b&gt;" in bad.text
    assert api(harness, f"/devices/{device.id}")["hostname"] == "door-1"


def test_an_action_on_an_unknown_device_is_a_404_page(console: Console, enrolled: Enrolled) -> None:
    device = enrolled()
    client = console("operator")
    csrf = csrf_of(client.get(f"/ui/devices/{device.id}").text)
    answer = client.post(
        f"/ui/devices/{'0' * 64}/quarantine", data={"csrf": csrf}, follow_redirects=False
    )
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("text/html")


# --- hostile text --------------------------------------------------------------------------------


def test_hostile_hostnames_and_event_text_are_shown_as_text(
    harness: Harness, console: Console, enrolled: Enrolled
) -> None:
    device = enrolled(hostname="cam-0001")
    assert device.heartbeat(version=HOSTILE_IMG[:60]).status_code == 204
    set_hostname(harness, device.id, HOSTILE)
    answer = harness.client.post(
        f"/api/v1/devices/{device.id}/events",
        json={"events": [{"event": "install.failed", "seq": 1,
                          "fields": {"msg": HOSTILE_IMG, HOSTILE: "key"}}]},
        headers=device.headers,
    )  # fmt: skip
    assert answer.status_code == 204, answer.text
    client = console("operator")
    for path in ("/ui/", "/ui/devices", f"/ui/devices/{device.id}", "/ui/devices?q=%3Cscript"):
        page = client.get(path)
        assert page.status_code == 200, (path, page.text)
        assert "<script>" not in page.text and "<img src=x" not in page.text, path
    device_page = client.get(f"/ui/devices/{device.id}").text
    assert html.escape(HOSTILE, quote=False) in device_page
    assert "&lt;img src=x onerror=" in device_page
    listing = client.get("/ui/devices?q=%3Cscript").text
    assert row_ids(listing) == [device.id]
    assert html.escape(HOSTILE, quote=False) in listing
    # the confirmation asks for the hostname as text too
    wrong = _post(client, device, "decommission", confirm="x")
    assert wrong.status_code == 400
    assert "<script>" not in wrong.text
    assert _post(client, device, "decommission", confirm=HOSTILE).status_code == 303


def test_a_hostile_alertmanager_answer_is_shown_as_text(
    harness: Harness, console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.ui import queries

    view = queries.AlertsView(
        True, (queries.Alert(HOSTILE, "critical", HOSTILE_IMG, "2026-01-01T00:00:00Z"),)
    )
    monkeypatch.setattr(queries, "firing_alerts", lambda _settings: view)
    page = console("viewer").get("/ui/").text
    assert "<script>" not in page and "<img src=x" not in page
    assert html.escape(HOSTILE, quote=False) in page
    assert 'data-testid="alert-row"' in page


def test_an_unreachable_alertmanager_is_a_line_on_the_page(
    harness: Harness, console: Console, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.ui import queries

    view = queries.AlertsView(True, error="Alertmanager unreachable: ConnectionError")
    monkeypatch.setattr(queries, "firing_alerts", lambda _settings: view)
    page = console("viewer").get("/ui/")
    assert page.status_code == 200
    assert "Alertmanager unreachable: ConnectionError" in text_of(page.text, "alerts-error")


def test_seen_within_filters_and_keeps_its_spelling(
    harness: Harness, console: Console, small_fleet: list[FakeDevice]
) -> None:
    page = console("viewer").get("/ui/devices?seen_within=5m&sort=-last_seen")
    listed = api(harness, "/devices")["devices"]
    now = utc(harness.clock)
    recent = {d["id"] for d in listed if now - _when(d["last_seen"]) <= timedelta(minutes=5)}
    assert set(row_ids(page.text)) == recent
    assert '<option value="5m" selected>' in page.text
    assert params(link(page.text, "sort-hostname"))["seen_within"] == ["5m"]


def test_state_status_and_tag_filters_match_the_api(
    harness: Harness, console: Console, small_fleet: list[FakeDevice]
) -> None:
    client = console("viewer")
    listed = api(harness, "/devices")["devices"]
    now = utc(harness.clock)
    late = {d["id"] for d in listed if offline(_when(d["last_seen"]), now, OFFLINE_AFTER_S)}
    assert set(row_ids(client.get("/ui/devices?state=offline").text)) == late
    safe = {d["id"] for d in listed if d["state"] == "safe_mode"}
    page = client.get("/ui/devices?state=safe_mode").text
    assert set(row_ids(page)) == safe == {small_fleet[1].id}
    assert '<option value="safe_mode" selected>' in page  # a state the fleet reports
    gone = {d["id"] for d in listed if d["status"] == "decommissioned"}
    assert set(row_ids(client.get("/ui/devices?status=decommissioned").text)) == gone
    north = {d["id"] for d in listed if "north" in d["tags"]}
    assert set(row_ids(client.get("/ui/devices?tag=north").text)) == north == {small_fleet[2].id}
