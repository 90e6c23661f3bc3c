"""Background delivery (``mail.send_background``): throughput and memory, over real SMTP.

The server is quartmail's SMTPTestServer (aiosmtpd) in a separate process (see
``bench/_server.py``). The baseline, measured in the same run, is raw aiosmtplib on ONE
persistent connection, building an ``email.message.EmailMessage`` (text + HTML, about 0.97 KB,
the message of ``bench/send.py``) and ``await smtp.send_message(msg)`` per mail, one after
another. quartmail builds a fresh :class:`quartmail.Message` per mail, as an app does, and
runs as an app does: ``Mail(app)``, the app's lifespan (``app.test_app()``, which starts the
pool and drains it at shutdown) and an app context.

Sections (``--only``, repeatable; all by default):

``plain``, ``starttls``, ``implicit`` (CPU-bound: the server answers at once)
    ``-n`` messages (default 1000) per round: raw aiosmtplib, ``send_background`` with
    ``MAIL_POOL_SIZE=8``, timed from the first submit to the last future resolved (the pool's
    sessions are already open, as in a running app), and, for context, raw aiosmtplib on 8
    concurrent connections (the same EmailMessage per mail). STARTTLS and implicit TLS require
    AUTH. Target: ``send_background`` >= 2.0x raw aiosmtplib in each.
``slow``
    A server that takes 50 ms per DATA (one process, ``asyncio.sleep`` per DATA, so sessions
    overlap): ``send_background`` with ``MAIL_POOL_SIZE=32`` for ``--slow-n`` messages (400),
    raw aiosmtplib (about 20 msg/s then) on ``--slow-raw-n`` messages (60), rates compared;
    and for context the Flask chapter's "thread per mail" recipe: a ``threading.Thread`` per
    message, started all at once, each doing a blocking ``smtplib`` send (new connection,
    ``send_message``, QUIT), all joined at the end. Target: ``send_background`` >= 17x raw.
``memory``
    ``--memory-n`` messages (10,000), each measurement in a fresh Python process so that none
    inherits another's heap: RSS (``/proc/self/status`` VmRSS) before and after, and the peak
    (VmHWM, reset at "before" through ``/proc/self/clear_refs``; ``getrusage`` ru_maxrss is
    printed too, but on Linux it keeps the spawning process's RSS over exec, so it is only an
    upper bound), for (a) ``send_background`` of every message while the server holds each
    DATA for 0.5 s (so all are queued: checked, flattened, waiting for a session), then the
    drain once the server answers at once again, checked on the server's count; (b) for
    comparison, the same number of pre-built ``EmailMessage`` objects held in a list, and (c)
    of quartmail ``Message`` objects (not yet flattened).

The throughput variants are warmed up, then take turns for ``--rounds`` rounds (default 3) so
that a slow phase of the machine hits all of them alike; the best round is reported, with the
median, and the ratio of best to best raw aiosmtplib.

Run (from the project root; Linux, for ``/proc/self/status``)::

    /work/venv/bin/python bench/background.py --help
    /work/venv/bin/python bench/background.py                 # everything, about 2 minutes
    /work/venv/bin/python bench/background.py --quick         # a smoke test of a few seconds
    /work/venv/bin/python bench/background.py --only slow --only memory
    /work/venv/bin/python bench/background.py --no-context    # targets only: no 8-conn raw, threads
    /work/venv/bin/python bench/background.py --only plain --profile background   # cProfile

The exit status is 0 whatever the figures are (timings on a shared machine are noisy); it is
1 if a message went missing, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import json
import logging
import os
import pstats
import resource
import smtplib
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import aiosmtplib
from _server import ServerProcess, TLSMode, smtp_server_process
from quart import Quart
from send import AUTH, build_email_message, build_message

from quartmail import Mail, SendResult

SECTIONS = ("plain", "starttls", "implicit", "slow", "memory")
TLS_SECTIONS: dict[str, TLSMode] = {"plain": "none", "starttls": "starttls", "implicit": "implicit"}
MEMORY_KINDS = ("queued", "emailmessage", "message")

POOL_SIZE = 8  # MAIL_POOL_SIZE of the CPU-bound sections
RAW_CONNECTIONS = 8  # connections of the concurrent raw aiosmtplib variant (context)
SLOW_POOL_SIZE = 32  # MAIL_POOL_SIZE against the slow server
SLOW_DELAY = 0.05  # seconds the slow server takes per DATA
PAUSE_DELAY = 0.5  # seconds per DATA while the memory section holds messages queued
CPU_TARGET = 2.0  # send_background / raw aiosmtplib, CPU-bound
SLOW_TARGET = 17.0  # send_background / raw aiosmtplib, 50 ms per DATA


# Throughput


@dataclass
class Result:
    """The rates of one variant in one section."""

    section: str
    variant: str
    label: str
    count: int  # messages per round
    rates: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return max(self.rates)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


@dataclass(frozen=True)
class Target:
    section: str
    variant: str
    ratio: float  # at least this many times raw aiosmtplib's best rate
    text: str

    def check(self, results: list[Result]) -> tuple[bool, float] | None:
        """(met, ratio) from the results, or None when the section did not run."""
        found = {r.variant: r for r in results if r.section == self.section}
        if "raw" not in found or self.variant not in found:
            return None
        ratio = found[self.variant].best / found["raw"].best
        return ratio >= self.ratio, ratio


TARGETS = [
    *(
        Target(section, "background", CPU_TARGET, f"send_background x{POOL_SIZE}, {section}")
        for section in TLS_SECTIONS
    ),
    Target(
        "slow",
        "background",
        SLOW_TARGET,
        f"send_background x{SLOW_POOL_SIZE}, {SLOW_DELAY * 1000:g} ms per DATA",
    ),
]


#: A variant sends ``count`` messages and returns the seconds it took.
Variant = Callable[[int], Awaitable[float]]


class Section:
    """The variants of one section, bound to one server and one app."""

    def __init__(self, name: str, server: ServerProcess, pool_size: int) -> None:
        self.name = name
        self.server = server
        self.use_auth = server.auth is not None
        self.pool_size = pool_size
        # quartmail looks the name up once per app; do the same for the other clients.
        self.local_hostname = socket.getfqdn()
        self.app = Quart(__name__)
        self.app.config.update(server.mail_config())
        self.app.config["MAIL_POOL_SIZE"] = pool_size
        self.mail = Mail(self.app)
        self.sent = 0  # messages the server should have received

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """The app's lifespan (pool started, drained at the end) and an app context."""
        async with self.app.test_app(), self.app.app_context():
            yield

    def variants(self) -> dict[str, tuple[str, Variant]]:
        pool, conns = self.pool_size, RAW_CONNECTIONS
        return {
            "raw": ("raw aiosmtplib, 1 conn (baseline)", self.run_raw),
            "background": (f"send_background, pool of {pool}", self.run_background),
            "raw-concurrent": (f"raw aiosmtplib, {conns} conns (context)", self.run_raw_concurrent),
            "threads": ("thread per mail, smtplib (context)", self.run_threads),
        }

    def raw_client(self) -> aiosmtplib.SMTP:
        return self.server.raw_client(self.local_hostname, timeout=30)

    async def _raw_session(self, indices: range) -> None:
        smtp = self.raw_client()
        async with smtp:
            if self.use_auth:
                await smtp.login(*AUTH)
            for i in indices:
                await smtp.send_message(build_email_message(i))

    async def run_raw(self, count: int) -> float:
        start = time.perf_counter()
        await self._raw_session(range(count))
        elapsed = time.perf_counter() - start
        self.sent += count
        return elapsed

    async def run_raw_concurrent(self, count: int) -> float:
        n = RAW_CONNECTIONS
        start = time.perf_counter()
        await asyncio.gather(*(self._raw_session(range(k, count, n)) for k in range(n)))
        elapsed = time.perf_counter() - start
        self.sent += count
        return elapsed

    async def run_background(self, count: int) -> float:
        mail = self.mail
        start = time.perf_counter()
        futures = [mail.send_background(build_message(i)) for i in range(count)]
        results: list[SendResult] = await asyncio.gather(*futures)
        elapsed = time.perf_counter() - start
        self.sent += count
        if len(results) != count:
            raise RuntimeError(f"{len(results)} results for {count} messages")
        return elapsed

    async def run_threads(self, count: int) -> float:
        elapsed = await asyncio.to_thread(self._threads, count)
        self.sent += count
        return elapsed

    def _threads(self, count: int) -> float:
        """The Flask chapter's recipe: the request builds the message and starts a thread
        that sends it (Flask-Mail: smtplib, a connection per message). Plain SMTP only."""
        server = self.server
        if server.tls != "none" or self.use_auth:
            raise ValueError("the thread-per-mail variant is for a plain server without AUTH")
        errors: list[Exception] = []

        def send_async_email(msg: EmailMessage) -> None:
            try:
                with smtplib.SMTP(
                    server.host, server.port, local_hostname=self.local_hostname, timeout=30
                ) as smtp:
                    smtp.send_message(msg)
            except Exception as error:
                errors.append(error)

        start = time.perf_counter()
        threads = []
        for i in range(count):
            thread = threading.Thread(target=send_async_email, args=(build_email_message(i),))
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        if errors:
            print(f"  {len(errors)} thread(s) failed, e.g. {errors[0]!r}", file=sys.stderr)
        return elapsed


