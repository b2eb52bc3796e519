"""Delta installs (updater.delta): a chunked release assembled from what the device holds,
against a real HTTP host on loopback that can misbehave: drop connections, ignore Range,
answer other ranges, serve wrong bytes."""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chaos.lab_firmwares  # noqa: F401 (fills LAB_FIRMWARES)
from chaos.virtual_device import VirtualDevice
from image_builder.bundle_writer import ImageSource, create_bundle
from image_builder.chunks import ChunkIndex, store_image
from signing.keyring import trust_key
from signing.keys import SigningKey, public_key_pem
from tests.server_simulator import split_bundle
from updater.delta import JOURNAL_NAME, Assembler, Journal, plan
from updater.errors import InstallError
from updater.install import InstallResult

SLOT = 8 << 20


def image_bytes(size: int, seed: int) -> bytes:
    """File-system-like content: random stretches and repeated text, every chunk size."""
    rng = random.Random(seed)  # noqa: S311 (test data, not a secret)
    parts: list[bytes] = []
    total = 0
    while total < size:
        part = rng.randbytes(rng.randrange(1000, 150_000))
        if rng.random() < 0.3:
            part = b"line %d of a config file\n" % rng.randrange(10**6) * rng.randrange(10, 3000)
        parts.append(part)
        total += len(part)
    return b"".join(parts)[:size]


def patched(base: bytes, seed: int = 9) -> bytes:
    """``base`` after a patch release: a region rewritten, bytes inserted (all later data
    shifts), a region deleted."""
    rng = random.Random(seed)  # noqa: S311 (test data, not a secret)
    data = bytearray(base)
    data[3_000_000:3_040_000] = rng.randbytes(40_000)
    data[1_000_000:1_000_000] = rng.randbytes(7_777)
    del data[5_000_000:5_003_000]
    return bytes(data)


