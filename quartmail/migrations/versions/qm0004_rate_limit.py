"""mail_rate_limit: the slots of MAIL_RATE_LIMIT, shared by every process.

Revision ID: qm0004
Revises: qm0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "qm0004"
down_revision = "qm0003"
branch_labels: tuple[str, ...] | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "mail_rate_limit",
        # MAIL_USERNAME@MAIL_SERVER:MAIL_PORT: the account a provider counts.
        sa.Column("account", sa.String(255), primary_key=True),
        sa.Column("slot", sa.Integer(), primary_key=True, autoincrement=False),
        # Seconds since the epoch, by the database's clock (quartmail.sharedlimit).
        sa.Column("free_at", sa.Double(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("mail_rate_limit")
