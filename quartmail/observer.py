"""What the core tells an observer about its work: the seam for metrics and traces.

:class:`MailObserver` does nothing; it is every app's observer unless
``MAIL_METRICS`` or ``MAIL_TRACING`` is on, when :mod:`quartmail.metrics`
(Prometheus and OpenTelemetry) gives one that records. The core, background
delivery and the dispatcher call it and import neither library.

Each hook is called on the event loop and must return at once: no I/O, no
blocking. The outbox's counts, which need a query, are given to the
observer by the dispatcher, every :attr:`MailObserver.outbox_interval`
seconds, in its own task.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .message import Envelope
    from .smtp import SMTPSettings

__all__ = ["MailObserver"]


class MailObserver:
    """Hooks on the outcomes of sending; this base class ignores them all."""

    #: Seconds between two reports of the outbox's counts, or None for none.
    outbox_interval: float | None = None

    def sending(self, envelope: Envelope, smtp: SMTPSettings) -> AbstractContextManager[None]:
        """Wraps one SMTP transaction (one attempt at *envelope*): it ends
        normally when the server took the message, with the error otherwise."""
        return nullcontext()

    def session_opened(self) -> None:
        """An SMTP session was opened (connected, TLS and AUTH done)."""

    def retried(self, error: BaseException) -> None:
        """An attempt failed with *error*, and the message will be tried again."""

    def failed(self, error: BaseException) -> None:
        """A message failed for good with *error* (raised to its sender, or
        logged and signalled)."""

    def throttled(self, error: BaseException) -> None:
        """The server asked us to slow down (*error* is its reply) and sending backs off."""

    def outbox_status(self, counts: Mapping[str, int], oldest_due_age: float | None) -> None:
        """The outbox's rows by state, and how many seconds the oldest row
        due for sending has waited past its due time (None: none is due)."""
