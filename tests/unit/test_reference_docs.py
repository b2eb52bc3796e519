"""The references generated from the code (docs/generate.py) are current and tell the truth.

``docs/updater-config.md`` and ``docs/cli.md`` are written from the code; the committed files
must be what the generator writes now. The configuration reference is then read back as a
device's operator reads it: every key it documents is accepted with its example, writing its
default changes nothing, and the parser accepts no key it does not document. The sample
``deploy/device/updater.toml`` loads with the real parser and uses every table documented.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import bootloader_hooks.options
from bootloader_hooks import grub, tryboot, uboot
from updater import config as config_module
from updater import health
from updater.config import UpdaterConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DOC = ROOT / "docs" / "updater-config.md"
SAMPLE = ROOT / "deploy" / "device" / "updater.toml"
BASE = 'compatible = "metrica-rpi4"\nkeyring = "/etc/fleet/keyring"\n'


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_references_are_what_the_code_says() -> None:
    generated: dict[str, str] = generator().references()
    assert sorted(generated) == ["cli.md", "updater-config.md"]
    for name, text in generated.items():
        # a default that is a path of this checkout would make the reference differ per checkout
        assert str(ROOT) not in text, f"docs/{name} names this checkout's path ({ROOT})"
        path = ROOT / "docs" / name
        committed = path.read_text(encoding="utf-8") if path.is_file() else ""
        if committed != text:
            diff = "".join(
                list(
                    difflib.unified_diff(
                        committed.splitlines(keepends=True),
                        text.splitlines(keepends=True),
                        f"docs/{name} (committed)",
                        f"docs/{name} (from the code)",
                    )
                )[:40]
            )
            pytest.fail(f"docs/{name} is out of date: run `make docs`\n{diff}")


def test_the_check_mode_names_a_stale_file(tmp_path: Path) -> None:
    module = generator()
    for name, text in module.references().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert module.stale(tmp_path) == []
    (tmp_path / "cli.md").write_text("edited by hand\n", encoding="utf-8")
    (tmp_path / "updater-config.md").unlink()
    assert module.stale(tmp_path) == ["updater-config.md", "cli.md"]


# --- docs/updater-config.md, read back ---------------------------------------------------------


@dataclass(frozen=True)
class Documented:
    """One row of the configuration reference, and where it belongs."""

    table: str  # the TOML table it is written in ("" top level, "health.checks", "slots.a")
    context: str  # what the section heading says the table needs: 'backend = "grub"'
    key: str
    default: str | None  # a TOML value, None if required or unset
    required: bool
    example: str  # the TOML line


_HEADING = re.compile(r"^(#{2,4}) (.+)$")
_ROW = re.compile(r"^\| `([^`]+)` \| .* \| (required|unset|`.+?`) \| .* \| `(.+)` \|$")


def documented() -> list[Documented]:
    """Every key row of the committed configuration reference."""
    rows: list[Documented] = []
    table, context = "", ""
    for line in CONFIG_DOC.read_text(encoding="utf-8").splitlines():
        heading = _HEADING.match(line)
        if heading:
            title = heading.group(2).strip("`")
            if title == "Top level":
                table, context = "", ""
            elif title.startswith("[[") or title.startswith("["):
                table, context = title.strip("[]").split("]")[0], ""
            else:  # backend = "grub", type = "http": keys of the table above, given this
                context = title
            continue
        row = _ROW.match(line)
        if row is None:
            continue
        key, default, example = row.groups()
        rows.append(
            Documented(
                table=table,
                context=context,
                key=key,
                default=default.strip("`") if default.startswith("`") else None,
                required=default == "required",
                example=example.replace("\\|", "|"),
            )
        )
    return rows


def rows_of(table: str, context: str = "") -> list[Documented]:
    return [row for row in documented() if row.table == table and row.context == context]


def _value(context: str) -> str:
    """The name in a section heading's ``backend = "grub"``: ``grub``."""
    return context.split('"')[1]


# uboot options that only mean something beside another one
NEEDS = dict.fromkeys(
    ("env_offset", "env_size", "redundant_offset", "redundant_file"), 'env_file = "/boot/uboot.env"'
)


