"""SQLite for the app: the settings every connection makes (its engine, its
migrations), and connections that cost one trip to aiosqlite's thread per statement.

aiosqlite runs each call on a sqlite3 connection in the connection's own
thread, and every call is a trip there and back (a queue, a thread wake-up,
``call_soon_threadsafe``): about 0.1 ms of CPU, more than SQLite spends on a
small statement. SQLAlchemy's adapter makes four per query (open a cursor,
execute, fetch the rows, close it). :func:`connect` gives it connections whose
cursors do all four in one trip; SQLAlchemy fetches every row of a result at
once anyway (its aiosqlite cursors buffer them).
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiosqlite
from aiosqlite.context import contextmanager

__all__ = ["OneTripConnection", "connect", "use_wal"]

# What one statement leaves behind: description, rows, rowcount, lastrowid.
_Outcome = tuple[Any, list[Any], int, int | None]


def use_wal(cursor: Any) -> None:
    """Put the database file in WAL mode (it stays so), unless it is already: the
    switch needs the file to itself and fails at once ("database is locked"), the
    busy timeout notwithstanding, while another process holds a write lock (a worker
    starting while another migrates)."""
    cursor.execute("PRAGMA journal_mode")
    if cursor.fetchone()[0] != "wal":
        cursor.execute("PRAGMA journal_mode=WAL")


def connect(database: str, **kwargs: Any) -> OneTripConnection:
    """Like :func:`aiosqlite.connect` (await it): *kwargs* go to :func:`sqlite3.connect`."""

    def connector() -> sqlite3.Connection:
        connection: sqlite3.Connection = sqlite3.connect(database, **kwargs)
        return connection

    connection = OneTripConnection(connector, iter_chunk_size=64)
    # As SQLAlchemy does for its own aiosqlite connections: a connection never
    # closed (garbage, a crash) must not keep the interpreter from exiting.
    connection._thread.daemon = True
    return connection


class OneTripConnection(aiosqlite.Connection):
    """An aiosqlite connection whose cursors run each statement in one trip.

    ``commit_with_next``, when set, makes the next statement commit its
    transaction in the same trip (and is then cleared): for a transaction
    whose last statement is known, which then holds SQLite's write lock only
    while aiosqlite's thread runs, never while the event loop runs other
    requests. The caller's commit that follows finds nothing open: no trip.
    """

    commit_with_next = False

    @contextmanager
    async def cursor(self) -> aiosqlite.Cursor:
        """A cursor, made without a trip (see :class:`OneTripCursor`)."""
        return OneTripCursor(self)

    # sqlite3 commits and rolls back only an open transaction, and none is open after
    # reads alone (it begins one before the first write): no trip to do nothing.

    async def commit(self) -> None:
        """Commit the open transaction, if there is one."""
        if self.in_transaction:
            await super().commit()

    async def rollback(self) -> None:
        """Roll back the open transaction, if there is one."""
        if self.in_transaction:
            await super().rollback()


class OneTripCursor(aiosqlite.Cursor):
    """A cursor that holds no sqlite3 cursor between statements: each
    ``execute`` makes one in the connection's thread, runs the statement,
    fetches every row and closes it, all in one trip; the rows and the
    statement's description, row count and last row id wait here.

    It does what SQLAlchemy asks of a cursor; ``executescript``,
    ``row_factory`` and ``connection`` are not for it (a plain
    ``aiosqlite`` cursor from ``Connection.execute`` is).
    """

    _conn: OneTripConnection

    def __init__(self, connection: OneTripConnection) -> None:
        # No super().__init__: it wants the sqlite3 cursor this class never keeps.
        self.iter_chunk_size = connection._iter_chunk_size
        self._conn = connection
        self._rows: deque[Any] = deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None
        self._arraysize = 1

    async def execute(self, sql: str, parameters: Iterable[Any] | None = None) -> OneTripCursor:
        """Run *sql* and keep what it returns."""
        arguments: Any = [] if parameters is None else parameters
        await self._run(lambda cursor: cursor.execute(sql, arguments))
        return self

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> OneTripCursor:
        """Run *sql* once per parameter set."""
        arguments: Any = parameters
        await self._run(lambda cursor: cursor.executemany(sql, arguments))
        return self

    async def executescript(self, sql_script: str) -> OneTripCursor:
        raise NotImplementedError("executescript: use the connection's own cursor")

    async def _run(self, statement: Callable[[sqlite3.Cursor], object]) -> None:
        connection = self._conn
        commit, connection.commit_with_next = connection.commit_with_next, False

        def run() -> _Outcome:
            # In the connection's thread, the only one that may touch its sqlite3 objects.
            cursor = connection._conn.cursor()
            try:
                statement(cursor)
                rows = cursor.fetchall() if cursor.description else []
                # The row count of an INSERT ... RETURNING is known once its rows are read.
                outcome = cursor.description, rows, cursor.rowcount, cursor.lastrowid
            finally:
                cursor.close()
            if commit:
                connection._conn.commit()
            return outcome

        self._rows.clear()
        in_thread: Callable[[Callable[[], _Outcome]], Awaitable[_Outcome]] = connection._execute
        outcome = await in_thread(run)
        self._description, rows, self._rowcount, self._lastrowid = outcome
        self._rows.extend(rows)

    async def fetchone(self) -> Any:
        """The next row, or ``None``."""
        return self._rows.popleft() if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        """Up to *size* (``arraysize``) of the rows left."""
        count = min(self._arraysize if size is None else size, len(self._rows))
        return [self._rows.popleft() for _ in range(count)]

    async def fetchall(self) -> list[Any]:
        """The rows left."""
        rows = list(self._rows)
        self._rows.clear()
        return rows

    async def close(self) -> None:
        """Drop the rows left (the sqlite3 cursor is closed already)."""
        self._rows.clear()

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._lastrowid

    @property
    def arraysize(self) -> int:
        return self._arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._arraysize = value

    @property
    def description(self) -> Any:
        return self._description
