"""What the benchmarks send (~1 KB, text and HTML) and how: raw aiosmtplib, or an app's Mail."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any

import aiosmtplib
import harness
from quart import Quart

from quartmail import Mail, Message

SENDER, RECIPIENT = "Quartmail Bench <bench@example.com>", "Alice Example <alice@example.org>"
TEXT = (
    "Hello Alice,\n\nPlease confirm your address within 24 hours:\n"
    "https://app.example.com/confirm?t=3f9a1c7e5b2d4a6f\n\nThe Example team\n"
)
HTML = (
    "<p>Hello Alice,</p>\n<p>Please confirm your address within 24 hours:</p>\n"
    '<p><a href="https://app.example.com/confirm?t=3f9a1c7e5b2d4a6f">Confirm</a></p>\n'
    "<p>The Example team</p>\n"
)
HOSTNAME = socket.getfqdn()  # quartmail looks it up once per app: the baselines once


def build_email_message(i: int) -> EmailMessage:
    """The baseline's message: what an app using aiosmtplib directly builds."""
    msg = EmailMessage()
    msg["From"], msg["To"] = SENDER, RECIPIENT
    msg["Subject"] = f"Please confirm your address ({i})"
    msg["Date"] = format_datetime(datetime.now(UTC).replace(microsecond=0))
    msg["Message-ID"] = make_msgid(domain="example.com")
    msg.set_content(TEXT)
    msg.add_alternative(HTML, subtype="html")
    return msg


def build_message(i: int) -> Message:
    """The same message as a quartmail Message."""
    subject = f"Please confirm your address ({i})"
    return Message(subject, sender=SENDER, recipients=[RECIPIENT], body=TEXT, html=HTML)


async def raw_session(server: harness.SMTPServer, count: int, data: bytes = b"") -> float:
    """Raw aiosmtplib on one connection, each message built (or *data* sent as it is); the
    seconds it took, connecting and QUIT included."""
    config, start = server.config, time.perf_counter()
    tls = dict(use_tls=config["MAIL_USE_SSL"], start_tls=config["MAIL_USE_TLS"])
    if ca_file := config["MAIL_CA_FILE"]:
        tls.update(tls_context=ssl.create_default_context(cafile=ca_file))
    host = dict(hostname=config["MAIL_SERVER"], port=config["MAIL_PORT"], local_hostname=HOSTNAME)
    async with aiosmtplib.SMTP(**host, **tls, timeout=30.0) as smtp:
        if config["MAIL_USERNAME"]:
            await smtp.login(config["MAIL_USERNAME"], config["MAIL_PASSWORD"])
        for i in range(count):
            if data:
                await smtp.sendmail("bench@example.com", ["alice@example.org"], data)
            else:
                await smtp.send_message(build_email_message(i))
    return time.perf_counter() - start


def mail_app(config: Mapping[str, Any], **settings: Any) -> tuple[Quart, Mail]:
    """An app with these ``MAIL_*`` settings, and its ``Mail``."""
    app = Quart(__name__)
    app.config.update(config, **settings)
    return app, Mail(app)


async def connect_session(app: Quart, mail: Mail, count: int, batch: bool = True) -> float:
    """*count* messages built and sent in one ``mail.connect()`` session, or (not *batch*)
    each by ``mail.send()``; the seconds it took."""
    async with app.app_context():
        start = time.perf_counter()
        async with mail.connect() if batch else contextlib.nullcontext(mail) as conn:
            for i in range(count):
                await conn.send(build_message(i))
        return time.perf_counter() - start
