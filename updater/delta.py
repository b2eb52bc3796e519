"""Delta installs: a chunked release (bundle format 2) assembled from the chunks this device
already holds, fetching only the rest.

The plan (:func:`plan`) looks for each chunk of the new image, by SHA-256, in:

- the install journal (:class:`Journal`): the prefix of the target slot an interrupted install
  of the same release already wrote, flushed and verified; not read again;
- the target slot itself, cut into chunks the way the builder cuts images: a chunk found at
  its own offset is in place (a previous partial download, an unchanged region); a chunk
  found further on is copied from there before the write position reaches it;
- the booted slot (never written: read only);
- otherwise it is fetched: neighbouring missing chunks are one HTTP range of the image blob.

:class:`Assembler` then writes the image front to back. Every chunk is checked against the
index before it is written, whatever its source; a fetched chunk that does not match is
fetched once more, then the install fails. The target is flushed and the journal advanced
every ``flush_bytes``; at the end the slot is read back and must hash to the signed manifest's
``uncompressed_sha256`` before it can be armed. So no byte is trusted because of where it came
from: the journal and the seeds only save work.

Bytes fetched never exceed the stored image (plus its index): each chunk is fetched at most
twice only when the first copy was wrong.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet_core import durable
from image_builder.chunks import Chunk, ChunkIndex, cut, unpack
from image_builder.errors import ImageIntegrityError
from image_builder.manifest import ImageEntry
from updater.errors import DownloadError, InstallError
from updater.fetch import backoff_delay, deadline_guard

if TYPE_CHECKING:
    import requests

JOURNAL_NAME = "install-journal.json"
MAX_RANGE = 16 << 20  # stored bytes per request: bounds what a dropped connection repeats
RECEIVE = 64 << 10
# A slot is larger than its image; its old image is about as large as the new one. Scanning
# twice the new image's size finds what moved without reading a whole 8 GB partition.
SEED_SCAN_FACTOR = 2
# A write may tear the flash page it lands in, bytes flushed before included: the journal
# vouches only for what lies before the page the next write starts in (SD cards and eMMC
# program pages of 16 KiB and more).
TEAR_BYTES = 64 << 10

FETCH, IN_PLACE, MOVED, BOOTED, JOURNALED = "fetch", "in_place", "moved", "booted", "journal"


@dataclass(frozen=True, slots=True)
class Source:
    """Where one chunk's bytes come from: ``kind`` and, for a seed, the file and offset."""

    kind: str
    path: Path | None = None
    offset: int = 0


@dataclass
class Plan:
    """For each chunk of ``index``, its :class:`Source`; what is fetched and what reused."""

    index: ChunkIndex
    chunks: list[Chunk]
    sources: list[Source]
    trusted: int = 0  # the journal's prefix taken as written (:func:`vouchable`)

    def bytes_by_kind(self) -> dict[str, int]:
        totals = dict.fromkeys((FETCH, IN_PLACE, MOVED, BOOTED, JOURNALED), 0)
        for chunk, source in zip(self.chunks, self.sources, strict=True):
            totals[source.kind] += chunk.stored_length if source.kind == FETCH else chunk.length
        return totals

    @property
    def fetch_bytes(self) -> int:
        """Stored bytes to download."""
        return self.bytes_by_kind()[FETCH]

    @property
    def reuse_bytes(self) -> int:
        """Image bytes found on the device (seeds, in place, journal)."""
        totals = self.bytes_by_kind()
        return sum(v for k, v in totals.items() if k != FETCH)

    def ranges(self, max_span: int = MAX_RANGE) -> list[tuple[int, int]]:
        """Runs of neighbouring fetched chunks, as (first chunk, end chunk) numbers, each
        spanning at most ``max_span`` stored bytes (a single larger chunk stands alone)."""
        runs: list[tuple[int, int]] = []
        start: int | None = None
        span = 0
        for number, source in enumerate(self.sources):
            if source.kind != FETCH:
                if start is not None:
                    runs.append((start, number))
                start = None
                continue
            length = self.chunks[number].stored_length
            if start is not None and span + length > max_span:
                runs.append((start, number))
                start = None
            if start is None:
                start, span = number, 0
            span += length
        if start is not None:
            runs.append((start, len(self.sources)))
        return runs


