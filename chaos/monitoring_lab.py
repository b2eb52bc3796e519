"""The monitoring lab: the real release server, a virtual fleet, a real Prometheus and a real
Alertmanager on loopback, all on one compressed clock.

What runs (every port on 127.0.0.1, every file under one work directory):

- two ``fleet server run`` processes sharing one SQLite database and data directory, with
  ``--time-scale K``;
- a :class:`~chaos.fleet.VirtualFleet` whose members run the real daemon, serve their metrics
  on loopback ports and report them in heartbeats; a :class:`FleetPacer` thread steps its
  simulated clock at K simulated seconds per real second;
- Debian's ``prometheus``, loaded with the committed prometheus.yml and rules
  (deploy/monitoring), changed only where this machine differs (targets, token files) and in
  time (below);
- Debian's ``prometheus-alertmanager``, loaded with the committed alertmanager.yml whose
  receivers all post to a :class:`~chaos.receiver.AlertReceiver` on loopback.

Time compression. The committed rules wait minutes (``for: 2m``, ``[15m]``, thresholds such
as ``fleet_device_last_seen_age_seconds > 300``). With one factor K, "scenario time" is real
time times K: every duration Prometheus and Alertmanager measure in real time (scrape and
evaluation intervals, service-discovery refreshes, ``for``, range selectors and offsets in the
rules, ``group_wait``/``group_interval``/``repeat_interval``/``resolve_timeout``, Prometheus'
alert resend delay) is divided by K, while every number of seconds the system reports is
measured on clocks running K times fast: the server's (``--time-scale``, so last-seen ages and
pending times) and the fleet's simulated clock (check-in and heartbeat intervals, seconds out of
contact). Thresholds in the rules are left as they are. The devices' wall clocks stay real
time: the server's ``Date`` header, from which a device measures its clock skew, is real time.
The rules are rewritten on the parsed YAML by :func:`scale_rules` and checked by
:func:`check_scaled`.

Both servers count their fast clock from the lab's start (``--time-origin``), so they keep one
clock, and a restarted server's clock goes on as if it had run through its downtime.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from chaos.workdir import fresh_directory, marker_name
from fleet_core.errors import FleetError

try:
    import yaml  # type: ignore[import-untyped]
except ImportError as err:  # PyYAML comes with the test extra
    raise ImportError(
        "the monitoring lab reads the YAML of deploy/monitoring: install PyYAML "
        "(pip install 'metrica-fleet[test]')"
    ) from err

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "prometheus" / "rules" / "fleet.rules.yml"
PROMETHEUS_YML = MONITORING / "prometheus" / "prometheus.yml"
ALERTMANAGER_YML = MONITORING / "alertmanager" / "alertmanager.yml"
RUNBOOKS = ROOT / "docs" / "runbooks"
PROMETHEUS = "prometheus"
ALERTMANAGER = "prometheus-alertmanager"
# Prometheus' default --rules.alert.resend-delay: an alert's lifetime in Alertmanager without
# news from Prometheus is four of these.
RESEND_DELAY_S = 60.0
START_TIMEOUT_S = 60.0
LAB_COMMAND = "fleet chaos run"  # whose marker a lab's work directory carries (chaos.workdir)

# --- durations ---------------------------------------------------------------------------

_UNITS = {"y": 365 * 86400.0, "w": 7 * 86400.0, "d": 86400.0, "h": 3600.0, "m": 60.0,
          "s": 1.0, "ms": 0.001}  # fmt: skip
_DURATION = r"(?:\d+(?:ms|[ywdhms]))+"
_PART = re.compile(r"(\d+)(ms|[ywdhms])")
_RANGE = re.compile(rf"\[\s*({_DURATION})\s*(?::\s*({_DURATION})?\s*)?\]")
_OFFSET = re.compile(rf"\boffset\s+(-?)({_DURATION})")


def parse_duration(text: str) -> float:
    """Seconds of a Prometheus duration (``1h30m``, ``15s``, ``500ms``).

    Raises:
        ValueError: not a duration.
    """
    if not isinstance(text, str) or not re.fullmatch(_DURATION, text.strip()):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(text.strip()))


def format_duration(seconds: float) -> str:
    """A Prometheus duration for ``seconds``, in whole milliseconds (at least 1 ms)."""
    return f"{max(1, round(seconds * 1000))}ms"


def scaled(text: str, factor: float) -> str:
    """The duration ``text`` divided by ``factor``."""
    return format_duration(parse_duration(text) / factor)


def expr_durations(expr: str) -> list[float]:
    """Every duration in a PromQL expression (range selectors, subquery steps, offsets), in
    seconds, in order."""
    found: list[float] = []
    for match in _RANGE.finditer(expr):
        found += [parse_duration(part) for part in match.groups() if part]
    found += [parse_duration(match.group(2)) for match in _OFFSET.finditer(expr)]
    return found


def scale_expr(expr: str, factor: float) -> str:
    """``expr`` with every range, subquery step and offset divided by ``factor``."""

    def ranged(match: re.Match[str]) -> str:
        window, step = match.groups()
        text = f"[{scaled(window, factor)}"
        if step is not None or ":" in match.group(0):
            text += ":" + (scaled(step, factor) if step else "")
        return text + "]"

    expr = _RANGE.sub(ranged, expr)
    return _OFFSET.sub(lambda m: f"offset {m.group(1)}{scaled(m.group(2), factor)}", expr)


_RULE_DURATIONS = ("for", "keep_firing_for")


def scale_rules(document: Mapping[str, Any], factor: float) -> dict[str, Any]:
    """A copy of a parsed rules file with every duration divided by ``factor``: each rule's
    ``for`` (and ``keep_firing_for``), each group's ``interval``, and the ranges and offsets
    of each expression. Thresholds are left alone (see the module docstring)."""
    result: dict[str, Any] = copy.deepcopy(dict(document))
    for group in result.get("groups", []):
        if "interval" in group:
            group["interval"] = scaled(group["interval"], factor)
        for rule in group.get("rules", []):
            for key in _RULE_DURATIONS:
                if key in rule:
                    rule[key] = scaled(rule[key], factor)
            rule["expr"] = scale_expr(str(rule["expr"]), factor)
    return result


def _rule_durations(rule: Mapping[str, Any]) -> list[float]:
    found = [parse_duration(rule[key]) for key in _RULE_DURATIONS if key in rule]
    return found + expr_durations(str(rule["expr"]))


def check_scaled(original: Mapping[str, Any], result: Mapping[str, Any], factor: float) -> None:
    """Check that ``result`` is ``original`` with every duration divided by ``factor``.

    Raises:
        ValueError: naming each rule whose durations are not the original's divided by
            ``factor`` (to the millisecond), or rules missing or added.
    """
    before = [(g.get("name"), r) for g in original.get("groups", []) for r in g["rules"]]
    after = [(g.get("name"), r) for g in result.get("groups", []) for r in g["rules"]]
    if len(before) != len(after):
        raise ValueError(f"{len(before)} rules before scaling, {len(after)} after")
    wrong = []
    for (group, rule), (_, new) in zip(before, after, strict=True):
        name = rule.get("alert") or rule.get("record")
        want = [round(d / factor, 3) for d in _rule_durations(rule)]
        got = [round(d, 3) for d in _rule_durations(new)]
        if want != got or (new.get("alert") or new.get("record")) != name:
            wrong.append(f"{group}/{name}: durations {got}, expected {want}")
    if wrong:
        raise ValueError("rules not scaled by " + f"{factor:g}: " + "; ".join(wrong))


# --- configuration files -----------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@dataclasses.dataclass(frozen=True)
class Endpoints:
    """Where the lab's processes listen and which files Prometheus reads."""

    servers: Sequence[str]  # base URLs of the release servers
    prometheus_port: int
    scrape_token_file: Path
    viewer_token_file: Path
    alertmanager_port: int | None = None  # None: Prometheus sends its alerts nowhere
    receiver_url: str = ""


