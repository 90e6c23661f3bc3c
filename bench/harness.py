"""The benchmarks' shared harness: arguments, variants taking turns, tables and targets,
profiling, child processes (``--child OPTIONS``: JSON lines, the first once ready, until stdin
closes) and the SMTP server in one (:func:`smtp_server`). See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import logging
import math
import os
import pathlib
import pstats
import signal
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from quartmail.testing import SMTPTestServer, TLSCertificates, TLSMode

PROJECT = pathlib.Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
AUTH = ("bench", "bench-password")  # the credentials of servers that require AUTH
START_TIMEOUT = 60.0  # seconds for a child (or a served app) to get ready
REPLY_TIMEOUT = 120.0  # seconds for a child to answer a command
Sizes = Mapping[str, tuple[int, int, str]]  # name: (default, --quick value, help)


class Arguments(argparse.ArgumentParser):
    """*sizes*, ``--only``, ``--quick``, ``--profile``; the script's docstring as ``--help``."""

    def __init__(self, sizes: Sizes, only: Sequence[str], profile: Sequence[str] = ()) -> None:
        doc = sys.modules["__main__"].__doc__
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.sizes, self.only = sizes, only
        for name, (default, _, text) in sizes.items():
            flag = "-n" if name == "n" else "--" + name.replace("_", "-")
            self.add_argument(flag, dest=name, type=int, help=f"{text} (default {default})")
        self.add_argument("--only", action="append", choices=only, help="only this (repeatable)")
        smoke = ", ".join(f"{name} {value[1]}" for name, value in sizes.items())
        self.add_argument("--quick", action="store_true", help=f"smoke test: {smoke}")
        if profile:
            self.add_argument("--profile", action="append", choices=profile, help="cProfile it")
            self.add_argument("--top", type=int, default=30, help="functions shown per table")

    def parse(self) -> argparse.Namespace:
        """Parse, fill in the sizes not given, check them; ``only`` in declared order."""
        args = self.parse_args()
        for name, (default, quick, _) in self.sizes.items():
            if getattr(args, name) is None:
                setattr(args, name, quick if args.quick else default)
            if getattr(args, name) < (least := 0 if name == "warmup" else 1):
                self.error(f"{name} must be at least {least}")
        args.only = [name for name in self.only if name in (args.only or self.only)]
        load, python = os.getloadavg()[0], sys.version.split()[0]
        print(f"{os.cpu_count()} CPUs, load average {load:.2f}; Python {python}")
        return args


@dataclass
class Variant:
    """A way of doing the thing measured: ``run(count)`` does it *count* times, in seconds."""

    label: str
    run: Callable[[int], Awaitable[float]]
    count: int  # per round
    warmup: int = 0
    rates: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return max(self.rates)

    @property
    def done(self) -> int:  # runs so far, warm-up included
        return self.warmup + self.count * len(self.rates) if self.rates else 0


async def take_turns(variants: Sequence[Variant], rounds: int) -> None:
    """Warm every variant up, then run them in turn (a slow phase of the machine hits all)."""
    for variant in variants:
        if variant.warmup:
            await variant.run(variant.warmup)
    for _ in range(rounds):
        for variant in variants:
            variant.rates.append(variant.count / await variant.run(variant.count))


def print_table(
    variants: Sequence[Variant], baseline: Variant | None, name: str, unit: str = "msg/s"
) -> None:
    """Each variant's best rate, its median and its ratio to *baseline*'s best (called *name*)."""
    width = max(len(variant.label) for variant in variants) + 1
    for variant in variants:
        line = f"  {variant.label + ':':<{width}} {variant.best:7.1f} {unit}"
        if len(variant.rates) > 1:
            line += f" (median {statistics.median(variant.rates):7.1f})"
        if baseline is not None:
            line += f"  = {variant.best / baseline.best:5.2f}x {name}"
        print(line)


_targets: list[str] = []


def target(
    text: str, ratio: float, *, at_least: float = 0.0, at_most: float = math.inf, unit: str = "x"
) -> None:
    """Print (and repeat in :func:`finish`) whether *ratio* meets a target."""
    bound = f">= {at_least:g}{unit}" if at_least else f"<= {at_most:g}{unit}"
    met = "MET" if at_least <= ratio <= at_most else "NOT MET"
    _targets.append(f"{text} {bound}: {met} ({ratio:.2f}{unit})")
    print("  target: " + _targets[-1])


def finish(ok: bool) -> int:
    """Repeat the targets; the exit status: 1 if something went missing or failed, else 0."""
    if _targets:
        print("Targets\n" + "\n".join("  " + line for line in _targets))
    if not ok:
        print("ERROR: a message went missing or a run failed (see above)", file=sys.stderr)
    return 0 if ok else 1


def print_profile(stats: cProfile.Profile | str, top: int) -> None:
    """The *top* functions by own time, then by cumulative time."""
    for sort in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(stats, stream=out).sort_stats(sort).print_stats(top)
        text = out.getvalue()
        print(text[text.index("   ncalls") :].rstrip(), end="\n\n")  # without the preamble


async def profile(variant: Variant, top: int) -> None:
    """Warm *variant* up, then run one round of it under cProfile and print the top."""
    await variant.run(variant.warmup)
    with cProfile.Profile() as profiler:
        seconds = await variant.run(variant.count)
    print(f"== {variant.label}: {variant.count / seconds:.0f} msg/s under cProfile")
    print_profile(profiler, top)


