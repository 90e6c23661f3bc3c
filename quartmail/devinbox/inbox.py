"""The development inbox of one app: an SMTP server on loopback and the mail it caught.

The server is :class:`quartmail.testing.SMTPTestServer` (aiosmtpd's protocol in the app's own
event loop), on a socket bound when the app is made, so that ``MAIL_SERVER`` and ``MAIL_PORT``
point at it before :class:`~quartmail.Mail` reads them. It serves from the app's start-up to
its shutdown, after the mail drain, and :meth:`SMTPTestServer.stop` ends every connection and
session task it started.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref
from collections import deque
from datetime import UTC, datetime

from quart import Quart

from ..settings import DevInboxSettings
from ..testing import ReceivedMessage, SMTPTestServer
from .mail import CaughtMail, parse_mail, unparsed_mail
from .views import EXTENSION, make_blueprint

__all__ = ["DevInbox"]

log = logging.getLogger("quartmail.devinbox")

HOST = "127.0.0.1"


class DevInbox:
    """An app's development inbox; :class:`~quartmail.Mail` makes it when ``MAIL_DEV_INBOX``
    is on. Reach it with :meth:`of`::

        inbox = DevInbox.of(app)
        [caught] = await inbox.wait_for_messages(1)
        assert caught.subject == "Welcome"
    """

    def __init__(self, app: Quart, settings: DevInboxSettings) -> None:
        self.settings = settings
        self._messages: deque[CaughtMail] = deque(maxlen=settings.size)
        self._caught = 0  # numbers the messages
        self._arrivals = 0  # counts them for wait_for_messages, from 0 again after clear()
        self._arrived = asyncio.Condition()
        self._socket: socket.socket | None = socket.create_server((HOST, 0))
        # An app that is made but never served (a CLI command, a test) still closes it.
        weakref.finalize(self, self._socket.close)
        #: The inbox's SMTP port on 127.0.0.1.
        self.port: int = self._socket.getsockname()[1]
        self._server: SMTPTestServer | None = None

        if app.config.get("MAIL_SERVER"):
            log.info("MAIL_DEV_INBOX is on: MAIL_SERVER %r is not used", app.config["MAIL_SERVER"])
        app.config.update(
            MAIL_SERVER=HOST,
            MAIL_PORT=self.port,
            MAIL_USE_TLS=False,
            MAIL_USE_SSL=False,
            MAIL_USERNAME=None,
            MAIL_PASSWORD=None,
            MAIL_OAUTH2_TOKEN=None,
        )
        if app.config.get("MAIL_SUPPRESS_SEND") is None:
            # Testing would suppress sending, and the inbox would stay empty.
            app.config["MAIL_SUPPRESS_SEND"] = False
        app.extensions[EXTENSION] = self
        app.register_blueprint(make_blueprint(settings.path))

    def __repr__(self) -> str:
        state = "serving" if self._server is not None else "stopped"
        return f"<DevInbox {HOST}:{self.port} {self.settings.path}/ {state}>"

    @classmethod
    def of(cls, app: Quart) -> DevInbox:
        """The development inbox of *app*; :class:`LookupError` when it has none."""
        inbox = app.extensions.get(EXTENSION)
        if not isinstance(inbox, cls):
            raise LookupError(f"{app.name!r} has no development inbox: set MAIL_DEV_INBOX")
        return inbox

    @property
    def messages(self) -> list[CaughtMail]:
        """The messages kept (the last ``MAIL_DEV_INBOX_SIZE``), oldest first."""
        return list(self._messages)

    def get(self, number: int) -> CaughtMail | None:
        """Message number *number*, if it is still kept."""
        return next((caught for caught in self._messages if caught.number == number), None)

    def clear(self) -> None:
        """Forget every message (numbers go on counting)."""
        self._messages.clear()
        self._arrivals = 0

    async def wait_for_messages(
        self,
        count: int,
        timeout: float = 5.0,  # noqa: ASYNC109 (a test helper's deadline)
    ) -> list[CaughtMail]:
        """Wait until *count* messages have arrived (since the app was made, or since the
        last :meth:`clear`) and return the kept ones; :class:`TimeoutError` after *timeout* s."""
        try:
            async with asyncio.timeout(timeout), self._arrived:
                await self._arrived.wait_for(lambda: self._arrivals >= count)
        except TimeoutError:
            raise TimeoutError(
                f"expected {count} message(s) in the development inbox within {timeout} s, "
                f"but {self._arrivals} arrived"
            ) from None
        return self.messages

    async def start(self) -> None:
        """The app's ``before_serving``: serve SMTP on :attr:`port`."""
        sock, self._socket = self._socket, None
        if sock is None:  # a later lifespan of the same app: the same port again
            sock = socket.create_server((HOST, self.port))
        self._server = SMTPTestServer(
            host=HOST,
            sock=sock,
            # aiosmtpd refuses a line over 1000 octets (RFC 5321's limit) with a 500; the
            # inbox takes it, as a relay would (Postfix breaks it), and warns about it.
            data_line_limit=1024 * 1024,
            on_message=self._catch,
        )
        await self._server.start()
        log.info(
            "Development inbox: SMTP on %s:%d, mail at %s/", HOST, self.port, self.settings.path
        )

    async def stop(self) -> None:
        """The app's ``after_serving`` (after the mail drain): stop serving SMTP."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop()

    def close(self) -> None:
        """Release the socket of an app that will never serve."""
        if self._socket is not None:
            self._socket.close()

    async def _catch(self, received: ReceivedMessage) -> None:
        self._caught += 1
        number = self._caught
        args = (number, datetime.now(UTC), received.mail_from, received.rcpt_tos, received.data)
        try:
            # Parsing a large message takes a while: not on the event loop.
            caught = await asyncio.to_thread(parse_mail, *args)
        except Exception:
            # The email package has bugs on hostile input; the sender still gets its 250,
            # and the inbox still shows the source.
            log.exception("Caught mail #%d does not parse; only its source is shown", number)
            caught = unparsed_mail(*args)
        async with self._arrived:
            self._messages.append(caught)
            self._arrivals += 1
            self._arrived.notify_all()
        log.info(
            "Caught mail #%d from %s to %s: %r (%d warning(s); see %s/%d)",
            number,
            caught.mail_from,
            ", ".join(caught.rcpt_tos),
            caught.subject,
            len(caught.warnings),
            self.settings.path,
            number,
        )
