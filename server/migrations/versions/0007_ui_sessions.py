"""The web console's sessions: ``ui_sessions``, one row per signed-in browser.

A row keeps the SHA-256 of the session cookie's secret, never the secret; it belongs to the
operator token the browser signed in with and goes with it (ON DELETE CASCADE).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "ui_sessions",
        sa.Column("secret_sha256", sa.String(64), primary_key=True),
        sa.Column(
            "operator_token_id",
            sa.Integer(),
            sa.ForeignKey("operator_tokens.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created", _time(), nullable=False),
        sa.Column("last_used", _time(), nullable=False),
        sa.Column("expires", _time(), nullable=False),
        sa.Column("notice", sa.Text(), nullable=True),
    )
    op.create_index("ix_ui_sessions_operator_token_id", "ui_sessions", ["operator_token_id"])
    op.create_index("ix_ui_sessions_expires", "ui_sessions", ["expires"])


def downgrade() -> None:
    op.drop_index("ix_ui_sessions_expires", table_name="ui_sessions")
    op.drop_index("ix_ui_sessions_operator_token_id", table_name="ui_sessions")
    op.drop_table("ui_sessions")
