"""Health checks: does the slot we booted do its job well enough to be committed?

The boot check runs :func:`run_health_checks` during a trial boot; every check must pass for the
trial slot to be committed. A check is one :class:`~updater.config.HealthCheckSpec`; its
``type`` picks the check function from one registry (``_CHECK_TYPES``):

``systemd``
    ``systemctl is-active UNIT`` prints ``active``.
``http``
    ``GET url`` answers with ``expect_status`` (default 200). Only the status line and headers
    are waited for; the body is never read.
``tcp``
    a TCP connection to ``host`` (default ``127.0.0.1``) and ``port`` is accepted.
``compose``
    ``docker compose --project-directory DIR ps --all --format json``: every container of the
    listed ``services`` (every container of the project if none are listed) is running and, if it
    has a healthcheck, healthy.
``command``
    ``argv`` exits with status 0 (a short tail of its output goes into the detail).

Time: the checks run one after another, so a failing report says which check was reached
before the deadline. Each gets ``min(timeout_s, time left before the overall deadline)``; once
the deadline has passed, the remaining checks are reported failed ("deadline passed") without
being run. A check that raises or times out is a failed result, never an exception.

Nothing here writes to disk: a power cut during the checks simply means the trial boot was not
committed, and the firmware falls back.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from updater.config import HealthCheckSpec

DEFAULT_TCP_HOST = "127.0.0.1"
DEFAULT_HTTP_STATUS = 200
DEADLINE_PASSED = "deadline passed"
OUTPUT_TAIL_CHARS = 200  # enough for the last error line; a log line is no place for a dump
# A check is given its budget, then this long to notice it; past that it is abandoned in its
# thread, because some waits (DNS resolution inside requests, a hung socket) honour no timeout
# and a boot check that never ends leaves the device on trial forever.
ABANDON_GRACE_S = 1.0


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``name`` as made by :func:`check_name`, ``type`` as
    configured, ``detail`` a one-line human explanation, ``duration_s`` by the report's clock."""

    name: str
    type: str
    ok: bool
    detail: str
    duration_s: float


@dataclass(frozen=True)
class HealthReport:
    """All checks of one run, in configuration order; ``ok`` only if every check passed."""

    ok: bool
    results: tuple[CheckResult, ...]
    elapsed_s: float

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        """The results that did not pass."""
        return tuple(result for result in self.results if not result.ok)


@dataclass(frozen=True)
class _Verdict:
    ok: bool
    detail: str


@dataclass(frozen=True)
class _CheckType:
    """How one check type names a check and runs it within a budget in seconds."""

    label: Callable[[Mapping[str, Any]], str]
    run: Callable[[Mapping[str, Any], float], _Verdict]


def run_health_checks(
    specs: Sequence[HealthCheckSpec],
    deadline_s: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> HealthReport:
    """Run ``specs`` in order, all within ``deadline_s`` seconds measured on ``clock``.

    Each check gets ``min(spec.timeout_s, time left)``. When the deadline has passed, every
    remaining check is reported failed with detail ``"deadline passed"`` and is not run. A check
    that raises, times out or hangs is a failed result; this function does not raise. A check
    that ignores its budget is abandoned :data:`ABANDON_GRACE_S` after it, so the whole run
    ends at most that much after the deadline.

    No checks configured means the report is ok: a device whose configuration asks for no
    checks is judged only on having booted far enough to run the boot check at all.
    """
    start = clock()
    results: list[CheckResult] = []
    for spec in specs:
        name = check_name(spec)
        left = deadline_s - (clock() - start)
        if left <= 0:
            results.append(CheckResult(name, spec.type, False, DEADLINE_PASSED, 0.0))
            continue
        began = clock()
        verdict = _run_guarded(spec, min(spec.timeout_s, left), name)
        results.append(CheckResult(name, spec.type, verdict.ok, verdict.detail, clock() - began))
    return HealthReport(
        ok=all(result.ok for result in results),
        results=tuple(results),
        elapsed_s=clock() - start,
    )


def check_name(spec: HealthCheckSpec) -> str:
    """A stable, human-readable name: ``"systemd:camera.service"``,
    ``"http:http://127.0.0.1:8080/health"``, ``"tcp:127.0.0.1:1883"``, ``"compose:/srv/app"``,
    ``"command:/usr/bin/check --quick"``. Used as a log field and a metric label, so it
    never changes for the same configuration."""
    kind = _CHECK_TYPES.get(spec.type)
    if kind is None:
        return f"{spec.type}:?"
    try:
        return f"{spec.type}:{kind.label(spec.settings)}"
    except Exception:  # a malformed spec must still get a name to report its failure under
        return f"{spec.type}:?"


def _run_guarded(spec: HealthCheckSpec, budget_s: float, name: str) -> _Verdict:
    outcome: list[_Verdict] = []

    def work() -> None:
        outcome.append(_run_one(spec, budget_s))

    worker = threading.Thread(target=work, name=f"health {name}", daemon=True)
    worker.start()
    worker.join(budget_s + ABANDON_GRACE_S)
    if not outcome:
        return _Verdict(False, f"no answer within {_seconds(budget_s)}; check abandoned")
    return outcome[0]


def _run_one(spec: HealthCheckSpec, budget_s: float) -> _Verdict:
    kind = _CHECK_TYPES.get(spec.type)
    if kind is None:
        return _Verdict(False, f"unknown check type {spec.type!r}")
    try:
        return kind.run(spec.settings, budget_s)
    except Exception as err:  # a broken check is a failed check, never a crashed boot check
        message = " ".join(str(err).split())[:OUTPUT_TAIL_CHARS]  # details are one line
        return _Verdict(False, f"{type(err).__name__}: {message}")


def _seconds(value: float) -> str:
    return f"{value:.3g} s"


def _tail(text: str) -> str:
    squeezed = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return squeezed[-OUTPUT_TAIL_CHARS:]


# --- processes ---------------------------------------------------------------------------


class _ProcessTimeout(Exception):
    def __init__(self, output: str) -> None:
        super().__init__("timed out")
        self.output = output


@dataclass(frozen=True)
class _Completed:
    returncode: int
    stdout: str
    stderr: str


def _run(argv: Sequence[str], timeout_s: float, *, merge_stderr: bool = False) -> _Completed:
    """Run ``argv`` with no input, killing its whole process group on timeout.

    Raises:
        _ProcessTimeout: it did not exit within ``timeout_s``.
        OSError: it could not be started.
    """
    # A session of its own lets the timeout kill grandchildren too: a shell script's children
    # would otherwise keep the output pipes open and block us long after the kill.
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        try:
            stdout, _ = process.communicate(timeout=ABANDON_GRACE_S)
        except subprocess.TimeoutExpired:
            stdout = b""
        raise _ProcessTimeout(_decode(stdout)) from None
    return _Completed(process.returncode, _decode(stdout), _decode(stderr))


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    # pid 0 would mean "my own process group" to killpg: never signal unless the pid is real.
    if process.pid > 0:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    else:
        process.kill()


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="replace")


