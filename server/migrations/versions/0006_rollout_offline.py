"""A rollout skips offline devices: ``rollouts.offline_after_s``, how long a device may go
unseen before the rollout neither assigns nor expects it.

Rollouts created before this revision get the default, 86400 (a day): an active one stops
assigning devices silent for longer at its next evaluation; the devices it assigned already
stay its members.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(
            sa.Column("offline_after_s", sa.Integer(), nullable=False, server_default="86400")
        )


def downgrade() -> None:
    # Not in a batch: on SQLite a batch would copy ``rollouts`` to a new table and drop the old
    # one, and dropping it deletes every ``rollout_devices`` row with it (ON DELETE CASCADE).
    # SQLite drops a plain column in place (3.35 and later), as PostgreSQL does.
    op.drop_column("rollouts", "offline_after_s")
