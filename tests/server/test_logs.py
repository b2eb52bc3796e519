"""The server's log lines (server/logs.py): JSON for Loki, one line per record whatever it holds,
the ``component`` label, the access log by route template, and never a secret; then the real
``fleet server run`` process, whose every output line must be such a line."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from fleet_core.cli import fleet
from server.logs import (
    REDACTED,
    AccessLogMiddleware,
    JsonFormatter,
    TextFormatter,
    logging_config,
    redact,
)
from tests.server.conftest import Harness, listening_socket

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
SECRETS = (
    "fleet_op_9zQ-secret-operator-token",
    "fleet_session_Sx_secret-session",
    "fleet_enroll_Ey-secret-enrollment",
    "s3cr3t-b3arer.value",
)


class Captured:
    """A logger of its own whose lines land in a string, formatted by ``formatter``."""

    def __init__(self, formatter: logging.Formatter, name: str = "server.test") -> None:
        self.stream = io.StringIO()
        handler = logging.StreamHandler(self.stream)
        handler.setFormatter(formatter)
        self.logger = logging.getLogger(name)
        self.logger.handlers = [handler]
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]


@pytest.fixture
def captured() -> Iterator[Captured]:
    capture = Captured(JsonFormatter())
    yield capture
    capture.logger.handlers = []
    capture.logger.propagate = True


def test_a_record_is_one_json_object_with_the_component_label(captured: Captured) -> None:
    captured.logger.info(
        "generated server key %s", "ab12",
        extra={"event": "key.generated", "path": Path("/srv/fleet/key.pem"), "bytes": 32,
               "ratio": float("nan"), "component": "updater", "ts": "then"},
    )  # fmt: skip
    [line] = captured.lines()
    assert list(line)[:6] == ["ts", "level", "component", "logger", "message", "event"]
    assert TS.fullmatch(line["ts"])
    assert line["level"] == "info" and line["component"] == "server"
    assert (line["logger"], line["message"]) == ("server.test", "generated server key ab12")
    assert line["event"] == "key.generated"
    # fields follow, sorted; one named like a key cannot overwrite it
    assert line["path"] == "/srv/fleet/key.pem" and line["bytes"] == 32
    assert line["ratio"] == "nan"
    assert (line["_component"], line["_ts"]) == ("updater", "then")
    assert list(line)[6:] == sorted(list(line)[6:])


def test_an_exception_gives_one_line_with_its_traceback(captured: Captured) -> None:
    try:
        raise ValueError("disk full\nsecond line of the message")
    except ValueError:
        captured.logger.exception("rollout evaluation failed")
    captured.logger.warning("stack", stack_info=True)
    first, second = captured.text.splitlines()
    line = json.loads(first)
    assert (line["level"], line["message"]) == ("error", "rollout evaluation failed")
    assert line["error"].startswith("Traceback (most recent call last):")
    assert "ValueError: disk full\nsecond line of the message" in line["error"]
    assert "test_an_exception_gives_one_line" in json.loads(second)["stack"]


def test_a_record_that_cannot_be_formatted_still_gives_a_line() -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    # records made directly and formatted by the formatter alone: a logger would also hand
    # them to whatever other handler is installed (pytest's own log capture raises on them)
    bad_arguments = logging.LogRecord(
        "server.test", logging.INFO, __file__, 1, "value %d", ("not a number",), None
    )
    bad_field = logging.LogRecord("server.test", logging.INFO, __file__, 1, "object", (), None)
    bad_field.thing = Unprintable()
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(record)) for record in (bad_arguments, bad_field)]
    assert [line["message"] for line in lines] == ["unformattable log record"] * 2
    assert all(line["component"] == "server" and line["level"] == "error" for line in lines)


def test_no_secret_reaches_a_line(captured: Captured) -> None:
    operator, session, enrollment, bearer = SECRETS
    captured.logger.warning(
        "refused Authorization: Bearer %s (query token=%s)", bearer, operator,
        extra={"token": enrollment, "headers": {"Authorization": f"Bearer {bearer}",
               "Accept": "application/json"}, "detail": [f"session {session}"]},
    )  # fmt: skip
    try:
        raise PermissionError(f"unknown session token {session}")
    except PermissionError:
        captured.logger.exception("login failed")
    text = captured.text
    for secret in SECRETS:
        assert secret not in text
    first, second = captured.lines()
    assert first["message"] == f"refused Authorization: Bearer {REDACTED} (query token=" + (
        f"fleet_op_{REDACTED})"
    )
    assert first["token"] == REDACTED
    assert first["headers"] == {"Accept": "application/json", "Authorization": REDACTED}
    assert first["detail"] == [f"session fleet_session_{REDACTED}"]
    assert f"fleet_session_{REDACTED}" in second["error"]
    assert redact("basic dXNlcjpwYXNz") == f"basic {REDACTED}"


def test_the_text_format_is_for_people_and_scrubbed_too() -> None:
    capture = Captured(TextFormatter(), "server.text")
    capture.logger.info("login with Bearer %s", SECRETS[3])
    [line] = capture.text.splitlines()
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} INFO server\.text: login with Bearer "
        rf"{re.escape(REDACTED)}",
        line,
    )
    with pytest.raises(ValueError, match="unknown log format"):
        logging_config("info", "xml")


def test_the_access_log_names_the_route_template_never_what_was_sent(harness: Harness) -> None:
    capture = Captured(JsonFormatter(), "server.access.test")
    client = TestClient(AccessLogMiddleware(harness.app, capture.logger))
    device_id = "ab" * 32
    headers = harness.headers["viewer"]  # a real token: the request gets as far as the route
    client.get(f"/api/v1/devices/{device_id}?token={SECRETS[1]}", headers=headers)
    client.get("/healthz")
    client.get(f"/no/such/{SECRETS[2]}")
    lines = capture.lines()
    assert [(line["method"], line["route"], line["status"]) for line in lines] == [
        ("GET", "/api/v1/devices/{device_id}", 404),
        ("GET", "/healthz", 200),
        ("GET", "unmatched", 404),
    ]
    assert all(line["event"] == "http.request" for line in lines)
    assert all(line["duration_s"] >= 0 and line["client"] for line in lines)
    # the device may be a field (found with | json), never a label
    assert lines[0]["device_id"] == device_id and "device_id" not in lines[1]
    assert lines[0]["message"] == "GET /api/v1/devices/{device_id} 404"
    for secret in (*SECRETS, headers["Authorization"].removeprefix("Bearer ")):
        assert secret not in capture.text


def test_the_log_format_option_takes_json_or_text() -> None:
    result = CliRunner().invoke(fleet, ["server", "run", "--log-format", "xml"])
    assert result.exit_code == 2 and "'json', 'text'" in result.output


# --- the real process -------------------------------------------------------------------------


def test_fleet_server_run_writes_only_json_lines_labelled_server(tmp_path: Path) -> None:
    # bound before the server starts, so every answer on this address is this server's
    sock = listening_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    command = [
        sys.executable, "-c", "from fleet_core.cli import main; main()", "server", "run",
        "--data-dir", str(tmp_path / "data"), "--fd", str(sock.fileno()),
    ]  # fmt: skip
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with sock, out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, pass_fds=[sock.fileno()])
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"server exited:\n{err.read_text()}"
            try:
                if requests.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass  # the socket queues connections until the server accepts: not up yet
            assert time.monotonic() < deadline, f"server did not come up:\n{err.read_text()}"
            time.sleep(0.05)
        authorization = {"Authorization": f"Bearer {SECRETS[0]}"}
        answer = requests.get(url + "/api/v1/devices", headers=authorization, timeout=10)
        assert answer.status_code == 401
        requests.post(url + f"/api/v1/devices/{'cd' * 32}/checkin", json={}, timeout=10)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    text = out.read_text() + err.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines and all(line["component"] == "server" for line in lines)
    assert all(TS.fullmatch(line["ts"]) and line["level"] and line["logger"] for line in lines)
    messages = {(line["logger"], line["message"]) for line in lines}
    assert ("uvicorn.error", "Application startup complete.") in messages  # uvicorn's own
    assert ("uvicorn.error", "Shutting down") in messages
    access = [line for line in lines if line["logger"] == "server.access"]
    assert {(line["route"], line["status"]) for line in access} >= {
        ("/healthz", 200),
        ("/api/v1/devices", 401),
    }
    checkin = next(line for line in access if line["method"] == "POST")
    assert checkin["route"] == "/api/v1/devices/{device_id}/checkin"
    assert checkin["device_id"] == "cd" * 32
    assert SECRETS[0] not in text
