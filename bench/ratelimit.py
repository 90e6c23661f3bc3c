"""MAIL_RATE_LIMIT: used up to the limit, never over it, with ``send_background`` in 1 process
(``memory``) and the outbox with 1 and 4 dispatchers (``outbox1``, ``outbox4``: ``outbox.py``'s
runs; the database ``quartmail_bench_ratelimit``). Each run offers more mail than the limit lets
through; from the SMTP server's clock, the worst of the rounds: targets achieved >= 0.95x the
limit in the first ``--seconds``, and the busiest second <= 1.00x.
"""

from __future__ import annotations

import math

import harness
import outbox

from quartmail.testing import most_in_window

LABELS = ("memory, 1 process", "outbox, 1 dispatcher", "outbox, 4 dispatchers")
VARIANTS = dict(zip(("memory", "outbox1", "outbox4"), LABELS, strict=True))  # name: label


async def benchmark() -> int:
    parser = harness.Arguments(
        tuple(VARIANTS),
        limit=(20, 20, "MAIL_RATE_LIMIT, per second"),
        seconds=(10, 3, "seconds measured per run"),
        rounds=(2, 1, "runs of each; the worst is reported"),
        pool_size=(8, 8, "MAIL_POOL_SIZE of every process"),
    )
    worst: dict[str, tuple[float, int]] = {}  # per variant: the lowest rate, the busiest second
    async with (
        outbox.database(parser, "quartmail_bench_ratelimit") as (args, engine),
        harness.smtp_server() as server,
    ):
        limit, seconds, n = args.limit, args.seconds, args.limit * (args.seconds + 1)
        runs = outbox.Runs(server, engine, args, MAIL_RATE_LIMIT=f"{limit}/s")
        print(f"\n{limit}/s, {n} mails per run")
        for _ in range(args.rounds):
            for name in args.only:
                await server.stats()  # forget the times of anything before
                await runs.run(int(name[-1]) if name != "memory" else 0, n)
                times = sorted((await server.stats())["mail_times"])
                if len(times) < n:
                    print(f"  ERROR: {VARIANTS[name]}: {len(times)} MAIL FROM for {n}")
                    runs.ok = False
                    continue
                rate = sum(1 for time in times if time < times[0] + seconds) / seconds
                achieved, busiest = worst.get(name, (math.inf, 0))
                worst[name] = min(achieved, rate), max(busiest, most_in_window(times, 1.0))
        what = f"MAIL FROMs per second in the first {seconds} s, and the most in any 1 s window"
        print(f"  limit {limit}/s; per run: {what}")
        for name, (achieved, busiest) in worst.items():
            label = VARIANTS[name]
            print(
                f"  {label + ':':<26} achieved {achieved:7.1f}/s = {achieved / limit:4.2f}x; "
                f"busiest second {busiest:5d} = {busiest / limit:4.2f}x"
            )
            harness.target(f"{label}: achieved rate", achieved / limit, at_least=0.95)
            harness.target(f"{label}: busiest second", busiest / limit, at_most=1.0)
        ok = await server.check() and runs.ok
    return harness.finish(ok)


if __name__ == "__main__":
    harness.main(benchmark)
