"""The database: one async SQLAlchemy engine per app, connections and sessions on demand.

SQLite (through aiosqlite) by default, in the instance folder; PostgreSQL
(through asyncpg) with ``DATABASE_URL=postgresql+asyncpg://...``. The schema
is Alembic's (:mod:`quartmail.app.migrations`): start-up makes it in an empty
database and stops on one behind the code. The engine is disposed at shutdown.
"""

from __future__ import annotations

import os
from typing import Any

from quart import Quart, current_app
from sqlalchemy import Connection, event
from sqlalchemy.engine.interfaces import ExecutionContext
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState

from . import migrations, sqlite

__all__ = ["LAST", "Database", "database_url"]

#: The execution option that marks a transaction's last statement: on SQLite it
#: commits in the same trip to aiosqlite's thread; elsewhere it changes nothing (the
#: caller commits as always; on SQLite that commit then finds nothing to do).
LAST = "quartmail_last_statement"


def database_url(app: Quart) -> str:
    """``DATABASE_URL``, or an SQLite file in the app's instance folder."""
    url = app.config.get("DATABASE_URL")
    if url:
        return str(url)
    os.makedirs(app.instance_path, exist_ok=True)
    return f"sqlite+aiosqlite:///{os.path.join(app.instance_path, 'quartmail.sqlite')}"


def _create_engine(url: str) -> AsyncEngine:
    if not url.startswith("sqlite"):
        return create_async_engine(url)

    # SQLite has one writer at a time, and writers that find the file locked
    # sleep and retry rather than queue: under load some lose until they fail
    # with "database is locked". One connection makes the app's requests take
    # turns in order instead; WAL lets other processes (a CLI command) read
    # meanwhile, and synchronous=NORMAL is what WAL needs to stay safe.
    # pool_reset_on_return=None with the "reset" hook below: a rollback only when a
    # transaction is open, not after every commit (each is a trip to aiosqlite's thread).
    def connect() -> sqlite.OneTripConnection:
        # One trip to aiosqlite's thread per statement, not four; given what the
        # dialect would pass to aiosqlite.connect (the file, the URL's options).
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        return sqlite.connect(*args, **kwargs)

    engine: AsyncEngine = create_async_engine(
        url,
        pool_size=1,
        max_overflow=0,
        pool_timeout=60,
        pool_reset_on_return=None,
        async_creator=connect,
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(connection: Any, _: object) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")
        sqlite.use_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _commit_in_trip(
        connection: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: ExecutionContext | None,
        executemany: bool,
    ) -> None:
        # A statement run with the option LAST (the transaction's last one) commits in
        # its own trip to aiosqlite's thread: see OneTripConnection.
        if context is not None and context.execution_options.get(LAST):
            driver = connection.connection.driver_connection
            if isinstance(driver, sqlite.OneTripConnection):
                driver.commit_with_next = True

    @event.listens_for(engine.sync_engine, "reset")
    def _rollback_if_open(
        connection: Any, record: ConnectionPoolEntry, state: PoolResetState
    ) -> None:
        # SQLAlchemy's Connection ends its transaction before it gives the connection back,
        # so this rolls back only what was left open some other way. Outside the event
        # loop's context (a connection collected as garbage) it cannot await: SQLAlchemy
        # then discards the connection.
        driver = record.driver_connection
        if state.asyncio_safe and driver is not None and driver.in_transaction:
            connection.rollback()

    return engine


class Database:
    """The app's engine and session factory, in ``app.extensions["db"]``."""

    def __init__(self, app: Quart) -> None:
        self.url = database_url(app)
        self.engine: AsyncEngine = _create_engine(self.url)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        app.extensions["db"] = self
        app.after_serving(self.engine.dispose)

    def __repr__(self) -> str:
        # The URL may hold a password: show it masked.
        return f"<Database {self.engine.url.render_as_string(hide_password=True)}>"

    async def prepare(self) -> None:
        """Make the schema in an empty database; raise :class:`~quartmail.SchemaError`,
        naming the command to run, when the database is behind the code (Hypercorn's
        workers may start at once: they take turns)."""
        await migrations.prepare(self.engine)

    @staticmethod
    def of(app: Quart | None = None) -> Database:
        """The database of *app*, or of the current app."""
        database: Database = (app or current_app).extensions["db"]
        return database

    @staticmethod
    def connect() -> AsyncConnection:
        """A new Core connection to the current app's database (``async with`` it)."""
        return Database.of().engine.connect()

    @staticmethod
    def session() -> AsyncSession:
        """A new session on the current app's database (``async with`` it)."""
        return Database.of().sessions()