# --- systemd -----------------------------------------------------------------------------


def _systemd_label(settings: Mapping[str, Any]) -> str:
    return str(settings["unit"])


def _check_systemd(settings: Mapping[str, Any], budget_s: float) -> _Verdict:
    unit = str(settings["unit"])
    # is-active prints the state even when it exits non-zero, which makes a better detail than
    # the exit status of --quiet would.
    try:
        done = _run(["systemctl", "is-active", unit], budget_s)
    except _ProcessTimeout:
        return _Verdict(False, f"systemctl timed out after {_seconds(budget_s)}")
    except OSError as err:
        return _Verdict(False, f"cannot run systemctl: {err.strerror or err}")
    lines = done.stdout.strip().splitlines()
    state = lines[0].strip() if lines else f"unknown (systemctl exit {done.returncode})"
    return _Verdict(state == "active", f"{unit} is {state}")


# --- http --------------------------------------------------------------------------------


def _http_label(settings: Mapping[str, Any]) -> str:
    return str(settings["url"])


def _check_http(settings: Mapping[str, Any], budget_s: float) -> _Verdict:
    url = str(settings["url"])
    expected = int(settings.get("expect_status", DEFAULT_HTTP_STATUS))
    import requests  # here: a boot check without HTTP checks never loads the HTTP stack

    with requests.Session() as session:
        # Probes of local services: a proxy from the environment would test the proxy instead.
        session.trust_env = False
        try:
            # stream: the status line is the answer; a large or slow body must not eat the budget
            with session.get(url, timeout=budget_s, stream=True) as response:
                status = response.status_code
        except requests.Timeout:
            return _Verdict(False, f"timed out after {_seconds(budget_s)}")
        except requests.ConnectionError as err:
            return _Verdict(False, f"connection failed: {_root_cause(err)}")
    if status != expected:
        return _Verdict(False, f"HTTP {status}, expected {expected}")
    return _Verdict(True, f"HTTP {status}")


def _root_cause(err: BaseException) -> str:
    # requests wraps urllib3 wraps the OSError; the innermost says what actually happened.
    cause: BaseException = err
    for _ in range(16):  # bounded: a chain can loop back on itself
        inner = cause.__cause__ or cause.__context__
        if inner is None:
            break
        cause = inner
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause)[:OUTPUT_TAIL_CHARS]


# --- tcp ---------------------------------------------------------------------------------


def _tcp_label(settings: Mapping[str, Any]) -> str:
    return f"{settings.get('host', DEFAULT_TCP_HOST)}:{settings['port']}"


def _check_tcp(settings: Mapping[str, Any], budget_s: float) -> _Verdict:
    host = str(settings.get("host", DEFAULT_TCP_HOST))
    port = int(settings["port"])
    try:
        with socket.create_connection((host, port), timeout=budget_s):
            pass
    except TimeoutError:
        return _Verdict(False, f"no connection within {_seconds(budget_s)}")
    except OSError as err:
        return _Verdict(False, f"cannot connect: {err.strerror or err}")
    return _Verdict(True, "connected")


# --- docker compose ----------------------------------------------------------------------

