"""Background delivery: a queue, a pool of SMTP sessions, retries, a drain.

:meth:`Delivery.submit` checks a message in the caller and queues it. Up to
``MAIL_POOL_SIZE`` worker tasks take messages from the queue; each holds at
most one SMTP session, opened when it first has a message (TLS and AUTH done
once) and reused until ``MAIL_MAX_EMAILS``, a failure, or shutdown. With
``MAIL_DKIM_KEY``, the worker that first takes a message signs it (checked
as signable in the caller), so that every attempt sends the same bytes.

Failures:

- transient ones (4xx, a lost or refused connection, a timeout) are tried
  again after ``MAIL_RETRY_DELAY`` * 2**n seconds, with jitter, at most
  ``MAIL_RETRIES`` times; permanent ones (5xx) are not;
- a connect refused while other sessions are open, or answered 421 (Postfix
  at its per-client limit), means the server limits connections: the message
  goes back to the queue, untouched, for a session that works (or waits for
  one), and the worker backs off before it tries to connect again; a server
  that cannot be reached at all costs the message an attempt;
- a reused session that the server closed while it was idle is replaced, and
  the message sent on the new one, once, without counting an attempt;
- a session whose send was cancelled or timed out is closed, never reused;
- whatever the cause, a message not delivered ``MAIL_DELIVERY_TIMEOUT``
  seconds after it was submitted fails for good (a retry that would start
  later is not scheduled), so every message ends, delivered or failed;
- a message the server took for some recipients and refused for others is
  delivered; the refusals are logged (WARNING) and sent with ``email_failed``;
- a throttling reply (:mod:`quartmail.throttle`) holds back every worker for
  the back-off, and the message is retried when it ends, without spending
  one of its ``MAIL_RETRIES``.
- with a suppression list (:mod:`quartmail.suppression`), a worker first
  leaves the suppressed recipients out; a message with none left fails with
  :class:`~quartmail.SuppressedError` and is never sent. One query checks
  every message waiting for a check, and one runs at a time: a burst of
  messages costs a few queries, not one each.

Each failure for good is logged (ERROR, with the Message-ID), sent with
``email_failed`` and raised from the message's future. The rules (reuse of a
session, retry or fail, the log, the signals) are the core's
(:mod:`quartmail.core`), the same for every path; the signals run in tasks
the core owns, so a receiver that never returns does not hold up a worker.

:meth:`Delivery.close` (the app's ``after_serving``) stops taking messages,
delivers what is queued or waiting for a retry within
``MAIL_SHUTDOWN_TIMEOUT``, then starts nothing new: only sends already on
the wire may finish. It closes every session, and logs by Message-ID what
is left. Quart's own drain of background tasks is a snapshot that does not
cover retries, so this module owns its drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import random
from dataclasses import dataclass, field, replace
from itertools import islice

from .core import MailCore, NotAttemptedError, counted, left_out, timed_out
from .errors import ConnectError, MailError, MessageError, SendError
from .message import Envelope, Message
from .settings import MailSettings
from .smtp import SendResult, SMTPSession

__all__ = ["Delivery"]

log = logging.getLogger("quartmail.delivery")

# A worker refused a connection backs off up to this long before trying again.
_MAX_CONNECT_BACKOFF = 30.0
# How long close() waits for cancelled workers; see _cancel_all.
_CANCEL_GRACE = 1.0
# At most this many messages in one suppression query (its recipients are its
# parameters: SQLite takes 32766, PostgreSQL 32767).
_CHECK_BATCH = 200


@dataclass(eq=False)
class _Job:
    envelope: Envelope
    future: asyncio.Future[SendResult]
    message: Message | None = None  # None for attempt(): its caller decides, logs and signals
    attempts: int = 0  # failed attempts so far
    reconnected: bool = False  # already resent once after a stale session
    rushed: bool = False  # had its retry at once, at shutdown
    retry: asyncio.TimerHandle | None = None
    sending: asyncio.Task[SendResult] | None = None
    deadline: float = math.inf  # loop time: MAIL_DELIVERY_TIMEOUT after submit
    expiry: asyncio.TimerHandle | None = None
    held: bool = False  # a worker has it (connecting or sending)
    finished: bool = False  # delivered, failed or dropped
    last_error: SendError | None = None
    unsigned: bool = False  # to be DKIM-signed by the worker that first takes it
    context: contextvars.Context | None = None  # the submitter's (see _queue_job)
    suppressed: dict[str, str] | None = None  # None: not checked yet


@dataclass(eq=False)
class _Worker:
    session: SMTPSession | None = None
    refusals: int = 0  # connects refused in a row
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Delivery:
    """Background delivery for one app; made by :class:`~quartmail.Mail`."""

    def __init__(self, core: MailCore) -> None:
        self._core = core
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._workers: list[_Worker] = []
        self._pending: set[_Job] = set()  # submitted and not settled yet
        # Messages whose recipients are not checked against the suppression
        # list yet, oldest first; and the check that runs, if one does.
        self._unchecked: dict[_Job, None] = {}
        self._checking: asyncio.Future[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._closed = False

    def __repr__(self) -> str:
        live = sum(1 for worker in self._workers if worker.session is not None)
        return (
            f"<Delivery pending={len(self._pending)} workers={len(self._workers)} "
            f"sessions={live}{' closed' if self._closed else ''}>"
        )

    @property
    def _settings(self) -> MailSettings:
        return self._core.settings  # read each time: Flask-Mail code may change one

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has begun: no new messages are taken."""
        return self._closed

    @property
    def pending(self) -> int:
        """Messages submitted and not yet delivered or failed for good."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Of :attr:`pending`, the messages a worker holds (connecting or sending)."""
        return sum(1 for job in self._pending if job.held)

    def start(self) -> None:
        """Start the workers in the running loop (done on first use, or at start-up)."""
        if self._closed:
            raise MailError("background delivery is shut down; no new messages are taken")
        if self._workers:
            return
        for n in range(self._settings.pool_size):
            worker = _Worker()
            worker.task = asyncio.create_task(self._run(worker), name=f"quartmail-worker-{n}")
            self._workers.append(worker)

    def submit(self, message: Message) -> asyncio.Future[SendResult]:
        """Check *message* here, in the caller, and queue it; see
        :meth:`quartmail.Mail.send_background`."""
        if self._closed:
            raise MailError("background delivery is shut down; no new messages are taken")
        envelope = self._core.envelope(message)  # raises MessageError, BadHeaderError
        future: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        if self._settings.suppress_send:
            result = SendResult(message_id=envelope.message_id)
            self._core.delivered(message, result)  # recorded and signalled, not sent
            future.set_result(result)
            return future
        deadline = asyncio.get_running_loop().time() + self._settings.delivery_timeout
        unsigned = self._settings.dkim is not None
        job = _Job(envelope, future, message, deadline=deadline, unsigned=unsigned)
        self._unchecked[job] = None
        return self._queue_job(job)

    def attempt(
        self,
        envelope: Envelope,
        deadline: float = math.inf,
        last_error: SendError | None = None,
    ) -> asyncio.Future[SendResult]:
        """Try to send a checked message once, over the pool, and return
        its future; the caller (the outbox) keeps its own retry schedule,
        log and signals. A connect refused at the server's connection limit,
        or a stale session, does not count as the attempt; at *deadline* (a
        loop time: the message's MAIL_DELIVERY_TIMEOUT) it fails all the same,
        with :class:`NotAttemptedError` if it had not reached the server, worded
        with *last_error* (the message's, from an earlier attempt)."""
        if self._closed:
            raise MailError("background delivery is shut down; no new messages are taken")
        future: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        job = _Job(envelope, future, deadline=deadline, last_error=last_error)
        return self._queue_job(job)

    def _queue_job(self, job: _Job) -> asyncio.Future[SendResult]:
        self.start()
        job.context = contextvars.copy_context()
        job.future.add_done_callback(lambda _: self._caller_cancelled(job))
        if job.deadline < math.inf:
            job.expiry = asyncio.get_running_loop().call_at(job.deadline, self._expire, job)
        self._pending.add(job)
        self._idle.clear()
        self._queue.put_nowait(job)
        return job.future

    async def close(self, deadline: float | None = None) -> None:
        """Stop taking messages, deliver what is pending by *deadline* (a
        loop time; default ``MAIL_SHUTDOWN_TIMEOUT`` from now), close every
        session, and give up (logged by Message-ID) on what is left."""
        if self._closed:
            return
        self._closed = True
        # Messages waiting for a retry get their chance now rather than after
        # the deadline (so does one whose attempt fails during the drain: see
        # _attempt_failed); later retries keep their backoff.
        for job in list(self._pending):
            if job.retry is not None:
                job.retry.cancel()
                job.rushed = True
                self._put_back(job)
        timeout = self._settings.shutdown_timeout
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + timeout
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._idle.wait()
        self._stopping.set()
        for _ in self._workers:
            self._queue.put_nowait(None)  # each worker QUITs its session and ends
        tasks = [worker.task for worker in self._workers if worker.task is not None]
        if tasks:
            _, running = await asyncio.wait(tasks, timeout=_CANCEL_GRACE)
            await _cancel_all(running)
        left = list(self._pending)
        for job in left:
            if job.retry is not None:
                job.retry.cancel()
            if job.message is None:  # attempt(): the outbox hands its row back
                self._settle(job)
                job.future.cancel()
                continue
            error = MailError(
                f"the app shut down before {job.envelope.message_id} could be "
                f"delivered (MAIL_SHUTDOWN_TIMEOUT={timeout:g} s)"
            )
            self._fail(job, error)

    # The worker

    async def _run(self, worker: _Worker) -> None:
        try:
            while (job := await self._queue.get()) is not None:
                if job.future.done():  # the caller cancelled it while queued
                    self._settle(job)
                    continue
                if self._stopping.is_set():
                    continue  # past the drain deadline: close() reports it
                if self._expired(job):
                    self._fail(job, self._timed_out(job))
                    continue
                job.held = True  # until it goes back to the queue (_put_back) or ends
                try:
                    await self._deliver(worker, job)
                except Exception as error:  # a bug of ours: keep the worker alive
                    log.exception("Delivery of %s failed", job.envelope.message_id)
                    self._drop_session(worker)
                    failure = MailError(f"unexpected error sending {job.envelope.message_id}")
                    failure.__cause__ = error
                    self._fail(job, failure, log_it=False)
        except asyncio.CancelledError:
            self._drop_session(worker)
            raise
        session, worker.session = worker.session, None
        if session is not None:
            await session.close()

    async def _deliver(self, worker: _Worker, job: _Job) -> None:
        if job.message is not None:  # (attempt(): the outbox checks)
            # Once per message, before its first attempt.
            suppressed = await self._leave_out_suppressed(job)
            if not job.envelope.recipients:
                nobody = left_out(job.envelope.message_id, suppressed, sent=False)
                self._fail(job, nobody, log_it=False)
                return
        if job.unsigned:
            # Signed here, once, and not in submit(), which returns at once
            # and cannot wait for a thread; envelope() checked it there.
            try:
                job.envelope = await self._core.sign(job.message, job.envelope)
            except MessageError as unsignable:
                self._fail(job, unsignable)
                return
            job.unsigned = False
        session = await self._session_for(worker, job)
        if session is None:
            return
        if job.future.done() or self._stopping.is_set():
            # Cancelled by its caller, or the drain deadline passed, while
            # connecting: start nothing new (close() reports what is left).
            if job.future.done():
                self._settle(job)
            return
        if self._expired(job):  # while connecting: no send starts past it
            self._fail(job, self._timed_out(job))
            return
        reused = session.sent > 0
        # The send runs in a task of its own so that the caller can cancel
        # this one message (future.cancel()) without cancelling the worker.
        # In the submitter's context: its trace (a request's span) is the send's parent.
        sending = job.sending = asyncio.create_task(
            self._core.transaction(session, job.envelope, job.deadline), context=job.context
        )
        # A session spent by this send has closed itself: the core's reuse
        # rule replaces it before the next message.
        try:
            result = await sending  # (cancelling this worker cancels the send too)
        except asyncio.CancelledError:
            if sending.cancelled() and not _cancelling():
                # The caller cancelled the future mid-send; the message may or
                # may not have been delivered.
                self._settle(job)
                return
            sending.cancel()
            self._drop_session(worker)
            raise
        except SendError as failure:
            error = failure
        else:
            self._delivered(job, result)
            return
        finally:
            job.sending = None
        if isinstance(error, NotAttemptedError):  # MAIL_RATE_LIMIT's wait ran past the deadline
            self._fail(job, self._timed_out(job))
            return
        if reused and isinstance(error, ConnectError) and not job.reconnected:
            # Most likely the server closed the idle session under us before
            # the message: send it on a fresh session, without an attempt.
            job.reconnected = True
            self._put_back(job)
            return
        self._attempt_failed(job, error)

    async def _leave_out_suppressed(self, job: _Job) -> dict[str, str]:
        """Leave *job*'s suppressed recipients out of its envelope and
        return them, with their reasons (``job.suppressed``). Checked with
        every message not checked yet: the list's query costs about as much
        for one message as for hundreds."""
        if self._core.suppression is None:  # no list: nothing to leave out, no check to share
            self._unchecked.pop(job, None)
            job.suppressed = {}
        while job.suppressed is None:
            if self._checking is not None:
                # It may hold this job; if not, the next one will. (Not
                # awaited directly: cancelling this worker must not cancel it.)
                await asyncio.wait([self._checking])
                continue
            others = (other for other in self._unchecked if other is not job)
            batch = [job, *islice(others, _CHECK_BATCH - 1)]
            for each in batch:
                self._unchecked.pop(each, None)
            checked = self._checking = asyncio.get_running_loop().create_future()
            try:
                outcome = await self._core.leave_out([each.envelope for each in batch])
                for each, (envelope, suppressed) in zip(batch, outcome, strict=True):
                    each.envelope, each.suppressed = envelope, suppressed
            finally:
                self._checking = None
                # Cancelled (at shutdown): those not checked wait for the next check.
                for each in batch:
                    if each.suppressed is None and not each.finished:
                        self._unchecked[each] = None
                checked.set_result(None)
        return job.suppressed

    async def _session_for(self, worker: _Worker, job: _Job) -> SMTPSession | None:
        """The worker's session, (re)opened as needed; None when the job
        went back to the queue or failed."""
        current, worker.session = worker.session, None
        try:
            session = worker.session = await self._core.session(current)
        except SendError as error:
            await self._connect_failed(worker, job, error)
            return None
        if session is not current:
            worker.refusals = 0
        return session

    async def _connect_failed(self, worker: _Worker, job: _Job, error: SendError) -> None:
        busy = error.code == 421  # the server is up, at its connection limit
        others_connected = any(
            other.session is not None and other.session.is_connected for other in self._workers
        )
        if error.transient and (busy or others_connected) and not self._expired(job):
            job.last_error = error
            # The server takes fewer connections than the pool has: a fact
            # about the server, not the message. Let a working session have
            # it (or wait for one), and stay out of the way for a while.
            self._put_back(job)
        else:
            self._attempt_failed(job, error)
        if error.transient:
            worker.refusals += 1
            backoff = min(_MAX_CONNECT_BACKOFF, self._settings.retry_delay * 2**worker.refusals)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff * random.uniform(0.5, 1.0)):
                    await self._stopping.wait()

    def _drop_session(self, worker: _Worker) -> None:
        session, worker.session = worker.session, None
        if session is not None:
            session.abort()

    # Outcomes

    def _delivered(self, job: _Job, result: SendResult) -> None:
        if job.finished:
            return
        self._settle(job)
        if job.suppressed:
            result = replace(result, suppressed=job.suppressed)
        if job.message is not None:
            self._core.delivered(job.message, result)  # before the caller wakes
        if not job.future.done():
            job.future.set_result(result)

    def _attempt_failed(self, job: _Job, error: SendError) -> None:
        job.attempts += counted(error)  # a throttled attempt is not counted
        job.last_error = error
        if job.future.done():  # its caller cancelled it meanwhile
            self._settle(job)
            return
        if job.message is None:  # attempt(): the outbox applies the rule itself
            self._fail(job, error)
            return
        time_left = job.deadline - asyncio.get_running_loop().time()
        outcome = self._core.after_failure(job.envelope.message_id, error, job.attempts, time_left)
        if isinstance(outcome, MailError):
            self._fail(job, outcome)
            return
        if self._closed and not job.rushed:
            # Shutting down: its one retry now, within the drain.
            job.rushed = True
            self._put_back(job)
            return
        job.held = False
        job.retry = asyncio.get_running_loop().call_later(outcome, self._put_back, job)

    def _expired(self, job: _Job) -> bool:
        return asyncio.get_running_loop().time() >= job.deadline

    def _timed_out(self, job: _Job) -> SendError:
        """The failure of *job* at its deadline, before it reached the server."""
        # attempt(): its caller counts the attempts, and this was none.
        kind = SendError if job.message is not None else NotAttemptedError
        return timed_out(self._settings.delivery_timeout, job.last_error, kind)

    def _expire(self, job: _Job) -> None:
        """At the deadline: a message waiting (queued, or for a retry) fails
        now; one a worker holds fails when that attempt ends."""
        job.expiry = None
        if job.held or job.finished or job.future.done():
            return
        if job.retry is not None:
            job.retry.cancel()
            job.retry = None
        self._fail(job, self._timed_out(job))

    def _put_back(self, job: _Job) -> None:
        """Back to the queue: now, or when its retry is due."""
        job.retry = None
        job.held = False
        self._queue.put_nowait(job)

    def _fail(self, job: _Job, error: MailError, *, log_it: bool = True) -> None:
        """Settle *job* as failed: log it, signal it, fail its future (unless
        it had already ended)."""
        if job.finished:
            return
        self._settle(job)
        if job.message is not None:  # (attempt(): the outbox logs and signals)
            if log_it:
                self._core.not_sent(job.envelope.message_id, error)
            self._core.failed(job.message, error)  # before the caller wakes
        if not job.future.done():
            job.future.set_exception(error)
            # The caller may have dropped the future: the failure is logged and
            # signalled, so mark it retrieved ("exception was never retrieved").
            job.future.exception()

    def _settle(self, job: _Job) -> None:
        job.finished = True
        self._unchecked.pop(job, None)
        if job.expiry is not None:
            job.expiry.cancel()
            job.expiry = None
        self._pending.discard(job)
        if not self._pending:
            self._idle.set()

    def _caller_cancelled(self, job: _Job) -> None:
        if not job.future.cancelled():
            return
        if job.retry is not None:
            job.retry.cancel()
            job.retry = None
            self._settle(job)
        elif job.sending is not None:
            job.sending.cancel()
        # A queued job is dropped when a worker takes it.


def _cancelling() -> int:
    """The cancellations of the running task (a worker) not handled yet:
    none when what was cancelled is only the send it awaits."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


async def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel and wait, and cancel again: on Python 3.11 asyncio.wait_for,
    which aiosmtplib uses, can swallow a cancellation (CPython gh-86296)."""
    for _ in range(5):
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        _, tasks = await asyncio.wait(tasks, timeout=_CANCEL_GRACE)
    log.error("%d delivery tasks ignored cancellation", len(tasks))
