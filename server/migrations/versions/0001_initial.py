"""The first schema: releases, devices, tokens, challenges, sessions, audit trail.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "releases",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("product", sa.String(128), nullable=False),
        sa.Column("compatible", sa.String(128), nullable=False),
        sa.Column("security_version", sa.BigInteger(), nullable=False),
        sa.Column("manifest", sa.LargeBinary(), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("created", _time(), nullable=False),
        sa.Column("uploaded_by", sa.String(160), nullable=False),
        sa.UniqueConstraint("version", name="releases_version_key"),
    )
    op.create_table(
        "release_images",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "release_id",
            sa.Integer(),
            sa.ForeignKey("releases.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("slot_class", sa.String(16), nullable=False),
        sa.Column("filename", sa.String(100), nullable=False),
        sa.Column("compression", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("release_id", "slot_class", name="uq_release_images_slot_class"),
    )
    op.create_index("ix_release_images_sha256", "release_images", ["sha256"])
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("compatible", sa.String(128), nullable=False),
        sa.Column("hostname", sa.String(253), nullable=False),
        sa.Column("enrolled", _time(), nullable=False),
        sa.Column("last_seen", _time(), nullable=False),
        sa.Column("last_heartbeat", sa.Text(), nullable=True),
        sa.Column("last_heartbeat_at", _time(), nullable=True),
        sa.Column("version", sa.String(128), nullable=True),
        sa.Column("state", sa.String(32), nullable=True),
        sa.Column("clock_skew_s", sa.Float(), nullable=True),
        sa.Column(
            "assigned_release_id",
            sa.Integer(),
            sa.ForeignKey("releases.id", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("event_seq", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("uses_left", sa.Integer(), nullable=False),
        sa.Column("expires", _time(), nullable=True),
        sa.Column("created", _time(), nullable=False),
        sa.Column("created_by", sa.String(160), nullable=False),
        sa.UniqueConstraint("token_sha256", name="enrollment_tokens_token_sha256_key"),
        sa.CheckConstraint("uses_left >= 0", name="ck_enrollment_tokens_uses_left"),
    )
    op.create_table(
        "preauthorized_keys",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("created", _time(), nullable=False),
        sa.Column("created_by", sa.String(160), nullable=False),
    )
    op.create_table(
        "operator_tokens",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created", _time(), nullable=False),
        sa.Column("created_by", sa.String(160), nullable=False),
        sa.UniqueConstraint("token_sha256", name="operator_tokens_token_sha256_key"),
        sa.CheckConstraint(
            "role IN ('viewer', 'operator', 'admin')", name="ck_operator_tokens_role"
        ),
    )
    op.create_table(
        "device_challenges",
        sa.Column("challenge_sha256", sa.String(64), primary_key=True),
        sa.Column(
            "device_id",
            sa.String(64),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("expires", _time(), nullable=False),
    )
    op.create_index("ix_device_challenges_device_id", "device_challenges", ["device_id"])
    op.create_index("ix_device_challenges_expires", "device_challenges", ["expires"])
    op.create_table(
        "device_sessions",
        sa.Column("token_sha256", sa.String(64), primary_key=True),
        sa.Column(
            "device_id",
            sa.String(64),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("created", _time(), nullable=False),
        sa.Column("expires", _time(), nullable=False),
    )
    op.create_index("ix_device_sessions_device_id", "device_sessions", ["device_id"])
    op.create_index("ix_device_sessions_expires", "device_sessions", ["expires"])
    op.create_table(
        "audit",
        sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("at", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(160), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(160), nullable=True),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_actor", "audit", ["actor"])


def downgrade() -> None:
    for table in (
        "audit",
        "device_sessions",
        "device_challenges",
        "operator_tokens",
        "preauthorized_keys",
        "enrollment_tokens",
        "devices",
        "release_images",
        "releases",
    ):
        op.drop_table(table)
