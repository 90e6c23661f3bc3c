"""The durable outbox: mail as durable as the row that caused it.

This module is the ``mail_outbox`` table and what an app or an operator does
with it. :meth:`Outbox.enqueue` adds the flattened message to the table in
the caller's own SQLAlchemy session, so the mail is committed with the rest
of the transaction or not at all. :class:`OutboxTable` is the admin API,
which needs only the database: :meth:`~OutboxTable.status`,
:meth:`~OutboxTable.retry` and :meth:`~OutboxTable.purge`, as the sign-up
app's ``outbox`` commands use them. Each app process runs one dispatcher
(:mod:`quartmail.dispatcher`) that sends the rows; :func:`row_envelope`
reads a row back into the message to send, or says why it cannot be sent as
stored.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ._extras import missing_extra

try:
    from sqlalchemy import (
        JSON,
        BigInteger,
        Boolean,
        Connection,
        DateTime,
        Dialect,
        Double,
        Index,
        Integer,
        LargeBinary,
        MetaData,
        String,
        Text,
        TypeDecorator,
        and_,
        delete,
        event,
        false,
        func,
        inspect,
        select,
        text,
        update,
    )
    from sqlalchemy.exc import DatabaseError
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
except ModuleNotFoundError as error:
    raise missing_extra(error, "outbox", "The durable outbox") from None

from .core import MailCore
from .errors import MessageError, SchemaError
from .message import Envelope, Message

__all__ = [
    "CHANNEL",
    "Outbox",
    "OutboxBase",
    "OutboxMessage",
    "OutboxStatus",
    "OutboxTable",
    "RateLimitSlot",
    "create_missing_tables",
    "decoded_row",
    "one_line_or_none",
    "rebuilt_message",
    "row_envelope",
]

# The PostgreSQL NOTIFY channel that wakes the dispatchers.
CHANNEL = "quartmail_outbox"
_WAKE_PENDING = "quartmail.outbox.wake"  # in session.info
_NOTIFIED = "quartmail.outbox.notified"  # in session.info: the transaction that did


class _UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every database (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class OutboxBase(DeclarativeBase):
    """The outbox's own metadata: ``OutboxBase.metadata.create_all`` (or an
    Alembic migration) makes its table in the app's database."""


