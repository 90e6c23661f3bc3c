"""A real SMTP server for tests: aiosmtpd's protocol, served in the caller's event loop.

:class:`SMTPTestServer` serves aiosmtpd's ``SMTP`` protocol with ``loop.create_server`` in the
running loop (port 0 by default; the real port is read back from the socket), so a test talks to
it over loopback exactly as the app would talk to a mail relay. It speaks plain SMTP, STARTTLS or
implicit TLS (certificates from :meth:`TLSCertificates.create`, made with trustme at run time),
can require AUTH (PLAIN and LOGIN with a password, XOAUTH2 with an access token), records every
accepted message, and injects faults on the server side:
refused recipients, 4xx/5xx replies to DATA, slow replies, a connection limit answered with 421,
a server that never greets, one that greets every connection with a given line (421, or
garbage), a garbage EHLO reply, a per-transaction recipient limit (452), a 535 that quotes the
credentials, and outages (:meth:`SMTPTestServer.stop` drops every connection,
:meth:`SMTPTestServer.restart` comes back on the same port).

Nothing is mocked: clients use real sockets and real TLS. The pytest fixtures built on this
module live in :mod:`quartmail.pytest_plugin`.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import datetime
import email
import email.message
import email.policy
import functools
import hmac
import html.parser
import logging
import pathlib
import re
import socket
import ssl
import warnings
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, AnyStr, Literal, Protocol, TypeVar, cast

from ._extras import missing_extra

try:
    from aiosmtpd.smtp import (
        MISSING,
        SMTP,
        AuthResult,
        Envelope,
        LoginPassword,
        Session,
        TLSSetupException,
    )
except ModuleNotFoundError as error:
    raise missing_extra(error, "testing", "The SMTP test server (quartmail.testing)") from None

if TYPE_CHECKING:
    from quart import Quart

__all__ = [
    "ReceivedAttachment",
    "ReceivedCommand",
    "ReceivedMessage",
    "SMTPServerFactory",
    "SMTPTestServer",
    "TLSCertificates",
    "most_in_window",
]

TLSMode = Literal["none", "starttls", "implicit"]
_T = TypeVar("_T")

_SERVER_HOSTNAME = "localhost"
_ACCEPTED = "250 2.0.0 Message accepted for delivery"
_TOO_MANY_CONNECTIONS = b"421 4.7.0 Too many connections\r\n"
# RFC 4954 section 4: an AUTH line carries a whole SASL response, which servers must take
# whatever its length; an XOAUTH2 one with a real token (a JWT of 1-3 KB) is far longer than
# the 512 octets of any other command line (RFC 5321 4.5.3.1.4).
_AUTH_LINE_LIMIT = 12288
# What Gmail answers a bad XOAUTH2 token with before its 535: a 334 whose text is this JSON,
# base64-encoded (developers.google.com/gmail/imap/xoauth2-protocol).
_XOAUTH2_ERROR = '{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}'
_XOAUTH2_REFUSED = "535 5.7.8 Username and Password not accepted"
# How long stop() waits for aborted connections and their session tasks to wind down. Aborting
# is immediate, so this bound is only reached if something is badly wrong.
_STOP_TIMEOUT = 5.0

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TLSCertificates:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1 / ::1, made with trustme.

    ``ca_file`` is what an app's ``MAIL_CA_FILE`` points at; ``cert_file`` (the server's
    certificate chain) and ``key_file`` (its private key) are what the server loads.
    """

    ca_file: pathlib.Path
    cert_file: pathlib.Path
    key_file: pathlib.Path

    def server_context(self) -> ssl.SSLContext:
        """Return a new server-side context with the server certificate loaded."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """Return a new client context that trusts the CA (and verifies host names)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    @classmethod
    def create(
        cls,
        directory: pathlib.Path,
        *names: str,
        not_after: datetime.datetime | None = None,
    ) -> TLSCertificates:
        """Make a new CA and server certificate and write them as PEM files into ``directory``.

        The certificate is for *names* (default: ``localhost``, ``127.0.0.1`` and ``::1``)
        and valid until *not_after* (default: trustme's, years ahead); give other names or
        a past date to test a certificate for the wrong host or an expired one.
        """
        # trustme (and cryptography) are test-only dependencies: import them only when asked.
        try:
            import trustme
        except ModuleNotFoundError as error:
            raise missing_extra(error, "testing", "TLSCertificates.create") from None

        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        leaf = ca.issue_cert(*(names or ("localhost", "127.0.0.1", "::1")), not_after=not_after)
        certificates = cls(
            ca_file=directory / "ca.pem",
            cert_file=directory / "server.pem",
            key_file=directory / "server.key",
        )
        ca.cert_pem.write_to_path(certificates.ca_file)
        certificates.cert_file.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(certificates.key_file)
        certificates.key_file.chmod(0o600)
        return certificates


