"""The console's rollout pages: starting a rollout from the form (and every kind of refusal
shown in the form, with what was typed), the transitions of a rollout (pause, resume with the
acknowledgment of its failed devices, abort, roll back) audited with the signed-in operator as
actor, what a viewer may not do, and hostile text shown as text."""

from __future__ import annotations

import html
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server import rollouts
from server.auth import Role, create_operator_token
from server.rollout_text import failure_rule_text
from server.settings import utc
from tests.server.conftest import FakeDevice, Harness

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

Enrolled = Callable[..., FakeDevice]
MakeBundle = Callable[..., Path]
HOSTILE = '<script>alert("x")</script>'
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Browser:
    """A signed-in console user: its own cookie jar on the harness's app."""

    def __init__(self, harness: Harness, token: str) -> None:
        self.client = TestClient(harness.app)
        response = self.client.post("/ui/login", data={"token": token}, follow_redirects=False)
        assert response.status_code == 303, response.text
        self.csrf: str | None = None

    def get(self, path: str, **kwargs: Any) -> Any:
        response = self.client.get(path, follow_redirects=False, **kwargs)
        found = CSRF.search(response.text)
        if found:
            self.csrf = found.group(1)
        return response

    def post(self, path: str, data: dict[str, Any] | None = None) -> Any:
        if self.csrf is None:
            self.get("/ui/rollouts")
        return self.client.post(
            path, data={"csrf": self.csrf, **(data or {})}, follow_redirects=False
        )


def bearer_secret(harness: Harness, role: str) -> str:
    return harness.headers[role]["Authorization"].removeprefix("Bearer ")


def browser(harness: Harness, role: str = "operator") -> Browser:
    return Browser(harness, bearer_secret(harness, role))


def audit_entries(harness: Harness, action: str) -> list[dict[str, Any]]:
    response = harness.client.get("/api/v1/audit?limit=1000", headers=harness.viewer)
    return [e for e in response.json()["entries"] if e["action"] == action]


def api_rollout(harness: Harness, rollout_id: int) -> dict[str, Any]:
    response = harness.client.get(f"/api/v1/rollouts/{rollout_id}", headers=harness.viewer)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def rollout_count(harness: Harness) -> int:
    return len(harness.client.get("/api/v1/rollouts", headers=harness.viewer).json()["rollouts"])


@pytest.fixture
def fleet(harness: Harness, enrolled: Enrolled, make_bundle: MakeBundle) -> list[FakeDevice]:
    """Releases 1.0.0 and 2.0.0, and six devices (cam-0000 to cam-0005) running 1.0.0: one
    failed device is not enough for the fleet guard (more than 20 % unhealthy) to stop all."""
    for version in ("1.0.0", "2.0.0"):
        response = harness.upload(make_bundle(f"{version}.bundle", version=version))
        assert response.status_code == 201, response.text
    devices = [enrolled(hostname=f"cam-{i:04d}") for i in range(6)]
    for device in devices:
        assert device.heartbeat(role="camera", tags=["north"]).status_code == 204
    return devices


GOOD_FORM = {
    "version": "2.0.0",
    "canary": "cam-0000\ncam-0001",
    "stages": "50,100",
    "soak_s": "600",
    "max_failure_rate": "0.25",
    "install_deadline_s": "1800",
    "offline_after_s": "3600",
    "rollback_on_halt": "on",
}


