"""Background delivery (``mail.send_background``): throughput and memory, over real SMTP.

Baseline: raw aiosmtplib on ONE connection, an ``EmailMessage`` per mail. quartmail runs in its
app's lifespan (``app.test_app()``), timed from the first submit to the last result. ``plain``,
``starttls``, ``implicit`` (TLS with AUTH; the server answers at once): a pool of 8, target >=
2x; context: raw on 8 connections. ``slow`` (50 ms per DATA): a pool of 32, target >= 17x;
context: a thread per mail with blocking ``smtplib`` (the Flask chapter's). ``memory`` (Linux),
each figure in a fresh process: RSS growth and peak of ``--memory-n`` messages queued by
``send_background`` while the server holds each DATA 0.5 s, or held as ``EmailMessage`` or
quartmail ``Message`` objects. ``dkim``: ``MAIL_DKIM_KEY`` Ed25519 and RSA 2048 against none
(pool of 8): msg/s and CPU ms per message of this process (the server is another).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import smtplib
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage
from functools import partial
from typing import Any

import harness
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from quart import Quart
from send import HOSTNAME, build_email_message, build_message, mail_app, raw_session

from quartmail import Mail

# section: TLS mode, seconds per DATA, MAIL_POOL_SIZE, target (x the first variant)
SECTIONS: dict[str, tuple[harness.TLSMode, float, int, float]] = {
    "plain": ("none", 0.0, 8, 2.0),
    "starttls": ("starttls", 0.0, 8, 2.0),
    "implicit": ("implicit", 0.0, 8, 2.0),
    "slow": ("none", 0.05, 32, 17.0),
    "dkim": ("none", 0.0, 8, 0.0),
}
PAUSE_DELAY = 0.5  # seconds per DATA while the memory section holds messages queued
MB = 1024 * 1024


async def background(app: Quart, mail: Mail, count: int) -> float:
    """*count* messages through ``send_background``, all submitted, then all awaited."""
    async with app.app_context():
        start = time.perf_counter()
        await asyncio.gather(*(mail.send_background(build_message(i)) for i in range(count)))
        return time.perf_counter() - start


async def raw_connections(server: harness.SMTPServer, count: int) -> float:
    start = time.perf_counter()  # 8 connections, the mails shared out
    await asyncio.gather(*(raw_session(server, len(range(k, count, 8))) for k in range(8)))
    return time.perf_counter() - start


async def threads(server: harness.SMTPServer, count: int) -> float:
    """A thread per mail, each sending with smtplib (plain SMTP, no AUTH), all joined."""
    address = (server.config["MAIL_SERVER"], server.config["MAIL_PORT"])

    def send_async_email(msg: EmailMessage) -> None:
        with smtplib.SMTP(*address, local_hostname=HOSTNAME, timeout=30) as smtp:
            smtp.send_message(msg)

    def requests() -> float:  # each builds its message and starts its thread
        start, started = time.perf_counter(), []
        for i in range(count):
            started.append(
                threading.Thread(target=send_async_email, args=(build_email_message(i),))
            )
            started[-1].start()
        for thread in started:
            thread.join()
        return time.perf_counter() - start

    return await asyncio.to_thread(requests)  # it blocks: not on the event loop


async def section(name: str, args: argparse.Namespace) -> bool:
    """A section but ``memory``: its variants take turns, against the first."""
    tls, delay, pool, least = SECTIONS[name]
    auth = harness.AUTH if tls != "none" else None
    cpu: dict[str, list[float]] = {}  # CPU seconds per message of each run, by label
    async with harness.smtp_server(tls, auth, delay) as server, contextlib.AsyncExitStack() as apps:

        async def quartmail(label: str, n: int, warmup: int, **config: str) -> harness.Variant:
            app, mail = mail_app(server.mail_config(), MAIL_POOL_SIZE=pool, **config)
            await (lifespan := app.test_app()).startup()
            apps.push_async_callback(lifespan.shutdown)

            async def run(count: int) -> float:
                start = time.process_time()
                seconds = await background(app, mail, count)
                cpu.setdefault(label, []).append((time.process_time() - start) / count)
                return seconds

            return harness.Variant(label, run, n, warmup)

        what = f"{delay * 1000:g} ms per DATA" if delay else "the server answers at once"
        print(f"\n[{name}] tls={tls}, auth={bool(auth)}, {what}; pool of {pool}; ", end="")
        print(f"{args.rounds} round(s)")
        if name == "dkim":
            keys: dict[str, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey] = {
                "Ed25519": ed25519.Ed25519PrivateKey.generate(),
                "RSA 2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            }
            variants = [await quartmail("unsigned (baseline)", args.n, args.warmup)]
            for label, key in keys.items():
                pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
                dkim = {"MAIL_DKIM_KEY": pem, "MAIL_DKIM_SELECTOR": "b"}
                variants.append(await quartmail(label, args.n, args.warmup, **dkim))
        else:
            n, warmup = (args.slow_n, 2 * pool) if delay else (args.n, args.warmup)
            label, run = "raw aiosmtplib, 1 conn (baseline)", partial(raw_session, server)
            raw = harness.Variant(label, run, *((args.slow_raw_n, 3) if delay else (n, warmup)))
            variants = [raw, await quartmail(f"send_background, pool of {pool}", n, warmup)]
            if delay:
                label, run = "thread per mail, smtplib (context)", partial(threads, server)
                variants.append(harness.Variant(label, run, n, 20))
            else:
                label, run = "raw aiosmtplib, 8 conns (context)", partial(raw_connections, server)
                variants.append(harness.Variant(label, run, n, warmup))
        if args.profile:
            for key in args.profile:
                await harness.profile(variants[0 if key == "raw" else 1], args.top)
            return True
        await harness.take_turns(variants, args.rounds)
        harness.print_table(variants, variants[0], "unsigned" if name == "dkim" else "raw")
        if name == "dkim":
            base = min(cpu[variants[0].label][-args.rounds :]) * 1000  # not the warm-up's
            for label, each in cpu.items():
                ms = min(each[-args.rounds :]) * 1000
                print(f"  {label + ':':<20} {ms:6.2f} ms CPU per message (+{ms - base:.2f})")
        else:
            text = f"send_background x{pool}, {name} ({what}), vs raw aiosmtplib"
            harness.target(text, variants[1].best / raw.best, at_least=least)
        server.expected = sum(v.warmup + v.count * len(v.rates) for v in variants)
        return await server.check()


def status(name: str) -> int:
    """A size from ``/proc/self/status`` (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status", encoding="ascii") as file:
        return int(next(line for line in file if line.startswith(name + ":")).split()[1]) * 1024


def reset_peak() -> None:
    """Collect garbage; reset VmHWM to the current RSS, to tell the peak from now on."""
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")  # Linux 4.0+


async def measure(options: dict[str, Any], commands: harness.Commands) -> None:
    """A child: the memory ``n`` messages take, queued by ``send_background`` while the
    server holds each DATA, or built and kept in a list; answered as its first reply."""
    n, what, warmup = options["n"], options["what"], 32
    async with harness.smtp_server() as server:
        app, mail = mail_app(server.mail_config(), MAIL_POOL_SIZE=8)
        hold: Callable[[int], Any] = {
            "queued": lambda i: mail.send_background(build_message(i)),
            "emailmessage": build_email_message,
            "message": build_message,
        }[what]
        async with app.test_app(), app.app_context():
            await background(app, mail, warmup)  # the pool's sessions, imports, caches
            build_email_message(0)
            await server.set_data_delay(PAUSE_DELAY)
            reset_peak()
            r, held = {"before": status("VmRSS")}, [hold(i) for i in range(n)]
            await asyncio.sleep(PAUSE_DELAY / 5)  # the workers take their first messages
            r.update(held=status("VmRSS"), peak=status("VmHWM"))
            r["in_flight"] = (await server.stats())["data_attempts"] - warmup
            await server.set_data_delay(0.0)
            if what == "queued":
                await asyncio.gather(*held)
        received = (await server.stats())["received"]
        r["missing"] = warmup + (n if what == "queued" else 0) - received
    commands.reply(r)
    await commands.until_closed()


async def memory(args: argparse.Namespace) -> bool:
    n, ok = args.memory_n, True
    print(f"\n[memory] {n} messages, each measurement in a fresh process")
    for what, label in {
        "queued": "send_background, queued (pool of 8)",
        "emailmessage": "EmailMessage objects in a list",
        "message": "quartmail Message objects in a list",
    }.items():
        options = [{"kind": "memory", "what": what, "n": n}]
        async with harness.children(__file__, options, ready_timeout=600) as (child,):
            r = child.ready
        growth, peak = r["held"] - r["before"], r["peak"] - r["before"]
        print(
            f"  {label + ':':<37} +{growth / MB:6.1f} MB = {growth / n:6.0f} B/msg "
            f"(RSS {r['before'] / MB:.1f} -> {r['held'] / MB:.1f} MB); "
            f"peak +{peak / MB:6.1f} MB = {peak / n:6.0f} B/msg"
        )
        in_data = f"{r['in_flight']} in DATA (held {PAUSE_DELAY:g} s); " if what == "queued" else ""
        print(f"    {in_data}{r['missing']} missing" + ("  <-- MISSING" if r["missing"] else ""))
        ok = ok and not r["missing"]
    return ok


async def benchmark() -> int:
    args = harness.Arguments(
        {
            "n": (1000, 200, "messages per round and variant, plain/starttls/implicit/dkim"),
            "rounds": (3, 1, "rounds; the best is reported"),
            "warmup": (100, 20, "warm-up messages per variant"),
            "slow_n": (400, 100, "messages per round, slow section"),
            "slow_raw_n": (60, 20, "messages per round of raw aiosmtplib, slow section"),
            "memory_n": (10_000, 1000, "messages queued and held"),
        },
        only=("plain", "starttls", "implicit", "slow", "memory", "dkim"),
        profile=("background", "raw"),
    ).parse()
    ok = True
    for name in args.only:
        if name == "memory" and not args.profile:
            ok = await memory(args) and ok
        elif name != "memory" and not (args.profile and name == "dkim"):
            ok = await section(name, args) and ok
    return harness.finish(ok)


if __name__ == "__main__":
    harness.main(benchmark, {"memory": measure})
