"""Bundles over HTTP: resumed with Range after drops, retried with backoff, never mixed up."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from chaos.http_faults import Fault, FlakyHttpServer
from updater.errors import DownloadError
from updater.fetch import HttpStream, backoff_delay, open_source

DATA = os.urandom(3 * 1024 * 1024 + 17)


def read_all(stream: HttpStream) -> bytes:
    parts = []
    while chunk := stream.read(200_000):
        parts.append(chunk)
    return b"".join(parts)


def test_plain_download() -> None:
    with FlakyHttpServer({"/b": DATA}) as server:
        stream = HttpStream(server.url("/b"))
        assert read_all(stream) == DATA
        assert stream.resumes == 0


def test_dropped_connections_resume_where_they_stopped() -> None:
    delays: list[float] = []
    with FlakyHttpServer({"/b": DATA}) as server:
        # drops in the middle of a received chunk: that chunk is fetched again
        server.add_faults(Fault(drop_after=1_000_000), Fault(drop_after=530_000), Fault(status=503))
        stream = HttpStream(server.url("/b"), sleep=delays.append, rng=lambda: 1.0)
        assert read_all(stream) == DATA
        assert stream.resumes == 3
        ranges = [r.get("Range") for r in server.requests]
        assert ranges == [None, "bytes=983040-", "bytes=1507328-", "bytes=1507328-"]
        assert all(r.get("If-Range") for r in server.requests[1:])
    assert delays == [0.5, 0.5, 1.0]  # backoff restarts for each new failure streak


def test_gives_up_after_retries() -> None:
    delays: list[float] = []
    with FlakyHttpServer({"/b": DATA}) as server:
        server.add_faults(*[Fault(status=503)] * 5)
        stream = HttpStream(server.url("/b"), retries=3, sleep=delays.append, rng=lambda: 1.0)
        with pytest.raises(DownloadError, match="gave up after 4 attempts"):
            read_all(stream)
    assert delays == [0.5, 1.0, 2.0]


def test_client_errors_are_not_retried() -> None:
    with FlakyHttpServer({}) as server:
        stream = HttpStream(server.url("/missing"), sleep=lambda s: None)
        with pytest.raises(DownloadError, match="HTTP 404"):
            read_all(stream)
        assert len(server.requests) == 1


def test_resource_changed_during_download_is_refused() -> None:
    with FlakyHttpServer({"/b": DATA}) as server:
        server.add_faults(Fault(drop_after=100_000))
        stream = HttpStream(server.url("/b"), sleep=lambda s: None)
        stream.read(50_000)
        server.files["/b"] = b"another release" * 1000
        with pytest.raises(
            DownloadError,
            match=r"changed on the server during the download "
            r"\(ETag \"[0-9a-f]+\", now \"[0-9a-f]+\"\)$",
        ):
            read_all(stream)


@pytest.mark.parametrize("etags", [False, True], ids=["no-etag", "same-etag"])
def test_a_host_that_ignores_range_is_named_as_such_not_as_a_changed_release(
    etags: bool,
) -> None:
    with FlakyHttpServer({"/b": DATA}, ranges=False, etags=etags) as server:
        server.add_faults(Fault(drop_after=100_000))
        stream = HttpStream(server.url("/b"), sleep=lambda s: None)
        stream.read(50_000)
        with pytest.raises(
            DownloadError,
            match=r": the server ignores Range requests, so the download cannot "
            r"resume at byte [1-9][0-9]*$",
        ):
            read_all(stream)
        assert server.requests[1]["Range"]
        assert ("If-Range" in server.requests[1]) is etags


def test_unreachable_server_fails_after_retries() -> None:
    stream = HttpStream("http://127.0.0.1:9/none", retries=2, sleep=lambda s: None, timeout_s=1)
    with pytest.raises(DownloadError, match="gave up after 3 attempts"):
        stream.read()


def test_backoff_is_capped_full_jitter() -> None:
    assert backoff_delay(0, 0.5, 30, lambda: 1.0) == 0.5
    assert backoff_delay(10, 0.5, 30, lambda: 1.0) == 30
    assert backoff_delay(3, 0.5, 30, lambda: 0.25) == 1.0


def test_open_source_file_and_missing_file(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "b"
    path.write_bytes(b"abc")
    with open_source(str(path)) as stream:
        assert stream.read() == b"abc"
    with pytest.raises(DownloadError, match="cannot open"), open_source(str(path) + "x"):
        pass


def test_a_server_that_drips_cannot_outlive_the_deadline() -> None:
    now = [0.0]
    with FlakyHttpServer({"/b": DATA}) as server:
        server.add_faults(*[Fault(drop_after=70_000)] * 50)
        stream = HttpStream(
            server.url("/b"), sleep=lambda s: now.__setitem__(0, now[0] + 10), deadline=25.0,
            clock=lambda: now[0],
        )  # fmt: skip
        with pytest.raises(DownloadError, match="deadline passed"):
            read_all(stream)


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("fifo", "is a FIFO, not a bundle file"),
        ("directory", "is a directory, not a bundle file"),
        ("device", "is a device, not a bundle file"),
        ("empty", "no bundle given: a path or an http(s) URL"),
        ("file-url", "file URLs are not a source (a path, or an http(s) URL)"),
        ("ftp-url", "ftp URLs are not a source"),
    ],
)
def test_a_source_that_is_no_bundle_file_is_refused_at_once(
    tmp_path: Path, kind: str, problem: str
) -> None:
    import os

    sources = {
        "fifo": str(tmp_path / "fifo"), "directory": str(tmp_path), "device": "/dev/zero",
        "empty": "", "file-url": f"file://{tmp_path}/x.bundle", "ftp-url": "ftp://host/x",
    }  # fmt: skip
    if kind == "fifo":
        os.mkfifo(sources["fifo"])  # no writer: opening it for reading would wait for ever
    with pytest.raises(DownloadError, match=re.escape(problem)), open_source(sources[kind]):
        pass
