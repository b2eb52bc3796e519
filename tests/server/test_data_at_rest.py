"""The rules behind the server's data at rest and its request deadlines, in process: which
leftovers a sweep removes, the database's file modes whatever the umask, and a body deadline
that ends with the body (a download may last longer than any read timeout)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.types import Message, Receive, Scope, Send

from server.blobs import BlobStore
from server.database import Database
from server.datadir import secure_data_dir, sweep_leftovers
from server.errors import SettingsError
from server.settings import ServerLimits
from server.timeouts import BodyDeadlineMiddleware

NOW = 1_800_000_000.0
SHA = "ab" * 32


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def aged(path: Path, seconds: float, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.utime(path, (NOW - seconds, NOW - seconds))
    return path


def test_a_sweep_removes_old_leftovers_only(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    uploads = tmp_path / "uploads"
    old_copy = aged(store.root / "ab" / f".{SHA}.k3j_x9a0.tmp", 3600)
    fresh_copy = aged(store.root / "cd" / f".{'cd' * 32}.0aa1bb2c.tmp", 599)
    old_blob = aged(store.path(SHA), 10 * 86400)  # a stored blob is never a leftover
    old_upload = aged(uploads / "upload-a8d7f_1q.bundle", 600)
    fresh_upload = aged(uploads / "upload-z0z0z0z0.bundle", 10)
    not_ours = aged(uploads / "notes.txt", 86400)

    removed = sweep_leftovers(store, uploads, min_age_s=600, now=NOW)

    assert sorted(removed) == sorted([old_copy, old_upload])
    assert not old_copy.exists() and not old_upload.exists()
    assert fresh_copy.exists() and fresh_upload.exists()
    assert old_blob.exists() and not_ours.exists()


def test_a_sweep_of_a_missing_store_removes_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    store.root.rmdir()
    assert sweep_leftovers(store, tmp_path / "uploads", min_age_s=0, now=NOW) == []


def test_a_sweep_reports_the_problems_of_every_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = BlobStore(tmp_path / "blobs")
    for shard in ("ab", "cd", "ef"):
        (store.root / shard).mkdir()

    def stubborn(directory: Path, **_: object) -> tuple[list[Path], list[str]]:
        return [directory / "gone"], [f"{directory.name}: cannot remove"]

    monkeypatch.setattr("fleet_core.durable.sweep_temporaries", stubborn)
    removed, problems = store.sweep_temporaries(min_age_s=0, now=NOW)
    assert [p.parent.name for p in removed] == ["ab", "cd", "ef"]
    assert problems == ["ab: cannot remove", "cd: cannot remove", "ef: cannot remove"]


@pytest.fixture
def loose_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("loose_umask")
def test_the_database_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "data.db"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    try:
        for suffix in ("", "-wal", "-shm"):
            assert mode(Path(f"{path}{suffix}")) == 0o600, suffix
    finally:
        db.dispose()


@pytest.mark.usefixtures("loose_umask")
def test_the_files_of_an_existing_database_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / "data.db"
    for suffix in ("", "-journal"):
        Path(f"{path}{suffix}").write_bytes(b"")
        Path(f"{path}{suffix}").chmod(0o644)
    Database(f"sqlite:///{path}").dispose()
    assert mode(path) == 0o600
    assert mode(Path(f"{path}-journal")) == 0o600


@pytest.mark.usefixtures("loose_umask")
def test_blobs_and_their_directories_are_private_whatever_the_umask(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    content = b"image bytes" * 1000
    sha256 = hashlib.sha256(content).hexdigest()
    with io.BytesIO(content) as source:
        assert store.put_range(source, 0, len(content), sha256)
    assert mode(store.root) == 0o700
    assert mode(store.path(sha256).parent) == 0o700
    assert mode(store.path(sha256)) == 0o600


def test_a_loose_data_directory_is_tightened_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "data"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    secure_data_dir(directory)
    assert mode(directory) == 0o700
    assert "tightened to 0700" in caplog.text
    caplog.clear()
    secure_data_dir(directory)
    assert caplog.text == ""  # a private directory is left alone, quietly


@pytest.mark.parametrize(
    "limits",
    [
        {"header_timeout_s": 0},
        {"body_read_timeout_s": -1},
        {"leftover_age_s": 0},
        {"startup_leftover_age_s": -1},
        {"min_body_rate_bps": -1},
        {"max_concurrent_uploads": 0},
    ],
)
def test_server_limits_refuse_nonsense(limits: dict[str, float]) -> None:
    with pytest.raises(SettingsError):
        ServerLimits(**limits)  # type: ignore[arg-type]


def test_by_default_a_live_upload_outlasts_no_sweep() -> None:
    limits = ServerLimits()
    bound = limits.upload_idle_bound_s
    assert bound is not None and bound < limits.leftover_age_s
    assert ServerLimits(min_body_rate_bps=0).upload_idle_bound_s is None


def run_app(
    app_messages: list[Message],
    client: list[tuple[float, Message]],
    read_timeout_s: float,
    min_rate_bps: float = 0.0,
) -> tuple[list[Message], float]:
    """An application that reads its whole body and then waits for the client to go away
    (as a streaming response does), behind the body deadline; the client sends ``client``
    (each after its delay). Returns what the application sent and how long it ran."""

    async def application(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        if message["type"] == "http.disconnect":  # as the server's handlers answer it
            await send({"type": "http.response.start", "status": 422, "headers": []})
            await send({"type": "http.response.body", "body": b"client went away"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"streaming", "more_body": True})
        message = await receive()  # waits for the disconnect while the download runs
        await send({"type": "http.response.body", "body": message["type"].encode()})

    async def main() -> float:
        queue = list(client)

        async def receive() -> Message:
            delay, message = queue.pop(0)
            await asyncio.sleep(delay)  # the simulated client's pace
            return message

        async def send(message: Message) -> None:
            app_messages.append(message)

        started = time.monotonic()
        middleware = BodyDeadlineMiddleware(
            application, read_timeout_s=read_timeout_s, min_rate_bps=min_rate_bps
        )
        await middleware({"type": "http", "client": ("127.0.0.1", 1)}, receive, send)
        return time.monotonic() - started

    return app_messages, asyncio.run(main())


def test_the_body_deadline_ends_with_the_body() -> None:
    sent, lasted = run_app(
        [],
        [
            (0.0, {"type": "http.request", "body": b"a", "more_body": True}),
            (0.1, {"type": "http.request", "body": b"b", "more_body": False}),
            (0.6, {"type": "http.disconnect"}),  # the download ends after 3 read timeouts
        ],
        read_timeout_s=0.2,
    )
    assert sent[0]["status"] == 200
    assert sent[-1]["body"] == b"http.disconnect"
    assert lasted >= 0.6


def test_a_body_read_past_the_deadline_is_answered_408() -> None:
    sent, lasted = run_app(
        [],
        [
            (0.0, {"type": "http.request", "body": b"a", "more_body": True}),
            (5.0, {"type": "http.request", "body": b"b", "more_body": False}),
        ],
        read_timeout_s=0.2,
    )
    assert sent[0]["status"] == 408
    assert (b"connection", b"close") in sent[0]["headers"]
    assert b"too slowly" in sent[-1]["body"]
    assert lasted < 2


def test_a_fast_start_buys_no_time_for_a_drip_after_it() -> None:
    mib = {"type": "http.request", "body": b"x" * 1024 * 1024, "more_body": True}
    drip = {"type": "http.request", "body": b"x" * 100, "more_body": True}
    sent, lasted = run_app(
        [],
        [(0.0, mib), (0.0, mib)]
        + [(0.1, drip)] * 20
        + [(0.0, {"type": "http.request", "body": b"", "more_body": False})],
        read_timeout_s=0.2,
        min_rate_bps=1_000_000,  # two fast mebibytes would earn two seconds of an average
    )
    assert sent[0]["status"] == 408
    assert lasted < 1.0
