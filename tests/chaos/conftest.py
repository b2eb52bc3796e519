"""Virtual devices for every lab firmware, and signed lab releases to install on them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import chaos.lab_firmwares  # noqa: F401 (fills LAB_FIRMWARES)
from chaos.lab_image import make_lab_image
from chaos.virtual_device import LAB_FIRMWARES, VirtualDevice
from image_builder.bundle_writer import ImageSource, create_bundle
from signing.keyring import trust_key
from signing.keys import SigningKey, generate_key
from tests.server.conftest import database_url  # noqa: F401 (the server tests' database fixture)

FIRMWARES = sorted(LAB_FIRMWARES)
COMPATIBLE = "lab-device"
CUT_COUNTS: dict[str, int] = {}  # "firmware scenario" -> power cuts tried


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if CUT_COUNTS:
        terminalreporter.section("power cuts tried (one per write boundary)")
        for name, count in sorted(CUT_COUNTS.items()):
            terminalreporter.write_line(f"{name}: {count}")
        terminalreporter.write_line(f"total: {sum(CUT_COUNTS.values())}")


class Releases:
    """Signed lab bundles by name, made on first use."""

    def __init__(self, directory: Path, key: SigningKey) -> None:
        self.directory = directory
        self.key = key

    def bundle(
        self,
        version: str,
        behaviour: str = "healthy",
        *,
        security_version: int = 1,
        compatible: str = COMPATIBLE,
        key: SigningKey | None = None,
        size: int = 256 * 1024,
        compression: str = "zstd",
    ) -> Path:
        name = f"{version}-{behaviour}-{security_version}-{compatible}-{size}-{compression}"
        if key is not None:
            name += f"-{key.key_id[:8]}"
        path = self.directory / f"{name}.bundle"
        if not path.exists():
            image = self.directory / f"{name}.img"
            image.write_bytes(make_lab_image(version, behaviour, size))
            create_bundle(
                path, images=[ImageSource("rootfs", image)], keys=[key or self.key],
                compatible=compatible, version=version, security_version=security_version,
                compression=compression, created=1_700_000_000,
            )  # fmt: skip
        return path


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    directory = tmp_path_factory.mktemp("releases")
    return Releases(directory, generate_key(directory / "release-key"))


@pytest.fixture(scope="session")
def device_templates(
    tmp_path_factory: pytest.TempPathFactory, releases: Releases
) -> dict[str, Path]:
    """A provisioned device per firmware, running 1.0.0 from slot a: copied, never used."""
    templates = {}
    for firmware in FIRMWARES:
        root = tmp_path_factory.mktemp(f"template-{firmware}")
        device = VirtualDevice(root, firmware)
        trust_key(root / "keyring", releases.directory / "release-key.pub")
        device.provision(make_lab_image("1.0.0"), "1.0.0")
        records = device.power_on()
        assert records[-1].action == "confirmed", records
        templates[firmware] = root
    return templates


MakeDevice = Callable[[str], VirtualDevice]


@pytest.fixture
def make_device(tmp_path: Path, device_templates: dict[str, Path]) -> MakeDevice:
    counter = iter(range(1_000_000))

    def make(firmware: str) -> VirtualDevice:
        root = tmp_path / f"{firmware}-{next(counter)}"
        shutil.copytree(device_templates[firmware], root)
        return VirtualDevice(root, firmware)

    return make


from tests.chaos.servers import fleet_servers  # noqa: E402, F401 (a fixture; needs Releases above)
