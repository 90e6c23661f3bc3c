"""The durable outbox on PostgreSQL: msg/s with 1, 2, 4 dispatcher processes (the mails
enqueued first, untimed; to the greatest ``sent_at``) against ``send_background`` in one process
(``fast``: the server answers at once, ``slow``: 50 ms per DATA), and ``signup``: a user's INSERT
with and without ``outbox.enqueue``. Targets: fast, 1 dispatcher >= 0.5x in-memory; slow, 4
dispatchers >= 3x one. The database: ``--database-url``, else ``quartmail_bench`` on
QUARTMAIL_TEST_POSTGRES's server (created if missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import os
import tempfile
import time
from argparse import Namespace
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import harness
from sqlalchemy import MetaData, delete, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from quartmail.outbox import OutboxBase, OutboxMessage

STALL_TIMEOUT = 30.0  # give up when the table has not changed for this long


async def child(options: dict[str, Any], commands: harness.Commands) -> None:
    """A dispatcher ("outbox") or the in-memory baseline ("memory": sends ``n`` mails, then
    answers the time of the last result); its app starts on ``go``, stops at the end of stdin."""
    app, mail = harness.mail_app(options["mail_config"], MAIL_POOL_SIZE=options["pool_size"])
    engine = create_async_engine(options["database_url"])
    if options["kind"] == "outbox":
        mail.init_outbox(app, engine)
        async with engine.connect() as connection:  # a running app's engine has connections
            await connection.execute(text("SELECT 1"))
    messages = [harness.build_message(i) for i in range(options["n"])]
    harness.reply({"ready": True})
    profiler = cProfile.Profile()
    if await anext(commands, None) == "go":
        if options["profile"]:
            profiler.enable()
        await app.startup()
        try:
            # a mail not sent raises here: the child exits, and the parent with its traceback
            await asyncio.gather(*(mail.send_background(message) for message in messages))
            if messages:
                harness.reply({"end": time.time()})
            async for _ in commands:
                pass
        finally:
            await app.shutdown()
            if options["profile"]:
                profiler.dump_stats(options["profile"])  # (it disables the profiler)
    await engine.dispose()


class Runs:
    """Runs against one SMTP server (plus the ``MAIL_*`` *settings*) and one database."""

    def __init__(
        self, server: harness.SMTPServer, engine: AsyncEngine, args: Namespace, **settings: Any
    ) -> None:
        self.server, self.engine, self.args, self.ok = server, engine, args, True
        self.config = {**server.config, **settings}
        app, mail = harness.mail_app(self.config)  # only to enqueue: its dispatcher never starts
        self.outbox = mail.init_outbox(app, engine)
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def counts(self) -> dict[str, int]:
        async with self.engine.connect() as connection:
            query = select(OutboxMessage.state, func.count()).group_by(OutboxMessage.state)
            return {state: int(count) for state, count in await connection.execute(query)}

    async def enqueue(self, n: int) -> None:
        """Empty the table; *n* messages in, 500 a transaction, as an app would."""
        async with self.engine.begin() as connection:
            await connection.execute(text("TRUNCATE mail_outbox RESTART IDENTITY"))
        for first in range(0, n, 500):
            async with self.sessions.begin() as session:
                for i in range(first, min(n, first + 500)):
                    await self.outbox.enqueue(session, harness.build_message(i))
        if (counts := await self.counts()) != {"queued": n}:
            raise RuntimeError(f"after enqueueing {n} messages the outbox holds {counts}")

    async def delivered(self, n: int, started: list[harness.Child]) -> float:
        """Poll until no row is queued or sending (or no change for STALL_TIMEOUT, or a
        dispatcher died); the time of the last mail sent."""
        last: dict[str, int] = {}
        changed = time.monotonic()
        while (counts := await self.counts()).get("queued") or counts.get("sending"):
            if counts != last:
                last, changed = counts, time.monotonic()
            died = any(each.process.returncode is not None for each in started)
            if died or time.monotonic() - changed > STALL_TIMEOUT:
                break
            await asyncio.sleep(0.05)
        async with self.engine.connect() as connection:
            end = await connection.scalar(select(func.max(OutboxMessage.sent_at)))
        if counts != {"sent": n} or end is None:
            print(f"  ERROR: {len(started)} dispatcher(s): {counts}, not {n} sent")
            self.ok = False
            return float("inf")
        return float(end.timestamp())

    async def run(self, dispatchers: int, n: int, profile: str | None = None) -> float:
        """*n* mails through that many dispatcher processes (the first profiled into the file
        *profile*), or 0: the in-memory baseline; the seconds from the start to the last sent."""
        options = dict(mail_config=self.config, pool_size=self.args.pool_size, kind="outbox")
        options.update(database_url=self.args.database_url, n=0, profile=None)
        memory = {**options, "kind": "memory", "n": n}
        children = [{**options, "profile": profile}] + [options] * (dispatchers - 1)
        if dispatchers:
            await self.enqueue(n)
        self.server.expected += n
        async with harness.children(__file__, children if dispatchers else [memory]) as started:
            start = time.time()
            for each in started:
                await each.send("go")
            if dispatchers:
                return await self.delivered(n, started) - start
            return float((await started[0].ask(None))["end"]) - start


async def delivery(name: str, engine: AsyncEngine, args: Namespace) -> bool:
    """``fast`` or ``slow``: in-memory, then 1, 2, 4 dispatchers."""
    delay = 0.05 if name == "slow" else 0.0  # seconds the server takes per DATA
    n: int = args.slow_n if delay else args.n
    async with harness.smtp_server(data_delay=delay) as server:
        runs = Runs(server, engine, args)
        what = f"{delay * 1000:g} ms per DATA" if delay else "the server answers at once"
        print(f"\n[{name}] {what}; {n} mails x {args.rounds} round(s), pool {args.pool_size}")
        if args.profile:  # SQLAlchemy's async layer runs on greenlets: read tottime
            await runs.run(1, min(n, 100))  # warm-up
            with tempfile.TemporaryDirectory(prefix="quartmail-outbox-") as directory:
                profile = os.path.join(directory, "dispatcher.prof")
                print(f"== 1 dispatcher, {n} mails: {n / await runs.run(1, n, profile):.0f} msg/s")
                harness.print_profile(profile, args.top)
            return await server.check() and runs.ok
        variants = []
        for k in (0, 1, 2, 4):  # one warm-up for the outbox: the database is then warm for all
            label = f"outbox, {k} dispatcher(s)" if k else "in-memory send_background"
            run, warmup = partial(runs.run, k), args.warmup if k < 2 else 0
            variants.append(harness.Variant(f"{label} x{args.pool_size}", run, n, warmup))
        await harness.take_turns(variants, args.rounds, variants[0], "in-memory")
        a, b, vs, least = (
            (3, 1, "4 dispatchers vs 1", 3.0) if delay else (1, 0, "1 dispatcher vs in-memory", 0.5)
        )
        harness.target(f"{what}: {vs}", variants[a].best / variants[b].best, at_least=least)
        return await server.check() and runs.ok


async def signup(engine: AsyncEngine, args: Namespace) -> None:
    """The cost of ``outbox.enqueue`` in a sign-up's transaction."""
    from quartmail.app.models import Base, User  # the app's package is slow to import

    await recreate_tables(engine, Base.metadata, OutboxBase.metadata)
    app, mail = harness.mail_app({})
    outbox, n = mail.init_outbox(app, engine), args.signups
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def run(with_outbox: bool, count: int) -> float:
        async with engine.begin() as connection:
            await connection.execute(text("TRUNCATE mail_outbox RESTART IDENTITY"))
            await connection.execute(delete(User))
        start = time.perf_counter()
        for i in range(count):
            async with sessions() as session, session.begin():
                session.add(User(username=f"user{i}"))
                await session.flush()  # the user's id, for the confirmation link
                if with_outbox:
                    await outbox.enqueue(session, messages[i])
        elapsed = time.perf_counter() - start
        async with engine.connect() as connection:
            users = await connection.scalar(select(func.count()).select_from(User))
            mails = await connection.scalar(select(func.count()).select_from(OutboxMessage))
        if users != count or mails != (count if with_outbox else 0):
            raise RuntimeError(f"{users} users and {mails} outbox rows after {count} sign-ups")
        return elapsed

    print(f"\n[signup] {n} sign-ups x {args.rounds} round(s), one after another, each")
    print("  a transaction: INSERT a user (flushed), [enqueue a mail], COMMIT")
    messages, warmup = [harness.build_message(i) for i in range(n)], min(n, 100)  # caches warm
    plain = harness.Variant("INSERT user, COMMIT", partial(run, False), n, warmup)
    label = "INSERT user + outbox.enqueue(), COMMIT"
    with_mail = harness.Variant(label, partial(run, True), n, warmup)
    await harness.take_turns([plain, with_mail], args.rounds, plain, "without", "sign-ups/s")
    plain_us, mail_us = 1e6 / plain.best, 1e6 / with_mail.best
    ratio = mail_us / plain_us
    print(f"  enqueue cost: +{mail_us - plain_us:.0f} µs per sign-up, {ratio:.2f}x without it")