@dataclass
class Host:
    """Blobs over HTTP with Range, and the faults a test asks for."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    sent: int = 0
    ranges: list[str] = field(default_factory=list)
    ignore_range: bool = False
    wrong_range: bool = False
    corrupt: set[int] = field(default_factory=set)  # answers (0: the first) with a byte flipped
    corrupt_all: bool = False
    answers: int = 0
    fail_after: int | None = None  # bytes served before the connection drops, then 500s
    drip_s: float | None = None  # seconds between the bytes of a range's body (a slow host)

    def serve(self) -> Iterator[str]:
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                data = host.blobs.get(self.path.removeprefix("/blobs/"))
                if data is None:
                    self.send_error(404)
                    return
                if host.fail_after is not None and host.sent >= host.fail_after:
                    self.send_error(500)
                    return
                wanted = self.headers.get("Range")
                host.ranges.append(wanted or "")
                start, end = 0, len(data)
                if wanted and not host.ignore_range:
                    first, _, last = wanted.removeprefix("bytes=").partition("-")
                    start, end = int(first), int(last) + 1
                    if host.wrong_range:
                        start, end = start + 1, end + 1
                body = bytearray(data[start:end])
                if (host.corrupt_all or host.answers in host.corrupt) and body:
                    body[len(body) // 2] ^= 0xFF
                host.answers += 1
                self.send_response(200 if not wanted or host.ignore_range else 206)
                if wanted and not host.ignore_range:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if host.fail_after is not None and host.sent + len(body) > host.fail_after:
                    body = body[: host.fail_after - host.sent]  # then the connection drops
                    self.close_connection = True
                host.sent += len(body)
                if host.drip_s is not None and wanted and len(body) > 10_000:
                    import time

                    try:
                        for at in range(len(body)):
                            self.wfile.write(bytes(body[at : at + 1]))
                            self.wfile.flush()
                            time.sleep(host.drip_s)
                    except OSError:
                        return
                    return
                self.wfile.write(bytes(body))

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


@pytest.fixture
def host() -> Iterator[tuple[Host, str]]:
    state = Host()
    for url in state.serve():
        yield state, url


@dataclass
class Lab:
    device: VirtualDevice
    root: Path
    key: SigningKey
    host: Host
    url: str

    def release(self, image: bytes, version: str, compression: str = "zstd") -> tuple:
        source = self.root / f"{version}.img"
        source.write_bytes(image)
        bundle = self.root / f"{version}.bundle"
        create_bundle(
            bundle, images=[ImageSource("rootfs", source)], keys=[self.key], compatible="lab",
            version=version, security_version=1, compression=compression,
            created=1_700_000_000,
        )  # fmt: skip
        manifest, signatures, blobs = split_bundle(bundle)
        self.host.blobs.update(blobs)
        urls = {sha: [f"{self.url}/blobs/{sha}"] for sha in blobs}
        return manifest, signatures, urls

    def install(self, release: tuple, **options: Any) -> InstallResult:
        installer = self.device.runtime().installer(
            http_options={"sleep": lambda s: None, "retries": 1}, **options
        )
        return installer.install_parts(*release, reboot=False)

    def slot(self, slot: str, size: int) -> bytes:
        with self.device.slot_path(slot).open("rb") as handle:
            return handle.read(size)

    def events(self, name: str) -> list[dict[str, Any]]:
        return self.device.events(name)


@pytest.fixture
def lab(tmp_path: Path, key: SigningKey, host: tuple[Host, str]) -> Lab:
    device = VirtualDevice(tmp_path / "device", "grub", plain_images=True,
                           slot_sizes={"rootfs": SLOT}, compatible="lab")  # fmt: skip
    (tmp_path / "release.pub").write_bytes(public_key_pem(key.public_key))
    trust_key(tmp_path / "device" / "keyring", tmp_path / "release.pub")
    return Lab(device, tmp_path, key, *host)


BASE = image_bytes(6_000_000, seed=1)


def provisioned(lab: Lab, image: bytes = BASE) -> Lab:
    lab.device.provision(image, "1.0.0")
    return lab


def test_a_patch_release_fetches_a_few_percent_and_the_slot_is_the_new_image(lab: Lab) -> None:
    provisioned(lab)
    new = patched(BASE)
    release = lab.release(new, "2.0.0")
    stored = sum(len(lab.host.blobs[sha]) for sha in release[2])
    result = lab.install(release)
    assert lab.slot("b", len(new)) == new
    assert lab.device.state().slot("b").status == "trial"
    assert result.bytes_fetched is not None and result.bytes_reused is not None
    assert result.bytes_fetched == lab.host.sent
    assert lab.host.sent < 0.10 * stored, (lab.host.sent, stored)
    assert result.bytes_reused > 0.9 * len(new)
    [planned] = lab.events("install.delta_planned")
    assert planned["found"]["booted"] > 0.9 * len(new)
    assert all(r.startswith("bytes=") and r.count("-") == 1 for r in lab.host.ranges)
    # once armed, the journal vouches for nothing and keeps what the download cost
    summary = Journal(lab.root / "device" / "data").summary()
    assert summary is not None and summary["verified_bytes"] == 0
    images = sum(image["size"] for image in json.loads(release[0])["images"])
    assert summary["finished"] == {
        "fetched": result.bytes_fetched, "reused": result.bytes_reused, "stored": images,
    }  # fmt: skip
    manifest_sha = hashlib.sha256(release[0]).hexdigest()
    assert Journal(lab.root / "device" / "data").begin("b", manifest_sha) == {}


def test_the_same_image_again_costs_only_its_index(lab: Lab) -> None:
    provisioned(lab)
    release = lab.release(BASE, "2.0.0")
    result = lab.install(release)
    [planned] = lab.events("install.delta_planned")
    assert planned["fetch_bytes"] == 0
    index_size = planned["chunks"] * 40 + 28
    assert lab.host.sent == index_size == result.bytes_fetched
    assert lab.slot("b", len(BASE)) == BASE


def test_a_release_with_nothing_in_common_is_installed_as_one_stream(lab: Lab) -> None:
    provisioned(lab)
    other = image_bytes(6_000_000, seed=77)
    release = lab.release(other, "2.0.0")
    stored = sum(len(data) for data in lab.host.blobs.values() if data)
    result = lab.install(release)
    assert lab.slot("b", len(other)) == other
    assert result.bytes_reused == 0
    assert result.bytes_fetched is not None and result.bytes_fetched <= stored
    assert lab.host.sent <= stored  # never more than the stored image plus its index
    assert not lab.events("install.delta_written")


def test_wrong_bytes_twice_fail_the_install_cleanly_with_the_slot_marked_bad(lab: Lab) -> None:
    provisioned(lab)
    new = patched(BASE)
    release = lab.release(new, "2.0.0")
    lab.host.corrupt = set(range(1, 10**4))  # every answer after the index
    with pytest.raises(InstallError, match="wrong bytes twice for the chunk at byte"):
        lab.install(release)
    # the first range, then the chunk it was wrong in, once more: no third attempt
    assert len(lab.host.ranges) == 3
    assert lab.device.state().slot("b").status == "bad"
    assert lab.slot("a", len(BASE)) == BASE
    assert lab.device.runtime().backend.primary() == "a"


def test_a_corrupted_range_is_fetched_again_and_the_install_succeeds(lab: Lab) -> None:
    provisioned(lab)
    new = patched(BASE)
    release = lab.release(new, "2.0.0")
    lab.host.corrupt = {1}  # answer 0 is the index; answer 1 the first range of the image
    result = lab.install(release)
    assert lab.slot("b", len(new)) == new
    [written] = lab.events("install.delta_written")
    assert 0 < written["refetched"] <= 256 << 10
    assert result.bytes_fetched == lab.host.sent


def test_a_host_that_ignores_range_fails_the_install_clearly(lab: Lab) -> None:
    """The index comes whole (a 200 for all of it is fine), then the image's ranges cannot."""
    provisioned(lab)
    release = lab.release(patched(BASE), "2.0.0")
    lab.host.ignore_range = True
    with pytest.raises(InstallError, match="ignores Range requests"):
        lab.install(release)
    assert lab.slot("a", len(BASE)) == BASE
    assert lab.device.runtime().backend.primary() == "a"


