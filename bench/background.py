"""Background delivery (``mail.send_background``, in its app's lifespan): msg/s against raw
aiosmtplib on ONE connection. ``plain``, ``starttls``, ``implicit``: a pool of 8, target >= 2x;
``slow`` (50 ms per DATA): a pool of 32, target >= 17x (context: a thread per mail, smtplib);
``memory``: RSS growth of ``--memory-n`` queued messages (vs ``EmailMessage``s, ``Message``s);
``dkim``: signing with Ed25519, RSA 2048 or not, msg/s and this process's CPU per message.
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
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from harness import HOSTNAME, build_email_message, build_message

from quartmail.testing import TLSMode

# section: TLS mode, seconds per DATA, MAIL_POOL_SIZE, target (x the first variant)
SECTIONS: dict[str, tuple[TLSMode, float, int, float]] = {
    "plain": ("none", 0.0, 8, 2.0),
    "starttls": ("starttls", 0.0, 8, 2.0),
    "implicit": ("implicit", 0.0, 8, 2.0),
    "slow": ("none", 0.05, 32, 17.0),
    "dkim": ("none", 0.0, 8, 0.0),
}
PAUSE_DELAY = 0.5  # seconds per DATA while the memory section holds messages queued


async def threads(server: harness.SMTPServer, count: int) -> float:
    """A thread per mail, each sending with smtplib (plain SMTP, no AUTH), all joined."""
    port = server.config["MAIL_PORT"]

    def send_email(msg: EmailMessage) -> None:
        with smtplib.SMTP(harness.HOST, port, local_hostname=HOSTNAME, timeout=30) as smtp:
            smtp.send_message(msg)

    def requests() -> None:  # each builds its message and starts its thread
        started = []
        for i in range(count):
            started.append(threading.Thread(target=send_email, args=(build_email_message(i),)))
            started[-1].start()
        for thread in started:
            thread.join()

    start = time.perf_counter()
    await asyncio.to_thread(requests)  # it blocks: not on the event loop
    return time.perf_counter() - start


async def section(name: str, args: argparse.Namespace) -> bool:
    """A section but ``memory``: its variants take turns, against the first."""
    tls, delay, pool, least = SECTIONS[name]
    async with (
        harness.smtp_server(tls, tls != "none", delay) as server,
        contextlib.AsyncExitStack() as apps,
    ):

        async def quartmail(label: str, n: int, warmup: int, **config: Any) -> harness.Variant:
            app, mail = harness.mail_app(server.config, MAIL_POOL_SIZE=pool, **config)
            await (lifespan := app.test_app()).startup()
            apps.push_async_callback(lifespan.shutdown)
            return harness.Variant(label, partial(harness.background, app, mail), n, warmup)

        what = f"{delay * 1000:g} ms per DATA" if delay else "the server answers at once"
        print(f"\n[{name}] tls={tls}, {what}; pool of {pool}; {args.rounds} round(s)")
        if name == "dkim":
            keys: dict[str, PrivateKeyTypes] = {"Ed25519": ed25519.Ed25519PrivateKey.generate()}
            keys["RSA 2048"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            variants = [await quartmail("unsigned (baseline)", args.n, args.warmup)]
            for label, key in keys.items():
                pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
                dkim = {"MAIL_DKIM_KEY": pem, "MAIL_DKIM_SELECTOR": "b"}
                variants.append(await quartmail(label, args.n, args.warmup, **dkim))
        else:
            n, warmup = (args.slow_n, 2 * pool) if delay else (args.n, args.warmup)
            label, run = "raw aiosmtplib, 1 conn (baseline)", partial(harness.raw_session, server)
            raw = harness.Variant(label, run, *((args.slow_raw_n, 3) if delay else (n, warmup)))
            variants = [raw, await quartmail(f"send_background, pool of {pool}", n, warmup)]
            if delay:
                label, run = "thread per mail, smtplib (context)", partial(threads, server)
                variants.append(harness.Variant(label, run, n, 20))
        for key in args.profile or ():
            await harness.profile(variants[0 if key == "raw" else 1], args.top)
        if args.profile:
            return True
        vs = "unsigned" if name == "dkim" else "raw"
        await harness.take_turns(variants, args.rounds, variants[0], vs)
        if name == "dkim":  # the CPU of this process (the server is another)
            base = min(variants[0].cpu) * 1000
            for variant in variants:
                ms = min(variant.cpu) * 1000
                print(
                    f"  {variant.label + ':':<20} {ms:6.2f} ms CPU per message (+{ms - base:.2f})"
                )
        else:
            text = f"send_background x{pool}, {name} ({what}), vs raw aiosmtplib"
            harness.target(text, variants[1].best / raw.best, at_least=least)
        server.expected = sum(v.done for v in variants)
        return await server.check()


def rss() -> int:
    """This process's resident set size (Linux), in bytes."""
    with open("/proc/self/status", encoding="ascii") as file:
        return int(next(line for line in file if line.startswith("VmRSS:")).split()[1]) * 1024


