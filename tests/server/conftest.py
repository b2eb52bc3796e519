"""Fixtures of the server tests: a fresh database per test (SQLite always, PostgreSQL too when
``FLEET_TEST_DATABASE_URL`` is set), the app behind a TestClient, operator tokens of every role,
a movable server clock, and simulated devices that speak docs/device-protocol.md.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import FastAPI
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from server.app import create_app
from server.auth import Role, create_operator_token
from server.database import Database
from server.settings import Settings, utc
from signing.signature import signed_message

with warnings.catch_warnings():
    # Starlette's test client warns that it would rather use httpx2, which this environment
    # does not have; it is the same client either way.
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

PG_ENV = "FLEET_TEST_DATABASE_URL"
MAX_UPLOAD = 2 * 1024 * 1024
START = 1_700_000_000.0  # 2023-11-14T22:13:20Z, before any real "now"


class FakeClock:
    """The server's clock, moved by the test."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# PostgreSQL joins the parameters only when a server is given, so a SQLite-only run lists no
# skipped half.
DATABASES = ["sqlite", "postgresql"] if os.environ.get(PG_ENV) else ["sqlite"]


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None (SQLite in the data dir), or a PostgreSQL URL whose search path is a new schema."""
    if request.param == "sqlite":
        yield None
        return
    base = os.environ[PG_ENV]
    schema = f"fleet_test_{secrets.token_hex(6)}"
    admin = create_engine(base)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@dataclass
class Harness:
    """One server (app, client, settings) and a bearer header per operator role."""

    app: FastAPI
    client: TestClient
    settings: Settings
    clock: FakeClock
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)  # shared by a test's examples

    @property
    def db(self) -> Database:
        db: Database = self.app.state.fleet.db
        return db

    @property
    def admin(self) -> dict[str, str]:
        return self.headers["admin"]

    @property
    def operator(self) -> dict[str, str]:
        return self.headers["operator"]

    @property
    def viewer(self) -> dict[str, str]:
        return self.headers["viewer"]

    def upload(self, bundle: Path | bytes, headers: dict[str, str] | None = None) -> Any:
        data = bundle.read_bytes() if isinstance(bundle, Path) else bundle
        return self.client.post(
            "/api/v1/releases", content=data, headers=self.operator if headers is None else headers
        )

    def enrollment_token(self, uses: int = 1, expires_in: int | None = None) -> str:
        response = self.client.post(
            "/api/v1/enrollment-tokens",
            json={"uses": uses, "expires_in": expires_in},
            headers=self.operator,
        )
        assert response.status_code == 201, response.text
        token: str = response.json()["token"]
        return token

    def count(self, model: type[Any]) -> int:
        with self.db.read() as session:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)

    def blob_files(self) -> list[Path]:
        return sorted(p for p in self.settings.blob_dir.rglob("*") if p.is_file())

    def server_public_key(self) -> bytes:
        return bytes(
            self.app.state.fleet.server_key.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        )


# The harness's Prometheus scrape token (server/metrics.py: it admits to per-device series).
SCRAPE_TOKEN = "scrape-" + "5" * 40


def make_settings(
    tmp_path: Path, keyring_dir: Path, database_url: str | None, clock: FakeClock
) -> Settings:
    data_dir = tmp_path / "data"
    if not (data_dir / "keyring").exists():
        shutil.copytree(keyring_dir, data_dir / "keyring")
    scrape_token = tmp_path / "metrics-token"
    scrape_token.write_text(SCRAPE_TOKEN + "\n")
    return Settings.create(
        data_dir, database_url=database_url, max_upload_bytes=MAX_UPLOAD, clock=clock,
        metrics_token_file=scrape_token,
    )  # fmt: skip


@pytest.fixture
def harness(
    tmp_path: Path, keyring_dir: Path, database_url: str | None, clock: FakeClock
) -> Iterator[Harness]:
    yield from serve_harness(tmp_path, keyring_dir, database_url, clock)


def serve_harness(
    tmp_path: Path, keyring_dir: Path, database_url: str | None, clock: FakeClock,
    **app_options: Any,
) -> Iterator[Harness]:  # fmt: skip
    """The :class:`Harness` of a server made by ``create_app(settings, **app_options)``, with
    one operator token per role, for as long as the generator runs (a fixture's body)."""
    settings = make_settings(tmp_path, keyring_dir, database_url, clock)
    app = create_app(settings, **app_options)
    with TestClient(app) as client:
        h = Harness(app, client, settings, clock)
        for role in Role:
            secret = create_operator_token(
                h.db, name=f"test-{role.label}", role=role, created_by="test", now=utc(clock)
            )
            h.headers[role.label] = {"Authorization": f"Bearer {secret}"}
        yield h
    h.db.dispose()


class FakeDevice:
    """A device speaking the protocol through a client: its own key, session and nonces."""

    def __init__(
        self,
        client: Any,
        *,
        compatible: str = "metrica-rpi4",
        hostname: str = "cam-0001",
        key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.client = client
        self.key = key or Ed25519PrivateKey.generate()
        raw = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_hex = raw.hex()
        self.id = hashlib.sha256(raw).hexdigest()
        self.compatible = compatible
        self.hostname = hostname
        self.token: str | None = None

    def sign(self, purpose: str, payload: str) -> str:
        return self.key.sign(signed_message(purpose, payload.encode())).hex()

    def enroll_body(self, enrollment_token: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "public_key": self.public_hex,
            "compatible": self.compatible,
            "hostname": self.hostname,
            "proof": self.sign(
                "device-enroll", f"enroll\n{self.public_hex}\n{self.compatible}\n{self.hostname}"
            ),
        }
        if enrollment_token is not None:
            body["enrollment_token"] = enrollment_token
        return body

    def enroll(self, enrollment_token: str | None = None) -> Any:
        return self.client.post("/api/v1/devices/enroll", json=self.enroll_body(enrollment_token))

    def challenge(self) -> str:
        response = self.client.post(f"/api/v1/devices/{self.id}/challenge")
        assert response.status_code == 200, response.text
        value: str = response.json()["challenge"]
        return value

    def session_body(self, challenge: str) -> dict[str, str]:
        return {
            "challenge": challenge,
            "signature": self.sign("device-session", f"session\n{self.id}\n{challenge}"),
        }

    def login(self) -> str:
        response = self.client.post(
            f"/api/v1/devices/{self.id}/session", json=self.session_body(self.challenge())
        )
        assert response.status_code == 200, response.text
        self.token = response.json()["token"]
        return self.token

    @property
    def headers(self) -> dict[str, str]:
        assert self.token is not None, "log in first"
        return {"Authorization": f"Bearer {self.token}"}

    def checkin(self, nonce: str | None = None, etag: str | None = None) -> Any:
        headers = dict(self.headers)
        if etag is not None:
            headers["If-None-Match"] = etag
        return self.client.post(
            f"/api/v1/devices/{self.id}/checkin",
            json={"nonce": nonce or secrets.token_hex(16)},
            headers=headers,
        )

    def heartbeat(self, **changes: Any) -> Any:
        body: dict[str, Any] = {
            "version": "1.0.0",
            "booted": "a",
            "primary": "a",
            "trial": False,
            "slots": {
                "a": {"status": "good", "version": "1.0.0"},
                "b": {"status": "good", "version": "0.9.0"},
            },
            "updater_state": "idle",
            "health": [{"name": "systemd:camera.service", "ok": True}],
            "temperature_c": 51.2,
            "free_space_mb": 2048,
            "uptime_s": 86400.5,
            "clock": START - 3.0,
            "clock_skew_s": 3.2,
            "safe_mode": False,
        }
        body.update(changes)
        return self.client.post(
            f"/api/v1/devices/{self.id}/heartbeat", json=body, headers=self.headers
        )

    def events(self, *events: tuple[str, int]) -> Any:
        body = {
            "events": [{"event": name, "seq": seq, "fields": {"n": seq}} for name, seq in events]
        }
        return self.client.post(
            f"/api/v1/devices/{self.id}/events", json=body, headers=self.headers
        )


@pytest.fixture
def enrolled(harness: Harness) -> Callable[..., FakeDevice]:
    """Make a device, enroll it with a fresh token and open a session."""

    def make(**kwargs: Any) -> FakeDevice:
        device = FakeDevice(harness.client, **kwargs)
        response = device.enroll(harness.enrollment_token())
        assert response.status_code == 200, response.text
        device.login()
        return device

    return make


def at_once(harness: Harness, work: Callable[[Database, Any], None], items: Sequence[Any]) -> None:
    """``work(db, item)`` for every item at the same time, each in its own thread with its own
    :class:`Database` on the harness's database, as separate server processes would; returns
    once all are done. An exception in ``work`` is raised here (the first one)."""
    databases = [Database(harness.settings.database_url) for _ in items]
    errors: list[BaseException] = []

    def run(db: Database, item: Any) -> None:
        try:
            work(db, item)
        except BaseException as err:  # handed to the test below
            errors.append(err)

    threads = [
        threading.Thread(target=run, args=(db, item))
        for db, item in zip(databases, items, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for db in databases:
        db.dispose()
    if errors:
        raise errors[0]


def free_port() -> int:
    """A loopback port nobody listened on a moment ago. Only for an address that must refuse
    connections: a server of the tests is given a socket already bound (listening_socket),
    since between closing this probe and a server binding the port anyone could take it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def listening_socket(port: int = 0) -> socket.socket:
    """A TCP socket bound on loopback to ``port`` (0: one the kernel picks) and listening. A
    server process is handed its descriptor (``fleet server run --fd``), so the address is the
    test's from before the server starts: no other process can be listening there, and every
    answer on it comes from that server."""
    sock = socket.socket()
    try:
        # a restarted server's port may still have connections in TIME_WAIT; a socket that
        # is listening there still makes the bind fail
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class LiveServer:
    """The app served over real HTTP by uvicorn in a thread (for the ``fleet`` commands)."""

    url: str
    harness: Harness


@pytest.fixture
def live_server(harness: Harness) -> Iterator[LiveServer]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(harness.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", harness)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
