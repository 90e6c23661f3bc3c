"""SQLite settings every connection of the app makes (its engine, its migrations)."""

from __future__ import annotations

from typing import Any

__all__ = ["use_wal"]


def use_wal(cursor: Any) -> None:
    """Put the database file in WAL mode (it stays so), unless it is already: the
    switch needs the file to itself and fails at once ("database is locked"), the
    busy timeout notwithstanding, while another process holds a write lock (a worker
    starting while another migrates)."""
    cursor.execute("PRAGMA journal_mode")
    if cursor.fetchone()[0] != "wal":
        cursor.execute("PRAGMA journal_mode=WAL")
