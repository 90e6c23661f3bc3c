"""The durable outbox on PostgreSQL: delivery rate per dispatcher process, and enqueue cost.

Sections (``--only``, repeatable; all by default):

``fast`` and ``slow`` (delivery)
    One SMTP server process (``bench/_server.py``): ``fast`` answers at once, ``slow`` takes
    50 ms per DATA (``data_delay=0.05``; aiosmtpd sleeps, so sessions overlap). Variants:

    Each run delivers ``-n`` mails (default 2000) with the fast server, ``--slow-n`` (800)
    with the slow one, the message of ``bench/send.py`` (text + HTML, about 1 KB).

    ``in-memory``
        The baseline, measured in the same run: ``mail.send_background`` of every message in
        ONE process with the same ``MAIL_POOL_SIZE`` (``--pool-size``, default 8), timed from
        the app's start-up to the last future resolved. Its :class:`~quartmail.Message`
        objects are built before the clock starts; checking and flattening them (in
        ``send_background``, all of them before the first send) is timed.
    ``outbox xK`` (K = 1, 2, 4)
        The outbox table is emptied (``TRUNCATE``), then the benchmark itself enqueues the
        messages with ``mail.outbox.enqueue(session, message)`` in transactions of 500 (not
        timed; flattening happens there). Then K dispatcher processes, each a Quart app with
        ``Mail`` and ``mail.init_outbox(app, engine)`` on the same database and the same
        ``MAIL_POOL_SIZE``, start their lifespan at once (``await app.startup()``); the clock
        runs from that signal to the last row marked ``sent`` (the greatest ``sent_at``,
        stamped by the dispatchers; the benchmark polls the table every 50 ms until no row is
        queued or sending, then tells the dispatchers to shut down, ``await app.shutdown()``).

    Every variant runs in fresh child processes, spawned and warmed (imports, the database
    connection, the messages) before the clock starts; the SMTP sessions and the outbox's
    LISTEN connection are opened inside the timed part, as at an app's start-up. The variants
    take turns for ``--rounds`` rounds (default 3) after a warm-up run of each kind; the best
    round is reported with the median, and, for the best round, how long the first mail
    took, and the CPU time per mail (from ``/proc``) of the clients (the dispatchers, or the
    in-memory process), of the SMTP server, of PostgreSQL (the backends of the benchmark's
    database and the shared processes such as the WAL writer), of this script (polling), of
    anything else (other users of the machine, the kernel's network stack), and of the whole
    machine. A large "anything else" means that the run was disturbed: on a small machine the
    figures then say little.

    Targets: with the 50 ms server, 4 dispatchers deliver at least 3x what one does; with
    the fast server, one dispatcher's rate is at least half the in-memory rate (its cost per
    mail is within 2x).

``signup`` (enqueue cost)
    ``--signups`` sign-ups (default 1000) one after another, each a transaction on its own
    session that inserts a row into the reference app's ``users`` table
    (``quartmail.app.models.User``), flushed (the confirmation link needs the user's id),
    and commits; with and without ``await mail.outbox.enqueue(session, message)`` before the
    commit (no dispatcher runs; the messages are built beforehand). Printed: microseconds per
    sign-up, the part spent in the ``enqueue()`` call, and the ratio.

Each section drops and creates its tables (so that they match the code measured); every
variant starts from an empty ``mail_outbox`` table and checks afterwards that each row
is ``sent`` and that the SMTP server received exactly as many messages. The database is
``--database-url`` (default ``quartmail_bench`` on the local server, created if missing; never
the tests' database). Child processes stop when their stdin closes (so they never outlive the
benchmark, even killed) and are terminated, then killed, if they linger.

Run (from the project root; Linux, for ``/proc``)::

    /work/venv/bin/python bench/outbox.py --help
    /work/venv/bin/python bench/outbox.py                  # everything, about 3 minutes
    /work/venv/bin/python bench/outbox.py --quick          # a smoke test
    /work/venv/bin/python bench/outbox.py --only slow --slow-n 400 -v   # every round too
    /work/venv/bin/python bench/outbox.py --only fast --profile   # cProfile of one dispatcher

The exit status is 0 whatever the figures are (timings on a shared machine are noisy); it is
1 if a message went missing (or a row was not sent), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import logging
import os
import pstats
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO, Any

from _server import ServerProcess, read_commands, reply, shut_down, smtp_server_process
from quart import Quart
from send import build_message
from sqlalchemy import MetaData, delete, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from quartmail import Mail, Message, SendResult
from quartmail.outbox import Outbox, OutboxBase, OutboxMessage

SECTIONS = ("fast", "slow", "signup")
DEFAULT_URL = "postgresql+asyncpg://quartmail:quartmail@127.0.0.1:5432/quartmail_bench"
TESTS_DATABASE = "quartmail_test"  # the tests' database: never this one
POOL_SIZE = 8  # MAIL_POOL_SIZE of every process
SLOW_DELAY = 0.05  # seconds the slow server takes per DATA
DISPATCHERS = (1, 2, 4)
SCALE_TARGET = 3.0  # slow server: 4 dispatchers / 1 dispatcher
COST_TARGET = 0.5  # fast server: 1 dispatcher / in-memory (cost per mail within 2x)
ENQUEUE_BATCH = 500  # messages per enqueueing transaction
POLL_INTERVAL = 0.05  # seconds between two looks at the table while dispatchers run
STALL_TIMEOUT = 30.0  # give up when the table has not changed for this long
START_TIMEOUT = 60.0  # seconds for a child to import and get ready
REPLY_TIMEOUT = 120.0  # seconds for a child to answer a command
STOP_TIMEOUT = 10.0  # seconds for a child to exit after "stop"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# CPU time from /proc (Linux)


def machine_cpu() -> float:
    """Seconds of CPU time the whole machine has spent busy (all CPUs), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def process_cpu(pid: int) -> float | None:
    """Seconds of CPU time (user + system) of one process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            data = stat.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def postgres_cpu(database: str) -> dict[int, float]:
    """CPU seconds of the PostgreSQL processes working for *database*: its backends
    (``postgres: ... user database host(port) ...``) and the shared ones (WAL writer,
    checkpointer...), not the backends of other databases (the tests', say)."""
    found: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/comm", encoding="ascii", errors="replace") as comm:
                if comm.read().strip() != "postgres":
                    continue
            with open(f"/proc/{name}/cmdline", encoding="utf-8", errors="replace") as cmdline:
                title = cmdline.read().replace("\0", " ")
        except OSError:
            continue
        backend = "(" in title or "[local]" in title  # a client's: "host(port)" or a socket
        if backend and f" {database} " not in title:
            continue
        seconds = process_cpu(int(name))
        if seconds is not None:
            found[int(name)] = seconds
    return found


def postgres_cpu_since(before: dict[int, float], database: str) -> float:
    """CPU seconds of PostgreSQL for *database* since *before*; a backend started since
    counts from zero (one that exited since is lost: take both readings while the clients
    are connected)."""
    after = postgres_cpu(database)
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


@dataclass
class CPUReading:
    """CPU counters at one moment, for the clients, the SMTP server, PostgreSQL, the machine."""

    server: float
    postgres: dict[int, float]
    bench: float  # this process (the polling)
    machine: float

    @classmethod
    def take(cls, server: ServerProcess, database: str) -> CPUReading:
        return cls(
            server=process_cpu(server.pid) or 0.0,
            postgres=postgres_cpu(database),
            bench=time.process_time(),
            machine=machine_cpu(),
        )


# Child processes: dispatchers and the in-memory baseline


class Child:
    """A child process of this script (``--child``), driven by lines on its stdin and
    answering JSON lines on its stdout. It stops when its stdin closes."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # stderr is inherited: the child's warnings and tracebacks show up in the terminal.
        )
        self.pid = self.process.pid
        self._lines: queue.Queue[bytes] = queue.Queue()
        stdout = self.process.stdout
        assert stdout is not None
        threading.Thread(target=self._read, args=(stdout,), daemon=True).start()

    def _read(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            self._lines.put(line)
        self._lines.put(b"")

    def send(self, command: str) -> None:
        stdin = self.process.stdin
        if stdin is None or self.process.poll() is not None:
            raise RuntimeError(f"the child process {self.pid} is not running")
        stdin.write(command.encode("ascii") + b"\n")
        stdin.flush()

    def reply(self, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(
                f"the child process {self.pid} did not answer within {timeout:g} s"
            ) from None
        if not line:
            raise RuntimeError(
                f"the child process {self.pid} exited (code {self.process.wait()}); "
                "see its traceback above"
            )
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def areply(self, wait: float = REPLY_TIMEOUT) -> dict[str, Any]:
        """:meth:`reply` in a thread, so that the event loop goes on meanwhile."""
        return await asyncio.to_thread(self.reply, wait)

    def alive(self) -> bool:
        return self.process.poll() is None

    def shut_down(self) -> None:
        """Close stdin (the child's signal to stop); terminate, then kill, if it lingers."""
        shut_down(self.process)


@contextlib.asynccontextmanager
async def children(options: list[dict[str, Any]]) -> AsyncIterator[list[Child]]:
    """Start one child per options, wait until all are ready, and shut them all down at
    the end of the block, whatever happens."""
    started: list[Child] = []
    try:
        for option in options:
            started.append(Child(option))
        for child in started:
            ready = await child.areply(START_TIMEOUT)
            if not ready.get("ready"):
                raise RuntimeError(f"child {child.pid}: unexpected reply {ready!r}")
        yield started
    finally:
        await asyncio.gather(*(asyncio.to_thread(child.shut_down) for child in started))


async def child_main(options: dict[str, Any]) -> None:
    """A child: ``kind`` "outbox" (a dispatcher) or "background" (the in-memory baseline).

    Protocol: answers ``{"ready": ...}`` once set up; on ``go`` starts the app's lifespan
    (and, for "background", sends every message and answers ``{"end": wall time}`` when the
    last future resolved); on ``stop`` (or stdin closed) shuts the app down and answers
    ``{"cpu": seconds since go}``, then exits."""
    kind = options["kind"]
    app = Quart(f"bench-outbox-{kind}")
    app.config.update(options["mail_config"])
    app.config["MAIL_POOL_SIZE"] = options["pool_size"]
    mail = Mail(app)
    engine: AsyncEngine | None = None
    messages: list[Message] = []
    if kind == "outbox":
        engine = create_async_engine(options["database_url"])
        mail.init_outbox(app, engine)
        async with engine.connect() as connection:  # a running app's engine has connections
            await connection.execute(text("SELECT 1"))
    else:
        messages = [build_message(i) for i in range(options["n"])]

    commands = read_commands()
    reply({"ready": True, "pid": os.getpid()})
    if (command := await commands.get()) != "go":
        while command is not None:  # wait for EOF, as below
            command = await commands.get()
        return
    profiler = cProfile.Profile() if options.get("profile") else None
    if profiler is not None:
        profiler.enable()
    cpu_start = time.process_time()
    await app.startup()
    try:
        if kind == "background":
            futures = [mail.send_background(message) for message in messages]
            first: list[float] = []
            futures[0].add_done_callback(lambda _: first.append(time.time()))
            results: list[SendResult | BaseException] = await asyncio.gather(
                *futures, return_exceptions=True
            )
            end = time.time()
            errors = [repr(r) for r in results if isinstance(r, BaseException)]
            error = errors[0] if errors else None
            reply({"first": first[0], "end": end, "errors": len(errors), "error": error})
        stop = await commands.get()  # "stop", or None when the parent went away
    finally:
        await app.shutdown()
        cpu = time.process_time() - cpu_start
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(options["profile"])
        if engine is not None:
            await engine.dispose()
    reply({"cpu": cpu})
    # Exit once the parent closes our stdin, so that the reader thread has ended (a daemon
    # thread blocked in stdin at interpreter shutdown is a fatal error).
    while stop is not None:
        stop = await commands.get()


def run_child(options_json: str) -> None:
    # Ctrl-C reaches the whole process group; the parent handles it and closes our stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.WARNING, format=f"[child {os.getpid()}] %(name)s: %(message)s"
    )
    asyncio.run(child_main(json.loads(options_json)))


# Delivery rate


@dataclass
class Run:
    """One timed run of one variant."""

    elapsed: float  # seconds, from the signal to start to the last mail delivered
    first: float  # seconds from the signal to the first mail delivered
    n: int
    clients_cpu: float  # seconds, summed over the child processes
    server_cpu: float
    postgres_cpu: float
    bench_cpu: float
    machine_cpu: float

    @property
    def rate(self) -> float:
        return self.n / self.elapsed

    @property
    def others_cpu(self) -> float:
        """CPU seconds of the machine not spent by the processes measured."""
        ours = self.clients_cpu + self.server_cpu + self.postgres_cpu + self.bench_cpu
        return self.machine_cpu - ours

    def per_mail(self, seconds: float) -> float:
        """Microseconds per mail."""
        return seconds / self.n * 1e6


@dataclass
class Result:
    """The runs of one variant in one section."""

    section: str
    variant: str  # "in-memory", "outbox1", "outbox2", "outbox4"
    label: str
    runs: list[Run] = field(default_factory=list)

    @property
    def best(self) -> Run:
        return max(self.runs, key=lambda run: run.rate)

    @property
    def median(self) -> float:
        return statistics.median(run.rate for run in self.runs)


class Delivery:
    """The delivery variants of one section, bound to one SMTP server and one database."""

    def __init__(
        self, name: str, server: ServerProcess, engine: AsyncEngine, args: argparse.Namespace
    ) -> None:
        self.name = name
        self.server = server
        self.engine = engine
        self.url: str = args.database_url
        self.database = str(make_url(self.url).database)
        self.pool_size: int = args.pool_size
        # The benchmark's own app, only to enqueue (its dispatcher never starts).
        self.app = Quart("bench-outbox-enqueue")
        self.app.config.update(server.mail_config())
        self.mail = Mail(self.app)
        self.outbox: Outbox = self.mail.init_outbox(self.app, engine)
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self.sent = 0  # messages the server should have received
        self.ok = True
        self.profile: str | None = None  # a file for the next single dispatcher's cProfile

    def child_options(self, kind: str, n: int = 0) -> dict[str, Any]:
        options: dict[str, Any] = {
            "kind": kind,
            "mail_config": self.server.mail_config(),
            "pool_size": self.pool_size,
            "database_url": self.url,
            "n": n,
        }
        return options

    async def empty_outbox(self) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(text("TRUNCATE mail_outbox RESTART IDENTITY"))
            left = await connection.scalar(select(func.count()).select_from(OutboxMessage))
        if left != 0:
            raise RuntimeError(f"the outbox table still has {left} rows after TRUNCATE")

    async def enqueue(self, n: int) -> None:
        """*n* messages into the outbox, in transactions of ENQUEUE_BATCH, as an app would."""
        outbox = self.outbox
        for first in range(0, n, ENQUEUE_BATCH):
            messages = [build_message(i) for i in range(first, min(n, first + ENQUEUE_BATCH))]
            async with self.sessions.begin() as session:
                for message in messages:
                    await outbox.enqueue(session, message)
        counts = await self.counts()
        if counts != {"queued": n}:
            raise RuntimeError(f"after enqueueing {n} messages the outbox holds {counts}")

    async def counts(self) -> dict[str, int]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                select(OutboxMessage.state, func.count()).group_by(OutboxMessage.state)
            )
            return {state: int(count) for state, count in rows}

    async def wait_until_done(self, n: int, started: list[Child]) -> dict[str, int]:
        """Poll the table until no row is queued or sending (or nothing changes for
        STALL_TIMEOUT, or a dispatcher died); the counts by state."""
        last: dict[str, int] = {}
        changed = time.monotonic()
        while True:
            counts = await self.counts()
            if not counts.get("queued") and not counts.get("sending"):
                return counts
            if counts != last:
                last, changed = counts, time.monotonic()
            elif time.monotonic() - changed > STALL_TIMEOUT:
                print(f"  ERROR: no progress for {STALL_TIMEOUT:g} s: {counts}", file=sys.stderr)
                return counts
            dead = [child.pid for child in started if not child.alive()]
            if dead:
                print(f"  ERROR: dispatcher(s) {dead} exited: {counts}", file=sys.stderr)
                return counts
            await asyncio.sleep(POLL_INTERVAL)

    async def run_outbox(self, processes: int, n: int) -> Run:
        await self.empty_outbox()
        await self.enqueue(n)
        profile = self.profile if processes == 1 else None
        options = [self.child_options("outbox") for _ in range(processes)]
        if profile is not None:
            options[0]["profile"] = profile
        async with children(options) as started:
            before = CPUReading.take(self.server, self.database)
            start = time.time()
            for child in started:
                child.send("go")
            counts = await self.wait_until_done(n, started)
            after = CPUReading.take(self.server, self.database)
            postgres = postgres_cpu_since(before.postgres, self.database)
            async with self.engine.connect() as connection:
                first_sent, last_sent = (
                    await connection.execute(
                        select(func.min(OutboxMessage.sent_at), func.max(OutboxMessage.sent_at))
                    )
                ).one()
            for child in started:
                child.send("stop")
            clients = sum([(await child.areply())["cpu"] for child in started])
        self.sent += counts.get("sent", 0)
        if counts != {"sent": n} or first_sent is None or last_sent is None:
            print(f"  ERROR: {processes} dispatcher(s): {counts}, not {n} sent", file=sys.stderr)
            self.ok = False
            return Run(float("inf"), float("inf"), n, clients, 0.0, 0.0, 0.0, 0.0)
        return Run(
            elapsed=last_sent.timestamp() - start,
            first=first_sent.timestamp() - start,
            n=n,
            clients_cpu=clients,
            server_cpu=after.server - before.server,
            postgres_cpu=postgres,
            bench_cpu=after.bench - before.bench,
            machine_cpu=after.machine - before.machine,
        )

    async def run_background(self, n: int) -> Run:
        async with children([self.child_options("background", n)]) as (child,):
            before = CPUReading.take(self.server, self.database)
            start = time.time()
            child.send("go")
            done = await child.areply()
            after = CPUReading.take(self.server, self.database)
            postgres = postgres_cpu_since(before.postgres, self.database)
            child.send("stop")
            clients: float = (await child.areply())["cpu"]
        if done["errors"]:
            print(f"  ERROR: {done['errors']} failed, e.g. {done['error']}", file=sys.stderr)
            self.ok = False
        self.sent += n - done["errors"]
        return Run(
            elapsed=done["end"] - start,
            first=done["first"] - start,
            n=n,
            clients_cpu=clients,
            server_cpu=after.server - before.server,
            postgres_cpu=postgres,
            bench_cpu=after.bench - before.bench,
            machine_cpu=after.machine - before.machine,
        )

    async def run(self, variant: str, n: int) -> Run:
        if variant == "in-memory":
            return await self.run_background(n)
        return await self.run_outbox(int(variant.removeprefix("outbox")), n)

    def check_received(self) -> bool:
        stats = self.server.stats()
        ok = stats["received"] == self.sent
        print(
            f"  server: {stats['received']} of {self.sent} messages received, "
            f"{stats['connections']} SMTP sessions (warm-up included)"
            + ("" if ok else "  <-- MISSING")
        )
        return ok and self.ok