@dataclass
class Child:
    """A child process, the parent's side; ``ready`` is its first answer."""

    process: asyncio.subprocess.Process
    ready: dict[str, Any] = field(default_factory=dict)

    async def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode("ascii") + b"\n")
        await self.process.stdin.drain()

    async def ask(self, command: str | None, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:  # noqa: ASYNC109
        """Send *command* (None: nothing), then read the child's answer."""
        if command is not None:
            await self.send(command)
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):  # a TimeoutError: the child hangs
            line = await self.process.stdout.readline()
        if not line:
            code = await self.process.wait()
            raise RuntimeError(f"child exited (code {code}); see its traceback above")
        return dict(json.loads(line))


@contextlib.asynccontextmanager
async def children(
    script: str, options: Sequence[dict[str, Any]], ready_timeout: float = START_TIMEOUT
) -> AsyncIterator[list[Child]]:
    """A child per options, each with its first answer; at the end, stdin closed, or killed."""
    started: list[Child] = []
    script, pipe = os.path.abspath(script), asyncio.subprocess.PIPE  # noqa: ASYNC240 (no I/O)

    async def stop(process: asyncio.subprocess.Process) -> None:
        if process.stdin is not None:
            process.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 10.0)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()

    try:
        for option in options:
            command = (sys.executable, script, "--child", json.dumps(option))
            started.append(
                Child(await asyncio.create_subprocess_exec(*command, stdin=pipe, stdout=pipe))
            )
        for child in started:
            child.ready = await child.ask(None, ready_timeout)
        yield started
    finally:
        await asyncio.gather(*(stop(child.process) for child in started))


def reply(data: Mapping[str, Any]) -> None:
    """A child's answer to its parent."""
    with contextlib.suppress(BrokenPipeError):  # the parent is gone: stop all the same
        print(json.dumps(data), flush=True)


Commands = AsyncIterator[str]  # a child's commands from its parent, to the end of its stdin
ChildMain = Callable[[dict[str, Any], Commands], Awaitable[None]]


async def _run_child(run: ChildMain, options: dict[str, Any]) -> None:
    reader, loop = asyncio.StreamReader(), asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> Commands:
        while line := await reader.readline():
            yield line.decode("ascii").strip()

    await run(options, commands())


def main(
    benchmark: Callable[[], Coroutine[Any, Any, int]], children: Mapping[str, ChildMain] = {}
) -> NoReturn:
    """The script's entry point: the benchmark, or the child that ``--child`` asks for."""
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        options = json.loads(sys.argv[2])
        # Ctrl-C reaches the whole process group: the parent handles it and closes our stdin.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        logging.basicConfig(format=f"[child {os.getpid()}] %(name)s: %(message)s")
        known = {"smtp": _serve_smtp, **children}
        sys.exit(asyncio.run(_run_child(known[options["kind"]], options)))
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        sys.exit(asyncio.run(benchmark()))
    except KeyboardInterrupt:
        sys.exit(130)


@dataclass
class SMTPServer:
    """An SMTP test server in a child process, as given by :func:`smtp_server`."""

    child: Child
    config: dict[str, Any]  # the MAIL_* settings that point an app at it
    expected: int = 0  # messages sent to it, for check()

    async def stats(self, data_delay: float | None = None) -> dict[str, Any]:
        """``received``, ``data_attempts``, ``connections``, ``refused`` (421), ``mail_times``
        (each MAIL FROM's, since the last call); *data_delay*: the wait before each DATA."""
        return await self.child.ask("stats" if data_delay is None else repr(data_delay))

    async def check(self) -> bool:
        """Print how many of :attr:`expected` messages the server received; whether all."""
        got, sessions = (stats := await self.stats())["received"], stats["connections"]
        text = f"{got} of {self.expected} messages received, {sessions} SMTP sessions"
        print(f"  server: {text} (warm-up included)" + " <-- MISSING" * (got != self.expected))
        return bool(got == self.expected)


@contextlib.asynccontextmanager
async def smtp_server(
    tls: TLSMode = "none", auth: bool = False, data_delay: float = 0.0, **server: bool | int | None
) -> AsyncIterator[SMTPServer]:
    """An :class:`~quartmail.testing.SMTPTestServer` (*server*: its options) in a child
    process, counting the messages and forgetting them (flat memory)."""
    with tempfile.TemporaryDirectory(prefix="quartmail-bench-") as directory:
        options = dict(kind="smtp", tls=tls, auth=auth, dir=directory, delay=data_delay)
        async with children(__file__, [{**options, "server": server}]) as (child,):
            yield SMTPServer(child, child.ready)


async def _serve_smtp(options: dict[str, Any], commands: Commands) -> None:
    tls, auth, more = options["tls"], AUTH if options["auth"] else None, options["server"]
    certs = TLSCertificates.create(pathlib.Path(options["dir"])) if tls != "none" else None
    server = SMTPTestServer(tls=tls, certificates=certs, auth=auth, idle_timeout=3600.0, **more)
    server.data_delay = float(options["delay"])
    received, mail_times = 0, list[float]()

    def forget() -> None:  # keep the count and the MAIL FROM times, not the messages
        nonlocal received
        received += len(server.messages)
        mail_times.extend(c.time for c in server.commands if c.verb == "MAIL")
        server.messages.clear()
        server.commands.clear()

    async def forget_periodically() -> None:
        while True:
            await asyncio.sleep(0.25)
            forget()

    async with server, asyncio.TaskGroup() as tasks:
        forgetting = tasks.create_task(forget_periodically())
        reply(server.mail_config())
        async for command in commands:
            if command != "stats":
                server.data_delay = float(command)
            forget()
            stats = dict(received=received, data_attempts=server.data_attempts)
            stats.update(connections=server.connections, refused=server.refused_connections)
            reply({**stats, "mail_times": mail_times[:]})
            mail_times.clear()
        forgetting.cancel()


if __name__ == "__main__":  # how the SMTP server's child process starts
    main(lambda: asyncio.sleep(0, 2))  # (and nothing else: 2, a usage error)
