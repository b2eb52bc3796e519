"""Virtual devices for every lab firmware, and signed lab releases to install on them."""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import chaos.lab_firmwares  # noqa: F401 (fills LAB_FIRMWARES)
from bootloader_hooks import ubootenv
from chaos.lab_image import make_lab_image
from chaos.virtual_device import LAB_FIRMWARES, VirtualDevice
from image_builder.bundle_writer import ImageSource, create_bundle
from signing.keyring import trust_key
from signing.keys import SigningKey
from tests.conftest import require_tools
from tests.server.conftest import database_url  # noqa: F401 (the server tests' database fixture)

FIRMWARES = sorted(LAB_FIRMWARES)
COMPATIBLE = "lab-device"

# --- how many power cuts, and which ------------------------------------------------------------
#
# The power-cut tests (test_power_cuts.py, test_delta_power_cuts.py) run a scenario once per
# cut sequence: one cut at a write boundary, or two (a second one while the device recovers
# from the first). FLEET_POWER_CUTS chooses how many:
# - ci (the default, `make test`): every boundary of the first and the delta installs once,
#   a sample of the later installs' boundaries, and a few second cuts per scenario (about 850
#   sequences, 1,000 cuts);
# - long (`make test-power-cuts-long`): every boundary of every scenario, and second cuts
#   until each scenario has run LONG_SEQUENCES sequences, or has no pair of cuts left to try
#   (about 10,700 sequences, 20,500 cuts: 7 to 8 minutes of one core).
# Which boundaries a sample takes comes from FLEET_POWER_CUT_SEED: fixed in ci mode (CI_SEED, so
# a failure comes back on the next run), drawn anew for each long run. The summary at the end
# prints the seed; giving it back repeats a run's cuts exactly.
POWER_CUTS_ENV = "FLEET_POWER_CUTS"
POWER_CUT_SEED_ENV = "FLEET_POWER_CUT_SEED"
CI_SEED = 1
CI_SECOND_CUTS = 3  # per scenario in ci mode: keeps the two-cut path tested on every run
LONG_SEQUENCES = 600  # per scenario in long mode: 18 scenarios, 10,800 sequences


@dataclass(frozen=True)
class PowerCutMode:
    """The power-cut tests' mode (``ci`` or ``long``) and the seed of their samples."""

    name: str
    seed: int

    def rng(self, scenario: str) -> random.Random:
        """The sampler of one scenario: depends on the seed and the scenario alone, so a run of
        one test chooses what the same test chose in a whole run."""
        return random.Random(f"{self.seed} {scenario}")  # noqa: S311 (which cuts, not a secret)

    def second_cuts(self, sequences: int) -> int:
        """How many two-cut sequences a scenario adds to its ``sequences`` of one cut."""
        if self.name == "long":
            return max(LONG_SEQUENCES - sequences, 0)
        return CI_SECOND_CUTS


def power_cut_mode(environ: Mapping[str, str] = os.environ) -> PowerCutMode:
    """The mode that ``FLEET_POWER_CUTS`` and ``FLEET_POWER_CUT_SEED`` ask for.

    Raises:
        pytest.UsageError: an unknown mode, or a seed that is not a non-negative integer.
    """
    name = environ.get(POWER_CUTS_ENV, "").strip() or "ci"
    if name not in ("ci", "long"):
        raise pytest.UsageError(f"{POWER_CUTS_ENV}={name!r}: the modes are ci and long")
    text = environ.get(POWER_CUT_SEED_ENV, "").strip()
    if not text:
        return PowerCutMode(name, CI_SEED if name == "ci" else secrets.randbelow(1 << 32))
    if not text.isdigit():
        raise pytest.UsageError(
            f"{POWER_CUT_SEED_ENV}={text!r}: a seed is a non-negative integer (as printed at the "
            "end of a run)"
        )
    return PowerCutMode(name, int(text))


_MODE: list[PowerCutMode] = []


@pytest.fixture(scope="session")
def cut_mode() -> PowerCutMode:
    """The session's :class:`PowerCutMode`, read once in ``pytest_configure``."""
    return _MODE[0]


