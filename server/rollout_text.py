"""How a rollout's view (``server.rollouts.status`` and ``get``) reads to operators: the words
``fleet rollout status`` prints and the web console shows, written once so both say the same.

Pure functions of the view's plain values; what is drawn around them (a terminal's ``[###..]``
bar, a page's ``<meter>``) stays with whoever draws it.
"""

from __future__ import annotations

from typing import Any


def duration_text(seconds: int) -> str:
    """``86400`` as ``1d``, ``5400`` as ``1h30m``: as the duration options are written."""
    parts, rest = [], seconds
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts) or "0s"


def selector_text(selector: dict[str, Any] | None) -> str | None:
    """A rollout's selector as ``role=camera tag=north`` (None: every compatible device)."""
    if not selector:
        return None
    wanted = ([f"role={selector['role']}"] if selector.get("role") else []) + [
        f"tag={t}" for t in selector.get("tags", [])
    ]
    return " ".join(wanted)


def skipped_text(skipped: int, offline_after_s: int) -> str:
    """Why ``skipped`` selected devices are not assigned: they are offline."""
    return (
        f"{skipped} device{'s' if skipped != 1 else ''} skipped: offline for more than "
        f"{duration_text(offline_after_s)} (assigned when seen again)"
    )


def windows_text(windows: list[str]) -> str | None:
    """A rollout's maintenance windows: ``Mon-Fri 02:00-05:00, Sat 00:00-24:00 (each device's
    local time)``; None: any time."""
    if not windows:
        return None
    return f"{', '.join(windows)} (each device's local time)"


def waiting_text(waiting: int) -> str:
    """How many pending devices wait for a maintenance window (theirs or the rollout's)."""
    return (
        f"{waiting} device{'s' if waiting != 1 else ''} waiting for a maintenance window "
        "(assigned; the install starts when one opens)"
    )


def stage_text(stage: dict[str, Any]) -> str:
    """A stage's counts (one entry of the view's ``stage_progress``): ``3/20 ok, 1 failed, 2
    pending``."""
    return (
        f"{stage['succeeded']}/{stage['expected']} ok, {stage['failed']} failed, "
        f"{stage['pending']} pending"
    )


def failure_rule_text(rule: dict[str, Any]) -> str:
    """The failure rule as it stands (the view's ``failure_rule``): the rule, then how many
    devices failed of how many counted, and how many failures it tolerates now."""
    return (
        f"{rule['text']}; now {rule['failed']} of {rule['assigned']} failed, "
        f"{rule['allowed']} tolerated"
        + (
            f" (one failure is tolerated from {rule['min_devices_for_one_failure']} devices on)"
            if rule["min_devices_for_one_failure"]
            else ""
        )
    )