def delivery_variants(pool_size: int) -> dict[str, str]:
    labels = {"in-memory": f"in-memory send_background, 1 process x{pool_size}"}
    for k in DISPATCHERS:
        labels[f"outbox{k}"] = f"outbox, {k} dispatcher{'s' if k > 1 else ' '} x{pool_size}"
    return labels


async def delivery_section(
    name: str, engine: AsyncEngine, args: argparse.Namespace
) -> tuple[list[Result], bool]:
    delay = SLOW_DELAY if name == "slow" else 0.0
    n: int = args.slow_n if name == "slow" else args.n
    with smtp_server_process(data_delay=delay) as server:
        bench = Delivery(name, server, engine, args)
        await recreate_tables(engine, OutboxBase.metadata)
        what = f"{delay * 1000:g} ms per DATA" if delay else "the server answers at once"
        print(
            f"\n[{name}] {what}; {n} mails x {args.rounds} round(s), MAIL_POOL_SIZE="
            f"{args.pool_size} per process; SMTP server in process {server.pid}"
        )
        labels = delivery_variants(args.pool_size)
        results = [Result(name, variant, label) for variant, label in labels.items()]
        if args.warmup:
            for variant in ("in-memory", "outbox1"):  # imports, caches, PostgreSQL's too
                await bench.run(variant, args.warmup)
        for round_ in range(args.rounds):
            for result in results:
                run = await bench.run(result.variant, n)
                result.runs.append(run)
                if args.verbose:
                    print(
                        f"  round {round_ + 1}, {result.label}: {run.rate:.1f} msg/s, first "
                        f"mail after {run.first * 1000:.0f} ms, anything else "
                        f"{run.per_mail(run.others_cpu):.0f} µs/mail"
                    )
        print_delivery(results, args.rounds)
        print_targets(results)
        ok = bench.check_received()
    return results, ok


