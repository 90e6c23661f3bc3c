"""Sign-ups per second and their latency, through the real Hypercorn, with mail on or off.

Does a slow SMTP server slow down the sign-up requests? It should not: ``POST /api/users``
stores the user, renders the admin mail and queues it (``mail.send_background``); the
response never waits on SMTP. This measures it end to end.

For each variant the reference app is started the way it is deployed, as a subprocess::

    <venv>/bin/hypercorn -c <copy of hypercorn.toml> --bind 127.0.0.1:<free port> \\
        "quartmail.app:create_app('production')"

with, in its environment, a fresh ``SECRET_KEY``, ``DATABASE_URL`` pointing to a new SQLite
file in a temporary directory, ``FLASKY_ADMIN=admin@example.com`` (so that every new user
sends one admin mail) and the ``MAIL_*`` of an SMTP server (quartmail's SMTPTestServer, plain
SMTP, in another process: ``bench/_server.py``). The copy of ``hypercorn.toml`` differs only in
``shutdown_timeout``, raised so that the mail drain at shutdown can finish (the Hypercorn CLI
has no flag for it). Variants:

``fast``
    (a) the SMTP server answers at once;
``slow``
    (b) the SMTP server takes 2 s before answering each DATA (``--data-delay``);
``suppressed``
    (c) ``MAIL_SUPPRESS_SEND=true``: no mail leaves the app (``MAIL_SERVER`` is still set,
    as production requires it; the server must receive nothing).

Load: a small HTTP/1.1 client in this process (asyncio streams, keep-alive) keeps ``-c``
connections busy, each sending ``POST /api/users`` with ``{"name": ...}`` as soon as the
previous answer arrived (a closed loop); every name is new, so every answer is a 201 and
every sign-up queues a mail. ``--warmup`` sign-ups first (imports, caches, SQLite, the SMTP
sessions), then ``-n`` measured ones: requests per second over the measured ones, and the
p50 / p99 / max of their latencies, from writing the request to reading the whole answer.

Then Hypercorn gets SIGTERM (the master process only, as a process manager should) and its
shutdown is timed: in-flight requests, then the app's mail drain (``MAIL_POOL_SIZE`` sessions,
up to ``MAIL_SHUTDOWN_TIMEOUT``). For (a) and (b) the SMTP server must have received one mail
per sign-up, warm-up included. With the 2 s server the drain takes about
``sign-ups x 2 s / --pool-size`` (minus what was delivered during the load).

The target: the p99 latency with the 2 s server within 1.1x of the p99 with mail suppressed.
The latencies include everything a request waits for, the database as much as the mail queue:
with SQLite, concurrent sign-ups wait for its single write lock; ``-c 1`` shows the latency
without that contention.

Run (from the project root)::

    /work/venv/bin/python bench/signup.py --help
    /work/venv/bin/python bench/signup.py            # 1000 sign-ups per variant, about 1 min
    /work/venv/bin/python bench/signup.py --quick    # a smoke run: 100 sign-ups per variant
    /work/venv/bin/python bench/signup.py --only slow --only suppressed -n 2000 -c 32

The exit status is 0 whatever the figures are (timings on a shared machine are noisy); it is
1 if a sign-up failed, Hypercorn failed or a mail went missing, 2 on bad arguments.
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
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from _server import ServerProcess, smtp_server_process

from quartmail.app.config import ENVIRONMENT_KEYS

PROJECT = pathlib.Path(__file__).resolve().parent.parent
HYPERCORN_TOML = PROJECT / "hypercorn.toml"
APP_SPEC = "quartmail.app:create_app('production')"
HOST = "127.0.0.1"
ADMIN = "admin@example.com"
VARIANTS = ("fast", "slow", "suppressed")
LABELS = {
    "fast": "(a) SMTP server, 0 ms",
    "slow": "(b) SMTP server, {delay:g} s per DATA",
    "suppressed": "(c) mail suppressed",
}
TARGET = 1.10  # p99 with the slow server / p99 with mail suppressed, at most

# Quart drains its own background tasks first (BACKGROUND_TASK_SHUTDOWN_TIMEOUT, 5 s by
# default), then the app's after_serving runs the mail drain; Hypercorn bounds the whole
# lifespan shutdown with shutdown_timeout.
QUART_BACKGROUND_TIMEOUT = 5.0
START_TIMEOUT = 60.0  # seconds for Hypercorn to start answering
REQUEST_TIMEOUT = 60.0  # seconds for one request (a stuck server fails the run)


# The HTTP/1.1 client.


class HTTPError(Exception):
    """The server broke the connection or answered something unreadable."""


class Connection:
    """One keep-alive HTTP/1.1 connection, reopened when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._used = False  # a request went through the current connection

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Send one request, return the status and body of the answer."""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        data = (head + "\r\n").encode("ascii") + (body or b"")
        for retry in (False, True):
            if self._writer is None:
                await self._open()
            reused = self._used
            try:
                return await self._exchange(data)
            except (ConnectionError, asyncio.IncompleteReadError) as error:
                await self.close()
                # The server may close an idle keep-alive connection just before our request
                # (keep_alive_timeout, keep_alive_max_requests): try once on a new one.
                if retry or not reused:
                    raise HTTPError(f"{method} {path}: connection lost: {error!r}") from error
        raise AssertionError("unreachable")

    async def _open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._used = False

    async def _exchange(self, data: bytes) -> tuple[int, bytes]:
        assert self._reader is not None and self._writer is not None
        self._writer.write(data)
        await self._writer.drain()
        head = await self._reader.readuntil(b"\r\n\r\n")
        self._used = True
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        try:
            status = int(rest[:3])
        except ValueError:
            raise HTTPError(f"not an HTTP status line: {status_line!r}") from None
        headers: dict[str, str] = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self._reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked()
        else:
            raise HTTPError(f"an answer without Content-Length or chunks: {headers}")
        if headers.get("connection", "").lower() == "close" or version == "HTTP/1.0":
            await self.close()
        return status, body

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        chunks: list[bytes] = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await self._reader.readexactly(size + 2)  # with its CRLF
            if size == 0:
                # (No trailers from Hypercorn: the final chunk's CRLF ends the body.)
                return b"".join(chunks)
            chunks.append(chunk[:-2])

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@dataclass
class LoadResult:
    """What one batch of sign-ups gave."""

    seconds: float
    latencies: list[float]  # seconds, one per request
    statuses: Counter[int]
    errors: list[str]

    @property
    def rate(self) -> float:
        """Requests answered per second."""
        return len(self.latencies) / self.seconds

    def percentile(self, p: int) -> float:
        """The p-th percentile latency, in milliseconds (NaN without any answer)."""
        if len(self.latencies) < 2:
            return self.latencies[0] * 1000 if self.latencies else math.nan
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[p - 1] * 1000

    @property
    def slowest(self) -> float:
        """The highest latency, in milliseconds (NaN without any answer)."""
        return max(self.latencies, default=math.nan) * 1000


async def sign_up_all(connections: list[Connection], names: list[str]) -> LoadResult:
    """Sign every name up, one request at a time per connection, all connections at once."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    todo = iter(names)  # shared: each connection takes the next name when it is free

    async def run(connection: Connection) -> None:
        for name in todo:
            body = json.dumps({"name": name}).encode()
            start = time.perf_counter()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    status, answer = await connection.request("POST", "/api/users", body)
            except (HTTPError, OSError, TimeoutError) as error:
                errors.append(f"{name}: {error!r}")
                await connection.close()
                continue
            latencies.append(time.perf_counter() - start)
            statuses[status] += 1
            if status != 201:
                errors.append(f"{name}: HTTP {status}: {answer[:200]!r}")

    start = time.perf_counter()
    await asyncio.gather(*(run(connection) for connection in connections))
    return LoadResult(time.perf_counter() - start, latencies, statuses, errors)


