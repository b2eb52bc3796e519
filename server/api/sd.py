"""``/api/v1/sd/prometheus``: the devices as Prometheus HTTP service discovery targets.

Prometheus's ``http_sd_configs`` polls this route and scrapes every device that reported where
its metrics are served (the heartbeat's ``metrics_address``, docs/device-protocol.md), so an
enrolled device appears in Prometheus without anyone editing a file. The answer is the http_sd
format: a JSON list of target groups, one per device::

    [{"targets": ["cam-0001.lan:9101"],
      "labels": {"device": "<device id>", "hostname": "cam-0001", "role": "camera",
                 "version": "1.2.0", "compatible": "metrica-rpi4"}}]

Labels hold what a device is (a handful of values per device), never what it measures. A
device that never reported an address is not listed, and neither is one whose stored address
the rule of ``server/scrape.py`` refuses under the server's settings now (stored by an older
server, or before the allowed networks changed): the rule holds for what Prometheus is told,
not only for what was accepted. Viewers may read it: the answer names
devices and addresses, nothing that admits anyone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from server.api.common import State, Viewer
from server.database import Database
from server.models import Device, DeviceStatus
from server.scrape import Network, check_metrics_address

router = APIRouter(prefix="/api/v1/sd", tags=["service discovery"])


def metrics_address(device: Device, networks: Sequence[Network] = ()) -> str | None:
    """The ``host:port`` of the device's last heartbeat, or None (none, or one that the scrape
    rule refuses with ``networks`` allowed)."""
    if not device.last_heartbeat:
        return None
    try:
        address = json.loads(device.last_heartbeat).get("metrics_address")
    except (ValueError, AttributeError):
        return None
    if not isinstance(address, str) or not address:
        return None
    try:
        return check_metrics_address(address, networks)
    except ValueError:
        return None


def target_groups(db: Database, networks: Sequence[Network] = ()) -> list[dict[str, Any]]:
    """One http_sd target group per device with an allowed metrics address, in device id
    order; a decommissioned device is no target (its address may be another machine's now)."""
    groups = []
    with db.read() as session:
        query = select(Device).where(Device.status != DeviceStatus.DECOMMISSIONED.value)
        for device in session.scalars(query.order_by(Device.id)):
            address = metrics_address(device, networks)
            if address is None:
                continue
            groups.append(
                {
                    "targets": [address],
                    "labels": {
                        "device": device.id,
                        "hostname": device.hostname,
                        "role": device.role or "",
                        "version": device.version or "",
                        "compatible": device.compatible,
                    },
                }
            )
    return groups


@router.get("/prometheus")
async def prometheus(_caller: Viewer, state: State) -> list[dict[str, Any]]:
    """Every device that serves metrics, as Prometheus HTTP service discovery targets."""
    return await run_in_threadpool(target_groups, state.db, state.settings.metrics_networks)
