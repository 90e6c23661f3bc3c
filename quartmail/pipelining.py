"""One mail transaction in one write: PIPELINING (RFC 2920) and CHUNKING (RFC 3030).

aiosmtplib waits for each reply before the next command, four round trips or more
per message. When the server advertises PIPELINING, :func:`send_pipelined` writes
MAIL FROM, every RCPT TO and DATA at once and reads the replies in order; when it
also advertises CHUNKING, the message follows as ``BDAT <n> LAST`` in the same
write, one round trip per message, as Postfix's client does.

It builds on aiosmtplib: its protocol's reply parser, command lock, TLS and
timeouts. It raises what :meth:`aiosmtplib.SMTP.sendmail` raises in the same
situations, so the caller handles both alike.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import Callable, Sequence

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_RESPONSE_LENGTH,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)
from aiosmtplib.response import SMTPResponse

__all__ = ["PipeliningProtocol", "send_pipelined"]

_DISCONNECTED = (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError)

# aiosmtplib's own, which parses the address again with the email package
# (~30 us a call); a pure function of the string, and senders and recipients repeat.
_quote_address = functools.lru_cache(maxsize=1024)(quote_address)


class PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol, able to read several replies that arrive together.

    aiosmtplib's own ``data_received`` parses one reply per command and drops
    what comes while no command waits: with pipelined commands the later
    replies would be lost. While :meth:`read_replies` runs, every complete
    reply is kept, in order. Outside it the protocol behaves as aiosmtplib's.
    """

    # None outside a pipelined group; a class attribute so that an SMTPProtocol
    # adopted by :meth:`adopt` needs no constructor run.
    _queued: collections.deque[SMTPResponse] | None = None

    @classmethod
    def adopt(cls, protocol: SMTPProtocol) -> PipeliningProtocol:
        """Make aiosmtplib's live protocol object one of these.

        aiosmtplib builds its ``SMTPProtocol`` inside ``_create_connection``,
        with no factory to override; this subclass adds methods and one
        attribute with a class default, so changing the class of the live
        object keeps all its state.
        """
        protocol.__class__ = cls
        return protocol  # type: ignore[return-value]

    def data_received(self, data: bytes) -> None:
        queued = self._queued
        if queued is None or self._response_waiter is None:
            super().data_received(data)
            return
        self._buffer.extend(data)
        try:
            while (reply := self._read_response_from_buffer()) is not None:
                queued.append(reply)
            if len(self._buffer) > MAX_RESPONSE_LENGTH:
                raise aiosmtplib.SMTPResponseException(-1, "Response too long")
        except Exception as exc:
            del self._buffer[:]
            if not self._response_waiter.done():
                self._set_response_exception(self._response_waiter, exc)
            return
        # Hand the oldest reply to a reader waiting on aiosmtplib's future.
        if queued and not self._response_waiter.done():
            self._response_waiter.set_result(queued.popleft())

    async def read_replies(
        self,
        group: bytes,
        count: int,
        timeout: float | None,  # noqa: ASYNC109 (aiosmtplib's per-reply timeout)
    ) -> list[SMTPResponse]:
        """Write *group* (several commands) and read up to *count* replies in order.

        Stops early, after the reply that ends the session (421, RFC 5321
        3.8): the server closes the connection and sends nothing more.
        """
        if self._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        replies: list[SMTPResponse] = []
        async with self._command_lock:
            self._queued = collections.deque()
            try:
                self._response_pending = True
                self.write(group)
                while len(replies) < count:
                    replies.append(await self._next_reply(timeout))
                    if replies[-1].code == 421:
                        break
            finally:
                self._queued = None
                self._response_pending = False
        return replies

    async def _next_reply(self, timeout: float | None) -> SMTPResponse:  # noqa: ASYNC109
        waiter, queued = self._response_waiter, self._queued
        # A reply already handed to the future comes before the queued ones; those
        # still count after the connection closed (a 421, then the server hangs up).
        if queued and (waiter is None or not waiter.done()):
            return queued.popleft()
        if waiter is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        # aiosmtplib's read_response, without asyncio.wait_for: one timer,
        # and one loop step less per reply (each message waits for one or more).
        self._response_pending = True
        timer = None
        if timeout is not None and not waiter.done():
            timer = self._loop.call_later(timeout, self._timed_out, waiter)
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._response_pending = False
            self._response_waiter = None if self.transport is None else self._loop.create_future()

    def _timed_out(self, waiter: asyncio.Future[SMTPResponse]) -> None:
        if not waiter.done():
            error = aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response")
            self._set_response_exception(waiter, error)


