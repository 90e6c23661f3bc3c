"""An SMTP test server in a child process, for benchmarks.

:func:`smtp_server_process` starts :class:`quartmail.testing.SMTPTestServer` (aiosmtpd's real
protocol) in a separate Python process, so that the client being measured and the server do
not share one event loop, or one CPU core::

    from _server import smtp_server_process  # bench/ is on sys.path for bench/*.py scripts

    with smtp_server_process(tls="starttls", auth=("user", "pass"), data_delay=0.0) as srv:
        srv.host, srv.port          # where it listens (127.0.0.1, a free port)
        srv.ca_file                 # the CA to trust (a str), or None when tls="none"
        srv.tls_context()           # an ssl.SSLContext trusting it, for raw aiosmtplib clients
        app.config.update(srv.mail_config())   # the same MAIL_* as SMTPTestServer.mail_config()
        ...
        srv.stats()                 # {"received": ..., "data_attempts": ..., "connections": ...}
        srv.set_data_delay(0.0)     # change the delay per DATA while the server runs

Lifetime: the child watches its stdin, a pipe from the parent. Leaving the ``with`` block
closes it and the child stops the server and exits (it is terminated, then killed, if it has
not within a few seconds). If the parent dies in any way, even SIGKILL, the pipe closes too,
so the child never outlives it. The child ignores SIGINT: Ctrl-C interrupts the benchmark
only, whose ``with`` block then shuts the child down.

Memory: the child does not keep the messages. Every 0.25 s (and at each :meth:`stats`) it adds
the number of recorded messages to a counter and clears ``SMTPTestServer.messages``, so its
memory stays flat however many messages a run sends.

Certificates (for ``tls="starttls"`` or ``"implicit"``) are made with trustme by the parent,
in a temporary directory removed when the block ends.

Entering the block blocks for the child's start-up (about 0.3 s), and :meth:`stats` for one
round trip to the child: call them outside timed sections. Not thread-safe.

Running this file directly is how the child is started; it is not meant to be run by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import queue
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Literal

import aiosmtplib

from quartmail.testing import SMTPTestServer, TLSCertificates

__all__ = [
    "ServerProcess",
    "TLSMode",
    "read_commands",
    "reply",
    "shut_down",
    "smtp_server_process",
]

TLSMode = Literal["none", "starttls", "implicit"]

_START_TIMEOUT = 30.0  # seconds for the child to import and start listening
_REPLY_TIMEOUT = 10.0  # seconds for the child to answer a command
_STOP_TIMEOUT = 5.0  # seconds for the child to exit after its stdin closes
_DRAIN_INTERVAL = 0.25  # seconds between clearing the child's recorded messages


@dataclass
class ServerProcess:
    """A running out-of-process SMTP server, as given by :func:`smtp_server_process`."""

    #: The address the server listens on.
    host: str
    #: Its port.
    port: int
    #: ``"none"``, ``"starttls"`` or ``"implicit"``.
    tls: TLSMode
    #: The CA certificate (PEM file) that signed the server's, or None without TLS.
    ca_file: str | None
    #: ``(username, password)`` the server requires, or None.
    auth: tuple[str, str] | None
    #: The child's process id.
    pid: int
    _config: dict[str, Any] = field(repr=False)
    _process: subprocess.Popen[bytes] = field(repr=False)
    _replies: queue.Queue[bytes] = field(repr=False)

    def mail_config(self) -> dict[str, Any]:
        """The ``MAIL_*`` settings that point a quartmail app at this server
        (what :meth:`SMTPTestServer.mail_config` returns, made in the child)."""
        return dict(self._config)

    def tls_context(self) -> ssl.SSLContext | None:
        """A new client context trusting the server's CA (host names checked), or None
        without TLS: for clients other than quartmail, such as raw aiosmtplib."""
        if self.ca_file is None:
            return None
        return ssl.create_default_context(cafile=self.ca_file)

    def raw_client(self, local_hostname: str, timeout: float) -> aiosmtplib.SMTP:
        """A plain aiosmtplib client for this server: the benchmarks' baseline."""
        return aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            use_tls=self.tls == "implicit",
            start_tls=self.tls == "starttls",
            tls_context=self.tls_context(),
            local_hostname=local_hostname,
            timeout=timeout,
        )

    def stats(self) -> dict[str, int]:
        """Counters since the server started: ``received`` (messages accepted),
        ``data_attempts`` (DATA commands) and ``connections`` (SMTP sessions greeted)."""
        reply = self._command("stats")
        return {key: int(value) for key, value in reply.items()}

    def set_data_delay(self, seconds: float) -> None:
        """Change the server's wait before answering each DATA, from the next DATA on
        (those already waiting keep their delay): a slow relay that becomes fast, say."""
        if not seconds >= 0:
            raise ValueError(f"data_delay must be 0 or more seconds, not {seconds!r}")
        self._command(f"data_delay {seconds!r}")

    def _command(self, command: str) -> dict[str, Any]:
        stdin = self._process.stdin
        if stdin is None or self._process.poll() is not None:
            raise RuntimeError(f"the SMTP server process {self.pid} is not running")
        stdin.write(command.encode("ascii") + b"\n")
        stdin.flush()
        return _read_reply(self._replies, self._process, _REPLY_TIMEOUT)


