"""Device silences for ``fleet slo report``: ``contact_gaps``, one row per silence longer than
the offline threshold (written by the contact that ends it), and ``record_epochs``, since when
that record is kept.

A database that has devices already knows nothing of their silences before this revision: its
``contact_gaps`` epoch is the time of the upgrade (the report counts uptime from then). A
database without devices yet has a complete record: its epoch is null.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "contact_gaps",
        sa.Column(
            "device_id",
            sa.String(64),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("started", _time(), primary_key=True),
        sa.Column("ended", _time(), nullable=False),
    )
    op.create_index("ix_contact_gaps_ended", "contact_gaps", ["ended"])
    epochs = op.create_table(
        "record_epochs",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("since", _time(), nullable=True),
    )
    bind = op.get_bind()
    devices = bind.execute(sa.text("SELECT COUNT(*) FROM devices")).scalar_one()
    since: datetime | None = None
    if devices:
        since = datetime.now(UTC)
        if bind.dialect.name == "sqlite":  # stored as naive UTC there (server.models.UTCDateTime)
            since = since.replace(tzinfo=None)
    op.bulk_insert(epochs, [{"name": "contact_gaps", "since": since}])


def downgrade() -> None:
    op.drop_table("record_epochs")
    op.drop_index("ix_contact_gaps_ended", table_name="contact_gaps")
    op.drop_table("contact_gaps")
