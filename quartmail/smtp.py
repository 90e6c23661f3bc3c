"""One SMTP session over aiosmtplib: connect, TLS, AUTH, send, close.

This module knows nothing of Quart. :class:`SMTPSettings` holds what a session
needs; :class:`SMTPSession` opens one (implicit TLS or required STARTTLS,
certificates verified by the given context), sends flattened
:class:`~quartmail.message.Envelope` objects and turns every aiosmtplib or OS
error into a :class:`~quartmail.errors.SendError` that keeps the SMTP code and
the refused recipients. Neither error texts nor the ``MAIL_DEBUG`` log of the
conversation ever contain the password.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any, Literal

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol
from aiosmtplib.typing import Default

from .errors import (
    AuthenticationError,
    ConnectError,
    RecipientsRefusedError,
    Reply,
    SendError,
    SendTimeoutError,
)
from .message import Envelope

__all__ = ["SMTPSession", "SMTPSettings", "SendResult", "make_tls_context"]

log = logging.getLogger("quartmail.smtp")


@dataclass(frozen=True, slots=True)
class SendResult:
    """What the server said about one message.

    ``refused`` maps each refused recipient to its ``(code, text)``; the
    message went to every other recipient. It is empty when all were taken
    (and when sending is suppressed).
    """

    message_id: str
    refused: dict[str, Reply] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SMTPSettings:
    """Everything needed to open an SMTP session."""

    hostname: str = "localhost"
    port: int = 25
    use_tls: bool = False  # STARTTLS, required
    use_ssl: bool = False  # implicit TLS
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 30.0
    tls_context: ssl.SSLContext | None = field(default=None, repr=False)
    local_hostname: str | None = None
    debug: bool = False

    @property
    def address(self) -> str:
        return f"{self.hostname}:{self.port}"

    def secrets(self) -> list[str]:
        """The forms in which the password could travel, to keep them out of
        logs and error texts: plain, and base64 as in AUTH LOGIN and PLAIN."""
        if not self.password:
            return []
        user = self.username or ""
        forms = [self.password.encode(), f"\0{user}\0{self.password}".encode()]
        return [self.password, *(base64.b64encode(form).decode("ascii") for form in forms)]


def make_tls_context(*, validate_certs: bool = True, ca_file: str | None = None) -> ssl.SSLContext:
    """The client TLS context: the system CAs plus ``ca_file``, with host
    names checked, unless ``validate_certs`` is off."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    if not validate_certs:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class SMTPSession:
    """One open SMTP session. Use :meth:`open`, then :meth:`send` any number
    of times, then :meth:`close`.

    ``sent`` counts the messages this session delivered.
    """

    def __init__(self, settings: SMTPSettings, client: _SMTP) -> None:
        self.settings = settings
        self.sent = 0
        self._client = client

    def __repr__(self) -> str:
        state = "open" if self.is_connected else "closed"
        return f"<SMTPSession {self.settings.address} {state}, sent={self.sent}>"

    @classmethod
    async def open(cls, settings: SMTPSettings) -> SMTPSession:
        """Connect, start TLS as configured and log in.

        Raises :class:`~quartmail.errors.SendError` (a subclass of it) when
        any step fails; the connection is closed then.
        """
        options = dict(
            hostname=settings.hostname,
            port=settings.port,
            use_tls=settings.use_ssl,
            # MAIL_USE_TLS makes STARTTLS required; without it, no STARTTLS at
            # all (aiosmtplib's default would try it opportunistically).
            start_tls=settings.use_tls,
            tls_context=settings.tls_context,
            local_hostname=settings.local_hostname,
            timeout=settings.timeout,
        )
        client = _LoggingSMTP(settings.secrets(), **options) if settings.debug else _SMTP(**options)
        try:
            await client.connect()
            if settings.username is not None:
                await client.login(settings.username, settings.password or "")
        except BaseException as err:
            client.close()
            if isinstance(err, Exception):
                await client.wait_closed(settings.timeout)
                raise _wrap(err, settings) from err
            raise
        return cls(settings, client)

    @property
    def is_connected(self) -> bool:
        return self._client.is_connected

    async def send(self, envelope: Envelope) -> SendResult:
        """Send one message; the result lists the recipients the server
        refused, each with its ``(code, text)``, when it took the others.

        Raises :class:`~quartmail.errors.RecipientsRefusedError` when it refused
        them all, another :class:`~quartmail.errors.SendError` on any other
        failure. After a failure that leaves the session unusable (see
        :func:`_spends_session`) or a cancellation, the session is closed:
        check :attr:`is_connected` before sending again.
        """
        try:
            refused, _ = await self._client.sendmail(
                envelope.sender,
                envelope.recipients,
                envelope.data,
                mail_options=envelope.mail_options,
                rcpt_options=envelope.rcpt_options,
            )
        except asyncio.CancelledError:
            # Cancelled mid-command: aiosmtplib's protocol is out of step
            # with the server and would pair the next reply with the wrong
            # command, so the session must never be used again.
            self.abort()
            raise
        except Exception as err:
            error = _wrap(err, self.settings)
            if _spends_session(error):
                self.abort()
            raise error from err
        self.sent += 1
        return SendResult(
            message_id=envelope.message_id,
            refused={address: (reply.code, reply.message) for address, reply in refused.items()},
        )

    async def close(self) -> None:
        """QUIT politely if the connection still works, then close it and wait
        (at most MAIL_TIMEOUT) until the socket is closed."""
        if self._client.is_connected:
            # If the server went away first, closing is all that is left.
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await self._client.quit()
        self._client.close()
        await self._client.wait_closed(self.settings.timeout)

    def abort(self) -> None:
        """Close at once, without QUIT: for a session whose state is unknown
        (a cancelled or timed-out send)."""
        self._client.close()


