"""mail_suppression (the suppression list) and mail_outbox.transactional.

Revision ID: qm0003
Revises: qm0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "qm0003"
down_revision = "qm0002"
branch_labels: tuple[str, ...] | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "mail_suppression",
        # RFC 5321 section 4.5.3.1.3: a path is at most 256 octets; 320 holds any
        # 64-octet local part at a 255-octet domain, as stored before checking.
        sa.Column("address", sa.String(320), primary_key=True),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    # A server default: rows queued before the upgrade are not transactional mail.
    op.add_column(
        "mail_outbox",
        sa.Column("transactional", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    with op.batch_alter_table("mail_outbox") as batch:
        batch.drop_column("transactional")
    op.drop_table("mail_suppression")
