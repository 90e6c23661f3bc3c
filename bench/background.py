"""Background delivery (``mail.send_background``): throughput and memory, over real SMTP.

Baseline: raw aiosmtplib on ONE connection, an ``EmailMessage`` per mail. quartmail runs as in
an app: ``Mail(app)``, its lifespan (``app.test_app()``: the pool starts, and drains at the end).
``plain``, ``starttls``, ``implicit`` (the server answers at once; TLS with AUTH): a pool of 8,
timed from the first submit to the last result; context: raw on 8 connections. Target >= 2x.
``slow`` (50 ms per DATA): a pool of 32; context: a thread per mail with blocking ``smtplib``
(the Flask chapter's). Target >= 17x. ``memory`` (Linux): ``--memory-n`` messages, each figure
in a fresh process, RSS growth and peak (VmHWM) of (a) all queued by ``send_background`` while
the server holds each DATA 0.5 s, then drained; (b) ``EmailMessage`` objects in a list; (c)
quartmail ``Message`` objects. ``dkim``: what DKIM signing (``MAIL_DKIM_KEY``) costs per
message, Ed25519 and RSA 2048, against unsigned, each with its own app on the plain server
(pool of 8): msg/s and CPU milliseconds per message of this process (the server is another).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import smtplib
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import harness
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from quart import Quart
from send import build_email_message, build_message, raw_session

from quartmail import Mail

SECTIONS = ("plain", "starttls", "implicit", "slow", "memory", "dkim")
TLS: dict[str, harness.TLSMode] = {"plain": "none", "starttls": "starttls", "implicit": "implicit"}
POOL_SIZE, SLOW_POOL_SIZE, RAW_CONNECTIONS = 8, 32, 8
SLOW_DELAY = 0.05  # seconds the slow server takes per DATA
PAUSE_DELAY = 0.5  # seconds per DATA while the memory section holds messages queued
MB = 1024 * 1024


class Section:
    """The variants of one section, bound to one server and one app."""

    def __init__(self, server: harness.SMTPServer, pool_size: int, **config: Any) -> None:
        self.server = server
        self.hostname = socket.getfqdn()  # quartmail looks it up once per app; so do the others
        self.app = Quart(__name__)
        self.app.config.update(server.mail_config(), MAIL_POOL_SIZE=pool_size, **config)
        self.mail = Mail(self.app)
        self.cpu: list[float] = []  # CPU seconds per message, per round (the dkim section)

    async def raw(self, count: int) -> float:
        start = time.perf_counter()
        await raw_session(self.server, self.hostname, range(count))
        self.server.expected += count
        return time.perf_counter() - start

    async def raw_concurrent(self, count: int) -> float:
        start, n = time.perf_counter(), RAW_CONNECTIONS
        await asyncio.gather(
            *(raw_session(self.server, self.hostname, range(k, count, n)) for k in range(n))
        )
        self.server.expected += count
        return time.perf_counter() - start

    async def background(self, count: int) -> float:
        start = time.perf_counter()
        await asyncio.gather(*(self.mail.send_background(build_message(i)) for i in range(count)))
        self.server.expected += count
        return time.perf_counter() - start

    async def background_cpu(self, count: int) -> float:
        """:meth:`background` in this section's own app, noting the CPU time per message."""
        async with self.app.app_context():
            cpu = time.process_time()
            seconds = await self.background(count)
            self.cpu.append((time.process_time() - cpu) / count)
        return seconds

    def threads(self, count: int) -> float:
        """A thread per mail, each sending with smtplib (plain SMTP, no AUTH), all joined."""
        self.server.expected += count
        host, port = self.server.config["MAIL_SERVER"], self.server.config["MAIL_PORT"]

        def send_async_email(msg: Any) -> None:
            with smtplib.SMTP(host, port, local_hostname=self.hostname, timeout=30) as smtp:
                smtp.send_message(msg)

        start, threads = time.perf_counter(), []
        for i in range(count):  # each request builds its message and starts its thread
            threads.append(
                threading.Thread(target=send_async_email, args=(build_email_message(i),))
            )
            threads[-1].start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - start


