"""Sign-ups per second, p99 latency, mail delivered and server CPU of the reference app under
``python -m quartmail.app`` (``with-address``: with an address to confirm) against the seed's
recipe (``recipe.py``, under ``gunicorn --workers 2``), a fresh SQLite file each run, the SMTP
server with no connection limit, then at most 50. Targets: no limit, sign-ups/s >= 1.5x the
recipe's and p99 <= 1.0x; 50 connections, every mail delivered and >= 1.0x; CPU <= 2.5 ms per
sign-up. Exit 1 when quartmail loses mail or a sign-up fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import pathlib
import re
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import harness

VARIANTS = ("recipe", "quartmail", "with-address")
LIMITS = {"no connection limit": None, "at most 50 connections": 50}
FREE, CAPPED = LIMITS
SERVERS = {  # how each is served from the project root; what it logs (each worker) once it listens
    "recipe": (
        ["gunicorn", "--workers", "2", "--access-logfile", "-", "--chdir", "bench", "recipe:app"],
        r"Listening at: http://127\.0\.0\.1:(\d+) ",
    ),
    "quartmail": (
        ["quartmail.app", "-c", "hypercorn.toml", "quartmail.app:create_app('production')"],
        r"Running on http://127\.0\.0\.1:(\d+) ",
    ),
}
IDLE = 2.0  # seconds the server's idle CPU is measured for, before the measured sign-ups
STALL = 10.0  # seconds without a new mail (beyond the DATA delay) that end the wait for mail
Figures = dict[str, float]  # a run's: rate, p99, delivered, expected, sessions, refused, cpu
ROW = ("rate", "p99", "sessions", "refused", "cpu")


async def sign_up(
    port: int, concurrency: int, bodies: list[dict[str, str]], errors: list[str]
) -> Figures:
    """Post every body over *concurrency* keep-alive HTTP/1.1 connections, each taking the next
    once it has its answer, opened again when the server closed it (gunicorn's sync workers);
    errors added to *errors*. Sign-ups answered, created (201), per second, p99 in ms."""
    latencies, created, todo, start = [], 0, iter(bodies), time.perf_counter()
    head = f"POST /api/users HTTP/1.1\r\nHost: {harness.HOST}:{port}\r\n"
    head += "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n"

    async def connection() -> None:
        nonlocal created
        streams = None
        for body in todo:
            data, sent = json.dumps(body).encode(), time.perf_counter()
            try:
                async with asyncio.timeout(60):
                    streams = streams or await asyncio.open_connection(harness.HOST, port)
                    streams[1].write(head.format(len(data)).encode("ascii") + data)
                    await streams[1].drain()
                    answer = (await streams[0].readuntil(b"\r\n\r\n")).decode("latin-1")
                    length = re.search(r"(?im)^content-length:\s*(\d+)", answer)
                    if not answer.startswith("HTTP/1.1 ") or length is None:
                        raise ConnectionError(f"an answer this client cannot read: {answer!r}")
                    content = await streams[0].readexactly(int(length[1]))
                latencies.append(time.perf_counter() - sent)
                created += (status := int(answer[9:12])) == 201
                if status != 201:
                    errors.append(f"{body['name']}: HTTP {status}: {content[:200]!r}")
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
                errors.append(f"{body['name']}: {error!r}")
                answer = "Connection: close"  # open another
            if streams and re.search(r"(?im)^connection:\s*close", answer):
                streams[1].close()
                streams = None
        if streams:
            streams[1].close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    rate, ordered = len(latencies) / (time.perf_counter() - start), sorted(latencies) or [math.nan]
    p99 = ordered[math.ceil(0.99 * len(ordered)) - 1] * 1000
    return dict(answered=len(latencies), created=created, rate=rate, p99=p99)


async def mail_settled(server: harness.SMTPServer, expected: int, delay: float) -> dict[str, int]:
    """The SMTP server's stats once it has *expected* messages, or none came for a while."""
    stats, last = await server.stats(), time.monotonic()
    while stats["received"] < expected and time.monotonic() - last < STALL + 2 * delay:
        await asyncio.sleep(0.2)
        if (now := await server.stats())["received"] > stats["received"]:
            last = time.monotonic()
        stats = now
    return stats


def cpu_seconds(pid: int, running: bool = False) -> float:
    """CPU time so far of process *pid*, its threads and children, and the children they
    reaped (/proc, in ticks); *running*: of the threads alive now, to the ns (schedstat)."""
    total, todo = 0.0, [pid]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):  # a process that just exited
            for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
                todo += map(int, (task / "children").read_text().split())
                total += int((task / "schedstat").read_text().split()[0]) / 1e9 * running
            if not running:
                stat = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
                ticks = sum(map(int, stat.split()[11:15]))  # utime stime cutime cstime
                total += ticks / os.sysconf("SC_CLK_TCK")
    return total


