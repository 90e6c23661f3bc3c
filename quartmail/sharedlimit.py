"""``MAIL_RATE_LIMIT`` held across processes: the slots in the outbox's database.

With the outbox (:meth:`quartmail.Mail.init_outbox`), the N slots of
:mod:`quartmail.ratelimit` are N rows of the ``mail_rate_limit`` table, one
set per account (``MAIL_USERNAME@MAIL_SERVER:MAIL_PORT``), so that every
process sending from that account shares them: three dispatchers at "20/s"
start 20 transactions a second together, not 60. The rule is the same as in
one process, with the database's clock as the only clock:

- a start takes a row whose ``free_at`` has passed, in one ``UPDATE`` (on
  PostgreSQL, ``SELECT ... FOR UPDATE SKIP LOCKED`` in a materialized CTE, so
  processes take distinct rows without waiting for each other; SQLite has one
  writer at a time), and marks it held until now + the period + twice
  ``MAIL_TIMEOUT``: if the process dies mid-transaction, the row comes back
  by itself, after the MAIL FROM that took it must have arrived. On
  PostgreSQL it also takes rows that free within the next poll, with the
  seconds each has yet to wait by the statement's own clock: waited from the
  answer's arrival, the start comes no sooner than the row's ``free_at``;
- the end of the transaction sets ``free_at`` to the period after that end
  (dated back by the time it took to reach the database, measured here), in
  a task of its own, so that the sender does not wait for it; the ends that
  come meanwhile go in its next statement.

Each is one statement committed on its own (one round trip), and a process
takes at once a slot for each of its waiters.

The clock: PostgreSQL's ``clock_timestamp()``, one clock for every machine;
on SQLite, whose processes share one machine, that machine's ``time.time()``.

Each process serves its own waiters first come, first served (one of them
asks the database at a time); between processes, the first to ask takes the
row. A waiter asks again when the earliest row is about to free, at most
every period/N seconds (5 ms to 1 s). When the database cannot be reached,
the transaction waits (within its ``MAIL_DELIVERY_TIMEOUT``) rather than
break the limit; a row whose end cannot be written stays held until its hold
runs out: slower, never over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ._extras import missing_extra

try:
    from sqlalchemy import Double, cast, extract, func, literal, select, update
    from sqlalchemy.dialects import postgresql, sqlite
    from sqlalchemy.ext.asyncio import AsyncEngine
except ModuleNotFoundError as error:
    raise missing_extra(error, "outbox", "The durable outbox") from None

from .outbox import OutboxBase, RateLimitSlot, create_missing_tables
from .ratelimit import RateLimit

__all__ = ["DatabaseSlots", "account_of"]

log = logging.getLogger("quartmail.outbox")

# A waiter asks the database again at most this often, and at least this often.
_MIN_POLL = 0.005
_MAX_POLL = 1.0
# Within every database's limit on the parameters of one statement.
_ROWS_PER_INSERT = 500


def account_of(username: str | None, hostname: str, port: int) -> str:
    """The key of a limit: the account a provider counts sends against."""
    return f"{username or ''}@{hostname}:{port}"[:255]


class DatabaseSlots:
    """The :class:`~quartmail.ratelimit.Slots` of one account, in *engine*'s database."""

    def __init__(self, engine: AsyncEngine, limit: RateLimit, account: str, hold: float) -> None:
        self.engine = engine
        self.account = account
        self._limit = limit
        # How long a taken slot stays held if its end is never recorded.
        self._hold = limit.period + hold
        self._postgres = engine.dialect.name == "postgresql"
        self._poll = min(_MAX_POLL, max(_MIN_POLL, limit.period / limit.count))
        self._ready = False
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._ended: list[int] = []  # slots whose transactions ended, to free
        self._writer: asyncio.Task[None] | None = None  # frees them
        self._last_end = 0.0  # loop time of the last end

    def __repr__(self) -> str:
        return f"<DatabaseSlots {self.account!r} {self._limit}>"

    def _now(self) -> Any:
        """The database's clock in seconds since the epoch (see the module's docstring)."""
        if self._postgres:
            return cast(extract("epoch", func.clock_timestamp()), Double)
        return literal(time.time(), Double)

    def _mine(self) -> Any:
        return (RateLimitSlot.account == self.account) & (RateLimitSlot.slot < self._limit.count)

    async def take(self, count: int) -> tuple[list[tuple[int, float]], float]:
        try:
            if not self._ready:
                await self._create_slots()
            # Slots free now or within a poll: each waits here, not in another round trip.
            # (Not on SQLite, whose RETURNING cannot give the free_at before the update;
            # its round trips are short.)
            ahead = self._poll if self._postgres else 0.0
            free = (
                select(RateLimitSlot.slot, RateLimitSlot.free_at)
                .where(self._mine(), RateLimitSlot.free_at <= self._now() + ahead)
                .order_by(RateLimitSlot.free_at, RateLimitSlot.slot)
                .limit(count)
                .with_for_update(skip_locked=True)
                # Run once: else PostgreSQL may run it again for each row, and SKIP
                # LOCKED then skips the rows just updated and finds others.
                .cte("free")
                .prefix_with("MATERIALIZED", dialect="postgresql")
            )
            # One statement, committed on its own: one round trip.
            async with self._autocommit.connect() as connection:
                taken = await connection.execute(
                    update(RateLimitSlot)
                    .where(RateLimitSlot.account == self.account, RateLimitSlot.slot == free.c.slot)
                    .values(free_at=self._now() + self._hold)
                    # How long each must wait yet, by the clock of this very statement: waited
                    # from the answer's arrival, it ends at or after the slot's free_at.
                    .returning(
                        RateLimitSlot.slot,
                        free.c.free_at - self._now() if self._postgres else literal(0.0),
                    )
                )
                slots = [(slot, max(0.0, float(wait))) for slot, wait in taken]
                if slots:
                    return slots, 0.0
                wait = await connection.scalar(
                    select(func.min(RateLimitSlot.free_at) - self._now()).where(self._mine())
                )
        except Exception:
            # Waiting (within MAIL_DELIVERY_TIMEOUT) rather than break the limit.
            log.exception("Could not take a MAIL_RATE_LIMIT slot; trying again")
            return [], _MAX_POLL
        return [], min(self._poll, max(_MIN_POLL, float(wait or 0.0) - ahead))

    async def _create_slots(self) -> None:
        """The account's N rows, made by whichever process comes first."""
        await create_missing_tables(self.engine, OutboxBase.metadata)
        dialect = postgresql if self._postgres else sqlite
        async with self.engine.begin() as connection:
            for first in range(0, self._limit.count, _ROWS_PER_INSERT):
                slots = range(first, min(first + _ROWS_PER_INSERT, self._limit.count))
                rows = [{"account": self.account, "slot": slot, "free_at": 0.0} for slot in slots]
                await connection.execute(
                    dialect.insert(RateLimitSlot).values(rows).on_conflict_do_nothing()
                )
        self._ready = True

    def give_back(self, slot: int) -> None:
        self._ended.append(slot)
        self._last_end = asyncio.get_running_loop().time()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._give_back())

    async def _give_back(self) -> None:
        """Free the ended slots, those that end meanwhile in the next statement."""
        while self._ended:
            slots, self._ended = self._ended, []
            # Dated back to the last of their ends (by this process's clock, measured now,
            # before the statement leaves): the time spent reaching the database is not
            # lost, and no slot is freed less than a period after its own end.
            ago = asyncio.get_running_loop().time() - self._last_end
            try:
                async with self._autocommit.connect() as connection:
                    await connection.execute(
                        update(RateLimitSlot)
                        .where(RateLimitSlot.account == self.account, RateLimitSlot.slot.in_(slots))
                        .values(free_at=self._now() - ago + self._limit.period)
                    )
            except Exception:
                # The rows stay held until their hold runs out: slower, never over the limit.
                log.exception("Could not free MAIL_RATE_LIMIT slots %s", slots)

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer
