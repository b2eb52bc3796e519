"""A chunked image's chunk index (release bundle format 2): ``release_images.chunk_index_sha256``
and ``chunk_index_size``, the index's blob, which the check-in answer lists beside the image.

Images uploaded before this revision were format 1 (no index): both stay null for them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns without a default: a plain ADD COLUMN on SQLite and PostgreSQL alike.
    op.add_column("release_images", sa.Column("chunk_index_sha256", sa.String(64), nullable=True))
    op.add_column("release_images", sa.Column("chunk_index_size", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # Not in a batch: on SQLite a batch copies the table to a new one and drops the old, which
    # is not needed for a column in place (SQLite 3.35 and later drops it, as PostgreSQL does).
    op.drop_column("release_images", "chunk_index_size")
    op.drop_column("release_images", "chunk_index_sha256")