@contextlib.asynccontextmanager
async def serve(
    kind: str, args: argparse.Namespace, mail: dict[str, Any]
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, pathlib.Path]]:
    """Serve *kind* from the project root on a fresh SQLite file, in a session of its own
    (Ctrl-C reaches us only), with our environment less the app's settings, plus *mail*'s;
    yield it, its port and its log once every worker listens; kill it at the end."""
    from quartmail.app.config import ENVIRONMENT_KEYS  # the app's settings

    (command, ready), workers = SERVERS[kind], args.workers or os.cpu_count() or 1
    command = [sys.executable, "-m", *command, "--bind", f"{harness.HOST}:0"]  # port: from the log
    if kind == "recipe":
        workers = 1
    else:
        command += ["--workers", str(args.workers)] if args.workers is not None else []
        command += ["--worker-class", args.worker_class] if args.worker_class else []
    ours = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT_KEYS}
    env = {k: v for k, v in ours.items() if not k.startswith("QUART_")}
    env |= {key: str(value) for key, value in mail.items() if value}
    env |= {"MAIL_POOL_SIZE": str(args.pool_size)} if args.pool_size else {}
    with tempfile.TemporaryDirectory(prefix="quartmail-signup-") as temp:
        log, database = pathlib.Path(temp, "server.log"), pathlib.Path(temp, "users.sqlite")
        env.update(FLASKY_ADMIN="admin@example.com", RECIPE_DATABASE=str(database))
        env.update(SECRET_KEY=secrets.token_hex(32), FLASKY_SIGNUPS_PER_HOUR=str(10**9))
        env.update(DATABASE_URL=f"sqlite+aiosqlite:///{database}")  # (each reads its own)
        with open(log, "wb") as out:  # noqa: ASYNC230 (a new file: at once)
            io: dict[str, Any] = dict(stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out)
            process = await asyncio.create_subprocess_exec(
                *command, env=env, cwd=harness.PROJECT, start_new_session=True, **io
            )
        try:
            async with asyncio.timeout(harness.START_TIMEOUT):
                while len(found := re.findall(ready, text := await read(log))) < workers:
                    if process.returncode is not None:
                        raise RuntimeError(f"{command[:3]} exited {process.returncode}:\n{text}")
                    await asyncio.sleep(0.05)
            yield process, int(found[0]), log
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def read(log: pathlib.Path) -> str:
    return await asyncio.to_thread(log.read_text, errors="replace")


async def run(
    variant: str, limit: int | None, args: argparse.Namespace
) -> tuple[Figures, list[str]]:
    """Serve *variant*, sign up, wait for the mail, stop it; its figures and problems."""
    mails = 2 if variant == "with-address" else 1  # per sign-up: the admin's, the confirmation
    prefix, kind = f"{variant}-{secrets.token_hex(4)}", variant.replace("with-address", "quartmail")

    def bodies(count: int, tag: str) -> list[dict[str, str]]:
        names = [f"{prefix}-{tag}{i}" for i in range(count)]
        return [{"name": n} | ({"email": f"{n}@example.com"} if mails == 2 else {}) for n in names]

    errors: list[str] = []
    async with (
        harness.smtp_server(data_delay=args.data_delay, max_connections=limit) as server,
        serve(kind, args, server.config) as (process, port, log),
    ):
        warm = await sign_up(port, args.concurrency, bodies(args.warmup, "w"), errors)
        before = await mail_settled(server, mails * int(warm["created"]), args.data_delay)
        idle = cpu_seconds(process.pid, running=True)
        await asyncio.sleep(IDLE)
        idle = (cpu_seconds(process.pid, running=True) - idle) / IDLE
        cpu = cpu_seconds(process.pid)
        figures = await sign_up(port, args.concurrency, bodies(args.n, ""), errors)
        end, expected = time.monotonic(), mails * int(figures["created"])
        after = await mail_settled(server, before["received"] + expected, args.data_delay)
        # Less what the server spends idle (each Hypercorn worker polls every 0.1 s) while
        # the last mail goes out: a slow SMTP server is no cost per sign-up.
        cpu = cpu_seconds(process.pid) - cpu - idle * (time.monotonic() - end)
        process.send_signal(signal.SIGTERM)  # as a process manager stops it
        code = None
        with contextlib.suppress(TimeoutError):
            code = await asyncio.wait_for(process.wait(), 60)
        output = await read(log)
    delivered = after["received"] - before["received"]
    figures.update(delivered=delivered, expected=expected, sessions=after["connections"])
    figures.update(refused=after["refused"], cpu=cpu / max(figures["answered"], 1) * 1000)
    problems = []
    if errors:
        problems.append(f"{len(errors)} sign-ups failed, e.g. {errors[:3]}")
    if code != 0:
        problems.append(f"the server exited with {code} (None: still running, killed)")
    if kind != "recipe" and (delivered != expected or "Not sent" in output):
        problems.append(f"{delivered} of {expected} mails delivered")
    if problems:
        print("\n".join([line for line in output.splitlines() if "/api/users" not in line][-30:]))
    return figures, problems


