"""MAIL_RATE_LIMIT: used up to the limit, and never over it, in one process and in four.

``--limit`` N per second; each run offers N x (``--seconds`` + 1) mails at once, more than
the limit lets through in ``--seconds``, so that the limit, not the demand, sets the pace.
Variants: ``memory``: ``send_background`` in 1 process (the slots in memory); ``outbox
xK``: the mails enqueued, then K dispatcher processes (``mail.init_outbox``, the slots in
PostgreSQL, shared) start at once. The SMTP server (another process) notes when each MAIL
FROM arrives; from its clock: the achieved rate, the MAIL FROMs in the ``--seconds`` from
the first one, per second, and the most MAIL FROMs in any window of one second. Ratios to
the limit; targets: achieved >= 0.95x (not under-used), busiest window <= 1.00x (never
over). ``MAIL_POOL_SIZE`` ``--pool-size`` in every process. The outbox's database:
``--database-url``, by default ``quartmail_bench_ratelimit`` on the server of
QUARTMAIL_TEST_POSTGRES (else localhost), created if missing; never the tests' database.
"""

from __future__ import annotations

import os
from typing import Any

import harness
import outbox as outbox_bench  # bench/outbox.py: its child processes and its Delivery
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from quartmail.outbox import OutboxBase
from quartmail.testing import most_in_window

DATABASE = "quartmail_bench_ratelimit"
# The local server CI starts (.ci/run), when QUARTMAIL_TEST_POSTGRES names none.
LOCAL_SERVER = "postgresql+asyncpg://quartmail:quartmail@127.0.0.1:5432/postgres"


def default_url() -> str:
    """``DATABASE`` on the server of QUARTMAIL_TEST_POSTGRES, else on the local one."""
    tests = os.environ.get("QUARTMAIL_TEST_POSTGRES")
    url = make_url(tests) if tests else make_url(LOCAL_SERVER)
    return url.set(database=DATABASE).render_as_string(hide_password=False)


class RateBench:
    """The variants, bound to one SMTP server and one database."""

    def __init__(self, server: harness.SMTPServer, bench: outbox_bench.Delivery, args: Any):
        self.server, self.bench, self.args = server, bench, args
        self.config = {**server.mail_config(), "MAIL_RATE_LIMIT": f"{args.limit}/s"}
        self.ok = True
        #: Per variant label: (achieved per second, most in any second) of each run.
        self.figures: dict[str, list[tuple[float, int]]] = {}

    async def run(self, label: str, dispatchers: int) -> None:
        """One run: N x (seconds + 1) mails, through *dispatchers* processes (0: memory)."""
        limit, seconds = self.args.limit, self.args.seconds
        n = limit * (seconds + 1)
        options = {
            "mail_config": self.config,
            "pool_size": self.args.pool_size,
            "database_url": self.args.database_url,
        }
        if dispatchers:
            await self.bench.enqueue(n)
            children = [{"kind": "outbox", "n": 0, **options} for _ in range(dispatchers)]
        else:
            children = [{"kind": "memory", "n": n, **options}]
        await self.server.mail_times()  # forget the times of anything before
        async with harness.children(outbox_bench.__file__, children) as started:
            for each in started:
                await each.send("go")
            if dispatchers:
                await self.bench.delivered(n, started)
            else:
                done = await started[0].reply()
                self.server.expected += n - done["errors"]
                if done["errors"]:
                    print(f"  ERROR: {done['errors']} not sent, e.g. {done['error']}")
                    self.ok = False
            for each in started:
                await each.ask("stop")
        times = sorted(await self.server.mail_times())
        if len(times) < n:
            print(f"  ERROR: {label}: {len(times)} MAIL FROM for {n} mails")
            self.ok = False
            return
        steady = sum(1 for time in times if time < times[0] + seconds)
        achieved = steady / seconds
        most = most_in_window(times, 1.0)
        self.figures.setdefault(label, []).append((achieved, most))

    def report(self) -> None:
        limit = self.args.limit
        print(
            f"  limit {limit}/s; per run: MAIL FROMs per second in the first {self.args.seconds}"
            " s, and the most in any 1 s window"
        )
        for label, runs in self.figures.items():
            achieved = min(rate for rate, _ in runs)  # the worst run, for each figure
            most = max(most for _, most in runs)
            print(
                f"  {label + ':':<26} achieved {achieved:7.1f}/s = {achieved / limit:4.2f}x; "
                f"busiest second {most:5d} = {most / limit:4.2f}x"
            )
            harness.target(f"{label}: achieved rate", achieved / limit, at_least=0.95)
            harness.target(f"{label}: busiest second", most / limit, at_most=1.0)


async def benchmark() -> int:
    parser = harness.Arguments(
        {
            "limit": (20, 20, "MAIL_RATE_LIMIT, per second"),
            "seconds": (10, 3, "seconds measured per run"),
            "rounds": (2, 1, "runs per variant; the worst is reported"),
            "pool_size": (8, 8, "MAIL_POOL_SIZE of every process"),
        },
        only=("memory", "outbox1", "outbox4"),
    )
    parser.add_argument("--database-url", default=default_url(), help="default %(default)s")
    args = parser.parse()
    if make_url(args.database_url).database in {"quartmail_test", None}:
        parser.error("give a database of the benchmark's own, not the tests'")
    await outbox_bench.ensure_database(args.database_url)
    engine = create_async_engine(args.database_url)
    try:
        async with harness.smtp_server(mail_times=True) as server:
            await outbox_bench.recreate_tables(engine, OutboxBase.metadata)
            rates = RateBench(server, outbox_bench.Delivery(server, engine, args), args)
            variants = {"memory": 0, "outbox1": 1, "outbox4": 4}
            labels = {0: "memory, 1 process", 1: "outbox, 1 dispatcher", 4: "outbox, 4 dispatchers"}
            print(f"\n{args.limit}/s, {args.limit * (args.seconds + 1)} mails per run")
            for _ in range(args.rounds):
                for name in args.only:
                    dispatchers = variants[name]
                    await rates.run(labels[dispatchers], dispatchers)
            rates.report()
            ok = await server.check() and rates.ok and rates.bench.ok
    finally:
        await engine.dispose()
    return harness.finish(ok)


if __name__ == "__main__":
    harness.main(benchmark)
