#!/usr/bin/env python3
"""Create and verify a bundle holding a large image; compare with sha256sum of the same bytes.

Prints throughput in MB/s and as a ratio to ``sha256sum`` of the same bytes measured in the same
run (these machines are noisy: only ratios within one run mean anything), and the peak RSS of
each ``fleet`` command, which must stay flat however large the image is. Creating a bundle
writes the whole image to disk, which sha256sum does not, so ``dd conv=fsync`` of the same bytes
is printed too: it is the floor for any writer. Each figure is the best of ``--rounds`` runs,
the contenders interleaved, so a burst of writeback from one does not land on another.

    python benchmarks/bundle_throughput.py [--size-mib 1024] [--rounds 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLEET = [sys.executable, "-c", "from fleet_core.cli import main; main()"]
MB = 1_000_000


def run(argv: list[str]) -> tuple[float, int]:
    """Run a command to completion; return wall seconds and peak RSS in KiB."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(argv)}")
    return elapsed, usage.ru_maxrss


def write_image(path: Path, size: int) -> None:
    """Half random bytes, half a repeated pattern: incompressible and compressible parts,
    as in a real root filesystem image."""
    block = 4 << 20
    pattern = (b"metrica fleet root filesystem " * (block // 30 + 1))[:block]
    with open(path, "wb") as out:
        for i in range(size // block):
            out.write(os.urandom(block) if i % 2 else pattern)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    size = args.size_mib << 20
    workdir = Path(tempfile.mkdtemp(prefix="bundle-bench-", dir=args.workdir))
    try:
        image = workdir / "rootfs.ext4"
        write_image(image, size)
        subprocess.run(
            [*FLEET, "keys", "generate", "--out", str(workdir / "key")],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            [*FLEET, "keys", "trust", str(workdir / "key.pub"), "--keyring", str(workdir / "ring")],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        run(["sha256sum", str(image)])  # warm the page cache once for everybody
        key, ring = str(workdir / "key.pem"), str(workdir / "ring")
        contenders: dict[str, list[str]] = {
            "sha256sum": ["sha256sum", str(image)],
            "dd conv=fsync": [
                "dd",
                f"if={image}",
                f"of={workdir / 'copy'}",
                "bs=4M",
                "conv=fsync",
                "status=none",
            ],
        }
        for compression in ("none", "zstd"):
            bundle = str(workdir / f"release-{compression}.bundle")
            contenders[f"create ({compression})"] = [
                *FLEET,
                "bundle",
                "create",
                "--compatible",
                "bench",
                "--version",
                "1.0.0",
                "--security-version",
                "1",
                "--image",
                f"rootfs={image}",
                "--key",
                key,
                "--compress",
                compression,
                "-o",
                bundle,
            ]
            contenders[f"verify ({compression})"] = [
                *FLEET,
                "bundle",
                "verify",
                bundle,
                "--keyring",
                ring,
            ]
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.rounds):
            for name, argv in contenders.items():
                os.sync()  # one contender's dirty pages must not be flushed in another's time
                seconds, rss = run(argv)
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, max(rss, best.get(name, (0, 0))[1]))
        baseline = best["sha256sum"][0]
        print(f"image: {args.size_mib} MiB, best of {args.rounds} rounds")
        print(f"{'operation':<16} {'MB/s':>7} {'x sha256sum':>12} {'peak RSS MiB':>13}")
        for name, (seconds, rss) in best.items():
            # a tiny tool's peak RSS is the parent's, inherited at fork: not worth printing
            memory = (
                f"{rss / 1024:>13.1f}" if contenders[name][0] == sys.executable else f"{'-':>13}"
            )
            print(f"{name:<16} {size / MB / seconds:>7.0f} {baseline / seconds:>12.2f} {memory}")
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
