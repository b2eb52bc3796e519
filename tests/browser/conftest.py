"""The browser tier: the web console (``/ui``) in Debian's Chromium, driven by Playwright.

Each test gets a real ``fleet server run`` on loopback (a fast clock and a short
``--rollout-interval``, so stages soak in seconds), an admin, an operator and a viewer token
(``fleet server token create``), and a browser context of its own in one Chromium shared by
the session. Devices come two ways: :func:`fake_devices` enrolls devices that speak the
protocol from the test (to say exactly what a device may say, hostile text included), and
:class:`LiveFleet` runs a :class:`~chaos.fleet.VirtualFleet` of devices running the real
updater daemon, stepped in a background thread while the browser watches.

Every page a test visits through :class:`Console` is saved as a screenshot in
``build/test-artifacts/ui/<test>-<name>.png``, and so is the last page of a failed test.

Chromium is ``/usr/bin/chromium`` (``make deps`` installs it): Playwright drives it through
``executable_path``, and never downloads a browser. A missing Chromium or axe-core fails the
tier; ``FLEET_SKIP_BROWSER=1`` skips it, and only when set explicitly.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from chaos.fleet import MemberSpec, VirtualFleet
from fleet_core.cli import fleet
from signing.keyring import trust_key
from tests.chaos.conftest import Releases
from tests.server.conftest import FakeDevice
from tests.server.test_process import HttpClient, ServerProcess

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
AXE = Path(__file__).resolve().parent / "node_modules" / "axe-core" / "axe.min.js"
ARTIFACTS = ROOT / "build" / "test-artifacts" / "ui"
SKIP_ENV = "FLEET_SKIP_BROWSER"
# No sandbox: the tests run as root, where Chromium refuses its sandbox. The rest keeps the
# browser from talking to anything but the servers of the tests.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The server's clock runs this many times faster: a stage's soak of 30 s lasts 3 s.
TIME_SCALE = 10
SERVER_ARGS = ("--time-scale", str(TIME_SCALE), "--rollout-interval", "0.2")
ROLES = ("admin", "operator", "viewer")
WAIT_MS = 20_000  # the longest a page may take to show what a test waits for


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """Remember whether the test's call failed, for :func:`page`'s screenshot of the end."""
    if call.when == "call":
        item.stash[FAILED] = call.excinfo is not None


FAILED = pytest.StashKey[bool]()


def require_browser() -> None:
    """Fail the tier when Chromium or axe-core is missing (skip it only on request).

    Raises:
        pytest.skip.Exception: FLEET_SKIP_BROWSER=1 is set.
        pytest.fail.Exception: /usr/bin/chromium or tests/browser/node_modules is missing.
    """
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: the browser tier was asked not to run")
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: `make deps` installs Debian's chromium (make test does); "
            f"{SKIP_ENV}=1 skips the browser tier",
            pytrace=False,
        )
    if not AXE.is_file():
        pytest.fail(
            f"{AXE.relative_to(ROOT)} is missing: `make browser-deps` installs it from "
            "tests/browser/package-lock.json (make test does)",
            pytrace=False,
        )


# Package scope, not session: Playwright's sync API keeps an asyncio event loop running in the
# main thread while it is open, and every later test calling asyncio.run() would fail with
# "cannot be called from a running event loop". It is closed when this tier ends.
@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    require_browser()
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="package")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """One Chromium for the tier; each test gets contexts of its own (fresh cookies)."""
    chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    try:
        yield chromium
    finally:
        chromium.close()


def cli(*args: str) -> str:
    result = CliRunner().invoke(fleet, list(args))
    assert result.exit_code == 0, result.output
    return result.output.strip()


class ConsoleServer:
    """A ``fleet server run`` process on loopback with a token per role."""

    def __init__(self, root: Path, releases: Releases) -> None:
        self.data = root / "server"
        self.db_args = ["--data-dir", str(self.data)]
        trust_key(self.data / "keyring", releases.directory / "release-key.pub")
        self.process = ServerProcess(["server", "run", *self.db_args, *SERVER_ARGS],
                                     root / "server.log")  # fmt: skip
        self.url = self.process.url
        self.tokens: dict[str, str] = {}
        self.process.start()
        for role in ROLES:
            created = cli("server", "token", "create", "--role", role, "--name", f"ui-{role}",
                          *self.db_args)  # fmt: skip
            self.tokens[role] = created.splitlines()[0]

    def stop(self) -> None:
        self.process.stop()

    def start(self) -> None:
        self.process.start()

    def headers(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def api(self, path: str, role: str = "admin") -> Any:
        """GET an API path with ``role``'s token; its JSON.

        Raises:
            requests.HTTPError: the server answered an error.
        """
        answer = requests.get(self.url + path, headers=self.headers(role), timeout=10)
        answer.raise_for_status()
        return answer.json()

    def post(self, path: str, body: dict[str, Any], role: str = "admin") -> Any:
        """POST a JSON body to an API path with ``role``'s token; its JSON (or None).

        Raises:
            requests.HTTPError: the server answered an error.
        """
        answer = requests.post(self.url + path, json=body, headers=self.headers(role), timeout=10)
        answer.raise_for_status()
        return answer.json() if answer.content else None

    def enrollment_token(self, uses: int) -> str:
        return cli("server", "enrollment-token", "create", "--uses", str(uses),
                   *self.db_args).splitlines()[0]  # fmt: skip

    def fleet(self, *args: str) -> str:
        """A ``fleet`` command against this server with the admin token."""
        return cli(*args, "--server", self.url, "--token", self.tokens["admin"])

    def devices(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.api("/api/v1/devices")["devices"]
        return rows

    def rollouts(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.api("/api/v1/rollouts")
        return answer

    def emergency_stopped(self) -> bool:
        return bool(self.rollouts()["emergency_stop"]["active"])


@pytest.fixture
def server(tmp_path: Path, releases: Releases) -> Iterator[ConsoleServer]:
    console = ConsoleServer(tmp_path, releases)
    try:
        yield console
    finally:
        console.stop()


def fake_devices(server: ConsoleServer, hostnames: list[str], **heartbeat: Any) -> list[FakeDevice]:
    """Devices enrolled over HTTP with ``hostnames``, each having sent a heartbeat
    (``heartbeat`` changes the protocol's example one), as devices of any make would."""
    token = server.enrollment_token(len(hostnames))
    made = []
    for hostname in hostnames:
        device = FakeDevice(HttpClient(server.url), hostname=hostname, compatible="lab-device")
        enrolled = device.enroll(token)
        assert enrolled.status_code == 200, enrolled.text
        device.login()
        sent = device.heartbeat(**heartbeat)
        assert sent.status_code == 204, sent.text
        made.append(device)
    return made


def send_events(device: FakeDevice, *events: tuple[str, dict[str, Any]]) -> None:
    """Report ``events`` (name, fields) as the device's next ones."""
    first = int(time.time() * 1000)
    body = {
        "events": [
            {"event": name, "seq": first + index, "fields": fields}
            for index, (name, fields) in enumerate(events)
        ]
    }
    sent = device.client.post(f"/api/v1/devices/{device.id}/events", json=body,
                              headers=device.headers)  # fmt: skip
    assert sent.status_code == 204, sent.text


class LiveFleet:
    """A :class:`VirtualFleet` of devices running the real updater daemon against the
    server, stepped in a background thread (15 simulated seconds a step) while a test watches
    the browser. Read the devices' state holding :attr:`lock`."""

    def __init__(self, root: Path, server: ConsoleServer, releases: Releases, size: int) -> None:
        self.server = server
        self.fleet = VirtualFleet(
            root, [MemberSpec(role="camera") for _ in range(size)],
            server_urls=[server.url], server_key=server.data / "server-key.pub",
            release_key=releases.directory / "release-key.pub",
            enrollment_token=server.enrollment_token(size),
        )  # fmt: skip
        self.lock = threading.Lock()
        self._running = threading.Event()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        ids = {m.device_id for m in self.fleet.members}
        known = lambda: ids <= {row["id"] for row in server.devices()}  # noqa: E731
        self.fleet.run_until(known, limit_s=600, step_s=15)

    def start(self) -> None:
        """Step the fleet in the background until :meth:`stop`."""
        self._running.set()
        self._thread = threading.Thread(target=self._loop, name="live-fleet", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while self._running.is_set():
                with self.lock:
                    self.fleet.step(15)
                time.sleep(0.1)  # lets the test take the lock between steps
        except BaseException as err:  # raised in the test by stop() or check()
            self._error = err

    def check(self) -> None:
        """Raise what the stepping thread raised, if it did.

        Raises:
            AssertionError: a device's step failed.
        """
        if self._error is not None:
            raise AssertionError(f"the virtual fleet failed: {self._error!r}") from self._error

    def stop(self) -> None:
        self._running.clear()
        if self._thread is not None:
            self._thread.join(60)
        self.check()

    def clock_s(self) -> float:
        """The fleet's simulated clock, in seconds."""
        with self.lock:
            return self.fleet.clock()

    def installs_started(self) -> int:
        with self.lock:
            return self.fleet.installs_started()

    def versions(self) -> dict[str | None, int]:
        with self.lock:
            return dict(self.fleet.versions())


@pytest.fixture
def live_fleet(
    tmp_path: Path, server: ConsoleServer, releases: Releases
) -> Iterator[Callable[[int], LiveFleet]]:
    made: list[LiveFleet] = []

    def make(size: int) -> LiveFleet:
        made.append(LiveFleet(tmp_path / f"fleet-{len(made)}", server, releases, size))
        return made[-1]

    try:
        yield make
    finally:
        for each in made:
            each._running.clear()
        for each in made:
            if each._thread is not None:
                each._thread.join(60)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:120] or "page"


class Console:
    """A browser page on the console, saving a screenshot of every page it visits."""

    def __init__(
        self, page: Page, server: ConsoleServer, test: str, numbers: Iterator[int]
    ) -> None:
        self.page = page
        self.server = server
        self.test = test
        self.numbers = numbers  # shared by the test's consoles: one sequence of screenshots

    def url(self, path: str) -> str:
        return self.server.url + path

    def shot(self, name: str) -> Path:
        """Save the page as ``<test>-<nn>-<name>.png`` in build/test-artifacts/ui."""
        path = ARTIFACTS / f"{slug(self.test)}-{next(self.numbers):02d}-{slug(name)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def goto(self, path: str, name: str | None = None) -> int:
        """Visit ``path``; its HTTP status."""
        response = self.page.goto(self.url(path))
        assert response is not None, path
        self.shot(name or path)
        return response.status

    def submit(self, click: Callable[[], None], name: str) -> int:
        """Do ``click`` (which submits a form) and wait for the page it leads to; its status."""
        with self.page.expect_navigation() as navigation:
            click()
        response = navigation.value
        self.page.wait_for_load_state()
        self.shot(name)
        return response.status if response is not None else 0

    def login(self, token: str) -> int:
        """Sign in on the login page with ``token``; the status of the page it leads to."""
        self.goto("/ui/login", "login")
        self.page.fill("input[name=token]", token)
        return self.submit(lambda: self.page.locator("form button[type=submit]").first.click(),
                           "after-login")  # fmt: skip

    def mark(self) -> None:
        """Put a marker in the window: it survives live refreshes, never a navigation."""
        self.page.evaluate("window.__fleetMarker = 'kept'")

    def marked(self) -> bool:
        return bool(self.page.evaluate("window.__fleetMarker === 'kept'"))


@pytest.fixture
def new_console(
    browser: Browser, server: ConsoleServer, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Console]]:
    """Make consoles (each its own browser context: cookies of its own), closed at the end;
    a failed test's pages are saved as they were."""
    contexts: list[tuple[BrowserContext, Console]] = []
    numbers = itertools.count(1)

    def make(**context_options: Any) -> Console:
        context = browser.new_context(**context_options)
        context.set_default_timeout(WAIT_MS)
        console = Console(context.new_page(), server, request.node.name, numbers)
        contexts.append((context, console))
        return console

    try:
        yield make
    finally:
        failed = request.node.stash.get(FAILED, False)
        for context, console in contexts:
            if failed:
                with contextlib.suppress(PlaywrightError):  # a page gone has nothing to show
                    console.shot("failure")
            context.close()