def test_a_host_that_answers_other_ranges_is_installed_from_as_one_stream(lab: Lab) -> None:
    """Planning fails before the slot is touched (the index comes back wrong): the install
    takes the whole image as one stream instead, which needs no ranges."""
    provisioned(lab)
    new = patched(BASE)
    release = lab.release(new, "2.0.0")
    lab.host.wrong_range = True
    lab.install(release)
    assert lab.slot("b", len(new)) == new
    [unavailable] = lab.events("install.delta_unavailable")
    assert "asked for bytes 0-" in unavailable["error"]


def test_a_host_that_serves_wrong_bytes_is_left_for_the_next_url(lab: Lab) -> None:
    """A mirror that corrupts what it sends costs one range: the chunk is fetched again from
    the next URL, which serves the rest."""
    provisioned(lab)
    new = patched(BASE)
    manifest, signatures, urls = lab.release(new, "2.0.0")
    good = Host(blobs=lab.host.blobs)
    for good_url in good.serve():
        lab.host.corrupt = set(range(1, 10**4))  # every answer after the index
        with_mirror = {sha: [*first, f"{good_url}/blobs/{sha}"] for sha, first in urls.items()}
        lab.install((manifest, signatures, with_mirror))
        assert lab.slot("b", len(new)) == new
        assert good.sent > 0
        assert [e["next"] for e in lab.events("download.mirror")][:1] == [
            f"{good_url}/blobs/{json.loads(manifest)['images'][0]['sha256']}"
        ]


def test_a_slow_host_cannot_keep_an_install_past_its_deadline(lab: Lab) -> None:
    """A host that drips a byte now and then never trips a socket timeout; the install's
    deadline cuts it all the same."""
    import dataclasses
    import time

    provisioned(lab)
    config = lab.device.config
    lab.device.config = dataclasses.replace(
        config, limits=dataclasses.replace(config.limits, update_deadline_s=3)
    )
    release = lab.release(patched(BASE), "2.0.0")
    lab.host.drip_s = 0.05
    began = time.monotonic()
    with pytest.raises(InstallError, match="deadline"):
        lab.install(release)
    assert time.monotonic() - began < 10
    assert lab.device.state().slot("b").status == "bad"


def test_progress_counts_each_byte_of_the_image_once(lab: Lab) -> None:
    provisioned(lab)
    new = patched(BASE)
    seen: list[tuple[int, int]] = []
    installer = lab.device.runtime().installer(
        http_options={"sleep": lambda s: None},
        progress=lambda done, total: seen.append((done, total)),
    )
    result = installer.install_parts(*lab.release(new, "2.0.0"), reboot=False)
    assert seen[-1] == (len(new), len(new)) and result.bytes_written == len(new)
    assert all(done <= total for done, total in seen)