def print_delivery(results: list[Result], rounds: int) -> None:
    base = next((r for r in results if r.variant == "in-memory"), None)
    width = max(len(r.label) for r in results)
    for r in results:
        best = r.best
        line = f"  {r.label + ':':<{width + 1}} {best.rate:7.1f} msg/s"
        if rounds > 1:
            line += f" (median {r.median:7.1f})"
        if base is not None:
            line += f"  = {best.rate / base.best.rate:4.2f}x in-memory"
        print(line)
    print(
        "  best round: first mail delivered after (ms); CPU per mail (µs): clients / "
        "SMTP server / PostgreSQL / this script (polling) / anything else (other users, "
        "the kernel) / whole machine"
    )
    for r in results:
        best = r.best
        figures = (
            best.clients_cpu,
            best.server_cpu,
            best.postgres_cpu,
            best.bench_cpu,
            best.others_cpu,
            best.machine_cpu,
        )
        print(
            f"  {r.label + ':':<{width + 1}} {best.first * 1000:5.0f} ms;  "
            + " / ".join(f"{best.per_mail(seconds):5.0f}" for seconds in figures)
        )


def check_targets(results: list[Result]) -> list[tuple[str, bool, float]]:
    """(description, met, ratio) for each target whose variants ran."""
    found = {(r.section, r.variant): r for r in results}
    checked = []
    one, four = found.get(("slow", "outbox1")), found.get(("slow", "outbox4"))
    if one is not None and four is not None:
        ratio = four.best.rate / one.best.rate
        text = f"{SLOW_DELAY * 1000:g} ms server: 4 dispatchers >= {SCALE_TARGET:g}x 1 dispatcher"
        checked.append((text, ratio >= SCALE_TARGET, ratio))
    base, one = found.get(("fast", "in-memory")), found.get(("fast", "outbox1"))
    if base is not None and one is not None:
        ratio = one.best.rate / base.best.rate
        text = f"fast server: 1 dispatcher >= {COST_TARGET:g}x in-memory (cost/mail within 2x)"
        checked.append((text, ratio >= COST_TARGET, ratio))
    return checked