# A one-off container (`docker compose run`) that has exited is not a failing service.
_ONE_OFF_LABEL = "com.docker.compose.oneoff=True"


def compose_ps_argv(project_dir: str) -> list[str]:
    """The command the compose check runs. ``--all``: without it a crashed container simply
    disappears from the listing, and a check of "every service" would pass without it."""
    return ["docker", "compose", "--project-directory", project_dir, "ps", "--all",
            "--format", "json"]  # fmt: skip


def parse_compose_ps(text: str) -> list[Mapping[str, Any]]:
    """The containers listed by ``docker compose ps --format json``.

    Accepts both forms docker compose has printed: one JSON array (before 2.21) and one JSON
    object per line (2.21 and later). Empty output is an empty list.

    Raises:
        ValueError: the output is neither form, or lists something other than objects.
    """
    stripped = text.strip()
    if not stripped:
        return []
    try:
        whole: Any = json.loads(stripped)
    except json.JSONDecodeError:
        pieces: list[Any] = []
        for number, line in enumerate(stripped.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                pieces.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as err:
                raise ValueError(f"line {number} is not JSON") from err
        whole = pieces
    except RecursionError as err:
        raise ValueError("nested too deeply") from err
    items = whole if isinstance(whole, list) else [whole]
    flat: list[Any] = []
    for item in items:
        # a JSON-lines stream whose lines are arrays: flatten one level, as docker never nests
        flat.extend(item if isinstance(item, list) else [item])
    if not all(isinstance(item, dict) for item in flat):
        raise ValueError("lists something other than container objects")
    return flat


def _compose_label(settings: Mapping[str, Any]) -> str:
    return str(settings["project_dir"])


def _wanted_services(settings: Mapping[str, Any]) -> tuple[str, ...]:
    raw = settings.get("services", ())
    if isinstance(raw, str):
        return (raw,)
    return tuple(str(service) for service in raw)


def _container_problem(container: Mapping[str, Any]) -> str | None:
    state = str(container.get("State") or "unknown")
    if state != "running":
        exit_code = container.get("ExitCode")
        return f"{state} (exit {exit_code})" if state == "exited" else state
    health = container.get("Health")
    # An empty Health means the image defines no healthcheck: running is all we can ask for.
    if health in (None, "", "healthy"):
        return None
    return f"running but {health}"


def _check_compose(settings: Mapping[str, Any], budget_s: float) -> _Verdict:
    project_dir = str(settings["project_dir"])
    try:
        done = _run(compose_ps_argv(project_dir), budget_s)
    except _ProcessTimeout:
        return _Verdict(False, f"docker compose ps timed out after {_seconds(budget_s)}")
    except OSError as err:
        return _Verdict(False, f"cannot run docker: {err.strerror or err}")
    if done.returncode != 0:
        return _Verdict(
            False, f"docker compose ps exited {done.returncode}: {_tail(done.stderr)}".rstrip()
        )
    try:
        containers = parse_compose_ps(done.stdout)
    except ValueError as err:
        return _Verdict(False, f"cannot parse docker compose ps output: {err}")
    by_service: dict[str, list[Mapping[str, Any]]] = {}
    for container in containers:
        if _ONE_OFF_LABEL in str(container.get("Labels", "")):
            continue
        service = str(container.get("Service") or container.get("Name") or "?")
        by_service.setdefault(service, []).append(container)
    wanted = _wanted_services(settings) or tuple(sorted(by_service))
    if not wanted:
        return _Verdict(False, "no containers in the project")
    problems: list[str] = []
    for service in wanted:
        found = by_service.get(service, [])
        if not found:
            problems.append(f"{service}: no container")
        for container in found:
            problem = _container_problem(container)
            if problem is not None:
                problems.append(f"{service}: {problem}")
    if problems:
        return _Verdict(False, "; ".join(problems))
    return _Verdict(True, f"running: {', '.join(wanted)}")


# --- command -----------------------------------------------------------------------------


def _command_label(settings: Mapping[str, Any]) -> str:
    return " ".join(str(arg) for arg in settings["argv"])


def _check_command(settings: Mapping[str, Any], budget_s: float) -> _Verdict:
    argv = [str(arg) for arg in settings["argv"]]
    try:
        done = _run(argv, budget_s, merge_stderr=True)
    except _ProcessTimeout as timeout:
        tail = _tail(timeout.output)
        detail = f"timed out after {_seconds(budget_s)}"
        return _Verdict(False, f"{detail}: {tail}" if tail else detail)
    except OSError as err:
        return _Verdict(False, f"cannot run {argv[0]}: {err.strerror or err}")
    tail = _tail(done.stdout)
    detail = f"exit {done.returncode}: {tail}" if tail else f"exit {done.returncode}"
    return _Verdict(done.returncode == 0, detail)


_CHECK_TYPES: Mapping[str, _CheckType] = MappingProxyType(
    {
        "systemd": _CheckType(_systemd_label, _check_systemd),
        "http": _CheckType(_http_label, _check_http),
        "tcp": _CheckType(_tcp_label, _check_tcp),
        "compose": _CheckType(_compose_label, _check_compose),
        "command": _CheckType(_command_label, _check_command),
    }
)