def _spends_session(error: SendError) -> bool:
    """After this failure, can the session carry another message?

    aiosmtplib resets the transaction after an error reply, but a 421 reply
    to DATA leaves it connected while real servers hang up (RFC 5321), and a
    timeout leaves the protocol out of step.
    """
    return error.code == 421 or isinstance(error, ConnectError | SendTimeoutError)


def _wrap(err: Exception, settings: SMTPSettings) -> SendError:
    """Turn an aiosmtplib or OS error into ours, with a password-free text."""
    where = f"SMTP server {settings.address}"
    if isinstance(err, aiosmtplib.SMTPRecipientsRefused):
        refused = {e.recipient: (e.code, e.message) for e in err.recipients}
        return RecipientsRefusedError(
            _redact(f"{where} refused every recipient: {_replies(refused)}", settings),
            refused=refused,
        )
    if isinstance(err, aiosmtplib.SMTPAuthenticationError):
        return AuthenticationError(
            _redact(
                f"{where} refused the login for {settings.username!r}: {err.code} {err.message}",
                settings,
            ),
            code=err.code,
        )
    if isinstance(err, aiosmtplib.SMTPConnectResponseError):
        # A refusal at the greeting (421 at a connection limit): a fact
        # about the server, not about a message.
        return ConnectError(
            _redact(f"{where} refused the connection: {err.code} {err.message}", settings),
            code=err.code,
        )
    if isinstance(err, aiosmtplib.SMTPResponseException):
        return SendError(
            _redact(f"{where} replied {err.code} {err.message}", settings), code=err.code
        )
    if isinstance(err, TimeoutError):  # aiosmtplib's timeouts subclass it
        return SendTimeoutError(
            f"{where} did not answer within {settings.timeout:g} s (MAIL_TIMEOUT)"
        )
    # STARTTLS raises a certificate failure as-is; implicit TLS wraps it.
    cert_error = err if isinstance(err, ssl.SSLCertVerificationError) else err.__cause__
    if isinstance(cert_error, ssl.SSLCertVerificationError):
        return ConnectError(
            f"{where}: certificate not trusted ({cert_error.verify_message}); "
            "set MAIL_CA_FILE to the CA that signed it"
        )
    if isinstance(err, ConnectionError | OSError):
        return ConnectError(_redact(f"{where}: {_text(err)}", settings))
    if isinstance(err, aiosmtplib.SMTPException):
        message = _text(err)
        if settings.use_tls and "STARTTLS" in message.upper():
            message = f"MAIL_USE_TLS requires STARTTLS, which the server does not offer ({message})"
        return SendError(_redact(f"{where}: {message}", settings))
    return SendError(_redact(f"{where}: {type(err).__name__}: {err}", settings))