def print_targets(results: list[Result]) -> None:
    for text_, met, ratio in check_targets(results):
        print(f"  target: {text_}: {'MET' if met else 'NOT MET'} ({ratio:.2f}x)")


# Enqueue cost per sign-up


@dataclass
class SignupResult:
    label: str
    per_signup: list[float] = field(default_factory=list)  # µs per sign-up, per round
    in_enqueue: list[float] = field(default_factory=list)  # µs of it in enqueue(), per round

    @property
    def best(self) -> int:
        """The index of the best round."""
        return min(range(len(self.per_signup)), key=self.per_signup.__getitem__)


async def signup_section(engine: AsyncEngine, args: argparse.Namespace) -> tuple[float, bool]:
    """The µs per sign-up with and without the enqueue; returns their ratio, and whether
    every row was where it should be."""
    from quartmail.app.models import Base, User  # the app's package is slow to import

    await recreate_tables(engine, Base.metadata)
    await recreate_tables(engine, OutboxBase.metadata)
    app = Quart("bench-outbox-signup")
    mail = Mail(app)
    outbox = mail.init_outbox(app, engine)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    count: int = args.signups
    messages = [build_message(i) for i in range(count)]
    serial = 0
    ok = True

    async def signups(with_outbox: bool, number: int) -> tuple[float, float]:
        """*number* sign-ups from empty tables; (seconds in all, seconds in enqueue())."""
        nonlocal serial, ok
        async with engine.begin() as connection:
            await connection.execute(text("TRUNCATE mail_outbox RESTART IDENTITY"))
            await connection.execute(delete(User))
        in_enqueue = 0.0
        start = time.perf_counter()
        for i in range(number):
            serial += 1
            async with sessions() as session, session.begin():
                user = User(username=f"user{serial}")
                session.add(user)
                await session.flush()  # the user's id, for the confirmation link
                if with_outbox:
                    before = time.perf_counter()
                    await outbox.enqueue(session, messages[i])
                    in_enqueue += time.perf_counter() - before
        elapsed = time.perf_counter() - start
        async with engine.connect() as connection:
            users = await connection.scalar(select(func.count()).select_from(User))
            mails = await connection.scalar(select(func.count()).select_from(OutboxMessage))
        if users != number or mails != (number if with_outbox else 0):
            print(f"  ERROR: {users} users and {mails} outbox rows after {number} sign-ups")
            ok = False
        return elapsed, in_enqueue

    print(
        f"\n[signup] {count} sign-ups x {args.rounds} round(s), one after another, each a "
        "transaction: INSERT a user (flushed), [enqueue a mail], COMMIT"
    )
    results = {
        False: SignupResult("INSERT user, COMMIT"),
        True: SignupResult("INSERT user + outbox.enqueue(), COMMIT"),
    }
    for with_outbox in results:  # warm-up: statement caches, prepared statements
        await signups(with_outbox, min(count, 100))
    for _ in range(args.rounds):
        for with_outbox, result in results.items():
            elapsed, in_enqueue = await signups(with_outbox, count)
            result.per_signup.append(elapsed / count * 1e6)
            result.in_enqueue.append(in_enqueue / count * 1e6)
    async with engine.begin() as connection:
        await connection.execute(text("TRUNCATE mail_outbox RESTART IDENTITY"))
        await connection.execute(delete(User))

    width = max(len(r.label) for r in results.values())
    for result in results.values():
        best = result.best
        line = f"  {result.label + ':':<{width + 1}} {result.per_signup[best]:7.0f} µs/sign-up"
        if args.rounds > 1:
            line += f" (median {statistics.median(result.per_signup):7.0f})"
        if result is results[True]:
            line += f", of which enqueue() {result.in_enqueue[best]:.0f} µs"
        print(line)
    plain, with_mail = results[False], results[True]
    plain_us = plain.per_signup[plain.best]
    mail_us = with_mail.per_signup[with_mail.best]
    ratio = mail_us / plain_us
    print(
        f"  enqueue cost: +{mail_us - plain_us:.0f} µs per sign-up, "
        f"{ratio:.2f}x the transaction without it"
    )
    return ratio, ok