@pytest.fixture
def console(new_console: Callable[..., Console]) -> Console:
    return new_console()


def said(page: Page) -> str:
    """The page's main text, for a failure's message."""
    return " ".join(page.locator("main").inner_text().split())[:300]


def login(console: Console, role: str = "operator") -> Console:
    """Sign ``console`` in as the server's ``role`` token; it lands on the overview."""
    status = console.login(console.server.tokens[role])
    assert status == 200, f"signing in answered {status}: {said(console.page)}"
    assert console.page.url.rstrip("/").endswith("/ui"), console.page.url
    return console


def run_axe(page: Page) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is.

    axe is evaluated through the DevTools protocol, which the page's Content-Security-Policy
    does not govern (a script tag would be refused by ``script-src 'self'``), so the page is
    checked under its own policy, not a relaxed one."""
    if not page.evaluate("typeof axe === 'object'"):
        page.evaluate(AXE.read_text())
    result = json.loads(page.evaluate("async () => JSON.stringify(await axe.run(document))"))
    assert result["passes"], "axe-core checked nothing"
    violations: list[dict[str, Any]] = result["violations"]
    return [
        {"id": v["id"], "impact": v["impact"], "help": v["help"],
         "nodes": [n["html"][:200] for n in v["nodes"][:5]]}
        for v in violations
        if v.get("impact") in ("serious", "critical")
    ]  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def _fresh_artifacts() -> None:
    """This run's screenshots only."""
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