@contextlib.asynccontextmanager
async def database(
    parser: harness.Arguments, name: str
) -> AsyncIterator[tuple[Namespace, AsyncEngine]]:
    """The arguments (``--database-url`` added) and an engine on that database, else on *name*
    (created if missing: the role needs CREATEDB) on QUARTMAIL_TEST_POSTGRES's server, never
    the tests' own; the outbox's table made anew."""
    parser.add_argument("--database-url", help="the PostgreSQL database (see above)")
    args = parser.parse()
    server = args.database_url or os.environ.get("QUARTMAIL_TEST_POSTGRES")
    if server is None:
        parser.error("give --database-url, or QUARTMAIL_TEST_POSTGRES (a PostgreSQL server)")
    url = make_url(server) if args.database_url else make_url(server).set(database=name)
    if str(url.database).startswith("quartmail_test"):
        parser.error(f"{url.database} is the tests' database; use one of your own")
    args.database_url = url.render_as_string(hide_password=False)  # for the child processes
    admin = create_async_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            query = text("SELECT 1 FROM pg_database WHERE datname = :name")
            if not await connection.scalar(query, {"name": url.database}):
                await connection.execute(text(f'CREATE DATABASE "{url.database}"'))
    finally:
        await admin.dispose()
    engine = create_async_engine(url)
    try:
        await recreate_tables(engine, OutboxBase.metadata)
        yield args, engine
    finally:
        await engine.dispose()


async def recreate_tables(engine: AsyncEngine, *metadata: MetaData) -> None:
    """Drop and create the tables, so that they match the code measured."""
    async with engine.begin() as connection:
        for each in metadata:
            await connection.run_sync(each.drop_all)
            await connection.run_sync(each.create_all)


async def benchmark() -> int:
    parser = harness.Arguments(
        ("fast", "slow", "signup"),
        ("dispatcher",),
        n=(2000, 300, "mails per run, fast server"),
        slow_n=(800, 160, "mails per run, 50 ms server"),
        signups=(1000, 200, "sign-ups per round"),
        warmup=(100, 0, "mails per warm-up run"),
        pool_size=(8, 8, "MAIL_POOL_SIZE of every process"),
    )
    ok = True
    async with database(parser, "quartmail_bench") as (args, engine):
        for name in args.only:
            if name != "signup":
                ok = await delivery(name, engine, args) and ok
            elif not args.profile:
                await signup(engine, args)
    return harness.finish(ok)


if __name__ == "__main__":
    harness.main(benchmark, {"outbox": child, "memory": child})
