"""A development inbox for any Quart app: ``MAIL_DEV_INBOX = True``.

With the setting on, :class:`~quartmail.Mail` starts an SMTP server on 127.0.0.1 with the
app (aiosmtpd, in the app's event loop), points ``MAIL_SERVER`` and ``MAIL_PORT`` at it (TLS
and AUTH off), and the app serves what it caught under ``MAIL_DEV_INBOX_PATH``
(``/dev/inbox`` by default): a list, each message with its HTML (sandboxed), text, source,
attachments and the warnings a sender should fix before production, and JSON for tests.

It needs the ``testing`` extra (``pip install 'quartmail[testing]'``), and runs only when the
app is in debug or testing mode, unless ``MAIL_DEV_INBOX = "force"``.
"""

from __future__ import annotations

from .._extras import missing_extra

try:
    from .checks import InboxWarning
    from .inbox import DevInbox
    from .mail import CaughtAttachment, CaughtMail
except ModuleNotFoundError as error:
    raise missing_extra(error, "testing", "The development inbox (MAIL_DEV_INBOX)") from None

__all__ = ["CaughtAttachment", "CaughtMail", "DevInbox", "InboxWarning"]
