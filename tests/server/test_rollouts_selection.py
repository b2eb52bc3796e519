"""What a rollout reads of the devices it selects (server/rollouts.py): a few columns, never a
device's whole row with its last heartbeat, however large the selection; and a cohort larger
than one batch of updates is assigned whole, each device remembering the release it returns
to."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from server.database import Database
from server.models import Device, Release, RolloutDevice
from server.rollouts import ASSIGN_BATCH, DEFAULT_OFFLINE_AFTER_S, RolloutRequest, get, start

NOW = datetime(2026, 12, 3, 20, 0, tzinfo=UTC)
DEVICES = 3 * ASSIGN_BATCH + 7


def _release(version: str) -> Release:
    return Release(
        version=version, product="p", compatible="cam", security_version=1, manifest=b"{}",
        manifest_sha256="00" * 32, signature=b"", created=NOW, uploaded_by="admin",
    )  # fmt: skip


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[Database, dict[str, int], list[dict[str, Any]]]:
    """Devices of two roles, some tagged "eu", some offline, some not active, one of another
    hardware; half report version 1.0, the others none (assigned 1.0 before)."""
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    db.migrate()
    devices = [
        {
            "id": f"{i:064x}",
            "role": "gateway" if i % 5 else "camera",
            "tags": ["eu", "lab"] if i % 3 else ["lab"],
            "online": i % 7 != 0,
            "version": "1.0" if i % 2 else None,
            "status": "quarantined" if i % 11 == 0 else "active",
            "compatible": "other" if i == 1 else "cam",
        }
        for i in range(DEVICES)
    ]
    with db.write() as session:
        releases = [_release("1.0"), _release("2.0")]
        session.add_all(releases)
        session.flush()
        ids = {r.version: r.id for r in releases}
        for d in devices:
            seen = NOW if d["online"] else NOW - timedelta(seconds=DEFAULT_OFFLINE_AFTER_S + 1)
            session.add(
                Device(id=d["id"], public_key="00" * 32, compatible=d["compatible"],
                       hostname=f"h{d['id'][-4:]}", enrolled=NOW, last_seen=seen,
                       last_heartbeat=json.dumps({"free_space_mb": 900.0}),
                       version=d["version"], role=d["role"], tags=json.dumps(d["tags"]),
                       status=d["status"], assigned_release_id=ids["1.0"])
            )  # fmt: skip
    return db, ids, devices


@pytest.fixture
def statements(
    fleet: tuple[Database, dict[str, int], list[dict[str, Any]]],
) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(args[2])

    engine = fleet[0].engine
    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def test_a_large_selection_is_assigned_whole_from_a_few_columns(
    fleet: tuple[Database, dict[str, int], list[dict[str, Any]]], statements: list[str]
) -> None:
    db, ids, devices = fleet
    selected = [
        d for d in devices
        if d["role"] == "gateway" and "eu" in d["tags"] and d["status"] == "active"
        and d["compatible"] == "cam"
    ]  # fmt: skip
    online = {d["id"] for d in selected if d["online"]}
    assert len(online) > ASSIGN_BATCH  # more than one batch of updates
    request = RolloutRequest(version="2.0", stages=(100,), role="gateway", tags=("eu",))
    started = start(db, request, actor="operator:test", now=NOW)
    view = get(db, started["id"], NOW)
    assert statements and not [s for s in statements if "last_heartbeat" in s]
    for answer in (started, view):
        assert {d["id"] for d in answer["devices"]} == online
        assert answer["skipped_offline"] == sorted(d["id"] for d in selected if not d["online"])
        assert answer["stage_progress"][0]["expected"] == len(online)
    with db.read() as session:
        assigned = dict(session.execute(select(Device.id, Device.assigned_release_id)).all())
        previous = dict(
            session.execute(
                select(RolloutDevice.device_id, RolloutDevice.previous_release_id)
            ).all()
        )
    assert {i for i, release in assigned.items() if release == ids["2.0"]} == online
    assert {release for i, release in assigned.items() if i not in online} == {ids["1.0"]}
    # the release it reports, or failing that the one it was assigned: 1.0 either way here
    assert set(previous) == online and set(previous.values()) == {ids["1.0"]}
