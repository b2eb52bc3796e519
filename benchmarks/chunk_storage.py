#!/usr/bin/env python3
"""What the server's disk holds for similar releases: a base release and patch releases of a
synthetic image, uploaded one after the other to a ``fleet server run`` on loopback.

The image is ``--size-mib`` MiB of blocks of words (compressible) and random bytes, as a root
filesystem's files are; each patch release overwrites a few scattered ranges and inserts a few
kilobytes (files that changed, one that grew). Bundles are format 2 (chunked, zstd), built and
signed as ``fleet bundle create`` builds them.

After each upload it prints the bundle's size, what the data directory's ``blobs/`` and
``chunks/`` grew by, and the totals: bytes on disk against the sum of the bundles' sizes (the
disk a store of whole images would take), as a ratio. Then it exports the releases for a
mirror (``fleet release export``) and prints the export's size the same way.

    python benchmarks/chunk_storage.py [--size-mib 64] [--patches 2] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
from console_load import serving  # the same fleet server run, started the same way

FLEET = [sys.executable, "-c", "from fleet_core.cli import main; main()"]
MiB = 1 << 20


def base_image(size: int, seed: int = 1) -> bytes:
    """Blocks of words and of random bytes, half and half, ``size`` bytes in all."""
    rng = random.Random(seed)  # noqa: S311 (test data, repeatable)
    letters = b"abcdefghijklmnopqrstuvwxyz"
    words = [bytes(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(2000)]
    parts: list[bytes] = []
    total = 0
    while total < size:
        block = (
            b" ".join(rng.choices(words, k=rng.randint(2000, 20000)))
            if rng.random() < 0.5
            else rng.randbytes(rng.randint(4096, 262144))
        )
        parts.append(block)
        total += len(block)
    return b"".join(parts)[:size]


def patched(image: bytes, seed: int) -> bytes:
    """``image`` with 8 scattered ranges of up to 4 KiB overwritten and 3 insertions of up to
    8 KiB: a patch release's few changed and grown files."""
    rng = random.Random(seed)  # noqa: S311 (test data, repeatable)
    data = bytearray(image)
    for _ in range(8):
        at = rng.randrange(len(data) - 4096)
        length = rng.randint(16, 4096)
        data[at : at + length] = rng.randbytes(length)
    for _ in range(3):
        at = rng.randrange(len(data))
        data[at:at] = rng.randbytes(rng.randint(100, 8192))
    return bytes(data)


def disk_bytes(*directories: Path) -> int:
    return sum(p.stat().st_size for d in directories for p in d.rglob("*") if p.is_file())


def fleet(*args: str) -> str:
    done = subprocess.run([*FLEET, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"fleet {' '.join(args[:2])}: {done.stderr.strip()}")
    return done.stdout


def run(workdir: Path, size_mib: int, patches: int) -> dict[str, Any]:
    from image_builder.bundle_writer import ImageSource, create_bundle
    from signing.keyring import trust_key
    from signing.keys import generate_key

    key = generate_key(workdir / "keys" / "release")
    data = workdir / "data"
    trust_key(data / "keyring", workdir / "keys" / "release.pub")
    created = fleet("server", "token", "create", "--role", "operator", "--name", "bench",
                    "--data-dir", str(data))  # fmt: skip
    token = created.splitlines()[0].strip()
    images = [base_image(size_mib * MiB)]
    images += [patched(images[0], seed) for seed in range(2, 2 + patches)]
    stores = (data / "blobs", data / "chunks")
    rows: list[dict[str, Any]] = []
    with serving(data, workdir / "server.log") as server:
        url = server.url
        for number, image in enumerate(images):
            version = f"1.{number}.0"
            source = workdir / f"rootfs-{version}.img"
            source.write_bytes(image)
            bundle = workdir / f"{version}.bundle"
            create_bundle(
                bundle, images=[ImageSource("rootfs", source)], keys=[key],
                compatible="metrica-rpi4", version=version, security_version=1,
                compression="zstd", created=1_700_000_000,
            )  # fmt: skip
            before = disk_bytes(*stores) if data.exists() else 0
            started = time.perf_counter()
            answer = requests.post(
                f"{url}/api/v1/releases", data=bundle.read_bytes(), timeout=600,
                headers={"Authorization": f"Bearer {token}"},
            )  # fmt: skip
            if answer.status_code != 201:
                raise SystemExit(f"upload of {version}: {answer.status_code} {answer.text}")
            rows.append({
                "version": version, "bundle_bytes": bundle.stat().st_size,
                "upload_s": round(time.perf_counter() - started, 2),
                "disk_growth_bytes": disk_bytes(*stores) - before,
            })  # fmt: skip
            source.unlink()
    bundles = sum(row["bundle_bytes"] for row in rows)
    disk = disk_bytes(*stores)
    mirror = workdir / "mirror"
    fleet("release", "export", str(mirror), "--data-dir", str(data))
    return {
        "size_mib": size_mib, "releases": rows, "bundles_bytes": bundles,
        "disk_bytes": disk, "disk_to_bundles": round(disk / bundles, 3),
        "mirror_bytes": disk_bytes(mirror),
        "mirror_to_bundles": round(disk_bytes(mirror) / bundles, 3),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--patches", type=int, default=2)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chunk-storage-"))
    try:
        result = run(workdir, args.size_mib, args.patches)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{len(result['releases'])} similar releases of a {args.size_mib} MiB image (zstd):")
    for row in result["releases"]:
        print(
            f"  {row['version']}: bundle {row['bundle_bytes']:>12,} B, disk grew by "
            f"{row['disk_growth_bytes']:>12,} B "
            f"({row['disk_growth_bytes'] / row['bundle_bytes']:.3f} of the bundle), "
            f"upload {row['upload_s']} s"
        )
    print(
        f"  server disk (blobs/ + chunks/): {result['disk_bytes']:,} B for "
        f"{result['bundles_bytes']:,} B of bundles: ratio {result['disk_to_bundles']}"
    )
    print(
        f"  mirror export (every image whole, indexes, chunks): {result['mirror_bytes']:,} B: "
        f"ratio {result['mirror_to_bundles']}"
    )


if __name__ == "__main__":
    main()
