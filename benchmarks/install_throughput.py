#!/usr/bin/env python3
"""Install a bundle holding a large ext4 image into a file-backed slot and into a loop device;
compare with ``dd if=IMAGE of=SLOT bs=4M conv=fsync`` of the same bytes in the same run.

Prints throughput (MB/s of image bytes written), the ratio to dd (1.0 = as fast as dd) and the
peak RSS of ``fleet-updater install``, which must stay flat however large the image is, then
whether each install meets its aim (``AIM_RATIO``, ``AIM_PEAK_RSS_MIB``). ``verify`` rows are
``fleet bundle verify`` of each bundle: the reading alone (hashing, decompressing), the most an
install can reach on a disk faster than that. Each time is the best of ``--rounds`` interleaved
runs (these machines are noisy), each peak RSS the highest. Needs root for the loop device
(``--no-loop`` skips it).

    python benchmarks/install_throughput.py [--size-mib 1024] [--rounds 3] [--workdir DIR]
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

from bootloader_hooks import grubenv
from bootloader_hooks.grub import default_block

FLEET = [sys.executable, "-c", "from fleet_core.cli import main; main()"]
UPDATER = [sys.executable, "-c", "from updater.cli import main; main()"]
MB = 1_000_000
EXIT_REBOOT_REQUIRED = 3


def run(argv: list[str], ok: tuple[int, ...] = (0,)) -> tuple[float, int]:
    """Run a command; return wall seconds and peak RSS in KiB."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) not in ok:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(argv)}")
    return elapsed, usage.ru_maxrss


