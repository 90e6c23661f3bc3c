"""Throughput of quartmail's sending against raw aiosmtplib, over real SMTP.

The server is quartmail's SMTPTestServer (aiosmtpd) in a separate process (see
``bench/_server.py``), plain by default, or STARTTLS / implicit TLS with ``--tls``. Every
variant builds a fresh message per mail, as an app does: multipart/alternative, a text part
and an HTML part, about 0.97 KB on the wire, with From, To, Subject, Date and Message-ID,
like the message of the aiosmtplib throughput table in ``/work/shared/DEPENDENCIES.md``
(section 5). Building and flattening such a message with the stdlib ``email`` package costs
more CPU than the SMTP exchange; quartmail writes this common kind of message itself
(``quartmail.mime``) and uses the ``email`` package only for the others (attachments...).

Variants, each timed with ``time.perf_counter`` from connecting to QUIT:

``raw``
    The baseline: raw aiosmtplib on ONE persistent connection, building an
    ``email.message.EmailMessage`` and ``await smtp.send_message(msg)`` per mail.
``send``
    ``await mail.send(Message(...))`` one after another: a new SMTP session per message,
    as in Flask-Mail.
``connect``
    ``async with mail.connect() as conn: await conn.send(Message(...))`` for all messages,
    on one session.
``ceiling``
    For reference: raw aiosmtplib on one connection sending the same bytes, flattened once,
    with ``sendmail``: the SMTP exchange alone, what the client and this server manage when
    no message is built. A variant close to it is bound by the server, not by its own CPU.

quartmail runs as an app does: ``app = Quart(__name__)``, ``app.config.update(...)``,
``mail = Mail(app)``, sends inside ``async with app.app_context()``.

Each variant is warmed up, then the variants take turns for ``--rounds`` rounds of ``-n``
messages each, so that a slow phase of the machine hits all of them alike; the best round of
each is reported, with its ratio to the best raw aiosmtplib round, and the target for
``connect()``: within 10% of raw aiosmtplib (>= 0.90x). Afterwards the server's count of
accepted messages is checked against the number sent.

Run (from the project root)::

    /work/venv/bin/python bench/send.py --help
    /work/venv/bin/python bench/send.py                  # plain SMTP, 2000 messages x 3 rounds
    /work/venv/bin/python bench/send.py --tls starttls   # or --tls implicit
    /work/venv/bin/python bench/send.py --quick          # a smoke test of a few seconds
    /work/venv/bin/python bench/send.py --only raw --only connect     # some variants only
    /work/venv/bin/python bench/send.py --profile connect --profile raw   # cProfile instead

The exit status is 0 whatever the figures are (timings on a shared machine are noisy); it is
1 if a message went missing, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import aiosmtplib
from _server import ServerProcess, TLSMode, smtp_server_process
from quart import Quart

from quartmail import Mail, Message

SENDER = "Quartmail Bench <bench@example.com>"
SENDER_DOMAIN = "example.com"
RECIPIENT = "Alice Example <alice@example.org>"
AUTH = ("bench", "bench-password")
VARIANTS = ("raw", "send", "connect", "ceiling")
TARGET = 0.90  # connect() batch must reach this fraction of raw aiosmtplib's rate

TEXT = (
    "Hello Alice,\n\n"
    "Please confirm your address within 24 hours:\n"
    "https://app.example.com/confirm?t=3f9a1c7e5b2d4a6f\n\n"
    "The Example team\n"
)
HTML = (
    "<p>Hello Alice,</p>\n"
    "<p>Please confirm your address within 24 hours:</p>\n"
    '<p><a href="https://app.example.com/confirm?t=3f9a1c7e5b2d4a6f">Confirm</a></p>\n'
    "<p>The Example team</p>\n"
)


def subject(i: int) -> str:
    return f"Please confirm your address ({i})"


def build_email_message(i: int) -> EmailMessage:
    """The baseline's message: what an app using aiosmtplib directly would build."""
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = RECIPIENT
    msg["Subject"] = subject(i)
    msg["Date"] = format_datetime(datetime.now(UTC).replace(microsecond=0))
    msg["Message-ID"] = make_msgid(domain=SENDER_DOMAIN)
    msg.set_content(TEXT)
    msg.add_alternative(HTML, subtype="html")
    return msg


def build_message(i: int) -> Message:
    """The same message as a quartmail Message."""
    return Message(subject(i), sender=SENDER, recipients=[RECIPIENT], body=TEXT, html=HTML)


#: A variant sends ``count`` messages and returns the seconds it took.
Variant = Callable[[int], Awaitable[float]]


@dataclass(frozen=True)
class Benchmark:
    """The variants, bound to one server and one app."""

    server: ServerProcess
    app: Quart
    mail: Mail
    use_auth: bool
    local_hostname: str

    @classmethod
    def create(cls, server: ServerProcess, use_auth: bool) -> Benchmark:
        app = Quart(__name__)
        app.config.update(server.mail_config())
        return cls(
            server=server,
            app=app,
            mail=Mail(app),
            use_auth=use_auth,
            # quartmail looks the name up once per app; do the same for the baseline.
            local_hostname=socket.getfqdn(),
        )

    @property
    def variants(self) -> dict[str, tuple[str, Variant]]:
        return {
            "raw": ("raw aiosmtplib (baseline)", self.run_raw),
            "send": ("mail.send() (session per message)", self.run_send),
            "connect": ("connect() batch (1 session)", self.run_connect),
            "ceiling": ("ceiling (sendmail, pre-built bytes)", self.run_ceiling),
        }

    def raw_client(self) -> aiosmtplib.SMTP:
        return self.server.raw_client(self.local_hostname, timeout=5)

    async def run_raw(self, count: int) -> float:
        smtp = self.raw_client()
        start = time.perf_counter()
        async with smtp:
            if self.use_auth:
                await smtp.login(*AUTH)
            for i in range(count):
                await smtp.send_message(build_email_message(i))
        return time.perf_counter() - start

    async def run_ceiling(self, count: int) -> float:
        data = build_email_message(0).as_bytes(policy=policy.SMTP)
        sender, recipients = "bench@example.com", ["alice@example.org"]
        smtp = self.raw_client()
        start = time.perf_counter()
        async with smtp:
            if self.use_auth:
                await smtp.login(*AUTH)
            for _ in range(count):
                await smtp.sendmail(sender, recipients, data)
        return time.perf_counter() - start

    async def run_send(self, count: int) -> float:
        async with self.app.app_context():
            start = time.perf_counter()
            for i in range(count):
                await self.mail.send(build_message(i))
            return time.perf_counter() - start

    async def run_connect(self, count: int) -> float:
        async with self.app.app_context():
            start = time.perf_counter()
            async with self.mail.connect() as conn:
                for i in range(count):
                    await conn.send(build_message(i))
            return time.perf_counter() - start


