"""The suppression list: addresses quartmail no longer sends to.

The ``mail_suppression`` table lives beside the outbox's, on
``OutboxBase.metadata``; :class:`SuppressionList` is its API, which needs
only the database (``SuppressionList(engine)`` serves a command-line tool as
well as :attr:`quartmail.Mail.suppression` serves the app).

An address gets on the list three ways, each with its ``reason``:

- ``bounce``: a server refused it permanently with an enhanced status code
  that means the mailbox does not exist or takes no mail (see
  :data:`BOUNCE_CODES`); recorded for each refused recipient, from background
  delivery, the outbox and ``mail.send`` alike;
- ``unsubscribe``: its owner clicked a one-click unsubscribe link
  (:mod:`quartmail.unsubscribe`);
- ``manual``: an operator added it (``outbox suppression add``).

Background and outbox sends leave suppressed recipients out; a message sent
with ``transactional=True`` (a password reset) still goes to an address that
only unsubscribed, never to one that bounced or was added by hand.

Addresses are compared as the envelope writes them: the local part exactly
as given (it may be case-sensitive, RFC 5321 section 2.4), the domain in lower
case, IDNA-encoded (:attr:`quartmail.addresses.Mailbox.key`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from ._extras import missing_extra

try:
    from sqlalchemy import String, Text, bindparam, delete, select
    from sqlalchemy.dialects import postgresql, sqlite
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.orm import Mapped, mapped_column
    from sqlalchemy.util import greenlet_spawn
except ModuleNotFoundError as error:
    raise missing_extra(error, "outbox", "The suppression list") from None

from .addresses import parse_address
from .core import stops
from .errors import ConfigError, MessageError, Reply
from .outbox import OutboxBase, _UTCDateTime, create_missing_tables

__all__ = [
    "BOUNCE_CODES",
    "REASONS",
    "Reason",
    "SuppressedAddress",
    "SuppressionEntry",
    "SuppressionList",
    "is_bounce",
    "normalized",
]

log = logging.getLogger("quartmail.suppression")

#: Why an address is suppressed.
Reason = Literal["bounce", "unsubscribe", "manual"]
REASONS: tuple[Reason, ...] = get_args(Reason)

#: The enhanced status codes (RFC 3463, IANA "SMTP Enhanced Status Codes")
#: that, in a 5xx reply to one recipient, mean that its mailbox does not exist
#: or takes no mail, so that sending again can only hurt the sender's name:
#:
#: - 5.1.1 bad destination mailbox address (no such user);
#: - 5.1.3 bad destination mailbox address syntax;
#: - 5.1.6 destination mailbox has moved, no forwarding address;
#: - 5.1.10 recipient address has null MX (RFC 7505 section 4.2: the domain
#:   takes no mail at all);
#: - 5.2.1 mailbox disabled, not accepting messages.
#:
#: Left out on purpose: 5.1.2 (bad destination system: also what a relay
#: says when its own DNS fails, which would suppress a whole domain), 5.2.2
#: (mailbox full: it exists), 5.7.x (policy: about the sender, not the
#: address), and any reply without an enhanced code ("550 Rejected" is as
#: often spam filtering as an unknown user).
BOUNCE_CODES = frozenset({"5.1.1", "5.1.3", "5.1.6", "5.1.10", "5.2.1"})

# RFC 3463 section 2: class "." subject "." detail, at the start of the text
# (RFC 2034 section 3 puts it right after the reply code).
_ENHANCED = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\d)")
# The one reason a transactional message passes (core.stops): a stronger
# one (a bounce, the operator's word) replaces it.
_WEAKEST = "unsubscribe"
_MAX_SOURCE = 2000


class SuppressedAddress(OutboxBase):
    """One address on the suppression list."""

    __tablename__ = "mail_suppression"

    address: Mapped[str] = mapped_column(String(320), primary_key=True)  # normalized()
    reason: Mapped[str] = mapped_column(String(16))  # bounce, unsubscribe or manual
    # Where it came from: the server's reply and the Message-ID, the list's name, "cli".
    source: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime())


@dataclass(frozen=True, slots=True)
class SuppressionEntry:
    """An address on the list, as :meth:`SuppressionList.entries` returns it."""

    address: str
    reason: str
    source: str
    created_at: datetime


def normalized(address: str) -> str:
    """*address* as the list keeps it: the local part as given, the domain
    in lower case (IDNA-encoded). Takes ``"Name <a@x.org>"`` too; raises
    :class:`~quartmail.MessageError` for anything that is not one address."""
    local, domain = parse_address(address, "address").key
    return f"{local}@{domain}"


def is_bounce(code: int, text: str) -> bool:
    """Whether the reply ``code text`` to one recipient means that its
    mailbox does not exist or takes no mail (see :data:`BOUNCE_CODES`)."""
    match = _ENHANCED.match(text)
    if not 500 <= code < 600 or match is None:
        return False
    return ".".join(str(int(part)) for part in match.groups()) in BOUNCE_CODES


class SuppressionList:
    """The ``mail_suppression`` table in *engine*'s database, and its API.

    Each method is one statement in a transaction of its own.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ConfigError(
                f"the suppression list needs SQLite or PostgreSQL, not {engine.dialect.name}"
            )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.engine.url.render_as_string(hide_password=True)}>"

    async def create_table(self) -> None:
        """Create the ``mail_suppression`` table (and the outbox's) if missing."""
        await create_missing_tables(self.engine, OutboxBase.metadata)

    async def add(self, address: str, reason: Reason, source: str) -> bool:
        """Put *address* on the list; returns whether that changed anything.

        Adding an address again keeps its first entry, except that a bounce
        or a manual entry replaces an unsubscribe (it also stops
        transactional mail). Raises :class:`~quartmail.MessageError` for an
        invalid address or reason.
        """
        return await self._add(normalized(address), reason, source)

    async def remove(self, address: str) -> bool:
        """Take *address* off the list; returns whether it was on it."""
        key = normalized(address)
        async with self.engine.begin() as connection:
            result = await connection.execute(
                delete(SuppressedAddress).where(SuppressedAddress.address == key)
            )
        return bool(result.rowcount)

    async def entries(self, reason: Reason | None = None) -> list[SuppressionEntry]:
        """Every address on the list (or those with *reason*), oldest first."""
        statement = select(SuppressedAddress).order_by(
            SuppressedAddress.created_at, SuppressedAddress.address
        )
        if reason is not None:
            statement = statement.where(SuppressedAddress.reason == _reason(reason))
        async with self.engine.connect() as connection:
            rows = await connection.execute(statement)
            return [
                SuppressionEntry(row.address, row.reason, row.source, row.created_at)
                for row in rows
            ]

    async def check(
        self, recipients: Sequence[str], *, transactional: bool = False
    ) -> dict[str, str]:
        """The suppressed ones among *recipients* (bare addresses), each
        with its reason. One query on the primary key, however many
        recipients (an index lookup each); an unsubscribe does not count
        when *transactional*."""
        keys: dict[str, list[str]] = {}
        for recipient in recipients:
            keys.setdefault(_key(recipient), []).append(recipient)
        if not keys:
            return {}
        return {
            recipient: reason
            for address, reason in await self._reasons(list(keys))
            if stops(reason, transactional)
            for recipient in keys[address]
        }

    async def _reasons(self, keys: list[str]) -> list[tuple[str, str]]:
        """(address, reason) of each of *keys* on the list."""
        if self.engine.dialect.driver != "aiosqlite":
            async with self.engine.connect() as connection:
                rows = await connection.execute(_CHECK, {"keys": keys})
                return [(row.address, row.reason) for row in rows]
        # Every background message is checked: it is the sending path's largest cost.
        # Through SQLAlchemy's Connection a query is five trips to aiosqlite's thread
        # (cursor, execute, fetch, close, rollback) and a shielded task to close it;
        # here it is one trip on the pool's connection (~0.18 ms of CPU, not ~0.33).
        raw = await self.engine.raw_connection()
        try:
            sql = _SQLITE_CHECK.format(", ".join("?" * len(keys)))
            driver: Any = raw.driver_connection
            found = await driver.execute_fetchall(sql, keys)
        finally:
            # In a greenlet: the pool's reset on return may await the driver (a rollback).
            await greenlet_spawn(raw.close)
        return [(address, reason) for address, reason in found]

    async def record_refusals(self, message_id: str, refused: Mapping[str, Reply]) -> list[str]:
        """Add the recipients of *message_id* whose refusal :func:`is_bounce`
        (reason ``bounce``, the reply and the Message-ID as the source);
        returns them."""
        bounced = {
            address: f"{code} {text} (Message-ID {message_id})"
            for address, (code, text) in refused.items()
            if is_bounce(code, text)
        }
        if not bounced:
            return []
        for address, source in bounced.items():
            await self._add(_key(address), "bounce", source)
        log.warning("Suppressed after a permanent refusal: %s", ", ".join(bounced))
        return list(bounced)

    async def _add(self, key: str, reason: Reason, source: str) -> bool:
        reason = _reason(reason)
        if not isinstance(source, str):
            raise MessageError(f"source must be a string, got {type(source).__name__}")
        row = {
            "address": key,
            "reason": reason,
            "source": source[:_MAX_SOURCE],
            "created_at": _now(),
        }
        dialect: Any = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        insert = dialect.insert(SuppressedAddress).values(row)
        if reason != _WEAKEST:
            # A stronger reason replaces an unsubscribe, in the same statement.
            excluded = insert.excluded
            insert = insert.on_conflict_do_update(
                index_elements=[SuppressedAddress.address],
                set_={
                    "reason": excluded.reason,
                    "source": excluded.source,
                    "created_at": excluded.created_at,
                },
                where=SuppressedAddress.reason == _WEAKEST,
            )
        else:
            insert = insert.on_conflict_do_nothing(index_elements=[SuppressedAddress.address])
        async with self.engine.begin() as connection:
            result = await connection.execute(insert)
        return bool(result.rowcount)


# Built once: building it for each check cost more than running it on SQLite.
_CHECK = select(SuppressedAddress.address, SuppressedAddress.reason).where(
    SuppressedAddress.address.in_(bindparam("keys", expanding=True))
)
_SQLITE_CHECK = (
    f"SELECT address, reason FROM {SuppressedAddress.__tablename__} WHERE address IN ({{}})"
)


def _key(recipient: str) -> str:
    try:
        return normalized(recipient)
    except MessageError:  # (a stored row's recipient, say): compared as it is
        return recipient


def _reason(reason: object) -> Reason:
    if reason not in REASONS:
        raise MessageError(f"reason must be one of {', '.join(REASONS)}, not {reason!r}")
    return reason


def _now() -> datetime:
    return datetime.now(UTC)
