"""Messages per second of one SMTP session through a delaying TCP proxy (a child process, half
the round trip each way, order kept) at 5, 20 and 50 ms, and direct: quartmail's ``connect()``
with PIPELINING + CHUNKING (``chunking``), PIPELINING alone (``pipelining``) and
``MAIL_PIPELINING = False`` (``off``) against raw aiosmtplib (``raw``). Targets at 20 ms:
chunking >= 3x raw, pipelining >= 2x raw; at 0 ms chunking >= 0.95x off.
"""

from __future__ import annotations

import asyncio
from asyncio import StreamReader, StreamWriter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any

import harness

VARIANTS = ("raw", "chunking", "pipelining", "off")
TARGETS = ((20, "chunking", "raw", 3), (20, "pipelining", "raw", 2), (0, "chunking", "off", 0.95))


async def pipe(reader: StreamReader, writer: StreamWriter, delay: float) -> None:
    """Copy *reader* to *writer*, each chunk (and the end) *delay* seconds after it was read."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def forward() -> None:
        data = b"not yet the end"
        while data:
            due, data = await queue.get()
            await asyncio.sleep(due - loop.time())
            writer.write(data)  # (b"", the end: nothing)
            await writer.drain()
        writer.close()

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(forward())
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + delay, data))
        queue.put_nowait((loop.time() + delay, b""))


async def relay(reader: StreamReader, writer: StreamWriter, port: int, rtt: float) -> None:
    """One connection through the proxy to *port*, half of *rtt* each way."""
    try:
        up_reader, up_writer = await asyncio.open_connection(harness.HOST, port)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(pipe(reader, up_writer, rtt / 2))
                tasks.create_task(pipe(up_reader, writer, rtt / 2))
        finally:
            up_writer.close()
    except* OSError:
        pass  # one end went away: the relay is over
    finally:
        writer.close()


async def serve_proxies(options: dict[str, Any], commands: harness.Commands) -> None:
    """The child: a proxy to each port of ``options["ports"]``, answering their ports;
    ``rtt SECONDS`` sets the round trip of the connections made after it."""
    rtt = 0.0
    async with asyncio.TaskGroup() as relays:  # waits for the last connection to end

        async def accept(port: int, reader: StreamReader, writer: StreamWriter) -> None:
            relays.create_task(relay(reader, writer, port, rtt))

        ports = options["ports"]
        servers = [await asyncio.start_server(partial(accept, p), harness.HOST, 0) for p in ports]
        harness.reply({"ports": [server.sockets[0].getsockname()[1] for server in servers]})
        async for command in commands:
            rtt = float(command)
            harness.reply({"rtt": rtt})
        for server in servers:
            server.close()


def variants(servers: list[harness.SMTPServer], n: int, warmup: int) -> dict[str, harness.Variant]:
    """*servers*: PIPELINING and CHUNKING, and (for ``pipelining``) PIPELINING alone."""
    variant, (full, alone) = partial(harness.Variant, count=n, warmup=warmup), servers

    def quartmail(server: harness.SMTPServer, **settings: Any) -> Callable[[int], Awaitable[float]]:
        return partial(harness.connect_session, *harness.mail_app(server.config, **settings))

    return {
        "raw": variant("raw aiosmtplib (baseline)", partial(harness.raw_session, full)),
        "chunking": variant("quartmail, PIPELINING + CHUNKING", quartmail(full)),
        "pipelining": variant("quartmail, PIPELINING alone", quartmail(alone)),
        "off": variant("quartmail, MAIL_PIPELINING off", quartmail(full, MAIL_PIPELINING=False)),
    }


async def benchmark() -> int:
    args = harness.Arguments(
        VARIANTS,
        n=(40, 5, "messages per session through the proxy"),
        n_local=(1000, 100, "messages per session at 0 ms"),
        warmup=(5, 1),
    ).parse()
    async with (
        harness.smtp_server(pipelining=True, chunking=True) as full,
        harness.smtp_server(pipelining=True) as only,
    ):
        ports = [full.config["MAIL_PORT"], only.config["MAIL_PORT"]]
        async with harness.children(__file__, [{"kind": "proxy", "ports": ports}]) as (relay,):
            pairs = zip((full, only), relay.ready["ports"], strict=True)  # via the proxy:
            proxied = [replace(s, config={**s.config, "MAIL_PORT": p}) for s, p in pairs]
            for rtt in (0, 5, 20, 50):  # ms
                await relay.ask(repr(rtt / 1000))
                count = args.n if rtt else args.n_local
                chosen = variants(proxied if rtt else [full, only], count, args.warmup)
                where = f"{rtt} ms round trip" if rtt else "0 ms (no proxy)"
                print(f"{where}: {count} messages a session, {args.rounds} round(s)")
                runs = [chosen[name] for name in args.only]
                await harness.take_turns(runs, args.rounds, chosen["raw"], "raw aiosmtplib")
                for at, name, base, least in TARGETS:
                    if rtt == at and chosen[name].rates and chosen[base].rates:
                        text = f"{at} ms: {chosen[name].label[11:]} vs {base}"
                        harness.target(text, chosen[name].best / chosen[base].best, at_least=least)
                only.expected += chosen.pop("pipelining").done
                full.expected += sum(variant.done for variant in chosen.values())
        return harness.finish(all([await full.check(), await only.check()]))


if __name__ == "__main__":
    harness.main(benchmark, {"proxy": serve_proxies})
