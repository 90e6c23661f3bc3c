"""Messages: Flask-Mail's :class:`Message` and :class:`Attachment`, and how
they become the exact bytes put on the wire.

This module knows nothing of SMTP or Quart. :meth:`Message.envelope` checks a
message and flattens it into an :class:`Envelope`: the envelope sender, every
recipient (To, Cc and Bcc) and the RFC 5322 bytes, which carry a Message-ID, a
Date and MIME-Version, RFC 2047-encoded headers, RFC 2231 file names, no
``Bcc:`` header, no ``>From`` mangling, and only 7-bit-safe transfer
encodings, so that no line exceeds 998 octets and any server accepts them.

Every header value passes one check (:func:`~quartmail.addresses.check_header_value`)
and the top-level headers are written by one writer (:mod:`quartmail.mime`),
whether the body is written directly or by the email package (attachments,
another charset: :mod:`quartmail.attachments`), so both give the same bytes
for the same input.
"""

from __future__ import annotations

import codecs
import functools
import math
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import make_msgid
from typing import Protocol, TypeVar

from quart import current_app, has_app_context

from . import mime
from .addresses import (
    AddressLike,
    Mailbox,
    check_header_value,
    format_address,
    parse_address,
    parse_addresses,
)
from .attachments import (
    TOKEN,
    Attachment,
    check_attachment,
    check_field_name,
    check_text,
    mime_body,
)
from .errors import MessageError
from .listunsubscribe import list_unsubscribe_headers

__all__ = ["Attachment", "Envelope", "Message"]

# RFC 5322 3.6.4: "<" id-left "@" id-right ">", printable ASCII.
_MSG_ID = re.compile(r"<[!-;=?A-~]+@[!-;=?A-~]+>")
# RFC 5321 4.1.2: esmtp-keyword ["=" esmtp-value].
_ESMTP_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(=[!-<>-~]+)?")


@dataclass(frozen=True, slots=True)
class Envelope:
    """A checked, flattened message, ready for SMTP.

    ``data`` are the exact bytes sent after DATA; ``sender`` and
    ``recipients`` are the bare envelope addresses (Bcc included).
    """

    sender: str
    recipients: list[str]
    data: bytes
    message_id: str
    mail_options: list[str] = field(default_factory=list)
    rcpt_options: list[str] = field(default_factory=list)
    #: Message(transactional=True): sent to recipients who only unsubscribed.
    transactional: bool = False

    def without(self, recipients: Iterable[str]) -> Envelope:
        """This envelope without *recipients* (the bytes stay as they are)."""
        left_out = set(recipients)
        return replace(self, recipients=[r for r in self.recipients if r not in left_out])

    def with_sender(self, value: AddressLike) -> Envelope:
        """This envelope with another envelope sender (Flask-Mail's
        ``envelope_from``), checked like any address."""
        mailbox = parse_address(value, "envelope_from")
        options = self.mail_options
        if mailbox.needs_smtputf8 and "SMTPUTF8" not in (option.upper() for option in options):
            options = [*options, "SMTPUTF8"]
        return replace(self, sender=mailbox.addr, mail_options=list(options))


class _AppMail(Protocol):
    """What a message reads from the current app's ``app.extensions["mail"]``."""

    @property
    def default_sender(self) -> AddressLike | None: ...

    @property
    def ascii_attachments(self) -> bool: ...


_Result = TypeVar("_Result", covariant=True)


class _Sender(Protocol[_Result]):
    """A :class:`~quartmail.Connection`, as far as a message needs to know."""

    async def send(self, message: Message) -> _Result: ...


