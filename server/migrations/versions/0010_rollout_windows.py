"""A rollout may carry maintenance windows: ``rollouts.windows``, a JSON list of entries such as
``"Mon-Fri 02:00-05:00"`` (fleet_core.windows), in each device's local time; the devices of the
rollout start installing only inside them (and inside their own).

Rollouts created before this revision have none (null): their devices install at any time of
their own windows, as before.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column without a default: a plain ADD COLUMN on SQLite and PostgreSQL alike.
    op.add_column("rollouts", sa.Column("windows", sa.Text(), nullable=True))


def downgrade() -> None:
    # Not in a batch: on SQLite a batch would copy ``rollouts`` to a new table and drop the old
    # one, and dropping it deletes every ``rollout_devices`` row with it (ON DELETE CASCADE).
    # SQLite drops a plain column in place (3.35 and later), as PostgreSQL does.
    op.drop_column("rollouts", "windows")
