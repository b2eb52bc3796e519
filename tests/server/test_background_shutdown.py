"""A background task's database call finishes before the server's shutdown goes on."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.database import finish_in_thread


def test_cancelling_waits_for_the_call_in_its_thread() -> None:
    started = threading.Event()
    ended: list[float] = []

    def transaction() -> str:
        started.set()
        time.sleep(0.3)
        ended.append(time.monotonic())
        return "done"

    async def shutdown_midway() -> float:
        task = asyncio.create_task(finish_in_thread(transaction))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic()

    cancelled_at = asyncio.run(shutdown_midway())
    assert ended, "the cancellation went on while the call was still running"
    assert ended[0] <= cancelled_at


def test_the_result_and_the_failure_of_the_call_come_back() -> None:
    def fails() -> None:
        raise ValueError("the database is away")

    assert asyncio.run(finish_in_thread(lambda a, b: a + b, 2, 3)) == 5
    with pytest.raises(ValueError, match="away"):
        asyncio.run(finish_in_thread(fails))
