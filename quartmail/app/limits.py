"""Abuse limits held in the database, so that they hold across processes and
restarts: at most N actions per key (an address, a client) in any hour.

:func:`take` counts one action against several limits at once, or none: it
locks the keys, counts what the last hour holds and adds a row per limit,
all in the caller's transaction (the sign-up's own, so that a request costs
one write transaction and a sign-up that fails counts nothing). Counting
and adding must not be split, or two requests at the same moment would
both see "2 of 3" and both go ahead; so SQLite takes its write lock first
(``BEGIN IMMEDIATE``, which other processes wait for) and PostgreSQL a
transaction-level advisory lock per key.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from .models import LimitEvent

__all__ = ["WINDOW", "Limit", "LimitReachedError", "address_key", "client_key", "take"]

#: The window every limit counts over, in seconds.
WINDOW = 3600.0


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
    full). Must be the transaction's first statement (SQLite's lock is taken by
    how the transaction begins); what it counts stands once the transaction
    commits, and a rollback (the caller's, or ours on the error) counts nothing."""
    if not limits:
        return
    now = time.time() if now is None else now
    # Stored as digests: the table holds no addresses, and every key fits its column.
    keys = [_digest(limit) for limit in limits]
    await _lock(connection, keys)
    # Rows older than the window count for nothing any more.
    await connection.execute(delete(LimitEvent).where(LimitEvent.at <= now - WINDOW))
    for limit, key in zip(limits, keys, strict=True):
        count, oldest = (
            await connection.execute(
                select(func.count(), func.min(LimitEvent.at)).where(
                    LimitEvent.kind == limit.kind, LimitEvent.key == key
                )
            )
        ).one()
        if count >= limit.per_hour:
            raise LimitReachedError(limit, max(1, math.ceil(oldest + WINDOW - now)))
    await connection.execute(
        insert(LimitEvent),
        [
            {"kind": limit.kind, "key": key, "at": now}
            for limit, key in zip(limits, keys, strict=True)
        ],
    )


def _digest(limit: Limit) -> str:
    return hashlib.sha256(limit.key.encode("utf-8")).hexdigest()


async def _lock(connection: AsyncConnection, keys: Sequence[str]) -> None:
    if connection.dialect.name == "sqlite":
        # The database's one write lock, taken before reading (a plain BEGIN
        # would let two processes count at once); busy_timeout waits for it.
        await connection.exec_driver_sql("BEGIN IMMEDIATE")
        return
    # One lock per key, in a fixed order so that two requests never wait on
    # each other; released by the commit or rollback.
    for name in sorted({f"quartmail.app.limit:{key}" for key in keys}):
        await connection.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:name, 0))"), {"name": name}
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
