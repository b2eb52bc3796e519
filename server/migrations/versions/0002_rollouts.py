"""Staged rollouts: rollouts, the devices they assigned, and the emergency stop.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("release_id", sa.Integer(), sa.ForeignKey("releases.id"), nullable=False),
        sa.Column("device_ids", sa.Text(), nullable=True),
        sa.Column("canary_ids", sa.Text(), nullable=False),
        sa.Column("stages", sa.Text(), nullable=False),
        sa.Column("soak_s", sa.Integer(), nullable=False),
        sa.Column("max_failure_rate", sa.Float(), nullable=False),
        sa.Column("install_deadline_s", sa.Integer(), nullable=False),
        sa.Column("rollback_on_halt", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("stage_started", _time(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created", _time(), nullable=False),
        sa.Column("created_by", sa.String(160), nullable=False),
        sa.CheckConstraint(
            "state IN ('running', 'paused', 'halted', 'aborted', 'completed')",
            name="ck_rollouts_state",
        ),
    )
    op.create_index("ix_rollouts_release_id", "rollouts", ["release_id"])
    op.create_table(
        "rollout_devices",
        sa.Column(
            "rollout_id",
            sa.Integer(),
            sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "device_id",
            sa.String(64),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column(
            "previous_release_id",
            sa.Integer(),
            sa.ForeignKey("releases.id", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("assigned_at", _time(), nullable=False),
        sa.Column("committed_since", _time(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.CheckConstraint(
            "outcome IN ('pending', 'succeeded', 'failed')", name="ck_rollout_devices_outcome"
        ),
    )
    op.create_index("ix_rollout_devices_device_id", "rollout_devices", ["device_id"])
    op.create_table(
        "fleet_control",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("emergency_stop", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("since", _time(), nullable=True),
        sa.Column("actor", sa.String(160), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("fleet_control")
    op.drop_index("ix_rollout_devices_device_id", table_name="rollout_devices")
    op.drop_table("rollout_devices")
    op.drop_index("ix_rollouts_release_id", table_name="rollouts")
    op.drop_table("rollouts")