# Database


async def ensure_database(url: str) -> None:
    """Create the benchmark's database if it does not exist (the role needs CREATEDB)."""
    parsed = make_url(url)
    name = parsed.database
    if not name:
        raise SystemExit("--database-url must name a database")
    admin = create_async_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            exists = await connection.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            )
            if not exists:
                await connection.execute(text(f'CREATE DATABASE "{name}"'))
                print(f"created database {name}")
    finally:
        await admin.dispose()


async def recreate_tables(engine: AsyncEngine, metadata: MetaData) -> None:
    """Drop and create the tables of *metadata* in the benchmark's own database, so that
    they match the code being measured (``create_all`` alone leaves an older table as is)."""
    async with engine.begin() as connection:
        await connection.run_sync(metadata.drop_all)
        await connection.run_sync(metadata.create_all)


# Main


async def benchmark(args: argparse.Namespace) -> int:
    await ensure_database(args.database_url)
    engine = create_async_engine(args.database_url)
    ok = True
    results: list[Result] = []
    signup_ratio: float | None = None
    try:
        for name in ("fast", "slow"):
            if name not in args.sections:
                continue
            if args.profile:
                ok = await profile_dispatcher(name, engine, args) and ok
                continue
            section_results, section_ok = await delivery_section(name, engine, args)
            results += section_results
            ok = ok and section_ok
        if "signup" in args.sections and not args.profile:
            signup_ratio, signup_ok = await signup_section(engine, args)
            ok = ok and signup_ok
    finally:
        await engine.dispose()

    if results:
        print("\nSummary")
        labels = delivery_variants(args.pool_size)
        width = max(len(f"{r.section}: {labels[r.variant]}") for r in results)
        print(f"  {'section / variant':<{width}}  best msg/s   median  x in-memory")
        base = {r.section: r.best.rate for r in results if r.variant == "in-memory"}
        for r in results:
            label = f"{r.section}: {r.label}"
            times = f"{r.best.rate / base[r.section]:11.2f}" if r.section in base else ""
            print(f"  {label:<{width}}  {r.best.rate:10.1f} {r.median:8.1f}  {times}")
    if results and signup_ratio is not None:
        print(f"  signup: enqueue + commit = {signup_ratio:.2f}x the transaction without it")
    targets = check_targets(results)
    if targets:
        print("Targets")
        for text_, met, ratio in targets:
            print(f"  {text_}: {'MET' if met else 'NOT MET'} ({ratio:.2f}x)")
    if not ok:
        print("ERROR: a message went missing or a row was not sent", file=sys.stderr)
    return 0 if ok else 1