async def wait_until_ready(process: subprocess.Popen[bytes], port: int) -> None:
    """Poll the app until it answers (after its lifespan start-up: the tables exist)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"Hypercorn exited during start-up (code {process.returncode})")
        connection = Connection(HOST, port)
        try:
            status, _ = await connection.request("GET", "/api/users/0")
            if status == 404:
                return
            raise RuntimeError(f"GET /api/users/0 answered {status} at start-up, not 404")
        except (HTTPError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Hypercorn did not answer within {START_TIMEOUT:g} s") from None
            await asyncio.sleep(0.05)
        finally:
            await connection.close()


async def load(
    process: subprocess.Popen[bytes], port: int, args: argparse.Namespace, prefix: str
) -> tuple[LoadResult, LoadResult]:
    """Warm up, then measure; return both results."""
    await wait_until_ready(process, port)
    connections = [Connection(HOST, port) for _ in range(args.concurrency)]
    try:
        warmup = await sign_up_all(connections, [f"{prefix}-w{i}" for i in range(args.warmup)])
        measured = await sign_up_all(connections, [f"{prefix}-{i}" for i in range(args.n)])
    finally:
        for connection in connections:
            await connection.close()
    return warmup, measured


# Hypercorn.


@dataclass
class Timeouts:
    """The shutdown limits of one run, sized for the mail drain with the slow server."""

    mail_shutdown: float  # MAIL_SHUTDOWN_TIMEOUT
    hypercorn_shutdown: float  # Hypercorn's shutdown_timeout
    graceful: float  # Hypercorn's graceful_timeout (from hypercorn.toml)

    @classmethod
    def for_run(cls, args: argparse.Namespace, graceful: float) -> Timeouts:
        signups = args.n + args.warmup
        rounds = -(-signups // args.pool_size)  # each session sends one mail per DATA delay
        drain = rounds * args.data_delay
        mail_shutdown = max(30.0, 2 * drain + 10)  # room for a slow machine
        return cls(mail_shutdown, QUART_BACKGROUND_TIMEOUT + mail_shutdown + 10, graceful)

    @property
    def kill_after(self) -> float:
        """How long to wait for Hypercorn to exit after SIGTERM."""
        return self.graceful + self.hypercorn_shutdown + 10


def hypercorn_config(directory: pathlib.Path, shutdown_timeout: float) -> pathlib.Path:
    """A copy of hypercorn.toml with *shutdown_timeout*, in *directory*."""
    text = HYPERCORN_TOML.read_text(encoding="utf-8")
    line = f"shutdown_timeout = {shutdown_timeout:.1f}"
    text, count = re.subn(r"(?m)^shutdown_timeout\s*=.*$", line, text)
    if count == 0:
        text += f"\n{line}\n"
    config = directory / "hypercorn.toml"
    config.write_text(text, encoding="utf-8")
    if tomllib.loads(text)["shutdown_timeout"] != float(f"{shutdown_timeout:.1f}"):
        raise RuntimeError(f"could not set shutdown_timeout in a copy of {HYPERCORN_TOML}")
    return config


def graceful_timeout() -> float:
    """hypercorn.toml's graceful_timeout (Hypercorn's default is 3 s)."""
    with HYPERCORN_TOML.open("rb") as file:
        return float(tomllib.load(file).get("graceful_timeout", 3.0))


def hypercorn_command() -> list[str]:
    """The venv's hypercorn script, or ``python -m hypercorn`` without one."""
    script = pathlib.Path(sys.executable).parent / "hypercorn"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "hypercorn"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def app_environment(
    server: ServerProcess, directory: pathlib.Path, suppress: bool, args: argparse.Namespace
) -> dict[str, str]:
    """The environment of Hypercorn: ours without any app setting, plus the run's."""
    env = {key: value for key, value in os.environ.items() if key not in ENVIRONMENT_KEYS}
    for key, value in server.mail_config().items():
        if value is None:
            continue
        env[key] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update(
        SECRET_KEY=secrets.token_hex(32),
        DATABASE_URL=f"sqlite+aiosqlite:///{directory / 'signup.sqlite'}",
        FLASKY_ADMIN=ADMIN,
        MAIL_SUPPRESS_SEND="true" if suppress else "false",
        MAIL_TIMEOUT="60",
        MAIL_POOL_SIZE=str(args.pool_size),
        MAIL_SHUTDOWN_TIMEOUT=f"{args.timeouts.mail_shutdown:g}",
    )
    return env