def _setting(row: Documented, line: str) -> str:
    """A configuration document with ``line`` written where ``row`` belongs, and whatever the
    reference says its table needs (its required keys, the backend or the check type)."""
    context = row.context
    if row.table == "health.checks" and not context:  # a key of every check: of the first type
        context = next(r.example for r in rows_of("health.checks") if r.key == "type")
    required = [r for r in rows_of(row.table, context) + rows_of(row.table) if r.required]
    needed = [r.example for r in required if r.key != row.key]
    if context:
        key = context.split(" = ")[0]
        needed = [n for n in needed if not n.startswith(f"{key} =")]
        if row.key != key:
            needed.insert(0, context)
    if context == 'backend = "uboot"' and row.key in NEEDS:
        needed.append(NEEDS[row.key])
    body = "\n".join(dict.fromkeys([*needed, line]))
    if row.table == "":
        kept = [n for n in BASE.splitlines() if not n.startswith(f"{row.key} = ")]
        return "\n".join([*kept, line]) + "\n"
    if row.table == "slots.a":  # both slots alike, each with partitions of its own
        return f"{BASE}[slots.a]\n{body}\n[slots.b]\n{body.replace('_a', '_b')}\n"
    if row.table == "health.checks":
        return f"{BASE}[[health.checks]]\n{body}\n"
    return f"{BASE}[{row.table}]\n{body}\n"


def _id(row: Documented) -> str:
    return f"{row.table or 'top'}.{row.key}" + (f" ({row.context})" if row.context else "")


def test_the_reference_documents_every_table_and_key() -> None:
    rows = documented()
    tables = {row.table for row in rows}
    assert tables == {
        "", "bootloader", "slots", "slots.a", "limits", "health", "health.checks", "server",
        "bandwidth", "updates", "paths", "metrics",
    }  # fmt: skip
    contexts = {row.context for row in rows if row.context}
    assert {f'backend = "{name}"' for name in ("grub", "tryboot", "uboot")} <= contexts
    assert {f'type = "{kind}"' for kind in config_module.HEALTH_CHECK_TYPES} <= contexts
    assert len(rows) == len({(r.table, r.context, r.key) for r in rows}), "a key twice"


@pytest.mark.parametrize("row", documented(), ids=_id)
def test_every_documented_example_is_accepted(row: Documented) -> None:
    parse_config(_setting(row, row.example).encode(), "updater.toml")


def _uboot_values(options: Mapping[str, Any]) -> dict[str, Any]:
    defaults = {
        name: p.default
        for name, p in inspect.signature(uboot.UBootBackend.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **uboot.parse_options(options, read_files=False)}


# what each backend makes of its options (the configuration keeps them as written)
BACKEND_VALUES: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "grub": grub.parse_options,
    "tryboot": tryboot.parse_options,
    "uboot": _uboot_values,
}
# what the checks (updater.health) do when a setting of theirs is left out: a check keeps its
# settings as written and applies the default as it runs
CHECK_DEFAULTS = {
    ("http", "expect_status"): health.DEFAULT_HTTP_STATUS,
    ("tcp", "host"): health.DEFAULT_TCP_HOST,
    ("compose", "services"): [],
}


def _loaded(text: str) -> tuple[UpdaterConfig, Any]:
    """What the device makes of a document: the configuration, and what the boot backend
    makes of its options."""
    config = parse_config(text.encode(), "updater.toml")
    options = {k: v for k, v in config.bootloader.items() if k != "backend"}
    backend = config.bootloader["backend"]
    made = BACKEND_VALUES[backend](options) if backend in BACKEND_VALUES else config.bootloader
    return replace(config, bootloader={}), made


@pytest.mark.parametrize("row", [row for row in documented() if row.default is not None], ids=_id)
def test_writing_a_documented_default_changes_nothing(row: Documented) -> None:
    if row.table == "health.checks" and row.context:
        value = tomllib.loads(f"{row.key} = {row.default}")[row.key]
        assert value == CHECK_DEFAULTS[_value(row.context), row.key], row.key
        return
    written = _setting(row, f"{row.key} = {row.default}")
    left_out = re.sub(rf"^{re.escape(row.key)} = .*\n", "", written, flags=re.M)
    assert written != left_out
    assert _loaded(written) == _loaded(left_out), f"{row.key}: the default is not {row.default}"


# --- the parser accepts no key the reference does not name -------------------------------------


