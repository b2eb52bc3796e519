"""The guest kernel of the QEMU reference device: Debian's, fetched as a Debian package.

``linux-image-amd64`` is a metapackage; its dependency names the real kernel package, which is
downloaded with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a cache directory.
Nothing is installed on the host. The cache keeps one unpacked kernel per package version; a
cache holding one already is used as it is (no network), so a fetch is idempotent.

Debian builds the drivers the reference device needs (virtio, ext4, vfat, squashfs, 9p, the
i6300esb watchdog) as modules, and the package ships no ``modules.dep`` (``depmod`` runs at
install time), so :func:`module_closure` reads each module's ``depends=`` from the module file
itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fleet_core.errors import FleetError

METAPACKAGE = "linux-image-amd64"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = PROJECT_ROOT / "build" / "qemu-cache"
_READY = ".unpacked"


class KernelFetchError(FleetError):
    """The Debian kernel package could not be downloaded or unpacked."""


@dataclass(frozen=True)
class DebianKernel:
    """An unpacked kernel package: the kernel image and its modules."""

    root: Path  # where the package was unpacked
    release: str  # "6.1.0-56-amd64"

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    def module_paths(self) -> dict[str, Path]:
        """Every module of the package by name (``virtio_blk``; dashes read as underscores)."""
        found: dict[str, Path] = {}
        for path in sorted((self.modules_dir / "kernel").rglob("*.ko*")):
            found[_module_name(path)] = path
        return found


def _module_name(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def cache_dir() -> Path:
    """The cache directory: ``FLEET_QEMU_CACHE``, else ``build/qemu-cache`` in the project."""
    configured = os.environ.get("FLEET_QEMU_CACHE")
    return Path(configured) if configured else DEFAULT_CACHE


def cached_kernel(cache: Path) -> DebianKernel | None:
    """The newest kernel unpacked in ``cache``, if any."""
    candidates = sorted(cache.glob("linux-image-*/" + _READY), key=lambda p: p.parent.name)
    for marker in reversed(candidates):
        release = marker.read_text().strip()
        kernel = DebianKernel(marker.parent, release)
        if kernel.vmlinuz.is_file():
            return kernel
    return None


def _apt(argv: list[str], where: Path) -> str:
    try:
        result = subprocess.run(argv, cwd=where, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise KernelFetchError(f"{argv[0]} not found: a Debian host is needed") from err
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.startswith("E:")]
        raise KernelFetchError(
            f"{' '.join(argv)} failed: {lines[-1] if lines else result.stderr.strip()}"
            " (run apt-get update first?)"
        )
    return result.stdout


def fetch_kernel(cache: Path | None = None) -> DebianKernel:
    """The cached kernel, or download and unpack the current ``linux-image-amd64`` into the
    cache. A half-finished fetch leaves only a temporary directory, never a cache entry.

    Raises:
        KernelFetchError: apt or dpkg-deb missing or failing.
    """
    cache = cache or cache_dir()
    kernel = cached_kernel(cache)
    if kernel is not None:
        return kernel
    cache.mkdir(parents=True, exist_ok=True)
    try:
        _fetch_into(cache)
    except KernelFetchError:
        # package lists older than the archive name a kernel the mirror no longer has
        _apt(["apt-get", "update", "-qq"], cache)
        _fetch_into(cache)
    kernel = cached_kernel(cache)
    if kernel is None:
        raise KernelFetchError(f"{cache}: the unpacked kernel is incomplete")
    return kernel


def _fetch_into(cache: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="fleet-kernel-", dir=cache) as scratch_name:
        scratch = Path(scratch_name)
        _apt(["apt-get", "download", "-q", METAPACKAGE], scratch)
        meta = next(scratch.glob(f"{METAPACKAGE}_*.deb"))
        depends = _apt(["dpkg-deb", "-f", str(meta), "Depends"], scratch)
        match = re.search(r"(linux-image-[0-9][^\s,(]*)", depends)
        if match is None:
            raise KernelFetchError(f"{meta.name} names no kernel package: {depends.strip()}")
        package = match.group(1)
        _apt(["apt-get", "download", "-q", package], scratch)
        deb = next(scratch.glob(f"{package}_*.deb"))
        unpacked = scratch / "unpacked"
        _apt(["dpkg-deb", "-x", str(deb), str(unpacked)], scratch)
        releases = [p.name for p in (unpacked / "lib" / "modules").iterdir()]
        if len(releases) != 1:
            raise KernelFetchError(f"{deb.name}: expected one module tree, found {releases}")
        (unpacked / _READY).write_text(releases[0] + "\n")
        target = cache / deb.name.removesuffix(".deb")
        shutil.rmtree(target, ignore_errors=True)
        unpacked.rename(target)


def module_dependencies(path: Path) -> list[str]:
    """The modules ``path`` needs loaded first, from its ``depends=`` field."""
    data = _module_bytes(path)
    match = re.search(rb"\0depends=([^\0]*)\0", data)
    if match is None or not match.group(1):
        return []
    return [name.replace("-", "_") for name in match.group(1).decode().split(",") if name]


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        import lzma

        return lzma.decompress(data)
    return data


def module_closure(kernel: DebianKernel, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """``wanted`` modules and everything they depend on, in an order that loads (dependencies
    first); modules built into the kernel are left out.

    Raises:
        KernelFetchError: a module is neither in the package nor built in.
    """
    available = kernel.module_paths()
    builtin_file = kernel.modules_dir / "modules.builtin"
    builtin = {
        _module_name(Path(line.strip())) for line in builtin_file.read_text().splitlines() if line
    }
    ordered: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        path = available.get(name)
        if path is None:
            raise KernelFetchError(f"kernel {kernel.release} has no module {name}")
        for dependency in module_dependencies(path):
            visit(dependency)
        ordered.append((name, path))

    for name in wanted:
        visit(name)
    return ordered


def module_data(path: Path) -> bytes:
    """A module's bytes, uncompressed (busybox ``insmod`` reads plain modules only)."""
    return _module_bytes(path)


def main() -> None:
    """``python -m chaos.qemu.kernel``: fetch the kernel into the cache (idempotent)."""
    kernel = fetch_kernel()
    print(f"{kernel.vmlinuz} ({kernel.release})")


if __name__ == "__main__":
    main()
