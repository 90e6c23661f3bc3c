"""Sign-ups per second and their latency, through the real Hypercorn, with mail on or off.

``POST /api/users`` with a name and an e-mail address stores the user, counts the request
against the abuse limits and queues two mails (``send_background``): the admin's notice and
the user's confirmation. The answer should never wait on SMTP. For each variant the harness
serves the reference app as the tests do, ``create_app('production')`` with a fresh SQLite
file, ``FLASKY_ADMIN`` set, the abuse limits raised above the load (all of it comes from one
client) and a copy of ``hypercorn.toml`` whose ``shutdown_timeout`` lets the mail drain end.
Variants: ``fast`` (the SMTP server answers at once), ``slow`` (2 s per DATA, ``--data-delay``)
and the baseline ``suppressed`` (``MAIL_SUPPRESS_SEND``). An HTTP/1.1 client in this process
keeps ``-c`` keep-alive connections busy, each posting a new name as soon as it has its answer:
``--warmup`` sign-ups, then ``-n`` measured (req/s, p50/p90/p99/max, the server's CPU per sign-up;
``--workers`` and ``--worker-class`` set Hypercorn's). Then Hypercorn gets SIGTERM
and its shutdown is timed; the server must have two mails per sign-up. Target: p99 with the slow
server <= 1.1x p99 with mail suppressed. SQLite has one writer: ``-c 1`` shows the latency
without that contention.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import pathlib
import re
import secrets
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import harness

APP_SPEC = "quartmail.app:create_app('production')"
VARIANTS = ("fast", "slow", "suppressed")
QUART_BACKGROUND_TIMEOUT = 5.0  # Quart drains its own tasks first, then the app's mail drain
MAILS_PER_SIGN_UP = 2  # the admin's notice and the confirmation


class Connection:
    """One keep-alive HTTP/1.1 connection, opened again when the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """Send one JSON request, return the status and body of the answer."""
        if self.streams is None:
            # (asyncio sets TCP_NODELAY on its TCP transports.)
            self.streams = await asyncio.open_connection(harness.HOST, self.port)
        reader, writer = self.streams
        head = f"POST {path} HTTP/1.1\r\nHost: {harness.HOST}:{self.port}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode("ascii") + body)
        await writer.drain()
        answer = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        length = re.search(r"(?im)^content-length:\s*(\d+)", answer)
        if not answer.startswith("HTTP/1.1 ") or length is None:
            raise ConnectionError(f"an answer this client cannot read: {answer!r}")
        content = await reader.readexactly(int(length[1]))
        if re.search(r"(?im)^connection:\s*close", answer):
            await self.close()
        return int(answer[9:12]), content

    async def close(self) -> None:
        streams, self.streams = self.streams, None
        if streams is not None:
            streams[1].close()
            with contextlib.suppress(ConnectionError):
                await streams[1].wait_closed()