# "firmware scenario" -> power cuts made, and cut sequences run (a sequence makes one or two)
CUT_COUNTS: Counter[str] = Counter()
CUT_SEQUENCES: Counter[str] = Counter()


def count_cuts(firmware: str, scenario: str, cuts: int) -> None:
    """Count one sequence of ``cuts`` power cuts (counted as they happen: a failing run still
    reports how far it went)."""
    key = f"{firmware:<8} {scenario}"
    CUT_COUNTS[key] += cuts
    CUT_SEQUENCES[key] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not CUT_COUNTS:
        return
    mode = _MODE[0]
    write = terminalreporter.write_line
    terminalreporter.section(f"power cuts ({POWER_CUTS_ENV}={mode.name}, seed {mode.seed})")
    for name in sorted(CUT_COUNTS):
        write(f"{name}: {CUT_COUNTS[name]} cuts in {CUT_SEQUENCES[name]} sequences")
    by_firmware: Counter[str] = Counter()
    for name, count in CUT_COUNTS.items():
        by_firmware[name.split()[0]] += count
    write("per firmware: " + ", ".join(f"{f} {c}" for f, c in sorted(by_firmware.items())))
    write(f"total: {sum(CUT_COUNTS.values())} cuts in {sum(CUT_SEQUENCES.values())} sequences")
    write(f"repeat: {POWER_CUTS_ENV}={mode.name} {POWER_CUT_SEED_ENV}={mode.seed}")


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
def device_templates(
    tmp_path_factory: pytest.TempPathFactory, releases: Releases
) -> dict[str, Path]:
    """A provisioned device per firmware, running 1.0.0 from slot a: copied, never used."""
    return {
        firmware: provision_template(tmp_path_factory.mktemp(f"template-{firmware}"), firmware,
                                     releases)
        for firmware in FIRMWARES
    }  # fmt: skip


def provision_template(root: Path, firmware: str, releases: Releases) -> Path:
    """A device in ``root`` running 1.0.0 from slot a, confirmed, trusting ``releases``' key."""
    device = VirtualDevice(root, firmware)
    trust_key(root / "keyring", releases.directory / "release-key.pub")
    device.provision(make_lab_image("1.0.0"), "1.0.0")
    records = device.power_on()
    assert records[-1].action == "confirmed", records
    return root


MakeDevice = Callable[[str], VirtualDevice]


class DeviceCopies:
    """Fresh copies of the template device in ``root``, for ``firmware``: each call replaces the
    copy before it. A long power-cut run makes thousands of copies of a few MiB each; only the
    last stays on disk (after a failure, the device that failed)."""

    def __init__(self, template: Path, root: Path, firmware: str) -> None:
        self.template = template
        self.root = root
        self.firmware = firmware

    def __call__(self) -> VirtualDevice:
        if self.root.exists():
            shutil.rmtree(self.root)
        shutil.copytree(self.template, self.root)
        return VirtualDevice(self.root, self.firmware)


def second_cuts(
    rng: random.Random, firsts: Sequence[int], length: Callable[[int], int], count: int
) -> list[tuple[int, int]]:
    """``count`` distinct (first cut, second cut) pairs, fewer if there are not as many: a first
    cut drawn from ``firsts``, then a second one among the ``length(first)`` write boundaries
    the device reaches while it recovers from the first. Drawn in order by ``rng`` alone, so a
    seed gives the same pairs again."""
    chosen: set[tuple[int, int]] = set()
    open_firsts = sorted(firsts)
    while len(chosen) < count and open_firsts:
        first = rng.choice(open_firsts)
        boundaries = length(first)
        taken = sum(1 for f, _ in chosen if f == first)
        if taken >= boundaries:
            open_firsts.remove(first)
            continue
        chosen.add((first, rng.choice([j for j in range(boundaries) if (first, j) not in chosen])))
    return sorted(chosen)


@pytest.fixture
def make_device(tmp_path: Path, device_templates: dict[str, Path]) -> MakeDevice:
    counter = iter(range(1_000_000))

    def make(firmware: str) -> VirtualDevice:
        root = tmp_path / f"{firmware}-{next(counter)}"
        shutil.copytree(device_templates[firmware], root)
        return VirtualDevice(root, firmware)

    return make


