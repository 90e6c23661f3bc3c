"""The core every path sends through: one app's settings, message checking,
SMTP sessions, and the outcome rules.

The layers of quartmail, from the top; a module imports only from the layers
below it, and nothing below calls back up (``tests/test_layers.py`` checks
that there is no import cycle and that nothing imports the app)::

    quartmail.app               the reference sign-up app; the library never imports it
     └─ extension               Mail, MailState, Connection: the Flask-Mail front (+ compat)
         ├─ dispatcher          the outbox's dispatcher: claims rows, sends them over delivery
         │   └─ delivery        background delivery: queue, pool of sessions, drain
         ├─ sharedlimit         MAIL_RATE_LIMIT's slots in the outbox's database
         ├─ outbox              the outbox table and its admin API (enqueue, status, retry, purge)
         └─ core                MailCore: this module
             ├─ settings        the checked MAIL_* settings
             ├─ ratelimit       MAIL_RATE_LIMIT: the slots every transaction takes
             ├─ smtp            one SMTP session (aiosmtplib)
             ├─ throttle        throttling replies, and the back-off gate before each transaction
             ├─ message         Message -> Envelope (checked, flattened), with
             │   ├─ attachments, mime    the two body writers
             │   └─ listunsubscribe      the List-Unsubscribe(-Post) values
             ├─ signals         email_dispatched, email_failed
             ├─ observer        MailObserver: hooks for metrics and traces (quartmail.metrics)
             └─ addresses, errors

    Beside them, for apps and their tests: testing, testing_threaded and
    pytest_plugin (the SMTP test server), dkim, unsubscribe, and metrics
    (a MailObserver, set by the extension when MAIL_METRICS or MAIL_TRACING is on).
    The suppression list (suppression) sits beside the outbox; the core reaches
    it through :class:`SuppressionCheck`.

:class:`MailCore` is one app's: the settings, the open ``record_messages()``
lists, the signal tasks it owns. Every path (``mail.send``, ``connect()``,
background delivery and the outbox) checks and flattens a message with
:meth:`MailCore.envelope`, DKIM-signs it once with :meth:`MailCore.sign`,
takes its sessions from :meth:`MailCore.session` (the reuse rule:
connected, under ``MAIL_MAX_EMAILS``), sends through
:meth:`MailCore.transaction` (the throttling back-off; each MAIL FROM passes
:meth:`MailCore.rate_limited`, ``MAIL_RATE_LIMIT``), decides what a failed
attempt means with :meth:`MailCore.after_failure` (retry or fail), logs a
failure for good with :meth:`MailCore.not_sent`, leaves suppressed
recipients out with :meth:`MailCore.leave_out` and adds bounced ones with
:meth:`MailCore.bounced`, and signals through
:meth:`MailCore.dispatched` (awaited, in the sender's own task) or
:meth:`MailCore.signal` (in a task the core owns, so that a receiver that
never returns holds up its signal, not a worker or a dispatcher).

Every path sends with :meth:`MailCore.transaction`, behind the back-off that
throttling replies start (:mod:`quartmail.throttle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from quart import Quart

from .errors import MailError, RecipientsRefusedError, Reply, SendError, SuppressedError
from .message import Envelope, Message
from .observer import MailObserver
from .ratelimit import RateLimiter
from .settings import MailSettings
from .signals import email_dispatched, email_failed, notify
from .smtp import SendResult, SMTPSession
from .throttle import Throttle, grown, refused_by_throttling, throttling

__all__ = [
    "MailCore",
    "SuppressionCheck",
    "backoff",
    "counted",
    "left_out",
    "next_attempt",
    "partly_refused",
    "stops",
    "timed_out",
]

log = logging.getLogger("quartmail")

# The longest wait between two attempts at one message.
_MAX_RETRY_DELAY = 3600.0
# How long close() waits for signal receivers when the deadline has passed.
_SIGNAL_GRACE = 1.0
# The gate without MAIL_RATE_LIMIT (nullcontext is reentrant: one serves every transaction).
_NO_LIMIT: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()


class SuppressionCheck(Protocol):
    """What the core asks of the suppression list (:mod:`quartmail.suppression`)."""

    async def check(
        self, recipients: Sequence[str], *, transactional: bool = False
    ) -> dict[str, str]: ...

    async def record_refusals(self, message_id: str, refused: Mapping[str, Reply]) -> list[str]: ...


def stops(reason: str, transactional: bool) -> bool:
    """Whether a suppression for *reason* keeps a message from a recipient:
    always, except an unsubscribe for a transactional message (a password
    reset must still arrive; a bounced address never gets anything)."""
    return not (transactional and reason == "unsubscribe")


class MailCore:
    """One app's settings and rules, below every way of sending."""

    def __init__(self, app: Quart, settings: MailSettings) -> None:
        self.app = app
        self.settings = settings  # replaced when Flask-Mail code changes a setting
        # Set by Mail.init_suppression (or init_outbox): background and outbox
        # sends leave its addresses out, and every path adds the bounced ones.
        self.suppression: SuppressionCheck | None = None
        self.recordings: list[list[Message]] = []  # open record_messages() blocks
        self._local_hostname: str | None = None
        self._signalling: set[asyncio.Task[None]] = set()
        #: The back-off after throttling replies, for every path of this app.
        self.throttle = Throttle(f"SMTP server {settings.smtp.address}")
        # Told about every send, retry and failure; quartmail.metrics sets one that records.
        self.observer = MailObserver()
        #: MAIL_RATE_LIMIT's, in this process; Mail.init_outbox replaces it with
        #: one whose slots are in the outbox's database (quartmail.sharedlimit).
        self.limiter = RateLimiter(settings.rate_limit) if settings.rate_limit else None

    def __repr__(self) -> str:
        return f"<MailCore {self.app.name!r} {self.settings.smtp!r}>"

    # Messages

    def envelope(self, message: Message) -> Envelope:
        """Check *message*, fill in the default sender and the date, and flatten it.

        With ``MAIL_DKIM_KEY`` the bytes are checked to be signable (so that
        the error comes here, in the caller) but not yet signed: a message
        that is sent is signed once by :meth:`sign`, off the event loop."""
        if message.date is None:
            message.date = time.time()  # as Flask-Mail does when it sends
        envelope = message.envelope(
            self.settings.default_sender, ascii_attachments=self.settings.ascii_attachments
        )
        if message.sender is None:
            message.sender = self.settings.default_sender  # as Flask-Mail shows it
        if self.settings.dkim is not None:
            self.settings.dkim.check(envelope.data)
        return envelope

    async def sign(self, message: Message | None, envelope: Envelope) -> Envelope:
        """*envelope* DKIM-signed (as it is without ``MAIL_DKIM_KEY``), and
        recorded on *message* (``as_bytes()`` returns the signed bytes).

        Called once per message, just before it is first sent or stored:
        retries and the outbox send these very bytes. RSA is signed in a
        worker thread (~10 ms a message at 2048 bits), Ed25519 inline (~0.4
        ms, less than a thread's round trip); see ``DKIMSigner.blocks``."""
        signer = self.settings.dkim
        if signer is None:
            return envelope
        signed = await signer.sign_async(envelope.data)
        if message is not None:
            message.set_signed(envelope.data, signed)
        return replace(envelope, data=signed)

    # Sessions

    async def open_session(self) -> SMTPSession:
        """Open one SMTP session with this app's settings."""
        smtp = self.settings.smtp
        if smtp.local_hostname is None:
            if self._local_hostname is None:
                # aiosmtplib would look the name up (in a thread) on every connect.
                self._local_hostname = await asyncio.to_thread(socket.getfqdn)
            smtp = replace(smtp, local_hostname=self._local_hostname)
        session = await SMTPSession.open(smtp)
        session.gate = self.rate_limited
        self.observer.session_opened()
        return session

    def rate_limited(self, deadline: float) -> contextlib.AbstractAsyncContextManager[None]:
        """The gate every SMTP transaction of every path passes, just before
        its MAIL FROM (:attr:`SMTPSession.gate`): it waits for
        ``MAIL_RATE_LIMIT`` (a wait that counts toward the message's
        *deadline*, a loop time, not toward ``MAIL_TIMEOUT``) and holds the
        slot until the transaction ends. Raises :func:`timed_out`'s error,
        with nothing sent, when the deadline comes first."""
        limiter = self.limiter
        if limiter is None:
            return _NO_LIMIT  # (not a generator-based context per transaction)
        return self._permit(limiter, deadline)

    @contextlib.asynccontextmanager
    async def _permit(self, limiter: RateLimiter, deadline: float) -> AsyncIterator[None]:
        permit = await limiter.acquire(deadline)
        if permit is None:  # nothing was sent: the caller words it with its last error
            raise timed_out(self.settings.delivery_timeout, None, NotAttemptedError)
        try:
            yield
        finally:
            permit.release()

    def reusable(self, session: SMTPSession) -> bool:
        """Whether *session* may take another message: still connected (a
        session spent by a failure or a cancellation closes itself) and under
        ``MAIL_MAX_EMAILS``."""
        max_emails = self.settings.max_emails
        return session.is_connected and (max_emails is None or session.sent < max_emails)

    async def session(self, current: SMTPSession | None) -> SMTPSession:
        """*current* when it is :meth:`reusable`; otherwise it is closed and a
        new session opened (which raises :class:`~quartmail.SendError`)."""
        if current is not None:
            if self.reusable(current):
                return current
            await current.close()
        return await self.open_session()

    async def transaction(
        self,
        session: SMTPSession,
        envelope: Envelope,
        deadline: float,
        *,
        back_off_deadline: float | None = None,
    ) -> SendResult:
        """Send *envelope* on *session* (every path sends through here):
        first wait for the throttling back-off, if one runs, then send, seen
        by the :attr:`observer`, and tell the back-off how it went.

        *deadline* (a loop time: the message's ``MAIL_DELIVERY_TIMEOUT``)
        bounds every wait, *back_off_deadline* the wait for the back-off
        sooner: when the back-off would end later,
        :class:`~quartmail.SendError` (transient, with the server's
        throttling reply) is raised at once. Each MAIL FROM then waits for
        ``MAIL_RATE_LIMIT`` (:meth:`rate_limited`) until *deadline*.
        """
        patience = deadline if back_off_deadline is None else min(deadline, back_off_deadline)
        ticket = await self.throttle.wait(patience)  # the gate before MAIL FROM
        try:
            with self.observer.sending(envelope, session.settings):
                result = await session.send(envelope, deadline)
        except SendError as error:
            reply = throttling(error)
            if reply is not None:
                self._throttled(ticket, reply, error)
            raise
        reply = refused_by_throttling(result.refused)
        if reply is not None:  # taken for the others (see quartmail.throttle)
            refusal = RecipientsRefusedError(reply[1], code=reply[0], refused=result.refused)
            self._throttled(ticket, reply, refusal)
        else:
            self.throttle.passed(ticket)
        return result

    def _throttled(self, ticket: int, reply: Reply, error: SendError) -> None:
        """The transaction of *ticket* got the throttling *reply*: back off, and count it."""
        self.throttle.throttled(ticket, reply, self.settings.retry_delay)
        self.observer.throttled(error)

    # Outcomes

    def after_failure(
        self, message_id: str, error: BaseException, attempts: int, time_left: float
    ) -> float | MailError:
        """The retry rule, for a message whose attempt number *attempts*
        failed with *error*, *time_left* seconds before its
        ``MAIL_DELIVERY_TIMEOUT``: the seconds until the next attempt (the
        retry is logged), or the error it fails with for good.

        A throttled attempt (which :func:`counted` does not count) is tried
        again when the throttling back-off ends, whatever *attempts* says."""
        settings = self.settings
        throttled = throttling(error) is not None
        delay = next_attempt(
            error,
            attempts,
            settings.retries,
            settings.retry_delay,
            time_left,
            throttled_for=self.throttle.remaining() if throttled else None,
        )
        if delay is not None and throttled:
            # Logged once for the episode by the throttle, not for each message.
            log.debug("Throttled: retrying %s in %.2f s: %s", message_id, delay, error)
            return delay
        if delay is not None:
            log.info(
                "Retrying %s in %.2f s (attempt %d of %d): %s",
                message_id,
                delay,
                attempts + 1,
                settings.retries + 1,
                error,
            )
            self.observer.retried(error)
            return delay
        if not isinstance(error, MailError):
            failure = MailError(f"unexpected error sending {message_id}")
            failure.__cause__ = error
            return failure
        if isinstance(error, SendError) and error.transient:
            if attempts <= settings.retries or throttled:  # out of time, not of retries
                return timed_out(settings.delivery_timeout, error)
            if settings.retries:
                error.add_note(f"gave up after {attempts} attempts (MAIL_RETRIES)")
        return error

    def not_sent(self, what: str, error: BaseException) -> None:
        """Log (ERROR) a message that failed for good: *what* names it (its
        Message-ID); its refused recipients that bounced are suppressed."""
        self.observer.failed(error)
        log.error("Not sent: %s (SMTP code %s): %s", what, getattr(error, "code", None), error)
        if isinstance(error, SendError):
            self.bounced(what, error.refused)

    # The suppression list

    async def leave_out(
        self, envelopes: Sequence[Envelope]
    ) -> list[tuple[Envelope, dict[str, str]]]:
        """Each envelope without its suppressed recipients, and those left
        out with their reasons: one query for them all. Without a list,
        or when it cannot be read (logged), every recipient stays: a mail
        sent to a suppressed address is better than one lost."""
        suppression = self.suppression
        if suppression is None or not envelopes:
            return [(envelope, {}) for envelope in envelopes]
        try:
            reasons = await suppression.check(
                [address for envelope in envelopes for address in envelope.recipients]
            )
        except Exception:
            log.exception("Could not read the suppression list; sending to every recipient")
            return [(envelope, {}) for envelope in envelopes]
        checked: list[tuple[Envelope, dict[str, str]]] = []
        for envelope in envelopes:
            suppressed = {
                address: reasons[address]
                for address in envelope.recipients
                if address in reasons and stops(reasons[address], envelope.transactional)
            }
            checked.append((envelope.without(suppressed) if suppressed else envelope, suppressed))
        return checked

    def bounced(self, message_id: str, refused: Mapping[str, Reply]) -> None:
        """Add the recipients of *refused* whose reply means that the mailbox
        does not exist to the suppression list, in a task of the core's."""
        if self.suppression is not None and refused:
            self.signal(self._record_bounces(self.suppression, message_id, dict(refused)))

    async def _record_bounces(
        self, suppression: SuppressionCheck, message_id: str, refused: dict[str, Reply]
    ) -> None:
        try:
            await suppression.record_refusals(message_id, refused)
        except Exception:
            log.exception(
                "Could not add the bounced recipients of %s to the suppression list", message_id
            )

    # Recording and signals

    def record(self, message: Message) -> None:
        """Add an accepted (or suppressed) message to every open record_messages() list."""
        for recording in self.recordings:
            recording.append(message)

    async def dispatched(self, message: Message) -> None:
        """A message was accepted (or suppressed) in the sender's own task:
        record it and signal it, awaiting the receivers (as Flask-Mail does)."""
        self.record(message)
        await notify(email_dispatched, message, app=self.app)

    def delivered(self, message: Message, result: SendResult) -> None:
        """A message was accepted (or suppressed) in the background: record
        it, and signal it (and its refused recipients, if any) in a task of
        the core's."""
        self.record(message)
        refusals: list[MailError] = []
        if result.refused:
            refusals.append(partly_refused(result.message_id, result.refused))
            self.bounced(result.message_id, result.refused)
        if result.suppressed:
            refusals.append(left_out(result.message_id, result.suppressed, sent=True))
        if email_dispatched.receivers or (refusals and email_failed.receivers):
            # (No task for no receiver: most apps connect none, and it is per message.)
            self.signal(self._delivered(message, refusals))

    async def _delivered(self, message: Message, refusals: list[MailError]) -> None:
        await notify(email_dispatched, message, app=self.app)
        for refusal in refusals:
            await notify(email_failed, message, app=self.app, error=refusal)

    def failed(self, message: Message, error: MailError) -> None:
        """Signal ``email_failed`` about *message* in a task of the core's."""
        if email_failed.receivers:
            self.signal(notify(email_failed, message, app=self.app, error=error))

    def signal(self, signals: Coroutine[Any, Any, None]) -> None:
        """Run *signals* in a task of its own, held until it ends: a
        receiver that never returns holds up its signals, not the worker or
        dispatcher that sends them. :meth:`close` waits for them, bounded.

        Started before the message's future is resolved, so plain receivers
        (and async ones that do not wait) have run when its caller wakes."""
        task = asyncio.create_task(signals)
        self._signalling.add(task)
        task.add_done_callback(self._signalling.discard)

    async def close(self, deadline: float) -> None:
        """Wait for the signal tasks until *deadline* (a loop time; at least
        a moment, even past it), then cancel what still runs."""
        if self.limiter is not None:
            await self.limiter.close()
        if not self._signalling:
            return
        wait = max(deadline - asyncio.get_running_loop().time(), _SIGNAL_GRACE)
        _, hung = await asyncio.wait(set(self._signalling), timeout=wait)
        for task in hung:
            task.cancel()
        if hung:
            await asyncio.wait(hung)
            log.error("%d signal receivers still running at shutdown were cancelled", len(hung))


