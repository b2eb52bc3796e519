"""The heartbeat: what the daemon reports about the device every ``heartbeat_interval_s``
(slots, boot state, health, sensors, clock skew), in the protocol's form
(docs/device-protocol.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from bootloader_hooks.base import SAFE_SLOT
from fleet_core.text import printable
from updater.runtime import update_state

UNKNOWN_SLOT = "unknown"
MAX_HEALTH = 64
# Heartbeat fields newer than the protocol's first version. A server from before one of them
# refuses a heartbeat carrying it (422: its models forbid unknown fields), so the daemon sends
# the heartbeat again without them (updater.daemon).
NEWER_FIELDS = ("throttled",)


def heartbeat_document(
    snapshot: Mapping[str, Any],
    *,
    health: Sequence[tuple[str, bool]],
    temperature_c: float | None,
    free_space_mb: int | None,
    uptime_s: float | None,
    clock: float,
    clock_skew_s: float | None,
    role: str | None = None,
    tags: Sequence[str] = (),
    metrics_address: str | None = None,
    throttled: int | None = None,
) -> dict[str, Any]:
    """The heartbeat of the protocol, from ``Runtime.snapshot()``, the sensors and the
    device's ``role`` and ``tags`` (from its configuration). Values
    the device does not know are ``null`` (the version in safe mode, a missing sensor),
    except the slot names, which the protocol requires: ``"unknown"`` when the boot state
    cannot be read, or no root slot is primary. Health check names are cut to 128
    characters (the server's limit), and at most ``MAX_HEALTH`` checks are listed.
    ``throttled`` (the Raspberry Pi firmware's ``get_throttled`` bits) is left out when
    unknown, so a board that is no Pi sends what servers before the field accept."""
    booted = snapshot["booted"]
    slots = snapshot["slots"]
    document = {
        "version": _version(slots[booted]["version"]) if booted in slots else None,
        "booted": booted or UNKNOWN_SLOT,
        "primary": snapshot["primary"] or UNKNOWN_SLOT,
        "trial": bool(snapshot["trial"]),
        "slots": {
            slot: {"status": info["status"], "version": _version(info["version"])}
            for slot, info in slots.items()
        },
        "updater_state": update_state(snapshot),
        "health": [{"name": _one_line(name), "ok": ok} for name, ok in health[:MAX_HEALTH]],
        "temperature_c": temperature_c,
        "free_space_mb": free_space_mb,
        "uptime_s": uptime_s,
        "clock": clock,
        "clock_skew_s": clock_skew_s,
        "safe_mode": booted == SAFE_SLOT,
        "role": role,
        "tags": list(tags),
        "metrics_address": metrics_address,
    }
    if throttled is not None:
        document["throttled"] = throttled
    return document


def _one_line(text: str, limit: int = 128) -> str:
    """``text`` as one inert line the server accepts (see :mod:`fleet_core.text`), cut to
    ``limit`` characters."""
    line = printable(text).strip() or "?"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _version(text: str | None) -> str | None:
    return None if text is None else _one_line(text)


def protocol_hostname(name: str) -> str:
    """The host name as the protocol's ``hostname`` accepts it (letters, digits, ``._-``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-")[:253]
    return cleaned or "unknown"