# --- the boot state as the firmware finds it --------------------------------------------------


def _run(*command: str) -> str:
    require_tools(**{command[0]: shutil.which(command[0]) is not None})
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
    return result.stdout


def _assignments(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def firmware_env(device: VirtualDevice) -> dict[str, str]:
    """The device's boot state read by the firmware's own tools, not by our code: GRUB's
    ``grub-editenv list``, libubootenv's ``fw_printenv`` (through a ``fw_env.config`` naming
    the environment's copies), and for the Raspberry Pi firmware ``autoboot.txt`` read the
    way the firmware does (comments skipped, ``section.key`` as keys)."""
    firmware = device.lab.backend
    if firmware == "grub":
        return _assignments(_run("grub-editenv", device.options["grubenv"], "list"))
    if firmware == "uboot":
        config = device.root / "fw_env.config"
        backend: Any = device.runtime().backend
        config.write_text(ubootenv.format_fw_env_config(backend.layout))
        return _assignments(_run("fw_printenv", "-c", str(config)))
    assert firmware == "tryboot", firmware
    variables: dict[str, str] = {}
    section = "all"
    for line in Path(device.options["autoboot_txt"]).read_text().splitlines():
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            variables[f"{section}.{key}"] = value
    return variables


@dataclass(frozen=True)
class BootView:
    """What the firmware will boot, from :func:`firmware_env` and from the backend (each slot's
    attempts left), and what each root slot holds."""

    env: Mapping[str, str]
    committed: str | None  # the slot the firmware boots once no trial is pending
    trial: str | None  # the slot armed for a trial, if any
    bootable: frozenset[str]  # root slots the firmware may still start, or fall back to
    slots: Mapping[str, str]  # SHA-256 of each root slot's bytes


def _slot_digits(env: Mapping[str, str], slot: str) -> int:
    value = env.get(f"BOOT_{slot.upper()}_LEFT", "")
    return int(value) if len(value) == 1 and value.isdigit() else 0


def boot_view(device: VirtualDevice) -> BootView:
    """The device's :class:`BootView`. The firmware's reading and the backend's must agree on
    the committed slot."""
    backend: Any = device.runtime().backend
    env = firmware_env(device)
    if device.lab.backend == "tryboot":
        slot_of = {part: slot for slot, part in backend.config.partitions.items()}
        committed = slot_of.get(int(env["all.boot_partition"]))
        armed = slot_of.get(int(env["tryboot.boot_partition"]))
        committed = None if committed == "safe" else committed
        trial = armed if armed not in (committed, "safe") else None
        by_firmware = {committed} - {None}
    else:
        order = [w.lower() for w in env.get("BOOT_ORDER", "").split() if w in ("A", "B")]
        by_firmware = {s for s in order if _slot_digits(env, s) > 0}
        trial = env.get("FLEET_TRIAL", "").lower() or None
        committed = next((s for s in order if s in by_firmware and s != trial), None)
    assert backend.primary() == committed, (env, backend.primary())
    by_backend = {s for s in ("a", "b") if backend.attempts_left(s) > 0}
    slots = {s: hashlib.sha256(device.slot_path(s).read_bytes()).hexdigest() for s in "ab"}
    return BootView(
        env, committed, trial, frozenset(str(s) for s in by_firmware | by_backend), slots
    )


from tests.chaos.servers import fleet_servers  # noqa: E402, F401 (a fixture; needs Releases above)

# --- the stateful tests' step counts -----------------------------------------------------------

STATEFUL_STEPS: dict[str, int] = {}  # firmware -> steps run by tests/chaos/test_stateful.py


class _StatefulSummary:
    @staticmethod
    def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
        if STATEFUL_STEPS:
            terminalreporter.section("stateful steps run (per firmware)")
            for firmware, count in sorted(STATEFUL_STEPS.items()):
                terminalreporter.write_line(f"{firmware}: {count}")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_StatefulSummary(), "fleet-stateful-summary")
    _MODE[:] = [power_cut_mode()]