def backoff(first: float, attempt: int) -> float:
    """Seconds to wait before retry number *attempt* (1, 2, ...): *first*
    doubled each time, at most an hour, with jitter so that retries do not
    come back in a herd."""
    return grown(first, attempt, _MAX_RETRY_DELAY)


def counted(error: BaseException) -> int:
    """How many of ``MAIL_RETRIES`` a failed attempt spends: none when the
    server throttled it (a fact about the sender, not the message), else one."""
    return 0 if throttling(error) is not None else 1


def next_attempt(
    error: BaseException,
    attempts: int,
    retries: int,
    first_delay: float,
    time_left: float,
    *,
    throttled_for: float | None = None,
) -> float | None:
    """Seconds until the next attempt at a message whose attempt number
    *attempts* failed with *error*, or None when it has failed for good: a
    permanent error, ``MAIL_RETRIES`` used up, or a next attempt that would
    start after ``MAIL_DELIVERY_TIMEOUT`` (*time_left* seconds from now).

    A throttled attempt (*throttled_for*: the seconds the throttling
    back-off has left) is tried again when the back-off ends, retries or not."""
    if throttled_for is not None:
        delay = throttled_for
    elif not (isinstance(error, SendError) and error.transient) or attempts > retries:
        return None
    else:
        delay = backoff(first_delay, attempts)
    return delay if delay < time_left else None


