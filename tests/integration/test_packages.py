"""The Debian packages of `make dist` (deploy/debian/build.py), checked with dpkg and installed
into a Debian 12 root made once by `make debian-root` (no network here).

The device package is built here, from the work tree; the server package, whose Python
environment comes from the package registry, is `make dist`'s (build/dist). In the root,
dpkg installs each one offline (every dependency is there), then the device's real code runs
on Debian's own Python libraries: every module we ship imports, each library it loads belongs
to a package that fleet-updater depends on, and ``fleet-updater`` installs a signed bundle
into a lab device's slot. systemd checks the units; the configuration is a conffile that an
upgrade and ``dpkg -r`` keep and ``--purge`` removes."""

from __future__ import annotations

import configparser
import importlib.util
import json
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import chaos.lab_firmwares  # noqa: F401 (fills LAB_FIRMWARES)
from bootloader_hooks.tryboot import TrybootConfig
from chaos.lab_image import make_lab_image
from chaos.virtual_device import VirtualDevice
from signing.keyring import trust_key
from signing.keys import key_id, load_public_key
from updater.identity import PUBLIC_KEY_NAME, identity_dir

PROJECT = Path(__file__).resolve().parents[2]
ROOT_CACHE = PROJECT / "build" / "debian-root"
DIST = PROJECT / "build" / "dist"
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "LANG": "C.UTF-8", "HOME": "/root"}  # fmt: skip
SITE = "/usr/lib/python3/dist-packages"


def _load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "fleet_debian_build", PROJECT / "deploy" / "debian" / "build.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()
VERSION: str = build.project_version()


def run(*command: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, check=False
    )
    if check:
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
    return result