class OutboxMessage(OutboxBase):
    """One message in the outbox."""

    __tablename__ = "mail_outbox"
    __table_args__ = (Index("ix_mail_outbox_due", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(998), index=True)
    sender: Mapped[str] = mapped_column(Text)
    recipients: Mapped[list[str]] = mapped_column(JSON)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    mail_options: Mapped[list[str]] = mapped_column(JSON)
    rcpt_options: Mapped[list[str]] = mapped_column(JSON)
    # Message(transactional=True): a flag for the dispatcher, never a header.
    transactional: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    state: Mapped[str] = mapped_column(String(16))  # queued, sending, sent, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(_UTCDateTime())
    lease_until: Mapped[datetime | None] = mapped_column(_UTCDateTime(), nullable=True)
    # Which dispatcher holds the lease: its updates touch only rows it still holds.
    claimed_by: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_error_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(_UTCDateTime(), nullable=True)

    def envelope(self) -> Envelope:
        """The stored message, ready to send again."""
        return row_envelope(self)


class RateLimitSlot(OutboxBase):
    """One of the N slots of ``MAIL_RATE_LIMIT`` = "N/period", shared by every
    process of the outbox's database (:mod:`quartmail.sharedlimit`)."""

    __tablename__ = "mail_rate_limit"

    # Whose limit: MAIL_USERNAME@MAIL_SERVER:MAIL_PORT, the account a provider counts.
    account: Mapped[str] = mapped_column(String(255), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    # When it may start a transaction again: seconds since the epoch, by the database's clock.
    free_at: Mapped[float] = mapped_column(Double)


@dataclass(frozen=True)
class OutboxStatus:
    """Counts by state, the age in seconds of the oldest queued message, and
    how long the oldest message due for sending has waited past its due time."""

    counts: dict[str, int]
    oldest_queued_age: float | None
    oldest_due_age: float | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def _age(moment: datetime | None) -> float | None:
    """Seconds from *moment* (naive: UTC, as SQLite returns it) to now."""
    if moment is None:
        return None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return max((_now() - moment).total_seconds(), 0.0)


class OutboxTable:
    """The outbox table in *engine*'s database, and its admin API. It needs
    no app: ``OutboxTable(engine)`` serves a command-line tool as well as
    :attr:`quartmail.Mail.outbox` serves the app."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        # Set on a commit that added rows, and by retry(): this process's
        # dispatcher waits on it (NOTIFY wakes the others).
        self.wake = asyncio.Event()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.engine.url.render_as_string(hide_password=True)}>"

    async def create_table(self) -> None:
        """Create the ``mail_outbox`` table if it does not exist."""
        await create_missing_tables(self.engine, OutboxBase.metadata)

    # The admin API

    async def status(self) -> OutboxStatus:
        """Counts by state, and how long the oldest queued message has waited."""
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                select(OutboxMessage.state, func.count()).group_by(OutboxMessage.state)
            )
            counts = {state: count for state, count in rows}
            oldest = await connection.scalar(
                select(func.min(OutboxMessage.created_at)).where(OutboxMessage.state == "queued")
            )
            now = _now()
            # A due row not claimed for long: no dispatcher is sending (metrics' alarm).
            oldest_due = await connection.scalar(
                select(func.min(OutboxMessage.next_attempt_at)).where(
                    OutboxMessage.state == "queued", OutboxMessage.next_attempt_at <= now
                )
            )
        return OutboxStatus(
            counts=counts, oldest_queued_age=_age(oldest), oldest_due_age=_age(oldest_due)
        )

    async def retry(self, ids: Sequence[int] = (), *, failed: bool = False) -> int:
        """Queue the given failed messages (or every failed one) again, now,
        with a new ``MAIL_DELIVERY_TIMEOUT``; returns how many."""
        condition = OutboxMessage.state == "failed"
        if not failed:
            condition = and_(condition, OutboxMessage.id.in_(list(ids)))
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(OutboxMessage)
                .where(condition)
                # Queued again counts as enqueued now, for MAIL_DELIVERY_TIMEOUT.
                .values(state="queued", attempts=0, next_attempt_at=_now(), created_at=_now())
            )
            if self._postgres and result.rowcount:  # from a CLI, say: wake the app's dispatchers
                await connection.execute(
                    text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL}
                )
        self.wake.set()
        return int(result.rowcount)

    async def purge(self, sent_before: datetime) -> int:
        """Delete messages sent before *sent_before*; returns how many."""
        async with self.engine.begin() as connection:
            result = await connection.execute(
                delete(OutboxMessage).where(
                    OutboxMessage.state == "sent", OutboxMessage.sent_at < sent_before
                )
            )
        return int(result.rowcount)


class Outbox(OutboxTable):
    """The durable outbox of one app: the table, and :meth:`enqueue`; see
    :meth:`quartmail.Mail.init_outbox`."""

    def __init__(self, engine: AsyncEngine, core: MailCore) -> None:
        super().__init__(engine)
        self._core = core

    async def enqueue(self, session: AsyncSession, message: Message) -> str:
        """Add *message* to the outbox in *session*'s transaction; it is sent
        once that commits (and never if it rolls back). Returns its Message-ID.

        The message is checked here: :class:`~quartmail.MessageError` and
        :class:`~quartmail.BadHeaderError` are raised before anything is
        added. With ``MAIL_SUPPRESS_SEND`` on, the message is recorded
        (``record_messages``) and not stored.
        """
        envelope = self._core.envelope(message)
        if self._core.settings.suppress_send:
            await self._core.dispatched(message)
            return envelope.message_id
        envelope = await self._core.sign(message, envelope)  # stored signed: resends send it
        now = _now()
        session.add(
            OutboxMessage(
                message_id=envelope.message_id,
                sender=envelope.sender,
                recipients=envelope.recipients,
                data=envelope.data,
                mail_options=envelope.mail_options,
                rcpt_options=envelope.rcpt_options,
                transactional=envelope.transactional,
                state="queued",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
        transaction = session.sync_session.get_transaction()
        if self._postgres and session.info.get(_NOTIFIED) is not transaction:
            # Transactional: delivered to the listeners only on commit; one
            # per transaction is enough.
            await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})
            session.info[_NOTIFIED] = session.sync_session.get_transaction()
        self._wake_after_commit(session)
        return envelope.message_id

    def _wake_after_commit(self, session: AsyncSession) -> None:
        """Wake this process's dispatcher when *session* commits: one
        listener per transaction, however many messages it enqueues (after a
        rollback it stays for the next commit, which only wakes us early)."""
        info = session.info
        if info.get(_WAKE_PENDING):
            return
        info[_WAKE_PENDING] = True
        loop = asyncio.get_running_loop()

        def wake(_: object) -> None:
            info.pop(_WAKE_PENDING, None)
            loop.call_soon(self.wake.set)

        event.listen(session.sync_session, "after_commit", wake, once=True)


def row_envelope(row: Any) -> Envelope:
    """An Envelope from an OutboxMessage, or a claimed row (see _decoded).

    Raises :class:`~quartmail.errors.MessageError` saying why when the row
    cannot be sent as stored: wrong JSON types, no message data, a line
    break in the Message-ID, an address or an option (it would end the SMTP
    command and start another).
    """
    data = row.data
    if not isinstance(data, bytes):
        raise MessageError(f"data: expected the message's bytes, got {type(data).__name__}")
    if not data.strip():
        raise MessageError("data: empty, no message to send")
    try:
        headers = _header_parser.parsebytes(data)
    except Exception as error:
        raise MessageError(f"data: not a message ({error})") from None
    if not headers.keys():
        raise MessageError("data: not a message (no header fields)")
    return Envelope(
        sender=_one_line(row.sender, "sender"),
        recipients=_lines(row.recipients, "recipients", empty=False),
        data=data,
        message_id=_one_line(row.message_id, "message_id"),
        mail_options=_lines(row.mail_options, "mail_options"),
        rcpt_options=_lines(row.rcpt_options, "rcpt_options"),
        transactional=bool(row.transactional),
    )


def decoded_row(row: Any) -> Any:
    """A claimed row with its JSON columns (fetched as text) decoded."""
    values = dict(row._mapping)
    for name in ("recipients", "mail_options", "rcpt_options"):
        try:
            values[name] = json.loads(values[name])
        except (TypeError, ValueError) as error:
            raise MessageError(f"{name}: not JSON ({error})") from None
    return _Row(**values)


@dataclass
class _Row:
    id: int
    attempts: int
    message_id: Any
    sender: Any
    recipients: Any
    data: Any
    mail_options: Any
    rcpt_options: Any
    created_at: datetime
    transactional: bool = False
    last_error_code: int | None = None
    last_error: str | None = None


def _one_line(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise MessageError(f"{name}: expected a string, got {value!r:.100}")
    if any(char in value for char in "\r\n\0"):
        raise MessageError(f"{name}: contains a line break: {value!r:.200}")
    return value


def one_line_or_none(value: Any, name: str) -> str | None:
    """*value* when it is a one-line string, else None."""
    try:
        return _one_line(value, name)
    except MessageError:
        return None


def _lines(value: Any, name: str, *, empty: bool = True) -> list[str]:
    if not isinstance(value, list) or not (empty or value):
        what = "a list of strings" if empty else "a non-empty list of strings"
        raise MessageError(f"{name}: expected {what}, got {value!r:.100}")
    return [_one_line(item, name) for item in value]


_header_parser = email.parser.BytesHeaderParser(policy=email.policy.default)


def rebuilt_message(envelope: Envelope) -> Message:
    """A Message with the subject, sender, recipients and Message-ID of a
    stored one (not its bodies or attachments), for signal receivers."""
    try:
        subject = str(_header_parser.parsebytes(envelope.data).get("Subject", ""))
    except Exception:  # a subject the email package cannot read: signal without it
        subject = ""
    message = Message(subject, sender=envelope.sender, recipients=list(envelope.recipients))
    message.msg_id = envelope.message_id
    return message


async def create_missing_tables(engine: AsyncEngine, metadata: MetaData) -> None:
    """Create the tables of *metadata* that do not exist yet, also when other processes
    (Hypercorn's workers, starting side by side) do the same at the same moment.

    Raises :class:`~quartmail.SchemaError` when a table lacks a column of the code
    (made by an older release: a migration has not run), and when Alembic manages
    the database (it has an ``alembic_version`` table) and a table is missing:
    there, Alembic makes the tables, so that its history stays true.
    """
    async with engine.connect() as connection:
        await connection.run_sync(_check_columns, metadata)
    # Another process may create a table between create_all's check and its CREATE
    # TABLE ("already exists" on SQLite, a duplicate type or key on PostgreSQL).
    # Checked again, that table exists: each race costs one table, so one more try
    # per table settles it; any other error happens every time and is raised.
    for tries_left in reversed(range(len(metadata.tables) + 1)):
        try:
            await _create_all(engine, metadata)
            return
        except DatabaseError:
            if not tries_left:
                raise


async def _create_all(engine: AsyncEngine, metadata: MetaData) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)


def _check_columns(connection: Connection, metadata: MetaData) -> None:
    database = inspect(connection)
    tables = set(database.get_table_names())
    behind = []
    for table in metadata.sorted_tables:
        if table.name not in tables:
            if "alembic_version" in tables:
                behind.append(f"table {table.name} is missing")
            continue
        have = {column["name"] for column in database.get_columns(table.name)}
        behind.extend(
            f"{table.name}.{column.name} is missing"
            for column in table.columns
            if column.name not in have
        )
    if behind:
        raise SchemaError(
            f"The database is behind quartmail ({'; '.join(behind)}): run your Alembic"
            " migrations with quartmail's included (`alembic upgrade heads`; see"
            " quartmail's docs, Migrations)"
        )
