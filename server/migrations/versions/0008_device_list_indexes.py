"""Indexes for the web console's device list: one per sort key and filter (hostname, last seen,
version, state, status, enrolled), each ending on the device id, the order's tie-break, so a
page of a large fleet in any order is read from an index instead of sorting the table.

Nothing else changes: the downgrade drops them.

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

INDEXES = {
    "ix_devices_hostname": ["hostname", "id"],
    "ix_devices_last_seen": ["last_seen", "id"],
    "ix_devices_version": ["version", "id"],
    "ix_devices_state": ["state", "id"],
    # and what the overview counts by (seen, state), so its grouped counts read the index alone
    "ix_devices_status": ["status", "last_seen", "state", "id"],
    "ix_devices_enrolled": ["enrolled", "id"],
}


def upgrade() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "devices", columns)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name="devices")