class NotAttemptedError(SendError):
    """A message's deadline passed before it reached the server (it waited in a
    queue, for a connection or for ``MAIL_RATE_LIMIT``): no attempt was made. Its
    code and text are those of the message's last error, as :func:`timed_out`
    words them, when its caller knows it."""


def timed_out(
    timeout: float, last: SendError | None, kind: type[SendError] = SendError
) -> SendError:
    """The failure of a message past its ``MAIL_DELIVERY_TIMEOUT``, with the
    code and text of its last failed attempt, if any; a *kind* of
    :class:`~quartmail.SendError` (:class:`NotAttemptedError`: it never reached
    the server)."""
    text = f"not delivered within MAIL_DELIVERY_TIMEOUT ({timeout:g} s)"
    error = kind(
        text + (f"; last error: {last}" if last is not None else ""),
        code=last.code if last is not None else None,
        refused=last.refused if last is not None else None,
        reply=last.reply if last is not None else None,
    )
    error.__cause__ = last
    return error


def partly_refused(message_id: str, refused: dict[str, Reply]) -> RecipientsRefusedError:
    """Log (WARNING) the recipients refused by a server that took the
    message for the others, and return the error to signal with ``email_failed``."""
    replies = "; ".join(f"{address}: {code} {text}" for address, (code, text) in refused.items())
    log.warning("Refused for some recipients: %s: %s", message_id, replies)
    return RecipientsRefusedError(
        f"{message_id} was delivered, but these recipients were refused: {replies}",
        code=list(refused.values())[-1][0],
        refused=refused,
    )


def left_out(message_id: str, suppressed: dict[str, str], *, sent: bool) -> SuppressedError:
    """Log (WARNING) the recipients of *message_id* left out because they
    are suppressed, and return the error to signal with ``email_failed``
    (and, when it was not *sent* to anyone, to fail the message with)."""
    addresses = ", ".join(f"{address} ({reason})" for address, reason in suppressed.items())
    if sent:
        text = f"{message_id} was not sent to these suppressed recipients: {addresses}"
    else:
        text = f"{message_id} was not sent: every recipient is suppressed: {addresses}"
    log.warning("%s", text)
    return SuppressedError(text, suppressed=suppressed)
