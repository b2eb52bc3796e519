"""Shared paths and helpers of the monitoring tests (deploy/monitoring, docs/runbooks)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
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


from tests.conftest import require_tools  # noqa: E402


@pytest.fixture
def promtool() -> None:
    require_tools(promtool=shutil.which("promtool") is not None)


@pytest.fixture
def amtool() -> None:
    require_tools(amtool=shutil.which("amtool") is not None)