async def measure(options: dict[str, Any], commands: harness.Commands) -> None:
    """A child: the RSS growth of ``n`` messages queued by ``send_background`` while the
    server holds each DATA, or built and kept in a list; answered as its first reply."""
    n, what, warmup = options["n"], options["what"], 32
    async with harness.smtp_server() as server:
        app, mail = harness.mail_app(server.config, MAIL_POOL_SIZE=8)
        hold: Callable[[int], Any] = {
            "queued": lambda i: mail.send_background(build_message(i)),
            "emailmessage": build_email_message,
            "message": build_message,
        }[what]
        async with app.test_app(), app.app_context():
            # warm up: the pool's sessions; the imports and caches of what is kept below
            await asyncio.gather(*(mail.send_background(build_message(i)) for i in range(warmup)))
            warm = [hold(i) for i in range(0 if what == "queued" else 100)]
            del warm  # their memory free for reuse, as in an app that has been running
            await server.stats(data_delay=PAUSE_DELAY)
            gc.collect()
            before, held = rss(), [hold(i) for i in range(n)]
            await asyncio.sleep(PAUSE_DELAY / 5)  # the workers take their first messages
            growth, in_data = rss() - before, (await server.stats())["data_attempts"] - warmup
            await server.stats(data_delay=0.0)
            if what == "queued":
                await asyncio.gather(*held)
        missing = warmup + (n if what == "queued" else 0) - (await server.stats())["received"]
    harness.reply({"growth": growth, "in_data": in_data, "missing": missing})
    async for _ in commands:
        pass


async def memory(args: argparse.Namespace) -> bool:
    n, ok = args.memory_n, True
    print(f"\n[memory] {n} messages, RSS growth, each measurement in a fresh process")
    for what, label in {
        "queued": "send_background, queued (pool of 8)",
        "emailmessage": "EmailMessage objects in a list",
        "message": "quartmail Message objects in a list",
    }.items():
        options = [{"kind": "memory", "what": what, "n": n}]
        async with harness.children(__file__, options, ready_timeout=600) as (child,):
            r = child.ready
        line = f"  {label + ':':<37} +{r['growth'] / 2**20:6.1f} MB = {r['growth'] / n:6.0f} B/msg"
        if what == "queued" or r["missing"]:
            line += f"; {r['in_data']} in DATA (held {PAUSE_DELAY:g} s), {r['missing']} missing"
        print(line + ("  <-- MISSING" if r["missing"] else ""))
        ok = ok and not r["missing"]
    return ok


async def benchmark() -> int:
    args = harness.Arguments(
        ("plain", "starttls", "implicit", "slow", "memory", "dkim"),
        ("background", "raw"),
        n=(1000, 200, "messages per round and variant, plain/starttls/implicit/dkim"),
        warmup=(100, 20),
        slow_n=(400, 100, "messages per round, slow section"),
        slow_raw_n=(60, 20, "messages per round of raw aiosmtplib, slow section"),
        memory_n=(10_000, 1000, "messages queued and held"),
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
