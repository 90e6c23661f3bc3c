"""Messages per second of ``mail.send()`` and ``mail.connect()`` against raw aiosmtplib.

Against the harness's SMTP server, plain or ``--tls starttls`` / ``implicit``, ``--auth`` if
asked. Every variant builds a ~1 KB message (text + HTML) per mail and is timed from connecting
to QUIT: ``raw``, the baseline, raw aiosmtplib ``send_message(EmailMessage)`` on ONE connection;
``send``, ``await mail.send(Message(...))`` one after another (a session per message, as in
Flask-Mail); ``connect``, the messages in one ``async with mail.connect()`` session; ``ceiling``,
raw aiosmtplib ``sendmail`` of bytes flattened once (no message built). quartmail runs as in an
app: ``Mail(app)``, in an app context. Target: ``connect`` >= 0.90x ``raw``.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from functools import partial
from typing import Any

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
VARIANTS = ("raw", "send", "connect", "ceiling")
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
    start = time.perf_counter()
    async with server.raw_client(HOSTNAME) as smtp:
        if server.auth:
            await smtp.login(*server.auth)
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


async def benchmark() -> int:
    parser = harness.Arguments(
        {
            "n": (2000, 200, "messages per round and variant"),
            "rounds": (3, 1, "rounds; the best is reported"),
            "warmup": (100, 20, "warm-up messages per variant"),
        },
        only=VARIANTS,
        profile=VARIANTS,
    )
    parser.add_argument("--tls", choices=["none", "starttls", "implicit"], default="none")
    parser.add_argument("--auth", action="store_true", help="require AUTH (PLAIN)")
    args = parser.parse()
    async with harness.smtp_server(args.tls, harness.AUTH if args.auth else None) as server:
        size = len(build_message(0).as_bytes())
        print(
            f"send: {args.n} x {args.rounds} round(s), tls={args.tls}, auth={args.auth}, ", end=""
        )
        print(f"{size} B a message")
        app, mail = mail_app(server.mail_config())
        data = build_email_message(0).as_bytes(policy=policy.SMTP)
        raw, quartmail = partial(raw_session, server), partial(connect_session, app, mail)
        variant = partial(harness.Variant, count=args.n, warmup=args.warmup)
        chosen = {
            "raw": variant("raw aiosmtplib (baseline)", raw),
            "send": variant("mail.send() (session per message)", partial(quartmail, batch=False)),
            "connect": variant("connect() batch (1 session)", quartmail),
            "ceiling": variant("ceiling (sendmail, pre-built bytes)", partial(raw, data=data)),
        }
        for name in args.profile or ():
            await harness.profile(chosen[name], args.top)
        if args.profile:
            return 0
        variants = [chosen[name] for name in args.only]
        await harness.take_turns(variants, args.rounds)
        baseline = chosen["raw"] if "raw" in args.only else None
        harness.print_table(variants, baseline, "raw aiosmtplib")
        if baseline and "connect" in args.only:
            ratio = chosen["connect"].best / baseline.best
            harness.target("connect() batch vs raw aiosmtplib", ratio, at_least=0.90)
        server.expected = sum(len(v.rates) * v.count + v.warmup for v in variants)
        ok = await server.check()
    return harness.finish(ok)


if __name__ == "__main__":
    harness.main(benchmark)