async def run_section(
    section: Section, plan: list[tuple[str, int, int]], rounds: int
) -> list[Result]:
    """Warm each variant up, then let them take turns for *rounds* rounds.

    *plan* lists (variant, messages per round, warm-up messages).
    """
    variants = section.variants()
    results = [Result(section.name, name, variants[name][0], count) for name, count, _ in plan]
    async with section.serving():
        for name, _, warmup in plan:  # imports, caches, TLS, the pool's sessions
            if warmup:
                await variants[name][1](warmup)
        for _ in range(rounds):
            for result in results:
                seconds = await variants[result.variant][1](result.count)
                result.rates.append(result.count / seconds)
    return results


def print_results(results: list[Result], rounds: int) -> None:
    raw = next((r for r in results if r.variant == "raw"), None)
    width = max(len(r.label) for r in results)
    for r in results:
        line = f"  {r.label + ':':<{width + 1}} {r.best:7.1f} msg/s"
        if rounds > 1:
            line += f" (median {r.median:7.1f})"
        line += f"  {r.count:5d} msgs/round"
        if raw is not None:
            line += f"  = {r.best / raw.best:5.2f}x raw"
        print(line)


def print_targets(results: list[Result], section: str | None = None) -> None:
    for target in TARGETS:
        if section is not None and target.section != section:
            continue
        checked = target.check(results)
        if checked is None:
            continue
        met, ratio = checked
        print(
            f"  target: {target.text} >= {target.ratio:g}x raw aiosmtplib: "
            f"{'MET' if met else 'NOT MET'} ({ratio:.2f}x)"
        )