async def profile_dispatcher(name: str, engine: AsyncEngine, args: argparse.Namespace) -> bool:
    """One dispatcher delivering ``-n`` (or ``--slow-n``) mails under cProfile (from its
    start-up to its shutdown); prints the top functions. SQLAlchemy's async layer runs on
    greenlets, which blur cProfile's cumulative times: read its tottime column first.
    Returns whether every mail arrived."""
    delay = SLOW_DELAY if name == "slow" else 0.0
    n: int = args.slow_n if name == "slow" else args.n
    handle, path = tempfile.mkstemp(prefix="quartmail-outbox-", suffix=".prof")
    os.close(handle)
    try:
        with smtp_server_process(data_delay=delay) as server:
            bench = Delivery(name, server, engine, args)
            await recreate_tables(engine, OutboxBase.metadata)
            await bench.run("outbox1", min(n, 100))  # warm-up
            bench.profile = path
            run = await bench.run("outbox1", n)
            print(f"== [{name}] 1 dispatcher, {n} mails: {run.rate:.0f} msg/s under cProfile")
            for sort in ("tottime", "cumulative"):
                out = io.StringIO()
                pstats.Stats(path, stream=out).sort_stats(sort).print_stats(args.top)
                print(out.getvalue()[out.getvalue().index("   ncalls") :].rstrip(), end="\n\n")
            return bench.check_received()
    finally:
        os.unlink(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Mails/second through quartmail's durable outbox with 1, 2 and 4 "
        "dispatcher processes on PostgreSQL, against send_background, and the enqueue "
        "cost per sign-up (see the module docstring).",
    )
    parser.add_argument(
        "-n", type=int, default=None, help="mails per run, fast server (default 2000)"
    )
    parser.add_argument(
        "--slow-n", type=int, default=None, help="mails per run, 50 ms server (default 800)"
    )
    parser.add_argument(
        "--signups", type=int, default=None, help="sign-ups per round (default 1000)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds; the best is reported (default 3)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="mails per warm-up run (default 100; 0: none)"
    )
    parser.add_argument(
        "--pool-size", type=int, default=POOL_SIZE, help=f"MAIL_POOL_SIZE (default {POOL_SIZE})"
    )
    parser.add_argument(
        "--database-url",
        default=DEFAULT_URL,
        help="the benchmark's own PostgreSQL database, created if missing (default %(default)s)",
    )
    parser.add_argument(
        "--only",
        dest="sections",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: -n 300, --slow-n 160, --signups 200, 1 round, no warm-up",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the benchmark, run one dispatcher under cProfile (fast and/or slow)",
    )
    parser.add_argument("--top", type=int, default=30, help="functions shown with --profile")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print every round of the delivery sections"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = {"n": 300, "slow_n": 160, "signups": 200, "rounds": 1, "warmup": 0}
    default = {"n": 2000, "slow_n": 800, "signups": 1000, "rounds": 3, "warmup": 100}
    for key, value in (quick if args.quick else default).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.n, args.slow_n, args.signups, args.rounds, args.pool_size) < 1:
        parser.error("-n, --slow-n, --signups, --rounds and --pool-size must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if make_url(args.database_url).database == TESTS_DATABASE:
        parser.error(f"{TESTS_DATABASE} is the tests' database; use a database of your own")
    if not args.sections:
        args.sections = list(SECTIONS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args.child)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    print(
        f"quartmail outbox benchmark: sections {', '.join(args.sections)}; "
        f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}; "
        f"database {make_url(args.database_url).render_as_string(hide_password=True)}"
    )
    return asyncio.run(benchmark(args))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