def _scan(
    path: Path, limit: int, wanted: set[bytes], index: ChunkIndex, start: int = 0
) -> Iterator[tuple[bytes, int]]:
    """(SHA-256, offset) of each chunk of ``path`` from ``start`` up to ``limit`` bytes that
    the new image needs, cut as the builder cut it. A seed that cannot be read is no seed."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError:
        return
    with handle:
        size = min(limit, handle.seek(0, os.SEEK_END))

        def read_at(offset: int, length: int) -> bytes:
            return os.pread(handle.fileno(), length, offset)

        if size <= start:
            return
        try:
            for offset, data in cut(
                lambda o, n: read_at(start + o, n), size - start,
                min_size=index.min_size, avg_size=index.avg_size, max_size=index.max_size,
            ):  # fmt: skip
                digest = hashlib.sha256(data).digest()
                if digest in wanted:
                    yield digest, start + offset
        except (OSError, ImageIntegrityError, ValueError):
            return


def plan(
    index: ChunkIndex,
    *,
    target: Path | None = None,
    booted: Path | None = None,
    verified_through: int = 0,
    known: Mapping[Path, ChunkIndex] | None = None,
) -> Plan:
    """Where each chunk of ``index`` comes from (see the module docstring). ``target``: the
    slot being written; ``booted``: the running slot; ``verified_through``: what the journal
    vouches for in the target, of which only :func:`vouchable` is trusted (``Plan.trusted``):
    the rest is looked for in place like any other chunk; ``known``: the chunk indexes of
    what the slots held when this device wrote them (:class:`SlotIndexes`), places to look
    without cutting (every chunk read from there is checked again before it is used).

    Where the ``fastcdc`` package is missing (a device with its distribution's libraries
    only), nothing is cut on the device: the target is checked chunk by chunk at each chunk's
    own offset, and the slots' known indexes are the seeds."""
    chunks = list(index.chunks())
    ends = list(accumulate(chunk.length for chunk in chunks))
    verified_through = vouchable(ends, min(verified_through, index.image_size), resumed=True)
    sources: list[Source | None] = [None] * len(chunks)
    for number, chunk in enumerate(chunks):
        if chunk.offset + chunk.length <= verified_through:
            sources[number] = Source(JOURNALED)
    by_digest: dict[bytes, list[int]] = {}
    for number, chunk in enumerate(chunks):
        if sources[number] is None:
            by_digest.setdefault(chunk.sha256, []).append(number)
    limit = index.image_size * SEED_SCAN_FACTOR
    known = known or {}
    scanning = can_cut()

    def place(number: int, kind: str, path: Path, offset: int) -> None:
        if sources[number] is None or (kind == IN_PLACE and sources[number].kind != IN_PLACE):  # type: ignore[union-attr]
            sources[number] = Source(kind, path, offset)

    if target is not None and by_digest:
        if scanning:
            found = _scan(target, limit, set(by_digest), index, verified_through)
        else:  # no cutting here: each chunk looked for at its own offset
            found = _in_place(target, chunks, sources)
        for digest, offset in found:
            for number in by_digest.get(digest, ()):
                if offset == chunks[number].offset:
                    place(number, IN_PLACE, target, offset)
                elif offset > chunks[number].offset:
                    # still intact when its turn comes: writes stay below the chunk's offset
                    place(number, MOVED, target, offset)
        for old in known.get(target, ChunkIndex((), (), ())).chunks():
            for number in by_digest.get(old.sha256, ()):
                if old.offset > chunks[number].offset:
                    place(number, MOVED, target, old.offset)
    if booted is not None:
        for old in known.get(booted, ChunkIndex((), (), ())).chunks():
            for number in by_digest.get(old.sha256, ()):
                place(number, BOOTED, booted, old.offset)
        missing = {
            d for d, numbers in by_digest.items() if any(sources[n] is None for n in numbers)
        }
        if missing and scanning and booted not in known:
            for digest, offset in _scan(booted, limit, missing, index):
                for number in by_digest[digest]:
                    place(number, BOOTED, booted, offset)
    # The image's last chunk ends where the image ends; in a slot, other bytes follow, so a
    # cut there differs: look for it at its own offset instead.
    last = chunks[-1]
    for kind, path in ((IN_PLACE, target), (BOOTED, booted)):
        if sources[-1] is None and path is not None and _holds(path, last):
            sources[-1] = Source(kind, path, last.offset)
    return Plan(index, chunks, [s or Source(FETCH) for s in sources], verified_through)