def test_a_journal_that_cannot_be_written_never_fails_an_install(lab: Lab) -> None:
    provisioned(lab)
    (lab.root / "device" / "data" / JOURNAL_NAME).mkdir()
    new = patched(BASE)
    lab.install(lab.release(new, "2.0.0"))
    assert lab.slot("b", len(new)) == new
    assert lab.events("install.journal_unwritable")


def test_a_resumed_install_trusts_the_journal_only_up_to_the_page_it_writes_next() -> None:
    """The journal vouches up to V; the next write lands in V's flash page, and a cut during
    it may tear the bytes before V: only the chunks before that page are taken as written."""
    from updater.delta import TEAR_BYTES, vouchable

    ends = list(range(20_000, 2_000_000, 20_000))
    assert vouchable(ends, 3 * TEAR_BYTES + 100) == 180_000  # the chunk boundary before it
    assert vouchable(ends, 3 * TEAR_BYTES) == 180_000
    assert vouchable(ends, ends[-1]) == ends[-1]  # the end is never written again ...
    assert vouchable(ends, ends[-1], resumed=True) < ends[-1]  # ... unless resumed from it
    assert vouchable(ends, 100) == 0


def test_a_dead_network_mid_download_resumes_from_the_journal(lab: Lab) -> None:
    provisioned(lab)
    new = patched(BASE, seed=4) + random.Random(5).randbytes(2_000_000)  # noqa: S311 (2 MB to fetch)
    release = lab.release(new, "2.0.0")
    lab.host.fail_after = 1_200_000
    with pytest.raises(InstallError, match="HTTP 500"):
        lab.install(release, flush_bytes=256 << 10)
    journal = Journal(lab.root / "device" / "data")
    document = journal._load()
    assert document is not None and document["slot"] == "b"
    [verified] = document["verified"].values()
    assert verified > 1_000_000
    first = lab.host.sent
    lab.host.fail_after = None
    result = lab.install(release, flush_bytes=256 << 10)
    assert lab.slot("b", len(new)) == new
    planned = lab.events("install.delta_planned")[-1]
    # trusted up to the flash page the next write lands in, the rest found in place again
    found = planned["found"]
    assert verified - (320 << 10) <= found["journal"] < verified
    assert found["journal"] + found["in_place"] >= verified
    assert result.bytes_fetched is not None
    # what the first attempt verified is not fetched again
    first_planned = lab.events("install.delta_planned")[0]["fetch_bytes"]
    index = planned["chunks"] * 40 + 28
    # lost: at most the bytes after the last flush (256 KiB) and the chunk cut short
    lost = (256 << 10) + (256 << 10)
    assert planned["fetch_bytes"] <= first_planned - (first - index) + lost
    assert first + result.bytes_fetched <= first_planned + 2 * index + lost


def test_a_journal_that_vouches_for_wrong_bytes_fails_the_install_at_the_read_back(
    lab: Lab,
) -> None:
    """The journal only saves work: a slot that does not hash to the manifest at the end is
    never armed, whatever the journal said, and the journal is dropped."""
    provisioned(lab)
    new = patched(BASE)
    release = lab.release(new, "2.0.0")
    manifest_sha = hashlib.sha256(release[0]).hexdigest()
    Journal(lab.root / "device" / "data").advance("b", manifest_sha, {"rootfs.img.zst": 2 << 20})
    with pytest.raises(InstallError, match="does not match the signed manifest"):
        lab.install(release)
    assert lab.device.state().slot("b").status == "bad"
    assert not (lab.root / "device" / "data" / JOURNAL_NAME).exists()
    lab.install(release)  # the next attempt does not trust it
    assert lab.slot("b", len(new)) == new


