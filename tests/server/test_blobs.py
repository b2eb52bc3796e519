"""``GET /blobs/<sha256>``: whole, single ranges, conditional requests, and what is refused."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from server.blobs import BlobIntegrityError, BlobStore, ByteRange, parse_range
from server.errors import RangeNotSatisfiableError
from tests.server.conftest import Harness

MakeBundle = Callable[..., Path]


@pytest.fixture(params=["chunked", "whole"])
def blob(
    harness: Harness, make_bundle: MakeBundle, request: pytest.FixtureRequest
) -> tuple[str, bytes]:
    """The URL and bytes of a stored 3000-byte blob: an image assembled from its chunk, or one
    stored whole (bundle format 1)."""
    release = harness.upload(make_bundle(size=3000, chunked=request.param == "chunked")).json()
    url = release["images"][0]["url"]
    return url, harness.client.get(url).content


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", ByteRange(0, 9)),
        ("bytes=10-", ByteRange(10, 99)),
        ("bytes=-10", ByteRange(90, 99)),
        ("bytes=-1000", ByteRange(0, 99)),
        ("bytes=50-5000", ByteRange(50, 99)),
        ("bytes=99-99", ByteRange(99, 99)),
        ("bytes = 1 - 2", ByteRange(1, 2)),
        ("bytes=9-1", None),  # invalid: ignored, whole blob
        ("bytes=0-1,5-6", None),  # several ranges: served whole
        ("items=0-1", None),
        ("bytes=-", None),
        ("bytes=abc", None),
        ("bytes=٣-٤", None),  # digits, but not ASCII ones
    ],
)
def test_parse_range(header: str | None, expected: ByteRange | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0", "bytes=1000-"])
def test_parse_range_unsatisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiableError) as caught:
        parse_range(header, 100)
    assert caught.value.headers == {"Content-Range": "bytes */100"}


def test_whole_blob_and_head(harness: Harness, blob: tuple[str, bytes]) -> None:
    url, data = blob
    sha = url.rsplit("/", 1)[1]
    assert hashlib.sha256(data).hexdigest() == sha
    response = harness.client.get(url)
    assert response.status_code == 200
    assert response.headers["etag"] == f'"{sha}"'
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-length"] == str(len(data))
    head = harness.client.head(url)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(data))
    assert head.headers["etag"] == f'"{sha}"'


def test_ranges(harness: Harness, blob: tuple[str, bytes]) -> None:
    url, data = blob
    size = len(data)
    part = harness.client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{size}"
    assert part.headers["content-length"] == "100"
    tail = harness.client.get(url, headers={"Range": "bytes=-7"})
    assert tail.status_code == 206
    assert tail.content == data[-7:]
    rest = harness.client.get(url, headers={"Range": f"bytes={size - 5}-"})
    assert rest.content == data[-5:]
    for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
        refused = harness.client.get(url, headers={"Range": header})
        assert refused.status_code == 416, header
        assert refused.headers["content-range"] == f"bytes */{size}"
        assert refused.json()["error"] == "range_not_satisfiable"
    multi = harness.client.get(url, headers={"Range": "bytes=0-1,4-5"})
    assert multi.status_code == 200
    assert multi.content == data


def test_if_range_and_if_none_match(harness: Harness, blob: tuple[str, bytes]) -> None:
    url, data = blob
    etag = harness.client.get(url).headers["etag"]
    same = harness.client.get(url, headers={"Range": "bytes=10-19", "If-Range": etag})
    assert same.status_code == 206
    assert same.content == data[10:20]
    other = harness.client.get(url, headers={"Range": "bytes=10-19", "If-Range": '"0000"'})
    assert other.status_code == 200
    assert other.content == data
    dated = harness.client.get(
        url, headers={"Range": "bytes=10-19", "If-Range": "Wed, 21 Oct 2015 07:28:00 GMT"}
    )
    assert dated.status_code == 200
    cached = harness.client.get(url, headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.content == b""
    for header in ("*", " * ", f'"{"0" * 64}", W/{etag}'):
        for method in (harness.client.get, harness.client.head):
            answer = method(url, headers={"If-None-Match": header})
            assert answer.status_code == 304, (header, method)
            assert answer.headers["etag"] == etag
    assert harness.client.get(url, headers={"If-None-Match": '"0000"'}).status_code == 200
    missing = harness.client.get(f"/blobs/{'0' * 64}", headers={"If-None-Match": "*"})
    assert missing.status_code == 404  # "*" matches a blob that exists, not a missing one


def test_unknown_and_malformed_blob_names(harness: Harness) -> None:
    for name in ("0" * 64, "A" * 64, "abc", "../../data.db", "%00"):
        response = harness.client.get(f"/blobs/{name}")
        assert response.status_code == 404, name
        assert response.json()["error"] in {"unknown_blob", "not_found"}


def test_store_refuses_bytes_that_do_not_match(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    source = tmp_path / "source"
    source.write_bytes(b"0123456789")
    wrong = hashlib.sha256(b"something else").hexdigest()
    with open(source, "rb") as handle, pytest.raises(BlobIntegrityError):
        store.put_range(handle, 0, 10, wrong)
    right = hashlib.sha256(b"23456").hexdigest()
    with open(source, "rb") as handle, pytest.raises(BlobIntegrityError):
        store.put_range(handle, 8, 5, right)  # source ends early
    assert [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == []
    with open(source, "rb") as handle:
        assert store.put_range(handle, 2, 5, right) is True
        assert store.put_range(handle, 2, 5, right) is False
    assert store.path(right).read_bytes() == b"23456"


def test_absurdly_long_range_numbers_are_ignored_not_a_server_error(
    harness: Harness, blob: tuple[str, bytes]
) -> None:
    url, data = blob
    for header in ("bytes=" + "0" * 5000 + "-", "bytes=-" + "9" * 5000, "bytes=1-" + "9" * 30):
        answer = harness.client.get(url, headers={"Range": header})
        assert answer.status_code == 200 and answer.content == data


def test_if_range_for_another_blob_sends_it_whole_even_past_the_end(
    harness: Harness, blob: tuple[str, bytes]
) -> None:
    url, data = blob
    headers = {"Range": "bytes=999999-", "If-Range": '"' + "0" * 64 + '"'}
    answer = harness.client.get(url, headers=headers)
    assert answer.status_code == 200 and answer.content == data


def test_suffix_range_of_an_empty_resource_is_unsatisfiable() -> None:
    with pytest.raises(RangeNotSatisfiableError):
        parse_range("bytes=-5", 0)


def test_store_layout_is_two_hex_digits_then_the_name(tmp_path: Path) -> None:
    """Static servers (nginx, a CDN) serve this directory as it is: the layout is a contract."""
    store = BlobStore(tmp_path / "data" / "blobs")  # missing parents are created
    sha = hashlib.sha256(b"x").hexdigest()
    assert store.path(sha) == tmp_path / "data" / "blobs" / sha[:2] / sha
    with pytest.raises(ValueError, match="is not a SHA-256 in lowercase hex"):
        store.path(sha.upper())


def test_store_errors_name_the_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    source = tmp_path / "source"
    source.write_bytes(b"0123456789")
    wrong = hashlib.sha256(b"other").hexdigest()
    with open(source, "rb") as handle, pytest.raises(BlobIntegrityError) as caught:
        store.put_range(handle, 0, 10, wrong)
    actual = hashlib.sha256(b"0123456789").hexdigest()
    assert str(caught.value) == f"blob {wrong}: bytes hash to {actual}"
    with open(source, "rb") as handle, pytest.raises(BlobIntegrityError) as caught:
        store.put_range(handle, 8, 5, wrong)
    assert str(caught.value) == f"blob {wrong}: source ends 3 bytes early"


def test_remove_deletes_a_blob_and_ignores_a_missing_one(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    source = tmp_path / "source"
    source.write_bytes(b"abc")
    sha = hashlib.sha256(b"abc").hexdigest()
    with open(source, "rb") as handle:
        store.put_range(handle, 0, 3, sha)
    assert store.exists(sha, 3)
    store.remove(sha)
    assert not store.exists(sha, 3)
    store.remove(sha)  # already gone: harmless
    assert store.open(sha) is None


def test_an_unsatisfiable_range_is_quoted_at_most_80_characters() -> None:
    header = "bytes" + " " * 90 + "=100-"  # valid syntax: spaces may surround '='
    with pytest.raises(RangeNotSatisfiableError) as caught:
        parse_range(header, 100)
    assert str(caught.value) == f"range {header[:80]!r} is outside the 100 bytes of the blob"
