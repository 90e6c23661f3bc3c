"""The durable outbox: mail as durable as the row that caused it.

:meth:`Outbox.enqueue` adds the flattened message to the ``mail_outbox``
table in the caller's own SQLAlchemy session, so the mail is committed with
the rest of the transaction or not at all. Each app process runs one
dispatcher, started and stopped with the app's lifespan. It claims due rows
in small batches (``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so
that many processes share the work; SQLite serializes writers, which gives
the same guarantee on one machine), marks them ``sending`` with a lease,
sends them over the background delivery pool, then marks them ``sent`` or
schedules the retry (``MAIL_RETRIES``, ``MAIL_RETRY_DELAY``) or marks them
``failed`` with the last error. A lease that expires (its process died
mid-send) makes the row due again.

New rows are picked up at once: a PostgreSQL ``NOTIFY`` sent in the
enqueueing transaction (delivered only if it commits) wakes every dispatcher,
and a commit in this process wakes its own; otherwise a poll every
``MAIL_OUTBOX_POLL`` seconds finds retries and expired leases.

Delivery is at least once: a process killed after the server accepted a
message but before its row was marked sent sends it again after the lease.
The Message-ID is stored with the bytes, so it is the same on every resend.

Every row ends: one not sent ``MAIL_DELIVERY_TIMEOUT`` seconds after it was
enqueued (or queued again by :meth:`Outbox.retry`) is marked ``failed``. A
row that cannot be read or sent as stored (JSON that is not a list of
strings, no message data, a Message-ID or address with a line break) is
marked ``failed`` with the reason and logged; the dispatcher goes on with
the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import json
import logging
import secrets
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ._extras import missing_extra

try:
    from sqlalchemy import (
        JSON,
        BigInteger,
        DateTime,
        Dialect,
        Index,
        Integer,
        LargeBinary,
        String,
        Text,
        TypeDecorator,
        and_,
        cast,
        delete,
        event,
        func,
        select,
        text,
        update,
    )
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
except ModuleNotFoundError as error:
    raise missing_extra(error, "outbox", "The durable outbox") from None


from .delivery import next_attempt, partly_refused, timed_out
from .errors import MailError, MessageError, SendError
from .message import Envelope, Message
from .signals import email_dispatched, email_failed, notify
from .smtp import SendResult

if TYPE_CHECKING:
    from .extension import MailState

__all__ = ["Outbox", "OutboxBase", "OutboxMessage", "OutboxStatus"]

log = logging.getLogger("quartmail.outbox")

_CHANNEL = "quartmail_outbox"
# How long close() waits for signal receivers when the deadline has passed.
_SIGNAL_GRACE = 1.0
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
        return _envelope(self)


@dataclass(frozen=True)
class OutboxStatus:
    """Counts by state, and the age in seconds of the oldest queued message."""

    counts: dict[str, int]
    oldest_queued_age: float | None


@dataclass(eq=False)
class _Claimed:
    id: int
    attempts: int
    envelope: Envelope
    created_at: datetime  # MAIL_DELIVERY_TIMEOUT runs from here


@dataclass(eq=False)
class _Unreadable:
    id: int
    message_id: Any
    sender: Any
    reason: str


def _now() -> datetime:
    return datetime.now(UTC)


class Outbox:
    """The durable outbox of one app; see :meth:`quartmail.Mail.init_outbox`."""

    def __init__(self, state: MailState, engine: AsyncEngine) -> None:
        self._state = state
        self.engine = engine
        settings = state.settings
        self._lease = timedelta(seconds=settings.outbox_lease)
        self._poll = settings.outbox_poll
        # Enough claimed to keep every pooled session busy between claims,
        # few enough that a dying process strands little behind its lease.
        self._batch = settings.pool_size * 4
        self._postgres = engine.dialect.name == "postgresql"
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._in_flight: dict[asyncio.Future[SendResult], _Claimed] = {}
        self._listener: Any = None  # the PostgreSQL connection that LISTENs
        self._signalling: set[asyncio.Task[None]] = set()  # see _record
        # This dispatcher's name on the rows it claims.
        self._token = secrets.token_hex(16)
        self._renew_at = 0.0  # loop time to extend the leases of rows in flight
        self._reclaim_at = 0.0  # loop time to look for expired leases

    def __repr__(self) -> str:
        return (
            f"<Outbox {self.engine.url.render_as_string(hide_password=True)} "
            f"in_flight={len(self._in_flight)}>"
        )

    # The API for apps

    async def enqueue(self, session: AsyncSession, message: Message) -> str:
        """Add *message* to the outbox in *session*'s transaction; it is sent
        once that commits (and never if it rolls back). Returns its Message-ID.

        The message is checked here: :class:`~quartmail.MessageError` and
        :class:`~quartmail.BadHeaderError` are raised before anything is
        added. With ``MAIL_SUPPRESS_SEND`` on, the message is recorded
        (``record_messages``) and not stored.
        """
        envelope = self._state.envelope(message)
        if self._state.settings.suppress_send:
            await self._state.dispatched(message)
            return envelope.message_id
        now = _now()
        session.add(
            OutboxMessage(
                message_id=envelope.message_id,
                sender=envelope.sender,
                recipients=envelope.recipients,
                data=envelope.data,
                mail_options=envelope.mail_options,
                rcpt_options=envelope.rcpt_options,
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
            await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": _CHANNEL})
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
            loop.call_soon(self._wake.set)

        event.listen(session.sync_session, "after_commit", wake, once=True)

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
        age = None
        if oldest is not None:
            oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC)
            age = (_now() - oldest).total_seconds()
        return OutboxStatus(counts=counts, oldest_queued_age=age)

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
        self._wake.set()
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

    # The dispatcher

    async def create_table(self) -> None:
        """Create the ``mail_outbox`` table if it does not exist."""
        async with self.engine.begin() as connection:
            await connection.run_sync(OutboxBase.metadata.create_all)

    async def start(self) -> None:
        """Create the table if needed and start this process's dispatcher."""
        if self._task is not None:
            return
        await self.create_table()
        self._stopping = False
        if self._postgres:
            await self._listen()
        self._task = asyncio.create_task(self._run(), name="quartmail-outbox")

    async def stop(self, deadline: float) -> None:
        """Stop claiming and let the dispatcher record what ends by
        *deadline* (a loop time). Then background delivery closes (sends on
        the wire at the deadline may finish, nothing new starts), and
        :meth:`close` records the rest."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            task, self._task = self._task, None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(task)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def close(self, deadline: float) -> None:
        """After :meth:`stop` and the close of background delivery: record the
        outcomes of what was in flight, and hand back what was not sent to
        the next dispatcher (its rows are queued again)."""
        await self.stop(deadline)  # (done already when called by the app's shutdown)
        for future in self._in_flight:
            future.cancel()  # not sent by now: handed back (at least once)
        outcomes = list(self._in_flight.items())
        left = [item for future, item in outcomes if future.cancelled()]
        if outcomes:
            await self._record(outcomes)
        if left:
            async with self.engine.begin() as connection:
                await connection.execute(
                    update(OutboxMessage)
                    .where(OutboxMessage.id.in_([c.id for c in left]), self._held())
                    .values(state="queued", lease_until=None, claimed_by=None)
                )
            log.warning("%d outbox messages left for the next dispatcher", len(left))
        await self._unlisten()
        if self._signalling:
            # At least a moment for the signals just recorded, even past the deadline.
            wait = max(deadline - asyncio.get_running_loop().time(), _SIGNAL_GRACE)
            _, hung = await asyncio.wait(self._signalling, timeout=wait)
            for task in hung:
                task.cancel()
            if hung:
                await asyncio.wait(hung)
                log.error("Outbox signal receivers still running at shutdown were cancelled")

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._pass()
            except Exception:
                # A bug of ours, or a broken row or receiver we did not foresee:
                # log it and go on at the next poll rather than stop sending.
                log.exception("Outbox dispatcher error")
            if self._stopping and not self._in_flight:
                return
            # Results that came in meanwhile have set the event again.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll):
                    await self._wake.wait()

    async def _pass(self) -> None:
        """One round: claim and hand over what is due, record what ended."""
        if not self._stopping:
            await self._reclaim_expired()
            room = self._batch - len(self._in_flight)
            # Claim a pool's worth or more at a time: each claim is a
            # transaction, and the pool works through what it has meanwhile.
            if room >= self._state.settings.pool_size or not self._in_flight:
                self._send(await self._claim(room))
        outcomes = [(f, c) for f, c in self._in_flight.items() if f.done()]
        if outcomes:
            await self._record(outcomes)
        if not (self._stopping and not self._in_flight):
            await self._renew_leases()

    def _send(self, claimed: list[_Claimed]) -> None:
        loop = asyncio.get_running_loop()
        timeout = self._state.settings.delivery_timeout
        for item in claimed:
            left = (item.created_at - _now()).total_seconds() + timeout
            future = self._state.delivery.attempt(item.envelope, deadline=loop.time() + left)
            self._in_flight[future] = item
            future.add_done_callback(lambda _: self._wake.set())

    async def _reclaim_expired(self) -> None:
        """Queue again the rows whose lease ran out (their dispatcher died),
        once a poll: a separate statement keeps the claim an index scan."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._reclaim_at:
            return
        self._reclaim_at = loop.time() + self._poll
        try:
            async with self.engine.begin() as connection:
                result = await connection.execute(
                    update(OutboxMessage)
                    .where(OutboxMessage.state == "sending", OutboxMessage.lease_until < _now())
                    .values(state="queued", lease_until=None, claimed_by=None)
                )
        except Exception:
            log.exception("Could not look for expired outbox leases")
            return
        if result.rowcount:
            log.warning("%d outbox messages were left by a dispatcher that died", result.rowcount)

    def _held(self) -> Any:
        """Rows this dispatcher still holds: no other has taken its lease over."""
        return and_(OutboxMessage.state == "sending", OutboxMessage.claimed_by == self._token)

    async def _renew_leases(self) -> None:
        """Extend the leases of the rows in flight, a third of a lease before
        they would run out, so that a slow send is not taken for a dead process."""
        loop = asyncio.get_running_loop()
        if not self._in_flight or loop.time() < self._renew_at:
            return
        self._renew_at = loop.time() + self._lease.total_seconds() / 3
        ids = [item.id for item in self._in_flight.values()]
        try:
            async with self.engine.begin() as connection:
                await connection.execute(
                    update(OutboxMessage)
                    .where(OutboxMessage.id.in_(ids), self._held())
                    .values(lease_until=_now() + self._lease)
                )
        except Exception:
            log.exception("Could not renew the leases of %d outbox messages", len(ids))

    async def _claim(self, limit: int) -> list[_Claimed]:
        now = _now()
        # In the order of the (state, next_attempt_at) index, so that a long
        # queue costs no sort. SKIP LOCKED: concurrent dispatchers take
        # disjoint rows without waiting for each other (SQLite has one writer).
        candidates = (
            select(OutboxMessage.id)
            .where(OutboxMessage.state == "queued", OutboxMessage.next_attempt_at <= now)
            .order_by(OutboxMessage.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        statement = (
            update(OutboxMessage)
            .where(OutboxMessage.id.in_(candidates.scalar_subquery()))
            .values(state="sending", lease_until=now + self._lease, claimed_by=self._token)
            .returning(
                OutboxMessage.id,
                OutboxMessage.attempts,
                OutboxMessage.message_id,
                OutboxMessage.sender,
                # The JSON columns as their text: one row's bad JSON must not
                # fail the fetch of the others (see _decoded).
                cast(OutboxMessage.recipients, Text).label("recipients"),
                OutboxMessage.data,
                cast(OutboxMessage.mail_options, Text).label("mail_options"),
                cast(OutboxMessage.rcpt_options, Text).label("rcpt_options"),
                OutboxMessage.created_at,
            )
        )
        try:
            async with self.engine.begin() as connection:
                rows = (await connection.execute(statement)).all()
        except Exception:
            # The database is away: try again at the next poll.
            log.exception("Could not claim outbox messages")
            return []
        claimed: list[_Claimed] = []
        unreadable: list[_Unreadable] = []
        for row in sorted(rows, key=lambda row: row.id):
            try:
                envelope = _envelope(_decoded(row))
            except MessageError as error:
                unreadable.append(_Unreadable(row.id, row.message_id, row.sender, str(error)))
            else:
                claimed.append(_Claimed(row.id, row.attempts, envelope, row.created_at))
        if unreadable:
            await self._fail_unreadable(unreadable)
        return claimed

    async def _fail_unreadable(self, rows: list[_Unreadable]) -> None:
        """Mark rows that cannot be sent as stored failed, with the reason."""
        for row in rows:
            log.error(
                "Not sent: outbox row %d (Message-ID %r) cannot be sent as stored: %s",
                row.id,
                row.message_id,
                row.reason,
            )
        try:
            async with self.engine.begin() as connection:
                for row in rows:
                    await connection.execute(
                        update(OutboxMessage)
                        .where(OutboxMessage.id == row.id, self._held())
                        .values(
                            state="failed",
                            attempts=OutboxMessage.attempts + 1,
                            lease_until=None,
                            claimed_by=None,
                            last_error_code=None,
                            last_error=f"cannot be sent as stored: {row.reason}"[:2000],
                        )
                    )
        except Exception:
            # They stay "sending" until their lease runs out, then fail again.
            log.exception("Could not mark %d unreadable outbox rows failed", len(rows))
            return
        if email_failed.receivers:
            self._spawn_signals(self._signal_unreadable(rows))

    async def _signal_unreadable(self, rows: list[_Unreadable]) -> None:
        for row in rows:
            error = MessageError(f"outbox row {row.id} cannot be sent as stored: {row.reason}")
            # What can be read of it: its sender and Message-ID, when they are one line.
            message = Message(sender=_or_none(row.sender, "sender"))
            message.msg_id = _or_none(row.message_id, "message_id") or message.msg_id
            await notify(email_failed, message, app=self._state.app, error=error)

    async def _record(self, outcomes: list[tuple[asyncio.Future[SendResult], _Claimed]]) -> None:
        now = _now()
        sent: list[_Claimed] = []
        partly: dict[int, MailError] = {}  # sent, but refused for some recipients
        for future, item in outcomes:
            del self._in_flight[future]
            if future.cancelled():
                continue  # close() hands these back
            error = future.exception()
            if error is None:
                sent.append(item)
                refused = future.result().refused
                if refused:
                    partly[item.id] = partly_refused(item.envelope.message_id, refused)
        try:
            async with self.engine.begin() as connection:
                if sent:
                    await connection.execute(
                        update(OutboxMessage)
                        .where(OutboxMessage.id.in_([item.id for item in sent]), self._held())
                        .values(state="sent", sent_at=now, lease_until=None, claimed_by=None)
                    )
                for id, refusal in partly.items():
                    await connection.execute(
                        update(OutboxMessage)
                        .where(OutboxMessage.id == id)
                        .values(
                            last_error_code=getattr(refusal, "code", None),
                            last_error=str(refusal)[:2000],
                        )
                    )
                for future, item in outcomes:
                    if future.cancelled() or future.exception() is None:
                        continue
                    await connection.execute(
                        update(OutboxMessage)
                        .where(OutboxMessage.id == item.id, self._held())
                        .values(**self._after_failure(item, future.exception(), now))
                    )
        except Exception:
            # The rows stay "sending": their lease expires and they are sent
            # again, a duplicate rather than a loss.
            log.exception("Could not record the outcome of %d outbox messages", len(outcomes))
            return
        self._spawn_signals(self._signal(outcomes, partly))

    def _spawn_signals(self, signals: Coroutine[Any, Any, None]) -> None:
        """Signal in a task of its own: a receiver that never returns holds up
        its signals, not the dispatcher. close() waits for them, bounded."""
        task = asyncio.create_task(signals)
        self._signalling.add(task)
        task.add_done_callback(self._signalling.discard)

    def _after_failure(
        self, item: _Claimed, error: BaseException | None, now: datetime
    ) -> dict[str, Any]:
        attempts = item.attempts + 1
        settings = self._state.settings
        time_left = (item.created_at - now).total_seconds() + settings.delivery_timeout
        delay = None
        if error is not None:
            delay = next_attempt(error, attempts, settings.retries, settings.retry_delay, time_left)
        out_of_time = delay is None and attempts <= settings.retries  # not out of retries
        if out_of_time and isinstance(error, SendError) and error.transient:
            error = timed_out(settings.delivery_timeout, error)
        code = getattr(error, "code", None)
        values: dict[str, Any] = {
            "attempts": attempts,
            "lease_until": None,
            "claimed_by": None,
            "last_error_code": code,
            "last_error": str(error)[:2000],
        }
        if delay is not None:
            values.update(state="queued", next_attempt_at=now + timedelta(seconds=delay))
            log.info("Outbox: retrying %s in %.2f s: %s", item.envelope.message_id, delay, error)
        else:
            values["state"] = "failed"
            log.error("Not sent: %s (SMTP code %s): %s", item.envelope.message_id, code, error)
        return values

    async def _signal(
        self,
        outcomes: list[tuple[asyncio.Future[SendResult], _Claimed]],
        partly: dict[int, MailError],
    ) -> None:
        # The Message object stayed with the process that enqueued it; the
        # receivers get one rebuilt from the stored headers.
        app = self._state.app
        for future, item in outcomes:
            if future.cancelled():
                continue
            error = future.exception()
            try:
                if error is None and email_dispatched.receivers:
                    await notify(email_dispatched, _rebuilt(item.envelope), app=app)
                refusal = partly.get(item.id)
                if error is None and refusal is not None and email_failed.receivers:
                    await notify(email_failed, _rebuilt(item.envelope), app=app, error=refusal)
                elif error is not None and email_failed.receivers:
                    failure = error if isinstance(error, MailError) else MailError(str(error))
                    await notify(email_failed, _rebuilt(item.envelope), app=app, error=failure)
            except Exception:  # the outcome is recorded; the others still get theirs
                log.exception("Could not signal the outcome of %s", item.envelope.message_id)

    # PostgreSQL LISTEN

    async def _listen(self) -> None:
        try:
            connection = await self.engine.connect()
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            await driver.add_listener(_CHANNEL, self._notified)  # type: ignore[union-attr]
        except Exception:
            log.warning("No LISTEN on PostgreSQL; polling every %g s", self._poll, exc_info=True)
            return
        self._listener = connection

    def _notified(self, *args: object) -> None:
        self._wake.set()

    async def _unlisten(self) -> None:
        connection, self._listener = self._listener, None
        if connection is not None:
            with contextlib.suppress(Exception):
                raw = await connection.get_raw_connection()
                await raw.driver_connection.remove_listener(_CHANNEL, self._notified)
            await connection.close()


def _envelope(row: Any) -> Envelope:
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
    )


def _decoded(row: Any) -> Any:
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


def _one_line(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise MessageError(f"{name}: expected a string, got {value!r:.100}")
    if any(char in value for char in "\r\n\0"):
        raise MessageError(f"{name}: contains a line break: {value!r:.200}")
    return value


def _or_none(value: Any, name: str) -> str | None:
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


def _rebuilt(envelope: Envelope) -> Message:
    """A Message with the subject, sender, recipients and Message-ID of a
    stored one (not its bodies or attachments), for signal receivers."""
    try:
        subject = str(_header_parser.parsebytes(envelope.data).get("Subject", ""))
    except Exception:  # a subject the email package cannot read: signal without it
        subject = ""
    message = Message(subject, sender=envelope.sender, recipients=list(envelope.recipients))
    message.msg_id = envelope.message_id
    return message
