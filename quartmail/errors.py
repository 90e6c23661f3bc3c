"""The errors quartmail raises.

Every error is a :class:`MailError`; the ones that describe bad input also
subclass :class:`ValueError`, and the ones that describe the network also
subclass the matching builtin, so callers can catch either::

    MailError
     ├── ConfigError (ValueError)           a MAIL_* setting is wrong; raised by init_app
     ├── MessageError (ValueError)          the message cannot be sent as it is
     │    └── BadHeaderError                CR or LF in a header: header injection
     ├── SchemaError                        the database's tables are behind the code
     ├── SuppressedError                    recipients left out: on the suppression list
     └── SendError                          the server or the network failed
          ├── ConnectError (ConnectionError)   connect, TLS or the connection itself failed
          ├── SendTimeoutError (TimeoutError)  the server did not answer within MAIL_TIMEOUT
          ├── AuthenticationError              the login failed (password or MAIL_OAUTH2_TOKEN)
          └── RecipientsRefusedError           every recipient was refused

A :class:`SendError` keeps the SMTP reply code (``None`` when there was no
reply, or a reply that was not SMTP) and the refused recipients, and wraps the
aiosmtplib or OS error as its ``__cause__``. Neither its text nor anything
chained to it contains the password: where a server quotes the AUTH line in
its reply, the chained error is a copy with the password masked.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BadHeaderError",
    "ConfigError",
    "ConnectError",
    "MailError",
    "MessageError",
    "RecipientsRefusedError",
    "SchemaError",
    "SendError",
    "SendTimeoutError",
    "SuppressedError",
]

#: A refused recipient's SMTP reply: ``(code, text)``.
Reply = tuple[int, str]


class MailError(Exception):
    """Base class of every error quartmail raises."""


class ConfigError(MailError, ValueError):
    """A ``MAIL_*`` setting is invalid; the message names it."""


class MessageError(MailError, ValueError):
    """The message cannot be sent: no sender, no recipients, a bad address."""


class BadHeaderError(MessageError):
    """A header value contains CR or LF (header injection); nothing was sent."""


class SuppressedError(MailError):
    """Recipients were left out because they are on the suppression list
    (:mod:`quartmail.suppression`); ``suppressed`` maps each to its reason.

    Raised from a background message's future, and recorded for an outbox
    row, when no recipient was left (nothing was sent); sent with
    ``email_failed`` beside ``email_dispatched`` when the others got it.
    """

    def __init__(self, message: str, *, suppressed: dict[str, str]) -> None:
        super().__init__(message)
        self.suppressed = dict(suppressed)


class SchemaError(MailError):
    """The database's tables are not what the code needs (a migration has not
    run); the message says what to run."""


class SendError(MailError):
    """Sending failed. ``code`` is the SMTP reply code, or ``None`` when the
    server sent none (a lost connection, a timeout, a reply that is not SMTP).

    ``refused`` maps each refused recipient to its ``(code, text)`` reply.
    ``reply`` is the text of the server's reply with ``code``, when there was
    one (``"4.7.0 Throttling failure: ..."``), for the rules that read it.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        refused: dict[str, Reply] | None = None,
        reply: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.refused: dict[str, Reply] = dict(refused or {})
        self.reply = reply

    @property
    def transient(self) -> bool:
        """True when trying again later may succeed (a 4xx reply, a dropped
        connection or a timeout); False for a permanent (5xx) refusal."""
        if self.code is None:
            return isinstance(self, ConnectError | SendTimeoutError)
        return 400 <= self.code < 500


class ConnectError(SendError, ConnectionError):
    """Connecting, the TLS handshake or the connection itself failed."""


class SendTimeoutError(SendError, TimeoutError):
    """The server did not answer within ``MAIL_TIMEOUT`` seconds."""


class AuthenticationError(SendError):
    """The server refused the credentials (``MAIL_USERNAME`` with ``MAIL_PASSWORD``
    or ``MAIL_OAUTH2_TOKEN``), or ``MAIL_OAUTH2_TOKEN`` gave no usable token."""


class RecipientsRefusedError(SendError):
    """The server refused every recipient; nothing was delivered. ``code``
    is the last refusal's, ``refused`` has each one.

    In background delivery and the outbox, a message the server took for
    some recipients is delivered, and this error, with the refused ones,
    is logged and sent with ``email_failed``.

    It is transient only when every refusal was a 4xx reply.
    """

    @property
    def transient(self) -> bool:
        return bool(self.refused) and all(400 <= code < 500 for code, _ in self.refused.values())
