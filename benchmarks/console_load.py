#!/usr/bin/env python3
"""The web console at fleet scale: how soon its pages are usable in Chromium, and how long the
server takes to render a page of the device list, against a static file of the same server
measured the same way in the same run.

For each ``--devices`` count, a fresh data directory's SQLite database is seeded with that many
enrolled devices (bulk inserts into the migrated schema: a spread of versions, roles, tags,
states, last-seen times, heartbeats and statuses, as a real fleet has), a few releases and a
rollout started by the server's own rule (``--rollout paused`` pauses it, so the rollout
engine's evaluations stay out of the figures). A real ``fleet server run`` serves it on loopback.

- Browser: Chromium (Playwright, /usr/bin/chromium) signs in once with a viewer token through
  the login form, then navigates to the overview, the device list, a filtered list and a deep
  page of it, each ``--runs`` times; navigation timing (responseEnd, DOMContentLoaded, load)
  and "usable": from the start of the navigation until the page's content is present and, on
  the device list, its rows are in the table and the filter's text field is enabled. The
  baseline is ``/ui/static/console.css`` navigated the same way (a new query string each time,
  so the cache does not answer it). Medians.
- Server: ``--requests`` sequential GETs of device-list pages (several pages, filters, sorts)
  with the session's cookie; p50 and p95 of the wall time of each request, and the server's CPU
  time per request, against GETs of the same static file.

Figures are printed as milliseconds and as ratios to the baseline (these machines are noisy:
only ratios within one run mean much), with the one-minute load average before and after (other
work on the machine lengthens every wall time), then as one JSON line. The aims (usable within
2 s at 10,000 devices; a page of the list rendered within 150 ms at p95 at 100,000) are stated
with the figure and whether it was met; a missed aim is a finding, not a failure: the script
exits non-zero only when something did not work.

    python benchmarks/console_load.py [--devices 10000 100000] [--runs 5] [--requests 200]
        [--rollout running|paused] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import Error as BrowserError
from sqlalchemy import insert, select, update

from server.database import Database
from server.errors import ApiError
from server.models import Device, Release, ReleaseImage, RolloutDevice
from server.rollouts import RolloutRequest, start, transition
from server.settings import Settings

FLEET = [sys.executable, "-c", "from fleet_core.cli import main; main()"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
USABLE_AIM_MS = 2000.0
USABLE_AIM_DEVICES = 10_000
RENDER_P95_AIM_MS = 150.0
RENDER_AIM_DEVICES = 100_000
INSERT_BATCH = 5000
PAGE_TIMEOUT_MS = 60_000

# What "usable" waits for on each page: every selector present, and the form field enabled.
# The hooks are the pages' data-testid attributes (server/ui/templates).
OVERVIEW_READY = (
    "[data-testid=fleet-counts]", "[data-testid=version-table]", "[data-testid=active-rollouts]",
    "[data-testid=alerts]",
)  # fmt: skip
LIST_READY = ("[data-testid=device-row]",)
FILTER_FIELD = "[data-testid=device-filter] input[name=q]"
STATIC = "/ui/static/console.css"

# The spread of the seeded fleet: (value, weight).
COMPATIBLE = (("metrica-gateway-v2", 80), ("metrica-sensor-v1", 20))
VERSIONS = (("2.3.0", 52), ("2.2.1", 24), ("2.1.0", 10), ("1.9.4", 6), ("2.4.0", 6), (None, 2))
ROLES = (("gateway", 35), ("sensor", 40), ("camera", 12), ("kiosk", 8), (None, 5))
SITES = ("ams", "fra", "lon", "nyc", "sfo", "sin", "syd", "tok")
TAGS = ("eu", "us", "apac", "lab", "pilot", "outdoor", "indoor", "rev-b", "rev-c", "battery")
STATES = (
    ("idle", 88), ("installed", 3), ("installing", 2), ("trial", 2), ("safe_mode", 1),
    ("suspended", 1), (None, 3),
)  # fmt: skip
STATUSES = (("active", 97), ("quarantined", 2), ("decommissioned", 1))
# Seconds since last seen: most devices check in every minute, some are away for hours,
# days or for good.
SEEN_AGO_S = (((0, 90), 82), ((90, 3600), 6), ((3600, 7 * 86400), 8), ((7 * 86400, 90 * 86400), 4))
RELEASES = ("1.9.4", "2.1.0", "2.2.1", "2.3.0", "2.4.0")
ROLLOUT_VERSION = "2.4.0"


def pick(rng: random.Random, choices: Sequence[tuple[Any, int]]) -> Any:
    """One value of ``(value, weight)`` pairs, by weight."""
    return rng.choices([value for value, _ in choices], [weight for _, weight in choices])[0]


def heartbeat(rng: random.Random, version: str | None, state: str | None, role: str | None,
              tags: list[str]) -> dict[str, Any]:  # fmt: skip
    """A heartbeat as the updater sends it (updater/heartbeat.py) for a device in ``state``."""
    other = "2.2.1" if version != "2.2.1" else "2.1.0"
    safe = state == "safe_mode"
    return {
        "version": None if safe else version,
        "booted": "safe" if safe else "a",
        "primary": "b" if state == "trial" else "a",
        "trial": state == "trial",
        "slots": {
            "a": {"status": "good", "version": version},
            "b": {"status": "installing" if state == "installing" else "good", "version": other},
        },
        "updater_state": "idle" if state in (None, "safe_mode", "trial") else state,
        "health": [{"name": "network", "ok": True}, {"name": "app", "ok": rng.random() > 0.02}],
        "temperature_c": round(rng.uniform(31, 78), 1),
        "free_space_mb": rng.randrange(120, 14000),
        "uptime_s": float(rng.randrange(60, 90 * 86400)),
        "clock": None,
        "clock_skew_s": round(rng.gauss(0, 0.4), 3),
        "safe_mode": safe,
        "role": role,
        "tags": tags,
        "metrics_address": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        ":9100",
    }


def device_rows(count: int, now: datetime, seed: int = 1) -> Iterator[dict[str, Any]]:
    """``count`` device rows, the same for the same ``seed``."""
    rng = random.Random(seed)  # noqa: S311 (a fleet that looks real, not a secret)
    for index in range(count):
        device_id = hashlib.sha256(f"bench-device-{index}".encode()).hexdigest()
        role = pick(rng, ROLES)
        state = pick(rng, STATES)
        version = None if state is None else pick(rng, VERSIONS)
        tags = sorted(rng.sample(TAGS, rng.choice((0, 1, 1, 2, 2, 3))))
        low, high = pick(rng, SEEN_AGO_S)
        last_seen = now - timedelta(seconds=rng.uniform(low, high))
        enrolled = last_seen - timedelta(seconds=rng.uniform(3600, 400 * 86400))
        status = pick(rng, STATUSES)
        report = None if state is None else heartbeat(rng, version, state, role, tags)
        yield {
            "id": device_id,
            "public_key": hashlib.sha256(device_id.encode()).hexdigest(),
            "compatible": pick(rng, COMPATIBLE),
            "hostname": f"{role or 'device'}-{rng.choice(SITES)}-{index:06d}",
            "enrolled": enrolled,
            "last_seen": last_seen,
            "last_heartbeat": None if report is None else json.dumps(report),
            "last_heartbeat_at": None if report is None else last_seen,
            "version": version,
            "state": state,
            "clock_skew_s": None if report is None else report["clock_skew_s"],
            "role": None if report is None else role,
            "tags": json.dumps(tags) if report is not None and tags else None,
            "event_seq": rng.randrange(0, 500),
            "status": status,
            "status_reason": None if status == "active" else "bench: returned for repair",
            "status_since": None if status == "active" else last_seen,
            "status_by": None if status == "active" else "operator:bench",
        }


def release_rows(now: datetime) -> list[dict[str, Any]]:
    """One release per version of :data:`RELEASES`, uploaded a fortnight apart."""
    rows = []
    for index, version in enumerate(RELEASES):
        manifest = json.dumps({"version": version, "compatible": COMPATIBLE[0][0]}).encode()
        rows.append({
            "id": index + 1, "version": version, "product": "metrica", "compatible":
            COMPATIBLE[0][0], "security_version": index + 1, "manifest": manifest,
            "manifest_sha256": hashlib.sha256(manifest).hexdigest(), "signature": b"{}",
            "created": now - timedelta(days=14 * (len(RELEASES) - index)),
            "uploaded_by": "operator:release-ci",
        })  # fmt: skip
    return rows


def seed(data: Path, devices: int, rollout_state: str) -> float:
    """A data directory whose database holds ``devices`` devices, :data:`RELEASES` and a
    rollout of :data:`ROLLOUT_VERSION` in its first stage, some of its cohort done; the
    seconds it took.

    Raises:
        SystemExit: the rollout could not be started.
        MigrationError: the schema could not be made.
    """
    began = time.perf_counter()
    settings = Settings.create(data)
    db = Database(settings.database_url)
    db.migrate()
    now = datetime.now(UTC)
    releases = release_rows(now)
    with db.engine.begin() as connection:
        connection.execute(insert(Release), releases)
        connection.execute(insert(ReleaseImage), [
            {"release_id": row["id"], "position": 0, "slot_class": "rootfs",
             "filename": "rootfs.ext4", "compression": "zstd",
             "sha256": hashlib.sha256(row["manifest"]).hexdigest(), "size": 180 << 20}
            for row in releases
        ])  # fmt: skip
        batch: list[dict[str, Any]] = []
        for row in device_rows(devices, now):
            batch.append(row)
            if len(batch) == INSERT_BATCH:
                connection.execute(insert(Device), batch)
                batch = []
        if batch:
            connection.execute(insert(Device), batch)
    versions = {row["version"]: row["id"] for row in releases}
    with db.engine.begin() as connection:
        for version, release_id in versions.items():
            connection.execute(
                update(Device)
                .where(Device.version == version, Device.status == "active")
                .values(assigned_release_id=release_id)
            )
    request = RolloutRequest(version=ROLLOUT_VERSION, role="gateway", allow_empty=True)
    try:
        view = start(db, request, actor="operator:bench", now=now)
    except ApiError as err:
        raise SystemExit(f"seeding: the rollout did not start: {err}") from err
    with db.engine.begin() as connection:
        cohort = connection.scalars(
            select(RolloutDevice.device_id)
            .where(RolloutDevice.rollout_id == view["id"])
            .order_by(RolloutDevice.device_id)
        ).all()
        done = cohort[: len(cohort) * 2 // 5]
        connection.execute(
            update(RolloutDevice)
            .where(RolloutDevice.rollout_id == view["id"], RolloutDevice.device_id.in_(done))
            .values(outcome="succeeded", committed_since=now)
        )
    if rollout_state == "paused":
        transition(db, view["id"], "pause", actor="operator:bench", now=now, reason="bench")
    db.engine.dispose()
    return time.perf_counter() - began


@dataclass
class Server:
    """A ``fleet server run`` process serving a data directory on a loopback port."""

    process: subprocess.Popen[bytes]
    url: str

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process, from /proc."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def serving(data: Path, log: Path) -> Iterator[Server]:
    """A ``fleet server run`` on ``data`` while the block runs. The listening socket is bound
    here and handed down (``--fd``), so whatever answers on its port is this server.

    Raises:
        SystemExit: the server exited or did not answer ``/healthz`` within a minute.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        command = [*FLEET, "server", "run", "--data-dir", str(data), "--fd",
                   str(listener.fileno()), "--log-level", "warning"]  # fmt: skip
        with log.open("ab") as output:
            process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, pass_fds=[listener.fileno()]
            )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server exited ({process.returncode}):\n{log.read_text()}")
            try:
                if requests.get(f"{url}/healthz", timeout=2).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server did not answer within a minute:\n{log.read_text()}")
            time.sleep(0.1)
        yield Server(process, url)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def viewer_token(data: Path) -> str:
    """A new viewer token for the server of ``data``, made as an installation makes one.

    Raises:
        SystemExit: the command failed.
    """
    done = subprocess.run(
        [*FLEET, "server", "token", "create", "--role", "viewer", "--name", "console-bench",
         "--data-dir", str(data)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"fleet server token create: {done.stderr.strip()}")
    return done.stdout.splitlines()[0].strip()


# Installed before any page script runs: records, in the page's own clock (milliseconds since
# the navigation started), the first moment every selector matches and the field, if any, is
# enabled. A MutationObserver sees each step of the parse, so nothing waits for a poll.
USABLE_SCRIPT = """
((READY) => {
  const ready = () => {
    const wanted = READY[location.pathname];
    if (!wanted) return false;
    const {selectors, field} = wanted;
    if (!selectors.every((s) => document.querySelector(s))) return false;
    if (!field) return true;
    const input = document.querySelector(field);
    return Boolean(input && !input.disabled);
  };
  const check = () => {
    if (window.__benchUsable === undefined && ready()) {
      window.__benchUsable = performance.now();
    }
  };
  new MutationObserver(check).observe(document, {
    childList: true, subtree: true, attributes: true, attributeFilter: ["disabled"],
  });
  document.addEventListener("DOMContentLoaded", check);
})(%s);
"""


@dataclass(frozen=True)
class Target:
    """A page navigated to, and what makes it usable."""

    name: str
    path: str
    selectors: tuple[str, ...]
    field: str | None = None


def watch_usable(page: Page, targets: Sequence[Target]) -> None:
    """Make every page ``page`` loads record when it is usable (:data:`USABLE_SCRIPT`), by
    the readiness of the target of its path."""
    ready = {
        target.path.split("?")[0]: {"selectors": list(target.selectors), "field": target.field}
        for target in targets
    }
    page.add_init_script(USABLE_SCRIPT % json.dumps(ready))


def navigate(page: Page, target: Target, path: str) -> dict[str, float]:
    """Navigate to ``path`` and wait until ``target`` is usable and loaded; its navigation
    timing and the moment it became usable, in milliseconds since the navigation started.

    Raises:
        SystemExit: the page did not answer 200, or did not become usable.
    """
    response = page.goto(path, wait_until="load", timeout=PAGE_TIMEOUT_MS)
    if response is None or response.status != 200:
        status = "no response" if response is None else response.status
        raise SystemExit(f"GET {path}: {status}, at {page.url}")
    try:
        for selector in target.selectors:
            page.wait_for_selector(selector, state="attached", timeout=PAGE_TIMEOUT_MS)
        if target.field is not None:
            page.wait_for_selector(f"{target.field}:enabled", timeout=PAGE_TIMEOUT_MS)
        page.wait_for_function(
            "performance.getEntriesByType('navigation')[0].loadEventEnd > 0"
            " && window.__benchUsable !== undefined",
            timeout=PAGE_TIMEOUT_MS,
        )
    except Exception as err:
        raise SystemExit(f"{target.name} ({path}) never became usable: {err}") from err
    timing: dict[str, float] = page.evaluate(
        """() => {
          const n = performance.getEntriesByType('navigation')[0];
          return {response_end: n.responseEnd, dom_content_loaded: n.domContentLoadedEventEnd,
                  load: n.loadEventEnd, usable: window.__benchUsable};
        }"""
    )
    return timing


def log_in(page: Page, token: str) -> str:
    """Sign ``page``'s browser context in with ``token`` through the login form; the session
    cookie, as a ``Cookie`` header value.

    Raises:
        SystemExit: the login page did not answer, or the login did not land on the console.
    """
    response = page.goto("/ui/login", wait_until="load", timeout=PAGE_TIMEOUT_MS)
    if response is None or response.status != 200:
        raise SystemExit(f"GET /ui/login: {'no response' if response is None else response.status}")
    page.fill("input[name=token]", token)
    with page.expect_navigation(timeout=PAGE_TIMEOUT_MS):
        page.click("form[action='/ui/login'] button[type=submit]")
    if "/ui/login" in page.url:
        raise SystemExit(f"the login was refused: {page.inner_text('main')[:300]}")
    cookies = [c for c in page.context.cookies() if c["name"].endswith("fleet_ui")]
    if not cookies:
        raise SystemExit("the login set no session cookie")
    return f"{cookies[0]['name']}={cookies[0]['value']}"


def list_pages(devices: int) -> dict[str, str]:
    """The device-list pages measured: the default view, filters, a search, a sort and a deep
    page (halfway through the list, at the default page size)."""
    deep = max(1, devices // 100)
    return {
        "device list": "/ui/devices",
        "filtered": "/ui/devices?state=online&role=gateway&tag=eu&status=active&sort=-last_seen",
        "search": "/ui/devices?q=fra-00",
        "sorted": "/ui/devices?sort=version&per_page=100",
        "deep page": f"/ui/devices?page={deep}",
    }


def browser_figures(browser: Browser, url: str, token: str, devices: int, runs: int
                    ) -> tuple[dict[str, dict[str, float]], str]:  # fmt: skip
    """Median navigation figures of the baseline and each console page over ``runs`` rounds
    (one unmeasured round first), the pages interleaved; and the session cookie, as a
    ``Cookie`` header value."""
    pages = list_pages(devices)
    targets = [
        Target("static file", STATIC, ("body",)),
        Target("overview", "/ui/", OVERVIEW_READY),
        Target("device list", pages["device list"], LIST_READY, FILTER_FIELD),
        Target("filtered", pages["filtered"], LIST_READY, FILTER_FIELD),
        Target("deep page", pages["deep page"], LIST_READY, FILTER_FIELD),
    ]
    context = browser.new_context(base_url=url)
    try:
        page = context.new_page()
        cookie = log_in(page, token)
        watch_usable(page, targets)
        samples: dict[str, list[dict[str, float]]] = {target.name: [] for target in targets}
        for round_ in range(runs + 1):
            for target in targets:
                path = target.path
                if path == STATIC:
                    path = f"{STATIC}?round={round_}-{time.monotonic_ns()}"
                figures = navigate(page, target, path)
                if round_ > 0:
                    samples[target.name].append(figures)
    finally:
        context.close()
    medians = {
        name: {key: statistics.median(run[key] for run in runs_) for key in runs_[0]}
        for name, runs_ in samples.items()
    }
    return medians, cookie


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def server_figures(server: Server, cookie: str, paths: dict[str, str], count: int
                   ) -> dict[str, dict[str, float | None]]:  # fmt: skip
    """``count`` sequential GETs over ``paths`` in turn (after one of each unmeasured), then as
    many of the static file: p50 and p95 of each request's wall time in milliseconds, for each
    path, for all of them ("all pages") and for the static file; with the server's CPU
    milliseconds per request for the last two (the server's background work included: the
    rollout engine, the console's live feed).

    Raises:
        SystemExit: a page did not answer 200 with device rows.
    """
    session = requests.Session()
    session.headers["Cookie"] = cookie

    def get(path: str) -> float:
        began = time.perf_counter()
        answer = session.get(server.url + path, timeout=60, allow_redirects=False)
        elapsed = (time.perf_counter() - began) * 1000
        if answer.status_code != 200:
            raise SystemExit(f"GET {path}: {answer.status_code}: {answer.text[:300]}")
        if path.startswith("/ui/devices") and "device-row" not in answer.text:
            raise SystemExit(f"GET {path}: no device rows in the page")
        return elapsed

    def measure(order: list[str]) -> tuple[dict[str, list[float]], float]:
        for path in dict.fromkeys(order):
            get(path)
        times: dict[str, list[float]] = {path: [] for path in order}
        cpu = server.cpu_seconds()
        for path in order:
            times[path].append(get(path))
        return times, (server.cpu_seconds() - cpu) * 1000 / len(order)

    def summary(values: Sequence[float], cpu_ms: float | None) -> dict[str, float | None]:
        return {"p50": percentile(values, 0.5), "p95": percentile(values, 0.95), "cpu": cpu_ms}

    order = [list(paths.values())[i % len(paths)] for i in range(count)]
    times, cpu = measure(order)
    figures = {name: summary(times[path], None) for name, path in paths.items() if times[path]}
    figures["all pages"] = summary([t for values in times.values() for t in values], cpu)
    static, static_cpu = measure([STATIC] * count)
    figures["static file"] = summary(static[STATIC], static_cpu)
    return figures


def aims(devices: int, browser: dict[str, dict[str, float]],
         server: dict[str, dict[str, float | None]]) -> list[dict[str, Any]]:  # fmt: skip
    """The aims, each with the figure it is judged on and whether it was met."""
    pages = {name: figures for name, figures in browser.items() if name != "static file"}
    worst = max(pages, key=lambda name: pages[name]["usable"])
    p95 = server["all pages"]["p95"]
    assert p95 is not None
    return [
        {
            "aim": f"every console page usable within {USABLE_AIM_MS:.0f} ms in this Chromium",
            "set_for_devices": USABLE_AIM_DEVICES, "devices": devices,
            "figure_ms": round(pages[worst]["usable"], 1), "page": worst,
            "met": pages[worst]["usable"] < USABLE_AIM_MS,
        },
        {
            "aim": f"a device-list page rendered within {RENDER_P95_AIM_MS:.0f} ms at p95",
            "set_for_devices": RENDER_AIM_DEVICES, "devices": devices,
            "figure_ms": round(p95, 1), "page": "all pages", "met": p95 < RENDER_P95_AIM_MS,
        },
    ]  # fmt: skip


def cell(value: float | None, base: float | None) -> str:
    """``value`` in ms with its ratio to ``base``."""
    if value is None:
        return "-"
    ratio = f"{value / base:.1f}x" if base else "-"
    return f"{value:.0f} ms ({ratio})"


def report(result: dict[str, Any]) -> None:
    """Print one fleet size's figures as tables, and its aims."""
    browser, server = result["browser"], result["server"]
    print(f"\n{result['devices']} devices (seeded in {result['seed_s']:.1f} s), rollout "
          f"{result['rollout']}; load average {result['load_average'][0]:.1f} before, "
          f"{result['load_average'][1]:.1f} after (this machine has {os.cpu_count()} CPUs); "
          f"Chromium: medians of {result['runs']} navigations")  # fmt: skip
    keys = ("response_end", "dom_content_loaded", "load", "usable")
    print(f"{'page':<14}" + "".join(f"{name:>20}" for name in
          ("responseEnd", "DOMContentLoaded", "loadEventEnd", "usable")))  # fmt: skip
    base = browser["static file"]
    for name, figures in browser.items():
        print(f"{name:<14}" + "".join(f"{cell(figures[k], base[k]):>20}" for k in keys))
    print(f"server: {result['requests']} sequential GETs of device-list pages, then as many "
          f"of {STATIC}; wall time per request")  # fmt: skip
    print(f"{'page':<14}{'p50':>20}{'p95':>20}{'CPU per request':>20}  path")
    base = server["static file"]
    paths = {**list_pages(result["devices"]), "static file": STATIC}
    for name, figures in server.items():
        print(f"{name:<14}" + "".join(f"{cell(figures[k], base[k]):>20}" for k in
              ("p50", "p95", "cpu")) + f"  {paths.get(name, '')}")  # fmt: skip
    for aim in result["aims"]:
        scope = (
            f"set for {aim['set_for_devices']:,} devices"
            if aim["set_for_devices"] == aim["devices"]
            else f"set for {aim['set_for_devices']:,} devices, this run has {aim['devices']:,}"
        )
        print(f"aim: {aim['aim']} ({scope}): {aim['figure_ms']:.0f} ms ({aim['page']}): "
              f"{'met' if aim['met'] else 'MISSED'}")  # fmt: skip


def run_size(browser: Browser, workdir: Path, devices: int, args: argparse.Namespace
             ) -> dict[str, Any]:  # fmt: skip
    """Seed, serve and measure one fleet of ``devices``; its figures."""
    data = workdir / f"data-{devices}"
    seconds = seed(data, devices, args.rollout)
    load_before = os.getloadavg()[0]
    token = viewer_token(data)
    with serving(data, workdir / f"server-{devices}.log") as server:
        on_browser, cookie = browser_figures(browser, server.url, token, devices, args.runs)
        on_server = server_figures(server, cookie, list_pages(devices), args.requests)
    result = {
        "devices": devices, "seed_s": round(seconds, 2), "rollout": args.rollout,
        "runs": args.runs, "requests": args.requests,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "browser": {n: {k: round(v, 1) for k, v in f.items()} for n, f in on_browser.items()},
        "server": {n: {k: None if v is None else round(v, 2) for k, v in f.items()}
                   for n, f in on_server.items()},
    }  # fmt: skip
    result["aims"] = aims(devices, on_browser, on_server)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--runs", type=int, default=5, help="navigations per page (median)")
    parser.add_argument("--requests", type=int, default=200, help="GETs of device-list pages")
    parser.add_argument("--rollout", choices=("running", "paused"), default="running")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    args = parser.parse_args()
    if min(args.devices) < 1 or args.runs < 1 or args.requests < 1:
        parser.error("--devices, --runs and --requests must be at least 1")
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing: `make deps` installs Debian's chromium")
    workdir = Path(tempfile.mkdtemp(prefix="console-bench-", dir=args.workdir))
    results = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                for devices in args.devices:
                    results.append(run_size(browser, workdir, devices, args))
                    report(results[-1])
            except BrowserError as err:
                raise SystemExit(f"chromium: {err}") from err
            finally:
                browser.close()
    finally:
        if args.keep:
            print(f"kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"benchmark": "console_load", "results": results}))


if __name__ == "__main__":
    main()
