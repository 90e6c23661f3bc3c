"""MAIL_RATE_LIMIT: used up to the limit, and never over it, in one process and in four.

``--limit`` N per second; each run offers N x (``--seconds`` + 1) mails at once, more than
the limit lets through in ``--seconds``, so that the limit, not the demand, sets the pace.
Variants: ``memory``: ``send_background`` in 1 process (the slots in memory); ``outbox
xK``: the mails enqueued, then K dispatcher processes (``mail.init_outbox``, the slots in
PostgreSQL, shared) start at once (``outbox.py``'s runs). The SMTP server (another process)
notes when each MAIL FROM arrives; from its clock: the achieved rate, the MAIL FROMs in the
``--seconds`` from the first one, per second, and the most MAIL FROMs in any window of one
second. Ratios to the limit; targets: achieved >= 0.95x (not under-used), busiest window <=
1.00x (never over). ``MAIL_POOL_SIZE`` ``--pool-size`` in every process. The database:
``--database-url``, else ``quartmail_bench_ratelimit`` on the server QUARTMAIL_TEST_POSTGRES
names (created if missing); never the tests' own.
"""

from __future__ import annotations

import harness
import outbox

from quartmail.outbox import OutboxBase
from quartmail.testing import most_in_window

VARIANTS = {"memory": 0, "outbox1": 1, "outbox4": 4}  # name: dispatcher processes
LABELS = {0: "memory, 1 process", 1: "outbox, 1 dispatcher", 4: "outbox, 4 dispatchers"}


def report(figures: dict[int, list[tuple[float, int]]], limit: int, seconds: int) -> None:
    """Per variant, the worst of its runs: the lowest rate achieved, the busiest second."""
    print(f"  limit {limit}/s; per run: MAIL FROMs per second in the first {seconds} s, ", end="")
    print("and the most in any 1 s window")
    for dispatchers, runs in figures.items():
        label = LABELS[dispatchers]
        achieved, busiest = min(a for a, _ in runs), max(b for _, b in runs)
        print(
            f"  {label + ':':<26} achieved {achieved:7.1f}/s = {achieved / limit:4.2f}x; "
            f"busiest second {busiest:5d} = {busiest / limit:4.2f}x"
        )
        harness.target(f"{label}: achieved rate", achieved / limit, at_least=0.95)
        harness.target(f"{label}: busiest second", busiest / limit, at_most=1.0)


async def benchmark() -> int:
    parser = harness.Arguments(
        {
            "limit": (20, 20, "MAIL_RATE_LIMIT, per second"),
            "seconds": (10, 3, "seconds measured per run"),
            "rounds": (2, 1, "runs per variant; the worst is reported"),
            "pool_size": (8, 8, "MAIL_POOL_SIZE of every process"),
        },
        only=tuple(VARIANTS),
    )
    parser.add_argument("--database-url", help="see above")
    args = parser.parse()
    engine = await outbox.database(parser, args, "quartmail_bench_ratelimit")
    limit, seconds, n = args.limit, args.seconds, args.limit * (args.seconds + 1)
    figures: dict[int, list[tuple[float, int]]] = {}  # per variant: (achieved, busiest) a run
    try:
        async with harness.smtp_server() as server:
            await outbox.recreate_tables(engine, OutboxBase.metadata)
            runs = outbox.Runs(server, engine, args, MAIL_RATE_LIMIT=f"{limit}/s")
            print(f"\n{limit}/s, {n} mails per run")
            for _ in range(args.rounds):
                for dispatchers in (VARIANTS[name] for name in args.only):
                    await server.stats()  # forget the times of anything before
                    await runs.run(dispatchers, n)
                    times = sorted((await server.stats())["mail_times"])
                    if len(times) < n:
                        print(f"  ERROR: {LABELS[dispatchers]}: {len(times)} MAIL FROM for {n}")
                        runs.ok = False
                        continue
                    achieved = sum(1 for time in times if time < times[0] + seconds) / seconds
                    busiest = most_in_window(times, 1.0)
                    figures.setdefault(dispatchers, []).append((achieved, busiest))
            report(figures, limit, seconds)
            ok = await server.check() and runs.ok
    finally:
        await engine.dispose()
    return harness.finish(ok)


if __name__ == "__main__":
    harness.main(benchmark)