def check_received(section: Section) -> bool:
    stats = section.server.stats()
    ok = stats["received"] == section.sent
    print(
        f"  server: {stats['received']} of {section.sent} messages received, "
        f"{stats['connections']} SMTP sessions (warm-up included)" + ("" if ok else "  <-- MISSING")
    )
    return ok


async def cpu_section(name: str, args: argparse.Namespace) -> tuple[list[Result], bool]:
    tls = TLS_SECTIONS[name]
    auth = AUTH if tls != "none" else None
    with smtp_server_process(tls=tls, auth=auth) as server:
        section = Section(name, server, POOL_SIZE)
        print(
            f"\n[{name}] tls={tls}, auth={'yes' if auth else 'no'}, server answers at once; "
            f"{args.n} messages x {args.rounds} round(s)"
        )
        warmup = args.warmup
        plan = [("raw", args.n, warmup), ("background", args.n, warmup)]
        if not args.no_context:
            plan.append(("raw-concurrent", args.n, warmup))
        results = await run_section(section, plan, args.rounds)
        print_results(results, args.rounds)
        print_targets(results, name)
        ok = check_received(section)
    return results, ok


async def slow_section(args: argparse.Namespace) -> tuple[list[Result], bool]:
    with smtp_server_process(data_delay=SLOW_DELAY) as server:
        section = Section("slow", server, SLOW_POOL_SIZE)
        print(
            f"\n[slow] plain, {SLOW_DELAY * 1000:g} ms per DATA; send_background and threads "
            f"{args.slow_n} messages, raw {args.slow_raw_n}, x {args.rounds} round(s); "
            f"ideal for the pool: {SLOW_POOL_SIZE / SLOW_DELAY:.0f} msg/s"
        )
        plan = [
            ("raw", args.slow_raw_n, 3),
            ("background", args.slow_n, 2 * SLOW_POOL_SIZE),
        ]
        if not args.no_context:
            plan.append(("threads", args.slow_n, 20))
        results = await run_section(section, plan, args.rounds)
        print_results(results, args.rounds)
        print_targets(results, "slow")
        ok = check_received(section)
    return results, ok


