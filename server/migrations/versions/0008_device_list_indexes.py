"""Indexes for the web console's device list: one per sort key and filter (hostname, last seen,
version, state, role, status, enrolled), each leading with its column and the device id, the
order's tie-break, so a page of a large fleet in any order is read from an index instead of
sorting the table.

The filter columns' indexes (last seen, version, state, role, status) then carry every column
the list filters by, so the count of the devices matching any combination of filters reads one
index alone, never the table's wide rows (the last heartbeat's JSON): whichever of them the
database picks for the count's condition covers the rest of it.

Nothing else changes: the downgrade drops them and gives the role index back its one column
(migration 0003).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# What the device list filters by, besides the leading columns (server/ui/queries.py).
FILTERED = ["status", "last_seen", "state", "version", "role", "tags", "hostname"]


def _covering(*leading: str) -> list[str]:
    return [*leading, *(c for c in FILTERED if c not in leading)]


INDEXES = {
    "ix_devices_hostname": ["hostname", "id"],
    "ix_devices_last_seen": _covering("last_seen", "id"),
    "ix_devices_version": _covering("version", "id"),
    "ix_devices_state": _covering("state", "id"),
    "ix_devices_role": _covering("role", "id"),
    # status first with what the overview counts by (seen, state), for its grouped counts
    "ix_devices_status": _covering("status", "last_seen", "state", "id"),
    "ix_devices_enrolled": ["enrolled", "id"],
}


def upgrade() -> None:
    op.drop_index("ix_devices_role", table_name="devices")
    for name, columns in INDEXES.items():
        op.create_index(name, "devices", columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="devices")
    op.create_index("ix_devices_role", "devices", ["role"])