def test_a_journal_of_another_release_or_slot_counts_for_nothing(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.advance("b", "r1", {"rootfs.img": 5000})
    assert journal.begin("b", "r2") == {}
    journal.advance("b", "r2", {"rootfs.img": 7000})
    assert journal.begin("a", "r2") == {}
    journal.advance("a", "r2", {"rootfs.img": 9000})
    assert journal.begin("a", "r2") == {"rootfs.img": 9000}
    (tmp_path / JOURNAL_NAME).write_bytes(b"\x00garbage")
    assert journal.begin("a", "r2") == {}
    (tmp_path / JOURNAL_NAME).write_text('{"slot": "a", "release": "r2", "verified": {"x": -5}}')
    assert journal.begin("a", "r2") == {}


class Fetcher:
    """Serves ranges of a stored image from memory, counting bytes."""

    def __init__(self, stored: bytes) -> None:
        self.stored = stored
        self.fetched = 0

    def fetch(self, start: int, length: int) -> Iterator[bytes]:
        data = self.stored[start : start + length]
        self.fetched += len(data)
        yield data


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 10**6),
    edits=st.lists(
        st.tuples(st.integers(0, 400_000), st.integers(0, 30_000), st.integers(0, 30_000)),
        max_size=6,
    ),
    verified_chunks=st.integers(0, 5),
    shift=st.integers(-200_000, 200_000),
)
def test_any_plan_assembles_exactly_the_new_image(
    tmp_path: Path,
    seed: int,
    edits: list[tuple[int, int, int]],
    verified_chunks: int,
    shift: int,
) -> None:
    """Whatever the booted and target slots hold, and however far a journal says the target
    is written, the assembled slot is the new image, and nothing is fetched twice."""
    rng = random.Random(seed)  # noqa: S311 (test data, not a secret)
    old = image_bytes(500_000, seed)
    new = bytearray(old)
    for at, delete, insert in edits:
        new[at : at + delete] = rng.randbytes(insert)
    new_image = bytes(new) or b"x"
    import io

    out = io.BytesIO()
    stored = store_image(io.BytesIO(new_image), len(new_image), out, "zstd")
    index = ChunkIndex.from_bytes(
        stored.index.to_bytes(), image_size=len(new_image), stored_size=stored.size,
        compression="zstd", where="t",
    )  # fmt: skip
    booted = tmp_path / f"booted-{seed}"
    booted.write_bytes(old)
    target = tmp_path / f"target-{seed}"
    # the target: a previous partial write of the new image, then an older image moved by
    # ``shift``: chunks the new image needs sit before and after their new offsets
    chunks = list(index.chunks())
    through = sum(c.length for c in chunks[:verified_chunks])
    older = bytes(max(0, shift)) + old[max(0, -shift) :]
    target.write_bytes(new_image[:through] + older[through:] + image_bytes(100_000, seed + 1))
    the_plan = plan(index, target=target, booted=booted, verified_through=through)
    from image_builder.manifest import ImageEntry

    entry = ImageEntry("rootfs", "rootfs.img.zst", "zstd", stored.size, stored.sha256,
                       len(new_image), stored.uncompressed_sha256)  # fmt: skip
    fetcher = Fetcher(out.getvalue())
    assembler = Assembler(
        entry, the_plan, fetcher,  # type: ignore[arg-type]
        check=lambda: None, progress=lambda n: None, flushed=lambda n: None, flush_bytes=1 << 16,
    )  # fmt: skip
    assembler.write(target)
    assert target.read_bytes()[: len(new_image)] == new_image
    assert fetcher.fetched == the_plan.fetch_bytes <= stored.size
    assert hashlib.sha256(new_image).hexdigest() == stored.uncompressed_sha256


def status(lab: Lab, *args: str) -> str:
    from click.testing import CliRunner

    from updater.cli import main

    config = lab.root / "updater.toml"
    config.write_text(lab.device.config_toml())
    result = CliRunner().invoke(main, ["--config", str(config), "status", *args])
    return result.output


def test_status_shows_what_the_last_download_cost_and_a_download_in_progress(lab: Lab) -> None:
    provisioned(lab)
    assert "transfer:" not in status(lab)
    new = patched(BASE)
    release = lab.release(new, "2.0.0")
    result = lab.install(release)
    text = status(lab)
    assert f"{result.bytes_fetched} bytes fetched (" in text
    assert f"{result.bytes_reused} bytes found on the device" in text
    document = json.loads(status(lab, "--json"))
    assert document["transfer"]["finished"]["fetched"] == result.bytes_fetched
    Journal(lab.root / "device" / "data").advance("b", "ab" * 32, {"rootfs.img.zst": 12345})
    assert "release abababababab into slot b: 12345 bytes written and verified" in status(lab)