@dataclass
class ReceivedMessage:
    """One message the server accepted, with its SMTP envelope."""

    mail_from: str
    rcpt_tos: list[str]
    #: The message exactly as received (after dot-unstuffing), with CRLF line endings.
    data: bytes
    mail_options: list[str] = field(default_factory=list)
    rcpt_options: list[str] = field(default_factory=list)
    #: True if the session was encrypted (STARTTLS or implicit TLS).
    tls: bool = False
    #: The AUTH user name, if the session authenticated.
    login: str | None = None
    #: The name the client gave in EHLO (or HELO).
    helo: str | None = None

    def parsed(self) -> email.message.EmailMessage:
        """Parse :attr:`data` with ``email.policy.default``, as a mail store would see it.

        Line endings become LF first, as a mail store writes them, so that text parts read
        back as written (``"Hello\\n"``, not ``"Hello\\r\\n"``); :attr:`data` keeps the CRLFs.
        """
        return email.message_from_bytes(
            self.data.replace(b"\r\n", b"\n"), policy=email.policy.default
        )

    # What a test checks most, read from one parse of the message (kept).

    @functools.cached_property
    def _email(self) -> email.message.EmailMessage:
        return self.parsed()

    @property
    def subject(self) -> str | None:
        """The Subject header, decoded (RFC 2047), or None if there is none."""
        subject = self._email["Subject"]
        return None if subject is None else str(subject)

    @property
    def text(self) -> str | None:
        """The text/plain body (decoded, LF line endings), or None if there is none."""
        return self._body("plain")

    @property
    def html(self) -> str | None:
        """The text/html body (decoded), or None if there is none."""
        return self._body("html")

    @property
    def links(self) -> list[str]:
        """The URLs a reader could follow: every ``<a href>`` of the HTML body, then every
        http(s) URL of the text body, in order and without repeats."""
        found = _LinkParser.hrefs(self.html or "")
        found += _URL.findall(self.text or "")
        return list(dict.fromkeys(found))

    @property
    def attachments(self) -> list[ReceivedAttachment]:
        """The attachments, in order (parts that are not the message's body)."""
        return [
            ReceivedAttachment(
                filename=part.get_filename() or "",
                content_type=part.get_content_type(),
                data=cast(bytes, part.get_payload(decode=True) or b""),
            )
            for part in self._email.iter_attachments()
        ]

    def attachment(self, filename: str) -> ReceivedAttachment:
        """The attachment called *filename*.

        Raises:
            KeyError: if there is none, naming the attachments there are.
        """
        attachments = self.attachments
        for attachment in attachments:
            if attachment.filename == filename:
                return attachment
        names = [attachment.filename for attachment in attachments]
        raise KeyError(f"no attachment named {filename!r}; the message has {names}")

    def _body(self, subtype: str) -> str | None:
        part = self._email.get_body(preferencelist=(subtype,))
        if part is None or part.get_content_subtype() != subtype:
            return None
        return cast(str, part.get_content())


def most_in_window(times: Iterable[float], period: float) -> int:
    """The most of *times* (seconds) in any window of *period* seconds, both ends included."""
    ordered = sorted(times)
    most = first = 0
    for last, time in enumerate(ordered):
        while time - ordered[first] > period:
            first += 1
        most = max(most, last - first + 1)
    return most


@dataclass(frozen=True)
class ReceivedCommand:
    """One command as the server read it (see :meth:`SMTPTestServer.command_groups`)."""

    #: The command verb, upper case (``"MAIL"``, ``"BDAT"``...).
    verb: str
    #: The number of the connection it came on (1 for the first session served).
    session: int
    #: The number of the read (``data_received`` call) of that session it arrived in.
    read: int
    #: ``loop.time()`` when the server began handling it.
    time: float


@dataclass(frozen=True)
class ReceivedAttachment:
    """One attachment of a :class:`ReceivedMessage`: its file name, type and decoded bytes."""

    filename: str
    content_type: str
    data: bytes


# An http(s) URL in plain text: up to white space, or a character that closes it in prose.
_URL = re.compile(r"https?://[^\s<>\"')\]]+")


