"""What every benchmark shares: arguments, variants taking turns, tables and targets, profiling,
child processes (``--child OPTIONS``: JSON lines, the first once ready, until stdin closes), the
SMTP server in one (:func:`smtp_server`), and what is sent (~1 KB, text and HTML) and how. See
``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import logging
import math
import os
import pathlib
import pstats
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any, NoReturn

import aiosmtplib
from quart import Quart

from quartmail import Mail, Message
from quartmail.testing import SMTPTestServer, TLSCertificates, TLSMode

PROJECT = pathlib.Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
AUTH = ("bench", "bench-password")  # the credentials of servers that require AUTH
START_TIMEOUT = 60.0  # seconds for a child (or a served app) to get ready
REPLY_TIMEOUT = 120.0  # seconds for a child to answer a command
Size = tuple[int, int] | tuple[int, int, str]  # (default, --quick value[, help])
HELP = {"n": "how many per run", "warmup": "how many to warm up with", "rounds": "runs of each"}


class Arguments(argparse.ArgumentParser):
    """``--only`` (of *only*), ``--quick``, ``--profile`` (of *profile*) and the *sizes*, each
    ``name=(default, --quick value[, help])``, ``rounds`` (3, 1) unless given; the script's
    docstring as ``--help``."""

    def __init__(self, only: Sequence[str], profile: Sequence[str] = (), **sizes: Size) -> None:
        doc = sys.modules["__main__"].__doc__
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.sizes, self.only = {"rounds": (3, 1), **sizes}, only
        for name, (default, quick, *text) in self.sizes.items():
            flag = "-n" if name == "n" else "--" + name.replace("_", "-")
            what = f"{text[0] if text else HELP[name]} (default {default}, --quick {quick})"
            self.add_argument(flag, dest=name, type=int, help=what)
        self.add_argument("--only", action="append", choices=only, help="only this (repeatable)")
        self.add_argument("--quick", action="store_true", help="a smoke test: small sizes")
        if profile:
            self.add_argument("--profile", action="append", choices=profile, help="cProfile it")
            self.add_argument("--top", type=int, default=30, help="functions shown per table")

    def parse(self) -> argparse.Namespace:
        """Parse, fill in the sizes not given, check them; ``only`` in declared order."""
        args = self.parse_args()
        for name, (default, quick, *_) in self.sizes.items():
            if getattr(args, name) is None:
                setattr(args, name, quick if args.quick else default)
            if getattr(args, name) < (least := 0 if name == "warmup" else 1):
                self.error(f"{name} must be at least {least}")
        args.only = [name for name in self.only if name in (args.only or self.only)]
        load, python = os.getloadavg()[0], sys.version.split()[0]
        print(f"{os.cpu_count()} CPUs, load average {load:.2f}; Python {python}")
        return args


@dataclass
class Variant:
    """A way of doing the thing measured: ``run(count)`` does it *count* times, in seconds."""

    label: str
    run: Callable[[int], Awaitable[float]]
    count: int  # per round
    warmup: int = 0
    rates: list[float] = field(default_factory=list)  # per round
    cpu: list[float] = field(default_factory=list)  # this process's CPU seconds per unit, a round

    @property
    def best(self) -> float:
        return max(self.rates)

    @property
    def done(self) -> int:  # runs so far, warm-up included
        return self.warmup + self.count * len(self.rates) if self.rates else 0


async def take_turns(
    variants: Sequence[Variant], rounds: int, baseline: Variant, name: str, unit: str = "msg/s"
) -> None:
    """Warm every variant up, run them in turn (a slow phase of the machine hits all), then
    print each one's best rate, its median and its ratio to *baseline*'s best (called *name*)."""
    for variant in variants:
        if variant.warmup:
            await variant.run(variant.warmup)
    for _ in range(rounds):
        for variant in variants:
            cpu = time.process_time()
            variant.rates.append(variant.count / await variant.run(variant.count))
            variant.cpu.append((time.process_time() - cpu) / variant.count)
    width = max(len(variant.label) for variant in variants) + 1
    for variant in variants:
        line = f"  {variant.label + ':':<{width}} {variant.best:7.1f} {unit}"
        if len(variant.rates) > 1:
            line += f" (median {statistics.median(variant.rates):7.1f})"
        if baseline.rates:
            line += f"  = {variant.best / baseline.best:5.2f}x {name}"
        print(line)


_targets: list[str] = []


def target(
    text: str, ratio: float, *, at_least: float = 0.0, at_most: float = math.inf, unit: str = "x"
) -> None:
    """Print (and repeat in :func:`finish`) whether *ratio* meets a target."""
    bound = f">= {at_least:g}{unit}" if at_least else f"<= {at_most:g}{unit}"
    met = "MET" if at_least <= ratio <= at_most else "NOT MET"
    _targets.append(f"{text} {bound}: {met} ({ratio:.2f}{unit})")
    print("  target: " + _targets[-1])


def finish(ok: bool) -> int:
    """Repeat the targets; the exit status: 1 if something went missing or failed, else 0."""
    if _targets:
        print("Targets\n" + "\n".join("  " + line for line in _targets))
    if not ok:
        print("ERROR: a message went missing or a run failed (see above)", file=sys.stderr)
    return 0 if ok else 1


def print_profile(stats: cProfile.Profile | str, top: int) -> None:
    """The *top* functions by own time, then by cumulative time."""
    for sort in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(stats, stream=out).sort_stats(sort).print_stats(top)
        text = out.getvalue()
        print(text[text.index("   ncalls") :].rstrip(), end="\n\n")  # without the preamble


async def profile(variant: Variant, top: int) -> None:
    """Warm *variant* up, then run one round of it under cProfile and print the top."""
    await variant.run(variant.warmup)
    with cProfile.Profile() as profiler:
        seconds = await variant.run(variant.count)
    print(f"== {variant.label}: {variant.count / seconds:.0f} msg/s under cProfile")
    print_profile(profiler, top)


@dataclass
class Child:
    """A child process, the parent's side; ``ready`` is its first answer."""

    process: asyncio.subprocess.Process
    ready: dict[str, Any] = field(default_factory=dict)

    async def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode("ascii") + b"\n")
        await self.process.stdin.drain()

    async def ask(self, command: str | None, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:  # noqa: ASYNC109
        """Send *command* (None: nothing), then read the child's answer."""
        if command is not None:
            await self.send(command)
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):  # a TimeoutError: the child hangs
            line = await self.process.stdout.readline()
        if not line:
            code = await self.process.wait()
            raise RuntimeError(f"child exited (code {code}); see its traceback above")
        return dict(json.loads(line))


