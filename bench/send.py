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

from email import policy
from functools import partial

import harness
from common import build_email_message, build_message, connect_session, mail_app, raw_session

VARIANTS = ("raw", "send", "connect", "ceiling")


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
    async with harness.smtp_server(args.tls, args.auth) as server:
        size = len(build_message(0).as_bytes())
        print(f"send: {args.n} messages x {args.rounds} round(s), tls={args.tls}, ", end="")
        print(f"auth={args.auth}, message {size} B")
        app, mail = mail_app(server.config)
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
        server.expected = sum(v.done for v in variants)
        ok = await server.check()
    return harness.finish(ok)


if __name__ == "__main__":
    harness.main(benchmark)