def vouchable(ends: Sequence[int], end: int, *, resumed: bool = False) -> int:
    """How much of a slot written and flushed through ``end`` a journal may vouch for: up to
    the last chunk boundary (of ``ends``, the chunks' end offsets) before the flash page
    (:data:`TEAR_BYTES`) that the next write lands in, since a cut during that write may tear
    the whole page, flushed bytes included. The image's end is never written again, unless
    the install is ``resumed`` from there (then the page may be written again: a chunk found
    torn)."""
    if ends and end >= ends[-1] and not resumed:
        return ends[-1]
    limit = end - end % TEAR_BYTES
    number = bisect.bisect_right(ends, limit)
    return ends[number - 1] if number else 0


def can_cut() -> bool:
    """Whether content-defined cutting is available here (the ``fastcdc`` package)."""
    try:
        import fastcdc  # noqa: F401 (only whether it imports)
    except ImportError:
        return False
    return True


def _in_place(
    target: Path, chunks: Sequence[Chunk], sources: Sequence[Source | None]
) -> Iterator[tuple[bytes, int]]:
    """(SHA-256, offset) of what ``target`` holds at the offset of each chunk not yet found."""
    try:
        handle = open(target, "rb")  # noqa: SIM115 (closed below)
    except OSError:
        return
    with handle:
        for chunk, source in zip(chunks, sources, strict=True):
            if source is not None:
                continue
            try:
                data = os.pread(handle.fileno(), chunk.length, chunk.offset)
            except OSError:
                return
            yield hashlib.sha256(data).digest(), chunk.offset


def _holds(path: Path, chunk: Chunk) -> bool:
    """Whether ``path`` holds ``chunk`` at the chunk's own offset."""
    try:
        with open(path, "rb") as handle:
            data = os.pread(handle.fileno(), chunk.length, chunk.offset)
    except OSError:
        return False
    return hashlib.sha256(data).digest() == chunk.sha256


