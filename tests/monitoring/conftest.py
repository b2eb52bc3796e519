"""Shared paths and helpers of the monitoring tests (deploy/monitoring, docs/runbooks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "prometheus" / "rules" / "fleet.rules.yml"
RUNBOOKS = ROOT / "docs" / "runbooks"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of the rules file, in order."""
    groups = load_yaml(RULES)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


# Signed lab releases (tests/chaos), for the server processes of the real-Prometheus test.
from tests.chaos.conftest import releases  # noqa: E402, F401