def prometheus_config(
    workdir: Path, endpoints: Endpoints, factor: float = 1.0, rules: Sequence[Path] = (RULES,)
) -> dict[str, Any]:
    """The committed prometheus.yml for this machine: the servers listed in a file_sd file
    written under ``workdir``, the devices found through the first server's http_sd, the
    lab's Prometheus and Alertmanager (if it has one); every interval divided by
    ``factor``."""
    config = load_yaml(PROMETHEUS_YML)
    glob = config["global"]
    for key in ("scrape_interval", "evaluation_interval"):
        glob[key] = scaled(glob[key], factor)
    config["rule_files"] = [str(path) for path in rules]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    servers_file = workdir / "servers.yml"
    servers_file.write_text(
        yaml.safe_dump([{"targets": [url.split("://", 1)[1] for url in endpoints.servers]}])
    )
    server_job = jobs["fleet-server"]
    server_job["file_sd_configs"][0]["files"] = [str(servers_file)]
    server_job["authorization"]["credentials_file"] = str(endpoints.scrape_token_file)
    devices = jobs["fleet-devices"]
    devices["scrape_interval"] = scaled(devices["scrape_interval"], factor)
    sd = devices["http_sd_configs"][0]
    sd["url"] = endpoints.servers[0] + "/api/v1/sd/prometheus"
    sd["refresh_interval"] = scaled(sd["refresh_interval"], factor)
    sd["authorization"]["credentials_file"] = str(endpoints.viewer_token_file)
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{endpoints.prometheus_port}"]}]
    config["scrape_configs"] = [server_job, devices, jobs["prometheus"]]
    del config["alerting"]
    if endpoints.alertmanager_port is not None:
        alertmanager = [{"targets": [f"127.0.0.1:{endpoints.alertmanager_port}"]}]
        jobs["alertmanager"]["static_configs"] = alertmanager
        config["scrape_configs"].append(jobs["alertmanager"])
        config["alerting"] = {"alertmanagers": [{"static_configs": alertmanager}]}
    return dict(config)


