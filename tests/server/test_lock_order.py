"""Audited changes to a device take the audit chain's lock before the device's row.

The rollout evaluator holds the chain's lock while it changes device rows; a device's events
that locked its row first and then waited for the chain would deadlock with it on PostgreSQL
(SQLite has one writer at a time, so there both orders are safe: the test passes there too).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import update

from server import devices
from server.database import AUDIT_CHAIN_LOCK
from server.models import Device
from server.schemas import Event
from server.settings import utc
from tests.server.conftest import FakeDevice, Harness

HOLD_S = 0.5  # how long the evaluator holds the chain before it touches the row


def test_events_wait_for_an_evaluator_holding_the_chain(
    harness: Harness, enrolled: Callable[..., FakeDevice]
) -> None:
    device = enrolled()
    db = harness.db
    now = utc(harness.clock)
    holding = threading.Event()
    failures: list[BaseException] = []

    def evaluator() -> None:
        """Like server.rollouts.evaluate: the chain first, then the device rows."""
        try:
            with db.write() as session:
                db.lock(session, AUDIT_CHAIN_LOCK)
                holding.set()
                threading.Event().wait(HOLD_S)  # the events request starts meanwhile
                session.execute(update(Device).where(Device.id == device.id).values(last_seen=now))
        except BaseException as err:  # reported by the assertion below
            failures.append(err)
        finally:
            holding.set()

    worker = threading.Thread(target=evaluator)
    worker.start()
    assert holding.wait(10)
    stored = devices.record_events(
        db, device.id, [Event(event="install.started", seq=1, fields={})], now + timedelta(1)
    )
    worker.join(30)
    assert not worker.is_alive()
    assert not failures, failures
    assert [event.seq for event in stored] == [1]
