"""One SMTP session over aiosmtplib: connect, TLS, AUTH, send, close.

This module knows nothing of Quart. :class:`SMTPSettings` holds what a session
needs; :class:`SMTPSession` opens one (implicit TLS or required STARTTLS,
certificates verified by the given context), sends flattened
:class:`~quartmail.message.Envelope` objects (in several transactions when the
server limits recipients per transaction; each in one write when the server
advertises PIPELINING, see :mod:`quartmail.pipelining`) and turns every
aiosmtplib or OS error into a :class:`~quartmail.errors.SendError` that keeps
the SMTP code and the refused recipients. It logs in with a password (AUTH
PLAIN, LOGIN or CRAM-MD5) or with an OAuth2 access token (AUTH XOAUTH2,
``MAIL_OAUTH2_TOKEN``). Neither error texts, nor the errors chained to them,
nor the ``MAIL_DEBUG`` log of the conversation ever contain the password or
the token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import inspect
import logging
import math
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import aiosmtplib
from aiosmtplib.auth import auth_xoauth2_encode
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
from .pipelining import PipeliningProtocol, send_pipelined

__all__ = [
    "SMTPSession",
    "SMTPSettings",
    "SendResult",
    "TokenProvider",
    "TransactionGate",
    "make_tls_context",
    "token_problem",
]

log = logging.getLogger("quartmail.smtp")

#: ``MAIL_OAUTH2_TOKEN`` as a callable: given MAIL_USERNAME, it returns a
#: current access token, or an awaitable of one.
TokenProvider: TypeAlias = Callable[[str], "str | Awaitable[str]"]

#: What every SMTP transaction passes through (MailCore.transaction): given the
#: message's deadline (a loop time), a context entered just before MAIL FROM
#: and left when the transaction ends. It raises a SendError to start none.
TransactionGate: TypeAlias = Callable[[float], AbstractAsyncContextManager[None]]


@dataclass(frozen=True, slots=True)
class SendResult:
    """What the server said about one message.

    ``refused`` maps each refused recipient to its ``(code, text)``; the
    message went to every other recipient. It is empty when all were taken
    (and when sending is suppressed).

    ``suppressed`` maps each recipient left out because it is on the
    suppression list to its reason (background delivery and the outbox).
    """

    message_id: str
    refused: dict[str, Reply] = field(default_factory=dict)
    suppressed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SMTPSettings:
    """Everything needed to open an SMTP session."""

    hostname: str = "localhost"
    port: int = 25
    use_tls: bool = False  # STARTTLS, required
    use_ssl: bool = False  # implicit TLS
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: An access token, or a callable returning one: AUTH XOAUTH2 instead of the password.
    oauth2_token: str | TokenProvider | None = field(default=None, repr=False)
    timeout: float = 30.0
    tls_context: ssl.SSLContext | None = field(default=None, repr=False)
    local_hostname: str | None = None
    debug: bool = False
    pipelining: bool = True  # MAIL_PIPELINING: when the server advertises it

    @property
    def address(self) -> str:
        return f"{self.hostname}:{self.port}"

    def secrets(self) -> list[str]:
        """The forms in which the password (or a fixed MAIL_OAUTH2_TOKEN) could
        travel, to keep them out of logs and error texts: plain, and base64 as
        in AUTH LOGIN, PLAIN and XOAUTH2."""
        user = self.username or ""
        found: list[str] = []
        if self.password:
            forms = [self.password.encode(), f"\0{user}\0{self.password}".encode()]
            found += [self.password, *(base64.b64encode(form).decode("ascii") for form in forms)]
        if isinstance(self.oauth2_token, str):
            found += _token_forms(user, self.oauth2_token)
        return found

    def redact(self, text: str) -> str:
        """*text* with every form of the password (and of a fixed token)
        replaced by ``****``."""
        return _redact(text, self.secrets())


def token_problem(token: str) -> str | None:
    """What is wrong with an access token, or None. The description never
    quotes the token.

    A token is one word of visible ASCII (RFC 6750 2.1 allows less still): a
    space, a line end or a control character would break the XOAUTH2 string,
    whose fields are separated by ``\\x01``."""
    if not token:
        return "an empty token"
    if not all("!" <= char <= "~" for char in token):
        return "a token with white space or control characters (a line end left in?)"
    return None


def _token_forms(user: str, token: str) -> list[str]:
    """The forms in which an access token travels: plain, and the base64
    XOAUTH2 string of the AUTH command."""
    return [token, auth_xoauth2_encode(user, token).decode("ascii")]


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

    def __init__(
        self, settings: SMTPSettings, client: _SMTP, secrets: list[str] | None = None
    ) -> None:
        self.settings = settings
        self.sent = 0
        #: Entered around each transaction; set by the core (MAIL_RATE_LIMIT).
        self.gate: TransactionGate = _no_gate
        self._client = client
        # Every form of the password and of the tokens this session used.
        self._secrets = secrets if secrets is not None else settings.secrets()

    def __repr__(self) -> str:
        state = "open" if self.is_connected else "closed"
        return f"<SMTPSession {self.settings.address} {state}, sent={self.sent}>"

    @classmethod
    async def open(cls, settings: SMTPSettings) -> SMTPSession:
        """Connect, start TLS as configured and log in.

        With a callable ``MAIL_OAUTH2_TOKEN``, a token the server refuses is
        taken for an expired one: the callable is asked once more, and the
        login tried again on a new connection.

        Raises :class:`~quartmail.errors.SendError` (a subclass of it) when
        any step fails; the connection is closed then.
        """
        secrets = settings.secrets()
        opened = await cls._open(settings, secrets)
        if (
            isinstance(opened, AuthenticationError)
            and opened.code is not None  # the server's refusal, not ours
            and callable(settings.oauth2_token)
        ):
            log.info("%s; asking MAIL_OAUTH2_TOKEN for a new token", opened)
            opened = await cls._open(settings, secrets)
        if isinstance(opened, SendError):
            # Raised here, outside any except block, so that its __context__
            # does not keep aiosmtplib's exception (which may quote a secret).
            raise opened
        return opened

    @classmethod
    async def _open(cls, settings: SMTPSettings, secrets: list[str]) -> SMTPSession | SendError:
        """One attempt at :meth:`open`: the session, or why there is none."""
        token: str | None = None
        if settings.oauth2_token is not None and settings.username is not None:
            # Asked before connecting: no connection idles while a provider
            # talks to its identity service.
            current = await _current_token(settings, secrets)
            if isinstance(current, SendError):
                return current
            token = current
            secrets.extend(_token_forms(settings.username, token))
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
        client = _LoggingSMTP(secrets, **options) if settings.debug else _SMTP(**options)
        try:
            await client.connect()
            if settings.username is not None and token is not None:
                await _login_xoauth2(client, settings, settings.username, token)
            elif settings.username is not None:
                await client.login(settings.username, settings.password or "")
        except Exception as err:
            client.close()
            error = err if isinstance(err, SendError) else _wrap(err, settings, secrets)
        except BaseException:
            client.close()
            raise
        else:
            return cls(settings, client, secrets)
        await client.wait_closed(settings.timeout)
        return error

    @property
    def is_connected(self) -> bool:
        return self._client.is_connected

    async def send(self, envelope: Envelope, deadline: float = math.inf) -> SendResult:
        """Send one message; the result lists the recipients the server
        refused, each with its ``(code, text)``, when it took the others.
        Each transaction passes :attr:`gate` first, which may wait until
        *deadline* (a loop time: the message's ``MAIL_DELIVERY_TIMEOUT``).

        Recipients refused with "too many recipients" (452, or the enhanced
        code X.5.3) get the same message, same Message-ID, in further
        transactions of this session, as RFC 5321 4.5.3.1.10 asks.

        Raises :class:`~quartmail.errors.RecipientsRefusedError` when it refused
        them all, another :class:`~quartmail.errors.SendError` on any other
        failure. After a failure that leaves the session unusable (see
        :func:`_spends_session`) or a cancellation, the session is closed:
        check :attr:`is_connected` before sending again.
        """
        refused: dict[str, Reply] = {}
        recipients = list(envelope.recipients)
        first = True
        while recipients:
            try:
                rejected = await self._transaction(envelope, recipients, deadline)
            except SendError as error:
                if first:
                    raise
                # The message already went to the recipients of an earlier
                # transaction: resending it all would duplicate it, so these
                # are reported refused with what ended the session (421 when
                # the connection itself failed, as a server closing it would).
                reply = (error.code or 421, str(error))
                if isinstance(error, RecipientsRefusedError):
                    refused.update(error.refused)
                else:
                    refused.update(dict.fromkeys(recipients, reply))
                break
            first = False
            over = [address for address, reply in rejected.items() if _too_many(reply)]
            refused.update(
                (address, reply) for address, reply in rejected.items() if address not in over
            )
            if len(over) == len(recipients):  # no progress: report, do not loop
                refused.update((address, rejected[address]) for address in over)
                break
            recipients = over
        self.sent += 1
        return SendResult(message_id=envelope.message_id, refused=refused)

    async def _transaction(
        self, envelope: Envelope, recipients: list[str], deadline: float
    ) -> dict[str, Reply]:
        """One MAIL, RCPT..., DATA transaction; returns the refused recipients."""
        # The one place every transaction of every path starts (the 452 split included).
        async with self.gate(deadline):
            try:
                refused = await self._send(envelope, recipients)
            except asyncio.CancelledError:
                # Cancelled mid-command: aiosmtplib's protocol is out of step
                # with the server and would pair the next reply with the wrong
                # command, so the session must never be used again.
                self.abort()
                raise
            except Exception as err:
                error = _wrap(err, self.settings, self._secrets)
            else:
                return {address: (reply.code, reply.message) for address, reply in refused.items()}
            if _spends_session(error):
                self.abort()
            raise error  # outside the except block: no __context__ (see open)

    async def _send(
        self, envelope: Envelope, recipients: list[str]
    ) -> dict[str, aiosmtplib.SMTPResponse]:
        """aiosmtplib's sendmail, or, when the server advertises PIPELINING and
        MAIL_PIPELINING allows it, the whole envelope in one write (and the
        message too, as BDAT, when it also advertises CHUNKING)."""
        client = self._client
        if self.settings.pipelining and client.is_ehlo_or_helo_needed:
            # The extensions are known after EHLO, which aiosmtplib leaves to sendmail
            # on a plain connection without AUTH: the same step, taken first.
            await client._ehlo_or_helo_if_needed()
        if not (self.settings.pipelining and client.supports_extension("pipelining")):
            refused, _ = await client.sendmail(
                envelope.sender,
                recipients,
                envelope.data,
                mail_options=envelope.mail_options,
                rcpt_options=envelope.rcpt_options,
            )
            return refused
        chunking = client.supports_extension("chunking")
        if self.settings.debug:
            verb = "BDAT" if chunking else "DATA"
            log.debug(">>> MAIL, %d RCPT, %s (pipelined)", len(recipients), verb)
        return await send_pipelined(
            client,
            envelope.sender,
            recipients,
            envelope.data,
            mail_options=envelope.mail_options,
            rcpt_options=envelope.rcpt_options,
            chunking=chunking,
            on_replies=self._log_replies if self.settings.debug else None,
        )

    def _log_replies(self, replies: list[aiosmtplib.SMTPResponse]) -> None:
        for reply in replies:
            log.debug("<<< %s %s", reply.code, self.settings.redact(reply.message))

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


@contextlib.asynccontextmanager
async def _no_gate(deadline: float) -> AsyncIterator[None]:
    yield


def _spends_session(error: SendError) -> bool:
    """After this failure, can the session carry another message?

    aiosmtplib resets the transaction after an error reply, but a 421 reply
    to DATA leaves it connected while real servers hang up (RFC 5321), and a
    timeout leaves the protocol out of step.
    """
    return error.code == 421 or isinstance(error, ConnectError | SendTimeoutError)


def _too_many(reply: Reply) -> bool:
    """Is this RCPT refusal "too many recipients, send the rest in another
    transaction"? RFC 5321 4.5.3.1.10 gives it the code 452 (and asks
    clients to read a 552 of RFC 821's day the same way); RFC 3463 gives
    it the enhanced code X.5.3."""
    code, text = reply
    return code == 452 or (code == 552 and text.startswith(("4.5.3", "5.5.3")))


async def _current_token(settings: SMTPSettings, secrets: Sequence[str]) -> str | SendError:
    """MAIL_OAUTH2_TOKEN's token: the string, or what the callable returns
    for MAIL_USERNAME within MAIL_TIMEOUT. An async callable runs in the event
    loop; a plain one in a thread, as it may block (msal and google-auth
    fetch tokens over blocking HTTP)."""
    provider = settings.oauth2_token
    if isinstance(provider, str) or provider is None:
        return provider or ""
    user = settings.username or ""
    name = f"MAIL_OAUTH2_TOKEN ({getattr(provider, '__qualname__', type(provider).__name__)})"
    try:
        async with asyncio.timeout(settings.timeout) as deadline:
            if inspect.iscoroutinefunction(provider):
                result: object = await provider(user)
            else:
                result = await asyncio.to_thread(provider, user)
                if inspect.isawaitable(result):  # a plain callable that returns a coroutine
                    result = await result
    except Exception as err:
        if isinstance(err, TimeoutError) and deadline.expired():
            return SendTimeoutError(
                f"{name} returned no token within {settings.timeout:g} s (MAIL_TIMEOUT)"
            )
        error = AuthenticationError(
            _redact(f"{name} failed for {user!r}: {type(err).__name__}: {err}", secrets)
        )
        error.__cause__ = _scrubbed(err, secrets)
        error.__suppress_context__ = True
        return error
    if not isinstance(result, str):
        # msal returns a dict: its "access_token" is the token.
        hint = ' (msal: return result["access_token"])' if isinstance(result, dict) else ""
        return AuthenticationError(
            f"{name} returned a {type(result).__name__}, not an access token (a str){hint}"
        )
    problem = token_problem(result)
    if problem is not None:
        return AuthenticationError(f"{name} returned {problem}")
    return result


async def _login_xoauth2(client: _SMTP, settings: SMTPSettings, user: str, token: str) -> None:
    """AUTH XOAUTH2 with *token* for *user*, as Google and Microsoft define it.

    aiosmtplib's ``auth_xoauth2`` sends the base64 of ``user=...\\x01auth=Bearer
    ...\\x01\\x01`` and, when the server answers a bad token with a 334 error
    challenge (Gmail does: base64 JSON), the empty line that gets the final 535.
    Its ``oauth_token_generator`` option is not used: it takes no user name and
    is never asked again after a refusal.
    """
    if client.is_ehlo_or_helo_needed:
        await client.ehlo()
    if "xoauth2" not in client.server_auth_methods:
        offered = " ".join(client.server_auth_methods).upper() or "no AUTH mechanism"
        raise AuthenticationError(
            f"SMTP server {settings.address} does not offer AUTH XOAUTH2, which "
            f"MAIL_OAUTH2_TOKEN needs (it offers {offered})"
        )
    await client.auth_xoauth2(user, token)


def _wrap(err: Exception, settings: SMTPSettings, secrets: Sequence[str]) -> SendError:
    """Turn an aiosmtplib or OS error into ours: a text free of *secrets*, and
    as ``__cause__`` the original, or a copy of it with the secrets masked
    wherever they appear (a server may quote the AUTH line in its reply)."""
    error = _translate(err, settings, lambda text: _redact(text, secrets))
    error.__cause__ = _scrubbed(err, secrets)
    error.__suppress_context__ = True
    return error


def _translate(err: Exception, settings: SMTPSettings, mask: Callable[[str], str]) -> SendError:
    where = f"SMTP server {settings.address}"
    if isinstance(err, aiosmtplib.SMTPRecipientsRefused):
        refused = {e.recipient: (e.code, e.message) for e in err.recipients}
        return RecipientsRefusedError(
            mask(f"{where} refused every recipient: {_replies(refused)}"),
            # The last refusal's code, as for any other reply.
            code=err.recipients[-1].code if err.recipients else None,
            refused=refused,
        )
    if isinstance(err, aiosmtplib.SMTPResponseException) and _code(err) is None:
        # Not SMTP at all (a garbage greeting or EHLO reply, an over-long
        # line; aiosmtplib says code -1): a broken connection, worth a retry.
        return ConnectError(mask(f"{where} sent a malformed reply: {err.message}"))
    if isinstance(err, aiosmtplib.SMTPAuthenticationError):
        return AuthenticationError(
            mask(f"{where} refused the login for {settings.username!r}: {err.code} {err.message}"),
            code=err.code,
        )
    if isinstance(err, aiosmtplib.SMTPConnectResponseError):
        # A refusal at the greeting (421 at a connection limit): a fact
        # about the server, not about a message.
        return ConnectError(
            mask(f"{where} refused the connection: {err.code} {err.message}"), code=err.code
        )
    if isinstance(err, aiosmtplib.SMTPResponseException):
        return SendError(
            mask(f"{where} replied {err.code} {err.message}"),
            code=err.code,
            reply=mask(err.message),
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
        return ConnectError(mask(f"{where}: {_text(err)}"))
    if isinstance(err, aiosmtplib.SMTPException):
        message = _text(err)
        if settings.use_tls and "STARTTLS" in message.upper():
            message = f"MAIL_USE_TLS requires STARTTLS, which the server does not offer ({message})"
        return SendError(mask(f"{where}: {message}"))
    return SendError(mask(f"{where}: {type(err).__name__}: {err}"))


def _code(err: aiosmtplib.SMTPResponseException) -> int | None:
    """The reply code, or None when the reply had none (aiosmtplib: -1)."""
    return err.code if 200 <= err.code <= 599 else None


def _text(err: Exception) -> str:
    if isinstance(err, aiosmtplib.SMTPException):
        return err.message
    return str(err) or type(err).__name__


def _replies(refused: dict[str, Reply]) -> str:
    return "; ".join(f"{address}: {code} {text}" for address, (code, text) in refused.items())


# A secret shorter than this is masked only where it stands alone: a short
# string inside a longer word is likely a coincidence ("p" in "supported"),
# and masking it there would point at it.
_SHORT_SECRET = 8
_MASK = "****"


def _redact(text: str, secrets: Sequence[str]) -> str:
    """*text* with each of *secrets* replaced by ``****`` (see _SHORT_SECRET)."""
    for secret in sorted(secrets, key=len, reverse=True):  # "pw" inside its base64 form
        if len(secret) >= _SHORT_SECRET:
            text = text.replace(secret, _MASK)
        elif secret in text:
            alone = rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])"
            text = re.sub(alone, _MASK, text)
    return text


def _scrubbed(err: BaseException | None, secrets: Sequence[str], depth: int = 0) -> Any:
    """*err*, or, when it or any exception chained to it reveals one of
    *secrets*, a copy of it with its texts masked and its chain scrubbed."""
    if err is None or not secrets:
        return err
    if depth > 20:  # a chain this long is a cycle: cut it
        return None
    cause = _scrubbed(err.__cause__, secrets, depth + 1)
    context = _scrubbed(err.__context__, secrets, depth + 1)
    texts = [str(err), repr(err), *_strings(err)]
    unchanged = cause is err.__cause__ and context is err.__context__
    if unchanged and all(_redact(text, secrets) == text for text in texts):
        return err
    try:
        clean = copy.copy(err)
        clean.args = tuple(_masked(arg, secrets) for arg in err.args)
        for name, value in vars(err).items():
            setattr(clean, name, _masked(value, secrets))
    except Exception:  # an exception type copy cannot rebuild
        clean = RuntimeError(f"{type(err).__name__}: {_redact(str(err), secrets)}")
    clean.__cause__ = cause
    clean.__context__ = context
    clean.__suppress_context__ = err.__suppress_context__
    clean.__traceback__ = err.__traceback__
    return clean


def _strings(err: BaseException) -> list[str]:
    found: list[str] = []
    for value in [*err.args, *vars(err).values()]:
        values = value if isinstance(value, list | tuple) else [value]
        found.extend(item if isinstance(item, str) else repr(item) for item in values)
    return found


def _masked(value: Any, secrets: Sequence[str]) -> Any:
    if isinstance(value, str):
        return _redact(value, secrets)
    if isinstance(value, list):
        return [_masked(item, secrets) for item in value]
    return value


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

    async def _create_connection(
        self,
        timeout: float | None,  # noqa: ASYNC109 (aiosmtplib's signature)
    ) -> aiosmtplib.SMTPResponse:
        response = await super()._create_connection(timeout)
        if self.protocol is not None:
            PipeliningProtocol.adopt(self.protocol)  # for PIPELINING (quartmail.pipelining)
        return response

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
            shown = "****" if any(args) else ""  # an empty line answers an error challenge
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
        return _redact(text, self.secrets)