# Memory


def _status(name: str) -> int:
    """A size from ``/proc/self/status`` (VmRSS, VmHWM...), in bytes."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {name} in /proc/self/status")


def rss_now() -> int:
    """This process's resident set, in bytes (VmRSS)."""
    return _status("VmRSS")


def reset_peak() -> bool:
    """Reset the kernel's peak RSS of this process (VmHWM) to its current RSS (Linux 4.0+),
    so that :func:`rss_peak` tells the peak of what follows; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def rss_peak() -> int:
    """This process's peak resident set since :func:`reset_peak`, in bytes (VmHWM)."""
    return _status("VmHWM")


def ru_maxrss() -> int:
    """getrusage's peak RSS, in bytes (KiB on Linux). It is NOT the peak of this process
    alone: Linux carries the spawning process's RSS at fork over exec, and it cannot be reset."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_objects(kind: str, n: int) -> dict[str, Any]:
    """RSS of *n* pre-built messages held in a list (the baselines)."""
    build: Callable[[int], object] = (
        build_email_message if kind == "emailmessage" else build_message
    )
    warm = [build(i) for i in range(100)]  # imports and caches
    del warm
    gc.collect()
    peak_reset = reset_peak()
    before = rss_now()
    start = time.perf_counter()
    held = [build(i) for i in range(n)]
    build_seconds = time.perf_counter() - start
    result = {
        "kind": kind,
        "n": len(held),
        "before": before,
        "held": rss_now(),
        "peak": rss_peak(),
        "peak_reset": peak_reset,
        "ru_maxrss": ru_maxrss(),
        "build_seconds": build_seconds,
        "missing": 0,
    }
    del held
    return result


async def measure_queued(n: int) -> dict[str, Any]:
    """RSS of *n* messages queued by send_background while the server holds each DATA,
    then the drain, once the server answers at once again."""
    warmup = 4 * POOL_SIZE
    with smtp_server_process() as server:
        section = Section("memory", server, POOL_SIZE)
        async with section.serving():
            await section.run_background(warmup)  # the pool's sessions, imports, caches
            server.set_data_delay(PAUSE_DELAY)
            gc.collect()
            peak_reset = reset_peak()
            before = rss_now()
            start = time.perf_counter()
            futures = [section.mail.send_background(build_message(i)) for i in range(n)]
            submit_seconds = time.perf_counter() - start
            submitted = rss_now()
            # Let the workers take their first messages: the pool is now waiting in DATA.
            await asyncio.sleep(PAUSE_DELAY / 5)
            queued = rss_now()
            in_flight = server.stats()["data_attempts"] - warmup
            peak_queued = rss_peak()
            server.set_data_delay(0.0)
            start = time.perf_counter()
            results: list[SendResult] = await asyncio.gather(*futures)
            drain_seconds = time.perf_counter() - start
            del futures, results
        gc.collect()
        drained = rss_now()
        section.sent += n
        received = server.stats()["received"]
    return {
        "kind": "queued",
        "n": n,
        "before": before,
        "submitted": submitted,
        "held": queued,
        "peak_queued": peak_queued,
        "drained": drained,
        "peak": rss_peak(),
        "peak_reset": peak_reset,
        "ru_maxrss": ru_maxrss(),
        "submit_seconds": submit_seconds,
        "in_flight": in_flight,
        "drain_seconds": drain_seconds,
        "received": received,
        "missing": section.sent - received,
    }


def memory_child(kind: str, n: int) -> None:
    """Run one measurement (in a fresh process) and print it as one JSON line."""
    queued = kind == "queued"
    result = asyncio.run(measure_queued(n)) if queued else measure_objects(kind, n)
    print(json.dumps(result), flush=True)


def run_memory_child(kind: str, n: int) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--memory-child", kind]
    command += ["--memory-n", str(n)]
    done = subprocess.run(command, stdout=subprocess.PIPE, check=False)  # stderr inherited
    if done.returncode != 0:
        raise RuntimeError(f"the memory measurement {kind!r} failed (exit {done.returncode})")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


MB = 1024 * 1024


@dataclass(frozen=True)
class MemoryRow:
    label: str
    n: int
    before: int  # RSS before building or submitting, bytes
    held: int  # RSS with every message held (or queued)
    peak: int  # VmHWM since "before" (reset then)
    ru_maxrss: int  # getrusage's peak: an upper bound, see ru_maxrss()

    @property
    def growth(self) -> int:
        return self.held - self.before

    @property
    def peak_growth(self) -> int:
        return self.peak - self.before

    def line(self, width: int) -> str:
        return (
            f"  {self.label + ':':<{width + 1}} +{self.growth / MB:6.1f} MB "
            f"= {self.growth / self.n:6.0f} B/msg (RSS {self.before / MB:.1f} -> "
            f"{self.held / MB:.1f} MB); peak +{self.peak_growth / MB:6.1f} MB "
            f"= {self.peak_growth / self.n:6.0f} B/msg (VmHWM {self.peak / MB:.1f} MB, "
            f"ru_maxrss {self.ru_maxrss / MB:.1f} MB)"
        )


def memory_section(args: argparse.Namespace) -> tuple[list[MemoryRow], bool]:
    n = args.memory_n
    print(f"\n[memory] {n} messages, each measurement in a fresh process")
    rows: list[MemoryRow] = []
    labels = {
        "queued": f"send_background, queued (pool of {POOL_SIZE})",
        "emailmessage": "EmailMessage objects in a list",
        "message": "quartmail Message objects in a list",
    }
    width = max(map(len, labels.values()))
    ok, peak_reset = True, True
    for kind in MEMORY_KINDS:
        r = run_memory_child(kind, n)
        row = MemoryRow(labels[kind], n, r["before"], r["held"], r["peak"], r["ru_maxrss"])
        rows.append(row)
        peak_reset = peak_reset and r["peak_reset"]
        print(row.line(width))
        if kind == "queued":
            print(
                f"    right after submitting: {r['submitted'] / MB:.1f} MB "
                f"({r['submit_seconds'] * 1e6 / n:.0f} us per send_background call, "
                f"message built and flattened); queued: {r['held'] / MB:.1f} MB, "
                f"{r['in_flight']} in DATA (held {PAUSE_DELAY:g} s by the server), "
                f"peak so far {r['peak_queued'] / MB:.1f} MB"
            )
            print(
                f"    drain, server fast again: {n / r['drain_seconds']:.0f} msg/s (the first "
                f"{PAUSE_DELAY:g} s held included); "
                f"RSS after the drain {r['drained'] / MB:.1f} MB; server: {r['received']} "
                f"received (warm-up included), {r['missing']} missing"
                + ("" if r["missing"] == 0 else "  <-- MISSING")
            )
            ok = ok and r["missing"] == 0
    since = "since 'before' (reset through /proc/self/clear_refs)"
    if not peak_reset:
        since = "since the process started (/proc/self/clear_refs was not writable)"
    print(
        f"  peak = VmHWM {since}; ru_maxrss also counts what the bench process had "
        "when it spawned the measuring one (Linux keeps it over exec): an upper bound only"
    )
    return rows, ok


# Profile


async def profile_section(name: str, args: argparse.Namespace) -> None:
    tls = TLS_SECTIONS[name]
    with smtp_server_process(tls=tls, auth=AUTH if tls != "none" else None) as server:
        section = Section(name, server, POOL_SIZE)
        async with section.serving():
            for variant in args.profile:
                label, run = section.variants()[variant]
                await run(args.warmup)
                profiler = cProfile.Profile()
                profiler.enable()
                seconds = await run(args.n)
                profiler.disable()
                print(
                    f"== [{name}] {label}: {args.n} messages, "
                    f"{args.n / seconds:.0f} msg/s under cProfile"
                )
                for sort in ("tottime", "cumulative"):
                    out = io.StringIO()
                    pstats.Stats(profiler, stream=out).sort_stats(sort).print_stats(args.top)
                    text = out.getvalue()
                    print(text[text.index("   ncalls") :].rstrip(), end="\n\n")


# Main


def print_summary(results: list[Result], memory: list[MemoryRow], rounds: int) -> None:
    print("\nSummary")
    if results:
        width = max(len(r.section) + len(r.label) for r in results) + 3
        print(f"  {'section / variant':<{width}} {'best msg/s':>10} {'median':>8} {'x raw':>6}")
        for r in results:
            raw = next(x for x in results if x.section == r.section and x.variant == "raw")
            name = f"{r.section}: {r.label}"
            median = f"{r.median:8.1f}" if rounds > 1 else f"{'':8}"
            print(f"  {name:<{width}} {r.best:10.1f} {median} {r.best / raw.best:6.2f}")
    if memory:
        width = max(len(row.label) for row in memory)
        print(f"  memory, {memory[0].n} messages held (RSS growth; peak growth):")
        for row in memory:
            print(
                f"    {row.label + ':':<{width + 1}} {row.growth / MB:6.1f} MB "
                f"({row.growth / row.n:6.0f} B/msg); peak +{row.peak_growth / MB:.1f} MB "
                f"({row.peak_growth / row.n:6.0f} B/msg)"
            )
    checks = [(target, target.check(results)) for target in TARGETS]
    if any(checked is not None for _, checked in checks):
        print("Targets")
    for target, checked in checks:
        if checked is None:
            continue
        met, ratio = checked
        print(
            f"  {target.text}: >= {target.ratio:g}x raw aiosmtplib: "
            f"{'MET' if met else 'NOT MET'} ({ratio:.2f}x)"
        )


async def benchmark(args: argparse.Namespace) -> int:
    results: list[Result] = []
    memory: list[MemoryRow] = []
    ok = True
    for name in args.sections:
        if name in TLS_SECTIONS:
            section_results, section_ok = await cpu_section(name, args)
        elif name == "slow":
            section_results, section_ok = await slow_section(args)
        else:
            memory, section_ok = memory_section(args)
            section_results = []
        results += section_results
        ok = ok and section_ok
    print_summary(results, memory, args.rounds)
    if not ok:
        print("ERROR: the server did not receive every message", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput and memory of mail.send_background against raw aiosmtplib, "
        "with an SMTP server in another process (see the module docstring).",
    )
    parser.add_argument(
        "-n",
        type=int,
        default=None,
        help="messages per round and variant in plain/starttls/implicit (default 1000)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds; the best is reported (default 3)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up messages per variant (default 100)"
    )
    parser.add_argument(
        "--slow-n", type=int, default=None, help="messages per round, slow section (default 400)"
    )
    parser.add_argument(
        "--slow-raw-n",
        type=int,
        default=None,
        help="messages per round of raw aiosmtplib in the slow section (default 60)",
    )
    parser.add_argument(
        "--memory-n", type=int, default=None, help="messages queued and held (default 10000)"
    )
    parser.add_argument(
        "--only",
        dest="sections",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable)",
    )
    parser.add_argument(
        "--no-context",
        action="store_true",
        help="skip the context variants (raw on 8 connections, thread per mail)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: -n 200, 1 round, 20 warm-up, --slow-n 100, --slow-raw-n 20, "
        "--memory-n 1000 (unless given)",
    )
    parser.add_argument(
        "--profile",
        action="append",
        choices=["background", "raw"],
        help="instead of the benchmark, run this variant once under cProfile in each of the "
        "chosen plain/starttls/implicit sections and print the top functions (repeatable)",
    )
    parser.add_argument(
        "--top", type=int, default=30, help="functions shown per table with --profile"
    )
    parser.add_argument("--memory-child", choices=MEMORY_KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = {"n": 200, "rounds": 1, "warmup": 20, "slow_n": 100, "slow_raw_n": 20}
    default = {"n": 1000, "rounds": 3, "warmup": 100, "slow_n": 400, "slow_raw_n": 60}
    quick["memory_n"], default["memory_n"] = 1000, 10_000
    for key in default:
        if getattr(args, key) is None:
            setattr(args, key, (quick if args.quick else default)[key])
    if min(args.n, args.rounds, args.slow_n, args.slow_raw_n, args.memory_n) < 1:
        parser.error("-n, --rounds, --slow-n, --slow-raw-n and --memory-n must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if not args.sections:
        args.sections = list(SECTIONS)
    if args.profile and not any(name in TLS_SECTIONS for name in args.sections):
        parser.error("--profile needs a plain, starttls or implicit section")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("quartmail").setLevel(logging.WARNING)
    if args.memory_child:
        memory_child(args.memory_child, args.memory_n)
        return 0
    if args.profile:
        for name in args.sections:
            if name in TLS_SECTIONS:
                asyncio.run(profile_section(name, args))
        return 0
    print(
        f"quartmail send_background benchmark: sections {', '.join(args.sections)}; "
        f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}"
    )
    return asyncio.run(benchmark(args))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