async def send_pipelined(
    client: aiosmtplib.SMTP,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    *,
    mail_options: Sequence[str] = (),
    rcpt_options: Sequence[str] = (),
    chunking: bool = False,
    on_replies: Callable[[list[SMTPResponse]], None] | None = None,
) -> dict[str, SMTPResponse]:
    """One transaction, MAIL FROM to DATA (or ``BDAT <n> LAST``) in one write.

    The client must be connected, past EHLO, to a server that advertises
    PIPELINING (and CHUNKING, for *chunking*). Returns the refused recipients
    with their replies; raises as :meth:`aiosmtplib.SMTP.sendmail` does:
    ``SMTPSenderRefused``, ``SMTPRecipientsRefused`` (all refused),
    ``SMTPDataError``, ``SMTPResponseException`` (a 421), ``SMTPServerDisconnected``
    or a timeout, after which the client is closed. *on_replies* sees each group's replies
    (MAIL_DEBUG logs them).
    """
    connected = client.protocol
    if not isinstance(connected, PipeliningProtocol):
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    protocol: PipeliningProtocol = connected
    timeout = client.timeout

    async def exchange(group: bytes, count: int) -> list[SMTPResponse]:
        replies = await protocol.read_replies(group, count, timeout)
        if on_replies is not None:
            on_replies(replies)
        return replies

    options = list(mail_options)
    encoding = "utf-8" if any(o.upper() == "SMTPUTF8" for o in options) else "ascii"
    data = message if _crlf_only(message) else normalize_message_line_endings(message)
    if client.supports_extension("size"):
        # RFC 1870: the octets as transmitted; BDAT sends exactly these.
        options.insert(0, f"SIZE={len(data)}")
    commands = [_command(b"MAIL", b"FROM:" + _quote_address(sender).encode(encoding), options)]
    commands += [
        _command(b"RCPT", b"TO:" + _quote_address(rcpt).encode(encoding), rcpt_options)
        for rcpt in recipients
    ]
    # RFC 3030 2: BDAT carries the octets as they are, no dot-stuffing, no
    # final ".", and may end a pipelined group (RFC 3030 4.2) with the data.
    last = b"BDAT %d LAST\r\n" % len(data) + data if chunking else b"DATA\r\n"
    try:
        replies = await exchange(b"".join(commands) + last, len(commands) + 1)
        try:
            refused = _check_envelope(replies, sender, recipients)
        except aiosmtplib.SMTPException:
            if not chunking and replies[-1].code == 354:
                # RFC 2920 3.1: DATA accepted with no valid recipient. The server
                # waits for a message: a lone "." ends it, as Postfix does.
                [ended] = await exchange(b".\r\n", 1)
                _check_421(ended)
            raise
        final = replies[-1]
        if chunking:
            if final.code != 250:
                raise aiosmtplib.SMTPDataError(final.code, final.message)
        elif final.code != 354:
            raise aiosmtplib.SMTPDataError(final.code, final.message)
        else:
            stuffed = PERIOD_REGEX.sub(b"..", data) + b".\r\n"
            [final] = await exchange(stuffed, 1)
            _check_421(final)
            if final.code != 250:
                raise aiosmtplib.SMTPDataError(final.code, final.message)
    except _DISCONNECTED:
        client.close()  # the protocol is out of step with the server
        raise
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused) as error:
        if getattr(error, "code", None) == 421:
            client.close()
        elif client.is_connected:
            await _reset(client)
        raise
    return refused


def _crlf_only(message: bytes) -> bool:
    """Whether every line of *message* already ends in CRLF, as quartmail's
    envelopes do: then aiosmtplib's normalizing regex would copy it unchanged
    (three counts in C cost a fifth of that)."""
    crlf = message.count(b"\r\n")
    return message.endswith(b"\r\n") and message.count(b"\n") == crlf == message.count(b"\r")


def _command(verb: bytes, argument: bytes, options: Sequence[str]) -> bytes:
    args = [verb, argument, *(option.encode("ascii") for option in options)]
    for arg in args:  # as aiosmtplib's execute_command: no CR, LF or NUL smuggled in
        if COMMAND_INJECTION_REGEX.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(args) + b"\r\n"


def _check_421(reply: SMTPResponse) -> None:
    if reply.code == 421:
        raise aiosmtplib.SMTPResponseException(reply.code, reply.message)


def _check_envelope(
    replies: list[SMTPResponse], sender: str, recipients: Sequence[str]
) -> dict[str, SMTPResponse]:
    """The refused recipients, or the error the envelope's replies call for.

    RFC 2920 3.1: the client reads every reply of the group in order and
    judges each command by its own reply; a 421 anywhere ends the session.
    """
    for reply in replies:
        _check_421(reply)
    mail, rcpts = replies[0], replies[1:-1]
    if mail.code != 250:
        raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, sender)
    refused = [
        aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, rcpt)
        for rcpt, reply in zip(recipients, rcpts, strict=True)
        if reply.code not in (250, 251)
    ]
    if len(refused) == len(recipients):
        raise aiosmtplib.SMTPRecipientsRefused(refused)
    return {error.recipient: SMTPResponse(error.code, error.message) for error in refused}


async def _reset(client: aiosmtplib.SMTP) -> None:
    """End a failed transaction; RSET, as aiosmtplib's sendmail does."""
    # The original error is what the caller needs to hear.
    with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
        await client.rset()