def make_rootfs_image(workdir: Path, size_mib: int) -> Path:
    """An ext4 image of ``size_mib`` MiB, about 40 % full of files (random and text)."""
    tree = workdir / "tree"
    tree.mkdir()
    for i in range(size_mib * 4 // 10 // 8):
        directory = tree / f"usr/lib/pkg{i // 16}"
        directory.mkdir(parents=True, exist_ok=True)
        data = os.urandom(4 << 20) + (b"text line of a config file\n" * 155345)[: 4 << 20]
        (directory / f"file{i}.bin").write_bytes(data)
    image = workdir / "rootfs.ext4"
    subprocess.run(
        [*FLEET, "image", "rootfs", str(tree), "--type", "ext4", "--size", f"{size_mib}M",
         "-o", str(image)],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    shutil.rmtree(tree)
    return image


def write_config(workdir: Path, name: str, slot_b: Path) -> Path:
    """An updater configuration with a GRUB environment on a plain file, booted from slot a."""
    device = workdir / name
    (device / "proc").mkdir(parents=True)
    (device / "proc/cmdline").write_text("root=PARTLABEL=root_a fleet.slot=a\n")
    slot_a = device / "root_a.img"
    slot_a.write_bytes(b"")
    grubenv.write(device / "grubenv", default_block("a"))
    config = device / "updater.toml"
    config.write_text(
        f'compatible = "bench"\nkeyring = "{workdir / "ring"}"\ndata_dir = "{device / "data"}"\n'
        f'[bootloader]\nbackend = "grub"\ngrubenv = "{device / "grubenv"}"\n'
        f'cmdline = "{device / "proc/cmdline"}"\n'
        f'[slots.a]\nrootfs = "{slot_a}"\n[slots.b]\nrootfs = "{slot_b}"\n'
        "[limits]\nmin_free_mb = 0\n"
    )
    return config


# What an install should reach, as a ratio to dd of the same bytes into the same slot.
AIM_RATIO = {"none": 0.9, "zstd": 0.8}
AIM_PEAK_RSS_MIB = 64


def report(size_mib: int, rounds: int, best: dict[str, float], peak: dict[str, int]) -> None:
    """The table (MB/s of image bytes, ratio to dd in the same run, peak RSS), then a line per
    install saying whether it meets its aim."""
    size = size_mib << 20
    print(f"image: ext4, {size_mib} MiB; best of {rounds} rounds")
    print(f"{'operation':<24} {'MB/s':>7} {'x dd':>7} {'peak RSS MiB':>13}")
    for name, seconds in best.items():
        ratio, memory = f"{'-':>7}", f"{'-':>13}"
        if "-> " in name:
            ratio = f"{best['dd -> ' + name.rsplit('-> ', 1)[1]] / seconds:>7.2f}"
        if not name.startswith("dd"):
            memory = f"{peak[name] / 1024:>13.1f}"
        print(f"{name:<24} {size / MB / seconds:>7.0f} {ratio} {memory}")
    for name, seconds in best.items():
        if not name.startswith("install"):
            continue
        compression, kind = name.removeprefix("install ").split(" -> ")
        times_dd, aim = best[f"dd -> {kind}"] / seconds, AIM_RATIO[compression]
        rss = peak[name] / 1024
        verdict = "met" if times_dd >= aim and rss <= AIM_PEAK_RSS_MIB else "NOT met"
        print(
            f"aim {name}: >= {aim:.2f}x dd and <= {AIM_PEAK_RSS_MIB} MiB: {verdict} "
            f"({times_dd:.2f}x, {rss:.1f} MiB; the reading alone: "
            f"{size / MB / best[f'verify {compression}']:.0f} MB/s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-loop", action="store_true")
    args = parser.parse_args()
    size = args.size_mib << 20
    workdir = Path(tempfile.mkdtemp(prefix="install-bench-", dir=args.workdir))
    loop: str | None = None
    try:
        image = make_rootfs_image(workdir, args.size_mib)
        subprocess.run([*FLEET, "keys", "generate", "--out", str(workdir / "key")], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        subprocess.run([*FLEET, "keys", "trust", str(workdir / "key.pub"), "--keyring",
                        str(workdir / "ring")], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        bundles = {}
        for compression in ("none", "zstd"):
            bundles[compression] = workdir / f"{compression}.bundle"
            subprocess.run(
                [*FLEET, "bundle", "create", "--compatible", "bench", "--version", "1.0.0",
                 "--security-version", "1", "--image", f"rootfs={image}", "--key",
                 str(workdir / "key.pem"), "--compress", compression, "-o",
                 str(bundles[compression])],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        slot_file = workdir / "slot_b.img"
        slot_file.write_bytes(b"")
        os.truncate(slot_file, size)
        targets = {"file": slot_file}
        if not args.no_loop:
            backing = workdir / "loop-backing.img"
            backing.write_bytes(b"")
            os.truncate(backing, size)
            loop = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                                  capture_output=True, text=True).stdout.strip()  # fmt: skip
            targets["loop"] = Path(loop)
        contenders: dict[str, tuple[list[str], tuple[int, ...]]] = {}
        for compression, bundle in bundles.items():
            # the reading alone (hashing, decompressing): the floor of an install's time
            contenders[f"verify {compression}"] = (
                [*FLEET, "bundle", "verify", str(bundle), "--keyring", str(workdir / "ring")],
                (0,),
            )
        for kind, slot in targets.items():
            contenders[f"dd -> {kind}"] = (
                ["dd", f"if={image}", f"of={slot}", "bs=4M", "conv=fsync,notrunc", "status=none"],
                (0,),
            )
            for compression, bundle in bundles.items():
                config = write_config(workdir, f"device-{kind}-{compression}", slot)
                contenders[f"install {compression} -> {kind}"] = (
                    [*UPDATER, "--config", str(config), "install", str(bundle), "--no-reboot"],
                    (EXIT_REBOOT_REQUIRED,),
                )
        run(["cat", str(image), str(bundles["none"]), str(bundles["zstd"])])  # warm the cache
        best: dict[str, float] = {}
        peak: dict[str, int] = {}
        for _ in range(args.rounds):
            for name, (argv, ok) in contenders.items():
                os.sync()
                seconds, rss = run(argv, ok)
                best[name] = min(seconds, best.get(name, seconds))
                peak[name] = max(rss, peak.get(name, 0))
        report(args.size_mib, args.rounds, best, peak)
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
