"""Abuse limits held in the database, so that they hold across processes and
restarts: at most N actions per key (an address, a client) in any hour.

:func:`take` counts one action against several limits at once, or none: it
locks the keys, adds a row per limit and counts what the last hour holds,
all in the caller's transaction (the sign-up's own, so that a request costs
one write transaction and a sign-up that fails counts nothing). Counting
and adding must not be split, or two requests at the same moment would
both see "2 of 3" and both go ahead; so on SQLite the adding comes first
and takes the write lock (which other processes wait for), and PostgreSQL
takes a transaction-level advisory lock per key.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Executable, and_, bindparam, delete, func, insert, or_, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from .models import LimitEvent

__all__ = ["WINDOW", "Limit", "LimitReachedError", "address_key", "client_key", "take"]

#: The window every limit counts over, in seconds.
WINDOW = 3600.0
# Rows past the window are deleted once the oldest is this many seconds past it.
_PRUNE_AFTER = 60.0


@dataclass(frozen=True, slots=True)
class Limit:
    """At most ``per_hour`` actions of *kind* (``"address"``, ``"client"``) for *key*."""

    kind: str
    key: str
    per_hour: int


class LimitReachedError(Exception):
    """A limit is reached: nothing was counted; ``retry_after`` seconds until one frees up."""

    def __init__(self, limit: Limit, retry_after: int) -> None:
        super().__init__(f"{limit.kind} limit of {limit.per_hour} per hour reached")
        self.limit = limit
        self.retry_after = retry_after


async def take(
    connection: AsyncConnection, limits: Sequence[Limit], *, now: float | None = None
) -> None:
    """Count one action against every limit in *limits* in *connection*'s
    transaction, or raise :class:`LimitReachedError` (for the first one that is
    full). Must be the transaction's first statement (on SQLite, its first
    write takes the lock); what it counts stands once the transaction commits.
    After the error the caller rolls back, as a failed request does: nothing
    is counted then."""
    if not limits:
        return
    now = time.time() if now is None else now
    # Stored as digests: the table holds no addresses, and every key fits its column.
    keyed = [(limit, _digest(limit)) for limit in limits]
    if connection.dialect.name != "sqlite":
        await _lock_keys(connection, sorted({key for _, key in keyed}))
    # Counted first, then checked: on SQLite this insert takes the database's one
    # write lock before anything is read (busy_timeout waits for it; as the
    # transaction's first statement it holds no older snapshot, which would make
    # SQLite refuse the lock at once).
    await connection.execute(
        insert(LimitEvent), [{"kind": limit.kind, "key": key, "at": now} for limit, key in keyed]
    )
    since = now - WINDOW
    parameters: dict[str, object] = {"since": since}
    for n, (limit, key) in enumerate(keyed):
        parameters[f"kind{n}"], parameters[f"key{n}"] = limit.kind, key
    counts = await connection.execute(_count_statement(len(keyed)), parameters)
    held = {(kind, key): (count, oldest, first) for kind, key, count, oldest, first in counts}
    for limit, key in keyed:
        count, oldest, first = held[limit.kind, key]
        if count > limit.per_hour:
            raise LimitReachedError(limit, max(1, math.ceil(oldest + WINDOW - now)))
    if first <= since - _PRUNE_AFTER:
        # Rows older than the window count for nothing any more; deleted in
        # batches, not a few on every request.
        await connection.execute(delete(LimitEvent).where(LimitEvent.at <= since))


@functools.cache
def _count_statement(limits: int) -> Executable:
    # The last hour of each of *limits* keys in one query (an index search per
    # key), and the oldest row of all, to tell when to prune. Built once per
    # number of limits.
    return (
        select(
            LimitEvent.kind,
            LimitEvent.key,
            func.count(),
            func.min(LimitEvent.at),
            select(func.min(LimitEvent.at)).scalar_subquery(),
        )
        .where(
            or_(
                *(
                    and_(
                        LimitEvent.kind == bindparam(f"kind{n}"),
                        LimitEvent.key == bindparam(f"key{n}"),
                    )
                    for n in range(limits)
                )
            ),
            LimitEvent.at > bindparam("since"),
        )
        .group_by(LimitEvent.kind, LimitEvent.key)
    )


def _digest(limit: Limit) -> str:
    return hashlib.sha256(limit.key.encode("utf-8")).hexdigest()


async def _lock_keys(connection: AsyncConnection, keys: Sequence[str]) -> None:
    # PostgreSQL: a transaction-level advisory lock per key, released by the
    # commit or rollback, taken in one statement in a fixed order, so that two
    # requests never wait on each other.
    await connection.execute(
        text(
            "SELECT pg_advisory_xact_lock(lock) FROM (SELECT DISTINCT"
            " hashtextextended('quartmail.app.limit:' || key, 0) AS lock"
            " FROM unnest(CAST(:keys AS text[])) AS key ORDER BY lock) AS locks"
        ),
        {"keys": list(keys)},
    )


def address_key(address: str) -> str:
    """What an address's limit counts under: its mailbox without a ``+tag``
    (sub-addressing, RFC 5233, would otherwise give one inbox many limits),
    case-folded."""
    local, _, domain = address.rpartition("@")
    return f"{local.partition('+')[0].casefold()}@{domain.casefold()}"


def client_key(remote_addr: str | None, forwarded_for: Sequence[str], trusted_proxies: int) -> str:
    """What a client's limit counts under: its IP address, taken from
    ``X-Forwarded-For`` as the *trusted_proxies*-th address from the right
    when that many proxies in front of the app append to it (a client can
    write anything left of them). An IPv6 client counts by its /64: one
    subscriber usually holds all of it."""
    address = remote_addr or "unknown"
    if trusted_proxies:
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
        hops = [hop for hop in hops if hop]
        if len(hops) >= trusted_proxies:
            address = hops[-trusted_proxies]
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]  # a Unix socket's peer, or a proxy's odd value
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
