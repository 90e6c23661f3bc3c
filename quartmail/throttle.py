"""Throttling: a server's "slow down" as a back-off for every way of sending.

**The rule** (:func:`throttling`, the one place it is written). A reply to
MAIL, RCPT or DATA throttles the sender when it is

- a ``421`` (RFC 5321 3.8: the server is closing the channel; Gmail's
  ``421 4.7.0 Try again later``),
- a ``454`` (Amazon SES's ``454 4.7.0 Throttling failure: Maximum sending
  rate exceeded.``), or
- any other ``4xx`` whose enhanced status code (RFC 3463 3.8) is ``4.7.x``,
  a security or policy status (Gmail's ``451 4.7.1``).

A transaction whose every recipient was refused so is throttled. One refused
so for only some recipients was taken by the server for the others: the
message is delivered (a resend would reach those again) and the refusals are
reported, but it is a throttling reply all the same: providers cap
recipients per period, so the recipients past the cap are refused, and the
next transaction would meet the same cap. The sender backs off.

**The gate** (:class:`Throttle`, one per app, so one per app process).
Throttling is a fact about the sender, not the message: after a throttling
reply no new transaction starts, on any path, until a back-off has passed.
The back-off starts at ``MAIL_RETRY_DELAY``, doubles with each throttling
reply to a transaction started after the last back-off (replies to
transactions already under way when it grew do not grow it again), with
jitter so that the processes sharing a sender do not come back in step, and
is at most :data:`MAX_BACKOFF`. The first transaction that succeeds after it
ends the episode. An episode is logged once when it begins (WARNING, with the
server's reply) and once when it ends (INFO).

A message throttled is retried when the back-off ends and does not spend one
of its ``MAIL_RETRIES``; only ``MAIL_DELIVERY_TIMEOUT`` ends it (the core's
retry rule, :meth:`quartmail.core.MailCore.after_failure`). ``mail.send`` and
``connect()``, which do not retry, wait for a back-off at most ``MAIL_TIMEOUT``
(what their caller already waits for a command); one that lasts longer fails
them at once with the throttling reply, a transient :class:`SendError`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re

from .errors import AuthenticationError, ConnectError, RecipientsRefusedError, Reply, SendError

__all__ = [
    "MAX_BACKOFF",
    "Throttle",
    "grown",
    "refused_by_throttling",
    "throttling",
    "throttling_reply",
]

log = logging.getLogger("quartmail.throttle")

#: The longest back-off after throttling, in seconds: Postfix's
#: ``minimal_backoff_time``; Gmail's "try again later" asks for minutes.
MAX_BACKOFF = 300.0

# RFC 3463 2: class "." subject "." detail, 1-3 digits each, at the start of the text.
_POLICY_STATUS = re.compile(r"4\.7\.\d{1,3}(?!\d)")


def throttling_reply(code: int | None, text: str | None) -> bool:
    """Whether the reply *code* *text* to MAIL, RCPT or DATA throttles the sender."""
    if code is None or not 400 <= code < 500:
        return False
    return code in (421, 454) or _POLICY_STATUS.match((text or "").lstrip()) is not None


def throttling(error: BaseException) -> Reply | None:
    """The throttling reply that ended a transaction with *error*, or None
    when *error* is no throttling (see the module's rule)."""
    if not isinstance(error, SendError) or isinstance(error, ConnectError | AuthenticationError):
        # Not a reply to MAIL, RCPT or DATA: a 421 greeting is a connection
        # limit (the pool's own back-off), a 454 to AUTH a login failure.
        return None
    if isinstance(error, RecipientsRefusedError):
        return refused_by_throttling(error.refused, every=True)
    if error.code is not None and throttling_reply(error.code, error.reply):
        return (error.code, error.reply or "")
    return None


def refused_by_throttling(refused: dict[str, Reply], *, every: bool = False) -> Reply | None:
    """A throttling reply among the *refused* recipients' (all of them must
    be, with *every*), or None."""
    replies = [reply for reply in refused.values() if throttling_reply(*reply)]
    if not replies or (every and len(replies) < len(refused)):
        return None
    return replies[-1]


def grown(first: float, step: int, ceiling: float) -> float:
    """*first* doubled for each *step* after the first, at most *ceiling*,
    with jitter (x0.75 to x1.25) so that those who wait do not come back in a herd."""
    delay = min(ceiling, first * 2.0 ** min(step - 1, 60))
    return delay * random.uniform(0.75, 1.25)


class Throttle:
    """The back-off gate of one app; the core owns it (``core.throttle``).

    Each transaction passes :meth:`wait` first and reports its outcome with
    the ticket it got: :meth:`throttled` or :meth:`passed`.
    """

    def __init__(self, name: str = "the SMTP server") -> None:
        self.name = name  # for the log: the server's address
        self._level = 0  # throttling replies in this episode; 0: none
        self._until = -math.inf  # loop time at which the back-off ends
        self._ticket = 0  # bumped each time the back-off grows
        self._began = 0.0  # loop time at which the episode began
        self._last: Reply | None = None

    def __repr__(self) -> str:
        state = f"backing off, {self.remaining():.1f} s left" if self.backing_off else "open"
        return f"<Throttle {self.name} {state}>"

    @property
    def backing_off(self) -> bool:
        """True while the back-off after a throttling reply runs."""
        return self.remaining() > 0

    def remaining(self) -> float:
        """Seconds until the back-off ends (0 when there is none)."""
        return max(0.0, self._until - asyncio.get_running_loop().time())

    async def wait(self, deadline: float) -> int:
        """Wait until no back-off runs, and return the ticket to report the
        transaction's outcome with.

        Raises a transient :class:`~quartmail.errors.SendError` with the
        server's throttling reply, at once, when the back-off would end after
        *deadline* (a loop time): the caller's message would not be sent in time.
        """
        loop = asyncio.get_running_loop()
        while (now := loop.time()) < self._until:
            if self._until >= deadline:
                raise self._too_late(self._until - now)
            # The back-off may grow meanwhile: look again when this one ends.
            await asyncio.sleep(self._until - now)
        return self._ticket

    def throttled(self, ticket: int, reply: Reply, first_delay: float) -> None:
        """A transaction that passed :meth:`wait` with *ticket* got the
        throttling *reply*: back off (longer, if it already did)."""
        if ticket != self._ticket:
            return  # under way before the back-off last grew: answered already
        loop = asyncio.get_running_loop()
        self._level += 1
        self._ticket += 1
        self._last = reply
        delay = grown(first_delay, self._level, MAX_BACKOFF)
        self._until = loop.time() + delay
        code, text = reply
        if self._level == 1:
            self._began = loop.time()
            log.warning(
                "%s throttles this sender (%d %s): no new transaction for %.2f s, "
                "longer while it lasts; throttled messages are retried",
                self.name,
                code,
                text,
                delay,
            )
        else:
            log.debug(
                "%s still throttles (%d %s): backing off %.2f s", self.name, code, text, delay
            )

    def passed(self, ticket: int) -> None:
        """A transaction that passed :meth:`wait` with *ticket* succeeded: an
        episode it was part of is over."""
        if self._level == 0 or ticket != self._ticket:
            return  # no episode, or under way before its latest back-off
        took = asyncio.get_running_loop().time() - self._began
        log.info("%s no longer throttles this sender (after %.1f s)", self.name, took)
        self._level = 0
        self._until = -math.inf

    def _too_late(self, left: float) -> SendError:
        code, text = self._last or (421, "")
        return SendError(
            f"{self.name} throttles this sender ({code} {text}); the back-off ends in "
            f"{left:.1f} s, after this message's deadline",
            code=code,
            reply=text,
        )