_ROUTE_DURATIONS = ("group_wait", "group_interval", "repeat_interval")


def _scale_route(route: dict[str, Any], factor: float) -> None:
    for key in _ROUTE_DURATIONS:
        if key in route:
            route[key] = scaled(route[key], factor)
    for child in route.get("routes", []):
        _scale_route(child, factor)


def alertmanager_config(receiver_url: str, factor: float = 1.0) -> dict[str, Any]:
    """The committed alertmanager.yml with every receiver replaced by one webhook to
    ``receiver_url``/<receiver name> (resolved notifications included) and every duration
    divided by ``factor``. Alertmanager's defaults for durations the file leaves out
    (group_wait 30s, group_interval 5m, repeat_interval 4h) are written in, scaled."""
    config = load_yaml(ALERTMANAGER_YML)
    glob = config.setdefault("global", {})
    glob["resolve_timeout"] = scaled(glob.get("resolve_timeout", "5m"), factor)
    route = config["route"]
    for key, default in zip(_ROUTE_DURATIONS, ("30s", "5m", "4h"), strict=True):
        route.setdefault(key, default)
    _scale_route(route, factor)
    config["receivers"] = [
        {"name": receiver["name"],
         "webhook_configs": [{"url": f"{receiver_url}/{receiver['name']}",
                              "send_resolved": True}]}
        for receiver in config["receivers"]
    ]  # fmt: skip
    return dict(config)


def watchdog_repeat_s(config: Mapping[str, Any]) -> float:
    """The repeat interval of the route that carries Watchdog (real seconds, as written)."""
    route = config["route"]
    for child in route.get("routes", []):
        if any("Watchdog" in str(m) for m in child.get("matchers", [])):
            return parse_duration(child.get("repeat_interval", route["repeat_interval"]))
    return parse_duration(route["repeat_interval"])


