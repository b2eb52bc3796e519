"""Fixtures shared by every tier: keys, keyrings and small bundles built the product's way;
the Hypothesis profiles; and the check that a run which asked for PostgreSQL got it."""

from __future__ import annotations

import io
import os
import socket
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from click.testing import Result
from hypothesis import settings

from image_builder.bundle import SIGNATURE_PURPOSE
from image_builder.bundle_writer import ImageSource, create_bundle
from image_builder.container import END_OF_ARCHIVE, MemberHeader, encode_header, padding
from signing.keyring import Keyring, trust_key
from signing.keys import SigningKey, generate_key
from signing.signature import sign

if TYPE_CHECKING:
    from bootloader_hooks.ubootenv import EnvLayout
    from tests.chaos.conftest import Releases

# Hypothesis profiles. No deadline anywhere: the properties write files and sign bundles, and
# a loaded machine (or coverage's tracer) makes a 200 ms deadline fail at random.
# - ci: `make test` and CI=true. Derandomized, so a run is repeatable and a failure shows up
#   again on the next run; the failing example's blob is printed for @reproduce_failure.
# - dev: the default by hand. Random examples, so repeated runs explore further.
# - long: HYPOTHESIS_PROFILE=long, for a soak. Ten times the default examples; a test whose
#   @settings names its own max_examples keeps that number.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True, database=None)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.register_profile("long", deadline=None, print_blob=True, max_examples=1000)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE")
    or ("ci" if os.environ.get("CI", "").lower() == "true" else "dev")
)

PG_ENV = "FLEET_TEST_DATABASE_URL"
REQUIRE_PG_ENV = "FLEET_TEST_REQUIRE_POSTGRES"


def pytest_sessionstart(session: pytest.Session) -> None:
    """`make test` sets FLEET_TEST_REQUIRE_POSTGRES=1: its "SQLite and PostgreSQL" tests must
    run on both, so a missing URL or an unreachable server stops the run before any test,
    rather than letting it pass on SQLite alone. By hand, without the variable, a run without
    the URL is a SQLite-only run."""
    if os.environ.get(REQUIRE_PG_ENV) != "1":
        return
    url = os.environ.get(PG_ENV, "")
    if not url:
        raise pytest.UsageError(
            f"{REQUIRE_PG_ENV}=1 but {PG_ENV} is empty: PostgreSQL did not start "
            "(tests/postgres.sh prints the URL)"
        )
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    try:
        engine = create_engine(url, connect_args={"connect_timeout": 10})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except SQLAlchemyError as err:
        raise pytest.UsageError(
            f"{REQUIRE_PG_ENV}=1 but PostgreSQL at {PG_ENV} cannot be reached: {err}"
        ) from err


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return generate_key(tmp_path / "keys" / "release")


@pytest.fixture
def keyring_dir(tmp_path: Path, key: SigningKey) -> Path:
    directory = tmp_path / "keyring"
    trust_key(directory, tmp_path / "keys" / "release.pub")
    return directory


@pytest.fixture
def keyring(keyring_dir: Path) -> Keyring:
    return Keyring.load(keyring_dir)


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """Write a file of ``size`` patterned bytes (compressible, not trivially so)."""

    def make(name: str = "rootfs.img", size: int = 3000, seed: int = 7) -> Path:
        path = tmp_path / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pattern = bytes((i * seed + i // 251) % 256 for i in range(4096))
        path.write_bytes((pattern * (size // len(pattern) + 1))[:size])
        return path

    return make


@pytest.fixture
def make_bundle(
    tmp_path: Path, key: SigningKey, make_image: Callable[..., Path]
) -> Callable[..., Path]:
    def make(
        name: str = "release.bundle",
        *,
        compression: str = "none",
        size: int = 3000,
        bootfs: bool = False,
        keys: list[SigningKey] | None = None,
        version: str = "1.0.0",
        security_version: int = 1,
        compatible: str = "metrica-rpi4",
        chunked: bool = True,
    ) -> Path:
        images = [ImageSource("rootfs", make_image("rootfs.ext4", size))]
        if bootfs:
            images.append(ImageSource("bootfs", make_image("bootfs.vfat", size // 2, seed=11)))
        output = tmp_path / name
        create_bundle(
            output,
            images=images,
            keys=keys or [key],
            compatible=compatible,
            version=version,
            security_version=security_version,
            compression=compression,
            created=1_700_000_000,
            chunked=chunked,
        )
        return output

    return make


def raw_bundle(members: list[tuple[str, bytes]], mtime: int = 1_700_000_000) -> bytes:
    """A canonical container holding exactly ``members`` (for forging malformed bundles)."""
    out = io.BytesIO()
    for name, data in members:
        out.write(encode_header(MemberHeader(name, len(data), mtime)))
        out.write(data + bytes(padding(len(data))))
    out.write(END_OF_ARCHIVE)
    return out.getvalue()


def signed_members(manifest_bytes: bytes, key: SigningKey) -> list[tuple[str, bytes]]:
    """``manifest.json`` and a valid ``manifest.sig`` for arbitrary manifest bytes."""
    envelope = sign(manifest_bytes, [key], SIGNATURE_PURPOSE)
    return [("manifest.json", manifest_bytes), ("manifest.sig", envelope.to_bytes())]


def tar_with(members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> bytes:
    """A tar archive made by Python's tarfile, for member kinds our writer refuses to make."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for info in members:
            payload = (data or {}).get(info.name)
            archive.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out.getvalue()


def assert_one_line_error(result: Result, fragment: str) -> None:
    """A command failed the project's way: exit 1, one ``Error: …`` line naming the problem,
    no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ")
    assert fragment in lines[0], lines[0]


def require_tools(**present: bool) -> None:
    """Fail, never skip, when a tool the tests run for real is missing (``name=found``):
    `make test` installs every one, so a missing tool is a broken install step, and a skip
    would let the tier pass without testing anything."""
    missing = sorted(name for name, found in present.items() if not found)
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: `make deps` installs it (make test does)", pytrace=False
        )


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test: bound and never listening,
    so no other process can start listening there meanwhile (a port probed and closed could be
    taken by anyone before the test connects)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port: int = holder.getsockname()[1]
        yield port


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    """Signed lab bundles for virtual devices, made on first use and shared by every tier."""
    from tests.chaos.conftest import Releases  # the lab's conftest imports this module

    directory = tmp_path_factory.mktemp("releases")
    return Releases(directory, generate_key(directory / "release-key"))


# --- U-Boot environment layouts, as fw_env.config describes them --------------------------------

UBOOT_LAYOUT_KINDS = ["file", "offset", "redundant", "two-files"]


def uboot_layout(tmp_path: Path, kind: str, size: int) -> EnvLayout:
    """An environment layout of ``kind`` under ``tmp_path``, every copy blank (invalid): one
    file; one copy at an offset of a disk image; a redundant pair in one image; two files."""
    from bootloader_hooks.ubootenv import EnvCopy, EnvLayout

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * size))
    if kind == "file":
        (tmp_path / "uboot.env").write_bytes(bytes(size))
        return EnvLayout.single(tmp_path / "uboot.env", size)
    if kind == "offset":
        return EnvLayout.single(image, size, size)
    if kind == "two-files":
        for name in ("uboot.env", "uboot-redund.env"):
            (tmp_path / name).write_bytes(bytes(size))
        return EnvLayout(
            size, (EnvCopy(tmp_path / "uboot.env"), EnvCopy(tmp_path / "uboot-redund.env"))
        )
    return EnvLayout.redundant_pair(image, size, size, 3 * size)
