"""Messages per second of one SMTP session to a relay 5, 20 and 50 ms away (and 0 ms).

Between the client and the SMTP server, a delaying TCP proxy (a child process) adds the round
trip: half of it each way, order kept; TLS would pass through untouched. Each variant opens one
session, sends ``-n`` messages (~1 KB, text + HTML, built per mail) and QUITs, all timed:
``raw``, the baseline, raw aiosmtplib ``send_message()`` (a round trip per command); quartmail's
``connect()`` batch with ``chunking`` (PIPELINING and CHUNKING advertised: MAIL, RCPT and ``BDAT
<n> LAST`` in one write), ``pipelining`` (PIPELINING only: MAIL, RCPT, DATA in one write, then
the message) and ``off`` (``MAIL_PIPELINING = False``). At 0 ms (no proxy) the same variants
show what pipelining costs on a fast local server. Targets at 20 ms: chunking >= 3x raw,
pipelining >= 2x raw; at 0 ms chunking >= 0.95x off (noise). Round trips per session of n
messages: raw and off 3 + 4n, pipelining 3 + 2n (the message waits for the 354: DATA ends a
group, RFC 2920 3.1), chunking 3 + n; so pipelining alone tends to 2x from below.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import harness
from quart import Quart
from send import build_email_message, connect_session

from quartmail import Mail

RTTS_MS = (5, 20, 50)
VARIANTS = ("raw", "chunking", "pipelining", "off")


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy *reader* to *writer*, each chunk (and the end) *delay* seconds after it was read."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def forward() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(due - loop.time())
            if not data:
                break
            writer.write(data)
            await writer.drain()
        writer.close()

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(forward())
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + delay, data))
        queue.put_nowait((loop.time() + delay, b""))


async def serve_proxies(options: dict[str, Any], commands: harness.Commands) -> None:
    """The child: a proxy per ``[host, port]`` in ``options["targets"]``, answering their
    ports; ``rtt SECONDS`` sets the round trip of the connections made after it."""
    rtt, relays, open_ends = 0.0, set[asyncio.Task[Any]](), set[asyncio.StreamWriter]()

    def proxy(host: str, port: int) -> Any:
        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            delay, ends = rtt / 2, {writer}
            task = asyncio.current_task()
            assert task is not None
            relays.add(task)
            open_ends.add(writer)
            try:
                up_reader, up_writer = await asyncio.open_connection(host, port)
                ends.add(up_writer)
                open_ends.add(up_writer)
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(pipe(reader, up_writer, delay))
                    tasks.create_task(pipe(up_reader, writer, delay))
            except* OSError:
                pass  # one end went away: the relay is over
            finally:
                for end in ends:
                    end.close()
                open_ends.difference_update(ends)
                relays.discard(task)

        return relay

    servers = [
        await asyncio.start_server(proxy(*target), harness.HOST, 0) for target in options["targets"]
    ]
    commands.reply({"ports": [server.sockets[0].getsockname()[1] for server in servers]})
    while (command := await commands.next()) is not None:
        rtt = float(command.split()[1])
        commands.reply({"rtt": rtt})
    for server in servers:
        server.close()
    for end in open_ends:  # dropping both ends of a connection ends its relay
        end.transport.abort()
    if relays:
        await asyncio.wait(relays, timeout=harness.STOP_TIMEOUT)


def variants(
    config: dict[str, Any],
    only_pipelining: dict[str, Any],
    server: harness.SMTPServer,
    n: int,
    warmup: int,
) -> dict[str, harness.Variant]:
    """The variants against the server at *config* (PIPELINING and CHUNKING), and, for
    ``pipelining``, the one at *only_pipelining* (PIPELINING alone)."""
    hostname = socket.getfqdn()  # quartmail looks it up once per app: so does the baseline

    def quartmail(label: str, settings: dict[str, Any], **extra: object) -> harness.Variant:
        app = Quart(__name__)
        app.config.update(server.mail_config(), **settings, **extra)
        mail = Mail(app)
        return harness.Variant(label, lambda count: connect_session(app, mail, count), n, warmup)

    async def raw(count: int) -> float:
        start, client = time.perf_counter(), server.raw_client(hostname)
        client.hostname, client.port = config["MAIL_SERVER"], config["MAIL_PORT"]
        async with client:
            for i in range(count):
                await client.send_message(build_email_message(i))
        return time.perf_counter() - start

    return {
        "raw": harness.Variant("raw aiosmtplib (baseline)", raw, n, warmup),
        "chunking": quartmail("quartmail, PIPELINING + CHUNKING", config),
        "pipelining": quartmail("quartmail, PIPELINING alone", only_pipelining),
        "off": quartmail("quartmail, MAIL_PIPELINING off", config, MAIL_PIPELINING=False),
    }


async def benchmark() -> int:
    args = harness.Arguments(
        {
            "n": (40, 5, "messages per session (round) and variant, through the proxy"),
            "n_local": (1000, 100, "messages per round and variant at 0 ms"),
            "rounds": (3, 1, "rounds; the best is reported"),
            "warmup": (5, 1, "warm-up messages per variant"),
        },
        only=VARIANTS,
    ).parse()
    async with (
        harness.smtp_server(pipelining=True, chunking=True) as full,
        harness.smtp_server(pipelining=True) as only,
    ):
        direct = [
            {k: c[k] for k in ("MAIL_SERVER", "MAIL_PORT")} for c in (full.config, only.config)
        ]
        options = {"kind": "proxy", "targets": [list(c.values()) for c in direct]}
        async with harness.children(__file__, [options]) as (relay,):
            proxied = [{"MAIL_SERVER": harness.HOST, "MAIL_PORT": p} for p in relay.ready["ports"]]
            print(f"latency: {args.n} messages per session ({args.n_local} at 0 ms), ")
            print(f"  {args.rounds} round(s); the server advertises PIPELINING (and CHUNKING)")
            for rtt in (0, *RTTS_MS):
                await relay.ask(f"rtt {rtt / 1000!r}")
                count = args.n if rtt else args.n_local
                pair = proxied if rtt else direct
                chosen = variants(pair[0], pair[1], full, count, args.warmup)
                runs = [chosen[name] for name in args.only]
                print(f"{rtt} ms round trip{' (no proxy)' if not rtt else ''}:")
                await harness.take_turns(runs, args.rounds)
                harness.print_table(
                    runs, chosen["raw"] if "raw" in args.only else None, "raw aiosmtplib"
                )
                best = {name: chosen[name].best for name in args.only}
                for at, name, base, least in (
                    (20, "chunking", "raw", 3.0),
                    (20, "pipelining", "raw", 2.0),
                    (0, "chunking", "off", 0.95),
                ):
                    if rtt == at and {name, base} <= best.keys():
                        text = f"{at} ms: {chosen[name].label[11:]} vs {base}"
                        harness.target(text, best[name] / best[base], at_least=least)
                for run in runs:
                    (only if run is chosen["pipelining"] else full).expected += (
                        len(run.rates) * run.count + run.warmup
                    )
        ok = await full.check()
        ok = await only.check() and ok
    return harness.finish(ok)


if __name__ == "__main__":
    harness.main(benchmark, {"proxy": serve_proxies})
