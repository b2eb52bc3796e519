"""The QEMU tier: the reference disk booted by OVMF and GRUB under qemu-system-x86_64.

Needs the Debian packages qemu-system-x86, ovmf, grub-efi-amd64-bin and busybox-static
(``make deps``); the Debian kernel is fetched and cached by the first test that needs it
(``build/qemu-cache``, or ``FLEET_QEMU_CACHE``). Without those packages the tier fails,
saying which one is missing.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest

from chaos.qemu.device import BUSYBOX, QemuLab, ReferenceDevice
from chaos.qemu.machine import OVMF_CODE, QEMU
from image_builder.disk import GRUB_EFI_DIR
from tests.conftest import require_tools

FIGURES: dict[str, str] = {}  # name -> value, printed at the end of the run


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("QEMU reference device")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def qemu_lab(tmp_path_factory: pytest.TempPathFactory) -> QemuLab:
    require_tools(**{
        "qemu-system-x86": shutil.which(QEMU) is not None,
        "ovmf": OVMF_CODE.is_file(),
        "grub-efi-amd64-bin": (GRUB_EFI_DIR / "normal.mod").is_file(),
        "busybox-static": BUSYBOX.is_file(),
        "mtools": shutil.which("mcopy") is not None,
    })  # fmt: skip
    return QemuLab(tmp_path_factory.mktemp("qemu-lab"))


@pytest.fixture
def device(qemu_lab: QemuLab, request: pytest.FixtureRequest) -> Iterator[ReferenceDevice]:
    name = request.node.name.replace("[", "-").replace("]", "")
    reference = qemu_lab.device(name)
    started = time.monotonic()
    try:
        yield reference
    finally:
        reference.shut_down()
        boots = len(reference.boots)
        FIGURES[f"{name}: boots"] = f"{boots} in {time.monotonic() - started:.0f} s"
        ready = [b.seconds for b in reference.boots if b.outcome == "ready" and b.seconds]
        if ready:
            FIGURES.setdefault("power-on to user space ready (first boot)", f"{ready[0]:.1f} s")
