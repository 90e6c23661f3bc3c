"""The outbox's dispatcher: one per app process, from start-up to shutdown.

It claims due rows of the outbox table (:mod:`quartmail.outbox`) in small
batches (``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so that many
processes share the work; SQLite serializes writers, which gives the same
guarantee on one machine), marks them ``sending`` with a lease, sends them
over the background delivery pool (:mod:`quartmail.delivery`), then marks
them ``sent`` or schedules the retry or marks them ``failed`` with the last
error, by the core's rule (:meth:`quartmail.core.MailCore.after_failure`).
A lease that expires (its process died mid-send) makes the row due again.
An attempt the server throttled (:mod:`quartmail.throttle`) is retried when
the process's back-off ends and does not add to the row's ``attempts``; nor
does a row whose deadline passed before it reached the server (waiting in the
pool's queue): it fails with the row's last error.

New rows are picked up at once: a PostgreSQL ``NOTIFY`` sent in the
enqueueing transaction (delivered only if it commits) wakes every dispatcher,
and a commit in this process wakes its own (the table's ``wake`` event);
otherwise a poll every ``MAIL_OUTBOX_POLL`` seconds finds retries and expired
leases.

Delivery is at least once: a process killed after the server accepted a
message but before its row was marked sent sends it again after the lease.
The Message-ID is stored with the bytes, so it is the same on every resend.

Every row ends: one not sent ``MAIL_DELIVERY_TIMEOUT`` seconds after it was
enqueued (or queued again by :meth:`~quartmail.outbox.OutboxTable.retry`) is
marked ``failed``. A row that cannot be read or sent as stored (JSON that is
not a list of strings, no message data, a Message-ID or address with a line
break) is marked ``failed`` with the reason and logged; the dispatcher goes
on with the others. The signals run in tasks the core owns: a receiver that
never returns holds up its signals, not the dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ._extras import missing_extra

try:
    from sqlalchemy import Text, and_, cast, select, update
except ModuleNotFoundError as error:
    raise missing_extra(error, "outbox", "The durable outbox") from None

from .core import MailCore, NotAttemptedError, counted, left_out, partly_refused
from .delivery import Delivery
from .errors import MailError, MessageError, SendError
from .message import Envelope, Message
from .outbox import (
    CHANNEL,
    Outbox,
    OutboxMessage,
    decoded_row,
    one_line_or_none,
    rebuilt_message,
    row_envelope,
)
from .signals import email_dispatched, email_failed, notify
from .smtp import SendResult

__all__ = ["Dispatcher"]

log = logging.getLogger("quartmail.outbox")


@dataclass(eq=False)
class _Claimed:
    id: int
    attempts: int
    envelope: Envelope
    created_at: datetime  # MAIL_DELIVERY_TIMEOUT runs from here
    last_error: SendError | None = None  # the row's, from its earlier attempts
    suppressed: dict[str, str] = field(default_factory=dict)  # recipients left out


@dataclass(eq=False)
class _Unreadable:
    id: int
    message_id: Any
    sender: Any
    reason: str


def _now() -> datetime:
    return datetime.now(UTC)


def _stored_error(code: int | None, text: str | None) -> SendError | None:
    """A row's last error (``last_error_code``, ``last_error``), to word its
    time-out with; None when it has none."""
    if code is None and text is None:
        return None
    return SendError(text or f"SMTP code {code}", code=code)


class Dispatcher:
    """The outbox dispatcher of one app process; made by
    :meth:`quartmail.Mail.init_outbox`, run by the app's lifespan."""

    def __init__(self, outbox: Outbox, core: MailCore) -> None:
        self._outbox = outbox
        self._core = core
        self.engine = outbox.engine
        settings = core.settings
        self._lease = timedelta(seconds=settings.outbox_lease)
        self._poll = settings.outbox_poll
        # Enough claimed to keep every pooled session busy between claims,
        # few enough that a dying process strands little behind its lease.
        self._batch = settings.pool_size * 4
        self._postgres = self.engine.dialect.name == "postgresql"
        self._wake = outbox.wake
        self._stopping = False
        self._delivery: Delivery | None = None  # given by start()
        self._task: asyncio.Task[None] | None = None
        self._in_flight: dict[asyncio.Future[SendResult], _Claimed] = {}
        self._listener: Any = None  # the PostgreSQL connection that LISTENs
        # This dispatcher's name on the rows it claims.
        self._token = secrets.token_hex(16)
        self._renew_at = 0.0  # loop time to extend the leases of rows in flight
        self._reclaim_at = 0.0  # loop time to look for expired leases
        self._status_at = 0.0  # loop time to count the rows for the observer (metrics)

    def __repr__(self) -> str:
        return (
            f"<Dispatcher {self.engine.url.render_as_string(hide_password=True)} "
            f"in_flight={len(self._in_flight)}>"
        )

    async def start(self, delivery: Delivery) -> None:
        """Create the table if needed and start sending its rows over *delivery*."""
        self._delivery = delivery
        if self._task is not None:
            return
        await self._outbox.create_table()
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
            if room >= self._core.settings.pool_size or not self._in_flight:
                self._send(await self._claim(room))
        outcomes = [(f, c) for f, c in self._in_flight.items() if f.done()]
        if outcomes:
            await self._record(outcomes)
        if not (self._stopping and not self._in_flight):
            await self._renew_leases()
        await self._report_status()

    def _send(self, claimed: list[_Claimed]) -> None:
        loop = asyncio.get_running_loop()
        timeout = self._core.settings.delivery_timeout
        delivery = self._delivery
        if delivery is None:  # (start() gives it)
            raise RuntimeError("the outbox dispatcher was not started")
        for item in claimed:
            left = (item.created_at - _now()).total_seconds() + timeout
            deadline = loop.time() + left
            future = delivery.attempt(item.envelope, deadline, last_error=item.last_error)
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

    async def _report_status(self) -> None:
        """Count the rows for the core's observer every ``outbox_interval``
        seconds (metrics on): here, so that no scrape waits on the database."""
        interval = self._core.observer.outbox_interval
        loop = asyncio.get_running_loop()
        if interval is None or loop.time() < self._status_at:
            return
        self._status_at = loop.time() + interval
        try:
            status = await self._outbox.status()
        except Exception:
            log.exception("Could not count the outbox messages for the metrics")
            return
        self._core.observer.outbox_status(status.counts, status.oldest_due_age)

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
                # fail the fetch of the others (see decoded_row).
                cast(OutboxMessage.recipients, Text).label("recipients"),
                OutboxMessage.data,
                cast(OutboxMessage.mail_options, Text).label("mail_options"),
                cast(OutboxMessage.rcpt_options, Text).label("rcpt_options"),
                OutboxMessage.created_at,
                OutboxMessage.transactional,
                OutboxMessage.last_error_code,
                OutboxMessage.last_error,
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
                envelope = row_envelope(decoded_row(row))
            except MessageError as error:
                unreadable.append(_Unreadable(row.id, row.message_id, row.sender, str(error)))
            else:
                last_error = _stored_error(row.last_error_code, row.last_error)
                claimed.append(_Claimed(row.id, row.attempts, envelope, row.created_at, last_error))
        if unreadable:
            await self._fail_unreadable(unreadable)
        return await self._leave_out_suppressed(claimed)

    async def _leave_out_suppressed(self, claimed: list[_Claimed]) -> list[_Claimed]:
        """The claimed rows to send, without their suppressed recipients
        (one query for the batch); a row with none left fails, unsent."""
        checked = await self._core.leave_out([item.envelope for item in claimed])
        sendable: list[_Claimed] = []
        nobody: list[tuple[_Claimed, MailError]] = []
        for item, (envelope, suppressed) in zip(claimed, checked, strict=True):
            if envelope.recipients:
                item.envelope, item.suppressed = envelope, suppressed
                sendable.append(item)
            else:
                message_id = item.envelope.message_id
                nobody.append((item, left_out(message_id, suppressed, sent=False)))
        if nobody and await self._mark_failed(
            {item.id: str(error) for item, error in nobody}, "suppressed"
        ):
            for item, error in nobody:
                self._core.failed(rebuilt_message(item.envelope), error)
        return sendable

    async def _mark_failed(self, reasons: dict[int, str], what: str) -> bool:
        """Mark the rows of *reasons* (still held) failed, each with its
        reason, in one transaction; False (logged) if the database failed:
        they stay "sending" until their lease runs out, then are tried again."""
        try:
            async with self.engine.begin() as connection:
                for id, reason in reasons.items():
                    await connection.execute(
                        update(OutboxMessage)
                        .where(OutboxMessage.id == id, self._held())
                        .values(
                            state="failed",
                            attempts=OutboxMessage.attempts + 1,
                            lease_until=None,
                            claimed_by=None,
                            last_error_code=None,
                            last_error=reason[:2000],
                        )
                    )
        except Exception:
            log.exception("Could not mark %d %s outbox rows failed", len(reasons), what)
            return False
        return True

    async def _fail_unreadable(self, rows: list[_Unreadable]) -> None:
        """Mark rows that cannot be sent as stored failed, with the reason."""
        for row in rows:
            error = MessageError(f"outbox row {row.id} cannot be sent as stored: {row.reason}")
            self._core.not_sent(f"outbox row {row.id} (Message-ID {row.message_id!r:.200})", error)
        reasons = {row.id: f"cannot be sent as stored: {row.reason}" for row in rows}
        if not await self._mark_failed(reasons, "unreadable"):
            return
        for row in rows:
            error = MessageError(f"outbox row {row.id} cannot be sent as stored: {row.reason}")
            # What can be read of it: its sender and Message-ID, when they are one line.
            message = Message(sender=one_line_or_none(row.sender, "sender"))
            message.msg_id = one_line_or_none(row.message_id, "message_id") or message.msg_id
            self._core.failed(message, error)

    async def _record(self, outcomes: list[tuple[asyncio.Future[SendResult], _Claimed]]) -> None:
        now = _now()
        sent: list[_Claimed] = []
        partly: dict[int, MailError] = {}  # sent, but refused for some recipients
        suppressed: dict[int, MailError] = {}  # sent, without its suppressed recipients
        after_failure: dict[int, dict[str, Any]] = {}  # the row's new values
        failed: dict[int, MailError] = {}  # failed for good
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
                    self._core.bounced(item.envelope.message_id, refused)
                if item.suppressed:
                    message_id = item.envelope.message_id
                    suppressed[item.id] = left_out(message_id, item.suppressed, sent=True)
            else:
                after_failure[item.id] = self._after_failure(item, error, now, failed)
        try:
            async with self.engine.begin() as connection:
                if sent:
                    await connection.execute(
                        update(OutboxMessage)
                        .where(OutboxMessage.id.in_([item.id for item in sent]), self._held())
                        .values(state="sent", sent_at=now, lease_until=None, claimed_by=None)
                    )
                # What the row's recipients did not get: refused (first) or suppressed.
                for id, refusal in {**suppressed, **partly}.items():
                    await connection.execute(
                        update(OutboxMessage)
                        .where(OutboxMessage.id == id)
                        .values(
                            last_error_code=getattr(refusal, "code", None),
                            last_error=str(refusal)[:2000],
                        )
                    )
                for id, values in after_failure.items():
                    await connection.execute(
                        update(OutboxMessage)
                        .where(OutboxMessage.id == id, self._held())
                        .values(**values)
                    )
        except Exception:
            # The rows stay "sending": their lease expires and they are sent
            # again, a duplicate rather than a loss.
            log.exception("Could not record the outcome of %d outbox messages", len(outcomes))
            return
        self._core.signal(self._signal(outcomes, partly, suppressed, failed))

    def _after_failure(
        self, item: _Claimed, error: BaseException, now: datetime, failed: dict[int, MailError]
    ) -> dict[str, Any]:
        """The row's values after a failed attempt, by the core's retry rule;
        a failure for good is logged and added to *failed*."""
        message_id = item.envelope.message_id
        outcome: float | MailError
        if isinstance(error, NotAttemptedError):
            # Its deadline, the row's MAIL_DELIVERY_TIMEOUT, passed before it
            # reached the server: no attempt, and no time left for one.
            attempts, outcome = item.attempts, error
        else:
            attempts = item.attempts + counted(error)  # a throttled attempt is not counted
            settings = self._core.settings
            time_left = (item.created_at - now).total_seconds() + settings.delivery_timeout
            outcome = self._core.after_failure(message_id, error, attempts, time_left)
        reported = outcome if isinstance(outcome, MailError) else error
        values: dict[str, Any] = {
            "attempts": attempts,
            "lease_until": None,
            "claimed_by": None,
            "last_error_code": getattr(reported, "code", None),
            "last_error": str(reported)[:2000],
        }
        if isinstance(outcome, MailError):
            values["state"] = "failed"
            self._core.not_sent(message_id, outcome)
            failed[item.id] = outcome
        else:
            values.update(state="queued", next_attempt_at=now + timedelta(seconds=outcome))
        return values

    async def _signal(
        self,
        outcomes: list[tuple[asyncio.Future[SendResult], _Claimed]],
        partly: dict[int, MailError],
        suppressed: dict[int, MailError],
        failed: dict[int, MailError],
    ) -> None:
        # The Message object stayed with the process that enqueued it; the
        # receivers get one rebuilt from the stored headers.
        app = self._core.app
        for future, item in outcomes:
            if future.cancelled():
                continue
            sent = future.exception() is None
            try:
                if sent and email_dispatched.receivers:
                    await notify(email_dispatched, rebuilt_message(item.envelope), app=app)
                if sent:
                    refusals = [partly.get(item.id), suppressed.get(item.id)]
                else:
                    refusals = [failed.get(item.id)]
                for refusal in refusals:
                    if refusal is not None and email_failed.receivers:
                        message = rebuilt_message(item.envelope)
                        await notify(email_failed, message, app=app, error=refusal)
            except Exception:  # the outcome is recorded; the others still get theirs
                log.exception("Could not signal the outcome of %s", item.envelope.message_id)

    # PostgreSQL LISTEN

    async def _listen(self) -> None:
        try:
            connection = await self.engine.connect()
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            await driver.add_listener(CHANNEL, self._notified)  # type: ignore[union-attr]
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
                await raw.driver_connection.remove_listener(CHANNEL, self._notified)
            await connection.close()
