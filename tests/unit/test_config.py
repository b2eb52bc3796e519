"""The updater configuration: strict validation, and fallback instead of failure."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from updater.config import LAST_GOOD_NAME, ConfigError, UpdaterConfig, load_config, parse_config

GOOD = b"""
compatible = "metrica-rpi4"
keyring = "/etc/fleet/keyring"
data_dir = "DATA"

[bootloader]
backend = "grub"
grubenv = "/boot/efi/EFI/fleet/grubenv"

[slots.a]
rootfs = "PARTLABEL=root_a"
bootfs = "PARTLABEL=boot_a"
[slots.b]
rootfs = "PARTLABEL=root_b"
bootfs = "PARTLABEL=boot_b"

[limits]
min_free_mb = 300
max_temperature_c = 75
update_deadline_s = 600

[health]
deadline_s = 60
[[health.checks]]
type = "systemd"
unit = "camera.service"
[[health.checks]]
type = "http"
url = "http://127.0.0.1:8080/health"
timeout_s = 5
[[health.checks]]
type = "command"
argv = ["/usr/bin/true"]

[server]
urls = ["https://fleet.example.net", "https://fleet-backup.example.net"]

[metrics]
textfile = "/var/lib/node_exporter/textfile/fleet.prom"
"""


def good(tmp_path: Path) -> bytes:
    return GOOD.replace(b"DATA", str(tmp_path / "data").encode())


def test_full_configuration(tmp_path: Path) -> None:
    config = parse_config(good(tmp_path), "updater.toml")
    assert config.compatible == "metrica-rpi4"
    assert config.bootloader == {"backend": "grub", "grubenv": "/boot/efi/EFI/fleet/grubenv"}
    assert config.slots["b"]["bootfs"] == "PARTLABEL=boot_b"
    assert config.limits.max_temperature_c == 75.0
    assert [c.type for c in config.health.checks] == ["systemd", "http", "command"]
    assert config.health.checks[1].timeout_s == 5
    assert len(config.server_urls) == 2
    assert config.metrics_textfile == Path("/var/lib/node_exporter/textfile/fleet.prom")


def test_defaults_are_safe() -> None:
    config = UpdaterConfig()
    assert config.keyring is None and config.compatible is None
    assert config.slots["a"] == {"rootfs": "PARTLABEL=root_a", "bootfs": "PARTLABEL=boot_a"}
    assert config.limits.min_free_mb == 500 and config.limits.max_temperature_c == 80
    assert config.limits.update_deadline_s == 900


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"compatible = 3", "compatible: must be str"),
        (b"colour = 'blue'", "unknown setting"),
        (b"[limits]\nmin_free_mb = -1", "must not be negative"),
        (b"[limits]\nmin_free_mb = true", "must be int"),
        (b"[limits]\nmax_temp = 1", "unknown setting"),
        (b"[slots.a]\nrootfs = 'x'", "both root slots"),
        (b"[slots.a]\nrootfs='x'\n[slots.b]\nbootfs='y'", "needs rootfs"),
        (b"[slots.a]\nrootfs='x'\n[slots.b]\nrootfs='y'\nbootfs='z'", "same slot classes"),
        (b"[slots.c]\nrootfs='x'", "unknown setting"),
        (b"[[health.checks]]\ntype = 'ping'", "not one of"),
        (b"[[health.checks]]\ntype = 'http'", "http check needs url"),
        (b"[[health.checks]]\ntype = 'command'\nargv = []", "non-empty list"),
        (b"[[health.checks]]\ntype = 'tcp'\nport = 1\ntimeout_s = 0", "must be positive"),
        (b"[health]\ndeadline_s = 0", "must be positive"),
        (b"[server]\nurls = ['ftp://x']", r"http\(s\) URLs"),
        (b"[metrics]\nport = 70000", "1-65535"),
        (b"bootloader = 'grub'", "must be a table"),
        (b"this is not toml", "not valid TOML"),
        (b"compatible = '\xff'", "not UTF-8"),
    ],
)
def test_invalid_configuration_names_the_setting(text: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(text, "updater.toml")
    assert str(info.value).startswith("updater.toml: ")


def test_missing_config_uses_defaults_and_says_so(tmp_path: Path) -> None:
    loaded = load_config(tmp_path / "missing.toml", data_dir=tmp_path / "data")
    assert loaded.source == "defaults"
    assert loaded.config.keyring is None
    assert "cannot read" in loaded.problems[0]


def test_corrupted_config_falls_back_to_last_good(tmp_path: Path) -> None:
    path = tmp_path / "updater.toml"
    path.write_bytes(good(tmp_path))
    first = load_config(path, data_dir=tmp_path / "data")
    assert first.source == str(path) and not first.problems
    assert (tmp_path / "data" / LAST_GOOD_NAME).read_bytes() == good(tmp_path)

    path.write_bytes(good(tmp_path)[:200] + b"\x00\x00garbage")
    second = load_config(path, data_dir=tmp_path / "data")
    assert second.source.endswith(LAST_GOOD_NAME)
    assert second.config == first.config
    assert len(second.problems) == 1 and str(path) in second.problems[0]


def test_corrupted_config_and_last_good_give_defaults(tmp_path: Path) -> None:
    path = tmp_path / "updater.toml"
    path.write_text("compatible = [")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / LAST_GOOD_NAME).write_text("also = [broken")
    loaded = load_config(path, data_dir=tmp_path / "data")
    assert loaded.source == "defaults"
    assert len(loaded.problems) == 2


@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_the_loader(data: bytes) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(data, "x")


@given(position=st.integers(min_value=0), xor=st.integers(min_value=1, max_value=255))
def test_any_damaged_byte_gives_a_config_or_config_error(position: int, xor: int) -> None:
    data = bytearray(GOOD)
    data[position % len(data)] ^= xor
    with contextlib.suppress(ConfigError):
        parse_config(bytes(data), "x")


@pytest.mark.parametrize("text", [b"x = " + b"9" * 5000, b"x = " + b"[" * 100_000])
def test_hostile_toml_is_a_config_error(text: bytes) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config(text, "x")