def test_the_parser_accepts_no_undocumented_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every table's check of its keys (``_no_unknown``, a backend's ``check_known``) is handed
    exactly the keys the reference documents for that table, so a key the parser accepts
    without documentation fails here."""
    seen: dict[str, set[str]] = {}
    real_no_unknown = config_module._no_unknown
    real_check_known = bootloader_hooks.options.check_known

    def no_unknown(table: Mapping[str, Any], allowed: Any, where: str, **kw: Any) -> None:
        if where.startswith("health.checks"):
            where = f"health.checks {table['type']}"
        seen.setdefault(where, set()).update(allowed)
        real_no_unknown(table, allowed, where, **kw)

    def check_known(who: str, options: Mapping[str, Any], known: Any) -> None:
        # a backend may accept the table's own "backend" key, documented with [bootloader]
        seen.setdefault(f"bootloader {who.split()[0]}", set()).update(set(known) - {"backend"})
        real_check_known(who, options, known)

    monkeypatch.setattr(config_module, "_no_unknown", no_unknown)
    for module in (grub, tryboot, uboot):
        monkeypatch.setattr(module, "check_known", check_known)
    for row in documented():
        parse_config(_setting(row, row.example).encode(), "updater.toml")

    expected: dict[str, set[str]] = {}
    for row in documented():
        if row.table == "bootloader" and row.context:
            wheres = [f"bootloader {_value(row.context)}"]
        elif row.table == "health.checks":
            kinds = [_value(row.context)] if row.context else config_module.HEALTH_CHECK_TYPES
            wheres = [f"health.checks {kind}" for kind in kinds]
        elif row.table == "slots.a":
            wheres = ["slots.a", "slots.b"]
        else:
            wheres = [row.table or "config"]
        for where in wheres:
            expected.setdefault(where, set()).add(row.key)
    expected["config"] |= {row.table for row in documented() if row.table and "." not in row.table}
    # [bootloader]'s own key, backend, is read by name; every other key goes to the backend's
    # check (the examples of the reference show a second key of its own refused)
    assert expected.pop("bootloader") == {"backend"}
    assert seen == expected


# --- the sample ----------------------------------------------------------------------------------


def test_the_sample_loads_and_uses_every_documented_table() -> None:
    text = SAMPLE.read_bytes()
    config = parse_config(text, str(SAMPLE))  # the real parser, the backend's check included
    assert config.role and config.tags and config.server_urls and config.health.checks
    document = tomllib.loads(text.decode())
    reference = CONFIG_DOC.read_text(encoding="utf-8")
    titles = re.findall(r"^#{2,4} `\[+([a-z_.]+)\]", reference, flags=re.M)
    assert {"bootloader", "slots.a", "health.checks", "server", "metrics"} <= set(titles)
    for title in titles:
        value: Any = document
        for part in title.split("."):
            assert isinstance(value, dict) and part in value, f"the sample has no [{title}]"
            value = value[part]
    backend = document["bootloader"]["backend"]
    assert f'### `backend = "{backend}"`' in reference
    assert set(document["bootloader"]) - {"backend"}, "the sample shows no option of its backend"


# --- docs/cli.md: exit statuses -----------------------------------------------------------------

_EXIT_CALL = re.compile(r"(?:ctx\.exit|sys\.exit|SystemExit)\(\s*([A-Za-z_][A-Za-z0-9_]*|\d+)\s*\)")


def _leaf_commands() -> list[tuple[str, Any]]:
    import click

    from fleet_core.cli import fleet
    from updater.cli import main as updater_main

    found = []

    def walk(command: click.Command, path: str) -> None:
        if isinstance(command, click.Group):
            ctx = click.Context(command, info_name=path)
            for name in command.list_commands(ctx):
                child = command.get_command(ctx, name)
                if child is not None:
                    walk(child, f"{path} {name}")
        else:
            found.append((path, command))

    walk(fleet, "fleet")
    walk(updater_main, "fleet-updater")
    return found


def test_every_status_a_command_exits_with_is_documented() -> None:
    """A command that exits with a status of its own (``ctx.exit(EXIT_…)``) declares it, so that
    docs/cli.md lists it under the command; an undeclared one fails here, naming the command."""
    from fleet_core.cli import exit_statuses

    undeclared, reference = [], (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for path, command in _leaf_commands():
        function = inspect.unwrap(command.callback)
        for value in _EXIT_CALL.findall(inspect.getsource(function)):
            status = int(value) if value.isdigit() else function.__globals__[value]
            if status not in exit_statuses(command):
                undeclared.append(f"{path}: exits {status} ({value})")
        statuses = "; ".join(f"{n} {text}" for n, text in exit_statuses(command).items())
        assert f"`{path}`" in reference and statuses.replace("<", "\\<") in reference, path
    assert not undeclared, "declare with fleet_core.cli.exits: " + ", ".join(undeclared)


# Commands that run until stopped: their output is a log, not an outcome.
_LONG_RUNNING = {"fleet server run", "fleet simulate", "fleet demo", "fleet-updater daemon"}


def test_every_command_but_the_long_running_ones_takes_json() -> None:
    """Scripts can read the outcome of every command, mutations included, as JSON."""
    missing = [
        path
        for path, command in _leaf_commands()
        if path not in _LONG_RUNNING
        and not any("--json" in getattr(p, "opts", ()) for p in command.params)
    ]
    assert not missing, f"no --json: {', '.join(missing)}"
    assert {path for path, _ in _leaf_commands()} >= _LONG_RUNNING  # the list names real ones
