"""quartmail: Flask-Mail's API for Quart, async over aiosmtplib.

::

    from quartmail import Mail, Message

    mail = Mail(app)
    await mail.send(Message("Hello", sender="me@example.com", recipients=["you@example.com"],
                            body="text", html="<b>HTML</b>"))

The modules are layered, each importing only from those below it; the
layers are drawn in :mod:`quartmail.core`.
"""

from __future__ import annotations

from .errors import (
    AuthenticationError,
    BadHeaderError,
    ConfigError,
    ConnectError,
    MailError,
    MessageError,
    RecipientsRefusedError,
    SchemaError,
    SendError,
    SendTimeoutError,
    SuppressedError,
)
from .extension import Connection, Mail, SendResult
from .message import Attachment, Message
from .signals import email_dispatched, email_failed

__all__ = [
    "Attachment",
    "AuthenticationError",
    "BadHeaderError",
    "ConfigError",
    "ConnectError",
    "Connection",
    "Mail",
    "MailError",
    "Message",
    "MessageError",
    "RecipientsRefusedError",
    "SchemaError",
    "SendError",
    "SendResult",
    "SendTimeoutError",
    "SuppressedError",
    "email_dispatched",
    "email_failed",
]