class _LinkParser(html.parser.HTMLParser):
    """Collects the ``href`` of every ``<a>`` (entities decoded, as a browser reads them)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    @classmethod
    def hrefs(cls, document: str) -> list[str]:
        parser = cls()
        parser.feed(document)
        parser.close()
        return parser.found

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href") if tag == "a" else None
        if href:
            self.found.append(href.strip())


class SMTPServerFactory(Protocol):
    """Type of the ``smtp_server_factory`` fixture: makes and starts an :class:`SMTPTestServer`."""

    async def __call__(
        self,
        *,
        tls: TLSMode = ...,
        certificates: TLSCertificates | None = ...,
        auth: tuple[str, str] | None = ...,
        oauth2_tokens: dict[str, str] | None = ...,
        host: str = ...,
        port: int = ...,
        max_connections: int | None = ...,
        silent: bool = ...,
        smtputf8: bool = ...,
        idle_timeout: float = ...,
        greeting: str | None = ...,
        pipelining: bool = ...,
        chunking: bool = ...,
    ) -> SMTPTestServer: ...


class SMTPTestServer:
    """A real SMTP server on loopback, served in the running event loop.

    Use it as an async context manager (or call :meth:`start` / :meth:`stop`)::

        async with SMTPTestServer(tls="starttls", certificates=certs, auth=("u", "p")) as server:
            app.config.update(server.mail_config())
            ...
            [message] = await server.wait_for_messages(1)

    Args:
        tls: ``"none"``, ``"starttls"`` (STARTTLS required before MAIL) or ``"implicit"``
            (TLS from the first byte, like port 465).
        certificates: required unless ``tls == "none"``.
        auth: ``(username, password)``; when given, AUTH (PLAIN and LOGIN) is required before MAIL.
        oauth2_tokens: ``{username: access token}``; when given, AUTH XOAUTH2 is offered and
            required before MAIL, and takes each user's token (see :attr:`oauth2_tokens`).
            A bad token is answered as Gmail does: a 334 error challenge (base64 JSON), then,
            after the client's empty line, ``535 5.7.8``.
        host: address to bind; give an IP address, so that port 0 means one port.
        port: port to bind; 0 picks a free one (see :attr:`port` after :meth:`start`).
        max_connections: above this many concurrent sessions, greet with
            ``421 4.7.0 Too many connections`` and close, as Postfix does.
        silent: accept TCP (and TLS) connections but never send a greeting.
        smtputf8: advertise SMTPUTF8.
        idle_timeout: seconds of client silence after which the server drops a session.
        greeting: greet every connection with this line instead of 220, then close it (e.g.
            ``"421 4.3.2 Service not available"``, or a line that is not SMTP at all).
        pipelining: advertise PIPELINING (RFC 2920); aiosmtpd reads pipelined commands anyway.
        chunking: advertise CHUNKING and take ``BDAT`` (RFC 3030).
        sock: a listening socket bound in advance, served by the first :meth:`start` instead
            of binding *host* and *port* (its port becomes :attr:`port`): for a server whose
            port must be known before it starts. The server closes it at :meth:`stop`.
        data_line_limit: the longest line of a message it takes, in octets with the CRLF;
            a longer one is answered ``500``. By default RFC 5321's limit (4.5.3.1.6: 1000).
        on_message: awaited with each message the server accepts, instead of keeping it in
            :attr:`messages` (so :meth:`wait_for_messages` does not see it): for a server
            that hands its mail on.

    :attr:`commands` records every command with the read it arrived in, so that a test can
    check which commands a client sent together (:meth:`command_groups`).

    Fault injection attributes (:attr:`refuse_recipients`, :attr:`data_replies`,
    :attr:`data_delay`, :attr:`ehlo_reply`, :attr:`max_recipients`, :attr:`echo_auth`,
    :attr:`oauth2_tokens`, :attr:`data_without_recipients`, :attr:`data_command_reply`,
    :attr:`command_replies`) may be changed while the server runs. A ``421`` reply, from
    any of them, closes the connection after it is sent, as RFC 5321 requires of a server.
    """

    def __init__(
        self,
        *,
        tls: TLSMode = "none",
        certificates: TLSCertificates | None = None,
        auth: tuple[str, str] | None = None,
        oauth2_tokens: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_connections: int | None = None,
        silent: bool = False,
        smtputf8: bool = True,
        idle_timeout: float = 300.0,
        greeting: str | None = None,
        pipelining: bool = False,
        chunking: bool = False,
        sock: socket.socket | None = None,
        data_line_limit: int | None = None,
        on_message: Callable[[ReceivedMessage], Awaitable[None]] | None = None,
    ) -> None:
        if tls not in ("none", "starttls", "implicit"):
            raise ValueError(f"tls must be 'none', 'starttls' or 'implicit', not {tls!r}")
        if tls != "none" and certificates is None:
            raise ValueError(f"tls={tls!r} needs certificates (see TLSCertificates.create)")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections!r}")
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive, not {idle_timeout!r}")
        if data_line_limit is not None and data_line_limit < 1000:
            raise ValueError(f"data_line_limit must be at least 1000, not {data_line_limit!r}")
        if auth is not None and not _is_credentials(auth):
            # Not the value itself: it holds a password.
            raise ValueError(
                "auth must be a (username, password) tuple of two str, such as "
                f"auth=('user', 'pass'), not a {type(auth).__name__}"
            )
        if oauth2_tokens is not None and not _is_token_map(oauth2_tokens):
            raise ValueError(
                "oauth2_tokens must be a dict of user name (str) to access token (str), such "
                "as oauth2_tokens={'user@example.com': 'ya29.token'}, not a "
                f"{type(oauth2_tokens).__name__}"
            )
        self.tls: TLSMode = tls
        self.certificates = certificates
        self.auth = auth
        #: User name -> the access token AUTH XOAUTH2 takes for it; change a user's token to
        #: expire the one a client holds. None: XOAUTH2 is not offered.
        self._oauth2_tokens = oauth2_tokens
        self.oauth2_tokens = self._given_tokens()
        #: The address the server binds.
        self.host = host
        #: The port; the real one once started (and kept for :meth:`restart`).
        self.port = port
        self.max_connections = max_connections
        self.silent = silent
        self.smtputf8 = smtputf8
        self.idle_timeout = idle_timeout
        self.greeting = greeting
        self.pipelining = pipelining
        self.chunking = chunking
        self.data_line_limit = data_line_limit
        self._sock = sock
        self._on_message = on_message

        #: Every command received (any session), in order, with the read it arrived in.
        self.commands: list[ReceivedCommand] = []
        #: Accepted messages, in order of arrival.
        self.messages: list[ReceivedMessage] = []
        #: SMTP sessions greeted with 220 so far (connections refused by the limit not included).
        self.connections = 0
        #: Connections answered with 421 because of ``max_connections``, or with ``greeting``.
        self.refused_connections = 0
        #: DATA commands whose content was received, accepted or not.
        self.data_attempts = 0

        #: Address -> reply for RCPT TO, e.g. ``{"bad@example.com": "550 5.1.1 User unknown"}``.
        self.refuse_recipients: dict[str, str] = {}
        #: Replies to the next DATA commands, first in first out, instead of accepting
        #: (e.g. ``"451 4.3.0 Try again"``). A message is recorded only if its reply is 2xx.
        self.data_replies: list[str] = []
        #: Seconds to wait before answering each DATA (the message is not recorded if the
        #: connection drops meanwhile).
        self.data_delay = 0.0
        #: The one line to answer EHLO with instead of the usual reply (e.g. ``"garbage"``).
        self.ehlo_reply: str | None = None
        #: Most recipients per transaction; RCPT beyond it is answered
        #: ``452 4.5.3 Too many recipients``, as RFC 5321 4.5.3.1.10 asks.
        self.max_recipients: int | None = None
        #: Answer a failed AUTH with a 535 that quotes the credentials (or the token), plain and
        #: base64, as some servers echo the command they refuse.
        self.echo_auth = False
        #: Answer DATA with 354 even when no recipient was accepted (then 554 after the
        #: message), as some servers do; RFC 2920 3.1 asks clients to cope.
        self.data_without_recipients = False
        #: The reply to the DATA command itself instead of 354 (e.g. ``"451 4.3.0 Busy"``).
        self.data_command_reply: str | None = None
        #: Verb -> replies to the next commands of that verb, first in first out, instead of
        #: handling them, e.g. a provider throttling the first three messages:
        #: ``{"MAIL": ["454 4.7.0 Throttling failure: Maximum sending rate exceeded."] * 3}``.
        #: For any verb with no data after its line: ``"MAIL"``, ``"RCPT"``, ``"DATA"``...
        #: (not ``"BDAT"``). The commands are in :attr:`commands` all the same, with their time.
        self.command_replies: dict[str, list[str]] = {}

        self._auth_attempts: list[str] = []
        self._server: asyncio.Server | None = None
        self._tls_context: ssl.SSLContext | None = None
        self._handler = _Handler(self)
        # Futures of wait_for() calls, woken by _notify() whenever the server's state changes.
        self._waiters: set[asyncio.Future[None]] = set()
        self._active_sessions = 0
        # Every live transport, so that stop() can drop it, with a future that
        # connection_lost() resolves; and every aiosmtpd session task, so that stop() can wait.
        self._transports: dict[asyncio.Transport, asyncio.Future[None]] = {}
        self._session_tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        # Safe on an object whose constructor failed (pytest shows it in tracebacks).
        attributes = vars(self)
        if "_server" not in attributes:
            return "<SMTPTestServer (not constructed)>"
        state = "running" if self._server is not None else "stopped"
        return f"<SMTPTestServer {self.host}:{self.port} tls={self.tls} {state}>"

    @property
    def auth_attempts(self) -> list[str]:
        """User names of every AUTH attempt, successful or not, in order."""
        return list(self._auth_attempts)

    @property
    def is_serving(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._server is not None

    async def start(self) -> None:
        """Start listening on :attr:`host` and :attr:`port` (then set to the real port)."""
        if self._server is not None:
            raise RuntimeError(f"{self!r} is already running")
        _install_log_filter()
        context = None
        if self.certificates is not None and self.tls != "none":
            context = self.certificates.server_context()
        # STARTTLS is aiosmtpd's business; implicit TLS is asyncio's, from the first byte.
        self._tls_context = context if self.tls == "starttls" else None
        # A socket given is served once; a restart binds its port again.
        sock, self._sock = self._sock, None
        address = {"sock": sock} if sock is not None else {"host": self.host, "port": self.port}
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Gate(self), ssl=context if self.tls == "implicit" else None, **address
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every open connection, as in an outage or a crash.

        Waits until the connections are closed and aiosmtpd's session tasks have ended.
        Does nothing if the server is not running.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # abort(), not close(): a crash does not say goodbye, and a TLS close would wait for
        # the client's close_notify.
        for transport in list(self._transports):
            transport.abort()
        # Python 3.13+ can also abort connections still in their TLS handshake, which no
        # protocol of ours has seen yet.
        abort_clients = cast("Callable[[], None] | None", getattr(server, "abort_clients", None))
        if abort_clients is not None:
            abort_clients()
        # connection_lost() would cancel each aiosmtpd session task; cancelling them here as
        # well also ends a session whose STARTTLS handshake was cut short, which asyncio never
        # reports to aiosmtpd.
        for task in self._session_tasks:
            task.cancel()
        pending: set[asyncio.Future[None]] = {*self._transports.values(), *self._session_tasks}
        if pending:
            _, not_done = await asyncio.wait(pending, timeout=_STOP_TIMEOUT)
            if not_done:
                _log.warning("%r: %d connection(s) did not close", self, len(not_done))
        # Before 3.12 wait_closed() returns at once; later it waits for every connection,
        # including a TLS handshake that never finishes, hence the bound.
        try:
            async with asyncio.timeout(_STOP_TIMEOUT):
                await server.wait_closed()
        except TimeoutError:
            _log.warning("%r: connections still open after stop()", self)

    async def restart(self) -> None:
        """Stop if running, then start again on the same port (for outage-then-recovery tests)."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> SMTPTestServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def wait_for_messages(
        self,
        count: int,
        timeout: float = 5.0,  # noqa: ASYNC109 (a test helper's deadline, like pytest's)
    ) -> list[ReceivedMessage]:
        """Wait until at least ``count`` messages have been accepted and return them all.

        Raises:
            TimeoutError: if fewer than ``count`` arrived within ``timeout`` seconds.
        """
        try:
            await self.wait_for(lambda: len(self.messages) >= count, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"expected {count} message(s) within {timeout} s, but {len(self.messages)} "
                f"arrived ({self.data_attempts} DATA attempt(s), {self.connections} session(s))"
            ) from None
        return list(self.messages)

    def mail_config(self) -> dict[str, object]:
        """Return the ``MAIL_*`` settings that point a quartmail app at this server.

        MAIL_USERNAME / MAIL_PASSWORD come from ``auth``; without it, MAIL_USERNAME /
        MAIL_OAUTH2_TOKEN are the first user of ``oauth2_tokens`` and its token. Each is None
        when not given, and MAIL_CA_FILE is None without TLS, so that updating an app's
        config also clears stale values.
        """
        if self._server is None and self.port == 0:
            raise RuntimeError("start the server first: the port is not known yet")
        username, password = self.auth if self.auth is not None else (None, None)
        token = None
        if self.auth is None and self.oauth2_tokens:
            username, token = next(iter(self.oauth2_tokens.items()))
        return {
            "MAIL_SERVER": self.host,
            "MAIL_PORT": self.port,
            "MAIL_USE_TLS": self.tls == "starttls",
            "MAIL_USE_SSL": self.tls == "implicit",
            "MAIL_USERNAME": username,
            "MAIL_PASSWORD": password,
            "MAIL_OAUTH2_TOKEN": token,
            "MAIL_CA_FILE": (
                str(self.certificates.ca_file)
                if self.certificates is not None and self.tls != "none"
                else None
            ),
            "MAIL_SUPPRESS_SEND": False,
            "MAIL_TIMEOUT": 5,
        }

    async def wait_for(
        self,
        predicate: Callable[[], _T],
        timeout: float = 5.0,  # noqa: ASYNC109 (a test helper's deadline, like pytest's)
    ) -> _T:
        """Wait until ``predicate()`` returns something true, and return that.

        The predicate is called now and again after each event of the server (a connection
        opened or closed, a reply sent, a message recorded), so it should look at the
        server::

            [bounce] = await server.wait_for(lambda: server.find(to="admin@example.com"))
            await server.wait_for(lambda: server.data_attempts >= 3)

        Raises:
            TimeoutError: if it was still false after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while not (result := predicate()):
                    waiter = loop.create_future()
                    self._waiters.add(waiter)
                    try:
                        await waiter
                    finally:
                        self._waiters.discard(waiter)
        except TimeoutError:
            raise TimeoutError(
                f"the condition was still false after {timeout} s ({len(self.messages)} "
                f"message(s), {self.data_attempts} DATA attempt(s), {self.connections} session(s))"
            ) from None
        return result

    def find(
        self, *, to: str | None = None, subject: str | None = None, sender: str | None = None
    ) -> list[ReceivedMessage]:
        """The messages received so far that match every criterion given, in order.

        ``to`` is one of the envelope recipients (RCPT TO, so Cc and Bcc count), ``sender``
        the envelope sender (MAIL FROM), both compared without regard to case; ``subject``
        is the decoded Subject, compared exactly.
        """
        return [
            message
            for message in self.messages
            if (to is None or to.lower() in {r.lower() for r in message.rcpt_tos})
            and (sender is None or sender.lower() == message.mail_from.lower())
            and (subject is None or subject == message.subject)
        ]

    def assert_no_bcc(self) -> None:
        """Fail if a received message carries a ``Bcc:`` header.

        RFC 5322 (3.6.3) lets a sender keep Bcc in the copies it sends, but then every
        recipient reads who was blind-copied; quartmail names Bcc recipients only in the
        envelope (RCPT TO). This checks what reached the wire.

        Raises:
            AssertionError: naming each message that has one, and who received it.
        """
        leaks = [
            f"{message.subject!r} to {message.rcpt_tos} has Bcc: {message._email['Bcc']!s}"
            for message in self.messages
            if "Bcc" in message._email
        ]
        if leaks:
            raise AssertionError("Bcc header sent over SMTP: " + "; ".join(leaks))

    def reset(self) -> None:
        """Forget what was received and every fault set since: a fresh server, still running.

        Clears :attr:`messages` and :attr:`auth_attempts`, sets every counter to 0, empties
        :attr:`refuse_recipients` and :attr:`data_replies`, sets :attr:`data_delay` to 0 and
        turns :attr:`ehlo_reply`, :attr:`max_recipients`, :attr:`echo_auth`,
        :attr:`data_without_recipients` and :attr:`data_command_reply` off, empties
        :attr:`command_replies`, forgets :attr:`commands`, and gives :attr:`oauth2_tokens`
        back the tokens given to the constructor. The other options given to the constructor
        stay. Meant for a server shared by many tests (a session-scoped fixture): reset it
        before each test.
        """
        self.messages = []
        self.connections = 0
        self.refused_connections = 0
        self.data_attempts = 0
        self.refuse_recipients = {}
        self.data_replies = []
        self.data_delay = 0.0
        self.ehlo_reply = None
        self.max_recipients = None
        self.echo_auth = False
        self.oauth2_tokens = self._given_tokens()
        self.data_without_recipients = False
        self.data_command_reply = None
        self.command_replies = {}
        self.commands = []
        self._auth_attempts = []

    def command_groups(self) -> list[list[str]]:
        """The command verbs of :attr:`commands`, grouped by the read they arrived in.

        ``[["EHLO"], ["MAIL", "RCPT", "BDAT"], ["QUIT"]]`` says MAIL, RCPT and BDAT came in
        one read: the client sent them in one write (RFC 2920 pipelining).
        """
        groups: dict[tuple[int, int], list[str]] = {}
        for command in self.commands:
            groups.setdefault((command.session, command.read), []).append(command.verb)
        return list(groups.values())

    def most_in_window(self, period: float, verb: str = "MAIL") -> int:
        """The most *verb* commands the server began handling in any window of *period*
        seconds, both ends included, over every session: what a provider's rate limit
        counts. By default MAIL FROM, with which each transaction starts::

            assert server.most_in_window(1.0) <= 20  # MAIL_RATE_LIMIT = "20/s" held
        """
        return most_in_window([c.time for c in self.commands if c.verb == verb], period)

    def configure(self, app: Quart) -> None:
        """Point *app* at this server: :meth:`mail_config` into its config, which also turns
        ``MAIL_SUPPRESS_SEND`` off (Quart's ``TESTING`` would otherwise suppress sending).

        Call it before ``Mail(app)`` or ``mail.init_app(app)``: they read the settings once.

        Raises:
            RuntimeError: if *app* already has Mail, whose settings would then stay as
                they were (and the test would pass with nothing sent).
        """
        if "mail" in app.extensions:
            raise RuntimeError(
                f"server.configure(app) after Mail(app): app {app.name!r} has read its MAIL_* "
                "settings already and would not use this server. Call server.configure(app) "
                "before Mail(app) / mail.init_app(app), or pass server.mail_config() to your "
                "app factory"
            )
        app.config.update(self.mail_config())

    # Internals used by the protocols below.

    def _given_tokens(self) -> dict[str, str] | None:
        return dict(self._oauth2_tokens) if self._oauth2_tokens is not None else None

    def _notify(self) -> None:
        """Wake every wait_for(): something about the server changed."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _choose_protocol(self) -> asyncio.BaseProtocol:
        # Called once per connection from _Gate.connection_made, one connection at a time, so
        # checking and counting the limit here cannot race with another connection.
        if self.silent:
            return _SilentProtocol(self)
        if self.greeting is not None:
            return _RefusingProtocol(self, f"{self.greeting}\r\n".encode())
        if self.max_connections is not None and self._active_sessions >= self.max_connections:
            return _RefusingProtocol(self)
        self._active_sessions += 1
        return self._new_session()

    def _new_session(self) -> _Session:
        auth_required = self.auth is not None or self.oauth2_tokens is not None
        # AUTH only after STARTTLS in STARTTLS mode, as a real submission server does; with
        # implicit TLS (or none) aiosmtpd must be told not to require its STARTTLS.
        auth_require_tls = not auth_required or self.tls == "starttls"
        with warnings.catch_warnings(), _LOG_FILTER.constructing():
            # auth_require_tls=False warns "Requiring AUTH while not requiring TLS"; the
            # connection is encrypted anyway (implicit TLS) or it is a deliberate plain test.
            warnings.filterwarnings(
                "ignore", message="Requiring AUTH while not requiring TLS", category=UserWarning
            )
            return _Session(
                self,
                self._handler,
                loop=asyncio.get_running_loop(),
                # An explicit name: aiosmtpd would otherwise call socket.getfqdn(), which can
                # block for seconds on a machine with slow DNS.
                hostname=_SERVER_HOSTNAME,
                decode_data=False,
                enable_SMTPUTF8=self.smtputf8,
                tls_context=self._tls_context,
                require_starttls=self.tls == "starttls",
                auth_required=auth_required,
                auth_require_tls=auth_require_tls,
                authenticator=self._handler.authenticate,
                # XOAUTH2 only for a server given tokens (PLAIN and LOGIN are always offered).
                auth_exclude_mechanism=["XOAUTH2"] if self.oauth2_tokens is None else [],
                timeout=self.idle_timeout,
            )

    def _track(self, transport: asyncio.BaseTransport) -> None:
        # Stream transports, TCP or TLS: both are full asyncio.Transport objects with abort().
        closed = asyncio.get_running_loop().create_future()
        self._transports[cast(asyncio.Transport, transport)] = closed
        self._notify()

    def _untrack(self, transport: asyncio.BaseTransport) -> None:
        closed = self._transports.pop(cast(asyncio.Transport, transport), None)
        if closed is not None and not closed.done():
            closed.set_result(None)
        self._notify()

    def _track_task(self, task: asyncio.Task[None]) -> None:
        self._session_tasks.add(task)
        _LOG_FILTER.session_tasks.add(task)
        task.add_done_callback(self._session_task_done)

    def _session_task_done(self, task: asyncio.Task[None]) -> None:
        self._session_tasks.discard(task)
        # aiosmtpd re-raises ConnectionResetError when a client vanishes; retrieving the
        # exception keeps asyncio from logging "Task exception was never retrieved".
        if not task.cancelled():
            error = task.exception()
            if error is not None and not isinstance(error, ConnectionError):
                _log.warning("%r: SMTP session ended with %r", self, error)

    async def _record(self, message: ReceivedMessage) -> None:
        if self._on_message is not None:
            await self._on_message(message)
        else:
            self.messages.append(message)
        self._notify()


class _Handler:
    """aiosmtpd handler: recipient refusals, DATA replies and delay, recording.

    A separate object on purpose: aiosmtpd registers every ``auth_*`` attribute of its
    handler as an AUTH mechanism, so SMTPTestServer.auth_attempts would become one.
    """

    def __init__(self, owner: SMTPTestServer) -> None:
        self._owner = owner

    async def handle_RCPT(  # noqa: N802 (aiosmtpd's hook name)
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self._owner.refuse_recipients.get(address)
        if reply is not None:
            _close_after_421(server, reply)
            return reply
        limit = self._owner.max_recipients
        if limit is not None and len(envelope.rcpt_tos) >= limit:
            return "452 4.5.3 Too many recipients"
        # With a handle_RCPT hook, aiosmtpd leaves accepting the recipient to the handler.
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        owner = self._owner
        owner.data_attempts += 1
        owner._notify()
        reply = owner.data_replies.pop(0) if owner.data_replies else _ACCEPTED
        if owner.data_delay > 0:
            await asyncio.sleep(owner.data_delay)
        if reply.startswith("2"):
            login = session.auth_data if session.authenticated else None
            await owner._record(
                ReceivedMessage(
                    mail_from=envelope.mail_from or "",
                    rcpt_tos=list(envelope.rcpt_tos),
                    data=envelope.original_content or b"",
                    mail_options=list(envelope.mail_options),
                    rcpt_options=list(envelope.rcpt_options),
                    tls=_is_encrypted(server, session),
                    login=login if isinstance(login, str) else None,
                    helo=session.host_name,
                )
            )
        _close_after_421(server, reply)
        return reply

    async def handle_EHLO(  # noqa: N802 (aiosmtpd's hook name)
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Reply to EHLO as aiosmtpd would, or with :attr:`SMTPTestServer.ehlo_reply`."""
        reply = self._owner.ehlo_reply
        if reply is not None:
            return [reply]
        session.host_name = hostname  # aiosmtpd leaves this to a handler with this hook
        owner = self._owner
        extra = ["250-PIPELINING"] * owner.pipelining + ["250-CHUNKING"] * owner.chunking
        return [*responses[:-1], *extra, responses[-1]]

    async def handle_exception(self, error: Exception) -> str:
        """Reply to an error raised while handling a command (aiosmtpd's hook)."""
        if isinstance(error, TLSSetupException):
            # A client that rejects our certificate aborts the STARTTLS handshake: an expected
            # event in tests, not a server error. aiosmtpd closes the connection itself.
            _log.debug("STARTTLS handshake failed: %r", error.__cause__)
            return "454 4.7.0 TLS handshake failed"
        _log.error("SMTP test server error", exc_info=error)
        return f"500 Error: ({type(error).__name__}) {error}"

    def authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: object,
    ) -> AuthResult:
        """aiosmtpd authenticator for PLAIN and LOGIN."""
        expected = self._owner.auth
        if expected is None or not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace")
        self._owner._auth_attempts.append(login)
        # Both comparisons run, so the time taken does not tell which one failed.
        user_ok = hmac.compare_digest(auth_data.login, expected[0].encode())
        password_ok = hmac.compare_digest(auth_data.password, expected[1].encode())
        if user_ok and password_ok:
            return AuthResult(success=True, auth_data=login)
        if self._owner.echo_auth:
            password = auth_data.password
            plain = base64.b64encode(b"\0" + auth_data.login + b"\0" + password).decode()
            quoted = f"{password.decode('utf-8', 'replace')} {base64.b64encode(password).decode()}"
            return AuthResult(
                success=False,
                handled=False,
                message=f"535 5.7.8 Refused AUTH PLAIN {plain} {quoted}",
            )
        # handled=False makes aiosmtpd answer 535; the default (handled=True) sends nothing
        # and leaves the client waiting for its read timeout.
        return AuthResult(success=False, handled=False)


class _ExtendedSMTP(SMTP):
    """aiosmtpd's SMTP protocol plus what aiosmtpd 1.4 lacks: BDAT (RFC 3030), a record of
    the read each command arrived in, and DATA that takes a message with no recipient."""

    _owner: SMTPTestServer

    def __init__(self, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._number = 0  # the session's number, set when the connection is made
        self._received = 0  # octets received so far
        self._read_ends: list[int] = []  # the octet count at the end of each read
        self._chunks: list[bytes] = []  # BDAT chunks of the current transaction
        self._chunks_for: object = None  # the envelope they belong to
        #: Set by a 421 reply: commands pipelined after it are not handled (RFC 5321 3.8).
        self.closing = False
        # aiosmtpd dispatches each command through this table: record it on the way.
        self._smtp_methods = {
            verb: functools.partial(self._dispatch, verb, method)
            for verb, method in self._smtp_methods.items()
        }

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        self._read_ends.append(self._received)
        super().data_received(data)

    async def _dispatch(
        self, verb: str, method: Callable[[str | None], Any], arg: str | None
    ) -> None:
        # The octets consumed so far end in the read this command arrived in; aiosmtpd's
        # reader keeps the rest in its buffer (aiosmtpd itself reaches into it).
        consumed = self._received - len(self._reader._buffer)  # type: ignore[attr-defined]
        read = bisect.bisect_left(self._read_ends, consumed) + 1
        now = asyncio.get_running_loop().time()
        self._owner.commands.append(ReceivedCommand(verb, self._number, read, now))
        if self.closing:
            return
        replies = self._owner.command_replies.get(verb)
        if replies:
            reply = replies.pop(0)
            _close_after_421(self, reply)
            await self.push(reply)
            return
        await method(arg)

    async def smtp_DATA(self, arg: str) -> None:  # noqa: N802 (aiosmtpd's method name)
        assert self.envelope is not None
        refusal = self._owner.data_command_reply
        if refusal is not None and self.envelope.rcpt_tos:
            _close_after_421(self, refusal)
            await self.push(refusal)
            return
        if not (self._owner.data_without_recipients and not self.envelope.rcpt_tos):
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        while (await self._reader.readuntil()) != b".\r\n":
            pass
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("554 5.5.1 No valid recipients")

    async def smtp_BDAT(self, arg: str | None) -> None:  # noqa: N802 (aiosmtpd's method name)
        """RFC 3030: ``BDAT <size> [LAST]``, then exactly *size* octets, no dot-stuffing."""
        match = re.fullmatch(r"(\d{1,9})( +LAST)?", (arg or "").strip(), re.IGNORECASE)
        if not self._owner.chunking:
            await self.push('500 Error: command "BDAT" not recognized')
            return
        if match is None:
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")
            return
        # RFC 3030 2: the chunk is read whatever the reply, or the rest of it would be
        # taken for commands.
        chunk = await self._reader.readexactly(int(match[1]))
        if await self.check_helo_needed("EHLO") or await self.check_auth_needed("BDAT"):
            return
        envelope = self.envelope
        assert envelope is not None
        if self._chunks_for is not envelope:
            self._chunks, self._chunks_for = [], envelope
        if not envelope.mail_from:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not envelope.rcpt_tos:
            await self.push("554 5.5.1 No valid recipients")
            return
        self._chunks.append(chunk)
        if match[2] is None:
            await self.push(f"250 2.0.0 {len(chunk)} octets received")
            return
        envelope.original_content = envelope.content = b"".join(self._chunks)
        self._chunks = []
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(_ACCEPTED if status is MISSING else status)


class _Session(_ExtendedSMTP):
    """aiosmtpd's SMTP protocol, registered with its SMTPTestServer for stop(), with AUTH
    XOAUTH2 and AUTH lines as long as a SASL response needs."""

    def __init__(self, owner: SMTPTestServer, handler: _Handler, **kwargs: Any) -> None:
        self._owner = owner
        self._tracked: asyncio.BaseTransport | None = None
        self._ended = False
        # aiosmtpd sizes its line reader from line_length_limit, and clears (and grows) a
        # command_size_limits dict that its class shares with every instance: both are made
        # this session's own. DATA lines are still held to the class's limit (deleted below).
        self.line_length_limit = _AUTH_LINE_LIMIT + 2
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(handler, **kwargs)
        del self.line_length_limit
        if owner.data_line_limit is not None:
            self.line_length_limit = owner.data_line_limit
        self.command_size_limits["AUTH"] = _AUTH_LINE_LIMIT

    async def auth_XOAUTH2(self, _: SMTP, args: list[str]) -> AuthResult:  # noqa: N802
        """AUTH XOAUTH2, as Gmail and Microsoft 365 speak it: the base64 of
        ``user=<user>\\x01auth=Bearer <token>\\x01\\x01``, as the initial response or after
        an empty 334. A bad token gets Gmail's 334 error challenge, then 535."""
        if len(args) == 1:
            response = await self.challenge_auth("")
        else:
            try:
                response = base64.b64decode(args[1], validate=True)
            except ValueError:
                response = MISSING
                await self.push("501 5.5.2 Can't decode base64")
        if response is MISSING:  # answered with 501 already
            return AuthResult(success=False, handled=True)
        fields = response.split(b"\x01")
        user_field, auth_field = [*fields, b"", b""][:2]
        if (
            len(fields) != 4
            or fields[2:] != [b"", b""]
            or not user_field.startswith(b"user=")
            or not auth_field.startswith(b"auth=Bearer ")
        ):
            await self.push("501 5.5.2 Malformed XOAUTH2 response")
            return AuthResult(success=False, handled=True)
        user = user_field.removeprefix(b"user=").decode("utf-8", "replace")
        token = auth_field.removeprefix(b"auth=Bearer ")
        owner = self._owner
        owner._auth_attempts.append(user)
        expected = (owner.oauth2_tokens or {}).get(user)
        if expected is not None and hmac.compare_digest(token, expected.encode()):
            return AuthResult(success=True, auth_data=user)
        if await self.challenge_auth(_XOAUTH2_ERROR) is MISSING:  # the client sent "*"
            return AuthResult(success=False, handled=True)
        refusal = _XOAUTH2_REFUSED
        if owner.echo_auth:
            quoted = base64.b64encode(response).decode()
            refusal += f" AUTH XOAUTH2 {quoted} {token.decode('utf-8', 'replace')}"
        return AuthResult(success=False, handled=False, message=refusal)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiosmtpd calls this again, with the TLS transport, after STARTTLS; the first
        # (TCP, or implicit TLS) transport is the one to track and to abort.
        first = self._tracked is None
        if first:
            self._tracked = transport
            self._owner._track(transport)
            self._owner.connections += 1
            self._number = self._owner.connections
        super().connection_made(transport)
        if first:
            # aiosmtpd runs each session in a task it keeps here (stable since 1.2).
            task = getattr(self, "_handler_coroutine", None)
            if isinstance(task, asyncio.Task):
                self._owner._track_task(task)
                task.add_done_callback(self._end)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self._end()

    async def push(self, status: AnyStr) -> None:
        await super().push(status)
        # After every reply: the state a reply reports (a message, a counter) is now set.
        self._owner._notify()

    def _end(self, task: object = None) -> None:
        # Normally connection_lost() ends the session (and cancels its task). A connection
        # aborted during the STARTTLS handshake never reports connection_lost() to aiosmtpd,
        # so the end of the task counts too.
        if self._ended or self._tracked is None:
            return
        self._ended = True
        self._owner._active_sessions -= 1
        self._owner._untrack(self._tracked)


class _Gate(asyncio.Protocol):
    """The first protocol of each connection: hands the connection to the right one.

    It decides when the connection is up (after the handshake, with implicit TLS), one
    connection at a time, so ``max_connections`` is exact even for simultaneous clients.
    """

    def __init__(self, owner: SMTPTestServer) -> None:
        self._owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        protocol = self._owner._choose_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


class _RefusingProtocol(asyncio.Protocol):
    """Greets with 421 (or *greeting*) and closes: a server at its connection limit."""

    def __init__(self, owner: SMTPTestServer, greeting: bytes = _TOO_MANY_CONNECTIONS) -> None:
        self._owner = owner
        self._greeting = greeting
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._owner._track(transport)
        self._owner.refused_connections += 1
        cast(asyncio.WriteTransport, transport).write(self._greeting)
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._owner._untrack(self._transport)


class _SilentProtocol(asyncio.Protocol):
    """Accepts the connection and never says a word."""

    def __init__(self, owner: SMTPTestServer) -> None:
        self._owner = owner
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._owner._track(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._owner._untrack(self._transport)


def _is_credentials(auth: object) -> bool:
    return (
        isinstance(auth, tuple) and len(auth) == 2 and all(isinstance(part, str) for part in auth)
    )


def _is_token_map(tokens: object) -> bool:
    return isinstance(tokens, dict) and all(
        isinstance(user, str) and isinstance(token, str) for user, token in tokens.items()
    )


def _is_encrypted(server: SMTP, session: Session) -> bool:
    # aiosmtpd sets session.ssl after STARTTLS; with implicit TLS only the transport knows.
    if session.ssl is not None:
        return True
    transport = server.transport
    return transport is not None and transport.get_extra_info("ssl_object") is not None


def _close_after_421(server: SMTP, reply: str) -> None:
    """Close the connection once ``reply`` is sent, if it is a 421 (RFC 5321, 3.8)."""
    transport = server.transport
    if reply.startswith("421") and isinstance(server, _ExtendedSMTP):
        server.closing = True
    if reply.startswith("421") and transport is not None:
        # aiosmtpd writes the reply in the same step that our hook returns in, so a callback
        # scheduled now runs after the reply is in the transport; close() then flushes it.
        asyncio.get_running_loop().call_soon(transport.close)


class _QuietAiosmtpdLog(logging.Filter):
    """Drops two aiosmtpd warnings that are noise for a test server, and only for ours.

    - "auth_required == True but auth_require_tls == False", logged when a protocol is built
      for implicit TLS (or plain) with AUTH: deliberate here.
    - "Session.login_data is deprecated ...", logged by aiosmtpd 1.4 itself on every
      successful AUTH, whoever the authenticator is.
    """

    _NOISE = frozenset(
        {
            "auth_required == True but auth_require_tls == False",
            "Session.login_data is deprecated and will be removed in version 2.0",
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self._constructing = 0
        self.session_tasks: weakref.WeakSet[asyncio.Task[None]] = weakref.WeakSet()

    def constructing(self) -> _Constructing:
        """Context manager: while inside, the noise comes from our own construction."""
        return _Constructing(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in self._NOISE:
            return True
        if self._constructing:
            return False
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop: not one of our sessions
            return True
        return task is None or task not in self.session_tasks


class _Constructing:
    def __init__(self, log_filter: _QuietAiosmtpdLog) -> None:
        self._filter = log_filter

    def __enter__(self) -> None:
        self._filter._constructing += 1

    def __exit__(self, *exc_info: object) -> None:
        self._filter._constructing -= 1


_LOG_FILTER = _QuietAiosmtpdLog()


def _install_log_filter() -> None:
    # aiosmtpd's smtp module logs to "mail.log"; a filter on that logger sees its records
    # before they propagate to any handler.
    logger = logging.getLogger("mail.log")
    if _LOG_FILTER not in logger.filters:
        logger.addFilter(_LOG_FILTER)