@contextlib.asynccontextmanager
async def children(
    script: str, options: Sequence[dict[str, Any]], ready_timeout: float = START_TIMEOUT
) -> AsyncIterator[list[Child]]:
    """A child per options, each with its first answer; at the end, stdin closed, or killed."""
    started: list[Child] = []
    script, pipe = os.path.abspath(script), asyncio.subprocess.PIPE  # noqa: ASYNC240 (no I/O)

    async def stop(process: asyncio.subprocess.Process) -> None:
        if process.stdin is not None:
            process.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 10.0)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()

    try:
        for option in options:
            command = (sys.executable, script, "--child", json.dumps(option))
            started.append(
                Child(await asyncio.create_subprocess_exec(*command, stdin=pipe, stdout=pipe))
            )
        for child in started:
            child.ready = await child.ask(None, ready_timeout)
        yield started
    finally:
        await asyncio.gather(*(stop(child.process) for child in started))


def reply(data: Mapping[str, Any]) -> None:
    """A child's answer to its parent."""
    with contextlib.suppress(BrokenPipeError):  # the parent is gone: stop all the same
        print(json.dumps(data), flush=True)


Commands = AsyncIterator[str]  # a child's commands from its parent, to the end of its stdin
ChildMain = Callable[[dict[str, Any], Commands], Awaitable[None]]