def test_every_byte_of_a_delta_download_passes_the_rate_limit(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from updater.bandwidth import RateLimit

    taken: list[int] = []
    monkeypatch.setattr(RateLimit, "take", lambda self, n: taken.append(n))
    provisioned(lab)
    lab.device.config = dataclasses.replace(lab.device.config, rate_limit_bytes_per_s=1 << 20)
    release = lab.release(patched(BASE), "2.0.0")
    result = lab.install(release)
    assert lab.events("install.delta_written")
    assert sum(taken) == lab.host.sent == result.bytes_fetched


def test_a_cut_during_the_first_write_after_a_resume_never_tears_what_the_journal_keeps(
    lab: Lab,
) -> None:
    """The journal vouches up to V, mid flash page, and nothing after V is in place: the
    resumed install writes at V first. A cut then may tear V's page, bytes before V included;
    the journal must no longer vouch for them by then, so the next attempt succeeds."""
    import contextlib

    from chaos.virtual_device import PowerCut, PowerSwitch
    from image_builder.chunks import ChunkIndex
    from updater.delta import TEAR_BYTES

    provisioned(lab)
    new = patched(BASE) + random.Random(8).randbytes(1_000_000)  # noqa: S311 (test data)
    release = lab.release(new, "2.0.0")
    manifest = json.loads(release[0])
    [entry] = manifest["images"]
    index_sha = entry["chunk_index"]["sha256"]
    index = ChunkIndex.from_bytes(
        lab.host.blobs[index_sha], image_size=len(new), stored_size=entry["size"],
        compression="zstd", where="t",
    )  # fmt: skip
    ends = [c.offset + c.length for c in index.chunks()]
    vouched = next(e for e in ends if e > 4 * TEAR_BYTES and e % TEAR_BYTES > 4096)
    with lab.device.slot_path("b").open("r+b") as slot:
        slot.write(new[:vouched] + bytes(len(new) - vouched))  # after V: nothing in place
    lab.device.store.save(lab.device.state().with_slot("b", status="installing", version="2.0.0"))
    manifest_sha = hashlib.sha256(release[0]).hexdigest()
    Journal(lab.root / "device" / "data").advance("b", manifest_sha, {entry["filename"]: vouched})

    with (
        PowerSwitch(cut_at_first="slot:before-flush").installed() as cut,
        contextlib.suppress(PowerCut),
    ):
        lab.install(release, flush_bytes=64 << 10)
    assert cut.off
    torn = lab.slot("b", len(new))
    page = vouched - vouched % TEAR_BYTES
    assert torn[page:vouched] != new[page:vouched]  # the cut tore bytes the journal had kept
    lab.install(release)
    assert lab.slot("b", len(new)) == new


def test_without_fastcdc_a_device_finds_chunks_through_the_indexes_it_kept(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device with Debian's libraries only cannot cut: the index it saved when it wrote its
    running slot says where that slot's chunks are, and the target is checked chunk by chunk
    at each chunk's own offset."""
    from bootloader_hooks.base import BootCause, BootEvent
    from updater import delta
    from updater.delta import SlotIndexes

    monkeypatch.setattr(delta, "can_cut", lambda: False)
    provisioned(lab)
    # 1.1.0 installed and committed by the updater: its index is kept for slot b
    installer = lab.device.runtime().installer(http_options={"sleep": lambda s: None})
    installer.install_parts(*lab.release(BASE, "1.1.0"), reboot=True)
    assert lab.device.pending_reboot is not None
    lab.device.settle(BootEvent(BootCause.REBOOT, tuple(lab.device.pending_reboot)))
    assert lab.device.runtime().backend.booted() == "b"
    assert SlotIndexes(lab.root / "device" / "data").load("b", "rootfs") is not None
    new = patched(BASE)
    release = lab.release(new, "2.0.0")
    stored = len(lab.host.blobs[json.loads(release[0])["images"][0]["sha256"]])
    lab.host.sent = 0
    result = lab.install(release)
    assert lab.slot("a", len(new)) == new
    planned = lab.events("install.delta_planned")[-1]
    assert planned["found"]["booted"] > 0.5 * len(new)
    assert planned["found"]["booted"] + planned["found"]["in_place"] > 0.9 * len(new)
    assert result.bytes_fetched is not None and result.bytes_fetched < 0.2 * stored
    # a slot about to be written loses its index; the new one is kept once armed
    assert SlotIndexes(lab.root / "device" / "data").load("a", "rootfs") is not None
