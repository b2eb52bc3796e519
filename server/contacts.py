"""What the server records of its devices' contacts: each one's ``last_seen`` and, once per
silence longer than the DeviceOffline alert's threshold, a ``contact_gaps`` row, so that
``fleet slo report`` (server/slo.py) can count down time without a write per heartbeat.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.models import ContactGap, Device

# The DeviceOffline alert (deploy/monitoring/prometheus/rules/fleet.rules.yml): a device unseen
# for more than OFFLINE_AFTER_S, for OFFLINE_ALERT_FOR_S, fires it. A test holds them equal.
OFFLINE_AFTER_S = 300
OFFLINE_ALERT_FOR_S = 60
CONTACT_GAPS = "contact_gaps"  # its RecordEpoch's name


def record_contact(session: Session, device: Device, now: datetime) -> None:
    """Note that ``device`` contacted the server at ``now`` (its ``last_seen``), in the
    caller's write transaction.

    A contact after a silence longer than :data:`OFFLINE_AFTER_S` adds one ``contact_gaps``
    row; any other contact writes nothing more than before. No lock is taken: two requests of
    the device that saw the same silence insert the same key (the device, the silence's start),
    and the second one's insert, in a savepoint, is undone alone.
    """
    if now - device.last_seen > timedelta(seconds=OFFLINE_AFTER_S):
        try:
            with session.begin_nested():
                session.add(ContactGap(device_id=device.id, started=device.last_seen, ended=now))
        except IntegrityError:
            pass  # recorded by the other request
    device.last_seen = now