async def throughput(name: str, args: argparse.Namespace) -> bool:
    slow = name == "slow"
    tls = TLS.get(name, "none")
    auth = harness.AUTH if tls != "none" else None
    async with harness.smtp_server(tls, auth, SLOW_DELAY if slow else 0.0) as server:
        pool = SLOW_POOL_SIZE if slow else POOL_SIZE
        section = Section(server, pool)
        what = f"{SLOW_DELAY * 1000:g} ms per DATA" if slow else "the server answers at once"
        print(f"\n[{name}] tls={tls}, auth={bool(auth)}, {what}; {args.rounds} round(s)")
        n, warmup = (args.slow_n, 2 * pool) if slow else (args.n, args.warmup)
        raw = harness.Variant("raw aiosmtplib, 1 conn (baseline)", section.raw, n, warmup)
        if slow:
            raw.count, raw.warmup = args.slow_raw_n, 3
        label = f"send_background, pool of {pool}"
        chosen = {"raw": raw, "background": harness.Variant(label, section.background, n, warmup)}
        if not args.no_context and slow:
            label = "thread per mail, smtplib (context)"

            def threads(count: int) -> Awaitable[float]:
                return asyncio.to_thread(section.threads, count)

            chosen["context"] = harness.Variant(label, threads, n, 20)
        elif not args.no_context:
            label = f"raw aiosmtplib, {RAW_CONNECTIONS} conns (context)"
            chosen["context"] = harness.Variant(label, section.raw_concurrent, n, warmup)
        variants = list(chosen.values())
        async with section.app.test_app(), section.app.app_context():
            for key in args.profile or ():
                await harness.profile(chosen[key], args.top)
            if args.profile:
                return await server.check()
            await harness.take_turns(variants, args.rounds)
        harness.print_table(variants, raw, "raw")
        text = f"send_background x{pool}, {name} ({what}), vs raw aiosmtplib"
        harness.target(text, variants[1].best / raw.best, at_least=17.0 if slow else 2.0)
        return await server.check()


# DKIM signing
def private_pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


