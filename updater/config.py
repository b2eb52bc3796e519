"""The updater's configuration: ``/etc/fleet/updater.toml``, validated into frozen dataclasses.

A file must name ``compatible`` and ``keyring``; every section is checked whole, the boot
backend's own options by the backend (``bootloader_hooks.base.check_options``), and every number
must lie in its range, so a typo cannot switch a guard off; an unknown setting is refused with
the one probably meant (``health.checks[0]: unknown setting command (did you mean argv?)``,
see :mod:`fleet_core.suggest`). A missing or damaged configuration never stops the updater:
:func:`load_config` reports every problem and falls back, first to the last configuration that
loaded cleanly (kept on the data partition), then to built-in defaults.
The defaults are safe rather than useful: they know no ``compatible`` string and no keyring, so
nothing can be installed until a valid configuration is back, while the boot check still
confirms or rolls back the running slot.

Every key of every table, with its type, default, meaning and an example, is declared once
below (:class:`fleet_core.settings.Setting` records, which the parsers accept and nothing else);
``docs/updater-config.md`` is written from them (``make docs``), and
``deploy/device/updater.toml`` is a sample that uses every table.

Example::

    compatible = "metrica-rpi4"
    role = "camera"                # what the device is for: rollouts select by it
    tags = ["north-site", "hw-rev2"]
    keyring = "/etc/fleet/keyring"
    data_dir = "/var/lib/fleet"

    [bootloader]
    backend = "tryboot"            # options of the backend follow in the same table

    [slots.a]
    rootfs = "PARTLABEL=root_a"   # or a path: /dev/mmcblk0p5, /srv/slots/a.img
    bootfs = "PARTLABEL=boot_a"

    [limits]
    min_free_mb = 500
    max_temperature_c = 80.0
    update_deadline_s = 900

    [health]
    deadline_s = 120
    [[health.checks]]
    type = "systemd"
    unit = "camera.service"

    [bandwidth]
    rate_limit = "2MB/s"           # KB, MB, GB: 1000-based; KiB, MiB, GiB, K, M, G: 1024-based

    [updates]
    windows = ["02:00-05:00", "Sat 00:00-24:00"]   # local time; may cross midnight
    time_zone = "Europe/Berlin"    # default: the system's

    [server]                       # the release server (docs/device-protocol.md)
    urls = ["https://fleet.example.net", "https://fleet-2.example.net"]  # first = primary
    keyring = "/etc/fleet/server-keyring"   # keys that sign assignments
    mirrors = ["https://cdn.example.net/fleet"]   # each serves <mirror>/blobs/<sha256>
    enrollment_token = "..."       # or the file <data_dir>/identity/enrollment-token
    checkin_interval_s = 60        # ±10 % jitter
    heartbeat_interval_s = 60
    failover_after_s = 30          # talk to the next URL within this after the primary goes silent
    ca_file = "/etc/fleet/server-ca.pem"   # verifies https:// (default: the system's CA store)
    allow_plain_http = false       # true lets urls be http:// (a lab): see below

Plain HTTP: ``urls`` must be ``https://`` unless ``allow_plain_http = true``, since the session
token and the device's reports travel on them. ``mirrors`` and the blob URLs the server hands
out may be ``http://`` either way: every blob byte is checked against the SHA-256 the signed
manifest names, so a mirror can withhold an update but never alter one. Every ``https://``
connection the updater makes (server, blob, mirror) is verified against ``ca_file`` when set
(it may hold several CAs), else against the system's store (docs/tls.md).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootloader_hooks.base import AUTO, check_options
from fleet_core.durable import atomic_write
from fleet_core.errors import FleetError
from fleet_core.inputs import InputPathError, read_regular_file
from fleet_core.settings import Section, Setting, names, required
from fleet_core.suggest import unknown_names
from fleet_core.windows import MAX_WINDOWS, Window, WindowError, parse_windows
from updater.bandwidth import parse_rate, time_zone
from updater.device import DEFAULT_THROTTLED_PATH
from updater.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/fleet/updater.toml")
LAST_GOOD_NAME = "updater.last-good.toml"
MAX_TAGS = 16
# Ranges of the numbers, so that a typo cannot switch a guard off (nan, 1e23, 0).
MAX_FREE_MB = 16 * 1024 * 1024  # 16 TiB: more than any data partition of a device
TEMPERATURE_C = (30.0, 125.0)  # no SoC runs above 125 °C; below 30 °C no update would start
UPDATE_DEADLINE_S = (60, 7 * 86400)
CONFIG_REPAIR_AFTER_S = (0, 86400)
MAX_CHECK_S = 3600.0  # a health check, or all of them
MAX_INTERVAL_S = 86400.0  # check-in, heartbeat, fail-over
# Roles and tags are labels (rollout selectors, metrics): lowercase words, as the server takes
# them (server.schemas.Label).
LABEL = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def _typed(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int to Python, never a valid number here
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{where}.{key}: must be {names}, not {value!r}")
    return value


def _number(
    table: Mapping[str, Any],
    key: str,
    where: str,
    low: float,
    high: float,
    unit: str,
    *,
    integer: bool = False,
    low_open: bool = False,
) -> Any:
    """``table[key]``: an integer (or a number) from ``low`` (or above it) to ``high``."""
    value = _typed(table, key, int if integer else (int, float), where)
    above_low = value > low if low_open else value >= low
    if not (above_low and value <= high):  # NaN fails both comparisons, ±inf one of them
        bound = f"above {_plain(low)}" if low_open else f"from {_plain(low)}"
        kind = "an integer" if integer else "a number"
        raise ConfigError(
            f"{where}.{key}: must be {kind} {bound} to {_plain(high)} {unit}, not {value!r}"
        )
    return value


def _path(table: Mapping[str, Any], key: str, where: str) -> Path:
    value = _typed(table, key, str, where)
    if not value.startswith("/") or "\0" in value:
        raise ConfigError(f"{where}.{key}: must be an absolute path, not {value!r:.80}")
    return Path(value)


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def _label(value: Any, where: str) -> str:
    if not isinstance(value, str) or not LABEL.fullmatch(value):
        raise ConfigError(
            f"{where}: {value!r:.40} is not a label (lowercase letters, digits, '_', '.', '-'; "
            "at most 63, starting with a letter or digit)"
        )
    return value


def _no_unknown(
    table: Mapping[str, Any], allowed: Collection[str], where: str, *, needed: Collection[str] = ()
) -> None:
    """Refuse a setting of ``table`` not in ``allowed``, naming the one probably meant
    (``needed``: the settings the table requires; see :func:`fleet_core.suggest.closest`).

    Raises:
        ConfigError: ``health.checks[0]: unknown setting command (did you mean argv?)``.
    """
    unknown = unknown_names(table, allowed, needed=needed)
    if unknown:
        noun = "setting" if len(unknown) == 1 else "settings"
        raise ConfigError(f"{where}: unknown {noun} {', '.join(unknown)}")


def _table(document: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}{key}: must be a table")
    return value


def _range(
    low: float, high: float, unit: str, *, integer: bool = False, low_open: bool = False
) -> str:
    kind = "integer" if integer else "number"
    bound = f"above {_plain(low)}" if low_open else f"{_plain(low)}"
    return f"{kind}, {bound} to {_plain(high)} {unit}"


_LABEL_TYPE = "label"
_SPEC_TYPE = "`PARTLABEL=<label>` or absolute path"

# The keys of each table, with their documentation (docs/updater-config.md is written from
# them: docs/generate.py). The parsers below accept exactly these names.
TOP_LEVEL = (
    Setting(
        "compatible", "string", None,
        "What hardware this device is: a bundle is installed only if its signed manifest names "
        "the same string.",
        '"metrica-rpi4"', required=True,
    ),
    Setting(
        "role", _LABEL_TYPE, None,
        "What the device is for: reported to the server, which selects devices for a rollout "
        "by it; also a label of every log event. Unset: no role.",
        '"camera"',
    ),
    Setting(
        "tags", f"array of labels (at most {MAX_TAGS})", "[]",
        "Further labels reported to the server, which selects devices for a rollout by them "
        "(duplicates count once).",
        '["north-site", "hw-rev2"]',
    ),
    Setting(
        "keyring", "absolute path", None,
        "Directory of the release public keys (`fleet keys trust`): a bundle must be signed by "
        "one of them.",
        '"/etc/fleet/keyring"', required=True,
    ),
    Setting(
        "data_dir", "absolute path", '"/var/lib/fleet"',
        "Where the updater keeps its state: slot status, the device's identity, the last "
        "configuration that loaded cleanly, the outbox of reports.",
        '"/var/lib/fleet"',
    ),
    Setting(
        "reboot_command", "non-empty array of strings", None,
        "The command that reboots the device, instead of the boot backend's own (labs, tests).",
        '["systemctl", "reboot"]',
    ),
)  # fmt: skip
BOOTLOADER = (
    Setting(
        "backend", "string", f'"{AUTO}"',
        f"The boot backend: `grub`, `tryboot`, `uboot`, or `{AUTO}` (found out on the device; "
        "takes no options). The backend's options follow in the same table.",
        '"tryboot"',
    ),
)  # fmt: skip
SLOT_SETTINGS = (
    Setting(
        "rootfs", _SPEC_TYPE, None,
        "Where the slot's root filesystem is written: a GPT partition label, or a device or "
        "image file.",
        '"PARTLABEL=root_a"', required=True,
    ),
    Setting(
        "bootfs", _SPEC_TYPE, None,
        "Where the slot's boot filesystem is written, if the slot has one (both slots alike).",
        '"PARTLABEL=boot_a"',
    ),
)  # fmt: skip
SLOT_CLASSES = names(SLOT_SETTINGS)
SLOTS = (
    Setting(
        "a", "table", None,
        "Root slot a: its slot classes (`[slots.a]`). Without a `[slots]` table, each slot's "
        "`rootfs` is `PARTLABEL=root_<slot>` and its `bootfs` `PARTLABEL=boot_<slot>`.",
        '{ rootfs = "PARTLABEL=root_a", bootfs = "PARTLABEL=boot_a" }', required=True,
    ),
    Setting(
        "b", "table", None,
        "Root slot b (`[slots.b]`), with the same slot classes as a, each naming a device of "
        "its own.",
        '{ rootfs = "PARTLABEL=root_b", bootfs = "PARTLABEL=boot_b" }', required=True,
    ),
)  # fmt: skip
LIMITS = (
    Setting(
        "min_free_mb", _range(0, MAX_FREE_MB, "MB", integer=True), "500",
        "Free space on the data partition below which an update is skipped.",
        "1000",
    ),
    Setting(
        "max_temperature_c", _range(*TEMPERATURE_C, "°C"), "80.0",
        "CPU temperature above which an update is deferred.",
        "75.0",
    ),
    Setting(
        "update_deadline_s", _range(*UPDATE_DEADLINE_S, "seconds", integer=True), "900",
        "An install running longer is stopped and rolled back.",
        "1800",
    ),
    Setting(
        "config_repair_after_s", _range(*CONFIG_REPAIR_AFTER_S, "seconds", integer=True),
        "300",
        "How long the daemon lets the configuration file differ from the configuration it "
        "runs (the file damaged, or edited without a restart) before it writes the running "
        "one back, keeping the file it replaces as `<data_dir>/updater.replaced.toml`. "
        "0: never; the ConfigDrift alert still fires. Restart the daemon within this time "
        "to apply an edit.",
        "900",
    ),
)  # fmt: skip
HEALTH = (
    Setting(
        "deadline_s", _range(0, MAX_CHECK_S, "seconds", low_open=True), "120.0",
        "Time for all the checks together, from the start of the boot check; a check not "
        "reached by then fails.",
        "180",
    ),
    Setting(
        "checks", "array of tables", "[]",
        "The health checks (`[[health.checks]]`), run one after the other: every one must pass "
        "for a trial boot to be committed.",
        '[{ type = "systemd", unit = "ssh.service" }]',
    ),
)  # fmt: skip
CHECK_TYPES: Mapping[str, tuple[Setting, ...]] = {
    "systemd": (
        Setting(
            "unit", "string", None,
            "Passes when `systemctl is-active <unit>` prints `active`.",
            '"ssh.service"', required=True,
        ),
    ),
    "http": (
        Setting(
            "url", "string", None,
            "Passes when `GET <url>` answers with `expect_status` (the body is not read).",
            '"http://127.0.0.1:8080/healthz"', required=True,
        ),
        Setting("expect_status", "integer", "200", "The HTTP status that passes.", "204"),
    ),
    "tcp": (
        Setting(
            "port", "integer", None,
            "Passes when a TCP connection to `host`:`port` is accepted.",
            "8883", required=True,
        ),
        Setting("host", "string", '"127.0.0.1"', "The host to connect to.", '"localhost"'),
    ),
    "compose": (
        Setting(
            "project_dir", "string", None,
            "The docker compose project directory: passes when every container of `services` "
            "is running, and healthy if it has a healthcheck.",
            '"/opt/fleet/stack"', required=True,
        ),
        Setting(
            "services", "array of strings", "[]",
            "The services checked; none listed: every container of the project.",
            '["web", "db"]',
        ),
    ),
    "command": (
        Setting(
            "argv", "non-empty array of strings", None,
            "Passes when the command exits with status 0.",
            '["/usr/local/bin/selftest", "--quick"]', required=True,
        ),
    ),
}  # fmt: skip
HEALTH_CHECK_TYPES = tuple(CHECK_TYPES)
CHECK_COMMON = (
    Setting(
        "type", "string", None,
        "Which check: " + ", ".join(f"`{kind}`" for kind in HEALTH_CHECK_TYPES)
        + "; each takes the settings listed under it.",
        '"systemd"', required=True,
    ),
    Setting(
        "timeout_s", _range(0, MAX_CHECK_S, "seconds", low_open=True), "10.0",
        "Time for this check (never beyond the health deadline).",
        "5",
    ),
)  # fmt: skip
SERVER = (
    Setting(
        "urls", "array of `https://` URLs", "[]",
        "The release server (docs/device-protocol.md): the first is the primary, the next are "
        "failed over to. Empty: `fleet-updater daemon` refuses to run.",
        '["https://fleet.example.net", "https://fleet-2.example.net"]',
    ),
    Setting(
        "keyring", "absolute path", None,
        "Directory of the keys the server signs assignments with (its `server-key.pub`).",
        '"/etc/fleet/server-keyring"',
    ),
    Setting(
        "mirrors", "array of http(s) URLs", "[]",
        "Base URLs that serve the server's blobs as `<mirror>/blobs/<sha256>`, tried first; "
        "every blob is checked against the signed manifest, so plain `http://` is allowed.",
        '["https://cdn.example.net/fleet"]',
    ),
    Setting(
        "enrollment_token", "string", None,
        "The token that admits the device at its first check-in (`fleet server "
        "enrollment-token create`). Unset: read from `<data_dir>/identity/enrollment-token`.",
        '"..."',
    ),
    Setting(
        "checkin_interval_s", _range(0, MAX_INTERVAL_S, "seconds", low_open=True), "60.0",
        "Between check-ins (±10 % jitter).",
        "300",
    ),
    Setting(
        "heartbeat_interval_s", _range(0, MAX_INTERVAL_S, "seconds", low_open=True), "60.0",
        "Between heartbeats.",
        "120",
    ),
    Setting(
        "failover_after_s", _range(0, MAX_INTERVAL_S, "seconds", low_open=True), "30.0",
        "A server silent this long is given up for the next URL.",
        "45",
    ),
    Setting(
        "ca_file", "absolute path", None,
        "The CA certificates (PEM, one or several) that verify every `https://` connection "
        "(server, blobs, mirrors). Unset: the system's CA store (docs/tls.md).",
        '"/etc/fleet/server-ca.pem"',
    ),
    Setting(
        "allow_plain_http", "boolean", "false",
        "Whether `urls` may be `http://` (a lab): the session token and the device's reports "
        "would cross the network in clear.",
        "true",
    ),
)  # fmt: skip
PATHS = (
    Setting(
        "partlabel_dir", "absolute path", '"/dev/disk/by-partlabel"',
        "Where `PARTLABEL=<label>` slots are looked up.",
        '"/dev/disk/by-partlabel"',
    ),
    Setting(
        "thermal_dir", "absolute path", '"/sys/class/thermal"',
        "Where the CPU temperature is read.",
        '"/sys/class/thermal"',
    ),
    Setting(
        "throttled_path", "absolute path",
        '"/sys/devices/platform/soc/soc:firmware/get_throttled"',
        "The Raspberry Pi firmware's throttling and under-voltage bits; when it does not exist, "
        "`vcgencmd get_throttled` is asked. An install is deferred while under-voltage is "
        "flagged now.",
        '"/sys/devices/platform/soc/soc:firmware/get_throttled"',
    ),
)  # fmt: skip
METRICS = (
    Setting(
        "textfile", "absolute path", None,
        "A node_exporter textfile the updater writes its metrics to (docs/observability.md).",
        '"/var/lib/prometheus/node-exporter/fleet.prom"',
    ),
    Setting(
        "port", "integer, 1 to 65535", None,
        "The port the daemon serves its metrics on (`/metrics`). Unset: not served.",
        "9101",
    ),
    Setting(
        "listen", "string", '"127.0.0.1"',
        "The address the metrics port is bound to: loopback unless configured.",
        '"0.0.0.0"',
    ),
    Setting(
        "advertise", "string", None,
        "`host:port` where Prometheus scrapes the metrics, reported to the server for "
        "discovery. Unset: derived from `listen`, the hostname and `port`.",
        '"cam-17.lan:9101"',
    ),
)  # fmt: skip
BANDWIDTH = (
    Setting(
        "rate_limit", "rate: a size per second, 8KiB/s to 100GB/s", None,
        "The most the updater downloads per second, on average over a second, whatever it "
        "fetches (release images, from the server or a mirror). Units as in image sizes: "
        "`KB`, `MB`, `GB` are 1000-based, `KiB`, `MiB`, `GiB` and a bare `K`, `M`, `G` "
        "1024-based. Unset: no limit. A release must still download within "
        "`[limits] update_deadline_s`.",
        '"2MB/s"',
    ),
)  # fmt: skip
UPDATES = (
    Setting(
        "windows", f"array of windows (at most {MAX_WINDOWS})", "[]",
        "When the device may start downloading an assigned release, in its local time: "
        "`HH:MM-HH:MM` every day, or after days (`Sat`, `Mon-Fri`, `Sat,Sun`); a window may "
        "cross midnight (`Fri 22:00-02:00` runs into Saturday) and `24:00` ends a day. "
        "Outside them the device waits and reports `waiting_window`; an install that started "
        "inside a window finishes. Empty: any time.",
        '["02:00-05:00", "Sat 00:00-24:00"]',
    ),
    Setting(
        "time_zone", "IANA time zone name", None,
        "The time zone the windows are read in. Unset: the system's (`$TZ`, else "
        "`/etc/localtime`, else UTC).",
        '"Europe/Berlin"',
    ),
)  # fmt: skip
# The tables of the file, in the order the reference documents them.
TABLES: Mapping[str, Section] = {
    "bootloader": Section(
        "[bootloader]",
        "The boot backend, which arranges trial boots, commits and rollbacks with the firmware, "
        "and its options, checked as the file loads (the options of each backend below).",
        BOOTLOADER,
    ),
    "slots": Section(
        "[slots]",
        "The two root slots, each a table of its slot classes.",
        SLOTS,
    ),
    "limits": Section(
        "[limits]",
        "When an update must not start, or must be abandoned.",
        LIMITS,
    ),
    "health": Section(
        "[health]",
        "The checks that decide whether a trial boot is committed or rolled back.",
        HEALTH,
    ),
    "server": Section(
        "[server]",
        "The release server the daemon checks in with (docs/device-protocol.md, docs/tls.md). "
        "Without it the device is updated by hand only (`fleet-updater install`).",
        SERVER,
    ),
    "bandwidth": Section(
        "[bandwidth]",
        "How fast the updater downloads: a token bucket every downloaded byte passes "
        "(updater/bandwidth.py).",
        BANDWIDTH,
    ),
    "updates": Section(
        "[updates]",
        "When the updater may start an install: maintenance windows in the device's local time; "
        "a rollout may narrow them further (docs/rollouts.md, maintenance windows). "
        "`fleet-updater status` shows them, whether now is inside one and when the next opens.",
        UPDATES,
    ),
    "paths": Section(
        "[paths]",
        "Where the updater looks at the machine (tests and labs point them elsewhere).",
        PATHS,
    ),
    "metrics": Section(
        "[metrics]",
        "The updater's Prometheus metrics (docs/observability.md).",
        METRICS,
    ),
}
SLOT_SECTION = Section(
    "[slots.a] and [slots.b]",
    "The slot classes of a root slot: where each of its images is written.",
    SLOT_SETTINGS,
)
CHECK_SECTION = Section(
    "[[health.checks]]",
    "One health check: its `type`, its time, and the settings of that type.",
    CHECK_COMMON,
)
# What a configuration file must name: without them nothing can be installed, so a file
# lacking them is damaged (an empty file included), never a clean configuration.
REQUIRED = required(TOP_LEVEL)


@dataclass(frozen=True)
class Limits:
    """When an update must not start, or must be abandoned."""

    min_free_mb: int = 500  # free space on the data partition below which updates are skipped
    max_temperature_c: float = 80.0  # CPU temperature above which updates are deferred
    update_deadline_s: int = 900  # an install running longer is killed and rolled back
    # a configuration file differing from the running one this long is put back (0: never)
    config_repair_after_s: int = 300

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> Limits:
        where = "limits"
        _no_unknown(table, names(LIMITS), where)
        values: dict[str, Any] = {}
        if "min_free_mb" in table:
            values["min_free_mb"] = _number(
                table, "min_free_mb", where, 0, MAX_FREE_MB, "MB", integer=True
            )
        if "update_deadline_s" in table:
            values["update_deadline_s"] = _number(
                table, "update_deadline_s", where, *UPDATE_DEADLINE_S, "seconds", integer=True
            )
        if "config_repair_after_s" in table:
            values["config_repair_after_s"] = _number(
                table, "config_repair_after_s", where, *CONFIG_REPAIR_AFTER_S, "seconds",
                integer=True,
            )  # fmt: skip
        if "max_temperature_c" in table:
            values["max_temperature_c"] = float(
                _number(table, "max_temperature_c", where, *TEMPERATURE_C, "°C")
            )
        return cls(**values)


@dataclass(frozen=True)
class HealthCheckSpec:
    """One health check: its type and the settings of that type."""

    type: str
    settings: Mapping[str, Any]
    timeout_s: float = 10.0

    @classmethod
    def from_dict(cls, table: Any, index: int) -> HealthCheckSpec:
        where = f"health.checks[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        kind = table.get("type")
        if kind not in HEALTH_CHECK_TYPES:
            raise ConfigError(
                f"{where}.type: {kind!r} is not one of {', '.join(HEALTH_CHECK_TYPES)}"
            )
        required_here = set(required(CHECK_TYPES[kind]))
        common = names(CHECK_COMMON)
        settings = {k: v for k, v in table.items() if k not in common}
        allowed = {*common, *names(CHECK_TYPES[kind])}
        _no_unknown(table, allowed, where, needed=required_here)
        missing = sorted(required_here - set(settings))
        if missing:
            raise ConfigError(f"{where}: {kind} check needs {', '.join(missing)}")
        timeout = (
            float(_number(table, "timeout_s", where, 0, MAX_CHECK_S, "seconds", low_open=True))
            if "timeout_s" in table
            else 10.0
        )
        if kind == "command" and not (
            isinstance(settings["argv"], list)
            and settings["argv"]
            and all(isinstance(a, str) for a in settings["argv"])
        ):
            raise ConfigError(f"{where}.argv: must be a non-empty list of strings")
        return cls(type=kind, settings=settings, timeout_s=timeout)


@dataclass(frozen=True)
class HealthConfig:
    deadline_s: float = 120.0  # all checks together, from the start of the boot check
    checks: tuple[HealthCheckSpec, ...] = ()

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> HealthConfig:
        _no_unknown(table, names(HEALTH), "health")
        deadline = (
            float(_number(table, "deadline_s", "health", 0, MAX_CHECK_S, "seconds", low_open=True))
            if "deadline_s" in table
            else 120.0
        )
        raw = table.get("checks", [])
        if not isinstance(raw, list):
            raise ConfigError("health.checks: must be an array of tables")
        return cls(deadline, tuple(HealthCheckSpec.from_dict(c, i) for i, c in enumerate(raw)))


def _default_slots() -> dict[str, dict[str, str]]:
    return {
        slot: {"rootfs": f"PARTLABEL=root_{slot}", "bootfs": f"PARTLABEL=boot_{slot}"}
        for slot in ("a", "b")
    }


@dataclass(frozen=True)
class UpdaterConfig:
    """Everything the updater needs to know about this device."""

    compatible: str | None = None
    role: str | None = None  # reported to the server; rollouts select devices by it
    tags: tuple[str, ...] = ()
    keyring: Path | None = None
    data_dir: Path = Path("/var/lib/fleet")
    bootloader: Mapping[str, Any] = field(default_factory=lambda: {"backend": AUTO})
    slots: Mapping[str, Mapping[str, str]] = field(default_factory=_default_slots)
    limits: Limits = field(default_factory=Limits)
    health: HealthConfig = field(default_factory=HealthConfig)
    server_urls: tuple[str, ...] = ()  # the release server; the first is the primary
    server_keyring: Path | None = None  # keys the server signs assignments with
    server_mirrors: tuple[str, ...] = ()  # base URLs that mirror the server's /blobs/
    enrollment_token: str | None = None  # else <data_dir>/identity/enrollment-token
    checkin_interval_s: float = 60.0  # between check-ins, ±10 % jitter
    heartbeat_interval_s: float = 60.0
    failover_after_s: float = 30.0  # a silent server is given up for the next URL within this
    server_ca_file: Path | None = None  # verifies https:// connections; None: the system's store
    allow_plain_http: bool = False  # whether [server] urls may be http:// (labs)
    partlabel_dir: Path = Path("/dev/disk/by-partlabel")
    thermal_dir: Path = Path("/sys/class/thermal")
    throttled_path: Path = DEFAULT_THROTTLED_PATH
    metrics_textfile: Path | None = None
    metrics_port: int | None = None
    metrics_listen: str = "127.0.0.1"  # where the port is bound: loopback unless configured
    metrics_advertise: str | None = None  # host:port Prometheus scrapes, if not derivable
    reboot_command: tuple[str, ...] | None = None  # overrides the backend's (tests, labs)
    rate_limit_bytes_per_s: int | None = None  # [bandwidth] rate_limit; None: no limit
    update_windows: tuple[Window, ...] = ()  # [updates] windows; empty: any time
    time_zone: str | None = None  # [updates] time_zone; None: the system's

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> UpdaterConfig:
        """Validate a parsed configuration.

        Raises:
            ConfigError: the first problem, naming the setting.
        """
        _no_unknown(document, (*names(TOP_LEVEL), *TABLES), "config", needed=REQUIRED)
        values: dict[str, Any] = {}
        if "compatible" in document:
            values["compatible"] = _typed(document, "compatible", str, "config").strip()
            if not values["compatible"]:
                raise ConfigError("config.compatible: must not be empty")
        if "role" in document:
            values["role"] = _label(_typed(document, "role", str, "config"), "config.role")
        if "tags" in document:
            tags = _typed(document, "tags", list, "config")
            if len(tags) > MAX_TAGS:
                raise ConfigError(f"config.tags: at most {MAX_TAGS} tags")
            values["tags"] = tuple(sorted({_label(tag, "config.tags") for tag in tags}))
        for key in ("keyring", "data_dir"):
            if key in document:
                values[key] = _path(document, key, "config")
        bootloader = _table(document, "bootloader", "")
        if bootloader:
            values["bootloader"] = _parse_bootloader(bootloader)
        slots = _table(document, "slots", "")
        if slots:
            values["slots"] = _parse_slots(slots)
        values["limits"] = Limits.from_dict(_table(document, "limits", ""))
        values["health"] = HealthConfig.from_dict(_table(document, "health", ""))
        values.update(_parse_server(_table(document, "server", "")))
        values.update(_parse_bandwidth(_table(document, "bandwidth", "")))
        values.update(_parse_updates(_table(document, "updates", "")))
        paths = _table(document, "paths", "")
        _no_unknown(paths, names(PATHS), "paths")
        for key in ("partlabel_dir", "thermal_dir", "throttled_path"):
            if key in paths:
                values[key] = _path(paths, key, "paths")
        metrics = _table(document, "metrics", "")
        _no_unknown(metrics, names(METRICS), "metrics")
        for key in ("listen", "advertise"):
            if key in metrics:
                values[f"metrics_{key}"] = _typed(metrics, key, str, "metrics").strip()
        if "textfile" in metrics:
            values["metrics_textfile"] = _path(metrics, "textfile", "metrics")
        if "port" in metrics:
            port = _typed(metrics, "port", int, "metrics")
            if not 0 < port < 65536:
                raise ConfigError("metrics.port: must be 1-65535")
            values["metrics_port"] = port
        if "reboot_command" in document:
            argv = _typed(document, "reboot_command", list, "config")
            if not argv or not all(isinstance(a, str) for a in argv):
                raise ConfigError("config.reboot_command: must be a non-empty list of strings")
            values["reboot_command"] = tuple(argv)
        return cls(**values)


def _parse_bootloader(table: Mapping[str, Any]) -> dict[str, Any]:
    """The ``[bootloader]`` table: ``backend`` and that backend's own options, which the
    backend checks (``bootloader_hooks.base.check_options``) without touching the machine."""
    options = dict(table)
    name = _typed(options, "backend", str, "bootloader") if "backend" in options else AUTO
    options.pop("backend", None)
    try:
        check_options(name, options)
    except FleetError as err:
        raise ConfigError(f"bootloader: {err}") from err
    return {"backend": name, **options}


def _parse_server(table: Mapping[str, Any]) -> dict[str, Any]:
    """The ``[server]`` table, as keyword arguments of :class:`UpdaterConfig`."""
    where = "server"
    _no_unknown(table, names(SERVER), where)
    values: dict[str, Any] = {}
    if "allow_plain_http" in table:
        values["allow_plain_http"] = _typed(table, "allow_plain_http", bool, where)
    for key, name in (("urls", "server_urls"), ("mirrors", "server_mirrors")):
        if key in table:
            urls = _typed(table, key, list, where)
            if not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
                raise ConfigError(f"{where}.{key}: must be a list of http(s) URLs")
            values[name] = tuple(u.rstrip("/") for u in urls)
    plain = [u for u in values.get("server_urls", ()) if u.startswith("http://")]
    if plain and not values.get("allow_plain_http", False):
        # the session token and the device's reports would cross the network in clear;
        # mirrors may stay http: a blob is checked against the signed manifest's SHA-256
        raise ConfigError(
            f"{where}.urls: {plain[0]!r:.80} is plain http: use https://, or set "
            f"{where}.allow_plain_http = true (a lab)"
        )
    if "ca_file" in table:
        values["server_ca_file"] = _path(table, "ca_file", where)
    if "keyring" in table:
        values["server_keyring"] = _path(table, "keyring", where)
    if "enrollment_token" in table:
        token = _typed(table, "enrollment_token", str, where).strip()
        if not token:
            raise ConfigError(f"{where}.enrollment_token: must not be empty")
        values["enrollment_token"] = token
    for key in ("checkin_interval_s", "heartbeat_interval_s", "failover_after_s"):
        if key in table:
            values[key] = float(
                _number(table, key, where, 0, MAX_INTERVAL_S, "seconds", low_open=True)
            )
    return values


def _parse_bandwidth(table: Mapping[str, Any]) -> dict[str, Any]:
    """The ``[bandwidth]`` table, as keyword arguments of :class:`UpdaterConfig`."""
    _no_unknown(table, names(BANDWIDTH), "bandwidth")
    if "rate_limit" not in table:
        return {}
    try:
        return {"rate_limit_bytes_per_s": parse_rate(table["rate_limit"])}
    except ValueError as err:
        raise ConfigError(f"bandwidth.rate_limit: {err}") from err


def _parse_updates(table: Mapping[str, Any]) -> dict[str, Any]:
    """The ``[updates]`` table, as keyword arguments of :class:`UpdaterConfig`: every window
    is read now, so a malformed one is named when the file loads, not at install time."""
    _no_unknown(table, names(UPDATES), "updates")
    values: dict[str, Any] = {}
    if "windows" in table:
        try:
            values["update_windows"] = parse_windows(table["windows"], where="windows")
        except WindowError as err:
            raise ConfigError(f"updates.{err}") from err
    if "time_zone" in table:
        name = _typed(table, "time_zone", str, "updates")
        try:
            time_zone(name)
        except ValueError as err:
            raise ConfigError(f"updates.time_zone: {err}") from err
        values["time_zone"] = name
    return values


def _slot_spec(table: Mapping[str, Any], key: str, where: str) -> str:
    """``PARTLABEL=<label>`` or an absolute path: a relative one would name a file relative to
    wherever the updater happens to run, and an install would write there."""
    value: str = _typed(table, key, str, where)
    if value.startswith("PARTLABEL="):
        label = value.removeprefix("PARTLABEL=")
        if not label or "/" in label or "\0" in label or label in (".", ".."):
            raise ConfigError(f"{where}.{key}: {value!r:.80} names no partition label")
        return value
    if not value.startswith("/") or "\0" in value:
        raise ConfigError(
            f"{where}.{key}: must be PARTLABEL=<label> or an absolute path, not {value!r:.80}"
        )
    return value


def _parse_slots(table: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    _no_unknown(table, names(SLOTS), "slots")
    if set(table) != {"a", "b"}:
        raise ConfigError("slots: both root slots, a and b, must be configured")
    slots: dict[str, dict[str, str]] = {}
    for slot, classes in table.items():
        where = f"slots.{slot}"
        if not isinstance(classes, dict):
            raise ConfigError(f"{where}: must be a table")
        _no_unknown(classes, SLOT_CLASSES, where, needed=required(SLOT_SETTINGS))
        if "rootfs" not in classes:
            raise ConfigError(f"{where}: needs rootfs")
        slots[slot] = {k: _slot_spec(classes, k, where) for k in classes}
    if set(slots["a"]) != set(slots["b"]):
        raise ConfigError("slots: a and b must have the same slot classes")
    named: dict[str, str] = {}
    for slot, classes in sorted(slots.items()):
        for slot_class, spec in sorted(classes.items()):
            key = spec if spec.startswith("PARTLABEL=") else os.path.normpath(spec)
            if key in named:
                raise ConfigError(
                    f"slots: {named[key]} and {slot}.{slot_class} both name {spec!r}: "
                    "every slot class needs a device of its own"
                )
            named[key] = f"{slot}.{slot_class}"
    return slots


@dataclass(frozen=True)
class LoadedConfig:
    """A configuration and how it was obtained: ``source`` is the file used, or "defaults";
    ``path`` the configuration file asked for (None: none was) and ``text`` the bytes the
    configuration was parsed from (None: the built-in defaults), so what runs can be told
    from what the file holds later (:mod:`updater.config_guard`)."""

    config: UpdaterConfig
    source: str
    problems: tuple[str, ...] = ()
    path: str | None = None
    text: bytes | None = None


def parse_config(text: bytes, origin: str) -> UpdaterConfig:
    """Parse and validate configuration bytes.

    Raises:
        ConfigError: not UTF-8, not TOML, or invalid; the message starts with ``origin``.
    """
    try:
        document = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{origin}: not UTF-8 (byte {err.start})") from err
    except (ValueError, RecursionError) as err:  # TOMLDecodeError is a ValueError; so are huge ints
        raise ConfigError(f"{origin}: not valid TOML: {str(err)[:200]}") from err
    try:
        config = UpdaterConfig.from_dict(document)
    except ConfigError as err:
        raise ConfigError(f"{origin}: {err}") from err
    missing = [key for key in REQUIRED if key not in document]
    if missing:
        what = "empty" if not document else f"names no {' and no '.join(missing)}"
        raise ConfigError(
            f"{origin}: {what}: a device's configuration needs {' and '.join(REQUIRED)}"
        )
    return config


def load_config(
    path: Path = DEFAULT_CONFIG_PATH,
    data_dir: Path | None = None,
    build: Callable[[UpdaterConfig], object] | None = None,
    *,
    remember: bool = True,
) -> LoadedConfig:
    """Load the configuration, falling back rather than failing.

    Order: ``path``; if it is missing or invalid, the last configuration that loaded cleanly
    (``<data_dir>/updater.last-good.toml``); else built-in defaults. Each problem met on the way
    is returned in ``problems`` for the caller to log and report. A clean load refreshes the
    last-good copy (atomically; a power cut leaves the old copy or the new one), and only when
    ``build`` (the boot backend's constructor, given by the caller) accepts the configuration
    too: a file whose backend cannot be built is used, but never kept as the one to fall back to.
    Without ``remember`` (``fleet-updater status``, which never writes) nothing is kept.
    """
    problems: list[str] = []
    try:
        text = read_regular_file(path)
    except InputPathError as err:
        problems.append(f"{path}: cannot read: not a regular file ({err.kind})")
        text = None
    except OSError as err:
        problems.append(f"{path}: cannot read: {err.strerror}")
        text = None
    if text is not None:
        try:
            config = parse_config(text, str(path))
        except ConfigError as err:
            problems.append(str(err))
        else:
            if _builds(config, build, str(path), problems) and remember:
                _remember(config.data_dir / LAST_GOOD_NAME, text, problems)
            return LoadedConfig(config, str(path), tuple(problems), str(path), text)
    fallback_dir = data_dir or UpdaterConfig().data_dir
    last_good = fallback_dir / LAST_GOOD_NAME
    try:
        kept = read_regular_file(last_good)
        config = parse_config(kept, str(last_good))
    except (OSError, InputPathError):
        pass
    except ConfigError as err:
        problems.append(str(err))
    else:
        return LoadedConfig(config, str(last_good), tuple(problems), str(path), kept)
    return LoadedConfig(
        UpdaterConfig(data_dir=fallback_dir), "defaults", tuple(problems), str(path)
    )


def _builds(
    config: UpdaterConfig,
    build: Callable[[UpdaterConfig], object] | None,
    origin: str,
    problems: list[str],
) -> bool:
    if build is None:
        return True
    try:
        build(config)
    except FleetError as err:
        problems.append(f"{origin}: not kept as the last good configuration: {err}")
        return False
    return True


def _remember(path: Path, text: bytes, problems: list[str]) -> None:
    try:
        if not path.exists() or path.read_bytes() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            # 0600: the configuration may hold an enrollment token
            atomic_write(path, text, mode=0o600)
    except OSError as err:
        problems.append(f"{path}: cannot keep a last-good copy: {err.strerror}")
