"""Messages per second of ``mail.send()`` and ``mail.connect()`` against raw aiosmtplib.

Against the harness's SMTP server, plain or ``--tls starttls`` / ``implicit``, ``--auth`` if
asked. Every variant builds a fresh ~0.97 KB message per mail (text + HTML alternatives) and
is timed from connecting to QUIT: ``raw``, the baseline, raw aiosmtplib on ONE connection,
``send_message(EmailMessage)``; ``send``, ``await mail.send(Message(...))`` one after another
(a session per message, as in Flask-Mail); ``connect``, ``async with mail.connect() as
conn: await conn.send(...)``, one session; ``ceiling``, raw aiosmtplib ``sendmail`` of the same
bytes flattened once (what client and server manage when no message is built). quartmail runs
as in an app: ``Mail(app)``, in an app context. Target: ``connect`` >= 0.90x ``raw``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import harness
from quart import Quart

from quartmail import Mail, Message

SENDER = "Quartmail Bench <bench@example.com>"
RECIPIENT = "Alice Example <alice@example.org>"
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


async def raw_session(
    server: harness.SMTPServer,
    hostname: str,
    indices: Iterable[int],
    data: bytes | None = None,
) -> None:
    """Raw aiosmtplib on one connection: each message built (or *data* sent as it is)."""
    async with server.raw_client(hostname) as smtp:
        if server.auth:
            await smtp.login(*server.auth)
        for i in indices:
            if data is None:
                await smtp.send_message(build_email_message(i))
            else:
                await smtp.sendmail("bench@example.com", ["alice@example.org"], data)


async def connect_session(app: Quart, mail: Mail, count: int) -> float:
    """``mail.connect()``, *count* messages built and sent in that one session; the seconds
    it took, connecting and QUIT included."""
    async with app.app_context():
        start = time.perf_counter()
        async with mail.connect() as conn:
            for i in range(count):
                await conn.send(build_message(i))
        return time.perf_counter() - start


def variants(server: harness.SMTPServer, count: int, warmup: int) -> dict[str, harness.Variant]:
    app = Quart(__name__)
    app.config.update(server.mail_config())
    mail = Mail(app)
    hostname = socket.getfqdn()  # quartmail looks it up once per app: so does the baseline
    data = build_email_message(0).as_bytes(policy=policy.SMTP)

    async def raw(count: int) -> float:
        start = time.perf_counter()
        await raw_session(server, hostname, range(count))
        return time.perf_counter() - start

    async def send(count: int) -> float:
        async with app.app_context():
            start = time.perf_counter()
            for i in range(count):
                await mail.send(build_message(i))
            return time.perf_counter() - start

    async def connect(count: int) -> float:
        return await connect_session(app, mail, count)

    async def ceiling(count: int) -> float:
        start = time.perf_counter()
        await raw_session(server, hostname, range(count), data=data)
        return time.perf_counter() - start

    return {
        "raw": harness.Variant("raw aiosmtplib (baseline)", raw, count, warmup),
        "send": harness.Variant("mail.send() (session per message)", send, count, warmup),
        "connect": harness.Variant("connect() batch (1 session)", connect, count, warmup),
        "ceiling": harness.Variant("ceiling (sendmail, pre-built bytes)", ceiling, count, warmup),
    }


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
    auth = harness.AUTH if args.auth else None
    async with harness.smtp_server(tls=args.tls, auth=auth) as server:
        size = len(build_message(0).as_bytes())
        what = f"tls={args.tls}, auth={bool(auth)}, message {size} B"
        print(f"send: {args.n} messages x {args.rounds} round(s), {what}")
        chosen = variants(server, args.n, args.warmup)
        if args.profile:
            for name in args.profile:
                await harness.profile(chosen[name], args.top)
            return 0
        runs = [chosen[name] for name in args.only]
        await harness.take_turns(runs, args.rounds)
        harness.print_table(runs, chosen["raw"] if "raw" in args.only else None, "raw aiosmtplib")
        if "raw" in args.only and "connect" in args.only:
            ratio = chosen["connect"].best / chosen["raw"].best
            harness.target("connect() batch vs raw aiosmtplib", ratio, at_least=0.90)
        server.expected = sum(len(run.rates) * run.count + run.warmup for run in runs)
        ok = await server.check()
    return harness.finish(ok)


if __name__ == "__main__":
    harness.main(benchmark)
