"""mail_outbox.claimed_by: which dispatcher holds a row's lease.

Revision ID: qm0002
Revises: qm0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "qm0002"
down_revision = "qm0001"
branch_labels: tuple[str, ...] | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable: rows queued before the upgrade are claimed by nobody yet.
    op.add_column("mail_outbox", sa.Column("claimed_by", sa.String(32), nullable=True))


def downgrade() -> None:
    # Batch mode: an SQLite older than 3.35 cannot drop a column in place.
    with op.batch_alter_table("mail_outbox") as batch:
        batch.drop_column("claimed_by")
