"""The Quart extension: :class:`Mail` and :class:`Connection`.

``Mail`` ties an app's ``MAIL_*`` settings to message checking
(:mod:`quartmail.message`) and SMTP sessions (:mod:`quartmail.smtp`), and
sends the signals. Its API is Flask-Mail's, with ``await``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

from quart import Quart, current_app, has_app_context

from .errors import ConnectError, Reply, SendError, SendTimeoutError
from .message import Envelope, Message
from .settings import MailSettings
from .signals import email_dispatched, notify
from .smtp import SMTPSession, SMTPSettings

__all__ = ["Connection", "Mail", "MailState", "SendResult"]


@dataclass(frozen=True, slots=True)
class SendResult:
    """What the server said about one message.

    ``refused`` maps each refused recipient to its ``(code, text)``; the
    message went to every other recipient. It is empty when all were taken
    (and when sending is suppressed).
    """

    message_id: str
    refused: dict[str, Reply] = field(default_factory=dict)


class MailState:
    """One app's mail state, kept in ``app.extensions["mail"]``."""

    def __init__(self, app: Quart, settings: MailSettings) -> None:
        self.app = app
        self.settings = settings
        self._smtp: SMTPSettings = settings.smtp

    def envelope(self, message: Message) -> Envelope:
        """Check *message*, fill in the default sender, and flatten it."""
        envelope = message.envelope(
            self.settings.default_sender, ascii_attachments=self.settings.ascii_attachments
        )
        if message.sender is None:
            message.sender = self.settings.default_sender  # as Flask-Mail shows it
        return envelope

    async def open_session(self) -> SMTPSession:
        """Open one SMTP session with this app's settings."""
        if self._smtp.local_hostname is None:
            # aiosmtplib would look the name up (in a thread) on every connect.
            fqdn = await asyncio.to_thread(socket.getfqdn)
            self._smtp = replace(self._smtp, local_hostname=fqdn)
        return await SMTPSession.open(self._smtp)

    async def dispatched(self, message: Message) -> None:
        await notify(email_dispatched, message, app=self.app)


class Mail:
    """Flask-Mail's ``Mail`` for Quart.

    Direct use::

        mail = Mail(app)

    or with an app factory::

        mail = Mail()

        def create_app():
            app = Quart(__name__)
            mail.init_app(app)
            return app

    Then, in an app context, ``await mail.send(message)``.
    """

    def __init__(self, app: Quart | None = None) -> None:
        self.app = app
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Quart) -> None:
        """Read and check the app's ``MAIL_*`` settings.

        Raises :class:`~quartmail.errors.ConfigError` naming the setting
        when one is wrong.
        """
        settings = MailSettings.from_config(app.config, testing=app.testing, debug=app.debug)
        app.extensions["mail"] = MailState(app, settings)

    @property
    def state(self) -> MailState:
        """The state of the current app (or of the app given to ``Mail(app)``)."""
        app = current_app if has_app_context() else self.app
        if app is None:
            raise RuntimeError(
                "No app: use Mail inside an app context (async with app.app_context())"
            )
        try:
            state: MailState = app.extensions["mail"]
        except KeyError:
            raise RuntimeError("Mail.init_app(app) was not called for this app") from None
        return state

    async def send(self, message: Message) -> SendResult:
        """Send *message* over a new SMTP session and return what the server said.

        Raises :class:`~quartmail.errors.MessageError` (no sender, no
        recipients, a bad address) or :class:`~quartmail.errors.BadHeaderError`
        before connecting, and a :class:`~quartmail.errors.SendError` when the
        server or the network fails, or refuses every recipient.
        """
        async with self.connect() as connection:
            return await connection.send(message)

    async def send_message(self, *args: Any, **kwargs: Any) -> SendResult:
        """Build a :class:`~quartmail.Message` from the arguments and send it."""
        return await self.send(Message(*args, **kwargs))

    def connect(self) -> Connection:
        """One SMTP session for many messages::

            async with mail.connect() as conn:
                for message in messages:
                    await conn.send(message)

        It connects at the first send, and reconnects after
        ``MAIL_MAX_EMAILS`` messages when that is set.
        """
        return Connection(self.state)

    @contextmanager
    def record_messages(self) -> Iterator[list[Message]]:
        """Collect every message this app sends (or would send, when
        ``MAIL_SUPPRESS_SEND`` is on) while the block runs::

            with mail.record_messages() as outbox:
                await mail.send_message("Hi", recipients=["a@x.org"])
            assert outbox[0].subject == "Hi"
        """
        app = self.state.app
        outbox: list[Message] = []

        def record(message: Message, **kwargs: Any) -> None:
            if kwargs.get("app") is app:
                outbox.append(message)

        email_dispatched.connect(record, weak=False)
        try:
            yield outbox
        finally:
            email_dispatched.disconnect(record)


class Connection:
    """One SMTP session used for many messages; made by :meth:`Mail.connect`.

    Not safe to share between tasks that send at the same time: give each
    task its own (background delivery keeps a pool of them).
    """

    def __init__(self, state: MailState) -> None:
        self._state = state
        self._session: SMTPSession | None = None

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def send(self, message: Message, envelope_from: str | None = None) -> SendResult:
        """Send *message* on this connection; see :meth:`Mail.send`.

        ``envelope_from`` overrides the envelope sender (``MAIL FROM``), as in
        Flask-Mail.
        """
        envelope = self._state.envelope(message)
        if envelope_from is not None:
            envelope = replace(envelope, sender=envelope_from)
        if self._state.settings.suppress_send:
            await self._state.dispatched(message)
            return SendResult(message_id=envelope.message_id)

        session = await self._session_for_next_message()
        try:
            refused = await session.send(envelope)
        except SendError as err:
            if _session_is_spent(session, err):
                self._drop_session()
            raise
        except BaseException:
            # Cancelled mid-command: the session's state is unknown, so it
            # must never be used again (aiosmtplib would desync).
            self._drop_session()
            raise
        await self._state.dispatched(message)
        return SendResult(message_id=envelope.message_id, refused=refused)

    async def send_message(self, *args: Any, **kwargs: Any) -> SendResult:
        """Build a :class:`~quartmail.Message` from the arguments and send it."""
        return await self.send(Message(*args, **kwargs))

    async def close(self) -> None:
        """QUIT and close the session, if one is open."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _session_for_next_message(self) -> SMTPSession:
        session = self._session
        max_emails = self._state.settings.max_emails
        if session is not None and (
            not session.is_connected or (max_emails is not None and session.sent >= max_emails)
        ):
            await self.close()
            session = None
        if session is None:
            session = self._session = await self._state.open_session()
        return session

    def _drop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.abort()


def _session_is_spent(session: SMTPSession, err: SendError) -> bool:
    """After a failed send, may the session carry the next message?

    aiosmtplib resets the transaction after an error reply, but a 421 reply
    to DATA leaves it connected while real servers hang up (RFC 5321), and a
    timeout leaves the protocol out of step.
    """
    return (
        not session.is_connected
        or err.code == 421
        or isinstance(err, ConnectError | SendTimeoutError)
    )
