"""The sign-up app's Alembic environment: run by quartmail.app.migrations.

It migrates over the connection that the caller opened (and locked) and put
in ``config.attributes["connection"]``; there is no offline (``--sql``) mode.
"""

from __future__ import annotations

from alembic import context

from quartmail.app.models import Base
from quartmail.outbox import OutboxBase

if context.is_offline_mode():
    raise RuntimeError("the sign-up app migrates its database online only")

context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=[Base.metadata, OutboxBase.metadata],
    # SQLite alters most things only by copying the table: let autogenerate say so.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