def in_root(
    root: Path, *command: str, check: bool = True, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``command`` run in ``root`` (chroot), with an environment of its own."""
    prefix = ["chroot", *([f"--userspec={user}:{user}"] if user else []), str(root)]
    result = subprocess.run(
        [*prefix, *command], capture_output=True, text=True, env=CHROOT_ENV, check=False
    )
    if check:
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
    return result


def fields(deb: Path) -> dict[str, str]:
    text = run("dpkg-deb", "--field", deb).stdout
    parsed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith(" ") and parsed:
            key = list(parsed)[-1]
            parsed[key] += "\n" + line
        else:
            key, _, value = line.partition(":")
            parsed[key] = value.strip()
    return parsed


def depends(deb: Path) -> set[str]:
    return {item.strip().split()[0] for item in fields(deb).get("Depends", "").split(",") if item}


def contents(deb: Path) -> dict[str, str]:
    """Path in the package -> its ``dpkg -c`` line."""
    listing: dict[str, str] = {}
    for line in run("dpkg", "-c", deb).stdout.splitlines():
        name = line.split(None, 5)[5].split(" -> ")[0]
        listing["/" + name.removeprefix("./").rstrip("/")] = line
    return listing


def control_file(deb: Path, name: str) -> str:
    result = run("dpkg-deb", "--info", deb, name, check=False)
    return result.stdout if result.returncode == 0 else ""


# --- the packages and the root --------------------------------------------------------------


@pytest.fixture(scope="module")
def device_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, PROJECT / "deploy" / "debian" / "build.py", "device", "--out", out)
    return out / f"fleet-updater_{VERSION}_all.deb"


@pytest.fixture(scope="module")
def server_deb() -> Path:
    deb = DIST / f"fleet-server_{VERSION}_{build.host_architecture()}.deb"
    if not deb.exists():
        pytest.fail(f"{deb} is missing: `make dist` builds it (with the package registry)")
    return deb


@pytest.fixture(scope="module")
def root_tarball() -> Path:
    tarball: Path = build.root_tarball(ROOT_CACHE)
    if not tarball.exists():
        pytest.fail(f"{tarball} is missing: `make debian-root` makes it (with mmdebstrap)")
    return tarball


MakeRoot = Callable[[], Path]


@pytest.fixture(scope="module")
def make_root(tmp_path_factory: pytest.TempPathFactory, root_tarball: Path) -> Iterator[MakeRoot]:
    """Fresh copies of the root, removed after the module's tests (250 MB each)."""
    made: list[Path] = []

    def make() -> Path:
        root = tmp_path_factory.mktemp("debian-root")
        made.append(root)
        run("tar", "--extract", "--numeric-owner", "--file", root_tarball, "--directory", root)
        return root

    yield make
    for root in made:
        shutil.rmtree(root)


def dpkg_install(root: Path, deb: Path) -> subprocess.CompletedProcess[str]:
    shutil.copy(deb, root / "tmp" / deb.name)
    try:
        return in_root(root, "dpkg", "--install", f"/tmp/{deb.name}")
    finally:
        (root / "tmp" / deb.name).unlink()


@pytest.fixture(scope="module")
def device_root(make_root: MakeRoot, device_deb: Path) -> Path:
    """A Debian root with fleet-updater installed."""
    root = make_root()
    dpkg_install(root, device_deb)
    return root


# --- the device package -----------------------------------------------------------------------


def test_the_device_package_names_its_version_architecture_and_conffile(device_deb: Path) -> None:
    control = fields(device_deb)
    assert (control["Package"], control["Version"], control["Architecture"]) == (
        "fleet-updater", VERSION, "all"
    )  # fmt: skip
    assert "python3" in depends(device_deb) and "(>= 3.11)" in control["Depends"]
    # the operator's edits survive an upgrade only if dpkg knows the file as configuration
    assert control_file(device_deb, "conffiles").split() == ["/etc/fleet/updater.toml"]


def test_the_device_package_holds_the_command_units_config_and_our_modules(
    device_deb: Path,
) -> None:
    listing = contents(device_deb)
    for path in ("/usr/bin/fleet-updater", "/etc/fleet/updater.toml",
                 "/lib/systemd/system/fleet-updater.service",
                 "/lib/systemd/system/fleet-boot-check.service",
                 f"{SITE}/metrica_fleet-{VERSION}.dist-info/METADATA",
                 "/usr/share/doc/fleet-updater/copyright"):  # fmt: skip
        assert path in listing, sorted(listing)
    assert listing["/usr/bin/fleet-updater"].startswith("-rwxr-xr-x root/root")
    assert all(" root/root " in line for line in listing.values())
    shipped = {
        p.removeprefix(SITE + "/").split("/")[0] for p in listing if p.startswith(SITE + "/")
    }
    assert shipped == {*build.DEVICE_PACKAGES, f"metrica_fleet-{VERSION}.dist-info"}
    assert not [p for p in listing if "__pycache__" in p or p.endswith(".pyc")]


def test_the_device_command_runs_in_debian_root(device_root: Path) -> None:
    result = in_root(device_root, "fleet-updater", "--version")
    assert VERSION in result.stdout.split()
    # the configuration the package installs loads cleanly; this root is no Raspberry Pi, so
    # the tryboot backend cannot read a boot state, which status reports and exits 1 for
    result = in_root(device_root, "fleet-updater", "status", "--json", check=False)
    document = json.loads(result.stdout)
    assert document["config"] == {"problems": [], "source": "/etc/fleet/updater.toml"}
    assert document["backend"] == "tryboot" and "device-tree" in document["bootloader_problem"]
    assert result.returncode == 1


IMPORT_ALL = """
import ast, importlib, json, pkgutil, sys
from pathlib import Path
ours = sys.argv[1:]
named = set()
for name in ours:
    package = importlib.import_module(name)
    for info in pkgutil.walk_packages(package.__path__, name + "."):
        importlib.import_module(info.name)
    # and what a function imports when it runs (requests, pyudev: only where needed)
    for source in Path(package.__path__[0]).rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                named.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                named.add(node.module.split(".")[0])
# _typeshed exists for type checkers only (under TYPE_CHECKING); fastcdc is optional on a
# device (updater.delta.can_cut): without it, delta installs find chunks without cutting
for name in sorted(named - set(sys.stdlib_module_names) - set(ours) - {"_typeshed", "fastcdc"}):
    importlib.import_module(name)
print(json.dumps(sorted({m.__file__ for m in list(sys.modules.values())
                         if getattr(m, "__file__", None)})))
"""


def _dpkg_status(root: Path) -> dict[str, dict[str, str]]:
    packages: dict[str, dict[str, str]] = {}
    text = (root / "var/lib/dpkg/status").read_text()
    for stanza in text.split("\n\n"):
        entry: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line.startswith(" "):
                key, _, value = line.partition(":")
                entry[key] = value.strip()
        if "Package" in entry:
            packages[entry["Package"]] = entry
    return packages


def _closure(root: Path, package: str) -> set[str]:
    """``package`` and everything it depends on, as installed in ``root``."""
    status = _dpkg_status(root)
    provided = {p.split()[0]: name for name, e in status.items()
                for p in e.get("Provides", "").split(",") if p.strip()}  # fmt: skip
    seen: set[str] = set()
    unvisited = [package]
    while unvisited:
        name = unvisited.pop()
        name = name if name in status else provided.get(name, name)
        if name in seen or name not in status:
            continue
        seen.add(name)
        entry = status[name]
        for field in ("Pre-Depends", "Depends"):
            for item in entry.get(field, "").split(","):
                if item.strip():
                    unvisited.append(item.split("|")[0].split()[0].split(":")[0])
    return seen


def _owners(root: Path) -> dict[str, str]:
    owners: dict[str, str] = {}
    for listing in (root / "var/lib/dpkg/info").glob("*.list"):
        package = listing.stem.split(":")[0]
        for line in listing.read_text().splitlines():
            owners[line] = package
    return owners


def test_every_shipped_module_imports_on_debians_libraries_which_the_package_depends_on(
    device_root: Path,
) -> None:
    """What the updater imports at run time, found by importing it: each module of the shipped
    packages imports on Debian 12's Python libraries (cryptography 38, click 8.1, ...), and
    every file it loads is ours or belongs to fleet-updater's dependencies."""
    result = in_root(device_root, "python3", "-c", IMPORT_ALL, *build.DEVICE_PACKAGES)
    loaded = json.loads(result.stdout)
    owners, needed = _owners(device_root), _closure(device_root, "fleet-updater")
    outside = {path: owners.get(path) for path in loaded if owners.get(path) not in needed}
    assert outside == {}, "loaded from packages fleet-updater does not depend on"
    assert any(path.startswith(f"{SITE}/updater/") for path in loaded)


# The programs the updater runs: systemctl for the health checks of type "systemd"
# (updater/health.py), reboot as every boot loader backend's reboot command.
TOOLS = ("systemctl", "reboot")


def test_the_programs_the_updater_runs_come_from_its_dependencies(device_root: Path) -> None:
    assert TrybootConfig().reboot_command[0] == TrybootConfig().plain_reboot_command[0] == "reboot"
    owners, needed = _owners(device_root), _closure(device_root, "fleet-updater")
    for tool in TOOLS:
        found = in_root(device_root, "sh", "-c", f"command -v {tool}", check=False).stdout.strip()
        assert found, f"{tool} is not in the root"
        names = {found, found.removeprefix("/usr"), "/usr" + found}
        assert any(owners.get(name) in needed for name in names), (tool, found)


def _unit(root: Path, name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((root / "lib/systemd/system" / name).read_text())
    return parser


def check_units(root: Path, units: tuple[str, ...]) -> None:
    """``systemd-analyze verify`` finds nothing to say about ``units`` (an ExecStart that is
    not there, a bad setting); their documentation and commands are in the root."""
    paths = [f"/lib/systemd/system/{unit}" for unit in units]
    result = in_root(root, "systemd-analyze", "verify", *paths, check=False)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr
    for unit in units:
        parser = _unit(root, unit)
        for link in parser["Unit"]["Documentation"].split():
            assert link.startswith("file://"), link
            assert (root / link.removeprefix("file:///")).is_file(), f"{unit}: {link}"
        program = shlex.split(parser["Service"]["ExecStart"])[0]
        assert in_root(root, "test", "-x", program, check=False).returncode == 0, program


def test_the_device_units_pass_systemd_analyze_verify(device_root: Path) -> None:
    check_units(device_root, build.DEVICE_UNITS)
    wants = device_root / "etc/systemd/system/multi-user.target.wants"
    assert {p.name for p in wants.iterdir()} >= set(build.DEVICE_UNITS)


def test_the_device_command_installs_a_signed_bundle_in_debian_root(
    device_root: Path, tmp_path: Path
) -> None:
    """Real device code on Debian 12's libraries: a lab device (tryboot) inside the root,
    provisioned with 1.0.0 on the host, is given a bundle signed on the host; fleet-updater in
    the root verifies it (cryptography, zstandard), writes it into slot b and arms the trial."""
    inside = device_root / "srv" / "device"
    device = VirtualDevice(inside, "tryboot")
    key = build_key(tmp_path)
    trust_key(inside / "keyring", tmp_path / "release-key.pub")
    device.provision(make_lab_image("1.0.0"), "1.0.0")
    assert device.power_on()[-1].action == "confirmed"
    bundle = device_root / "srv" / "release.bundle"
    make_bundle(key, tmp_path, bundle, "2.0.0")
    config = device.config_toml().replace(str(device_root), "")
    (inside / "updater.toml").write_text(config)

    def updater(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return in_root(device_root, "fleet-updater", "--config", "/srv/device/updater.toml",
                       *args, check=check)  # fmt: skip

    before = json.loads(updater("status", "--json").stdout)
    assert (before["backend"], before["booted"], before["primary"]) == ("tryboot", "a", "a")
    assert before["slots"]["a"]["version"] == "1.0.0"
    result = updater("install", "/srv/release.bundle", "--no-reboot", check=False)
    assert result.returncode == 3, result.stdout + result.stderr  # installed: reboot required
    after = json.loads(updater("status", "--json").stdout)
    assert after["slots"]["b"]["status"] == "trial" and after["slots"]["b"]["version"] == "2.0.0"
    assert device.image("b") is not None and device.image("b").version == "2.0.0"  # type: ignore[union-attr]

    # the device's identity: an Ed25519 key made by Debian's cryptography, read back on the host
    made = in_root(device_root, "python3", "-c", MAKE_IDENTITY, "/srv/device/data").stdout.strip()
    assert made == key_id(load_public_key(identity_dir(inside / "data") / PUBLIC_KEY_NAME))
    assert in_root(device_root, "python3", "-c", MAKE_IDENTITY, "/srv/device/data").stdout \
        .strip() == made  # fmt: skip


MAKE_IDENTITY = """
import sys
import time
import urllib.request
from pathlib import Path
from updater.identity import load_or_create_identity
print(load_or_create_identity(Path(sys.argv[1]))[0].device_id)
"""


def build_key(directory: Path) -> Any:
    from signing.keys import generate_key

    return generate_key(directory / "release-key")


def make_bundle(key: Any, scratch: Path, out: Path, version: str) -> None:
    from image_builder.bundle_writer import ImageSource, create_bundle

    image = scratch / f"{version}.img"
    image.write_bytes(make_lab_image(version))
    create_bundle(
        out, images=[ImageSource("rootfs", image)], keys=[key], compatible="lab-device",
        version=version, security_version=1, compression="zstd", created=1_700_000_000,
    )  # fmt: skip


def test_the_configuration_survives_upgrade_and_removal_and_goes_with_purge(
    make_root: MakeRoot, device_deb: Path
) -> None:
    root = make_root()
    dpkg_install(root, device_deb)
    config = root / "etc/fleet/updater.toml"
    edited = config.read_text() + "# the operator's edit\n"
    config.write_text(edited)
    dpkg_install(root, device_deb)  # an upgrade (to the same version) keeps the operator's file
    assert config.read_text() == edited

    in_root(root, "dpkg", "--remove", "fleet-updater")
    assert config.read_text() == edited, "dpkg -r must keep the configuration"
    assert in_root(root, "dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "fleet-updater").stdout \
        .strip() == "rc"  # fmt: skip
    assert not (root / "usr/bin/fleet-updater").exists()
    leftovers = [p for name in build.DEVICE_PACKAGES for p in (root / SITE.lstrip("/")).glob(name)]
    assert leftovers == [], "removal left module directories behind (compiled files?)"

    in_root(root, "dpkg", "--purge", "fleet-updater")
    assert not config.exists()
    assert in_root(root, "dpkg-query", "-W", "fleet-updater", check=False).returncode != 0


# --- the server package -----------------------------------------------------------------------


def test_the_server_package_names_its_version_architecture_and_dependencies(
    server_deb: Path,
) -> None:
    control = fields(server_deb)
    assert (control["Package"], control["Version"], control["Architecture"]) == (
        "fleet-server", VERSION, build.host_architecture()
    )  # fmt: skip
    assert {"python3.11", "adduser", "systemd"} <= depends(server_deb)
    listing = contents(server_deb)
    for path in ("/opt/metrica-fleet/bin/fleet", "/opt/metrica-fleet/pyvenv.cfg",
                 "/lib/systemd/system/fleet-server.service",
                 "/usr/share/doc/fleet-server/README.md"):  # fmt: skip
        assert path in listing, path
    assert listing["/usr/bin/fleet"].endswith("-> /opt/metrica-fleet/bin/fleet")
    assert not [p for p in listing if "__pycache__" in p and not p.startswith("/opt/")]


@pytest.fixture(scope="module")
def server_root(make_root: MakeRoot, server_deb: Path) -> Iterator[Path]:
    root = make_root()
    dpkg_install(root, server_deb)
    yield root


def test_the_server_runs_from_its_own_environment_in_debian_root(server_root: Path) -> None:
    assert VERSION in in_root(server_root, "fleet", "--version").stdout.split()
    # the server's libraries (SQLAlchemy, Alembic) create its database as the fleet user
    data = server_root / "var/lib/fleet-server"
    assert (data.stat().st_mode & 0o777, data.stat().st_uid) == (
        0o700, int(in_root(server_root, "id", "-u", "fleet").stdout)
    )  # fmt: skip
    data_dir = ("--data-dir", "/var/lib/fleet-server")
    in_root(server_root, "fleet", "server", "token", "create", "--role", "admin", "--name", "ops",
            *data_dir, user="fleet")  # fmt: skip
    listing = in_root(server_root, "fleet", "server", "token", "list", "--json", *data_dir,
                      user="fleet").stdout  # fmt: skip
    assert "ops" in listing
    assert any(data.iterdir())
    check_units(server_root, build.SERVER_UNITS)


def test_the_server_serves_http_from_debian_root(server_root: Path, tmp_path: Path) -> None:
    """FastAPI and uvicorn from the package's environment answer on loopback, as the unit runs
    them (the fleet user, the data directory), on a socket the test holds."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        ["chroot", "--userspec=fleet:fleet", str(server_root), "fleet", "server", "run",
         "--data-dir", "/var/lib/fleet-server", "--fd", str(listener.fileno())],
        env=CHROOT_ENV, pass_fds=[listener.fileno()], stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    listener.close()
    try:
        deadline = time.monotonic() + 60
        answer = None
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    answer = json.load(r)
            except OSError:
                time.sleep(0.1)
        assert answer is not None, (tmp_path / "server.log").read_text()
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_the_server_environment_names_no_build_directory(server_deb: Path, tmp_path: Path) -> None:
    """A script or pyvenv.cfg naming the directory it was built in would not run once
    installed."""
    tree = tmp_path / "tree"
    run("dpkg-deb", "--extract", server_deb, tree)
    for path in [
        tree / "opt/metrica-fleet/pyvenv.cfg",
        *(tree / "opt/metrica-fleet/bin").iterdir(),
    ]:
        if path.is_file() and not path.is_symlink():
            assert b"fleet-server-deb" not in path.read_bytes(), path