@dataclass
class Load:
    """What one batch of sign-ups gave."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, p: int) -> float:
        """The p-th percentile latency in milliseconds (p=100: the highest; NaN: no answer)."""
        if len(self.latencies) < 2 or p == 100:
            return max(self.latencies, default=math.nan) * 1000
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[p - 1] * 1000


async def sign_up(connections: list[Connection], names: list[str]) -> Load:
    """Sign every name up, one request at a time per connection, all connections at once."""
    load, todo = Load(), iter(names)  # each connection takes the next name when it is free

    async def run(connection: Connection) -> None:
        for name in todo:
            start = time.perf_counter()
            try:
                async with asyncio.timeout(60):
                    body = json.dumps({"name": name, "email": f"{name}@example.com"}).encode()
                    status, answer = await connection.post("/api/users", body)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
                load.errors.append(f"{name}: {error!r}")
                await connection.close()
                continue
            load.latencies.append(time.perf_counter() - start)
            load.statuses[status] += 1
            if status != 201:
                load.errors.append(f"{name}: HTTP {status}: {answer[:200]!r}")

    start = time.perf_counter()
    await asyncio.gather(*(run(connection) for connection in connections))
    load.seconds = time.perf_counter() - start
    return load


def server_cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) so far of Hypercorn's process *pid* and of its children
    (its workers), from /proc; NaN where there is no /proc (not Linux)."""
    try:
        children = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        ticks = 0
        for process in (pid, *map(int, children)):
            stat = pathlib.Path(f"/proc/{process}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()  # after the command, which may hold spaces
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    except OSError:
        return math.nan
    return ticks / os.sysconf("SC_CLK_TCK")


def hypercorn_config(
    directory: pathlib.Path, shutdown_timeout: float, args: argparse.Namespace
) -> pathlib.Path:
    """A copy of hypercorn.toml with *shutdown_timeout* (Hypercorn has no flag for it) and
    ``--workers`` and ``--worker-class`` when given."""
    settings = {"shutdown_timeout": f"{shutdown_timeout:.1f}"}
    if args.workers is not None:
        settings["workers"] = str(args.workers)
    if args.worker_class is not None:
        settings["worker_class"] = f'"{args.worker_class}"'
    text = (harness.PROJECT / "hypercorn.toml").read_text(encoding="utf-8")
    for key, value in settings.items():
        text = re.sub(rf"(?m)^{key}\s*=.*$", "", text) + f"\n{key} = {value}\n"
    config = directory / "hypercorn.toml"
    config.write_text(text, encoding="utf-8")
    return config


def label(name: str, args: argparse.Namespace) -> str:
    what = {"fast": "SMTP server, 0 ms", "slow": f"SMTP server, {args.data_delay:g} s per DATA"}
    return f"({'abc'[VARIANTS.index(name)]}) {what.get(name, 'mail suppressed')}"


async def run_variant(name: str, args: argparse.Namespace) -> tuple[Load, list[str]]:
    """Serve the app, load it, stop it; print its line; its load and the problems found."""
    # The drain at shutdown with the slow server: a DATA delay per mail and session.
    rounds = -(-(args.n + args.warmup) * MAILS_PER_SIGN_UP // args.pool_size)
    mail_shutdown = max(30.0, 2 * rounds * args.data_delay + 10)
    shutdown = QUART_BACKGROUND_TIMEOUT + mail_shutdown + 10
    delay = args.data_delay if name == "slow" else 0.0
    async with harness.smtp_server(data_delay=delay) as server:
        with tempfile.TemporaryDirectory(prefix="quartmail-signup-") as temp:
            directory = pathlib.Path(temp)
            env = {
                key: str(value).lower() if isinstance(value, bool) else str(value)
                for key, value in server.mail_config().items()
                if value is not None
            }
            env.update(
                SECRET_KEY=secrets.token_hex(32),
                DATABASE_URL=f"sqlite+aiosqlite:///{directory / 'signup.sqlite'}",
                FLASKY_ADMIN="admin@example.com",
                MAIL_SUPPRESS_SEND="true" if name == "suppressed" else "false",
                MAIL_TIMEOUT="60",
                MAIL_POOL_SIZE=str(args.pool_size),
                MAIL_SHUTDOWN_TIMEOUT=f"{mail_shutdown:g}",
                # Every sign-up comes from this one client, each to an address of its own.
                FLASKY_SIGNUPS_PER_HOUR=str(10 * (args.n + args.warmup)),
            )
            config = hypercorn_config(directory, shutdown, args)
            async with harness.serve_app(APP_SPEC, env, directory, config) as served:
                connections = [Connection(served.port) for _ in range(args.concurrency)]
                prefix = f"{name}-{secrets.token_hex(4)}"
                warmup = await sign_up(connections, [f"{prefix}-w{i}" for i in range(args.warmup)])
                cpu = server_cpu_seconds(served.process.pid)
                measured = await sign_up(connections, [f"{prefix}-{i}" for i in range(args.n)])
                cpu = server_cpu_seconds(served.process.pid) - cpu
                for connection in connections:
                    await connection.close()
                code, seconds = await served.stop(timeout=5 + shutdown + 10)
                log = served.log
        received = (await server.stats())["received"]
    signed_up = warmup.statuses[201] + measured.statuses[201]
    expected = 0 if name == "suppressed" else MAILS_PER_SIGN_UP * signed_up
    figures = "  ".join(f"{measured.percentile(p):7.1f}" for p in (50, 90, 99, 100))
    print(
        f"{label(name, args):<30}  {measured.rate:6.0f}  {figures}  "
        f"{cpu / max(len(measured.latencies), 1) * 1000:6.2f}  {seconds:7.1f}s  "
        f"{received} of {expected}"
    )
    problems = []
    if errors := warmup.errors + measured.errors:
        problems.append(f"{len(errors)} sign-ups failed, e.g. {errors[:3]}")
    if code != 0:
        problems.append(f"Hypercorn exited with {code} (None: still running, killed)")
    if received != expected:
        problems.append(f"the SMTP server received {received} mails, not {expected}")
    if "Not sent" in log:
        problems.append(f"{log.count('Not sent')} 'Not sent' lines in Hypercorn's log")
    if problems:
        lines = [line for line in log.splitlines() if "/api/users" not in line]
        print("\n".join(lines[-30:]))
    return measured, problems


async def benchmark() -> int:
    parser = harness.Arguments(
        {"n": (1000, 100, "measured sign-ups per variant"), "warmup": (200, 20, "warm-up ones")},
        only=VARIANTS,
    )
    parser.add_argument("-c", "--concurrency", type=int, default=16, help="connections (16)")
    parser.add_argument("--pool-size", type=int, default=64, help="MAIL_POOL_SIZE (64)")
    parser.add_argument("--data-delay", type=float, default=2.0, help="slow server's (2 s)")
    parser.add_argument("--workers", type=int, help="Hypercorn's workers (hypercorn.toml's)")
    parser.add_argument(
        "--worker-class", choices=("asyncio", "uvloop"), help="Hypercorn's (hypercorn.toml's)"
    )
    args = parser.parse()
    print(
        f"sign-ups: {args.n} per variant after {args.warmup}, {args.concurrency} connections, "
        f"MAIL_POOL_SIZE={args.pool_size}, workers={args.workers}, "
        f"worker_class={args.worker_class}\n{'variant':<30}   req/s   p50 ms   p90 ms   p99 ms"
        "   max ms  CPU ms  shutdown  mail received"
    )
    ok, results = True, {}
    for name in args.only:
        results[name], problems = await run_variant(name, args)
        for problem in problems:
            print(f"ERROR: {label(name, args)}: {problem}")
            ok = False
    base = results.get("suppressed")
    for name in ("fast", "slow"):
        if base is not None and name in results:
            run = results[name]
            print(
                f"{label(name, args)} / mail suppressed: "
                f"p99 {run.percentile(99) / base.percentile(99):.2f}x, "
                f"p50 {run.percentile(50) / base.percentile(50):.2f}x, "
                f"req/s {run.rate / base.rate:.2f}x"
            )
    if base is not None and "slow" in results:
        ratio = results["slow"].percentile(99) / base.percentile(99)
        harness.target("p99 with the slow server vs mail suppressed", ratio, at_most=1.1)
    return harness.finish(ok)


if __name__ == "__main__":
    harness.main(benchmark)
