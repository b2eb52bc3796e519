#!/usr/bin/env python3
"""Delta updates side by side: how many bytes a device downloads to go from one release image to
the next, with our chunk index, with casync and with zchunk.

Image pairs are ext4 root filesystems built by ``fleet image rootfs`` (1 GiB, SOURCE_DATE_EPOCH
fixed) from Debian trees built by ``mmdebstrap`` (minbase + python3, deb.debian.org):

  a  patch release: one package upgraded from bookworm-security (libssl3)
  b  ten packages upgraded from bookworm-security (the Python 3.11 runtime, libssl3, zlib,
     xz, zstd, expat, tzdata)
  c  a new major distribution: bookworm -> trixie, the same package list
  d  identical: the same tree built twice

The package versions really installed are read from each tree and printed, since the archive
moves on. ``--synthetic`` builds small pairs of the same shapes from generated trees instead
(no network, seconds): the smoke test runs it.

For each pair and tool: bytes downloaded (the chunks the device lacks) as % of the reference,
the full new image compressed with ``zstd -3``; the tool's own full size; its index size (which
a device downloads too); wall time and peak RSS of making the index and store (the release
side) and of the delta (the device side); every step runs in its own process, measured by
``os.wait4``.

- ours: ``image_builder.chunks.store_image`` then ``updater.delta.plan`` with the old image as
  seed (the booted slot). While ``updater.delta`` is not there, the plan is worked out here
  from the same index and the seed's chunks (marked "interim").
- casync: ``casync make`` (its defaults, and ``--chunk-size=64K``), then a real
  ``casync extract --seed=OLD`` against the store served over HTTP on loopback, counting the
  bytes served; the output is checked against the new image.
- zchunk: ``zck`` on both images, ``zck_delta_size`` (its figure includes the header, which is
  given apart here as the index).

casync's default chunk size is 64K already; both rows are kept so that stays checked. Its
delta time includes writing the whole new image; ours is the plan alone (reading the seed),
zchunk's compares two headers.

Where our download is more than the aim, the changed bytes are attributed to ext4 regions
(superblocks and group descriptors, bitmaps, inode tables, journal, blocks in use, free
blocks) by ``dumpe2fs``: that says what the filesystem changed besides the package's files.

    python benchmarks/delta_size.py [--pairs a,b,c,d] [--workdir DIR] [--synthetic] [--explain]
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import http.server
import importlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

FLEET = [sys.executable, "-c", "from fleet_core.cli import main; main()"]
SCRIPT = Path(__file__).resolve()
EPOCH = "1700000000"  # 2023-11-14: every tree and image is built with this SOURCE_DATE_EPOCH
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
BLOCK = 4096
MiB = 1 << 20
IN_USE = "in use (files, directories)"
# The aims, judged on chunks + index: a patch release costs at most 5 % of the whole image, and
# no other tool sends less than ours by more than 10 % (relative) for (a) and (b).
AIM_PATCH_PERCENT = 5.0
AIM_RELATIVE = 1.10


# --- the image pairs ------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeSpec:
    """A Debian tree: its cache name, suite and the packages asked for beyond minbase."""

    name: str
    suite: str
    include: tuple[str, ...]


@dataclass(frozen=True)
class Pair:
    title: str
    old: TreeSpec
    new: TreeSpec


def _security(*packages: str) -> tuple[str, ...]:
    return tuple(f"{package}/bookworm-security" for package in packages)


BOOKWORM = TreeSpec("bookworm", "bookworm", ("python3",))
# (b): the Python 3.11 runtime (four packages), libssl3, zlib, xz, zstd, expat and tzdata
TEN = ("python3.11", "python3.11-minimal", "libpython3.11-stdlib", "libpython3.11-minimal",
       "libssl3", "zlib1g", "liblzma5", "libzstd1", "libexpat1", "tzdata")  # fmt: skip
PAIRS = {
    "a": Pair(
        "patch release: libssl3 upgraded (bookworm-security)",
        BOOKWORM,
        TreeSpec("bookworm-a", "bookworm", ("python3", *_security("libssl3"))),
    ),
    "b": Pair(
        "ten packages upgraded (bookworm-security)",
        BOOKWORM,
        TreeSpec("bookworm-b", "bookworm", ("python3", *_security(*TEN))),
    ),
    "c": Pair(
        "new distribution: bookworm -> trixie, the same packages asked for",
        BOOKWORM,
        TreeSpec("trixie", "trixie", ("python3",)),
    ),
    "d": Pair(
        "identical: the same tree built twice",
        BOOKWORM,
        TreeSpec("bookworm-again", "bookworm", ("python3",)),
    ),
}


def sources(suite: str) -> list[str]:
    """The same three archives for every tree of a suite, so two trees differ only in what
    was asked for; apt prefers the release itself (Default-Release) over its updates."""
    return [
        f"deb {MIRROR} {suite} main",
        f"deb {MIRROR} {suite}-updates main",
        f"deb {SECURITY} {suite}-security main",
    ]


def build_tree(spec: TreeSpec, trees: Path) -> Path:
    """The tree of ``spec`` under ``trees``, built by mmdebstrap unless already there."""
    target = trees / spec.name
    done = trees / f"{spec.name}.done"
    if done.exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    argv = [
        "mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(spec.include)}",
        f'--aptopt=APT::Default-Release "{spec.suite}"', spec.suite, str(target),
        *sources(spec.suite),
    ]  # fmt: skip
    print(f"building tree {spec.name}: {' '.join(argv)}", file=sys.stderr)
    subprocess.run(argv, check=True, env={**os.environ, "SOURCE_DATE_EPOCH": EPOCH})
    done.write_text(" ".join(argv) + "\n")
    return target


def packages(tree: Path) -> dict[str, str]:
    """Package name -> version installed in a Debian tree (empty for a generated tree)."""
    status = tree / "var/lib/dpkg/status"
    if not status.exists():
        return {}
    found: dict[str, str] = {}
    for stanza in status.read_text().split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version|Status): (.*)$", stanza, re.MULTILINE))
        if fields.get("Status", "").endswith(" installed"):
            found[fields["Package"]] = fields["Version"]
    return found


def build_image(tree: Path, image: Path, size: str) -> Path:
    """``fleet image rootfs`` of ``tree``, unless already built."""
    if image.exists():
        return image
    partial = image.with_name(image.name + ".partial")
    subprocess.run(
        [*FLEET, "image", "rootfs", str(tree), "--type", "ext4", "--size", size, "-o",
         str(partial)],
        check=True, stdout=subprocess.DEVNULL, env={**os.environ, "SOURCE_DATE_EPOCH": EPOCH},
    )  # fmt: skip
    partial.rename(image)
    return image


# --- synthetic pairs ------------------------------------------------------------------------

SYNTHETIC_PACKAGES = 40


def _package_files(rng: random.Random, package: int, version: int) -> Iterator[tuple[str, bytes]]:
    """The files of one generated package: a binary part (incompressible) and text, sized so
    that a new version is slightly longer or shorter than the old one, as upgrades are."""
    words = [f"word{n}" for n in range(200)]
    for number in range(4):
        size = rng.randrange(8 << 10, 120 << 10) + version * rng.randrange(0, 3000)
        binary = rng.randbytes(size // 2)
        text = " ".join(rng.choice(words) for _ in range(size // 12)).encode()
        yield f"usr/lib/pkg{package:02d}/file{number}.so", binary + text
    yield f"usr/share/doc/pkg{package:02d}/changelog", f"pkg{package} version {version}\n".encode()


def make_synthetic_tree(target: Path, versions: dict[int, int], seed: int) -> Path:
    """A generated tree of :data:`SYNTHETIC_PACKAGES` packages at the given versions (0 if not
    named); the same arguments give the same bytes."""
    if target.exists():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for package in range(SYNTHETIC_PACKAGES):
        version = versions.get(package, 0)
        rng = random.Random(f"{seed}-{package}-{version}")  # noqa: S311 - test data, not secrets
        for name, data in _package_files(rng, package, version):
            path = partial / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    (partial / "etc").mkdir()
    (partial / "etc/os-release").write_text(f"synthetic {seed}\n")
    partial.rename(target)
    return target


def synthetic_trees(pair: str, trees: Path) -> tuple[Path, Path]:
    """Old and new generated trees for pair ``pair`` (same shapes as the Debian pairs)."""
    old = make_synthetic_tree(trees / "synthetic-base", {}, seed=1)
    if pair == "a":
        new = make_synthetic_tree(trees / "synthetic-a", {17: 1}, seed=1)
    elif pair == "b":
        new = make_synthetic_tree(
            trees / "synthetic-b", {p: 1 for p in range(3, SYNTHETIC_PACKAGES, 4)}, seed=1
        )
    elif pair == "c":
        new = make_synthetic_tree(trees / "synthetic-c", {}, seed=2)
    else:
        new = make_synthetic_tree(trees / "synthetic-again", {}, seed=1)
    return old, new


# --- measuring ------------------------------------------------------------------------------


# Peak RSS is read by os.wait4, in a small launcher that forks the tool: on Linux a process's
# ru_maxrss includes the RSS of whatever it was before exec, so a tool started straight from
# this script would report at least this script's own RSS (a 300 MiB script made `true` report
# 313 MiB). Started from the launcher, the floor is the launcher's few MiB (printed).
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(argv: Sequence[str], *, stdout: IO[bytes] | None = None) -> tuple[float, int, str]:
    """Run a command; return wall seconds, peak RSS in KiB (its own and its waited-for
    children's) and its standard output (empty when ``stdout`` is a file)."""
    with tempfile.TemporaryDirectory(prefix="delta-size-run-") as scratch:
        rss_file, errors_file = Path(scratch) / "rss", Path(scratch) / "stderr"
        launch = [sys.executable, "-S", "-c", LAUNCHER, str(rss_file), *argv]
        with errors_file.open("wb") as errors:
            start = time.perf_counter()
            done = subprocess.run(launch, stdout=stdout or subprocess.PIPE, stderr=errors,
                                  check=False)  # fmt: skip
            elapsed = time.perf_counter() - start
        if done.returncode != 0:
            message = errors_file.read_text(errors="replace").strip()
            raise RuntimeError(f"failed ({done.returncode}): {' '.join(argv)}: {message}")
        return elapsed, int(rss_file.read_text()), (done.stdout or b"").decode()


def rss_floor() -> int:
    """The peak RSS (KiB) the launcher reports for a process that does nothing."""
    return run(["true"])[1]


@dataclass
class Row:
    """One tool's figures for one pair (bytes, seconds, KiB)."""

    tool: str
    full: int
    index: int
    download: int
    make_s: float
    delta_s: float
    make_rss_kib: int
    delta_rss_kib: int
    note: str = ""
    fetched: list[tuple[int, int, int]] = field(default_factory=list)


def reference(new: Path, work: Path) -> Row:
    """The full new image compressed with ``zstd -3``: what a device downloads without delta."""
    out = work / "reference.zst"
    with out.open("wb") as handle:
        seconds, rss, _ = run(["zstd", "-3", "-q", "-c", str(new)], stdout=handle)
    size = out.stat().st_size
    out.unlink()
    return Row("zstd -3 (full)", size, 0, size, seconds, 0.0, rss, 0)


def ours(old: Path, new: Path, work: Path) -> Row:
    """Our store and plan, each in its own process (``_step`` below)."""
    stored, index = work / "ours.stored", work / "ours.index"
    make_s, make_rss, out = run([sys.executable, str(SCRIPT), "_step", "store", str(new),
                                 str(stored), str(index)])  # fmt: skip
    made = json.loads(out)
    delta_s, delta_rss, out = run([sys.executable, str(SCRIPT), "_step", "plan", str(index),
                                   str(made["image_size"]), str(made["stored_size"]),
                                   str(old)])  # fmt: skip
    planned = json.loads(out)
    stored.unlink()
    return Row(
        "ours", made["stored_size"], index.stat().st_size, planned["fetch_bytes"], make_s,
        delta_s, make_rss, delta_rss,
        note=f"{planned['ranges']} ranges" + ("" if planned["real"] else ", interim plan"),
        fetched=[(offset, length, stored) for offset, length, stored in planned["fetched"]],
    )  # fmt: skip


class _Counter:
    """Bytes served by one HTTP server, from its handler threads."""

    def __init__(self) -> None:
        self.served = 0
        self.lock = threading.Lock()

    def add(self, count: int) -> None:
        with self.lock:
            self.served += count


def _counting_handler(
    directory: Path, counter: _Counter
) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args, directory=str(directory))

        def copyfile(self, source: Any, outputfile: Any) -> None:
            data = source.read()
            outputfile.write(data)
            counter.add(len(data))

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def casync(old: Path, new: Path, work: Path, chunk_size: str | None) -> Row:
    """casync make of the new image, then a real extract from a loopback HTTP store, seeded
    with the old image; the bytes served are the download."""
    store, caibx, out = work / "casync.castr", work / "new.caibx", work / "casync.out"
    shutil.rmtree(store, ignore_errors=True)
    sizing = [f"--chunk-size={chunk_size}"] if chunk_size else []
    make_s, make_rss, _ = run(["casync", "make", *sizing, f"--store={store}", str(caibx),
                               str(new)])  # fmt: skip
    full = sum(path.stat().st_size for path in store.rglob("*.cacnk"))
    counter = _Counter()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _counting_handler(store, counter))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        delta_s, delta_rss, _ = run(["casync", "extract", f"--store={url}", f"--seed={old}",
                                     str(caibx), str(out)])  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    if sha256(out) != sha256(new):
        raise RuntimeError("casync extract did not rebuild the new image")
    row = Row(
        f"casync {chunk_size or 'defaults'}", full, caibx.stat().st_size, counter.served,
        make_s, delta_s, make_rss, delta_rss,
    )  # fmt: skip
    for path in (out, caibx):
        path.unlink()
    shutil.rmtree(store)
    return row