@contextlib.contextmanager
def smtp_server_process(
    tls: TLSMode = "none",
    auth: tuple[str, str] | None = None,
    data_delay: float = 0.0,
) -> Iterator[ServerProcess]:
    """Run an :class:`~quartmail.testing.SMTPTestServer` in a child process for the block.

    Args:
        tls: ``"none"``, ``"starttls"`` (required before MAIL) or ``"implicit"`` (port 465 style).
        auth: ``(username, password)``; AUTH is then required before MAIL.
        data_delay: seconds the server waits before answering each DATA (a slow relay);
            see also :meth:`ServerProcess.set_data_delay`.

    Raises:
        RuntimeError: if the child fails to start (its traceback is on stderr).
    """
    if tls not in ("none", "starttls", "implicit"):
        raise ValueError(f"tls must be 'none', 'starttls' or 'implicit', not {tls!r}")
    with tempfile.TemporaryDirectory(prefix="quartmail-bench-") as directory:
        cert_dir: str | None = None
        if tls != "none":
            TLSCertificates.create(pathlib.Path(directory))
            cert_dir = directory
        options = {"tls": tls, "auth": auth, "data_delay": data_delay, "cert_dir": cert_dir}
        process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # stderr is inherited: the child's errors show up in the terminal.
        )
        try:
            assert process.stdout is not None
            replies = _start_reader(process.stdout)
            ready = _read_reply(replies, process, _START_TIMEOUT)
            config: dict[str, Any] = ready["mail_config"]
            yield ServerProcess(
                host=config["MAIL_SERVER"],
                port=config["MAIL_PORT"],
                tls=tls,
                ca_file=config["MAIL_CA_FILE"],
                auth=auth,
                pid=process.pid,
                _config=config,
                _process=process,
                _replies=replies,
            )
        finally:
            shut_down(process)


def _start_reader(stdout: IO[bytes]) -> queue.Queue[bytes]:
    """Read the child's stdout lines into a queue in a thread (portable timeouts);
    an empty bytes object marks the end of the stream."""
    lines: queue.Queue[bytes] = queue.Queue()

    def read() -> None:
        for line in stdout:
            lines.put(line)
        lines.put(b"")

    threading.Thread(target=read, name="smtp-server-process-reader", daemon=True).start()
    return lines


def _read_reply(
    lines: queue.Queue[bytes], process: subprocess.Popen[bytes], timeout: float
) -> dict[str, Any]:
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise RuntimeError(
            f"the SMTP server process {process.pid} did not answer within {timeout:g} s"
        ) from None
    if not line:
        raise RuntimeError(
            f"the SMTP server process {process.pid} exited (code {process.wait()}); "
            "see its traceback above"
        )
    reply: dict[str, Any] = json.loads(line)
    return reply


def shut_down(process: subprocess.Popen[bytes]) -> None:
    """Close the child's stdin (its signal to stop); terminate, then kill, if it lingers."""
    if process.stdin is not None:
        with contextlib.suppress(OSError):  # BrokenPipeError if it is gone already
            process.stdin.close()
    try:
        process.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


# The child.


def read_commands() -> asyncio.Queue[str | None]:
    """A child's commands from its parent, one per stdin line, in the running loop;
    ``None`` once stdin closes (the parent's signal to stop)."""
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str | None] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin.buffer:
            loop.call_soon_threadsafe(commands.put_nowait, line.decode("ascii").strip())
        loop.call_soon_threadsafe(commands.put_nowait, None)  # EOF: the parent is done

    threading.Thread(target=read_stdin, name="stdin", daemon=True).start()
    return commands


def reply(data: dict[str, Any]) -> None:
    """A child's answer to its parent: one JSON line on stdout."""
    with contextlib.suppress(BrokenPipeError):  # the parent is gone: stop all the same
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()


async def _serve(options: dict[str, Any]) -> None:
    certificates = None
    if options["cert_dir"] is not None:
        directory = pathlib.Path(options["cert_dir"])
        certificates = TLSCertificates(
            ca_file=directory / "ca.pem",
            cert_file=directory / "server.pem",
            key_file=directory / "server.key",
        )
    auth: tuple[str, str] | None = None
    if options["auth"] is not None:
        auth = (str(options["auth"][0]), str(options["auth"][1]))
    server = SMTPTestServer(
        tls=options["tls"],
        certificates=certificates,
        auth=auth,
        idle_timeout=3600.0,
    )
    server.data_delay = float(options["data_delay"])
    received = 0

    def drain() -> None:
        # Keep the count, not the messages; runs in the loop, between _record() calls.
        nonlocal received
        received += len(server.messages)
        server.messages.clear()

    async def drain_periodically() -> None:
        while True:
            await asyncio.sleep(_DRAIN_INTERVAL)
            drain()

    commands = read_commands()

    async with server:
        drainer = asyncio.create_task(drain_periodically())
        reply({"mail_config": server.mail_config()})
        while (command := await commands.get()) is not None:
            if command == "stats":
                drain()
                reply(
                    {
                        "received": received,
                        "data_attempts": server.data_attempts,
                        "connections": server.connections,
                    }
                )
            elif command.startswith("data_delay "):
                server.data_delay = float(command.split()[1])
                reply({"data_delay": server.data_delay})
            else:
                reply({"error": f"unknown command {command!r}"})
        drainer.cancel()


def _child_main() -> None:
    # Ctrl-C reaches the whole foreground process group; the parent handles it and closes
    # our stdin, which is how we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_serve(json.loads(sys.argv[1])))


if __name__ == "__main__":
    _child_main()