def test_pages_need_a_session(harness: Harness) -> None:
    response = harness.client.get("/ui/rollouts/1", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login?next=/ui/rollouts/1"


def test_a_rollout_started_from_the_form(harness: Harness, fleet: list[FakeDevice]) -> None:
    operator = browser(harness)
    form = operator.get("/ui/rollouts/new")
    assert form.status_code == 200
    assert 'id="rollout-form"' in form.text
    assert '<option value="2.0.0"' in form.text and '<option value="1.0.0"' in form.text
    answer = operator.post("/ui/rollouts/new", {**GOOD_FORM, "role": "camera", "tags": "north"})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/ui/rollouts/1"
    view = api_rollout(harness, 1)
    # hostnames resolved as fleet rollout start resolves them; every field as typed
    assert sorted(d["id"] for d in view["devices"]) == sorted(d.id for d in fleet[:2])
    assert view["stages"] == ["canary", "50%", "100%"]
    assert (view["soak_s"], view["install_deadline_s"], view["offline_after_s"]) == (
        600, 1800, 3600,
    )  # fmt: skip
    assert view["max_failure_rate"] == 0.25 and view["rollback_on_halt"] is True
    assert view["selector"] == {"role": "camera", "tags": ["north"]}
    assert view["created_by"] == "operator:test-operator"
    (started,) = audit_entries(harness, "rollout.started")
    assert started["actor"] == "operator:test-operator"
    page = operator.get("/ui/rollouts/1")
    assert "rollout 1 of 2.0.0 started" in page.text  # the notice after the redirect
    assert 'id="rollout-live" data-live' in page.text
    state = re.search(r'data-testid="rollout-state">([a-z]+)<', page.text)
    assert state is not None and state.group(1) == "running"
    assert html.escape(failure_rule_text(view["failure_rule"]), quote=False) in page.text
    assert page.text.count('data-testid="stage-row"') == 3
    assert page.text.count('data-testid="member-row"') == 2
    assert "cam-0000" in page.text and "cam-0001" in page.text
    listing = operator.get("/ui/rollouts")
    assert 'data-rollout-id="1"' in listing.text and "2.0.0" in listing.text


def test_unchecked_rollback_and_defaults(harness: Harness, fleet: list[FakeDevice]) -> None:
    operator = browser(harness)
    answer = operator.post("/ui/rollouts/new", {"version": "2.0.0"})
    assert answer.status_code == 303, answer.text
    view = api_rollout(harness, 1)
    assert view["stages"] == ["5%", "25%", "100%"]
    assert view["rollback_on_halt"] is False  # an unticked box is a no
    assert view["soak_s"] == 900


# (what is typed, the field the message must name, the status)
BAD_INPUTS = [
    ({"stages": "5,x,100"}, "stages.1", 422),
    ({"stages": "50,25"}, "stages [50, 25]", 422),
    ({"stages": "50"}, "ending with 100", 422),
    ({"soak_s": "-1"}, "soak_s", 422),
    ({"soak_s": "ten"}, "soak_s", 422),
    ({"max_failure_rate": "1.5"}, "max_failure_rate", 422),
    ({"max_failure_rate": "nan"}, "max_failure_rate", 422),
    ({"install_deadline_s": "0"}, "install_deadline_s", 422),
    ({"offline_after_s": "10"}, "offline_after_s", 422),
    ({"canary": "cam-0000, nosuch"}, "canary: no device is 'nosuch'", 422),
    ({"canary": "cam-0000\ncam-0000"}, "named twice", 422),
    ({"devices": "cam-0009"}, "device_ids: no device is 'cam-0009'", 422),
    ({"role": "Not A Role"}, "selector.role", 422),
    ({"tags": "north, Bad!"}, "selector.tags.1", 422),
    ({"version": "9.9.9", "canary": ""}, "no release", 404),
    ({"role": "doorbell", "canary": ""}, "allow_empty", 422),
]


@pytest.mark.parametrize(("changes", "named", "status"), BAD_INPUTS)
def test_bad_input_is_shown_in_the_form_with_what_was_typed(
    harness: Harness,
    fleet: list[FakeDevice],
    changes: dict[str, str],
    named: str,
    status: int,
) -> None:
    operator = browser(harness)
    typed = {**GOOD_FORM, **changes}
    answer = operator.post("/ui/rollouts/new", typed)
    assert answer.status_code == status, answer.text
    error = re.search(r'data-testid="form-error">([^<]*)<', answer.text)
    assert error is not None, answer.text
    assert named in html.unescape(error.group(1))
    assert 'id="rollout-form"' in answer.text
    for name, value in typed.items():
        if name in ("canary", "devices"):
            assert f">{html.escape(value)}</textarea>" in answer.text
        elif name == "version":
            if value == "2.0.0":
                assert '<option value="2.0.0" selected>' in answer.text
        elif name != "rollback_on_halt":
            assert f'name="{name}" value="{html.escape(value)}"' in answer.text
    assert 'id="f-rollback" name="rollback_on_halt" value="on" checked' in answer.text
    assert rollout_count(harness) == 0


def test_a_second_rollout_is_refused_while_one_runs(
    harness: Harness, fleet: list[FakeDevice]
) -> None:
    operator = browser(harness)
    assert operator.post("/ui/rollouts/new", GOOD_FORM).status_code == 303
    answer = operator.post("/ui/rollouts/new", GOOD_FORM)
    assert answer.status_code == 409
    assert "rollout 1 is running" in answer.text
    assert rollout_count(harness) == 1


def test_pause_resume_abort_are_audited_with_the_operator(
    harness: Harness, fleet: list[FakeDevice]
) -> None:
    operator = browser(harness)
    assert operator.post("/ui/rollouts/new", GOOD_FORM).status_code == 303
    page = operator.get("/ui/rollouts/1")
    assert 'id="pause-form"' in page.text and 'id="resume-form"' not in page.text
    answer = operator.post("/ui/rollouts/1/pause", {"reason": "night shift"})
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/rollouts/1"
    assert api_rollout(harness, 1)["state"] == "paused"
    (paused,) = audit_entries(harness, "rollout.paused")
    assert paused["actor"] == "operator:test-operator"
    assert paused["details"]["reason"] == "night shift"
    page = operator.get("/ui/rollouts/1")
    assert 'id="resume-form"' in page.text and 'id="pause-form"' not in page.text
    assert "night shift" in page.text
    assert operator.post("/ui/rollouts/1/resume").status_code == 303
    assert api_rollout(harness, 1)["state"] == "running"
    assert audit_entries(harness, "rollout.resumed")[0]["actor"] == "operator:test-operator"
    assert operator.post("/ui/rollouts/1/abort", {"reason": "wrong build"}).status_code == 303
    view = api_rollout(harness, 1)
    assert view["state"] == "aborted" and view["reason"] == "wrong build"
    assert audit_entries(harness, "rollout.aborted")[0]["actor"] == "operator:test-operator"
    # a transition the state does not allow is the page again with the conflict
    refused = operator.post("/ui/rollouts/1/pause")
    assert refused.status_code == 409
    assert "rollout 1 is aborted: cannot pause" in refused.text
    assert 'data-testid="rollout-error"' in refused.text


def test_rollback_returns_the_devices(harness: Harness, fleet: list[FakeDevice]) -> None:
    operator = browser(harness)
    assert operator.post("/ui/rollouts/new", GOOD_FORM).status_code == 303
    assert operator.post("/ui/rollouts/1/rollback").status_code == 303
    view = api_rollout(harness, 1)
    assert view["state"] == "aborted" and view["reason"] == "rolled back"
    (entry,) = audit_entries(harness, "rollout.rolled_back")
    assert entry["actor"] == "operator:test-operator"
    assert sorted(entry["details"]["returned"]) == sorted(d.id for d in fleet[:2])
    assert operator.post("/ui/rollouts/1/rollback").status_code == 409


def halted(harness: Harness, fleet: list[FakeDevice], operator: Browser) -> FakeDevice:
    """Rollout 1, halted by its canary cam-0000 failing its install."""
    assert operator.post("/ui/rollouts/new", GOOD_FORM).status_code == 303
    failing = fleet[0]
    assert failing.events(("install.failed", 1)).status_code in (200, 204)
    rollouts.evaluate(harness.db, utc(harness.clock))
    assert api_rollout(harness, 1)["state"] == "halted"
    return failing


def test_resume_needs_every_failed_device_acknowledged(
    harness: Harness, fleet: list[FakeDevice]
) -> None:
    operator = browser(harness)
    failing = halted(harness, fleet, operator)
    page = operator.get("/ui/rollouts/1")
    assert 'data-testid="rollout-reason">1 of 2 devices failed in stage canary<' in page.text
    assert f'name="acknowledge" value="{failing.id}"' in page.text
    assert page.text.count('name="acknowledge"') == 1  # only the failed device
    refused = operator.post("/ui/rollouts/1/resume")
    assert refused.status_code == 409
    assert f"not acknowledged: {failing.id}" in refused.text
    assert api_rollout(harness, 1)["state"] == "halted"
    assert audit_entries(harness, "rollout.resumed") == []
    answer = operator.post("/ui/rollouts/1/resume", {"acknowledge": failing.id})
    assert answer.status_code == 303, answer.text
    view = api_rollout(harness, 1)
    assert view["state"] == "running" and view["acknowledged"] == [failing.id]
    (resumed,) = audit_entries(harness, "rollout.resumed")
    assert resumed["actor"] == "operator:test-operator"
    assert resumed["details"]["acknowledged"] == [failing.id]
    assert "acknowledged failures: 1" in operator.get("/ui/rollouts/1").text


def test_a_device_failing_after_the_page_was_shown_is_not_acknowledged_unseen(
    harness: Harness, fleet: list[FakeDevice]
) -> None:
    operator = browser(harness)
    failing = halted(harness, fleet, operator)
    page = operator.get("/ui/rollouts/1")
    assert page.text.count('name="acknowledge"') == 1
    # While the operator reads the page, someone else resumes, and the other canary fails.
    resumed = harness.client.post(
        "/api/v1/rollouts/1/resume", json={"acknowledge": [failing.id]}, headers=harness.operator
    )
    assert resumed.status_code == 200, resumed.text
    late = fleet[1]
    assert late.events(("install.failed", 1)).status_code in (200, 204)
    rollouts.evaluate(harness.db, utc(harness.clock))
    assert api_rollout(harness, 1)["state"] == "halted"
    refused = operator.post("/ui/rollouts/1/resume", {"acknowledge": failing.id})
    assert refused.status_code == 409, refused.text
    assert f"not acknowledged: {late.id}" in refused.text
    assert f'name="acknowledge" value="{late.id}"' in refused.text  # listed now, to be ticked
    assert api_rollout(harness, 1)["state"] == "halted"
    assert len(audit_entries(harness, "rollout.resumed")) == 1
    answer = operator.post("/ui/rollouts/1/resume", {"acknowledge": [failing.id, late.id]})
    assert answer.status_code == 303, answer.text
    assert sorted(api_rollout(harness, 1)["acknowledged"]) == sorted([failing.id, late.id])


def test_a_viewer_sees_no_forms_and_cannot_act(harness: Harness, fleet: list[FakeDevice]) -> None:
    operator = browser(harness)
    halted(harness, fleet, operator)
    viewer = browser(harness, "viewer")
    page = viewer.get("/ui/rollouts/1")
    assert page.status_code == 200
    for form in ("pause-form", "resume-form", "abort-form", "rollback-form", "acknowledge"):
        assert form not in page.text
    assert 'id="stage-progress"' in page.text and 'id="member-table"' in page.text
    assert "new-rollout-link" not in viewer.get("/ui/rollouts").text
    assert viewer.get("/ui/rollouts/new").status_code == 403
    assert viewer.csrf is not None  # the sign-out form's: a session's own token
    for change in ("resume", "abort", "rollback"):
        answer = viewer.post(f"/ui/rollouts/1/{change}", {"acknowledge": fleet[0].id})
        assert answer.status_code == 403, change
        assert "operator" in answer.text
    assert viewer.post("/ui/rollouts/new", GOOD_FORM).status_code == 403
    assert api_rollout(harness, 1)["state"] == "halted"
    assert rollout_count(harness) == 1


def test_an_action_without_the_csrf_token_is_refused(
    harness: Harness, fleet: list[FakeDevice]
) -> None:
    operator = browser(harness)
    assert operator.post("/ui/rollouts/new", GOOD_FORM).status_code == 303
    answer = operator.client.post(
        "/ui/rollouts/1/pause", data={"reason": "no token"}, follow_redirects=False
    )
    assert answer.status_code == 403
    assert api_rollout(harness, 1)["state"] == "running"


def shown_as_text(page: str) -> bool:
    """Whether ``HOSTILE`` is on the page, as text only (Jinja escapes quotes as &#34;)."""
    return "<script>alert" not in page and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page


def test_hostile_text_is_shown_as_text(harness: Harness, fleet: list[FakeDevice]) -> None:
    token = create_operator_token(
        harness.db, name=HOSTILE, role=Role.OPERATOR, created_by="test", now=utc(harness.clock)
    )
    hostile = Browser(harness, token)
    answer = hostile.post("/ui/rollouts/new", {**GOOD_FORM, "canary": HOSTILE})
    assert answer.status_code == 422
    assert shown_as_text(answer.text)
    assert hostile.post("/ui/rollouts/new", GOOD_FORM).status_code == 303
    assert hostile.post("/ui/rollouts/1/pause", {"reason": HOSTILE}).status_code == 303
    for path in ("/ui/rollouts/1", "/ui/rollouts"):
        page = browser(harness, "viewer").get(path)
        assert page.status_code == 200
        assert shown_as_text(page.text)


def test_unknown_rollout_is_a_404_page(harness: Harness) -> None:
    operator = browser(harness)
    answer = operator.get("/ui/rollouts/7")
    assert answer.status_code == 404
    assert "no rollout 7" in answer.text
    assert answer.headers["content-type"].startswith("text/html")
    assert operator.post("/ui/rollouts/7/pause").status_code == 404


def test_many_members_are_listed_failed_first(
    harness: Harness, fleet: list[FakeDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("server.ui.pages_rollouts.MEMBERS_SHOWN", 1)
    operator = browser(harness)
    failing = halted(harness, fleet, operator)
    page = operator.get("/ui/rollouts/1").text
    rows = re.findall(r'data-testid="member-row" data-device-id="([0-9a-f]+)"', page)
    assert rows == [failing.id]
    assert "1 more succeeded or pending devices are not listed" in page
    assert "Devices of this rollout (2)" in page


def test_no_rollout_starts_during_the_emergency_stop(
    harness: Harness, fleet: list[FakeDevice]
) -> None:
    rollouts.emergency_stop(harness.db, "storm", actor="operator:other", now=utc(harness.clock))
    answer = browser(harness).post("/ui/rollouts/new", GOOD_FORM)
    assert answer.status_code == 409
    assert "the emergency stop is on: clear it first" in answer.text
    assert 'name="stages" value="50,100"' in answer.text
    assert rollout_count(harness) == 0


def test_the_list_shows_the_newest_past_rollouts(
    harness: Harness, fleet: list[FakeDevice], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("server.ui.pages_rollouts.PAST_SHOWN", 2)
    operator = browser(harness)
    for rollout_id in (1, 2, 3):
        assert operator.post("/ui/rollouts/new", GOOD_FORM).status_code == 303
        assert operator.post(f"/ui/rollouts/{rollout_id}/abort").status_code == 303
    assert operator.post("/ui/rollouts/new", GOOD_FORM).status_code == 303
    page = operator.get("/ui/rollouts").text
    listed = re.findall(r'data-rollout-id="([0-9]+)"', page)
    assert listed == ["4", "3", "2"]  # the running one, then the two newest others
    assert "1 older rollout not listed" in page
    every = operator.get("/ui/rollouts?every=true").text
    assert re.findall(r'data-rollout-id="([0-9]+)"', every) == ["4", "3", "2", "1"]
    assert "older-rollouts" not in every