class Message:
    """An e-mail message, as in Flask-Mail.

    ::

        msg = Message("Hello", sender=("Me", "me@example.com"), recipients=["you@example.com"])
        msg.body = "text"
        msg.html = "<b>HTML</b>"
        msg.attach("report.pdf", "application/pdf", pdf_bytes)

    Addresses may be ``"a@x.org"``, ``"Name <a@x.org>"`` or ``("Name", "a@x.org")``;
    a ``(name, address)`` sender reads back as ``"name <address>"``, as in
    Flask-Mail. Without a sender, a message made in an app context takes the
    app's ``MAIL_DEFAULT_SENDER`` at once, any other when it is sent.
    ``alts`` maps MIME subtypes to more alternatives (``{"json": ...}``);
    ``html`` is ``alts["html"]``. ``date`` is a Unix timestamp or an aware
    datetime; it is set when the message is sent if it is None.
    ``list_unsubscribe`` (keyword only; not in Flask-Mail) is an https or
    mailto URL, or a list of them (one https at most), written as the
    ``List-Unsubscribe`` header (RFC 2369) and, when an https URL is given,
    ``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` (RFC 8058).
    ``transactional=True`` (keyword only) marks mail the recipient needs, such
    as a password reset: the suppression list's unsubscribes do not stop it.
    Nothing is checked until the message is sent (or :meth:`envelope` is
    called), so a message can be built up step by step.
    """

    def __init__(
        self,
        subject: str | None = "",
        recipients: Sequence[AddressLike] | AddressLike | None = None,
        body: str | None = None,
        html: str | None = None,
        alts: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        sender: AddressLike | None = None,
        cc: Sequence[AddressLike] | AddressLike | None = None,
        bcc: Sequence[AddressLike] | AddressLike | None = None,
        attachments: list[Attachment] | None = None,
        reply_to: AddressLike | None = None,
        date: float | datetime | None = None,
        charset: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
        mail_options: Sequence[str] | None = None,
        rcpt_options: Sequence[str] | None = None,
        *,
        list_unsubscribe: str | Sequence[str] | None = None,
        transactional: bool = False,
    ) -> None:
        self.subject = subject
        self.recipients: list[AddressLike] = _as_list(recipients)
        self.body = body
        self.alts: dict[str, str] = dict(alts or {})
        if html is not None:  # html=None keeps an alts["html"] (Flask-Mail would drop it)
            self.html = html
        self._sender_pair: tuple[str, str] | None = None
        self._sender: str | None = None
        # Flask-Mail takes the default sender here, so it shows on the message at once.
        state = _app_mail()
        self.sender = sender if sender is not None or state is None else state.default_sender
        self.cc: list[AddressLike] = _as_list(cc)
        self.bcc: list[AddressLike] = _as_list(bcc)
        self.attachments: list[Attachment] = list(attachments or [])
        self.reply_to = reply_to
        self.date = date
        self.charset = charset
        self.extra_headers: dict[str, str] = dict(extra_headers or {})
        self.mail_options: list[str] = list(mail_options or [])
        self.rcpt_options: list[str] = list(rcpt_options or [])
        self.list_unsubscribe: str | Sequence[str] | None = list_unsubscribe
        if isinstance(list_unsubscribe, list | tuple):
            self.list_unsubscribe = list(list_unsubscribe)  # a copy, as of the address lists
        #: Mail the recipient needs (a password reset): the suppression list's
        #: unsubscribes do not stop it (its bounces do). Never a header.
        self.transactional = transactional
        self._msg_id: str | None = None
        # (flattened, signed): see set_signed.
        self._signed: tuple[bytes, bytes] | None = None
        self._boundary_key: str | None = None  # kept, so flattening again gives the same bytes

    def __repr__(self) -> str:
        return (
            f"<Message {self.subject!r} from {self.sender!r} "
            f"to {len(self.send_recipients)} recipient(s)>"
        )

    def __str__(self) -> str:
        return self.as_string()

    def __bytes__(self) -> bytes:
        return self.as_bytes()

    @property
    def sender(self) -> str | None:
        """The sender as Flask-Mail shows it: a ``(name, address)`` pair
        reads back as the string ``"name <address>"``."""
        return self._sender

    @sender.setter
    def sender(self, value: AddressLike | None) -> None:
        if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value):
            # The pair itself is what is sent, so that the name goes on the
            # wire exactly as given, whatever it holds.
            self._sender_pair = value
            self._sender = format_address(value[0].strip(), value[1].strip())
        else:
            self._sender_pair = None
            self._sender = value  # type: ignore[assignment]  # anything else fails when checked

    def _sender_value(self) -> AddressLike | None:
        return self._sender_pair if self._sender_pair is not None else self._sender

    @property
    def html(self) -> str | None:
        """The HTML alternative: ``alts["html"]``, as in Flask-Mail."""
        return self.alts.get("html")

    @html.setter
    def html(self, value: str | None) -> None:
        if value is None:
            self.alts.pop("html", None)
        else:
            self.alts["html"] = value

    @property
    def msg_id(self) -> str:
        """The ``Message-ID``, made on first use and then kept, so that a
        message sent again (a retry, the outbox) keeps the same one."""
        if self._msg_id is None:
            domain = "localhost"
            sender = self._sender_value()
            if sender is not None:
                domain = parse_address(sender, "sender").domain
            self._msg_id = make_msgid(domain=domain)
        return self._msg_id

    @msg_id.setter
    def msg_id(self, value: str) -> None:
        check_header_value("msg_id", value)
        if not _MSG_ID.fullmatch(value) or len(value) > 900:
            raise MessageError(f"msg_id must look like <id@domain> in printable ASCII: {value!r}")
        self._msg_id = value

    #: Flask-Mail's spelling.
    msgId = msg_id  # noqa: N815

    @property
    def send_recipients(self) -> list[AddressLike]:
        """Everyone the message goes to: To, then Cc, then Bcc."""
        return [*self.recipients, *self.cc, *self.bcc]

    @property
    def send_to(self) -> set[AddressLike]:
        """Flask-Mail's set of everyone the message goes to (To, Cc and Bcc);
        the envelope has each mailbox once."""
        return set(self.send_recipients)

    async def send(self, connection: _Sender[_Result]) -> _Result:
        """Flask-Mail's ``message.send(connection)``: ``await connection.send(message)``."""
        return await connection.send(self)

    def add_recipient(self, recipient: AddressLike) -> None:
        """Add a To recipient."""
        self.recipients.append(recipient)

    def attach(
        self,
        filename: str | None = None,
        content_type: str | None = None,
        data: bytes | str | None = None,
        disposition: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Attach a file; see :class:`Attachment`."""
        self.attachments.append(Attachment(filename, content_type, data, disposition, headers))

    def has_bad_headers(self) -> bool:
        """True if any header would carry CR or LF (Flask-Mail's check)."""
        try:
            self._check_headers()
        except MessageError:
            return True
        return False

    def envelope(
        self, default_sender: AddressLike | None = None, *, ascii_attachments: bool = False
    ) -> Envelope:
        """Check the message and flatten it for sending.

        Raises :class:`~quartmail.BadHeaderError` for CR/LF in a header and
        :class:`~quartmail.MessageError` when there is no sender, no
        recipient or a malformed address; in either case nothing is sent.
        """
        lists = self._check_headers()
        sender_value = self._sender_value()
        sender_value = sender_value if sender_value is not None else default_sender
        if sender_value is None:
            raise MessageError("The message has no sender: pass sender= or set MAIL_DEFAULT_SENDER")
        sender = parse_address(sender_value, "sender")
        to = parse_addresses(self.recipients, "recipients")
        cc = parse_addresses(self.cc, "cc")
        bcc = parse_addresses(self.bcc, "bcc")
        if not (to or cc or bcc):
            raise MessageError("The message has no recipients (recipients, cc and bcc are empty)")
        reply_to = parse_address(self.reply_to, "reply_to") if self.reply_to is not None else None
        date = _as_datetime(self.date)
        charset = self._checked_charset()
        if self._msg_id is None:
            self._msg_id = make_msgid(domain=sender.domain)

        everyone = [sender, *to, *cc, *bcc]
        utf8 = any(mailbox.needs_smtputf8 for mailbox in everyone)
        headers = _Headers(
            sender, to, cc, reply_to, self.subject, date, self._msg_id, self.extra_headers, lists
        )
        data = headers.lines() + self._flatten_body(charset, ascii_attachments)
        mail_options = list(self.mail_options)
        if utf8 and "SMTPUTF8" not in (option.upper() for option in mail_options):
            mail_options.append("SMTPUTF8")
        return Envelope(
            sender=sender.addr,
            recipients=_unique([*to, *cc, *bcc]),
            data=data,
            message_id=self._msg_id,
            mail_options=mail_options,
            rcpt_options=list(self.rcpt_options),
            transactional=bool(self.transactional),
        )

    def as_bytes(self, default_sender: AddressLike | None = None) -> bytes:
        """The message as it goes on the wire (without the envelope): once
        it was sent, the very bytes sent. In an app context the app's
        ``MAIL_DEFAULT_SENDER`` and ``MAIL_ASCII_ATTACHMENTS`` apply."""
        state = _app_mail()
        if state is None:
            data = self.envelope(default_sender).data
        else:
            if default_sender is None:
                default_sender = state.default_sender
            data = self.envelope(default_sender, ascii_attachments=state.ascii_attachments).data
        if self._signed is not None and self._signed[0] == data:
            return self._signed[1]
        return data

    def set_signed(self, flattened: bytes, signed: bytes) -> None:
        """Record that the message, flattened to *flattened* (by
        :meth:`envelope`), goes out as *signed*: the same bytes with
        DKIM-Signature headers on top. ``Mail`` calls it when it signs (with
        ``MAIL_DKIM_KEY``); call it if you sign the bytes yourself.
        :meth:`as_bytes` then returns *signed* for as long as the message
        flattens to *flattened*; once it is changed, its new, unsigned bytes."""
        if not signed.endswith(flattened):
            raise MessageError("set_signed: the signed bytes must end with the flattened message")
        self._signed = (flattened, signed)

    def as_string(self, default_sender: AddressLike | None = None) -> str:
        """:meth:`as_bytes`, decoded; the bytes are ASCII unless an address needs SMTPUTF8."""
        return self.as_bytes(default_sender).decode("utf-8")

    def _check_headers(self) -> list[tuple[str, str]]:
        """Check every header value; return the List-Unsubscribe(-Post) headers."""
        if self.subject is not None:
            check_header_value("subject", self.subject)
        if self.body is not None:
            check_text("body", self.body)
        for subtype, text in self.alts.items():
            check_header_value("alts", subtype)
            if not TOKEN.fullmatch(subtype):
                raise MessageError(f"alts: {subtype!r} is not a MIME subtype")
            check_text("html" if subtype == "html" else f"alts[{subtype!r}]", text)
        for name, value in self.extra_headers.items():
            check_field_name("extra_headers", name)
            check_header_value(f"extra_headers[{name!r}]", value)
            if name.lower() == "mime-version" or name.lower().startswith("content-"):
                raise MessageError(
                    f"extra_headers cannot set {name}: the message's structure decides it"
                )
        lists = self._list_unsubscribe()
        for attachment in self.attachments:
            check_attachment(attachment)
        for field_name, address in (("sender", self._sender_value()), ("reply_to", self.reply_to)):
            _check_address_value(field_name, address)
        for field_name, addresses in (
            ("recipients", self.recipients),
            ("cc", self.cc),
            ("bcc", self.bcc),
        ):
            for address in addresses:
                _check_address_value(field_name, address)
        # ESMTP parameters go into the MAIL and RCPT commands: a line break
        # there would be a command of its own (RFC 5321 4.1.2 syntax).
        for field_name, options in (
            ("mail_options", self.mail_options),
            ("rcpt_options", self.rcpt_options),
        ):
            for option in options:
                check_header_value(field_name, option)
                if not _ESMTP_PARAM.fullmatch(option):
                    raise MessageError(f"{field_name}: {option!r} is not an ESMTP parameter")
        return lists

    def _list_unsubscribe(self) -> list[tuple[str, str]]:
        """The List-Unsubscribe(-Post) headers; raises for a URL they cannot carry."""
        if self.list_unsubscribe is None:
            return []
        lists = list_unsubscribe_headers(self.list_unsubscribe)
        for name in self.extra_headers:
            if name.lower() in {"list-unsubscribe", "list-unsubscribe-post"}:
                raise MessageError(
                    f"extra_headers sets {name} and list_unsubscribe is given: use one of them"
                )
        return lists

    def _texts(self) -> list[tuple[str, str]]:
        """The text alternatives, as (subtype, text): the body, then ``alts``
        in order. One alone is the whole message (an HTML-only message is one
        text/html part, not an empty text/plain beside it)."""
        texts = [("plain", self.body)] if self.body is not None else []
        return [*texts, *self.alts.items()] or [("plain", "")]

    def _checked_charset(self) -> str:
        """The bodies' charset, checked: known, ASCII-compatible (RFC 2046
        4.1.2: CRLF must mean a line break) and able to encode every body."""
        charset = self.charset or "utf-8"
        check_header_value("charset", charset)
        problem = _charset_problem(charset)
        if problem is not None:
            raise MessageError(problem)
        for subtype, text in self._texts():
            try:
                text.encode(charset)
            except UnicodeEncodeError as err:
                bad = err.object[err.start : err.end]
                raise MessageError(
                    f"text/{subtype}: charset {charset!r} cannot encode {bad!r}"
                ) from None
        return charset

    def _flatten_body(self, charset: str, ascii_attachments: bool) -> bytes:
        """MIME-Version, the body's headers and the body."""
        for _ in range(8):
            if self._boundary_key is None:
                self._boundary_key = secrets.token_hex(10)
            if not self.attachments and charset.lower() == "utf-8":
                body = self._fast_body(self._boundary_key)
            else:
                body = mime_body(
                    self._texts(), self.attachments, self._boundary_key, charset, ascii_attachments
                )
            if body is not None:
                return body
            self._boundary_key = None  # a part holds the boundary: take another
        raise MessageError("no MIME boundary could be found that no part contains")

    def _fast_body(self, key: str) -> bytes | None:
        """The common message, written directly (see :mod:`quartmail.mime`)."""
        parts = [mime.text_part(text, subtype) for subtype, text in self._texts()]
        if len(parts) == 1:
            return b"MIME-Version: 1.0\r\n" + parts[0]
        boundary = mime.boundary(key, 0)
        body = mime.multipart_alternative(parts, boundary)
        if not mime.boundary_intact(body, boundary, len(parts)):
            return None
        return b"MIME-Version: 1.0\r\n" + body


@dataclass(slots=True)  # (not frozen: one is made per message, and frozen fields cost)
class _Headers:
    """The top-level headers of a message, for either way of flattening it."""

    sender: Mailbox
    to: list[Mailbox]
    cc: list[Mailbox]
    reply_to: Mailbox | None
    subject: str | None
    date: datetime
    message_id: str
    extra: Mapping[str, str]
    lists: Sequence[tuple[str, str]] = ()  # List-Unsubscribe(-Post), checked

    def lines(self) -> bytes:
        """The headers, encoded and folded; extra headers replace ours."""
        replaced = {name.lower() for name in self.extra}
        lines: list[bytes] = []
        for name, mailboxes in (
            ("From", [self.sender]),
            ("To", self.to),
            ("Cc", self.cc),
            ("Reply-To", [self.reply_to] if self.reply_to is not None else []),
        ):
            if mailboxes and name.lower() not in replaced:
                lines.append(mime.address_header(name, mailboxes))
        if self.subject and "subject" not in replaced:  # none when empty, as in Flask-Mail
            lines.append(mime.text_header("Subject", self.subject))
        if "date" not in replaced:
            lines.append(mime.plain_header("Date", mime.date(self.date)))
        if "message-id" not in replaced:
            lines.append(mime.plain_header("Message-ID", self.message_id))
        for name, value in self.lists:
            # Checked ASCII URLs in <>: folded between them, never encoded (RFC 2369 section 2).
            lines.append(mime.text_header(name, value))
        for name, value in self.extra.items():
            lines.append(mime.text_header(name, value))
        return b"".join(lines)


def _app_mail() -> _AppMail | None:
    """The current app's mail state, when there is an app context with Mail
    (Flask-Mail reads its default sender and ASCII setting from there)."""
    if not has_app_context():
        return None
    state: _AppMail | None = current_app.extensions.get("mail")
    return state


def _as_list(addresses: Sequence[AddressLike] | AddressLike | None) -> list[AddressLike]:
    # One address on its own is a list of one, not a string to iterate.
    if addresses is None:
        return []
    if isinstance(addresses, str):
        return [addresses]
    return list(addresses)


def _check_address_value(field: str, value: AddressLike | None) -> None:
    # Not tuple(value): an int would raise TypeError; parse_address refuses it, naming it.
    parts: tuple[object, ...] = value if isinstance(value, tuple) else (value,)
    for part in parts:
        if isinstance(part, str):
            check_header_value(field, part)


@functools.lru_cache(maxsize=64)
def _charset_problem(charset: str) -> str | None:
    """Why *charset* cannot carry MIME text, or None. (A fact about the name:
    checked once per charset.)"""
    try:
        if not TOKEN.fullmatch(charset):
            raise LookupError(charset)
        codecs.lookup(charset)
    except LookupError:
        return f"charset: unknown charset {charset!r}"
    probe = "".join(map(chr, range(32, 127))) + "\t\r\n"
    try:
        ascii_compatible = probe.encode(charset) == probe.encode("ascii")
    except (UnicodeError, LookupError):
        ascii_compatible = False
    if not ascii_compatible:
        return f"charset: {charset!r} is not ASCII-compatible, as MIME text needs"
    return None


def _as_datetime(date: object) -> datetime:
    if date is None:
        return datetime.now(UTC).replace(microsecond=0)
    if isinstance(date, datetime):
        if date.tzinfo is None:
            raise MessageError("date must be timezone-aware (or a Unix timestamp)")
        value = date
    elif isinstance(date, int | float) and not isinstance(date, bool) and math.isfinite(date):
        try:
            value = datetime.fromtimestamp(date, UTC)
        except (OverflowError, OSError, ValueError):
            raise MessageError(f"date is out of range: {date!r}") from None
    else:
        raise MessageError(f"date must be a Unix timestamp or an aware datetime, got {date!r}")
    # RFC 5322 3.3: a four-digit year, 1900 or later.
    if not 1900 <= value.year <= 9999:
        raise MessageError(f"date is out of range: {date!r}")
    return value


def _unique(mailboxes: Iterable[Mailbox]) -> list[str]:
    # One RCPT per mailbox, even if it is both in To and in Bcc, whatever the
    # case of its domain (domains are case-insensitive, RFC 5321 2.4).
    first: dict[tuple[str, str], str] = {}
    for mailbox in mailboxes:
        first.setdefault(mailbox.key, mailbox.addr)
    return list(first.values())
