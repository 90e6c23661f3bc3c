"""The sign-up app's schema: its Alembic revisions beside quartmail's, run in-process.

One ``alembic_version`` table holds two heads: the app's branch (``signup``,
the ``users`` table, in ``versions/``) and quartmail's (``quartmail``, the
outbox's tables, shipped in :mod:`quartmail.migrations`). Every run holds a
lock for its whole transaction, so Hypercorn's workers, starting at once,
take turns: a PostgreSQL advisory lock, or SQLite's write lock (``BEGIN
IMMEDIATE``). Alembic's command API runs on that connection (``run_sync``),
in the caller's event loop.

At start-up (:func:`prepare`) an empty database is upgraded; one behind the
code (or ahead of it) stops the app with the command to run.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, inspect, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from quartmail import migrations as library
from quartmail.errors import SchemaError

from ..sqlite import use_wal

__all__ = ["UPGRADE_COMMAND", "current", "downgrade", "heads", "prepare", "upgrade"]

UPGRADE_COMMAND = 'quart --app "quartmail.app:create_app()" db upgrade'
_HERE = Path(__file__).resolve().parent
# Any fixed number: the key of the PostgreSQL advisory lock that migrations hold.
_LOCK_KEY = 7_356_045_118
_T = TypeVar("_T")


def _config(connection: Connection | None = None) -> Config:
    config = Config(attributes={"connection": connection})
    config.set_main_option("script_location", str(_HERE))
    config.set_main_option("path_separator", "os")
    library_versions = Path(str(library.__file__)).parent / "versions"
    config.set_main_option(
        "version_locations", os.pathsep.join([str(_HERE / "versions"), str(library_versions)])
    )
    return config


def heads() -> set[str]:
    """The revisions the code needs: one head per branch."""
    return set(ScriptDirectory.from_config(_config()).get_heads())


async def current(engine: AsyncEngine) -> set[str]:
    """The revisions *engine*'s database is at (empty before the first upgrade)."""
    async with engine.connect() as connection:
        return await connection.run_sync(_current)


async def upgrade(engine: AsyncEngine, revision: str = "heads") -> set[str]:
    """Upgrade to *revision* (every branch's head by default); returns the revisions
    the database is at. A database made before migrations (by ``create-db`` or an
    earlier start-up) is first stamped with the revisions its tables match."""
    async with _locked(engine) as connection:
        await connection.run_sync(_adopt)
        await connection.run_sync(_command(command.upgrade, revision))
        return await connection.run_sync(_current)


async def downgrade(engine: AsyncEngine, revision: str) -> set[str]:
    """Downgrade to *revision* (``quartmail@qm0001``, ``signup@-1``, ``base``);
    returns the revisions the database is at."""
    async with _locked(engine) as connection:
        await connection.run_sync(_command(command.downgrade, revision))
        return await connection.run_sync(_current)


async def prepare(engine: AsyncEngine) -> None:
    """At start-up: upgrade an empty database; raise :class:`~quartmail.SchemaError`
    naming the command to run when the database is not at the code's revisions."""
    async with _locked(engine) as connection:
        at = await connection.run_sync(_current)
        needed = heads()
        if at == needed:
            return
        if not at and not await connection.run_sync(_known_tables):
            await connection.run_sync(_command(command.upgrade, "heads"))
            return
    if not at:
        raise SchemaError(
            "The database has the app's tables but no migration history (made before"
            f" migrations): run `{UPGRADE_COMMAND}`"
        )
    unknown = at - _revisions()
    if unknown:
        raise SchemaError(
            f"The database is at {_names(unknown)}, which this code does not know (a newer"
            f" release migrated it): run that release, or downgrade with it to {_names(needed)}"
        )
    raise SchemaError(
        f"The database schema is older than the code (at {_names(at)}, the code needs"
        f" {_names(needed)}): run `{UPGRADE_COMMAND}`"
    )


@asynccontextmanager
async def _locked(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that no other process's migration runs beside."""
    if engine.dialect.name == "postgresql":
        async with engine.begin() as connection:
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            yield connection
        return
    if engine.dialect.name != "sqlite":
        raise SchemaError(f"migrations run on PostgreSQL or SQLite, not {engine.dialect.name}")
    # SQLite: BEGIN IMMEDIATE takes the write lock before the first read, and
    # SQLite's DDL is transactional, so the whole upgrade is one locked step.
    # pysqlite would begin only before DML: its own BEGIN is turned off here.
    immediate = create_async_engine(engine.url, poolclass=NullPool)

    @event.listens_for(immediate.sync_engine, "connect")
    def _no_implicit_begin(connection: Any, _: object) -> None:
        connection.isolation_level = None
        cursor = connection.cursor()
        cursor.execute("PRAGMA busy_timeout=60000")  # wait for another process's migration
        use_wal(cursor)  # before anyone holds the lock: see use_wal
        cursor.close()

    @event.listens_for(immediate.sync_engine, "begin")
    def _begin_immediate(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    try:
        async with immediate.begin() as connection:
            yield connection
    finally:
        await immediate.dispose()


def _command(run: Callable[[Config, str], None], revision: str) -> Callable[[Connection], None]:
    def on(connection: Connection) -> None:
        run(_config(connection), revision)

    return on


def _current(connection: Connection) -> set[str]:
    return set(MigrationContext.configure(connection).get_current_heads())


def _revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory.from_config(_config()).walk_revisions()}


def _known_tables(connection: Connection) -> bool:
    return bool({"users", "mail_outbox"} & set(inspect(connection).get_table_names()))


def _adopt(connection: Connection) -> None:
    """Stamp a database made before migrations with the revisions its tables match."""
    if _current(connection):
        return
    database = inspect(connection)
    tables = set(database.get_table_names())
    stamps = []
    if "users" in tables:
        users = {column["name"] for column in database.get_columns("users")}
        stamps.append("app0002" if "email" in users and "limit_events" in tables else "app0001")
    if "mail_outbox" in tables:
        columns = {column["name"] for column in database.get_columns("mail_outbox")}
        if "mail_rate_limit" in tables:
            stamps.append(library.RATE_LIMIT)
        elif "transactional" in columns and "mail_suppression" in tables:
            stamps.append(library.SUPPRESSION)
        else:
            stamps.append(library.CLAIMED_BY if "claimed_by" in columns else library.BASELINE)
    if stamps:
        command.stamp(_config(connection), stamps)


def _names(revisions: Iterable[str]) -> str:
    return ", ".join(sorted(revisions))
