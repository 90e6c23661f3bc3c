"""Signals, as in Flask-Mail, in a blinker namespace of our own.

Both are sent as Flask-Mail 0.10 (and Flask, and Quart) send signals: the
Quart app is the sender and the :class:`~quartmail.Message` the keyword
``message``; ``email_failed`` also passes ``error=`` the
:class:`~quartmail.MailError`. Receivers may be plain functions or
``async def``, so one written for Flask-Mail works unchanged::

    @email_dispatched.connect
    async def log_sent(app, message, **extra):
        app.logger.info("sent %s", message.msg_id)
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

from blinker import Namespace, Signal

__all__ = ["email_dispatched", "email_failed", "notify"]

log = logging.getLogger("quartmail")

_signals = Namespace()

email_dispatched = _signals.signal(
    "email-dispatched",
    doc="A message was accepted by the server (or recorded, when sending is suppressed).",
)
email_failed = _signals.signal(
    "email-failed",
    doc="A message failed for good; ``error`` is the MailError.",
)


async def notify(signal: Signal, message: object, *, app: Any, **kwargs: Any) -> None:
    """Send *signal* about *message* to each receiver, sync or async, in
    order, as ``receiver(app, message=message, **kwargs)``: the app is the
    sender, as in Flask-Mail 0.10.

    Receivers run in the order they were connected (blinker yields them
    from a set, in an order that changes from run to run).

    A receiver that raises is logged and the others still run: by the time
    these signals fire the message's fate is settled, and a broken receiver
    must not turn a delivered mail into an error the caller would retry,
    nor stop the worker or dispatcher that sends the signal. (blinker's
    ``send_async`` would stop at the first exception.)
    """
    for receiver in _in_connection_order(signal, app):
        try:
            result = receiver(app, message=message, **kwargs)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("receiver %r of %r raised", receiver, signal)
        except asyncio.CancelledError:
            # Ours to obey only when this task is being cancelled; a receiver
            # that awaited something cancelled is just a broken receiver.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            log.exception("receiver %r of %r was cancelled", receiver, signal)


def _in_connection_order(signal: Signal, sender: Any) -> list[Callable[..., Any]]:
    receivers = list(signal.receivers_for(sender))
    # signal.receivers is a dict, in connection order; weakly held receivers
    # (a bound method gives an equal, not the same, object) are compared by ==.
    connected = [r() if isinstance(r, weakref.ref) else r for r in signal.receivers.values()]

    def position(receiver: Callable[..., Any]) -> int:
        return next((n for n, other in enumerate(connected) if other == receiver), len(connected))

    return sorted(receivers, key=position)
