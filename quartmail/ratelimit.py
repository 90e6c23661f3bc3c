"""``MAIL_RATE_LIMIT``: at most N SMTP transactions started in any window of one period.

The algorithm is a sliding-window log kept as N *slots*. Starting a
transaction (MAIL FROM) takes a free slot; when the transaction ends, however
it ends, the slot is handed back and becomes free again one period later. So
no slot serves two starts less than a period apart, and any N + 1 starts span
more than a period: **no window of one period, measured anywhere, holds more
than N starts**. A slot is stamped when the transaction *ends*, after the
server has answered the MAIL FROM (or the connection died), not when it
starts, so the guarantee holds for the server's own clock too: however late a
MAIL FROM arrives, the next start that reuses its slot leaves a period after
it arrived. The cost is the duration of a transaction per slot and period
(a few milliseconds on a nearby relay, under 1% at "20/s").

Why not the alternatives: a token bucket of capacity N refilled at N per
period lets 2N through in one window (a full bucket, then its refill), which
breaks the contract; evenly spaced starts (GCRA, one every period/N) hold it
only on the client's clock, and a network delay that varies by more than the
spacing puts N + 1 arrivals in one of the server's windows.

Waiting never blocks the loop and is first come, first served: the callers
of :meth:`RateLimiter.acquire` queue on an :class:`asyncio.Lock` (FIFO), and
only the first looks for slots, taking one for each caller waiting (one
round trip to the database for several). A wait ends at the caller's
deadline (``MAIL_DELIVERY_TIMEOUT``), with nothing taken.

Where the slots live is a :class:`Slots`: :class:`LocalSlots` in this
process, or a database table shared by every process of the outbox
(:mod:`quartmail.sharedlimit`).
"""

from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass
from typing import Protocol

__all__ = ["LocalSlots", "Permit", "RateLimit", "RateLimiter", "Slots"]

#: The periods MAIL_RATE_LIMIT takes, in seconds, by their letter.
PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` transactions started in any window of ``period`` seconds."""

    count: int
    period: float

    def __str__(self) -> str:
        letter = next((key for key, seconds in PERIODS.items() if seconds == self.period), None)
        return f"{self.count}/{letter or f'{self.period:g}s'}"


class Slots(Protocol):
    """Where the N slots of a :class:`RateLimiter` are kept."""

    async def take(self, count: int) -> tuple[list[tuple[int, float]], float]:
        """Take up to *count* slots: ``([(slot, seconds), ...], 0)``, each
        to be used no sooner than *seconds* from now (0: at once), or
        ``([], seconds)`` until one may be free (``math.inf``: until
        :meth:`give_back` is called)."""
        ...

    def give_back(self, slot: int) -> None:
        """The transaction of *slot* ended now: the slot is free a period from now."""
        ...

    async def close(self) -> None:
        """Finish what :meth:`give_back` started (a write to the database)."""
        ...


class LocalSlots:
    """The slots in this process, as the times at which free ones became free."""

    def __init__(self, limit: RateLimit) -> None:
        self._period = limit.period
        # Handed back in time order, so the deque stays sorted: the first is the earliest.
        self._free: collections.deque[tuple[float, int]] = collections.deque(
            (-math.inf, slot) for slot in range(limit.count)
        )

    async def take(self, count: int) -> tuple[list[tuple[int, float]], float]:
        if not self._free:
            return [], math.inf  # all in use: the next give_back wakes the waiter
        now = asyncio.get_running_loop().time()
        if self._free[0][0] > now:
            return [], self._free[0][0] - now
        taken: list[tuple[int, float]] = []
        while self._free and self._free[0][0] <= now and len(taken) < count:
            taken.append((self._free.popleft()[1], 0.0))
        return taken, 0.0

    def give_back(self, slot: int) -> None:
        self._free.append((asyncio.get_running_loop().time() + self._period, slot))

    async def close(self) -> None:
        pass


class Permit:
    """One slot, held for one transaction: :meth:`release` it when the transaction ends."""

    def __init__(self, limiter: RateLimiter, slot: int) -> None:
        self._limiter = limiter
        self._slot: int | None = slot

    def release(self) -> None:
        """Hand the slot back (once; later calls do nothing)."""
        slot, self._slot = self._slot, None
        if slot is not None:
            self._limiter._give_back(slot)


class RateLimiter:
    """Hands out :class:`Permit` objects, at most ``limit.count`` in any
    window of ``limit.period`` seconds (see the module's docstring)."""

    def __init__(self, limit: RateLimit, slots: Slots | None = None) -> None:
        self.limit = limit
        self.slots: Slots = slots if slots is not None else LocalSlots(limit)
        self._turn = asyncio.Lock()  # FIFO: the waiters queue in the order they came
        self._released = asyncio.Event()
        self._waiting = 0  # callers in acquire(), the one looking for slots included
        # Slots taken in one go for the waiters queued behind the one that took them
        # (one round trip to the database for several).
        self._spare: collections.deque[tuple[float, int]] = collections.deque()  # (start, slot)

    def __repr__(self) -> str:
        return f"<RateLimiter {self.limit} {type(self.slots).__name__}>"

    async def acquire(self, deadline: float = math.inf) -> Permit | None:
        """Wait for a slot; None when *deadline* (a loop time) comes first, with nothing taken."""
        loop = asyncio.get_running_loop()
        self._waiting += 1
        try:
            async with asyncio.timeout_at(deadline if deadline < math.inf else None) as timer:
                async with self._turn:
                    while not self._spare:
                        slots, wait = await self.slots.take(self._waiting)
                        if slots:
                            now = loop.time()
                            self._spare.extend(sorted((now + w, slot) for slot, w in slots))
                            break
                        if wait < math.inf:
                            # A slot handed back meanwhile is free only a period later.
                            await asyncio.sleep(wait)
                            continue
                        self._released.clear()
                        await self._released.wait()  # every slot in use
                    start, slot = self._spare.popleft()
                    permit = Permit(self, slot)
                    try:
                        # Held by the lock: the next waiter's slot starts no sooner.
                        await asyncio.sleep(max(0.0, start - loop.time()))
                    except BaseException:
                        permit.release()
                        raise
                    return permit
        except TimeoutError:
            if timer.expired():  # (not a TimeoutError from the slots)
                return None
            raise
        finally:
            self._waiting -= 1
            if not self._waiting:
                # Taken for waiters that gave up meanwhile: unused, but stamped as if used.
                while self._spare:
                    self._give_back(self._spare.popleft()[1])

    def _give_back(self, slot: int) -> None:
        self.slots.give_back(slot)
        self._released.set()

    async def close(self) -> None:
        """Finish handing back the slots (see :meth:`Slots.close`)."""
        await self.slots.close()