async def signing(args: argparse.Namespace) -> bool:
    keys = {
        "unsigned (baseline)": None,
        "Ed25519": ed25519.Ed25519PrivateKey.generate(),
        "RSA 2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }
    async with harness.smtp_server() as server:
        print(f"\n[dkim] send_background, pool of {POOL_SIZE}, plain; {args.rounds} round(s)")
        sections: dict[str, Section] = {}
        for label, key in keys.items():
            dkim = (
                {}
                if key is None
                else {"MAIL_DKIM_KEY": private_pem(key), "MAIL_DKIM_SELECTOR": "b"}
            )
            sections[label] = Section(server, POOL_SIZE, **dkim)
        variants = [
            harness.Variant(label, section.background_cpu, args.n, args.warmup)
            for label, section in sections.items()
        ]
        async with contextlib.AsyncExitStack() as lifespans:
            for section in sections.values():
                lifespan = section.app.test_app()
                await lifespan.startup()
                lifespans.push_async_callback(lifespan.shutdown)
            await harness.take_turns(variants, args.rounds)
        harness.print_table(variants, variants[0], "unsigned")
        rounds = slice(-args.rounds, None)  # not the warm-up's
        base = min(sections["unsigned (baseline)"].cpu[rounds])
        for label, section in sections.items():
            cpu = min(section.cpu[rounds])
            extra = (cpu - base) * 1000
            print(f"  {label + ':':<20} {cpu * 1000:6.2f} ms CPU per message (+{extra:.2f})")
        return await server.check()


# Memory
def status(name: str) -> int:
    """A size from ``/proc/self/status`` (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status", encoding="ascii") as file:
        line = next(line for line in file if line.startswith(name + ":"))
    return int(line.split()[1]) * 1024


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux 4.0+), so that it tells the peak from now on."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")


async def measure(options: dict[str, Any], commands: harness.Commands) -> None:
    """A child: one measurement, answered as its first reply."""
    what, n = options["what"], options["n"]
    if what == "queued":
        result = await measure_queued(n)
    else:
        build: Callable[[int], object] = build_message if what == "message" else build_email_message
        warm = [build(i) for i in range(100)]  # imports and caches
        del warm
        gc.collect()
        reset_peak()
        result = {"before": status("VmRSS")}
        held = [build(i) for i in range(n)]
        result.update(held=status("VmRSS"), peak=status("VmHWM"), n=len(held))
    commands.reply(result)
    await commands.until_closed()


async def measure_queued(n: int) -> dict[str, Any]:
    warmup = 4 * POOL_SIZE
    async with harness.smtp_server() as server:
        section = Section(server, POOL_SIZE)
        async with section.app.test_app(), section.app.app_context():
            await section.background(warmup)  # the pool's sessions, imports, caches
            await server.set_data_delay(PAUSE_DELAY)
            gc.collect()
            reset_peak()
            r: dict[str, Any] = {"before": status("VmRSS")}
            start = time.perf_counter()
            futures = [section.mail.send_background(build_message(i)) for i in range(n)]
            r["submit"] = time.perf_counter() - start
            await asyncio.sleep(PAUSE_DELAY / 5)  # the workers take their first messages
            r["held"] = status("VmRSS")
            r["in_flight"] = (await server.stats())["data_attempts"] - warmup
            await server.set_data_delay(0.0)
            start = time.perf_counter()
            await asyncio.gather(*futures)
            r["drain"] = time.perf_counter() - start
            server.expected += n
            del futures
        gc.collect()
        r.update(drained=status("VmRSS"), peak=status("VmHWM"))
        r["missing"] = server.expected - (await server.stats())["received"]  # (no print: stdout)
    return r


async def memory(args: argparse.Namespace) -> bool:
    n = args.memory_n
    print(f"\n[memory] {n} messages, each measurement in a fresh process")
    labels = {
        "queued": f"send_background, queued (pool of {POOL_SIZE})",
        "emailmessage": "EmailMessage objects in a list",
        "message": "quartmail Message objects in a list",
    }
    ok = True
    for what, label in labels.items():
        options = [{"kind": "memory", "what": what, "n": n}]
        async with harness.children(__file__, options, ready_timeout=600) as (child,):
            r = child.ready
        growth, peak = r["held"] - r["before"], r["peak"] - r["before"]
        print(
            f"  {label + ':':<37} +{growth / MB:6.1f} MB = {growth / n:6.0f} B/msg "
            f"(RSS {r['before'] / MB:.1f} -> {r['held'] / MB:.1f} MB); "
            f"peak +{peak / MB:6.1f} MB = {peak / n:6.0f} B/msg"
        )
        if what == "queued":
            print(
                f"    {r['submit'] * 1e6 / n:.0f} µs per send_background call; "
                f"{r['in_flight']} in DATA (held {PAUSE_DELAY:g} s); drain once fast again: "
                f"{n / r['drain']:.0f} msg/s; RSS after the drain {r['drained'] / MB:.1f} MB; "
                f"{r['missing']} missing" + ("  <-- MISSING" if r["missing"] else "")
            )
            ok = ok and not r["missing"]
    return ok


async def benchmark() -> int:
    parser = harness.Arguments(
        {
            "n": (1000, 200, "messages per round and variant, plain/starttls/implicit"),
            "rounds": (3, 1, "rounds; the best is reported"),
            "warmup": (100, 20, "warm-up messages per variant"),
            "slow_n": (400, 100, "messages per round, slow section"),
            "slow_raw_n": (60, 20, "messages per round of raw aiosmtplib, slow section"),
            "memory_n": (10_000, 1000, "messages queued and held"),
        },
        only=SECTIONS,
        profile=("background", "raw"),
    )
    parser.add_argument("--no-context", action="store_true", help="skip the context variants")
    args = parser.parse()
    ok = True
    for name in args.only:
        if name == "memory" and not args.profile:
            ok = await memory(args) and ok
        elif name == "dkim" and not args.profile:
            ok = await signing(args) and ok
        elif name not in ("memory", "dkim"):
            ok = await throughput(name, args) and ok
    return harness.finish(ok)


if __name__ == "__main__":
    harness.main(benchmark, {"memory": measure})
