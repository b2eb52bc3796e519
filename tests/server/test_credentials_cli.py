"""The ``fleet`` commands of the credential lifecycle: operator tokens with an expiry, listed and
revoked (over the API or on the database directly), enrollment tokens listed and revoked, devices
decommissioned, reinstated, quarantined and released."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fleet_core.cli import fleet
from server.settings import CredentialLimits, Settings
from tests.conftest import assert_one_line_error
from tests.server.conftest import FakeDevice, LiveServer

Enrolled = Callable[..., FakeDevice]


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(fleet, [str(a) for a in args])


def api(live: LiveServer, role: str = "admin") -> list[str]:
    token = live.harness.headers[role]["Authorization"].split()[1]
    return ["--server", live.url, "--token", token]


def test_token_create_on_the_host_has_an_expiry(live_server: LiveServer) -> None:
    url = live_server.harness.settings.database_url
    made = run(
        "server", "token", "create", "--role", "viewer", "--name", "ci",
        "--expires-in", "30d", "--database-url", url,
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    listed = run("server", "token", "list", "--json", "--database-url", url)
    assert listed.exit_code == 0, listed.output
    (ci,) = [t for t in json.loads(listed.stdout) if t["name"] == "ci"]
    expires = datetime.strptime(ci["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    created = datetime.strptime(ci["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert expires - created == timedelta(days=30)
    default = run(
        "server", "token", "create", "--role", "viewer", "--name", "d", "--database-url", url
    )  # fmt: skip
    assert default.exit_code == 0, default.output
    too_long = run(
        "server", "token", "create", "--role", "viewer", "--name", "x",
        "--expires-in", "366d", "--database-url", url,
    )  # fmt: skip
    assert too_long.exit_code == 2 and "expires-in" in too_long.output
    assert made.stdout.strip() not in listed.stdout
    as_json = run(
        "server", "token", "create", "--role", "operator", "--name", "ci-json",
        "--expires-in", "1d", "--database-url", url, "--json",
    )  # fmt: skip
    document = json.loads(as_json.stdout)
    assert (document["name"], document["role"]) == ("ci-json", "operator")
    assert document["token"].startswith("fleet_op_") and document["expires"].endswith("Z")


def test_token_list_and_revoke_over_the_api(live_server: LiveServer) -> None:
    table = run("server", "token", "list", *api(live_server))
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "NAME", "ROLE", "STATUS", "EXPIRES"]
    assert any("test-viewer" in line and "never" in line for line in lines)
    listed = json.loads(run("server", "token", "list", "--json", *api(live_server)).stdout)
    viewer_id = next(t["id"] for t in listed if t["name"] == "test-viewer")
    admin_id = next(t["id"] for t in listed if t["name"] == "test-admin")
    revoked = run("server", "token", "revoke", str(viewer_id), *api(live_server))
    assert revoked.exit_code == 0, revoked.output
    assert revoked.stdout == f"operator token {viewer_id} revoked\n"
    assert_one_line_error(run("device", "list", *api(live_server, "viewer")), "401")
    last = run("server", "token", "revoke", str(admin_id), *api(live_server))
    assert_one_line_error(last, "409 token_conflict")
    assert_one_line_error(run("server", "token", "list", *api(live_server, "operator")), "403")


def test_token_revoke_on_the_host(live_server: LiveServer) -> None:
    url = live_server.harness.settings.database_url
    listed = json.loads(run("server", "token", "list", "--json", "--database-url", url).stdout)
    operator_id = next(t["id"] for t in listed if t["name"] == "test-operator")
    done = run("server", "token", "revoke", str(operator_id), "--database-url", url, "--json")
    assert done.exit_code == 0, done.output
    revoked = json.loads(done.stdout)  # the token as listed, from the database directly
    assert (revoked["id"], revoked["name"], revoked["status"]) == (
        operator_id, "test-operator", "revoked",
    )  # fmt: skip
    assert_one_line_error(run("device", "list", *api(live_server, "operator")), "401")


def test_enrollment_token_list_and_revoke(live_server: LiveServer) -> None:
    secret = live_server.harness.enrollment_token(uses=2)
    table = run("server", "enrollment-token", "list", *api(live_server, "operator"))
    assert table.exit_code == 0, table.output
    assert secret not in table.stdout
    header, row = table.stdout.splitlines()
    assert header.split()[:3] == ["ID", "USES", "LEFT"] and row.split()[1:3] == ["2", "never"]
    token_id = row.split()[0]
    done = run("server", "enrollment-token", "revoke", token_id, *api(live_server, "operator"))
    assert done.exit_code == 0 and done.stdout == f"enrollment token {token_id} revoked\n"
    listed = run("server", "enrollment-token", "list", "--json", *api(live_server, "operator"))
    assert json.loads(listed.stdout)[0]["revoked"] is not None
    again = run("server", "enrollment-token", "revoke", token_id, "--json",
                *api(live_server, "operator"))  # fmt: skip
    assert_one_line_error(again, "409")
    live_server.harness.enrollment_token(uses=1)
    now_listed = run("server", "enrollment-token", "list", "--json", *api(live_server, "operator"))
    other_id = str(json.loads(now_listed.stdout)[-1]["id"])  # oldest first: the new one
    as_json = run("server", "enrollment-token", "revoke", other_id, "--json",
                  *api(live_server, "operator"))  # fmt: skip
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["id"] == int(other_id)
    refused = FakeDevice(live_server.harness.client).enroll(secret)
    assert refused.status_code == 403


def test_device_status_commands(live_server: LiveServer, enrolled: Enrolled) -> None:
    device = enrolled()
    op = api(live_server, "operator")
    missing_reason = run("device", "decommission", device.id, *op)
    assert missing_reason.exit_code == 2 and "--reason" in missing_reason.output
    quarantined = run("device", "quarantine", device.id, "--reason", "odd", *op)
    assert quarantined.stdout == f"device {device.id}: quarantined\n", quarantined.output
    listed = run("device", "list", *op)
    assert "STATUS" in listed.stdout.splitlines()[0] and "quarantined" in listed.stdout
    assert run("device", "release", device.id, *op).stdout.endswith(": active\n")
    gone = run("device", "decommission", device.id, "--reason", "stolen", *op)
    assert gone.stdout == f"device {device.id}: decommissioned\n"
    assert device.checkin().status_code == 403
    assert_one_line_error(run("device", "release", device.id, *op), "409 device_status_conflict")
    viewer = run("device", "reinstate", device.id, *api(live_server, "viewer"))
    assert_one_line_error(viewer, "403")
    assert run("device", "reinstate", device.id, *op).stdout.endswith(": active\n")
    device.login()
    assert device.checkin().status_code == 200


class _Stop(Exception):
    pass


def test_server_run_options_set_the_credential_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Settings] = []

    def create_app(settings: Settings, **_kwargs: object) -> None:
        seen.append(settings)
        raise _Stop

    monkeypatch.setattr("server.app.create_app", create_app)
    result = CliRunner().invoke(
        fleet,
        [
            "server", "run", "--data-dir", str(tmp_path / "data"),
            "--operator-token-ttl", "7d", "--operator-token-max-ttl", "30d",
            "--max-device-sessions", "2",
        ],
    )  # fmt: skip
    assert isinstance(result.exception, _Stop), result.output
    assert seen[0].credentials == CredentialLimits(
        operator_token_ttl_s=7 * 86400, operator_token_max_ttl_s=30 * 86400, max_device_sessions=2
    )
    refused = run(
        "server", "run", "--data-dir", tmp_path / "data", "--operator-token-ttl", "400d"
    )  # fmt: skip
    assert_one_line_error(refused, "operator token lifetime")
    assert len(seen) == 1