def zchunk(old: Path, new: Path, work: Path) -> Row:
    """zck of both images, zck_delta_size between them; the header is the index."""
    old_zck, new_zck = work / "old.zck", work / "new.zck"
    run(["zck", "-o", str(old_zck), str(old)])
    make_s, make_rss, _ = run(["zck", "-o", str(new_zck), str(new)])
    delta_s, delta_rss, out = run(["zck_delta_size", str(old_zck), str(new_zck)])
    header = run(["zck_read_header", str(new_zck)])[2]
    wanted = re.search(r"Would download (\d+) of (\d+) bytes", out)
    header_size = re.search(r"^Header size: (\d+)$", header, re.MULTILINE)
    if wanted is None or header_size is None:
        raise RuntimeError(f"cannot read zchunk's figures from: {out!r} {header!r}")
    row = Row(
        "zchunk", int(wanted.group(2)), int(header_size.group(1)),
        int(wanted.group(1)) - int(header_size.group(1)), make_s, delta_s, make_rss,
        delta_rss,
    )  # fmt: skip
    old_zck.unlink()
    new_zck.unlink()
    return row


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(MiB):
            digest.update(block)
    return digest.hexdigest()


# --- where the changed bytes are (ext4 regions) ---------------------------------------------


def ext4_regions(image: Path) -> list[tuple[int, int, str]]:
    """(first block, end block, region) of the metadata of an ext4 image, from dumpe2fs and
    the journal's blocks from debugfs; what is not listed is 'in use' or 'free' (bitmaps)."""
    text = subprocess.run(["dumpe2fs", str(image)], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    regions: list[tuple[int, int, str]] = []

    def span(match: re.Match[str], name: str) -> None:
        first = int(match.group(1))
        last = int(match.group(2) or first)
        regions.append((first, last + 1, name))

    patterns = [
        (r"superblock at (\d+)(?:-(\d+))?", "superblocks, descriptors"),
        (r"Group descriptors at (\d+)(?:-(\d+))?", "superblocks, descriptors"),
        (r"Reserved GDT blocks at (\d+)(?:-(\d+))?", "superblocks, descriptors"),
        (r"Block bitmap at (\d+)()", "bitmaps"),
        (r"Inode bitmap at (\d+)()", "bitmaps"),
        (r"Inode table at (\d+)(?:-(\d+))?", "inode tables"),
    ]
    for pattern, name in patterns:
        for match in re.finditer(pattern, text):
            span(match, name)
    for line in re.findall(r"^\s+Free blocks: (.+)$", text, re.MULTILINE):
        for item in line.split(", "):
            first, _, last = item.strip().partition("-")
            regions.append((int(first), int(last or first) + 1, "free"))
    journal = subprocess.run(["debugfs", "-R", "blocks <8>", str(image)], capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
    regions += [(int(block), int(block) + 1, "journal") for block in journal]
    merged: list[tuple[int, int, str]] = []
    for start, stop, name in sorted(regions):
        if merged and merged[-1][2] == name and merged[-1][1] >= start:
            merged[-1] = (merged[-1][0], max(stop, merged[-1][1]), name)
        else:
            merged.append((start, stop, name))
    return merged


def attribute(
    ranges: Sequence[tuple[int, int, int]], regions: list[tuple[int, int, str]]
) -> dict[str, int]:
    """Bytes of ``ranges`` (offset, length, ...) in each region (sorted, not overlapping).
    What no region holds is in use by files and directories."""
    starts = [start for start, _, _ in regions]
    totals: dict[str, float] = {}
    for offset, length, _ in ranges:
        first, end = offset // BLOCK, -(-(offset + length) // BLOCK)
        share = length / (end - first)
        counted = 0
        at = max(bisect.bisect_right(starts, first) - 1, 0)
        while at < len(regions) and regions[at][0] < end:
            start, stop, name = regions[at]
            overlap = min(stop, end) - max(start, first)
            if overlap > 0:
                totals[name] = totals.get(name, 0) + overlap * share
                counted += overlap
            at += 1
        totals[IN_USE] = totals.get(IN_USE, 0) + (end - first - counted) * share
    return {name: round(value) for name, value in totals.items()}


def changed_blocks(old: Path, new: Path) -> list[tuple[int, int, int]]:
    """(offset, length, length) runs of 4 KiB blocks that differ at the same offset."""
    runs: list[tuple[int, int, int]] = []
    with old.open("rb") as a, new.open("rb") as b:
        offset = 0
        while True:
            left, right = a.read(MiB), b.read(MiB)
            if not right:
                break
            for start in range(0, len(right), BLOCK):
                if left[start : start + BLOCK] != right[start : start + BLOCK]:
                    position = offset + start
                    if runs and runs[-1][0] + runs[-1][1] == position:
                        runs[-1] = (runs[-1][0], runs[-1][1] + BLOCK, runs[-1][1] + BLOCK)
                    else:
                        runs.append((position, BLOCK, BLOCK))
            offset += len(right)
    return runs


# --- the steps run in their own process -----------------------------------------------------


def step_store(image: str, stored: str, index: str) -> None:
    from image_builder.chunks import store_image

    size = Path(image).stat().st_size
    with open(image, "rb") as source, open(stored, "wb") as out:
        result = store_image(source, size, out, "zstd")
    Path(index).write_bytes(result.index.to_bytes())
    print(json.dumps({"image_size": result.uncompressed_size, "stored_size": result.size}))


def step_plan(index_path: str, image_size: str, stored_size: str, booted: str) -> None:
    """The device's side: which chunks of the new image to fetch, the old image being the
    booted slot (the other slot, the target, is taken as holding nothing of use)."""
    from image_builder.chunks import ChunkIndex

    index = ChunkIndex.from_bytes(
        Path(index_path).read_bytes(), image_size=int(image_size),
        stored_size=int(stored_size), compression="zstd", where=index_path,
    )  # fmt: skip
    delta: Any
    try:  # by name: the benchmark runs before and after updater.delta is there
        delta = importlib.import_module("updater.delta")
    except ImportError:
        delta = None
    chunks = list(index.chunks())
    if delta is not None:
        planned = delta.plan(index, booted=Path(booted))
        missing = [source.kind == delta.FETCH for source in planned.sources]
        fetch, reuse, ranges = planned.fetch_bytes, planned.reuse_bytes, len(planned.ranges())
    else:  # the same rule, until updater.delta is there: a chunk the seed holds is not fetched
        held = _held_digests([booted])
        missing = [chunk.sha256 not in held for chunk in chunks]
        fetch = sum(c.stored_length for c, m in zip(chunks, missing, strict=True) if m)
        reuse = sum(c.length for c, m in zip(chunks, missing, strict=True) if not m)
        ranges = _coalesced(iter(missing))
    fetched = [
        (c.offset, c.length, c.stored_length) for c, m in zip(chunks, missing, strict=True) if m
    ]
    print(json.dumps({"fetch_bytes": fetch, "reuse_bytes": reuse, "ranges": ranges,
                      "fetched": fetched, "real": delta is not None}))  # fmt: skip


def _held_digests(seeds: Sequence[str]) -> set[bytes]:
    from image_builder.chunks import cut, file_reader

    held: set[bytes] = set()
    for seed in seeds:
        with open(seed, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            for _, data in cut(file_reader(handle), size):
                held.add(hashlib.sha256(data).digest())
    return held


def _coalesced(missing: Iterator[bool]) -> int:
    """How many runs of neighbouring missing chunks (one Range request each)."""
    runs, previous = 0, False
    for flag in missing:
        runs += flag and not previous
        previous = flag
    return runs


STEPS: dict[str, Callable[..., None]] = {"store": step_store, "plan": step_plan}


# --- the report -----------------------------------------------------------------------------


def pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def measure(key: str, old: Path, new: Path, work: Path, tools: set[str]) -> list[Row]:
    rows = [reference(new, work), ours(old, new, work)]
    if "casync" in tools:
        rows.append(casync(old, new, work, None))
        rows.append(casync(old, new, work, "64K"))
    if "zchunk" in tools:
        rows.append(zchunk(old, new, work))
    return rows


def print_pair(key: str, title: str, rows: list[Row], changes: list[str]) -> None:
    ref = rows[0].full
    print(f"\n({key}) {title}; reference (zstd -3 of the new image): {ref / MiB:.1f} MiB")
    if changes:
        shown = ", ".join(changes[:12]) + (
            f" and {len(changes) - 12} more" if len(changes) > 12 else ""
        )
        print(f"    {len(changes)} packages differ: {shown}")
    print(
        f"    {'tool':<18} {'full MiB':>9} {'index KiB':>10} {'download KiB':>13} {'% ref':>7} "
        f"{'+index %':>9} {'make s':>7} {'delta s':>8} {'make RSS':>9} {'delta RSS':>10}  note"
    )
    for row in rows:
        print(
            f"    {row.tool:<18} {row.full / MiB:>9.1f} {row.index / 1024:>10.1f} "
            f"{row.download / 1024:>13.1f} {pct(row.download, ref):>7.2f} "
            f"{pct(row.download + row.index, ref):>9.2f} {row.make_s:>7.2f} {row.delta_s:>8.2f} "
            f"{row.make_rss_kib / 1024:>8.0f}M {row.delta_rss_kib / 1024:>9.0f}M  {row.note}"
        )


def aims(results: dict[str, list[Row]]) -> list[dict[str, Any]]:
    """The aims, judged on what goes over the wire: the chunks plus the index."""
    verdicts: list[dict[str, Any]] = []

    def total(row: Row) -> int:
        return row.download + row.index

    for key, rows in results.items():
        ref, our = rows[0].full, rows[1]
        if key == "a":
            figure = pct(total(our), ref)
            verdicts.append({
                "aim": f"(a) ours <= {AIM_PATCH_PERCENT} % of the full image",
                "figure": round(figure, 3), "met": figure <= AIM_PATCH_PERCENT,
            })  # fmt: skip
        verdicts.append({
            "aim": f"({key}) ours never over 100 % (of zstd -3 of the whole image) + index",
            "figure": round(pct(our.download, ref), 3), "met": our.download <= ref,
        })  # fmt: skip
        verdicts.append({
            "aim": f"({key}) ours never over our own full stored image + index",
            "figure": round(pct(our.download, our.full), 3), "met": our.download <= our.full,
        })  # fmt: skip
        if key in ("a", "b"):
            for other in rows[2:]:
                ratio = total(our) / max(total(other), 1)
                verdicts.append({
                    "aim": f"({key}) {other.tool} not better than ours by more than 10 %",
                    "figure": round(ratio, 3), "met": ratio <= AIM_RELATIVE,
                })  # fmt: skip
    return verdicts


def compressed_by_region(
    image: Path, ranges: Sequence[tuple[int, int, int]], regions: list[tuple[int, int, str]]
) -> dict[str, int]:
    """What the blocks of ``ranges`` cost compressed, by region: each region's blocks are
    compressed together with zstd -3 (a chunk's stored bytes cannot be split by region; a
    chunk of journal zeros costs nothing, its neighbour of inode table does)."""
    import zstandard

    starts = [start for start, _, _ in regions]
    parts: dict[str, list[bytes]] = {}
    with image.open("rb") as handle:
        for offset, length, _ in ranges:
            handle.seek(offset)
            data = handle.read(length)
            for position in range(0, len(data), BLOCK):
                block = (offset + position) // BLOCK
                at = bisect.bisect_right(starts, block) - 1
                inside = at >= 0 and regions[at][0] <= block < regions[at][1]
                name = regions[at][2] if inside else IN_USE
                parts.setdefault(name, []).append(data[position : position + BLOCK])
    compressor = zstandard.ZstdCompressor(level=3)
    return {name: len(compressor.compress(b"".join(blocks))) for name, blocks in parts.items()}


def package_floor(tree: Path, names: Sequence[str]) -> tuple[int, int]:
    """The files of the packages ``names`` in a Debian tree: their bytes, and their bytes
    compressed with zstd -3 one file at a time: about the least a chunked delta can send."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=3)
    raw = packed = 0
    for name in names:
        lists = list((tree / "var/lib/dpkg/info").glob(f"{name}.list"))
        lists += (tree / "var/lib/dpkg/info").glob(f"{name}:*.list")
        for listed in lists:
            for line in listed.read_text().splitlines():
                path = tree / line.lstrip("/")
                if path.is_file() and not path.is_symlink():
                    data = path.read_bytes()
                    raw += len(data)
                    packed += len(compressor.compress(data))
    return raw, packed


def explain(key: str, old: Path, new: Path, our: Row) -> dict[str, dict[str, int]]:
    """Where the changes are, by ext4 region: the blocks that differ at the same offset, the
    chunks we fetch (their image bytes) and about what they cost compressed."""
    regions = ext4_regions(new)
    in_place = attribute(changed_blocks(old, new), regions)
    image_bytes = attribute(our.fetched, regions)
    packed = compressed_by_region(new, our.fetched, regions)
    print(f"    ({key}) where the changes are, KiB: {'differ in place':>16} {'we fetch':>9} "
          f"{'zstd -3':>8}")  # fmt: skip
    for name in sorted(set(in_place) | set(image_bytes)):
        kib = [figures.get(name, 0) / 1024 for figures in (in_place, image_bytes, packed)]
        print(f"        {name:<30} {kib[0]:>16.0f} {kib[1]:>9.0f} {kib[2]:>8.0f}")
    return {"differ_in_place": in_place, "fetched": image_bytes, "fetched_compressed": packed}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_step":
        STEPS[sys.argv[2]](*sys.argv[3:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", default="a,b,c,d", help="which pairs, e.g. a,b")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/fleet-delta-size"),
                        help="trees and images are kept here, so runs again are fast")  # fmt: skip
    parser.add_argument("--synthetic", action="store_true",
                        help="small generated pairs: no network, seconds")  # fmt: skip
    parser.add_argument("--explain", action="store_true",
                        help="where the changes are in ext4, even if aims are met")  # fmt: skip
    args = parser.parse_args()
    keys = [key.strip() for key in args.pairs.split(",") if key.strip()]
    unknown = [key for key in keys if key not in PAIRS]
    if not keys or unknown:
        parser.error(
            f"--pairs: unknown pair {', '.join(unknown) or '(none)'}; choose from a, b, c, d"
        )
    tools = {tool for tool, binary in (("casync", "casync"), ("zchunk", "zck"))
             if shutil.which(binary)}  # fmt: skip
    for missing in sorted({"casync", "zchunk"} - tools):
        print(f"{missing} is not installed: its columns are left out", file=sys.stderr)
    kind = "synthetic" if args.synthetic else "debian"
    trees, images = args.workdir / kind / "trees", args.workdir / kind / "images"
    trees.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    work = args.workdir / kind / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    size = "64M" if args.synthetic else "1G"
    results: dict[str, list[Row]] = {}
    floor = rss_floor()
    print(
        f"peak RSS is in MiB; {floor / 1024:.0f} MiB is the launcher's floor (true(1) reports it)"
    )
    report: dict[str, Any] = {"kind": kind, "image_size": size, "pairs": {}}
    report["rss_floor_kib"] = floor
    try:
        for key in keys:
            pair = PAIRS[key]
            if args.synthetic:
                old_tree, new_tree = synthetic_trees(key, trees)
            else:
                old_tree, new_tree = build_tree(pair.old, trees), build_tree(pair.new, trees)
            old = build_image(old_tree, images / f"{old_tree.name}.ext4", size)
            new = build_image(new_tree, images / f"{new_tree.name}.ext4", size)
            before, after = packages(old_tree), packages(new_tree)
            changes = [f"{name} {before.get(name, '-')} -> {after.get(name, '-')}"
                       for name in sorted(before.keys() | after.keys())
                       if before.get(name) != after.get(name)]  # fmt: skip
            rows = measure(key, old, new, work, tools)
            results[key] = rows
            print_pair(key, pair.title, rows, changes)
            entry: dict[str, Any] = {
                "title": pair.title, "packages_changed": changes, "identical_images":
                sha256(old) == sha256(new),
                "rows": [{k: v for k, v in asdict(row).items() if k != "fetched"} for row in rows],
            }  # fmt: skip
            our = rows[1]
            missed = key == "a" and pct(our.download + our.index, rows[0].full) > AIM_PATCH_PERCENT
            if args.explain or missed:
                entry["explain"] = explain(key, old, new, our)
                names = [name for name in sorted(before.keys() | after.keys())
                         if before.get(name) != after.get(name)]  # fmt: skip
                if names:
                    raw, packed = package_floor(new_tree, names)
                    entry["changed_packages_files"] = {"bytes": raw, "zstd_3": packed}
                    print(f"    the changed packages' files: {raw / 1024:.0f} KiB, "
                          f"{packed / 1024:.0f} KiB compressed one by one "
                          f"({pct(packed, rows[0].full):.2f} % of the reference)")  # fmt: skip
            report["pairs"][key] = entry
        report["aims"] = aims(results)
        print()
        for verdict in report["aims"]:
            print(f"aim: {verdict['aim']}: {verdict['figure']} -> "
                  f"{'met' if verdict['met'] else 'MISSED'}")  # fmt: skip
        print(json.dumps(report))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