def main(
    benchmark: Callable[[], Coroutine[Any, Any, int]], children: Mapping[str, ChildMain] = {}
) -> NoReturn:
    """The script's entry point: the benchmark, or the child that ``--child`` asks for."""
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        options = json.loads(sys.argv[2])
        # Ctrl-C reaches the whole process group: the parent handles it and closes our stdin.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        logging.basicConfig(format=f"[child {os.getpid()}] %(name)s: %(message)s")
        sys.exit(asyncio.run(_child({"smtp": _serve_smtp, **children}[options["kind"]], options)))
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        sys.exit(asyncio.run(benchmark()))
    except KeyboardInterrupt:
        sys.exit(130)


async def _child(run: ChildMain, options: dict[str, Any]) -> None:
    reader, loop = asyncio.StreamReader(), asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> Commands:
        while line := await reader.readline():
            yield line.decode("ascii").strip()

    await run(options, commands())


@dataclass
class SMTPServer:
    """An SMTP test server in a child process, as given by :func:`smtp_server`."""

    child: Child
    config: dict[str, Any]  # the MAIL_* settings that point an app at it
    expected: int = 0  # messages sent to it, for check()

    async def stats(self, data_delay: float | None = None) -> dict[str, Any]:
        """``received``, ``data_attempts``, ``connections``, ``refused`` (421), ``mail_times``
        (each MAIL FROM's, since the last call); *data_delay*: the wait before each DATA."""
        return await self.child.ask("stats" if data_delay is None else repr(data_delay))

    async def check(self) -> bool:
        """Print how many of :attr:`expected` messages the server received; whether all."""
        got, sessions = (stats := await self.stats())["received"], stats["connections"]
        text = f"{got} of {self.expected} messages received, {sessions} SMTP sessions"
        print(f"  server: {text} (warm-up included)" + " <-- MISSING" * (got != self.expected))
        return bool(got == self.expected)


@contextlib.asynccontextmanager
async def smtp_server(
    tls: TLSMode = "none", auth: bool = False, data_delay: float = 0.0, **server: bool | int | None
) -> AsyncIterator[SMTPServer]:
    """An :class:`~quartmail.testing.SMTPTestServer` (*server*: its options) in a child
    process, counting the messages and forgetting them (flat memory)."""
    with tempfile.TemporaryDirectory(prefix="quartmail-bench-") as directory:
        options = dict(kind="smtp", tls=tls, auth=auth, dir=directory, delay=data_delay)
        async with children(__file__, [{**options, "server": server}]) as (child,):
            yield SMTPServer(child, child.ready)


async def _serve_smtp(options: dict[str, Any], commands: Commands) -> None:
    tls, auth, more = options["tls"], AUTH if options["auth"] else None, options["server"]
    certs = TLSCertificates.create(pathlib.Path(options["dir"])) if tls != "none" else None
    server = SMTPTestServer(tls=tls, certificates=certs, auth=auth, idle_timeout=3600.0, **more)
    server.data_delay = float(options["delay"])
    received, mail_times = 0, list[float]()

    def forget() -> None:  # keep the count and the MAIL FROM times, not the messages
        nonlocal received
        received += len(server.messages)
        mail_times.extend(c.time for c in server.commands if c.verb == "MAIL")
        server.messages.clear()
        server.commands.clear()

    async def forget_periodically() -> None:
        while True:
            await asyncio.sleep(0.25)
            forget()

    async with server, asyncio.TaskGroup() as tasks:
        forgetting = tasks.create_task(forget_periodically())
        reply(server.mail_config())
        async for command in commands:
            if command != "stats":
                server.data_delay = float(command)
            forget()
            stats = dict(received=received, data_attempts=server.data_attempts)
            stats.update(connections=server.connections, refused=server.refused_connections)
            reply({**stats, "mail_times": mail_times[:]})
            mail_times.clear()
        forgetting.cancel()


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


async def raw_session(server: SMTPServer, count: int, data: bytes = b"") -> float:
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


async def background(app: Quart, mail: Mail, count: int) -> float:
    """*count* messages built and submitted by ``mail.send_background``, then all awaited; the
    seconds it took."""
    async with app.app_context():
        start = time.perf_counter()
        await asyncio.gather(*(mail.send_background(build_message(i)) for i in range(count)))
        return time.perf_counter() - start


if __name__ == "__main__":  # how the SMTP server's child process starts
    main(lambda: asyncio.sleep(0, 2))  # (and nothing else: 2, a usage error)
