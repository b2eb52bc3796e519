"""Audited changes take the audit chain's lock before any device row, the rollout evaluator
included.

A device's events lock the chain and then the device's row (server.devices); an evaluation that
changed device rows (assigning a stage's cohort) and then waited for the chain would deadlock
with them on PostgreSQL. SQLite has one writer at a time, so there every order is safe and the
test passes either way.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from server import devices as device_records
from server import rollouts
from server.rollouts import RolloutRequest
from server.schemas import Event
from tests.server.conftest import FakeDevice
from tests.server.test_slo import (  # noqa: F401 (harness, history: no background evaluator)
    Enrolled,
    History,
    at,
    harness,
    history,
)

HOLD_S = 1.0  # how long the evaluator holds the rows it assigned before it appends to the chain


def test_a_device_back_online_sends_events_while_the_evaluator_assigns_it(
    history: History,  # noqa: F811 (the fixture)
    enrolled: Enrolled,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    devices: dict[str, FakeDevice] = {
        name: history.add(enrolled, name, "camera") for name in ("cam-a", "cam-b", "gw-1")
    }
    ids = {name: device.id for name, device in devices.items()}
    db = history.harness.db
    history.at(1200)
    for name in ("cam-a", "cam-b"):  # gw-1 silent: offline, so left out of its stage for now
        history.heartbeat(name)
    request = RolloutRequest(
        version="2.0.0", device_ids=tuple(ids.values()), canary_ids=(ids["cam-a"],),
        stages=(100,), soak_s=60, offline_after_s=300,
    )  # fmt: skip
    rollouts.start(db, request, actor="operator:alice", now=at(1200))
    history.at(1250)
    history.heartbeat("cam-a", "2.0.0")
    history.evaluate()
    history.at(1300)
    for name in ("cam-a", "cam-b"):
        history.heartbeat(name)
    history.at(1310)
    history.evaluate()  # the 100 % stage: cam-b assigned, gw-1 still offline
    history.at(1320)
    history.heartbeat("gw-1")  # back: the next evaluation assigns it
    history.at(1330)

    assigned = threading.Event()
    audit = rollouts._audit

    def holding_audit(*args: Any, **details: Any) -> Any:
        if threading.current_thread().name == "evaluator" and args[4] == "rollout.assigned":
            assigned.set()
            threading.Event().wait(HOLD_S)  # the device's events arrive meanwhile
        return audit(*args, **details)

    monkeypatch.setattr(rollouts, "_audit", holding_audit)
    failures: list[BaseException] = []

    def evaluate() -> None:
        try:
            history.evaluate()
        except BaseException as err:  # reported by the assertion below
            failures.append(err)
        finally:
            assigned.set()

    worker = threading.Thread(target=evaluate, name="evaluator")
    worker.start()
    assert assigned.wait(20)
    stored = device_records.record_events(
        db, ids["gw-1"], [Event(event="install.started", seq=1, fields={})], at(1331)
    )
    worker.join(30)
    assert not worker.is_alive()
    assert not failures, failures
    assert [event.seq for event in stored] == [1]
