"""Health checks: each type against a real or faked counterpart, the deadline, and robustness."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_subprocess import FakeProcess

from chaos.http_faults import QuietHTTPServer
from updater import health
from updater.config import HealthCheckSpec
from updater.health import (
    DEADLINE_PASSED,
    HealthReport,
    check_name,
    compose_ps_argv,
    parse_compose_ps,
    run_health_checks,
)


def spec(kind: str, timeout_s: float = 5.0, **settings: Any) -> HealthCheckSpec:
    return HealthCheckSpec(type=kind, settings=settings, timeout_s=timeout_s)


def run_one(check: HealthCheckSpec, deadline_s: float = 30.0) -> health.CheckResult:
    report = run_health_checks([check], deadline_s)
    assert len(report.results) == 1
    return report.results[0]


# --- the report ----------------------------------------------------------------------------


def test_no_checks_is_ok() -> None:
    report = run_health_checks([], 10.0)
    assert report == HealthReport(ok=True, results=(), elapsed_s=report.elapsed_s)
    assert report.ok
    assert report.failures == ()


def test_report_is_ok_only_when_every_check_passed() -> None:
    report = run_health_checks(
        [spec("command", argv=["true"]), spec("command", argv=["false"])], 10
    )
    assert not report.ok
    assert [r.ok for r in report.results] == [True, False]
    assert [r.name for r in report.failures] == ["command:false"]


def test_names_come_from_the_configuration() -> None:
    table = {"type": "http", "url": "http://127.0.0.1:8080/health"}
    assert check_name(HealthCheckSpec.from_dict(table, 0)) == "http:http://127.0.0.1:8080/health"
    assert check_name(spec("systemd", unit="camera.service")) == "systemd:camera.service"
    assert check_name(spec("tcp", port=1883)) == "tcp:127.0.0.1:1883"
    assert check_name(spec("tcp", host="10.0.0.2", port=22)) == "tcp:10.0.0.2:22"
    assert check_name(spec("compose", project_dir="/srv/app")) == "compose:/srv/app"
    assert check_name(spec("command", argv=["/bin/check", "-q"])) == "command:/bin/check -q"
    assert check_name(spec("bogus")) == "bogus:?"
    assert check_name(spec("http")) == "http:?"


def test_unknown_type_is_a_failed_result_not_an_exception() -> None:
    result = run_one(spec("bogus"))
    assert not result.ok
    assert "unknown check type" in result.detail


def test_a_check_that_raises_is_a_failed_result() -> None:
    result = run_one(spec("http", url="http://127.0.0.1:1/", expect_status="two hundred"))
    assert not result.ok
    assert result.detail.startswith("ValueError")


# --- systemd (faked systemctl) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdout", "returncode", "ok", "state"),
    [
        ("active\n", 0, True, "active"),
        ("inactive\n", 3, False, "inactive"),
        ("failed\n", 3, False, "failed"),
        ("activating\n", 3, False, "activating"),
        ("", 1, False, "unknown (systemctl exit 1)"),
    ],
)
def test_systemd(fp: FakeProcess, stdout: str, returncode: int, ok: bool, state: str) -> None:
    fp.register(["systemctl", "is-active", "camera.service"], stdout=stdout, returncode=returncode)
    result = run_one(spec("systemd", unit="camera.service"))
    assert result.name == "systemd:camera.service"
    assert result.type == "systemd"
    assert result.ok is ok
    assert result.detail == f"camera.service is {state}"


def test_systemd_without_systemctl(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    result = run_one(spec("systemd", unit="camera.service"))
    assert not result.ok
    assert result.detail.startswith("cannot run systemctl")


# --- http (a real server on loopback) -----------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(2.0)
        status = 500 if self.path == "/error" else 200
        body = b"fine\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output clean


@pytest.fixture
def http_base() -> Iterator[str]:
    server = QuietHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_http_200(http_base: str) -> None:
    result = run_one(spec("http", url=f"{http_base}/health"))
    assert result.ok
    assert result.detail == "HTTP 200"
    assert result.name == f"http:{http_base}/health"


def test_http_500(http_base: str) -> None:
    result = run_one(spec("http", url=f"{http_base}/error"))
    assert not result.ok
    assert result.detail == "HTTP 500, expected 200"


def test_http_expected_status(http_base: str) -> None:
    assert run_one(spec("http", url=f"{http_base}/error", expect_status=500)).ok


def test_http_connection_refused(refused_port: int) -> None:
    result = run_one(spec("http", url=f"http://127.0.0.1:{refused_port}/health"))
    assert not result.ok
    assert result.detail.startswith("connection failed")
    assert "refused" in result.detail.lower()


def test_http_slow_answer_times_out(http_base: str) -> None:
    result = run_one(spec("http", timeout_s=0.3, url=f"{http_base}/slow"))
    assert not result.ok
    assert result.detail == "timed out after 0.3 s"
    assert result.duration_s < 1.5


def test_http_ignores_proxy_settings(
    http_base: str, monkeypatch: pytest.MonkeyPatch, refused_port: int
) -> None:
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{refused_port}")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{refused_port}")
    assert run_one(spec("http", url=f"{http_base}/health")).ok


# --- tcp (a real listening socket) --------------------------------------------------------


def test_tcp_listening() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = run_one(spec("tcp", port=port))
    assert result.ok
    assert result.detail == "connected"
    assert result.name == f"tcp:127.0.0.1:{port}"


def test_tcp_refused(refused_port: int) -> None:
    result = run_one(spec("tcp", host="127.0.0.1", port=refused_port))
    assert not result.ok
    assert result.detail == "cannot connect: Connection refused"


def test_a_hanging_check_is_abandoned(monkeypatch: pytest.MonkeyPatch) -> None:
    # Some waits honour no timeout (DNS inside a connect); the report must still come back.
    release = threading.Event()

    def hang(*args: Any, **kwargs: Any) -> socket.socket:
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(health, "ABANDON_GRACE_S", 0.2)
    try:
        began = time.monotonic()
        report = run_health_checks(
            [spec("tcp", timeout_s=0.2, port=1), spec("command", argv=["true"])], 5
        )
        took = time.monotonic() - began
    finally:
        release.set()
    assert took < 2.0
    assert not report.results[0].ok
    assert report.results[0].detail == "no answer within 0.2 s; check abandoned"
    assert report.results[1].ok


# --- docker compose (faked docker) --------------------------------------------------------

PROJECT = "/srv/app"


def container(
    service: str, state: str = "running", health: str = "", **extra: Any
) -> dict[str, Any]:
    return {
        "Name": f"app-{service}-1",
        "Service": service,
        "State": state,
        "Health": health,
        "ExitCode": extra.pop("exit_code", 0),
        "Status": "Up 2 minutes",
        "Labels": extra.pop("labels", "com.docker.compose.project=app"),
        "Publishers": [{"URL": "127.0.0.1", "TargetPort": 80, "PublishedPort": 8080}],
        **extra,
    }


def json_lines(*containers: dict[str, Any]) -> str:
    return "".join(json.dumps(c) + "\n" for c in containers)


def json_array(*containers: dict[str, Any]) -> str:
    return json.dumps(list(containers)) + "\n"


def compose(
    fp: FakeProcess, stdout: str, returncode: int = 0, stderr: str = "", **settings: Any
) -> health.CheckResult:
    fp.register(compose_ps_argv(PROJECT), stdout=stdout, stderr=stderr, returncode=returncode)
    return run_one(spec("compose", project_dir=PROJECT, **settings))


@pytest.mark.parametrize("form", [json_lines, json_array])
def test_compose_all_running_and_healthy(fp: FakeProcess, form: Callable[..., str]) -> None:
    result = compose(fp, form(container("web", health="healthy"), container("db")))
    assert result.ok, result.detail
    assert result.detail == "running: db, web"
    assert result.name == f"compose:{PROJECT}"


@pytest.mark.parametrize("form", [json_lines, json_array])
def test_compose_unhealthy(fp: FakeProcess, form: Callable[..., str]) -> None:
    result = compose(fp, form(container("web"), container("db", health="unhealthy")))
    assert not result.ok
    assert result.detail == "db: running but unhealthy"


def test_compose_starting_is_not_yet_healthy(fp: FakeProcess) -> None:
    result = compose(fp, json_lines(container("web", health="starting")))
    assert not result.ok
    assert result.detail == "web: running but starting"


def test_compose_exited(fp: FakeProcess) -> None:
    result = compose(fp, json_lines(container("web"), container("db", "exited", exit_code=137)))
    assert not result.ok
    assert result.detail == "db: exited (exit 137)"


def test_compose_listed_services_only(fp: FakeProcess) -> None:
    output = json_lines(container("web"), container("batch", "exited", exit_code=1))
    assert compose(fp, output, services=["web"]).ok


def test_compose_listed_service_without_container(fp: FakeProcess) -> None:
    result = compose(fp, json_lines(container("web")), services=["web", "mqtt"])
    assert not result.ok
    assert result.detail == "mqtt: no container"


def test_compose_every_replica_must_run(fp: FakeProcess) -> None:
    replicas = json_lines(container("web"), container("web", "restarting"))
    result = compose(fp, replicas)
    assert not result.ok
    assert result.detail == "web: restarting"


def test_compose_ignores_one_off_containers(fp: FakeProcess) -> None:
    one_off = container("web", "exited", labels="com.docker.compose.oneoff=True,x=y")
    assert compose(fp, json_lines(container("web"), one_off)).ok


def test_compose_empty_project_fails(fp: FakeProcess) -> None:
    result = compose(fp, "")
    assert not result.ok
    assert result.detail == "no containers in the project"
    assert not compose(fp, "[]\n").ok


def test_compose_error_exit(fp: FakeProcess) -> None:
    result = compose(fp, "", returncode=1, stderr="no configuration file provided: not found\n")
    assert not result.ok
    assert result.detail == "docker compose ps exited 1: no configuration file provided: not found"


def test_compose_garbage_output(fp: FakeProcess) -> None:
    result = compose(fp, "WARN[0000] something odd\n{not json\n")
    assert not result.ok
    assert result.detail.startswith("cannot parse docker compose ps output")


def test_parse_compose_ps_both_forms_agree() -> None:
    containers = [container("web"), container("db", health="healthy")]
    assert parse_compose_ps(json_lines(*containers)) == containers
    assert parse_compose_ps(json_array(*containers)) == containers
    assert parse_compose_ps(json.dumps(containers, indent=2)) == containers
    assert parse_compose_ps("  \n") == []


@pytest.mark.parametrize("text", ["42", '"running"', "[1, 2]", "null", '{"a": 1}\n7\n'])
def test_parse_compose_ps_refuses_non_objects(text: str) -> None:
    with pytest.raises(ValueError, match="something other than"):
        parse_compose_ps(text)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["Service", "State", "Health", "Name", "Labels", "ExitCode", "x"]),
            children,
            max_size=5,
        )
    ),
    max_leaves=12,
)


def _compose_output(draw_kind: str, values: list[Any], text: str) -> str:
    if draw_kind == "lines":
        return "".join(json.dumps(v) + "\n" for v in values)
    if draw_kind == "array":
        return json.dumps(values)
    return text


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["lines", "array", "text"]),
    values=st.lists(_json_values, max_size=4),
    text=st.text(max_size=200),
    services=st.none() | st.lists(st.sampled_from(["web", "db", ""]), max_size=2),
)
def test_arbitrary_compose_output_never_raises(
    kind: str, values: list[Any], text: str, services: list[str] | None
) -> None:
    output = _compose_output(kind, values, text)
    settings_: dict[str, Any] = {"project_dir": PROJECT}
    if services is not None:
        settings_["services"] = services
    with FakeProcess() as fake:
        fake.register(compose_ps_argv(PROJECT), stdout=output)
        report = run_health_checks([HealthCheckSpec("compose", settings_, 5.0)], 10.0)
    assert isinstance(report.ok, bool)
    assert len(report.results) == 1
    assert "\n" not in report.results[0].detail


@given(st.text(max_size=300))
def test_parse_compose_ps_raises_only_value_error(text: str) -> None:
    try:
        parsed = parse_compose_ps(text)
    except ValueError:
        return
    assert all(isinstance(item, dict) for item in parsed)


# --- command (real processes) -------------------------------------------------------------


def test_command_true() -> None:
    result = run_one(spec("command", argv=["true"]))
    assert result.ok
    assert result.detail == "exit 0"


def test_command_false() -> None:
    result = run_one(spec("command", argv=["false"]))
    assert not result.ok
    assert result.detail == "exit 1"


def test_command_output_tail() -> None:
    script = "echo first; echo second >&2; echo third; exit 3"
    result = run_one(spec("command", argv=["sh", "-c", script]))
    assert not result.ok
    assert result.detail == "exit 3: first | second | third"


def test_command_output_is_cut_to_a_short_tail() -> None:
    script = "head -c 5000 /dev/zero | tr '\\0' x; echo; echo END"
    result = run_one(spec("command", argv=["sh", "-c", script]))
    assert result.ok
    assert len(result.detail) < 220
    assert result.detail.endswith("x | END")


def test_command_timeout() -> None:
    result = run_one(spec("command", timeout_s=0.3, argv=["sleep", "10"]))
    assert not result.ok
    assert result.detail == "timed out after 0.3 s"
    assert result.duration_s < 1.5


def test_command_timeout_kills_grandchildren_holding_the_output() -> None:
    # The background sleep inherits stdout; without killing the group we would wait for it.
    script = "echo started; sleep 10 & wait"
    result = run_one(spec("command", timeout_s=0.3, argv=["sh", "-c", script]))
    assert not result.ok
    assert result.detail == "timed out after 0.3 s: started"
    assert result.duration_s < 1.5


def test_command_not_found() -> None:
    result = run_one(spec("command", argv=["/nonexistent/check"]))
    assert not result.ok
    assert result.detail == "cannot run /nonexistent/check: No such file or directory"


# --- the overall deadline -----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_deadline_with_a_fake_clock(fp: FakeProcess) -> None:
    clock = FakeClock()
    for unit in ("a.service", "b.service"):
        fp.register(
            ["systemctl", "is-active", unit],
            stdout="active\n",
            callback=lambda process: clock.advance(50),
        )
    fp.register(["systemctl", "is-active", "c.service"], stdout="active\n")
    specs = [spec("systemd", unit=u) for u in ("a.service", "b.service", "c.service")]
    report = run_health_checks(specs, 80.0, clock=clock)
    assert [r.ok for r in report.results] == [True, True, False]
    assert report.results[2].detail == DEADLINE_PASSED
    assert report.results[2].duration_s == 0.0
    assert [r.duration_s for r in report.results[:2]] == [50.0, 50.0]
    assert report.elapsed_s == 100.0
    assert fp.call_count(["systemctl", "is-active", "c.service"]) == 0
    assert not report.ok


def test_deadline_already_passed_runs_nothing(fp: FakeProcess) -> None:
    clock = FakeClock()
    report = run_health_checks([spec("systemd", unit="x"), spec("tcp", port=1)], 0.0, clock=clock)
    assert [r.detail for r in report.results] == [DEADLINE_PASSED, DEADLINE_PASSED]
    assert [r.name for r in report.results] == ["systemd:x", "tcp:127.0.0.1:1"]


def test_a_check_gets_only_the_time_left() -> None:
    specs = [spec("command", timeout_s=30, argv=["sleep", "10"]), spec("command", argv=["true"])]
    began = time.monotonic()
    report = run_health_checks(specs, 0.4)
    assert time.monotonic() - began < 2.0
    assert report.results[0].detail == "timed out after 0.4 s"
    assert report.results[1].detail == DEADLINE_PASSED
