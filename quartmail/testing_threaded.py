"""The SMTP test server in a thread of its own, for sync tests and sync clients.

:class:`~quartmail.testing.SMTPTestServer` is served by the test's event loop, so it answers
only while that loop runs: a sync test, or a blocking client (``smtplib``, a sync HTTP client
driving a served app, a browser) inside an async test, would wait for a greeting that never
comes. :class:`ThreadedSMTPTestServer` runs the very same server (every option, fault and
counter) in an event loop of its own, in a thread, and offers its methods as plain calls.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from .testing import ReceivedCommand, ReceivedMessage, SMTPTestServer, TLSCertificates, TLSMode

if TYPE_CHECKING:
    from quart import Quart

__all__ = ["ThreadedSMTPTestServer"]

_T = TypeVar("_T")

# How much longer than its own bound a call into the server's thread may take before the
# caller gives up; starting and stopping are bounded inside the server (5 s each).
_CALL_MARGIN = 15.0


class ThreadedSMTPTestServer:
    """An :class:`~quartmail.testing.SMTPTestServer` served from its own thread and loop.

    It takes the same keyword arguments, has the same attributes (messages, counters, fault
    injection such as ``refuse_recipients`` and ``data_replies``, settable from the test) and
    the same methods, called without ``await``::

        with ThreadedSMTPTestServer(tls="starttls", certificates=certs) as server:
            server.configure(app)
            ...  # a sync client, or smtplib
            [message] = server.wait_for_messages(1)

    The waiting methods block the calling thread: in an async test whose event loop does the
    sending, use the loop-bound server (or ``await asyncio.to_thread(server.wait_for, ...)``).
    """

    #: The server itself; use it only from the thread's loop.
    server: SMTPTestServer
    _loop: asyncio.AbstractEventLoop | None
    _thread: threading.Thread | None

    if TYPE_CHECKING:
        # Read from (and written to) the server in the thread; see __getattr__.
        tls: TLSMode
        certificates: TLSCertificates | None
        auth: tuple[str, str] | None
        oauth2_tokens: dict[str, str] | None
        host: str
        port: int
        max_connections: int | None
        silent: bool
        smtputf8: bool
        idle_timeout: float
        greeting: str | None
        pipelining: bool
        chunking: bool
        messages: list[ReceivedMessage]
        commands: list[ReceivedCommand]
        connections: int
        refused_connections: int
        data_attempts: int
        refuse_recipients: dict[str, str]
        data_replies: list[str]
        data_delay: float
        ehlo_reply: str | None
        max_recipients: int | None
        echo_auth: bool
        data_without_recipients: bool
        data_command_reply: str | None
        command_replies: dict[str, list[str]]
        auth_attempts: list[str]
        is_serving: bool

    def __init__(self, **options: Any) -> None:
        # Constructed here, in the caller's thread, so that bad options fail at once.
        server = SMTPTestServer(**options)
        object.__setattr__(self, "server", server)
        object.__setattr__(self, "_loop", None)
        object.__setattr__(self, "_thread", None)

    def __repr__(self) -> str:
        server = vars(self).get("server")
        return f"<ThreadedSMTPTestServer {server!r}>"

    # Every other attribute is the server's: read it, or set it (fault injection), from here.

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or "server" not in vars(self):
            raise AttributeError(name)
        return getattr(self.server, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name == "server":
            object.__setattr__(self, name, value)
        else:
            setattr(self.server, name, value)

    def start(self) -> None:
        """Start the thread and its loop, and the server in it (the port is then known)."""
        if self._thread is not None:
            raise RuntimeError(f"{self!r} is already running")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=_serve_forever, args=(loop,), name="quartmail-smtp-test-server", daemon=True
        )
        self._loop, self._thread = loop, thread
        thread.start()
        try:
            self._call(self.server.start())
        except BaseException:
            self._end_thread()
            raise

    def stop(self) -> None:
        """Stop the server (dropping every connection, as in an outage), then the thread.

        Does nothing if it is not running. :meth:`start` may follow, on the same port.
        """
        if self._thread is None:
            return
        try:
            self._call(self.server.stop())
        finally:
            self._end_thread()

    def restart(self) -> None:
        """Stop if running, then start again on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> ThreadedSMTPTestServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Block until at least ``count`` messages have arrived; return them all.

        Raises:
            TimeoutError: if fewer than ``count`` arrived within ``timeout`` seconds.
        """
        return self._wait(self.server.wait_for_messages(count, timeout), timeout)

    def wait_for(self, predicate: Callable[[], _T], timeout: float = 5.0) -> _T:
        """Block until ``predicate()`` is true, and return its value.

        The predicate runs in the server's thread, after each event of the server.

        Raises:
            TimeoutError: if it was still false after ``timeout`` seconds.
        """
        return self._wait(self.server.wait_for(predicate, timeout), timeout)

    def find(
        self, *, to: str | None = None, subject: str | None = None, sender: str | None = None
    ) -> list[ReceivedMessage]:
        """The messages that match every criterion given (see ``SMTPTestServer.find``)."""
        return self.server.find(to=to, subject=subject, sender=sender)

    def assert_no_bcc(self) -> None:
        """Fail if a received message carries a ``Bcc:`` header."""
        self.server.assert_no_bcc()

    def reset(self) -> None:
        """Forget what was received and every fault set since (see ``SMTPTestServer.reset``)."""
        if self._loop is None:
            self.server.reset()
        else:
            self._call(_call_async(self.server.reset))

    def mail_config(self) -> dict[str, object]:
        """The ``MAIL_*`` settings that point a quartmail app at this server."""
        return self.server.mail_config()

    def configure(self, app: Quart) -> None:
        """Point *app* at this server, before ``Mail(app)`` (see ``SMTPTestServer.configure``)."""
        self.server.configure(app)

    def _wait(self, waiting: Coroutine[Any, Any, _T], timeout: float) -> _T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            waiting.close()
            raise RuntimeError(
                "ThreadedSMTPTestServer.wait_for_messages/wait_for block the calling thread, "
                "and this thread runs an event loop, which could not send meanwhile: in an "
                "async test use the smtp_server fixture (SMTPTestServer) and await it, or "
                "await asyncio.to_thread(server.wait_for_messages, ...)"
            )
        if self._loop is None:
            waiting.close()
            raise TimeoutError(f"{self!r} is not running: nothing can arrive")
        return self._call(waiting, timeout)

    def _call(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 0.0) -> _T:
        assert self._loop is not None  # (its callers check that it runs)
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout + _CALL_MARGIN)

    def _end_thread(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        assert loop is not None and thread is not None  # (its callers check that it runs)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_CALL_MARGIN)
        if thread.is_alive():  # pragma: no cover (a loop stuck in a blocking call: a bug)
            raise RuntimeError(f"{self!r}: its thread did not end within {_CALL_MARGIN} s")


def _serve_forever(loop: asyncio.AbstractEventLoop) -> None:
    """The thread: run *loop* until stopped, then close it."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


async def _call_async(function: Callable[[], _T]) -> _T:
    return function()