@contextlib.contextmanager
def hypercorn(
    env: dict[str, str], config: pathlib.Path, port: int, log: pathlib.Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Hypercorn serving the app, in a session of its own (Ctrl-C reaches only us), its
    access and error logs in *log*; its process group is killed if it is still running
    when the block ends."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*hypercorn_command(), "-c", str(config), "--bind", f"{HOST}:{port}", APP_SPEC],
            cwd=PROJECT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # its group: the master and its worker
            process.wait()


def stop(process: subprocess.Popen[bytes], timeouts: Timeouts) -> tuple[int | None, float]:
    """SIGTERM to the master (not its group: the worker drains under the master's
    control); return its exit code (None if it had to be killed) and the seconds it took."""
    start = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    try:
        code: int | None = process.wait(timeout=timeouts.kill_after)
    except subprocess.TimeoutExpired:
        code = None
    return code, time.perf_counter() - start


# A variant, from start to finish.


@dataclass
class Outcome:
    """One variant's figures and checks."""

    name: str
    label: str
    warmup: LoadResult
    measured: LoadResult
    exit_code: int | None
    shutdown_seconds: float
    received: int
    expected: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def run_variant(name: str, args: argparse.Namespace) -> Outcome:
    delay = args.data_delay if name == "slow" else 0.0
    suppress = name == "suppressed"
    label = LABELS[name].format(delay=args.data_delay)
    with (
        smtp_server_process(tls="none", data_delay=delay) as server,
        tempfile.TemporaryDirectory(prefix="quartmail-signup-") as temp,
    ):
        directory = pathlib.Path(temp)
        config = hypercorn_config(directory, args.timeouts.hypercorn_shutdown)
        env = app_environment(server, directory, suppress, args)
        port = free_port()
        log = directory / "hypercorn.log"
        with hypercorn(env, config, port, log) as process:
            prefix = f"{name}-{secrets.token_hex(4)}"
            try:
                warmup, measured = asyncio.run(load(process, port, args, prefix))
            except RuntimeError:
                print_log(log)
                raise
            exit_code, shutdown_seconds = stop(process, args.timeouts)
        received = server.stats()["received"]
        created = warmup.statuses[201] + measured.statuses[201]
        outcome = Outcome(
            name=name,
            label=label,
            warmup=warmup,
            measured=measured,
            exit_code=exit_code,
            shutdown_seconds=shutdown_seconds,
            received=received,
            expected=0 if suppress else created,
        )
        errors = warmup.errors + measured.errors
        if errors:
            shown = "; ".join(errors[:3]) + (" ..." if len(errors) > 3 else "")
            outcome.problems.append(f"{len(errors)} sign-ups failed: {shown}")
        if exit_code is None:
            outcome.problems.append(
                f"Hypercorn still running {args.timeouts.kill_after:g} s after SIGTERM: killed"
            )
        elif exit_code != 0:
            outcome.problems.append(f"Hypercorn exited with code {exit_code}")
        if received != outcome.expected:
            outcome.problems.append(
                f"the SMTP server received {received} mails, not {outcome.expected}"
            )
        not_sent = [
            line for line in log.read_text(errors="replace").splitlines() if "Not sent" in line
        ]
        if not_sent:
            outcome.problems.append(f"{len(not_sent)} 'Not sent' lines in Hypercorn's log")
        if outcome.problems:
            print_log(log)
        return outcome


def print_log(log: pathlib.Path, lines: int = 30) -> None:
    """The end of Hypercorn's log, without its access lines, on stderr."""
    if not log.exists():
        return
    text = log.read_text(errors="replace").splitlines()
    kept = [
        line for line in text if '"POST /api/users' not in line and "GET /api/users" not in line
    ]
    print(f"--- the end of Hypercorn's log ({log.name}) ---", file=sys.stderr)
    for line in kept[-lines:]:
        print(line, file=sys.stderr)


# Report.


def report(outcomes: list[Outcome], args: argparse.Namespace) -> None:
    width = max(len(outcome.label) for outcome in outcomes)
    print(
        f"{'variant':<{width}}  {'req/s':>6}  {'p50 ms':>7}  {'p90 ms':>7}  {'p99 ms':>7}  "
        f"{'max ms':>7}  "
        f"{'shutdown':>8}  mail received"
    )
    for outcome in outcomes:
        result = outcome.measured
        mail = f"{outcome.received} of {outcome.expected}"
        if outcome.name == "suppressed":
            mail = f"{outcome.received} (suppressed)"
        print(
            f"{outcome.label:<{width}}  {result.rate:6.0f}  {result.percentile(50):7.1f}  "
            f"{result.percentile(90):7.1f}  {result.percentile(99):7.1f}  "
            f"{result.slowest:7.1f}  "
            f"{outcome.shutdown_seconds:7.1f}s  {mail}"
        )
    by_name = {outcome.name: outcome for outcome in outcomes}
    suppressed = by_name.get("suppressed")
    if suppressed is None:
        return
    base_p99 = suppressed.measured.percentile(99)
    base_rate = suppressed.measured.rate
    for name in ("fast", "slow"):
        if name in by_name:
            measured = by_name[name].measured
            print(
                f"{by_name[name].label} / {suppressed.label}: "
                f"p99 {measured.percentile(99) / base_p99:.2f}x, "
                f"p50 {measured.percentile(50) / suppressed.measured.percentile(50):.2f}x, "
                f"req/s {measured.rate / base_rate:.2f}x"
            )
    if "slow" in by_name:
        ratio = by_name["slow"].measured.percentile(99) / base_p99
        verdict = "MET" if ratio <= TARGET else "NOT MET"
        print(
            f"target: p99 with the {args.data_delay:g} s server within {TARGET:.1f}x of p99 "
            f"with mail suppressed (<= {TARGET:.2f}x): {verdict} ({ratio:.2f}x)"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Sign-ups/second and p50/p99 latency of POST /api/users under the real "
        "Hypercorn, with an SMTP server answering at once, one taking 2 s per DATA, and "
        "mail suppressed (see the module docstring).",
    )
    parser.add_argument(
        "-n", type=int, default=None, help="measured sign-ups per variant (default 1000)"
    )
    parser.add_argument(
        "-c",
        "--concurrency",
        type=int,
        default=16,
        help="keep-alive connections, each with one request at a time (default 16)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up sign-ups per variant (default 200)"
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=64,
        help="MAIL_POOL_SIZE: SMTP sessions of the app, which bound the drain with the "
        "slow server (default 64)",
    )
    parser.add_argument(
        "--data-delay",
        type=float,
        default=2.0,
        help="seconds the slow server (b) waits before answering each DATA (default 2)",
    )
    parser.add_argument(
        "--only",
        dest="variants",
        action="append",
        choices=VARIANTS,
        help="run only this variant (repeatable; the ratios need suppressed)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: -n 100, 20 warm-up sign-ups (unless given)",
    )
    args = parser.parse_args(argv)
    quick = {"n": 100, "warmup": 20}
    default = {"n": 1000, "warmup": 200}
    for key in ("n", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, (quick if args.quick else default)[key])
    if args.n < 1 or args.warmup < 0 or args.concurrency < 1:
        parser.error("-n and -c must be at least 1, --warmup at least 0")
    if not 1 <= args.pool_size <= 1000:
        parser.error("--pool-size must be from 1 to 1000")
    if not args.data_delay >= 0:
        parser.error("--data-delay must be 0 or more seconds")
    args.variants = [name for name in VARIANTS if name in (args.variants or VARIANTS)]
    args.timeouts = Timeouts.for_run(args, graceful_timeout())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    timeouts: Timeouts = args.timeouts
    print(
        f"quartmail sign-up benchmark: {args.n} sign-ups (after {args.warmup} to warm up) per "
        f"variant, {args.concurrency} keep-alive connections, POST /api/users under Hypercorn "
        f"({HYPERCORN_TOML.name}, shutdown_timeout {timeouts.hypercorn_shutdown:g} s); "
        f"MAIL_POOL_SIZE={args.pool_size}, MAIL_SHUTDOWN_TIMEOUT={timeouts.mail_shutdown:g}"
    )
    load1, load5, _ = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load1:.2f} (1 min), {load5:.2f} (5 min)")
    outcomes: list[Outcome] = []
    for name in args.variants:
        try:
            outcome = run_variant(name, args)
        except RuntimeError as error:
            print(f"ERROR: {LABELS[name].format(delay=args.data_delay)}: {error}", file=sys.stderr)
            return 1
        outcomes.append(outcome)
        for problem in outcome.problems:
            print(f"ERROR: {outcome.label}: {problem}", file=sys.stderr)
    report(outcomes, args)
    statuses = {
        outcome.name: "all mail received" if outcome.received == outcome.expected else "MISSING"
        for outcome in outcomes
        if outcome.name != "suppressed"
    }
    if statuses:
        print("mail: " + ", ".join(f"{name}: {status}" for name, status in statuses.items()))
    return 0 if all(outcome.ok for outcome in outcomes) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
