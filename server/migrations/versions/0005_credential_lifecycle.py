"""Credentials that can be withdrawn: operator tokens expire and are revoked, enrollment tokens
are revoked, devices are quarantined or decommissioned.

Operator tokens created before this revision keep ``expires`` NULL: they never expire (the
server cannot know which of them are still the only way in), are listed as such by
``fleet server token list``, and are revoked like any other.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("operator_tokens") as batch:
        batch.add_column(sa.Column("expires", _time(), nullable=True))
        batch.add_column(sa.Column("revoked", _time(), nullable=True))
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.add_column(sa.Column("revoked", _time(), nullable=True))
    with op.batch_alter_table("devices") as batch:
        batch.add_column(
            sa.Column("status", sa.String(16), nullable=False, server_default="active")
        )
        batch.add_column(sa.Column("status_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("status_since", _time(), nullable=True))
        batch.add_column(sa.Column("status_by", sa.String(160), nullable=True))
        batch.create_check_constraint(
            "ck_devices_status", "status IN ('active', 'quarantined', 'decommissioned')"
        )


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_constraint("ck_devices_status", type_="check")
        batch.drop_column("status_by")
        batch.drop_column("status_since")
        batch.drop_column("status_reason")
        batch.drop_column("status")
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.drop_column("revoked")
    with op.batch_alter_table("operator_tokens") as batch:
        batch.drop_column("revoked")
        batch.drop_column("expires")
