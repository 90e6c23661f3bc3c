"""A delaying TCP proxy: a relay *rtt* seconds away, on loopback.

Each connection to the proxy gets its own connection to the target; every chunk read in
either direction is written on after half the round trip, in the order read (a queue per
direction, with deadlines in that order), so a reply comes back one round trip after its
command, as from a distant server. TLS passes through untouched: the client and the server
do the handshake, across the delay. For the latency benchmark (``bench/latency.py``), in a
child process of its own so that its work does not share the client's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import harness

_CHUNK = 65536
STOP_TIMEOUT = 5.0  # seconds for the relays to end once their connections are dropped


class DelayingProxy:
    """Listens on ``127.0.0.1``, port :attr:`port` once started, and relays to
    ``target_host:target_port`` with :attr:`rtt` seconds of round trip added."""

    def __init__(self, target_host: str, target_port: int, rtt: float) -> None:
        self.target = (target_host, target_port)
        self.rtt = rtt  # may change between connections
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, harness.HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Dropping both ends of every connection ends its relay (its pipes fail).
        for writer in self._writers:
            writer.transport.abort()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT)
            for task in stuck:
                task.cancel()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        ends = [writer]
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            ends.append(up_writer)
            self._writers.add(up_writer)
            delay = self.rtt / 2
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_pipe(reader, up_writer, delay))
                tasks.create_task(_pipe(up_reader, writer, delay))
        except* OSError:
            pass  # one end went away (or stop() dropped both): the relay is over
        finally:
            for end in ends:
                end.close()
                self._writers.discard(end)
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy *reader* to *writer*, each chunk *delay* seconds after it was read, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def forward() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:  # end of stream, delayed like the rest
                with contextlib.suppress(OSError):
                    writer.close()
                return
            writer.write(data)
            await writer.drain()

    forwarding = asyncio.create_task(forward())
    try:
        while True:
            data = await reader.read(_CHUNK)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await forwarding
    finally:
        forwarding.cancel()


async def serve(options: dict[str, Any], commands: harness.Commands) -> None:
    """The child process: a proxy per target in ``options["targets"]`` (``[host, port]``
    pairs), answering with their ports; ``rtt SECONDS`` changes the round trip of every
    proxy for the connections made after it."""
    rtt = float(options["rtt"])
    proxies = [DelayingProxy(host, port, rtt) for host, port in options["targets"]]
    for proxy in proxies:
        await proxy.start()
    try:
        commands.reply({"ports": [proxy.port for proxy in proxies]})
        while (command := await commands.next()) is not None:
            if command.startswith("rtt "):
                for proxy in proxies:
                    proxy.rtt = float(command.split()[1])
            commands.reply({"rtt": proxies[0].rtt if proxies else 0.0})
    finally:
        for proxy in proxies:
            await proxy.stop()