def _text(err: Exception) -> str:
    if isinstance(err, aiosmtplib.SMTPException):
        return err.message
    return str(err) or type(err).__name__


def _replies(refused: dict[str, Reply]) -> str:
    return "; ".join(f"{address}: {code} {text}" for address, (code, text) in refused.items())


def _redact(text: str, settings: SMTPSettings) -> str:
    for secret in settings.secrets():
        text = text.replace(secret, "****")
    return text


class _SMTP(aiosmtplib.SMTP):
    """aiosmtplib's client, whose closing can be waited for.

    ``close()`` only starts closing a connection: over TLS, asyncio keeps the
    socket open until the server's close_notify comes back (RFC 8446, 6.1). A
    caller whose event loop ends meanwhile leaves the socket behind
    ("ResourceWarning: unclosed transport"), as tests with a server in another
    thread did. :meth:`wait_closed` waits for aiosmtplib's report that each
    connection closed here is gone.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._closing: dict[SMTPProtocol, asyncio.Future[None]] = {}

    def close(self) -> None:
        # Every way out (quit(), a failed connect(), ours) closes through here.
        protocol = self.protocol
        if protocol is not None and protocol.transport is not None:
            self._closing.setdefault(protocol, asyncio.get_running_loop().create_future())
        super().close()

    def _on_connection_lost(self, protocol: SMTPProtocol) -> None:
        gone = self._closing.pop(protocol, None)
        if gone is not None and not gone.done():
            gone.set_result(None)
        super()._on_connection_lost(protocol)

    async def wait_closed(self, timeout: float) -> None:  # noqa: ASYNC109 (MAIL_TIMEOUT)
        """Wait at most *timeout* seconds until every connection closed so far is gone."""
        if self._closing:
            await asyncio.wait(list(self._closing.values()), timeout=timeout)


class _LoggingSMTP(_SMTP):
    """aiosmtplib's client, logging the conversation (MAIL_DEBUG).

    AUTH arguments, and every line sent while the server is asking for
    credentials (334), are replaced by ``****``; any secret that still shows
    up in a reply is redacted too.
    """

    def __init__(self, secrets: list[str], **options: Any) -> None:
        super().__init__(**options)
        self.secrets = secrets
        self._in_auth = False

    async def connect(self, **kwargs: Any) -> aiosmtplib.SMTPResponse:
        log.debug("connecting to %s:%s", self.hostname, self.port)
        response = await super().connect(**kwargs)
        log.debug("<<< %s %s", response.code, self._clean(response.message))
        return response

    async def execute_command(  # aiosmtplib's signature, timeout included
        self,
        *args: bytes,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109
    ) -> aiosmtplib.SMTPResponse:
        if args and args[0].upper() == b"AUTH":
            self._in_auth = True
            shown = " ".join(arg.decode("ascii", "replace") for arg in args[:2])
            shown += " ****" if len(args) > 2 else ""
        elif self._in_auth:
            shown = "****"
        else:
            shown = self._clean(b" ".join(args).decode("utf-8", "replace"))
        log.debug(">>> %s", shown)
        response = await super().execute_command(*args, timeout=timeout)
        self._in_auth = self._in_auth and response.code == 334
        log.debug("<<< %s %s", response.code, self._clean(response.message))
        return response

    async def data(  # aiosmtplib's signature, timeout included
        self,
        message: str | bytes,
        /,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109
    ) -> aiosmtplib.SMTPResponse:
        log.debug(">>> DATA (%d bytes)", len(message))
        response = await super().data(message, timeout=timeout)
        log.debug("<<< %s %s", response.code, self._clean(response.message))
        return response

    def _clean(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "****")
        return text
