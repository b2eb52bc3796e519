"""Device roles and tags, rollout selectors and acknowledged failures, and indexes for "is
any rollout active?" and for failure events.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("role", sa.String(64), nullable=True))
        batch.add_column(sa.Column("tags", sa.Text(), nullable=True))
        batch.create_index("ix_devices_role", ["role"])
    op.create_index("ix_audit_action", "audit", ["action"])
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("selector", sa.Text(), nullable=True))
        batch.add_column(sa.Column("acknowledged", sa.Text(), nullable=True))
        batch.create_index("ix_rollouts_state", ["state"])


def downgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_index("ix_rollouts_state")
        batch.drop_column("acknowledged")
        batch.drop_column("selector")
    with op.batch_alter_table("devices") as batch:
        batch.drop_index("ix_devices_role")
        batch.drop_column("tags")
        batch.drop_column("role")
    op.drop_index("ix_audit_action", "audit")