class Journal:
    """``<data_dir>/install-journal.json``: which release is being written into which slot,
    and how much of each image is written, flushed and verified (a prefix, since images are
    written front to back). Replaced whole through the durable-write helper, and only after
    the slot's bytes it vouches for were flushed. Damage makes it count for nothing."""

    def __init__(self, data_dir: Path, log: Any = None) -> None:
        self.path = data_dir / JOURNAL_NAME
        self._log = log

    def _load(self) -> dict[str, Any] | None:
        try:
            document = json.loads(self.path.read_bytes())
        except (OSError, ValueError, RecursionError):
            return None
        return document if isinstance(document, dict) else None

    def _unusable(self, err: OSError) -> None:
        """The journal only saves work: one that cannot be written never fails an install
        (the read-back does not trust it anyway)."""
        if self._log is not None:
            self._log.event("install.journal_unwritable", level="warning", path=str(self.path),
                            error=str(err))  # fmt: skip

    def begin(self, slot: str, release: str) -> dict[str, int]:
        """Start writing ``release`` (its manifest's SHA-256) into ``slot``: what the journal
        vouches for when it is of the same release and slot (image file name -> verified
        bytes), nothing otherwise; a journal of anything else is replaced first, before a
        byte of the slot changes."""
        document = self._load()
        progress: dict[str, int] = {}
        if (
            document is not None
            and document.get("slot") == slot
            and (document.get("release") == release)
        ):
            raw = document.get("verified")
            if isinstance(raw, dict):
                progress = {str(k): v for k, v in raw.items() if type(v) is int and v >= 0}
        self._save(slot, release, progress)
        return progress

    def advance(self, slot: str, release: str, progress: dict[str, int]) -> None:
        self._save(slot, release, progress)

    def finish(self, slot: str, release: str, transfer: dict[str, int]) -> None:
        """The install is armed: nothing is vouched for any more (the next install starts
        afresh), and what the download cost is kept for ``fleet-updater status``."""
        self._save(slot, release, {}, finished=transfer)

    def summary(self) -> dict[str, Any] | None:
        """What ``fleet-updater status`` shows: the install in progress (slot, release,
        bytes verified) or the last one's transfer; None when there is no journal."""
        document = self._load()
        if document is None:
            return None
        verified = document.get("verified")
        finished = document.get("finished")
        return {
            "slot": document.get("slot") if isinstance(document.get("slot"), str) else None,
            "release": (
                document.get("release") if isinstance(document.get("release"), str) else None
            ),
            "verified_bytes": (
                sum(v for v in verified.values() if type(v) is int and v >= 0)
                if isinstance(verified, dict)
                else 0
            ),
            "finished": (
                {k: v for k, v in finished.items() if type(v) is int}
                if isinstance(finished, dict)
                else None
            ),
        }

    def _save(
        self,
        slot: str,
        release: str,
        progress: dict[str, int],
        finished: dict[str, int] | None = None,
    ) -> None:
        document: dict[str, Any] = {
            "format": 1, "slot": slot, "release": release, "verified": progress,
        }  # fmt: skip
        if finished is not None:
            document["finished"] = finished
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            durable.atomic_write(self.path, json.dumps(document, sort_keys=True).encode() + b"\n")
        except OSError as err:
            self._unusable(err)

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        except OSError as err:
            self._unusable(err)
            return
        durable.fsync_dir(self.path.parent)


class SlotIndexes:
    """``<data_dir>/slot-<slot>-<slot class>.chunks``: the chunk index of the image this
    device last wrote into a slot (a JSON header line, then the index), so a later delta
    install knows where the chunks of the running slot are without cutting it. Dropped before
    a slot is written, saved once its image is verified and armed. Only a hint: every chunk
    read from a slot is checked again; a damaged file is no index."""

    def __init__(self, data_dir: Path, log: Any = None) -> None:
        self.data_dir = data_dir
        self._log = log

    def path(self, slot: str, slot_class: str) -> Path:
        return self.data_dir / f"slot-{slot}-{slot_class}.chunks"

    def load(self, slot: str, slot_class: str) -> ChunkIndex | None:
        try:
            data = self.path(slot, slot_class).read_bytes()
            header, _, raw = data.partition(b"\n")
            figures = json.loads(header)
            return ChunkIndex.from_bytes(
                raw, image_size=int(figures["image_size"]),
                stored_size=int(figures["stored_size"]), compression=str(figures["compression"]),
                where=str(self.path(slot, slot_class)),
            )  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, RecursionError, ImageIntegrityError):
            return None

    def save(self, slot: str, entry: ImageEntry, index: ChunkIndex) -> None:
        header = {
            "format": 1, "image_size": entry.uncompressed_size, "stored_size": entry.size,
            "compression": entry.compression,
        }  # fmt: skip
        data = json.dumps(header, sort_keys=True).encode() + b"\n" + index.to_bytes()
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            durable.atomic_write(self.path(slot, entry.slot_class), data)
        except OSError as err:
            self._unusable(err)

    def drop(self, slot: str) -> None:
        """Before ``slot`` is written: what it held is about to change."""
        try:
            paths = list(self.data_dir.glob(f"slot-{slot}-*.chunks"))
            for path in paths:
                path.unlink()
            if paths:
                durable.fsync_dir(self.data_dir)
        except OSError as err:
            self._unusable(err)

    def _unusable(self, err: OSError) -> None:
        if self._log is not None:
            self._log.event("install.slot_index_unwritable", level="warning", error=str(err))


