"""The updater configuration: strict validation, and fallback instead of failure."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootloader_hooks.errors import BootloaderError
from updater.config import (
    LAST_GOOD_NAME,
    ConfigError,
    LoadedConfig,
    UpdaterConfig,
    load_config,
    parse_config,
)

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
        (b"[limits]\nmin_free_mb = -1", r"min_free_mb: must be an integer from 0 to 16777216 MB"),
        (b"[limits]\nmin_free_mb = true", "must be int"),
        (b"[limits]\nmax_temp = 1", "unknown setting"),
        (b"[slots.a]\nrootfs = 'x'", "both root slots"),
        (b"[slots.a]\nrootfs='/x'\n[slots.b]\nbootfs='/y'", "needs rootfs"),
        (b"[slots.a]\nrootfs='/x'\n[slots.b]\nrootfs='/y'\nbootfs='/z'", "same slot classes"),
        (
            b"[slots.a]\nrootfs='slot-a.img'\n[slots.b]\nrootfs='/y'",
            r"^updater.toml: slots.a.rootfs: must be PARTLABEL=<label> or an absolute path, "
            r"not 'slot-a.img'$",
        ),
        (b"[slots.a]\nrootfs='./a'\n[slots.b]\nrootfs='/y'", "slots.a.rootfs: must be PARTLABEL"),
        (b"[slots.a]\nrootfs='/x'\n[slots.b]\nrootfs=''", "slots.b.rootfs: must be PARTLABEL"),
        (
            b"[slots.a]\nrootfs='PARTLABEL='\n[slots.b]\nrootfs='/y'",
            "slots.a.rootfs: 'PARTLABEL=' names no partition label",
        ),
        (
            b"[slots.a]\nrootfs='PARTLABEL=../root'\n[slots.b]\nrootfs='/y'",
            "names no partition label",
        ),
        (b"[slots.c]\nrootfs='x'", "unknown setting"),
        (b"[[health.checks]]\ntype = 'ping'", "not one of"),
        (b"[[health.checks]]\ntype = 'http'", "http check needs url"),
        (b"[[health.checks]]\ntype = 'command'\nargv = []", "non-empty list"),
        (
            b"[[health.checks]]\ntype = 'tcp'\nport = 1\ntimeout_s = 0",
            "timeout_s: must be a number above 0",
        ),
        (b"[health]\ndeadline_s = 0", "deadline_s: must be a number above 0"),
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


def test_a_config_replaced_by_a_fifo_falls_back_at_once(tmp_path: Path) -> None:
    """A FIFO (or a directory) where the configuration was is a damaged file: the updater falls
    back to the last good one instead of blocking on a pipe nobody writes (the boot check and
    the daemon would hang), and a FIFO in place of the last good one is passed over too."""
    path = tmp_path / "updater.toml"
    path.write_bytes(good(tmp_path))
    first = load_config(path, data_dir=tmp_path / "data")
    path.unlink()
    os.mkfifo(path)
    answers: list[LoadedConfig] = []
    reader = threading.Thread(
        target=lambda: answers.append(load_config(path, data_dir=tmp_path / "data")), daemon=True
    )
    reader.start()
    reader.join(timeout=10)
    assert answers, "load_config blocked on a FIFO"
    second = answers[0]
    assert second.source.endswith(LAST_GOOD_NAME) and second.config == first.config
    assert second.problems == (f"{path}: cannot read: not a regular file (a FIFO)",)
    last_good = tmp_path / "data" / LAST_GOOD_NAME
    last_good.unlink()
    os.mkfifo(last_good)
    assert load_config(path, data_dir=tmp_path / "data").source == "defaults"


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


# What every configuration file must name; a document of only these is a valid configuration.
REQUIRED = b'compatible = "metrica-rpi4"\nkeyring = "/etc/fleet/keyring"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"", "empty"),
        (b"# only a comment\n", "empty"),
        (b'keyring = "/etc/fleet/keyring"\n', "names no compatible"),
        (b'compatible = "metrica-rpi4"\n', "names no keyring"),
        (b'data_dir = "/var/lib/fleet"\n', "names no compatible and no keyring"),
        (b'compatible = "  "\nkeyring = "/k"\n', "compatible: must not be empty"),
    ],
)
def test_a_file_without_what_a_device_needs_is_damaged(text: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(text, "updater.toml")
    assert str(info.value).startswith("updater.toml: ")


def test_the_required_settings_alone_are_a_configuration() -> None:
    config = parse_config(REQUIRED, "updater.toml")
    assert config.compatible == "metrica-rpi4" and config.keyring == Path("/etc/fleet/keyring")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            "[limits]\nmax_temperature_c = nan",
            r"max_temperature_c: must be a number from 30 to 125 °C, not nan",
        ),
        ("[limits]\nmax_temperature_c = inf", "max_temperature_c: must be a number from 30"),
        ("[limits]\nmax_temperature_c = 200", "max_temperature_c: must be a number from 30"),
        ("[limits]\nmax_temperature_c = 29.9", "max_temperature_c: must be a number from 30"),
        ("[limits]\nmin_free_mb = 1e23", "min_free_mb: must be int, not 1e"),
        ("[limits]\nmin_free_mb = 16777217", "min_free_mb: must be an integer from 0 to 16777216"),
        (
            "[limits]\nupdate_deadline_s = 0",
            "update_deadline_s: must be an integer from 60 to 604800",
        ),
        ("[limits]\nupdate_deadline_s = 59", "update_deadline_s: must be an integer from 60"),
        ("[limits]\nupdate_deadline_s = 604801", "update_deadline_s: must be an integer from 60"),
        ("[health]\ndeadline_s = nan", "health.deadline_s: must be a number above 0 to 3600"),
        ("[health]\ndeadline_s = 3601", "health.deadline_s: must be a number above 0 to 3600"),
        (
            "[server]\ncheckin_interval_s = nan",
            "checkin_interval_s: must be a number above 0 to 86400",
        ),
        (
            "[server]\nheartbeat_interval_s = 86401",
            "heartbeat_interval_s: must be a number above 0",
        ),
        ("[server]\nfailover_after_s = -inf", "failover_after_s: must be a number above 0"),
    ],
)
def test_numbers_must_be_finite_and_in_range(table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(REQUIRED + table.encode(), "updater.toml")


def test_numbers_at_the_ends_of_their_ranges_are_accepted() -> None:
    config = parse_config(
        REQUIRED
        + b"[limits]\nmin_free_mb = 16777216\nmax_temperature_c = 30\nupdate_deadline_s = 60\n"
        + b"[health]\ndeadline_s = 3600\n[server]\ncheckin_interval_s = 86400\n",
        "updater.toml",
    )
    assert config.limits.min_free_mb == 16777216 and config.limits.update_deadline_s == 60
    assert config.limits.max_temperature_c == 30.0 and config.health.deadline_s == 3600.0
    assert config.checkin_interval_s == 86400.0
    assert (
        parse_config(
            REQUIRED
            + b"[limits]\nmin_free_mb = 0\nmax_temperature_c = 125\nupdate_deadline_s = 604800",
            "x",
        ).limits.max_temperature_c
        == 125.0
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('backend = "grub"\ncolour = 1', "bootloader: grub backend: unknown option 'colour'"),
        ('backend = "grub"\nattempts = 0', "bootloader: grub backend: attempts must be 1 to"),
        ('backend = "tryboot"\nautoboot = "/boot/autoboot.txt"', "unknown option 'autoboot'"),
        ('backend = "tryboot"\nreboot_command = ["reboot"]', "must pass 'tryboot'"),
        ('backend = "uboot"\nenv_size = "big"', "option 'env_size' must be a int"),
        ('backend = "uboot"\nattempts = 12', "attempts must be 1 to 9"),
        ('backend = "uboot"\nenv_offset = 4096', "option 'env_file' is needed"),
        ('backend = "lilo"', "unknown boot backend 'lilo'"),
        ("backend = 3", "bootloader.backend: must be str"),
        ('grubenv = "/boot/grub/grubenv"', "grubenv need a named backend"),
        ('backend = "auto"\nattempts = 3', "attempts need a named backend"),
    ],
)
def test_the_backends_options_are_checked_as_the_file_loads(table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(REQUIRED + b"[bootloader]\n" + table.encode(), "updater.toml")
    assert str(info.value).startswith("updater.toml: bootloader")


def test_checking_uboot_options_reads_no_file(tmp_path: Path) -> None:
    # the fw_env.config named is read when the backend is built, not when the file loads
    table = f'[bootloader]\nbackend = "uboot"\nfw_env_config = "{tmp_path / "missing"}"\n'
    config = parse_config(REQUIRED + table.encode(), "updater.toml")
    assert config.bootloader == {"backend": "uboot", "fw_env_config": str(tmp_path / "missing")}


def test_an_empty_file_never_replaces_the_last_good_copy(tmp_path: Path) -> None:
    path = tmp_path / "updater.toml"
    path.write_bytes(good(tmp_path))
    load_config(path, data_dir=tmp_path / "data")
    for damaged in (
        b"",
        b'compatible = "metrica-rpi4"\n',
        good(tmp_path).replace(b"grubenv =", b"grubenv_path ="),
    ):
        path.write_bytes(damaged)
        loaded = load_config(path, data_dir=tmp_path / "data")
        assert loaded.source.endswith(LAST_GOOD_NAME)
        assert loaded.config.keyring == Path("/etc/fleet/keyring")
        assert (tmp_path / "data" / LAST_GOOD_NAME).read_bytes() == good(tmp_path)


def test_a_file_whose_backend_cannot_be_built_is_used_but_not_kept(tmp_path: Path) -> None:
    path = tmp_path / "updater.toml"
    path.write_bytes(good(tmp_path))
    assert not load_config(path, data_dir=tmp_path / "data", build=lambda c: None).problems
    last_good = tmp_path / "data" / LAST_GOOD_NAME
    assert last_good.read_bytes() == good(tmp_path)

    def build(config: UpdaterConfig) -> None:
        raise BootloaderError("uboot backend: /etc/fw_env.config: cannot read")

    changed = good(tmp_path).replace(b"min_free_mb = 300", b"min_free_mb = 400")
    path.write_bytes(changed)
    loaded = load_config(path, data_dir=tmp_path / "data", build=build)
    assert loaded.source == str(path) and loaded.config.limits.min_free_mb == 400
    assert loaded.problems == (
        f"{path}: not kept as the last good configuration: "
        "uboot backend: /etc/fw_env.config: cannot read",
    )
    assert last_good.read_bytes() == good(tmp_path)
    # once it builds, it is kept
    load_config(path, data_dir=tmp_path / "data", build=lambda c: None)
    assert last_good.read_bytes() == changed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'compatible = "x"\nkeyring = ""', "config.keyring: must be an absolute path, not ''"),
        (b'compatible = "x"\nkeyring = "keys"', "config.keyring: must be an absolute path"),
        (b'compatible = "x"\nkeyring = "/k\\u0000"', "config.keyring: must be an absolute path"),
        (REQUIRED + b'data_dir = "var/lib/fleet"', "config.data_dir: must be an absolute path"),
        (REQUIRED + b'[paths]\nthermal_dir = ""', "paths.thermal_dir: must be an absolute path"),
        (REQUIRED + b'[metrics]\ntextfile = "x.prom"', "metrics.textfile: must be an absolute"),
        (REQUIRED + b'[server]\nkeyring = "."', "server.keyring: must be an absolute path"),
    ],
)
def test_paths_must_be_absolute(text: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, "updater.toml")


@pytest.mark.parametrize(
    ("slots", "message"),
    [
        (
            "[slots.a]\nrootfs = '/dev/sda2'\n[slots.b]\nrootfs = '/dev/sda2'",
            "slots: a.rootfs and b.rootfs both name '/dev/sda2'",
        ),
        (
            "[slots.a]\nrootfs = '/dev/sda2'\n[slots.b]\nrootfs = '/dev//sda2/'",
            "slots: a.rootfs and b.rootfs both name '/dev//sda2/'",
        ),
        (
            "[slots.a]\nrootfs = 'PARTLABEL=root_a'\nbootfs = 'PARTLABEL=boot_a'\n"
            "[slots.b]\nrootfs = 'PARTLABEL=root_b'\nbootfs = 'PARTLABEL=boot_a'",
            "slots: a.bootfs and b.bootfs both name 'PARTLABEL=boot_a'",
        ),
        (
            "[slots.a]\nrootfs = '/dev/sda2'\nbootfs = '/dev/sda2'\n"
            "[slots.b]\nrootfs = '/dev/sda3'\nbootfs = '/dev/sda4'",
            "slots: a.bootfs and a.rootfs both name '/dev/sda2'",
        ),
    ],
)
def test_two_slot_classes_naming_one_device_are_refused(slots: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(REQUIRED + slots.encode(), "updater.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            b"[[health.checks]]\ntype = 'command'\ncommand = ['/usr/bin/true']",
            "health.checks[0]: unknown setting command (did you mean argv?)",
        ),
        (
            b"[[health.checks]]\ntype = 'systemd'\nservice = 'camera.service'",
            "health.checks[0]: unknown setting service (did you mean unit?)",
        ),
        (
            b"[[health.checks]]\ntype = 'tcp'\nport = 22\ntimeout = 3",
            "health.checks[0]: unknown setting timeout (did you mean timeout_s?)",
        ),
        (
            b"[limits]\nmax_temp = 70",
            "limits: unknown setting max_temp (did you mean max_temperature_c?)",
        ),
        (
            b"[limits]\nmax_temp = 70\nmin_free = 100",
            "limits: unknown settings max_temp (did you mean max_temperature_c?), "
            "min_free (did you mean min_free_mb?)",
        ),
        (b"[health]\ndeadline = 60", "health: unknown setting deadline (did you mean deadline_s?)"),
        (b"[server]\nurl = ['https://x']", "server: unknown setting url (did you mean urls?)"),
        (b"[metrics]\nports = 9100", "metrics: unknown setting ports (did you mean port?)"),
        (
            b"[paths]\nthermal = '/sys'",
            "paths: unknown setting thermal (did you mean thermal_dir?)",
        ),
        (
            b"[slots.a]\nroot = '/x'\n[slots.b]\nrootfs = '/y'",
            "slots.a: unknown setting root (did you mean rootfs?)",
        ),
        (b"[slots.c]\nrootfs = '/z'", "slots: unknown setting c"),
        (b"tag = ['x']", "config: unknown setting tag (did you mean tags?)"),
        (b"colour = 'blue'", "config: unknown setting colour"),  # nothing close: no guess
        # a setting already given is never what another was meant to be
        (b"[limits]\nmin_free_mb = 1\nmin_free_mbs = 2", "limits: unknown setting min_free_mbs"),
        (b'"a b" = 1', "config: unknown setting 'a b'"),  # a quoted key is shown quoted
        (
            b'[bootloader]\nbackend = "grub"\ngrubenvs = "/x"',
            "bootloader: grub backend: unknown option 'grubenvs' (did you mean 'grubenv'?)",
        ),
        (
            b'[bootloader]\nbackend = "uboot"\nenv_fil = "/x"',
            "bootloader: uboot backend: unknown option 'env_fil' (did you mean 'env_file'?)",
        ),
    ],
)
def test_an_unknown_setting_names_the_one_probably_meant(text: bytes, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(REQUIRED + text, "updater.toml")
    error = str(info.value)
    assert error.startswith(f"updater.toml: {message}"), error
    if "did you mean" not in message:
        assert "did you mean" not in error.split(";")[0], error


def toml_key(key: str) -> str:
    """``key`` as a TOML basic string: every character but plain printable ASCII escaped."""
    return (
        '"'
        + "".join(c if " " <= c <= "~" and c not in '"\\' else f"\\U{ord(c):08x}" for c in key)
        + '"'
    )


def shown_as(key: str, *, quoted: bool) -> str:
    """How an error must show ``key``: as typed when it is a bare key, else as ``repr``."""
    bare = bool(key) and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare and not quoted else repr(key)


# where an unknown key goes: (the line it follows in GOOD, the error's prefix, quoted or not)
PLACES = {
    "top level": (None, "config: unknown setting", False),
    "[limits]": (b"[limits]", "limits: unknown setting", False),
    "[health]": (b"[health]", "health: unknown setting", False),
    "a systemd check": (b'unit = "camera.service"', "health.checks[0]: unknown setting", False),
    "a command check": (b'argv = ["/usr/bin/true"]', "health.checks[2]: unknown setting", False),
    "[server]": (b"[server]", "server: unknown setting", False),
    "[metrics]": (b"[metrics]", "metrics: unknown setting", False),
    "[slots.a]": (b"[slots.a]", "slots.a: unknown setting", False),
    "[bootloader]": (b'backend = "grub"', "bootloader: grub backend: unknown option", True),
}
# every setting some table knows: a generated key must be unknown where it is put
KNOWN = {
    "compatible", "role", "tags", "keyring", "data_dir", "bootloader", "slots", "limits",
    "health", "server", "paths", "metrics", "reboot_command", "min_free_mb",
    "max_temperature_c", "update_deadline_s", "deadline_s", "checks", "type", "timeout_s",
    "unit", "argv", "urls", "mirrors", "enrollment_token", "checkin_interval_s",
    "heartbeat_interval_s", "failover_after_s", "ca_file", "allow_plain_http", "textfile",
    "port", "listen", "advertise", "rootfs", "bootfs", "backend", "grubenv", "cmdline",
    "attempts",
}  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    key=st.text(st.characters(blacklist_categories=["Cs"]), max_size=24).filter(
        lambda k: k not in KNOWN
    ),
    place=st.sampled_from(sorted(PLACES)),
)
def test_any_unknown_key_is_named_in_the_error(key: str, place: str) -> None:
    after, prefix, quoted = PLACES[place]
    line = f"{toml_key(key)} = 1".encode()
    good = GOOD.replace(b"DATA", b"/var/lib/fleet")
    if after is None:
        text = line + b"\n" + good
    else:
        assert good.count(after + b"\n") == 1
        text = good.replace(after + b"\n", after + b"\n" + line + b"\n")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "updater.toml")
    error = str(info.value)
    assert error.startswith(f"updater.toml: {prefix} {shown_as(key, quoted=quoted)}"), error


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'compatible = "x"\nkeys = "/etc/fleet/keyring"', "config: unknown setting keys"),
        (b"[slots.a]\nimage = '/x'\n[slots.b]\nrootfs = '/y'", "slots.a: unknown setting image"),
    ],
)
def test_an_unknown_setting_next_to_a_missing_required_one_is_taken_for_it(
    text: bytes, message: str
) -> None:
    meant = "keyring" if message.startswith("config") else "rootfs"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "updater.toml")
    assert str(info.value) == f"updater.toml: {message} (did you mean {meant}?)"