def runbook_of(alert: str) -> str | None:
    """The runbook_url of ``alert`` in the committed rules, or None if there is no such alert."""
    for group in load_yaml(RULES)["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                return str(rule.get("annotations", {}).get("runbook_url", "")) or None
    return None


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(
    what: str, check: Callable[[], Any], timeout_s: float, interval_s: float = 0.1
) -> Any:
    """Poll ``check`` until it returns something true; that.

    Raises:
        TimeoutError: naming ``what``.
    """
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except (requests.RequestException, OSError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s:.0f} s")
        time.sleep(interval_s)


class LabProcess:
    """A child process on a loopback port, logging to a file; stoppable and restartable on
    the same port and data. ``ready`` is the URL path that answers 200 once it serves."""

    def __init__(
        self,
        name: str,
        command: Callable[[], list[str]],
        log: Path,
        url: str,
        ready: str,
        pass_fds: Callable[[], Sequence[int]] | None = None,
    ) -> None:
        self.name = name
        self.command = command
        self.log = log
        self.url = url
        self.ready = ready
        self.pass_fds = pass_fds
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> None:
        fds = list(self.pass_fds()) if self.pass_fds else []
        try:
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(
                    self.command(), stdout=log, stderr=subprocess.STDOUT, pass_fds=fds
                )
        finally:
            for fd in fds:
                socket.socket(fileno=fd).close()  # the child's copy is the socket now
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        import requests

        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise LabError(f"{self.name} exited with {self.process.returncode}; see {self.log}")
            return requests.get(self.url + self.ready, timeout=2).status_code == 200

        try:
            wait_until(f"{self.name} to answer on {self.url}", up, START_TIMEOUT_S)
        except TimeoutError as err:
            raise LabError(f"{err}; see {self.log}") from None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class LabError(FleetError):
    """The lab could not be built or a process of it misbehaved."""


def server_process(
    data: Path, log: Path, factor: float, extra: Sequence[str], origin: float
) -> LabProcess:
    """``fleet server run`` on a loopback socket bound here and handed down (``--fd``): the
    URL is known before the start and is the same after a restart. Its fast clock counts from
    ``origin`` (real Unix time), the lab's, so every server of the lab keeps one clock."""
    holder: dict[str, int] = {}
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()

    def bind() -> list[int]:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        holder["fd"] = listener.detach()
        return [holder["fd"]]

    def command() -> list[str]:
        return [
            sys.executable, "-c", "from fleet_core.cli import main; main()", "server", "run",
            "--data-dir", str(data), "--fd", str(holder["fd"]), "--time-scale", f"{factor:g}",
            "--time-origin", f"{origin:.6f}", "--log-level", "warning", *extra,
        ]  # fmt: skip

    return LabProcess("fleet server", command, log, f"http://127.0.0.1:{port}", "/healthz", bind)


def fleet_command(*args: str) -> str:
    """Run a ``fleet`` command as an operator would; its output.

    Raises:
        LabError: the command failed (its error output quoted).
    """
    command = [sys.executable, "-c", "from fleet_core.cli import main; main()", *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise LabError(f"fleet {' '.join(args[:3])}: {done.stderr.strip()}")
    return done.stdout


class FleetPacer:
    """Steps a virtual fleet so its simulated clock keeps pace with real time times
    ``factor``. Faults are injected between steps: hold :attr:`lock`."""

    def __init__(self, fleet: Any, factor: float, min_step_s: float = 2.0) -> None:
        self.fleet = fleet
        self.factor = factor
        self.min_step_s = min_step_s
        self.lock = threading.RLock()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        origin_real = time.monotonic()
        origin_sim = self.fleet.clock()

        def run() -> None:
            while not self._stop.is_set():
                due = origin_sim + (time.monotonic() - origin_real) * self.factor
                ahead = due - self.fleet.clock()
                if ahead < self.min_step_s:
                    self._stop.wait(0.05)
                    continue
                with self.lock:
                    try:
                        self.fleet.step(ahead)
                    except Exception as err:  # one member's failure must not stop the fleet
                        self.errors.append(f"{type(err).__name__}: {err}")

        self._thread = threading.Thread(target=run, name="fleet-pacer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)


def serve_member_metrics(
    fleet: Any, *, thermal: bool = False, config_file: bool = False
) -> list[Any]:
    """Every member serves its metrics on a loopback port and reports it in heartbeats; with
    ``thermal``, each also reads its temperature from its own ``thermal`` directory (one zone
    at 45 °C) instead of the host's; with ``config_file``, each runs as if loaded from
    ``updater.toml`` in its root (the device's configuration written out), so the metrics
    tell when that file changes under the running updater. Returns the metrics servers (stop
    them at the end)."""
    from prometheus_client import CollectorRegistry

    from updater.config import LoadedConfig
    from updater.metrics import UpdaterMetrics

    served = []
    for member in fleet.members:
        live = UpdaterMetrics(CollectorRegistry())
        server = live.serve(0)
        served.append(server)
        runtime = member.daemon.runtime
        changes: dict[str, Any] = {
            "metrics_port": server.port,
            "metrics_advertise": f"127.0.0.1:{server.port}",  # a lab on one machine says so
        }
        if thermal:
            zone = member.device.root / "thermal" / "thermal_zone0"
            zone.mkdir(parents=True, exist_ok=True)
            (zone / "temp").write_text("45000\n")
            changes["thermal_dir"] = zone.parent
        config = dataclasses.replace(runtime.config, **changes)
        loaded = LoadedConfig(config, runtime.loaded.source)
        if config_file:  # the file is what runs: its drift is watched and repaired
            path = member.device.root / "updater.toml"
            text = member.device.config_toml().encode()
            path.write_bytes(text)
            loaded = LoadedConfig(config, str(path), (), str(path), text)
        member.daemon.runtime = dataclasses.replace(
            runtime, loaded=loaded, live_metrics=live,
            config_sha256=None,  # taken again, from the source
        )  # fmt: skip
    return served


@dataclasses.dataclass
class Monitoring:
    """Prometheus and Alertmanager of a lab, and how to reach them."""

    prometheus: LabProcess
    alertmanager: LabProcess
    factor: float

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector.

        Raises:
            LabError: Prometheus refused the query.
        """
        import requests

        answer = requests.get(
            self.prometheus.url + "/api/v1/query", params={"query": expr}, timeout=10
        )
        body = answer.json()
        if not answer.ok or body.get("status") != "success":
            raise LabError(f"Prometheus refused {expr!r}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


def start_monitoring(
    workdir: Path, endpoints: Endpoints, factor: float, stack: ExitStack
) -> Monitoring:
    """Write the scaled configurations under ``workdir`` (checked by promtool and amtool when
    installed) and start Alertmanager, then Prometheus; both are stopped by ``stack``."""
    rules_doc = load_yaml(RULES)
    scaled_rules = scale_rules(rules_doc, factor)
    check_scaled(rules_doc, scaled_rules, factor)
    rules = workdir / "fleet.rules.yml"
    rules.write_text(yaml.safe_dump(scaled_rules, sort_keys=False))
    prometheus_yml = workdir / "prometheus.yml"
    prometheus_yml.write_text(
        yaml.safe_dump(prometheus_config(workdir, endpoints, factor, (rules,)), sort_keys=False)
    )
    alertmanager_yml = workdir / "alertmanager.yml"
    alertmanager_yml.write_text(
        yaml.safe_dump(alertmanager_config(endpoints.receiver_url, factor), sort_keys=False)
    )
    for tool, args in (("promtool", ["check", "config", str(prometheus_yml)]),
                       ("amtool", ["check-config", str(alertmanager_yml)])):  # fmt: skip
        if shutil.which(tool):
            done = subprocess.run([tool, *args], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise LabError(
                    f"{tool} refuses the lab's configuration: {done.stdout}{done.stderr}"
                )
    am_port, prom_port = endpoints.alertmanager_port, endpoints.prometheus_port
    if am_port is None:
        raise LabError("the monitoring lab needs a port for Alertmanager")
    alertmanager = LabProcess(
        "alertmanager",
        lambda: [ALERTMANAGER, f"--config.file={alertmanager_yml}",
                 f"--storage.path={workdir / 'alertmanager-data'}",
                 f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
        workdir / "alertmanager.log", f"http://127.0.0.1:{am_port}", "/-/ready",
    )  # fmt: skip
    prometheus = LabProcess(
        "prometheus",
        lambda: [PROMETHEUS, f"--config.file={prometheus_yml}",
                 f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}",
                 f"--rules.alert.resend-delay={format_duration(RESEND_DELAY_S / factor)}"],
        workdir / "prometheus.log", f"http://127.0.0.1:{prom_port}", "/-/ready",
    )  # fmt: skip
    stack.callback(alertmanager.stop)
    alertmanager.start()
    stack.callback(prometheus.stop)
    prometheus.start()
    import requests

    # the ports were chosen a moment before the processes bound them: the answers must come
    # from the processes started here
    flags = requests.get(prometheus.url + "/api/v1/status/flags", timeout=10).json()["data"]
    if flags.get("config.file") != str(prometheus_yml):
        raise LabError(f"another Prometheus answers on {prometheus.url}")
    return Monitoring(prometheus, alertmanager, factor)


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below ``directory`` (from /proc/self/mounts), deepest first."""
    root = directory.resolve()
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) < 2:
            continue
        # the kernel writes a space in a path as \040
        point = Path(fields[1].replace("\\040", " "))
        if point == root or root in point.parents:
            found.append(point)
    return sorted(found, key=lambda path: len(path.parts), reverse=True)


def unmount_under(directory: Path) -> None:
    """Unmount (lazily) every file system mounted at or below ``directory``."""
    for point in mounts_under(directory):
        subprocess.run(["umount", "--lazy", str(point)], capture_output=True, check=False)


@dataclasses.dataclass
class MonitoringLab:
    """A whole lab (see the module docstring), built by :func:`monitoring_lab`."""

    workdir: Path
    factor: float
    servers: list[LabProcess]
    fleet: Any  # chaos.fleet.VirtualFleet
    pacer: FleetPacer
    monitoring: Monitoring
    receiver: Any  # chaos.receiver.AlertReceiver
    admin_token: str
    data: Path

    def scenario_seconds(self, real_seconds: float) -> float:
        """Real seconds in scenario time."""
        return real_seconds * self.factor

    def real_seconds(self, scenario_seconds: float) -> float:
        """Scenario seconds in real time."""
        return scenario_seconds / self.factor

    def operator(self, *args: str) -> str:
        """Run a ``fleet`` operator command against the first running server."""
        live = [server for server in self.servers if server.running]
        if not live:
            raise LabError("no release server is running")
        return fleet_command(*args, "--server", live[0].url, "--token", self.admin_token)

    def device_scrapes_up(self) -> int:
        """Devices Prometheus scrapes successfully now."""
        return len(self.monitoring.query('up{job="fleet-devices"} == 1'))


@contextlib.contextmanager
def monitoring_lab(
    workdir: Path, specs: Sequence[Any], factor: float, *, receiver_port: int = 0
) -> Iterator[MonitoringLab]:
    """Build the lab in ``workdir`` (emptied first) with a fleet of ``specs``
    (:class:`~chaos.fleet.MemberSpec`), releases 2.0.0 (healthy) and 3.0.0 (fails its health
    check) uploaded; everything started is stopped when the block ends, however it ends."""
    from chaos.demo import lab_bundle
    from chaos.fleet import VirtualFleet
    from chaos.receiver import AlertReceiver
    from signing.keyring import trust_key
    from signing.keys import generate_key

    if factor < 1:
        raise LabError(f"the time factor must be at least 1, not {factor:g}")
    if (workdir / marker_name(LAB_COMMAND)).is_file() and not workdir.is_symlink():
        unmount_under(workdir)  # a run killed outright may have left a scenario's mount
    workdir = fresh_directory(workdir, LAB_COMMAND)
    with ExitStack() as stack:
        stack.callback(unmount_under, workdir)  # last: whatever a scenario left mounted
        receiver = stack.enter_context(AlertReceiver(receiver_port))
        key = generate_key(workdir / "release-key")
        data = workdir / "server"
        trust_key(data / "keyring", workdir / "release-key.pub")
        scrape_token = workdir / "fleet-metrics-token"
        scrape_token.write_text(secrets.token_urlsafe(32) + "\n")
        scrape_token.chmod(0o600)
        extra = ("--metrics-networks", "127.0.0.0/8", "--metrics-token-file", str(scrape_token),
                 "--rollout-interval", "0.2")  # fmt: skip
        origin = time.time()
        servers = [
            server_process(data, workdir / f"server-{i}.log", factor, extra, origin)
            for i in range(2)
        ]
        for server in servers:
            stack.callback(server.stop)
        servers[0].start()  # creates the database and the server key
        servers[1].start()
        db = ("--data-dir", str(data))
        admin = fleet_command("server", "token", "create", "--role", "admin", "--name",
                              "chaos", *db).splitlines()[0]  # fmt: skip
        viewer = fleet_command("server", "token", "create", "--role", "viewer", "--name",
                               "prometheus", *db).splitlines()[0]  # fmt: skip
        viewer_file = workdir / "viewer-token"
        viewer_file.write_text(viewer + "\n")
        viewer_file.chmod(0o600)
        enrollment = fleet_command("server", "enrollment-token", "create", "--uses",
                                   str(len(specs)), *db).splitlines()[0]  # fmt: skip
        operator = ("--server", servers[0].url, "--token", admin)
        for version, behaviour in (("2.0.0", "healthy"), ("3.0.0", "unhealthy")):
            bundle = lab_bundle(workdir, key, version, behaviour)
            fleet_command("release", "upload", str(bundle), *operator)
        fleet = VirtualFleet(
            workdir / "fleet", specs, server_urls=[server.url for server in servers],
            server_key=data / "server-key.pub", release_key=workdir / "release-key.pub",
            enrollment_token=enrollment, workers=min(4, max(1, len(specs))),
        )  # fmt: skip
        for metrics in serve_member_metrics(fleet, thermal=True, config_file=True):
            stack.callback(metrics.stop)
        fleet.step(5)  # enroll, check in, heartbeat (with the metrics address)
        endpoints = Endpoints(
            [server.url for server in servers], free_port(), scrape_token, viewer_file,
            free_port(), receiver.url,
        )  # fmt: skip
        monitoring = start_monitoring(workdir, endpoints, factor, stack)
        pacer = FleetPacer(fleet, factor)
        stack.callback(pacer.stop)
        pacer.start()
        lab = MonitoringLab(
            workdir, factor, servers, fleet, pacer, monitoring, receiver, admin, data
        )
        wait_until(
            "Prometheus to scrape every device",
            lambda: lab.device_scrapes_up() == len(specs), START_TIMEOUT_S, 0.5,
        )  # fmt: skip
        yield lab