def row(label: str, runs: list[Figures], baseline: list[Figures] | None = None) -> str:
    """One line of the table: medians over the runs, the mail summed."""
    rate, p99, sessions, refused, cpu = (median(runs, key) for key in ROW)
    ratio = f"({rate / median(baseline, 'rate'):4.2f}x)" if baseline else ""
    mail = f"{sum(r['delivered'] for r in runs):.0f} of {sum(r['expected'] for r in runs):.0f}"
    refusals = f" (+{refused:.0f} refused)" if refused else ""
    figures = f"{rate:6.0f} {ratio:<8} {p99:7.0f} ms {mail:>13}  {sessions:5.0f}{refusals:<15}"
    return f"  {label:<13} {figures}  {cpu:6.2f} ms"


def median(runs: list[Figures], key: str) -> float:
    return float(statistics.median(run[key] for run in runs))


async def benchmark() -> int:
    parser = harness.Arguments(VARIANTS, n=(300, 60), warmup=(32, 10))
    parser.add_argument("-c", "--concurrency", type=int, default=64, help="connections (64)")
    parser.add_argument("--data-delay", type=float, default=2.0, help="per message (2 s)")
    parser.add_argument("--pool-size", type=int, help="quartmail's MAIL_POOL_SIZE (the app's)")
    parser.add_argument("--workers", type=int, help="quartmail's (default: one per core)")
    parser.add_argument("--worker-class", choices=("asyncio", "uvloop"), help="quartmail's")
    args = parser.parse()
    if "recipe" in args.only and not all(map(importlib.util.find_spec, ("flask_mail", "gunicorn"))):
        parser.error("the recipe needs Flask-Mail and gunicorn: pip install flask-mail gunicorn")
    print(
        f"{args.rounds} x {args.n} sign-ups per variant after {args.warmup}, {args.concurrency} "
        f"connections, SMTP server {args.data_delay:g} s per message; medians\n{'':<16}"
        "sign-ups/s        p99   mails delivered  SMTP sessions                CPU/sign-up"
    )
    ok, pairs = True, [(v, limit) for limit in LIMITS for v in args.only]
    results = {pair: list[Figures]() for pair in pairs if pair != ("with-address", CAPPED)}
    for _ in range(args.rounds):
        for (variant, limit), runs in results.items():
            figures, problems = await run(variant, LIMITS[limit], args)
            runs.append(figures)
            print(row(variant, [figures]), f"({limit}, round {len(runs)})", flush=True)
            for problem in problems:
                print(f"ERROR: {variant}, {limit}: {problem}")
            ok = ok and not problems
    for limit in LIMITS:
        print(limit)
        for (variant, at), runs in results.items():
            baseline = results.get(("recipe", limit)) if variant != "recipe" else None
            print(row(variant, runs, baseline)) if at == limit else None
    quartmail, recipe = (
        {key[1]: runs for key, runs in results.items() if key[0] == v}
        for v in ("quartmail", "recipe")
    )
    if quartmail and recipe:
        for limit, least in ((FREE, 1.5), (CAPPED, 1.0)):
            ratio = median(quartmail[limit], "rate") / median(recipe[limit], "rate")
            harness.target(
                f"{limit}: quartmail's sign-ups/s vs the recipe's", ratio, at_least=least
            )
        ratio = median(quartmail[FREE], "p99") / median(recipe[FREE], "p99")
        harness.target(f"{FREE}: quartmail's p99 vs the recipe's", ratio, at_most=1.0)
    if quartmail:
        runs = quartmail[CAPPED]
        delivered = sum(r["delivered"] for r in runs) / max(sum(r["expected"] for r in runs), 1)
        harness.target(f"{CAPPED}: quartmail's mail delivered", delivered, at_least=1.0)
        cpu = median(quartmail[FREE], "cpu")
        harness.target(f"{FREE}: quartmail's server CPU per sign-up", cpu, at_most=2.5, unit=" ms")
    return harness.finish(ok)


if __name__ == "__main__":
    harness.main(benchmark)