def message_sizes() -> tuple[int, int]:
    """Bytes on the wire of the baseline's message and of quartmail's."""
    raw = build_email_message(0).as_bytes(policy=policy.SMTP)
    ours = build_message(0).as_bytes()
    return len(raw), len(ours)


async def benchmark(bench: Benchmark, args: argparse.Namespace) -> int:
    variants = bench.variants
    names = [name for name in variants if name in args.variants]
    sent = 0
    for name in names:  # warm up: imports, caches, the fqdn lookup, TLS session setup
        await variants[name][1](args.warmup)
        sent += args.warmup
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            seconds = await variants[name][1](args.n)
            rates[name].append(args.n / seconds)
            sent += args.n

    baseline = max(rates["raw"]) if "raw" in rates else None
    width = max(len(variants[name][0]) for name in names)
    for name in names:
        label = variants[name][0]
        best, median = max(rates[name]), statistics.median(rates[name])
        line = f"{label + ':':<{width + 1}} {best:6.0f} msg/s"
        if args.rounds > 1:
            line += f"  (median {median:.0f})"
        if baseline is not None:
            line += f"  = {best / baseline:.2f}x raw aiosmtplib"
        print(line)
    if baseline is not None and "connect" in rates:
        ratio = max(rates["connect"]) / baseline
        verdict = "MET" if ratio >= TARGET else "NOT MET"
        print(
            f"target: connect() batch within 10% of raw aiosmtplib (>= {TARGET:.2f}x): "
            f"{verdict} ({ratio:.2f}x)"
        )

    stats = bench.server.stats()
    received = stats["received"]
    print(
        f"server: {received} of {sent} messages received, "
        f"{stats['connections']} SMTP sessions (warm-up included)"
    )
    if received != sent:
        print("ERROR: the server did not receive every message", file=sys.stderr)
        return 1
    return 0


async def profile(bench: Benchmark, args: argparse.Namespace) -> int:
    for name in args.profile:
        label, variant = bench.variants[name]
        await variant(args.warmup)
        profiler = cProfile.Profile()
        profiler.enable()
        seconds = await variant(args.n)
        profiler.disable()
        print(f"== {label}: {args.n} messages, {args.n / seconds:.0f} msg/s under cProfile")
        for sort in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(sort).print_stats(args.top)
            # Skip pstats' preamble, down to the table.
            print(out.getvalue()[out.getvalue().index("   ncalls") :].rstrip(), end="\n\n")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Messages/second of raw aiosmtplib, mail.send() and mail.connect() "
        "against an SMTP server in another process (see the module docstring).",
    )
    parser.add_argument(
        "-n", type=int, default=None, help="messages per round and variant (default 2000)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds; the best is reported (default 3)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up messages per variant (default 100)"
    )
    parser.add_argument(
        "--tls",
        choices=["none", "starttls", "implicit"],
        default="none",
        help="the server's TLS mode (default none: plain SMTP)",
    )
    parser.add_argument("--auth", action="store_true", help="require AUTH (PLAIN) on the server")
    parser.add_argument(
        "--only",
        dest="variants",
        action="append",
        choices=VARIANTS,
        help="run only this variant (repeatable; the ratios need raw)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: -n 200, 1 round, 20 warm-up messages (unless given)",
    )
    parser.add_argument(
        "--profile",
        action="append",
        choices=VARIANTS,
        help="instead of the benchmark, run this variant once under cProfile and print "
        "the top functions (repeatable)",
    )
    parser.add_argument(
        "--top", type=int, default=25, help="functions shown per table with --profile"
    )
    args = parser.parse_args(argv)
    quick = {"n": 200, "rounds": 1, "warmup": 20}
    default = {"n": 2000, "rounds": 3, "warmup": 100}
    for key in ("n", "rounds", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, (quick if args.quick else default)[key])
    if args.n < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("-n and --rounds must be at least 1, --warmup at least 0")
    if not args.variants:
        args.variants = list(VARIANTS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tls: TLSMode = args.tls
    with smtp_server_process(tls=tls, auth=AUTH if args.auth else None) as server:
        raw_size, our_size = message_sizes()
        what = "profile" if args.profile else f"{args.rounds} round(s)"
        print(
            f"quartmail send benchmark: {args.n} messages x {what}, tls={tls}, "
            f"auth={'yes' if args.auth else 'no'}, warm-up {args.warmup}/variant; "
            f"server in process {server.pid}"
        )
        print(f"message: {raw_size} B (EmailMessage), {our_size} B (quartmail Message)")
        bench = Benchmark.create(server, use_auth=args.auth)
        run = profile if args.profile else benchmark
        return asyncio.run(run(bench, args))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
