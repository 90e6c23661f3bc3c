"""The development SMTP server and its inbox page.

In development, with no ``MAIL_SERVER`` configured, the app runs an SMTP
server of its own on loopback (aiosmtpd), catches every mail, logs a line
for each, and keeps the last ``DEV_INBOX_SIZE`` for ``/dev/inbox``. It never
runs in testing or production (their configs leave ``DEV_SMTP_SERVER`` off).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import socket
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from quart import Blueprint, Quart, abort, current_app, render_template
from quart.typing import ResponseReturnValue
from quart_schema import hide

__all__ = ["CaughtMail", "DevMailServer", "inbox"]

log = logging.getLogger("quartmail.app.devmail")


@dataclass(frozen=True)
class CaughtMail:
    """One message the development server caught."""

    number: int
    received: datetime
    mail_from: str
    rcpt_tos: list[str]
    data: bytes = field(repr=False)

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    def body(self, subtype: str) -> str | None:
        part = self.message.get_body(preferencelist=(subtype,))
        if part is None or part.get_content_type() != f"text/{subtype}":
            return None
        content: str = part.get_content()
        return content


class DevMailServer:
    """A loopback SMTP server that catches the app's mail.

    It binds its socket at once, so that the app's ``MAIL_SERVER`` and
    ``MAIL_PORT`` can point at it before ``Mail`` reads them; it serves from
    start-up to shutdown (registered after ``Mail``, so that the mail drain
    at shutdown still has a server to talk to).
    """

    def __init__(self, app: Quart) -> None:
        self.messages: deque[CaughtMail] = deque(maxlen=int(app.config["DEV_INBOX_SIZE"]))
        self._count = 0
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self._server: asyncio.Server | None = None
        app.config.update(
            MAIL_SERVER="127.0.0.1",
            MAIL_PORT=self.port,
            MAIL_USE_TLS=False,
            MAIL_USE_SSL=False,
            MAIL_USERNAME=None,
            MAIL_PASSWORD=None,
            MAIL_OAUTH2_TOKEN=None,
        )
        app.extensions["devmail"] = self

    def close(self) -> None:
        """Release the socket of an app that will never serve."""
        self._socket.close()

    def register(self, app: Quart) -> None:
        """Serve from the app's start-up to its shutdown, and add /dev/inbox."""
        app.before_serving(self.start)
        app.after_serving(self.stop)
        app.register_blueprint(inbox)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname="localhost", loop=loop), sock=self._socket
        )
        log.info("Development SMTP server on 127.0.0.1:%d; mail at /dev/inbox", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def handle_DATA(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        self._count += 1
        data = envelope.original_content or b""
        caught = CaughtMail(
            number=self._count,
            received=datetime.now(UTC),
            mail_from=str(envelope.mail_from),
            rcpt_tos=list(envelope.rcpt_tos),
            data=data,
        )
        self.messages.append(caught)
        log.info(
            "Caught mail #%d from %s to %s: %r (see /dev/inbox/%d)",
            caught.number,
            caught.mail_from,
            ", ".join(caught.rcpt_tos),
            str(caught.message["Subject"] or ""),
            caught.number,
        )
        return "250 2.0.0 Caught by the development server"


inbox = Blueprint("devmail", __name__, url_prefix="/dev/inbox")


def _server() -> DevMailServer:
    server: DevMailServer = current_app.extensions["devmail"]
    return server


@inbox.get("/")
@hide
async def index() -> ResponseReturnValue:
    return await render_template("dev/inbox.html", messages=list(reversed(_server().messages)))


@inbox.get("/<int:number>")
@hide
async def show(number: int) -> ResponseReturnValue:
    caught = next((m for m in _server().messages if m.number == number), None)
    if caught is None:
        abort(404)
    context: dict[str, Any] = {
        "caught": caught,
        "headers": list(caught.message.items()),
        "text": caught.body("plain"),
        "html": caught.body("html"),
    }
    return await render_template("dev/message.html", **context)
