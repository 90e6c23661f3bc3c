"""users.email and users.confirmed_at (address confirmation), and limit_events
(the abuse limits of quartmail.app.limits).

Revision ID: app0002
Revises: app0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "app0002"
down_revision = "app0001"
branch_labels: tuple[str, ...] | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Nullable: users who signed up before gave a name only.
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("email", sa.String(254), nullable=True))
        batch.add_column(sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_users_email", ["email"], unique=False)
    op.create_table(
        "limit_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
    )
    op.create_index("ix_limit_events_at", "limit_events", ["at"])
    op.create_index("ix_limit_events_kind_key_at", "limit_events", ["kind", "key", "at"])


def downgrade() -> None:
    op.drop_table("limit_events")
    with op.batch_alter_table("users") as batch:
        batch.drop_index("ix_users_email")
        batch.drop_column("confirmed_at")
        batch.drop_column("email")
