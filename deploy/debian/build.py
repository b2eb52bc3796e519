"""Build Metrica Fleet's distribution files, and the Debian root the package tests install into.

    build.py dist --out DIR     the wheel, fleet-updater_<version>_all.deb and
                                fleet-server_<version>_<arch>.deb (the server's Python
                                environment comes from the package registry: a build step)
    build.py device --out DIR   the wheel and the device package only, offline
    build.py root --cache DIR   a Debian 12 root (mmdebstrap) holding everything both packages
                                depend on, as DIR/bookworm-<hash>.tar; kept while the tarball
                                exists (the hash covers the package list)

The version is pyproject.toml's. The device package is Debian's own python3 running our pure
Python packages (DEVICE_PACKAGES) from /usr/lib/python3/dist-packages, with Debian's libraries
as its dependencies (deploy/debian/fleet-updater/control). The server needs libraries newer
than Debian 12's, so its package is a self-contained virtual environment in /opt/metrica-fleet
on Debian's python3.11, with /usr/bin/fleet linked into it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent.parent
SUITE = "bookworm"
# What the device runs: `updater` and the packages it imports (the import test in
# tests/integration/test_packages.py proves the list complete, in a Debian root).
DEVICE_PACKAGES = ("fleet_core", "signing", "updater", "bootloader_hooks", "image_builder")
DEVICE_UNITS = ("fleet-updater.service", "fleet-boot-check.service")
SERVER_UNITS = ("fleet-server.service",)
SERVER_PREFIX = "/opt/metrica-fleet"
SERVER_EXTRAS = "server,postgres"
# Debian's own interpreter: the one the packages run on.
DEBIAN_PYTHON = "/usr/bin/python3.11"
# Installed in the test root besides both packages' dependencies.
ROOT_EXTRA_PACKAGES = ("python3",)


def project_version(project: Path = PROJECT) -> str:
    with (project / "pyproject.toml").open("rb") as handle:
        version: str = tomllib.load(handle)["project"]["version"]
    return version


def host_architecture() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def _run(command: Sequence[str | os.PathLike[str]], **options: object) -> None:
    print("+", " ".join(str(part) for part in command), flush=True)
    subprocess.run([str(part) for part in command], check=True, **options)  # type: ignore[call-overload]


# --- the wheel ------------------------------------------------------------------------------------


def build_wheel(out: Path, project: Path = PROJECT) -> Path:
    """``metrica_fleet-<version>-py3-none-any.whl`` in ``out``, built offline from a copy of
    the packages (so nothing is written into the work tree)."""
    with (project / "pyproject.toml").open("rb") as handle:
        includes = tomllib.load(handle)["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({pattern.rstrip("*").split(".")[0] for pattern in includes})
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fleet-wheel-") as scratch:
        source = Path(scratch, "src")
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(project / name, source / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for package in packages:
            shutil.copytree(project / package, source / package, ignore=ignore)
        wheels = Path(scratch, "wheels")
        _run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
             "--no-build-isolation", "--wheel-dir", wheels, source],
        )  # fmt: skip
        (built,) = wheels.glob("*.whl")
        target = out / built.name
        shutil.move(built, target)
    expected = f"metrica_fleet-{project_version(project)}-py3-none-any.whl"
    if target.name != expected:
        raise SystemExit(f"build.py: the wheel is {target.name}, expected {expected}")
    return target


# --- Debian packages --------------------------------------------------------------------------


def _normalize_modes(tree: Path) -> None:
    """Directories 0755, files 0644 unless executable (then 0755); the owner is root (dpkg-deb
    --root-owner-group)."""
    for path in [tree, *tree.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o755)
        else:
            path.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)


def _installed_size_kib(tree: Path) -> int:
    """As dpkg-gencontrol counts it: each file's size rounded up to KiB, one per directory and
    symlink."""
    total = 0
    for path in tree.rglob("*"):
        if path.is_relative_to(tree / "DEBIAN"):
            continue
        if path.is_symlink() or path.is_dir():
            total += 1
        else:
            total += -(-path.stat().st_size // 1024)
    return total


def _control(package: str, tree: Path, **values: str) -> None:
    """DEBIAN/ of ``tree``: the control template of ``package`` filled in, and its conffiles
    and maintainer scripts as they are."""
    source = HERE / package
    debian = tree / "DEBIAN"
    debian.mkdir(parents=True)
    text = (source / "control").read_text()
    values = {**values, "INSTALLED_SIZE": str(_installed_size_kib(tree))}
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    if "@" in re.sub(r"<[^>]*>", "", text):
        raise SystemExit(f"build.py: {package}/control has an unfilled field: {text}")
    (debian / "control").write_text(text)
    for name in ("conffiles", "postinst", "prerm", "postrm"):
        if (source / name).exists():
            shutil.copy2(source / name, debian / name)
            (debian / name).chmod(0o755 if name != "conffiles" else 0o644)


def _dpkg_deb(tree: Path, target: Path, level: int = 6) -> Path:
    """``tree`` as the package ``target``, xz-compressed at ``level`` (dpkg's default is 6; 1
    builds the server's 100 MB in seconds instead of minutes, for a fifth more bytes)."""
    _normalize_modes(tree)
    for name in ("postinst", "prerm", "postrm"):
        if (tree / "DEBIAN" / name).exists():
            (tree / "DEBIAN" / name).chmod(0o755)
    _run(["dpkg-deb", "--root-owner-group", "-Zxz", f"-z{level}", "--build", tree, target],
         stdout=subprocess.DEVNULL)  # fmt: skip
    return target


def _install_file(source: Path, target: Path, mode: int = 0o644) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(mode)


def _docs(tree: Path, package: str, readme: Path) -> None:
    doc = tree / "usr/share/doc" / package
    _install_file(readme, doc / "README.md")
    _install_file(HERE / "copyright", doc / "copyright")


def build_device_deb(wheel: Path, out: Path, project: Path = PROJECT) -> Path:
    """``fleet-updater_<version>_all.deb`` from ``wheel`` and deploy/."""
    version = project_version(project)
    with tempfile.TemporaryDirectory(prefix="fleet-updater-deb-") as scratch:
        tree = Path(scratch, "fleet-updater")
        site = tree / "usr/lib/python3/dist-packages"
        dist_info = f"metrica_fleet-{version}.dist-info"
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                top = member.split("/")[0]
                if top in DEVICE_PACKAGES or (top == dist_info and not member.endswith("RECORD")):
                    archive.extract(member, site)
        # the metadata of what this package holds (importlib.metadata reads the version)
        (site / dist_info / "top_level.txt").write_text("\n".join(sorted(DEVICE_PACKAGES)) + "\n")
        (site / dist_info / "entry_points.txt").write_text(
            "[console_scripts]\nfleet-updater = updater.cli:main\n"
        )
        (site / dist_info / "INSTALLER").write_text("dpkg\n")
        script = tree / "usr/bin/fleet-updater"
        script.parent.mkdir(parents=True)
        script.write_text(
            "#!/usr/bin/python3\nimport sys\n\nfrom updater.cli import main\n\nsys.exit(main())\n"
        )
        script.chmod(0o755)
        for unit in DEVICE_UNITS:
            _install_file(project / "deploy/systemd" / unit, tree / "lib/systemd/system" / unit)
        _install_file(project / "deploy/device/updater.toml", tree / "etc/fleet/updater.toml")
        _docs(tree, "fleet-updater", project / "README.md")
        _control("fleet-updater", tree, VERSION=version)
        out.mkdir(parents=True, exist_ok=True)
        return _dpkg_deb(tree, out / f"fleet-updater_{version}_all.deb")


def _relocate(venv: Path, prefix: str) -> None:
    """Point the scripts and pyvenv.cfg of a virtual environment built at ``venv`` to
    ``prefix``, where it will be installed."""
    for path in [venv / "pyvenv.cfg", *(venv / "bin").iterdir()]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if str(venv).encode() in data:
            path.write_bytes(data.replace(str(venv).encode(), prefix.encode()))


def build_server_deb(wheel: Path, out: Path, project: Path = PROJECT) -> Path:
    """``fleet-server_<version>_<arch>.deb``: a virtual environment holding ``wheel`` with the
    server's dependencies (from the package registry), on Debian's python3.11."""
    version = project_version(project)
    arch = host_architecture()
    with tempfile.TemporaryDirectory(prefix="fleet-server-deb-") as scratch:
        tree = Path(scratch, "fleet-server")
        venv = tree / SERVER_PREFIX.lstrip("/")
        _run([DEBIAN_PYTHON, "-m", "venv", "--without-pip", venv])
        _run(
            [sys.executable, "-m", "pip", "--python", venv / "bin/python", "install", "--quiet",
             "--no-compile", "--no-warn-script-location", f"{wheel}[{SERVER_EXTRAS}]"],
        )  # fmt: skip
        for leftover in venv.glob("lib/python3.11/site-packages/*.dist-info/direct_url.json"):
            leftover.unlink()
        _relocate(venv, SERVER_PREFIX)
        # compiled here, as its users cannot write there; dpkg keeps the sources' times, which
        # the .pyc files record, so they stay valid; paths in them are the installed ones
        _run(
            [DEBIAN_PYTHON, "-m", "compileall", "-q", "-j", "2", "-s", tree, "-p", "/",
             venv / "lib"],
        )  # fmt: skip
        fleet = tree / "usr/bin/fleet"
        fleet.parent.mkdir(parents=True)
        fleet.symlink_to(f"{SERVER_PREFIX}/bin/fleet")
        for unit in SERVER_UNITS:
            _install_file(project / "deploy/systemd" / unit, tree / "lib/systemd/system" / unit)
        _docs(tree, "fleet-server", project / "server/README.md")
        _control("fleet-server", tree, VERSION=version, ARCH=arch)
        out.mkdir(parents=True, exist_ok=True)
        return _dpkg_deb(tree, out / f"fleet-server_{version}_{arch}.deb", level=1)


# --- the test root ----------------------------------------------------------------------------


def control_depends(package: str) -> list[str]:
    """The package names in the Depends field of ``package``'s control template (the first of
    each set of alternatives, without versions)."""
    text = (HERE / package / "control").read_text()
    match = re.search(r"^Depends:(.*(?:\n .*)*)", text, re.MULTILINE)
    if match is None:
        return []
    return [
        re.split(r"[\s(|]", item.strip(), maxsplit=1)[0]
        for item in match.group(1).replace("\n", " ").split(",")
        if item.strip()
    ]


def root_packages() -> list[str]:
    names = {*ROOT_EXTRA_PACKAGES, *control_depends("fleet-updater")}
    names |= set(control_depends("fleet-server"))
    return sorted(names)


def root_tarball(cache: Path) -> Path:
    """Where the root for today's package lists is kept."""
    digest = hashlib.sha256(" ".join([SUITE, *root_packages()]).encode()).hexdigest()[:12]
    return cache / f"{SUITE}-{digest}.tar"


def build_root(cache: Path) -> Path:
    """The Debian root tarball (made once: kept while it exists)."""
    target = root_tarball(cache)
    if target.exists():
        print(f"{target}: already built")
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".tar.partial")
    _run(
        ["mmdebstrap", "--quiet", "--variant=apt", "--format=tar",
         f"--include={','.join(root_packages())}", SUITE, partial],
    )  # fmt: skip
    partial.rename(target)
    for old in cache.glob(f"{SUITE}-*.tar"):
        if old != target:
            old.unlink()
    return target


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("dist", "device"):
        command = commands.add_parser(name)
        command.add_argument("--out", type=Path, required=True)
    commands.add_parser("root").add_argument("--cache", type=Path, required=True)
    args = parser.parse_args(None if argv is None else list(argv))
    if args.command == "root":
        print(build_root(args.cache.resolve()))
        return
    out = args.out.resolve()
    wheel = build_wheel(out)
    built = [wheel, build_device_deb(wheel, out)]
    if args.command == "dist":
        built.append(build_server_deb(wheel, out))
    for path in built:
        print(f"{path} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
