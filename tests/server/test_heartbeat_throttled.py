"""The Raspberry Pi throttling bits in the heartbeat: the server keeps them and exports
``fleet_device_throttled`` and ``fleet_device_under_voltage``, so the under-voltage alert
covers devices no Prometheus can scrape; heartbeats without the field are accepted as before,
and a value that is not 32 bits of flags is refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.server.conftest import FakeDevice, Harness
from tests.server.test_metrics import samples
from updater.heartbeat import heartbeat_document

Enrolled = Callable[..., FakeDevice]


def device_series(harness: Harness, device: FakeDevice, hostname: str) -> dict[str, float]:
    key = (("device", device.id), ("hostname", hostname))
    return {
        name: value
        for (name, labels), value in samples(harness.client).items()
        if labels == key and name in ("fleet_device_throttled", "fleet_device_under_voltage")
    }


def test_the_bits_of_the_last_heartbeat_are_exported(harness: Harness, enrolled: Enrolled) -> None:
    cam = enrolled(hostname="cam-1")
    assert cam.heartbeat(throttled=0x50005).status_code == 204
    assert device_series(harness, cam, "cam-1") == {
        "fleet_device_throttled": 0x50005, "fleet_device_under_voltage": 1,
    }  # fmt: skip
    # the supply recovered: only the "since boot" bits are left, which are no under-voltage now
    assert cam.heartbeat(throttled=0x50000).status_code == 204
    assert device_series(harness, cam, "cam-1") == {
        "fleet_device_throttled": 0x50000, "fleet_device_under_voltage": 0,
    }  # fmt: skip


def test_a_heartbeat_without_the_field_is_accepted_and_exports_nothing(
    harness: Harness, enrolled: Enrolled
) -> None:
    old = enrolled(hostname="cam-2")
    assert old.heartbeat().status_code == 204  # as updaters before the field send it
    assert old.heartbeat(throttled=None).status_code == 204
    assert device_series(harness, old, "cam-2") == {}
    cam = enrolled(hostname="cam-3")
    assert cam.heartbeat(throttled=1).status_code == 204
    assert cam.heartbeat().status_code == 204  # a later heartbeat without it: no stale series
    assert device_series(harness, cam, "cam-3") == {}


@pytest.mark.parametrize("value", [-1, 2**32, 2**64, "0x50005", True, 1.5, [1]])
def test_a_value_that_is_not_the_bits_is_refused(
    harness: Harness, enrolled: Enrolled, value: Any
) -> None:
    device = enrolled()
    response = device.heartbeat(throttled=value)
    assert response.status_code == 422, response.text
    assert "throttled" in response.text


def test_the_updater_sends_the_field_only_when_it_knows_the_bits(
    harness: Harness, enrolled: Enrolled
) -> None:
    snapshot = {
        "booted": "a", "primary": "a", "trial": False, "suspended": None,
        "slots": {"a": {"status": "good", "version": "1.0.0"},
                  "b": {"status": "empty", "version": None}},
    }  # fmt: skip
    common: dict[str, Any] = {
        "health": [], "temperature_c": None, "free_space_mb": None, "uptime_s": None,
        "clock": 1.7e9, "clock_skew_s": None,
    }  # fmt: skip
    unknown = heartbeat_document(snapshot, **common)
    assert "throttled" not in unknown
    known = heartbeat_document(snapshot, **common, throttled=0x50005)
    assert known["throttled"] == 0x50005
    cam = enrolled(hostname="cam-4")
    for document in (unknown, known):
        body = {k: v for k, v in document.items() if v is not None}
        assert cam.heartbeat(**body).status_code == 204
    assert device_series(harness, cam, "cam-4")["fleet_device_under_voltage"] == 1
