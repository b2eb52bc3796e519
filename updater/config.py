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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bootloader_hooks.base import AUTO, check_options
from fleet_core.durable import atomic_write
from fleet_core.errors import FleetError
from fleet_core.suggest import unknown_names
from updater.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/fleet/updater.toml")
LAST_GOOD_NAME = "updater.last-good.toml"
HEALTH_CHECK_TYPES = ("systemd", "http", "tcp", "compose", "command")
SLOT_CLASSES = ("rootfs", "bootfs")
MAX_TAGS = 16
# Ranges of the numbers, so that a typo cannot switch a guard off (nan, 1e23, 0).
MAX_FREE_MB = 16 * 1024 * 1024  # 16 TiB: more than any data partition of a device
TEMPERATURE_C = (30.0, 125.0)  # no SoC runs above 125 °C; below 30 °C no update would start
UPDATE_DEADLINE_S = (60, 7 * 86400)
MAX_CHECK_S = 3600.0  # a health check, or all of them
MAX_INTERVAL_S = 86400.0  # check-in, heartbeat, fail-over
# What a configuration file must name: without them nothing can be installed, so a file
# lacking them is damaged (an empty file included), never a clean configuration.
REQUIRED = ("compatible", "keyring")
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
    table: Mapping[str, Any], allowed: set[str], where: str, *, needed: Collection[str] = ()
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


@dataclass(frozen=True)
class Limits:
    """When an update must not start, or must be abandoned."""

    min_free_mb: int = 500  # free space on the data partition below which updates are skipped
    max_temperature_c: float = 80.0  # CPU temperature above which updates are deferred
    update_deadline_s: int = 900  # an install running longer is killed and rolled back

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> Limits:
        where = "limits"
        _no_unknown(table, {f.name for f in fields(cls)}, where)
        values: dict[str, Any] = {}
        if "min_free_mb" in table:
            values["min_free_mb"] = _number(
                table, "min_free_mb", where, 0, MAX_FREE_MB, "MB", integer=True
            )
        if "update_deadline_s" in table:
            values["update_deadline_s"] = _number(
                table, "update_deadline_s", where, *UPDATE_DEADLINE_S, "seconds", integer=True
            )
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
        required = {
            "systemd": {"unit"},
            "http": {"url"},
            "tcp": {"port"},
            "compose": {"project_dir"},
            "command": {"argv"},
        }[kind]
        optional = {
            "systemd": set(),
            "http": {"expect_status"},
            "tcp": {"host"},
            "compose": {"services"},
            "command": set(),
        }[kind]
        settings = {k: v for k, v in table.items() if k not in ("type", "timeout_s")}
        _no_unknown(table, required | optional | {"type", "timeout_s"}, where, needed=required)
        missing = sorted(required - set(settings))
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
        _no_unknown(table, {"deadline_s", "checks"}, "health")
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
    metrics_textfile: Path | None = None
    metrics_port: int | None = None
    metrics_listen: str = "127.0.0.1"  # where the port is bound: loopback unless configured
    metrics_advertise: str | None = None  # host:port Prometheus scrapes, if not derivable
    reboot_command: tuple[str, ...] | None = None  # overrides the backend's (tests, labs)

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> UpdaterConfig:
        """Validate a parsed configuration.

        Raises:
            ConfigError: the first problem, naming the setting.
        """
        top = {
            "compatible", "role", "tags", "keyring", "data_dir", "bootloader", "slots",
            "limits", "health", "server", "paths", "metrics", "reboot_command",
        }  # fmt: skip
        _no_unknown(document, top, "config", needed=REQUIRED)
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
        paths = _table(document, "paths", "")
        _no_unknown(paths, {"partlabel_dir", "thermal_dir"}, "paths")
        for key in ("partlabel_dir", "thermal_dir"):
            if key in paths:
                values[key] = _path(paths, key, "paths")
        metrics = _table(document, "metrics", "")
        _no_unknown(metrics, {"textfile", "port", "listen", "advertise"}, "metrics")
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
    _no_unknown(
        table,
        {"urls", "keyring", "mirrors", "enrollment_token", "checkin_interval_s",
         "heartbeat_interval_s", "failover_after_s", "ca_file", "allow_plain_http"},
        where,
    )  # fmt: skip
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
    _no_unknown(table, {"a", "b"}, "slots")
    if set(table) != {"a", "b"}:
        raise ConfigError("slots: both root slots, a and b, must be configured")
    slots: dict[str, dict[str, str]] = {}
    for slot, classes in table.items():
        where = f"slots.{slot}"
        if not isinstance(classes, dict):
            raise ConfigError(f"{where}: must be a table")
        _no_unknown(classes, set(SLOT_CLASSES), where, needed={"rootfs"})
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
    """A configuration and how it was obtained: ``source`` is the file used, or "defaults"."""

    config: UpdaterConfig
    source: str
    problems: tuple[str, ...] = ()


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
        text = path.read_bytes()
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
            return LoadedConfig(config, str(path), tuple(problems))
    fallback_dir = data_dir or UpdaterConfig().data_dir
    last_good = fallback_dir / LAST_GOOD_NAME
    try:
        config = parse_config(last_good.read_bytes(), str(last_good))
    except OSError:
        pass
    except ConfigError as err:
        problems.append(str(err))
    else:
        return LoadedConfig(config, str(last_good), tuple(problems))
    return LoadedConfig(UpdaterConfig(data_dir=fallback_dir), "defaults", tuple(problems))


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