@dataclass
class Counters:
    """Bytes fetched (stored, over the network) and image bytes reused, by source."""

    fetched: int = 0
    refetched: int = 0
    reused: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"fetched": self.fetched, "refetched": self.refetched, "reused": self.reused}


class RangeFetcher:
    """Byte ranges of one blob from its URLs (server, then mirrors), resumed within a range
    after a dropped connection, with the install's deadline and rate limit."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        session: requests.Session | None = None,
        timeout_s: float = 30.0,
        retries: int = 8,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
        verify: bool | str | None = None,
        rate: Any = None,
        log: Any = None,
    ) -> None:
        import requests

        if not urls:
            raise DownloadError("no URL to fetch from")
        self._requests = requests
        self.urls = list(urls)
        self._session = session or requests.Session()
        self._timeout_s = timeout_s
        self._retries = retries
        self._backoff = (backoff_s, max_backoff_s)
        self._deadline = deadline
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._verify = verify
        self._rate = rate  # an updater.bandwidth.RateLimit: every byte received passes it
        self._log = log
        self._url = 0
        self.requests = 0

    @property
    def url(self) -> str:
        return self.urls[self._url]

    def fail_over(self, reason: str, offset: int = 0) -> bool:
        """Leave the current URL for the next one (a host that answered wrong bytes); False
        when it is the last."""
        if self._url + 1 >= len(self.urls):
            return False
        self._url += 1
        if self._log is not None:
            self._log.event("download.mirror", level="warning", failed=reason,
                            next=self.urls[self._url], offset=offset)  # fmt: skip
        return True

    def fetch(self, start: int, length: int) -> Iterator[bytes]:
        """The ``length`` bytes from ``start``, as they arrive.

        A host that answers wrong (another range, the whole resource for a part of it, more
        bytes than asked for, an error status) is left for the next URL; transient failures
        (dropped connections, 5xx) are retried with backoff, resuming within the range.

        Raises:
            DownloadError: every URL gave up, or the install's deadline passed.
        """
        offset, end = start, start + length
        failures = 0
        while offset < end:
            if self._deadline is not None and self._clock() > self._deadline:
                raise DownloadError(f"{self.url}: deadline passed at byte {offset}")
            url = self.url
            try:
                for data in self._get(url, offset, end, whole=start == 0 and offset == 0):
                    offset += len(data)
                    yield data
            except _Retry as err:
                failures += 1
                if failures > self._retries or err.permanent:
                    if not self.fail_over(f"{url}: {err}", offset):
                        raise DownloadError(f"{url}: {err}") from err
                    failures = 0
                    continue
                self._sleep(backoff_delay(failures - 1, *self._backoff, self._rng))

    def _get(self, url: str, offset: int, end: int, *, whole: bool) -> Iterator[bytes]:
        """One request; ``whole``: the range starts at 0, so a host that ignores Range and
        sends the whole resource (200) is fine when the resource is exactly that long."""
        self.requests += 1
        try:
            response = self._session.get(
                url, headers={"Range": f"bytes={offset}-{end - 1}", "Accept-Encoding": "identity"},
                stream=True, timeout=self._timeout_s, verify=self._verify,
            )  # fmt: skip
        except self._requests.RequestException as err:
            raise _Retry(str(err)) from err
        with response, deadline_guard(response, self._deadline, self._clock):
            length = response.headers.get("Content-Length", "")
            if response.status_code == 200:
                if not (whole and length == str(end - offset)):
                    raise _Retry("the host ignores Range requests (200 instead of 206)",
                                 permanent=True)  # fmt: skip
            elif response.status_code != 206:
                raise _Retry(f"HTTP {response.status_code}", permanent=response.status_code < 500
                             and response.status_code not in (408, 429))  # fmt: skip
            else:
                content_range = response.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {offset}-{end - 1}/"):
                    raise _Retry(f"asked for bytes {offset}-{end - 1}, got "
                                 f"{content_range or 'no range'}", permanent=True)  # fmt: skip
            received = 0
            try:
                for data in response.iter_content(RECEIVE):
                    if received + len(data) > end - offset:
                        raise _Retry("more bytes than the range asked for", permanent=True)
                    if self._rate is not None:
                        self._rate.take(len(data))
                    received += len(data)
                    yield data
            except (self._requests.RequestException, OSError, ValueError) as err:
                if self._deadline is not None and self._clock() > self._deadline:
                    raise DownloadError(
                        f"{url}: deadline passed at byte {offset + received}"
                    ) from err
                raise _Retry(str(err) or type(err).__name__) from err
            if received < end - offset:
                raise _Retry(f"connection ended at byte {offset + received} of {end}")


class ReadBackError(ImageIntegrityError):
    """The assembled slot, read back, does not hash to the manifest although every chunk was
    checked before it was written: the journal vouched for bytes the slot does not hold (a torn
    page), or the disk changed them."""


class _Retry(Exception):
    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Assembler:
    """Writes one image into its slot by a :class:`Plan` (see the module docstring)."""

    def __init__(
        self,
        entry: ImageEntry,
        plan: Plan,
        fetcher: RangeFetcher,
        *,
        check: Callable[[], None],
        progress: Callable[[int], None],
        flushed: Callable[[int], None],
        flush_bytes: int,
    ) -> None:
        self.entry = entry
        self.plan = plan
        self.fetcher = fetcher
        self._check = check
        self._progress = progress
        self._flushed = flushed
        self._flush_bytes = flush_bytes
        self._ends = list(accumulate(chunk.length for chunk in plan.chunks))
        self.counters = Counters()

    def write(self, target: Path) -> int:
        """Assemble the image into ``target``; return its size once read back and verified.

        Raises:
            InstallError: a chunk wrong twice, a write or flush failing, or the slot not
                hashing to the manifest at the end.
            DownloadError: as :meth:`RangeFetcher.fetch`.
        """
        durable.boundary("slot:begin", target)
        try:
            fd = os.open(target, os.O_RDWR)
        except OSError as err:
            raise InstallError(f"slot {target}: cannot open: {err.strerror}") from err
        try:
            self._assemble(fd, target)
            self._read_back(fd, target)
        finally:
            os.close(fd)
        durable.boundary("slot:done", target)
        return self.entry.uncompressed_size

    def _assemble(self, fd: int, target: Path) -> None:
        plan, chunks = self.plan, self.plan.chunks
        runs = {first: end for first, end in plan.ranges()}
        unflushed = 0
        number = 0
        while number < len(chunks):
            self._check()
            source = plan.sources[number]
            if number in runs:
                end = runs[number]
                for got, data in self._fetch_run(number, end):
                    self._check()
                    unflushed += self._put(fd, target, chunks[got], data)
                    if unflushed >= self._flush_bytes:
                        unflushed = self._flush(fd, target, chunks[got])
                number = end
                continue
            chunk = chunks[number]
            if source.kind in (JOURNALED, IN_PLACE):
                self._reused(source.kind, chunk.length)
                self._progress(chunk.length)  # in place already: nothing to write
            else:
                seed = self._read_seed(source, chunk)
                if seed is None:  # the seed changed since it was scanned
                    seed = self._fetch_one(chunk)
                else:
                    self._reused(source.kind, chunk.length)
                unflushed += self._put(fd, target, chunk, seed)
            if unflushed >= self._flush_bytes:
                unflushed = self._flush(fd, target, chunk)
            number += 1
        self._flush(fd, target, chunks[-1])

    def _reused(self, kind: str, length: int) -> None:
        self.counters.reused[kind] = self.counters.reused.get(kind, 0) + length

    def _read_seed(self, source: Source, chunk: Chunk) -> bytes | None:
        assert source.path is not None  # noqa: S101 (seeds have paths: plan())
        try:
            with open(source.path, "rb") as handle:
                data = os.pread(handle.fileno(), chunk.length, source.offset)
        except OSError:
            return None
        return data if hashlib.sha256(data).digest() == chunk.sha256 else None

    def _fetch_run(self, first: int, end: int) -> Iterator[tuple[int, bytes]]:
        """The chunks ``first`` to ``end`` (exclusive) fetched in one range, each checked."""
        chunks = self.plan.chunks
        start = chunks[first].stored_offset
        length = chunks[end - 1].stored_offset + chunks[end - 1].stored_length - start
        buffer = bytearray()
        number = first
        for data in self.fetcher.fetch(start, length):
            self.counters.fetched += len(data)
            buffer += data
            while number < end and len(buffer) >= chunks[number].stored_length:
                size = chunks[number].stored_length
                stored = bytes(buffer[:size])
                del buffer[:size]
                yield number, self._checked(chunks[number], stored)
                number += 1

    def _fetch_one(self, chunk: Chunk) -> bytes:
        stored = b"".join(self.fetcher.fetch(chunk.stored_offset, chunk.stored_length))
        self.counters.fetched += len(stored)
        return self._checked(chunk, stored)

    def _checked(self, chunk: Chunk, stored: bytes) -> bytes:
        """The chunk's bytes; a copy that does not match is fetched once more, from the next
        URL when there is one (the host that sent it is not trusted twice)."""
        try:
            return unpack(stored, chunk, self.entry.compression)
        except ImageIntegrityError as err:
            self.fetcher.fail_over(f"{self.fetcher.url}: {err}", chunk.stored_offset)
        again = b"".join(self.fetcher.fetch(chunk.stored_offset, chunk.stored_length))
        self.counters.refetched += len(again)
        self.counters.fetched += len(again)
        try:
            return unpack(again, chunk, self.entry.compression)
        except ImageIntegrityError as err:
            # the manifest is signed: the hosts, not the release, are at fault (fetched again
            # later: updater.daemon)
            raise ImageIntegrityError(
                f"{self.entry.filename}: wrong bytes twice for the chunk at byte {chunk.offset}: "
                f"{err}"
            ) from err

    def _put(self, fd: int, target: Path, chunk: Chunk, data: bytes) -> int:
        view = memoryview(data)
        offset = chunk.offset
        try:
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as err:
            raise InstallError(f"slot {target}: write failed: {err.strerror}") from err
        self._progress(chunk.length)
        return chunk.length

    def _flush(self, fd: int, target: Path, last: Chunk) -> int:
        durable.boundary("slot:before-flush", target)
        try:
            os.fdatasync(fd)
        except OSError as err:
            raise InstallError(f"slot {target}: flush failed: {err.strerror}") from err
        self._flushed(vouchable(self._ends, last.offset + last.length))
        return 0

    def _read_back(self, fd: int, target: Path) -> None:
        digest = hashlib.sha256()
        offset, size = 0, self.entry.uncompressed_size
        while offset < size:
            data = os.pread(fd, min(4 << 20, size - offset), offset)
            if not data:
                break
            digest.update(data)
            offset += len(data)
        if offset != size or digest.hexdigest() != self.entry.uncompressed_sha256:
            # every chunk was checked before it was written: the device's own disk (a torn
            # page, a journal that vouched wrongly) is at fault, not the release
            raise ReadBackError(
                f"slot {target}: the assembled {self.entry.filename} does not match the signed "
                "manifest"
            )
