"""The operator commands against a server on real HTTP: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from fleet_core.cli import fleet
from server.cli.common import parse_duration, parse_percent
from server.client import connection_problem
from signing.keys import generate_key, load_private_key
from tests.conftest import assert_one_line_error
from tests.server.conftest import FakeDevice, LiveServer

MakeBundle = Callable[..., Path]


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(fleet, [str(a) for a in args], env=env)


def api(live: LiveServer, role: str = "operator") -> list[str]:
    token = live.harness.headers[role]["Authorization"].split()[1]
    return ["--server", live.url, "--token", token]


def test_token_create_prints_a_working_token(live_server: LiveServer) -> None:
    harness = live_server.harness
    result = run(
        "server", "token", "create", "--role", "admin", "--name", "alice",
        "--database-url", harness.settings.database_url,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert token.startswith("fleet_op_")
    assert "not shown again" in result.stderr
    listed = run("device", "list", "--server", live_server.url, "--token", token)
    assert listed.exit_code == 0, listed.output
    assert run("server", "token", "create", "--role", "root", "--name", "x").exit_code == 2
    assert_one_line_error(
        run("server", "token", "create", "--role", "admin", "--name", "x"),
        "give --data-dir or --database-url",
    )


def test_release_upload_list_and_device_commands(
    live_server: LiveServer, make_bundle: MakeBundle, tmp_path: Path
) -> None:
    harness = live_server.harness
    uploaded = run("release", "upload", make_bundle(version="2.0.0"), *api(live_server))
    assert uploaded.exit_code == 0, uploaded.output
    assert uploaded.output.startswith("release 2.0.0 accepted: compatible metrica-rpi4")
    duplicate = run("release", "upload", make_bundle(version="2.0.0"), *api(live_server))
    assert_one_line_error(duplicate, "409 duplicate_version")
    listed = run("release", "list", *api(live_server, "viewer"))
    assert listed.exit_code == 0
    assert listed.output.splitlines()[0].split() == [
        "VERSION", "COMPATIBLE", "SECURITY", "UPLOADED", "IMAGES",
    ]  # fmt: skip
    assert listed.output.splitlines()[1].split()[:3] == ["2.0.0", "metrica-rpi4", "1"]
    as_json = run("release", "list", "--json", *api(live_server, "viewer"))
    assert json.loads(as_json.output)[0]["version"] == "2.0.0"
    third = run("release", "upload", make_bundle(version="3.0.0"), "--json", *api(live_server))
    assert third.exit_code == 0, third.output
    assert json.loads(third.stdout)["version"] == "3.0.0"

    # pre-authorize a device by its PEM public key, as a device would have generated it
    generate_key(tmp_path / "device")
    device = FakeDevice(
        harness.client,
        key=load_private_key(tmp_path / "device.pem").private_key,
        hostname="cam-0007",
    )
    pre = run("device", "preauthorize", tmp_path / "device.pub", *api(live_server))
    assert pre.exit_code == 0, pre.output
    assert pre.output.strip() == device.id
    again = run("device", "preauthorize", device.public_hex, "--json", *api(live_server))
    assert json.loads(again.stdout) == {"device_id": device.id}
    assert_one_line_error(
        run("device", "preauthorize", "nonsense", *api(live_server)), "neither 64 hex digits"
    )
    assert device.enroll().status_code == 200

    assigned = run("device", "assign", device.id, "2.0.0", *api(live_server))
    assert assigned.exit_code == 0, assigned.output
    assert assigned.output.strip() == f"device {device.id}: assigned 2.0.0"
    assert_one_line_error(
        run("device", "assign", device.id, "2.0.0", *api(live_server, "viewer")), "403 forbidden"
    )
    assert_one_line_error(
        run("device", "assign", device.id, "7.7.7", *api(live_server)), "404 unknown_release"
    )
    table = run("device", "list", *api(live_server, "viewer"))
    assert table.exit_code == 0
    row = table.output.splitlines()[1].split()
    assert row[:3] == [device.id, "cam-0007", "metrica-rpi4"]
    assert row[4:6] == ["enrolled", "2.0.0"]
    devices = json.loads(run("device", "list", "--json", *api(live_server, "viewer")).output)
    assert devices[0]["assigned_version"] == "2.0.0"
    assert run("device", "assign", device.id, "none", *api(live_server)).output.strip() == (
        f"device {device.id}: assigned nothing"
    )


def test_enrollment_token_create_directly_and_over_http(live_server: LiveServer) -> None:
    harness = live_server.harness
    direct = run(
        "server", "enrollment-token", "create", "--uses", "2", "--expires-in", "7d",
        "--database-url", harness.settings.database_url,
    )  # fmt: skip
    assert direct.exit_code == 0, direct.output
    assert "admits 2 device(s), expires " in direct.stderr
    over_http = run("server", "enrollment-token", "create", "--uses", "1", *api(live_server))
    assert over_http.exit_code == 0, over_http.output
    assert "never expires" in over_http.stderr
    as_json = run("server", "enrollment-token", "create", "--uses", "3", "--expires-in", "1h",
                  "--json", *api(live_server))  # fmt: skip
    created = json.loads(as_json.stdout)
    assert (created["uses"], created["expires"] is not None) == (3, True)
    for token in (direct.stdout.strip(), over_http.stdout.strip(), created["token"]):
        assert FakeDevice(harness.client).enroll(token).status_code == 200
    refused = run(
        "server", "enrollment-token", "create", "--uses", "1", *api(live_server, "viewer")
    )
    assert_one_line_error(refused, "403 forbidden")
    assert run("server", "enrollment-token", "create", "--uses", "0").exit_code == 2


def test_server_and_token_from_environment_and_config_file(
    live_server: LiveServer, tmp_path: Path
) -> None:
    token = live_server.harness.viewer["Authorization"].split()[1]
    by_env = run("release", "list", env={"FLEET_SERVER": live_server.url, "FLEET_TOKEN": token})
    assert by_env.exit_code == 0, by_env.output
    config = tmp_path / "config" / "fleet" / "cli.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'server = "{live_server.url}"\ntoken = "{token}"\n')
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "FLEET_SERVER": "", "FLEET_TOKEN": ""}
    by_file = run("release", "list", env=env)
    assert by_file.exit_code == 0, by_file.output
    # a flag wins over the file
    wrong = run("release", "list", "--token", "fleet_op_wrong", env=env)
    assert_one_line_error(wrong, "401 unauthenticated")
    config.write_text('server = "x"\ncolour = "blue"\n')
    assert_one_line_error(run("release", "list", env=env), "unknown setting(s) colour")
    config.unlink()
    assert_one_line_error(run("release", "list", env=env), "no server: give --server")


def test_unreachable_server(refused_port: int, tmp_path: Path) -> None:
    server = ["--server", f"http://127.0.0.1:{refused_port}", "--token", "x"]
    result = run("release", "list", *server)
    assert_one_line_error(result, "connection failed: refused (is the server running")
    bundle = tmp_path / "x.bundle"
    bundle.write_bytes(b"x" * 1000)
    upload = run("release", "upload", bundle, *server)  # refused is not an upload limit
    assert_one_line_error(upload, "connection failed: refused")
    assert "upload limit" not in upload.stderr


def test_a_failed_connection_is_named_for_what_it_was() -> None:
    import requests
    import urllib3.exceptions as failures

    def wrapped(reason: Exception) -> requests.ConnectionError:
        return requests.ConnectionError(failures.MaxRetryError(None, "/x", reason))  # type: ignore[arg-type]

    unresolved = failures.NameResolutionError("nowhere.invalid", None, OSError("no"))  # type: ignore[arg-type]
    assert connection_problem(wrapped(unresolved), True).endswith("host name does not resolve")
    cut = requests.ConnectionError(failures.ProtocolError("aborted", BrokenPipeError()))
    assert "upload limit" in connection_problem(cut, True)
    assert connection_problem(cut, False) == "connection cut (ConnectionError)"
    timed_out = failures.ConnectTimeoutError(None, "timed out")
    assert "timed out" in connection_problem(wrapped(timed_out), False)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800),
        ("1h30m", 5400), ("1d12h", 129600), ("2m30s", 150), (" 1h ", 3600),
        ("2147483647", 2**31 - 1),
    ],
)  # fmt: skip
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "0", "0s", "0h0m", "s", "1.5h", "30m1h", "1h1h", "-5m", "1w", "٣", "2147483648", "1 h"],
)
def test_a_duration_that_is_not_one_is_refused_by_name(text: str) -> None:
    with pytest.raises(click.BadParameter, match="give a positive number of seconds"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "fraction"), [("5%", 0.05), ("0.5%", 0.005), (" 0% ", 0.0)])
def test_parse_percent(text: str, fraction: float) -> None:
    assert parse_percent(text) == pytest.approx(fraction)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0.5", "write a percentage with %"),  # half, or half a percent?
        ("5", "write a percentage with %"),
        ("lots%", "give a percentage such as 5%"),
        ("100%", "from 0 to below 100%"),
        ("-1%", "from 0 to below 100%"),
        ("nan%", "from 0 to below 100%"),
    ],
)
def test_a_percentage_without_its_sign_or_out_of_range_is_refused(text: str, problem: str) -> None:
    with pytest.raises(click.BadParameter, match=problem):
        parse_percent(text)


def test_a_bad_duration_or_percentage_names_its_option() -> None:
    for args, option in [
        (["rollout", "start", "2.0.0", "--soak", "1h30"], "--soak"),
        (["rollout", "start", "2.0.0", "--max-failure", "0.5"], "--max-failure"),
        (["rollout", "start", "2.0.0", "--install-deadline", "soon"], "--install-deadline"),
        (["server", "token", "create", "--role", "admin", "--name", "x", "--expires-in", "1y",
          "--data-dir", "/nonexistent"], "--expires-in"),
    ]:  # fmt: skip
        result = run(*args)
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '{option}'" in result.stderr, result.stderr


def test_fleet_keys_stays_light() -> None:
    script = (
        "import sys\n"
        "from fleet_core.cli import fleet\n"
        "try:\n"
        "    fleet(['keys', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "fleet.get_command(None, 'server')\n"
        "heavy = {'fastapi', 'sqlalchemy', 'uvicorn', 'requests', 'alembic', 'starlette'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_busy_port_is_one_error_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        busy = run("server", "run", "--data-dir", tmp_path / "data", "--port", str(port))
        assert_one_line_error(busy, f"cannot listen on 127.0.0.1:{port}: the port is in use")
    elsewhere = run("server", "run", "--data-dir", tmp_path / "data", "--host", "192.0.2.1")
    assert_one_line_error(elsewhere, "cannot listen on 192.0.2.1:8080: ")  # not this host's
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_a_host_name_listens_on_ipv4_as_uvicorn_would() -> None:
    from server.cli.serve import listening_socket

    with listening_socket("localhost", 0) as sock:  # whatever the resolver lists first
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "127.0.0.1"
