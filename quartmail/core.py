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
             ├─ message         Message -> Envelope (checked, flattened), with
             │   └─ attachments, mime    the two body writers
             ├─ signals         email_dispatched, email_failed
             └─ addresses, errors

    Beside them, for apps and their tests: testing, testing_threaded and
    pytest_plugin (the SMTP test server), dkim, unsubscribe.

:class:`MailCore` is one app's: the settings, the open ``record_messages()``
lists, the signal tasks it owns. Every path (``mail.send``, ``connect()``,
background delivery and the outbox) checks and flattens a message with
:meth:`MailCore.envelope`, takes its sessions from :meth:`MailCore.session`
(the reuse rule: connected, under ``MAIL_MAX_EMAILS``), starts every SMTP
transaction through :meth:`MailCore.transaction` (``MAIL_RATE_LIMIT``), decides what a failed
attempt means with :meth:`MailCore.after_failure` (retry or fail), logs a
failure for good with :meth:`MailCore.not_sent`, and signals through
:meth:`MailCore.dispatched` (awaited, in the sender's own task) or
:meth:`MailCore.signal` (in a task the core owns, so that a receiver that
never returns holds up its signal, not a worker or a dispatcher).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from typing import Any

from quart import Quart

from .errors import MailError, RecipientsRefusedError, Reply, SendError
from .message import Envelope, Message
from .ratelimit import RateLimiter
from .settings import MailSettings
from .signals import email_dispatched, email_failed, notify
from .smtp import SendResult, SMTPSession

__all__ = ["MailCore", "backoff", "next_attempt", "partly_refused", "timed_out"]

log = logging.getLogger("quartmail")

# The longest wait between two attempts at one message.
_MAX_RETRY_DELAY = 3600.0
# How long close() waits for signal receivers when the deadline has passed.
_SIGNAL_GRACE = 1.0


class MailCore:
    """One app's settings and rules, below every way of sending."""

    def __init__(self, app: Quart, settings: MailSettings) -> None:
        self.app = app
        self.settings = settings  # replaced when Flask-Mail code changes a setting
        self.recordings: list[list[Message]] = []  # open record_messages() blocks
        self._local_hostname: str | None = None
        self._signalling: set[asyncio.Task[None]] = set()
        #: MAIL_RATE_LIMIT's, in this process; Mail.init_outbox replaces it with
        #: one whose slots are in the outbox's database (quartmail.sharedlimit).
        self.limiter = RateLimiter(settings.rate_limit) if settings.rate_limit else None

    def __repr__(self) -> str:
        return f"<MailCore {self.app.name!r} {self.settings.smtp!r}>"

    # Messages

    def envelope(self, message: Message) -> Envelope:
        """Check *message*, fill in the default sender and the date, and flatten it."""
        if message.date is None:
            message.date = time.time()  # as Flask-Mail does when it sends
        envelope = message.envelope(
            self.settings.default_sender, ascii_attachments=self.settings.ascii_attachments
        )
        if message.sender is None:
            message.sender = self.settings.default_sender  # as Flask-Mail shows it
        signer = self.settings.dkim
        if signer is not None:
            # Signed once, here: retries and the outbox send these very bytes.
            # In the caller, on the loop: Ed25519 takes ~0.4 ms; RSA ~10 ms at
            # 2048 bits (docs/deliverability.md advises Ed25519 + RSA only if needed).
            signed = signer.sign(envelope.data)
            message._signed = (envelope.data, signed)  # for message.as_bytes()
            envelope = replace(envelope, data=signed)
        return envelope

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
        session.gate = self.transaction
        return session

    @contextlib.asynccontextmanager
    async def transaction(self, deadline: float) -> AsyncIterator[None]:
        """The gate every SMTP transaction of every path passes, just before
        its MAIL FROM (:attr:`SMTPSession.gate`): it waits for
        ``MAIL_RATE_LIMIT`` (a wait that counts toward the message's
        *deadline*, a loop time, not toward ``MAIL_TIMEOUT``) and holds the
        slot until the transaction ends. Raises :func:`timed_out`'s error,
        with nothing sent, when the deadline comes first."""
        limiter = self.limiter
        if limiter is None:
            yield
            return
        permit = await limiter.acquire(deadline)
        if permit is None:
            raise timed_out(self.settings.delivery_timeout, None)
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

    # Outcomes

    def after_failure(
        self, message_id: str, error: BaseException, attempts: int, time_left: float
    ) -> float | MailError:
        """The retry rule, for a message whose attempt number *attempts*
        failed with *error*, *time_left* seconds before its
        ``MAIL_DELIVERY_TIMEOUT``: the seconds until the next attempt (the
        retry is logged), or the error it fails with for good."""
        settings = self.settings
        delay = next_attempt(error, attempts, settings.retries, settings.retry_delay, time_left)
        if delay is not None:
            log.info(
                "Retrying %s in %.2f s (attempt %d of %d): %s",
                message_id,
                delay,
                attempts + 1,
                settings.retries + 1,
                error,
            )
            return delay
        if not isinstance(error, MailError):
            failure = MailError(f"unexpected error sending {message_id}")
            failure.__cause__ = error
            return failure
        if isinstance(error, SendError) and error.transient:
            if attempts <= settings.retries:  # out of time, not of retries
                return timed_out(settings.delivery_timeout, error)
            if settings.retries:
                error.add_note(f"gave up after {attempts} attempts (MAIL_RETRIES)")
        return error

    def not_sent(self, what: str, error: BaseException) -> None:
        """Log (ERROR) a message that failed for good: *what* names it (its Message-ID)."""
        log.error("Not sent: %s (SMTP code %s): %s", what, getattr(error, "code", None), error)

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
        refusal = partly_refused(result.message_id, result.refused) if result.refused else None
        self.signal(self._delivered(message, refusal))

    async def _delivered(self, message: Message, refusal: MailError | None) -> None:
        await notify(email_dispatched, message, app=self.app)
        if refusal is not None:
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
    delay = min(_MAX_RETRY_DELAY, first * 2.0 ** min(attempt - 1, 60))
    return delay * random.uniform(0.75, 1.25)


def next_attempt(
    error: BaseException, attempts: int, retries: int, first_delay: float, time_left: float
) -> float | None:
    """Seconds until the next attempt at a message whose attempt number
    *attempts* failed with *error*, or None when it has failed for good: a
    permanent error, ``MAIL_RETRIES`` used up, or a next attempt that would
    start after ``MAIL_DELIVERY_TIMEOUT`` (*time_left* seconds from now)."""
    if not (isinstance(error, SendError) and error.transient) or attempts > retries:
        return None
    delay = backoff(first_delay, attempts)
    return delay if delay < time_left else None


def timed_out(timeout: float, last: SendError | None) -> SendError:
    """The failure of a message past its ``MAIL_DELIVERY_TIMEOUT``, with the
    code and text of its last failed attempt, if any."""
    text = f"not delivered within MAIL_DELIVERY_TIMEOUT ({timeout:g} s)"
    error = SendError(
        text + (f"; last error: {last}" if last is not None else ""),
        code=last.code if last is not None else None,
        refused=last.refused if last is not None else None,
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
