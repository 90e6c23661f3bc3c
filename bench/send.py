"""Messages per second sending over SMTP, each ~1 KB message (text + HTML) built per mail and
timed from connecting to QUIT: ``raw`` (the baseline), raw aiosmtplib ``send_message()`` on ONE
connection; ``send``, ``mail.send()`` one after another (a session each, as in Flask-Mail);
``connect``, one ``mail.connect()`` session; ``ceiling``, raw ``sendmail`` of bytes built once.
Target: ``connect`` >= 0.90x ``raw``.
"""

from __future__ import annotations

from email import policy
from functools import partial

import harness

VARIANTS = ("raw", "send", "connect", "ceiling")


async def benchmark() -> int:
    parser = harness.Arguments(VARIANTS, VARIANTS, n=(2000, 200), warmup=(100, 20))
    parser.add_argument("--tls", choices=["none", "starttls", "implicit"], default="none")
    parser.add_argument("--auth", action="store_true", help="require AUTH (PLAIN)")
    args = parser.parse()
    async with harness.smtp_server(args.tls, args.auth) as server:
        size = len(harness.build_message(0).as_bytes())
        print(f"send: {args.n} messages x {args.rounds} round(s), tls={args.tls}, ", end="")
        print(f"auth={args.auth}, message {size} B")
        data = harness.build_email_message(0).as_bytes(policy=policy.SMTP)
        raw = partial(harness.raw_session, server)
        quartmail = partial(harness.connect_session, *harness.mail_app(server.config))
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
        variants, baseline = [chosen[name] for name in args.only], chosen["raw"]
        await harness.take_turns(variants, args.rounds, baseline, "raw aiosmtplib")
        if baseline.rates and chosen["connect"].rates:
            ratio = chosen["connect"].best / baseline.best
            harness.target("connect() batch vs raw aiosmtplib", ratio, at_least=0.90)
        server.expected = sum(v.done for v in variants)
        return harness.finish(await server.check())


if __name__ == "__main__":
    harness.main(benchmark)
