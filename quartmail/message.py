"""Messages: Flask-Mail's :class:`Message` and :class:`Attachment`, and how
they become the exact bytes put on the wire.

This module knows nothing of SMTP or Quart. :meth:`Message.envelope` checks a
message and flattens it into an :class:`Envelope`: the envelope sender, every
recipient (To, Cc and Bcc) and the RFC 5322 bytes, which carry a Message-ID, a
Date and MIME-Version, RFC 2047-encoded headers, RFC 2231 file names, no
``Bcc:`` header, no ``>From`` mangling, and only 7-bit-safe transfer
encodings, so that no line exceeds 998 octets and any server accepts them.
"""

from __future__ import annotations

import mimetypes
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import cast

from . import mime
from .addresses import AddressLike, Mailbox, check_header_value, parse_address, parse_addresses
from .errors import MessageError

__all__ = ["Attachment", "Envelope", "Message"]

# Never 8bit: bodies are 7bit when they are ASCII with short lines, otherwise
# quoted-printable or base64, so that a server without 8BITMIME takes them and
# no line runs past 998 octets. mangle_from_ is already off in these policies.
_POLICY = email_policy.SMTP.clone(cte_type="7bit")
_POLICY_UTF8 = email_policy.SMTPUTF8.clone(cte_type="7bit")

# RFC 5322 field names: printable ASCII but the colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+")


class Attachment:
    """A file attached to a :class:`Message`.

    ``content_type`` defaults to a guess from the file name;
    ``disposition`` is ``"attachment"`` unless given (``"inline"`` for an
    image the HTML shows, with a ``Content-ID`` in ``headers``).
    """

    def __init__(
        self,
        filename: str | None = None,
        content_type: str | None = None,
        data: bytes | str | None = None,
        disposition: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.filename = filename
        self.content_type = content_type or _guess_type(filename)
        self.data: bytes | str = b"" if data is None else data
        self.disposition = disposition or "attachment"
        self.headers: dict[str, str] = dict(headers or {})

    def __repr__(self) -> str:
        return (
            f"Attachment(filename={self.filename!r}, content_type={self.content_type!r}, "
            f"size={len(self.data)})"
        )


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


class Message:
    """An e-mail message, as in Flask-Mail.

    ::

        msg = Message("Hello", sender=("Me", "me@example.com"), recipients=["you@example.com"])
        msg.body = "text"
        msg.html = "<b>HTML</b>"
        msg.attach("report.pdf", "application/pdf", pdf_bytes)

    Addresses may be ``"a@x.org"``, ``"Name <a@x.org>"`` or ``("Name", "a@x.org")``.
    ``date`` is a Unix timestamp or an aware datetime (default: when sent).
    Nothing is checked until the message is sent (or :meth:`envelope` is
    called), so a message can be built up step by step.
    """

    def __init__(
        self,
        subject: str = "",
        recipients: Sequence[AddressLike] | AddressLike | None = None,
        body: str | None = None,
        html: str | None = None,
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
    ) -> None:
        self.subject = subject
        self.recipients: list[AddressLike] = _as_list(recipients)
        self.body = body
        self.html = html
        self.sender = sender
        self.cc: list[AddressLike] = _as_list(cc)
        self.bcc: list[AddressLike] = _as_list(bcc)
        self.attachments: list[Attachment] = list(attachments or [])
        self.reply_to = reply_to
        self.date = date
        self.charset = charset
        self.extra_headers: dict[str, str] = dict(extra_headers or {})
        self.mail_options: list[str] = list(mail_options or [])
        self.rcpt_options: list[str] = list(rcpt_options or [])
        self._msg_id: str | None = None

    def __repr__(self) -> str:
        return (
            f"<Message {self.subject!r} from {self.sender!r} "
            f"to {len(self.send_recipients)} recipient(s)>"
        )

    @property
    def msg_id(self) -> str:
        """The ``Message-ID``, made on first use and then kept, so that a
        message sent again (a retry, the outbox) keeps the same one."""
        if self._msg_id is None:
            domain = "localhost"
            if self.sender is not None:
                domain = parse_address(self.sender, "sender").domain
            self._msg_id = make_msgid(domain=domain)
        return self._msg_id

    @msg_id.setter
    def msg_id(self, value: str) -> None:
        check_header_value("msg_id", value)
        self._msg_id = value

    #: Flask-Mail's spelling.
    msgId = msg_id  # noqa: N815

    @property
    def send_recipients(self) -> list[AddressLike]:
        """Everyone the message goes to: To, then Cc, then Bcc."""
        return [*self.recipients, *self.cc, *self.bcc]

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
        self._check_headers()
        sender_value = self.sender if self.sender is not None else default_sender
        if sender_value is None:
            raise MessageError("The message has no sender: pass sender= or set MAIL_DEFAULT_SENDER")
        sender = parse_address(sender_value, "sender")
        to = parse_addresses(self.recipients, "recipients")
        cc = parse_addresses(self.cc, "cc")
        bcc = parse_addresses(self.bcc, "bcc")
        if not (to or cc or bcc):
            raise MessageError("The message has no recipients (recipients, cc and bcc are empty)")
        reply_to = parse_address(self.reply_to, "reply_to") if self.reply_to is not None else None
        if self._msg_id is None:
            self._msg_id = make_msgid(domain=sender.domain)

        everyone = [sender, *to, *cc, *bcc]
        utf8 = any(mailbox.needs_smtputf8 for mailbox in everyone)
        headers = _Headers(
            sender,
            to,
            cc,
            reply_to,
            self.subject,
            _as_datetime(self.date),
            self._msg_id,
            self.extra_headers,
        )
        data = self._fast_bytes(headers)
        if data is None:
            mime = self._mime(headers, ascii_attachments)
            data = mime.as_bytes(policy=_POLICY_UTF8 if utf8 else _POLICY)
        mail_options = list(self.mail_options)
        if utf8 and "SMTPUTF8" not in (option.upper() for option in mail_options):
            mail_options.append("SMTPUTF8")
        return Envelope(
            sender=sender.addr,
            recipients=_unique(mailbox.addr for mailbox in [*to, *cc, *bcc]),
            data=data,
            message_id=self._msg_id,
            mail_options=mail_options,
            rcpt_options=list(self.rcpt_options),
        )

    def as_bytes(self, default_sender: AddressLike | None = None) -> bytes:
        """The message as it goes on the wire (without the envelope)."""
        return self.envelope(default_sender).data

    def as_string(self, default_sender: AddressLike | None = None) -> str:
        """:meth:`as_bytes`, decoded; the bytes are ASCII unless an address needs SMTPUTF8."""
        return self.as_bytes(default_sender).decode("utf-8")

    def _check_headers(self) -> None:
        check_header_value("subject", self.subject)
        for field_name, text in (
            ("subject", self.subject),
            ("body", self.body),
            ("html", self.html),
        ):
            if text is not None and not _encodable(text):
                raise MessageError(
                    f"{field_name} holds text UTF-8 cannot encode (a lone surrogate)"
                )
        for name, value in self.extra_headers.items():
            check_header_value("extra_headers", name)
            check_header_value(f"extra_headers[{name!r}]", value)
            if not _FIELD_NAME.fullmatch(name):
                raise MessageError(f"extra_headers: {name!r} is not a header name")
            if name.lower() == "mime-version" or name.lower().startswith("content-"):
                raise MessageError(
                    f"extra_headers cannot set {name}: the message's structure decides it"
                )
        for attachment in self.attachments:
            if attachment.filename is not None:
                check_header_value("attachment filename", attachment.filename)
            for name, value in attachment.headers.items():
                check_header_value("attachment headers", name)
                check_header_value(f"attachment headers[{name!r}]", value)
        for field_name, address in (("sender", self.sender), ("reply_to", self.reply_to)):
            _check_address_value(field_name, address)
        for field_name, addresses in (
            ("recipients", self.recipients),
            ("cc", self.cc),
            ("bcc", self.bcc),
        ):
            for address in addresses:
                _check_address_value(field_name, address)

    def _fast_bytes(self, headers: _Headers) -> bytes | None:
        """The common message, written directly (see :mod:`quartmail.mime`);
        None when it needs the email package (attachments, another charset)."""
        if self.attachments or (self.charset or "utf-8").lower() != "utf-8":
            return None
        lines = headers.fast()
        if lines is None:
            return None
        if self.html is not None and self.body is not None:
            body = mime.multipart_alternative(
                [mime.text_part(self.body, "plain"), mime.text_part(self.html, "html")]
            )
        elif self.html is not None:
            body = mime.text_part(self.html, "html")
        else:
            body = mime.text_part(self.body or "", "plain")
        return b"".join(lines) + b"MIME-Version: 1.0\r\n" + body

    def _mime(self, headers: _Headers, ascii_attachments: bool) -> EmailMessage:
        mime_message = EmailMessage(policy=_POLICY)
        for name, value in headers.items():
            mime_message[name] = value

        charset = self.charset or "utf-8"
        if self.html is not None and self.body is not None:
            mime_message.set_content(self.body, charset=charset)
            mime_message.add_alternative(self.html, subtype="html", charset=charset)
        elif self.html is not None:
            mime_message.set_content(self.html, subtype="html", charset=charset)
        else:
            mime_message.set_content(self.body or "", charset=charset)

        for attachment in self.attachments:
            _attach(mime_message, attachment, ascii_attachments)
        return mime_message


@dataclass(frozen=True, slots=True)
class _Headers:
    """The top-level headers of a message, for either way of flattening it."""

    sender: Mailbox
    to: list[Mailbox]
    cc: list[Mailbox]
    reply_to: Mailbox | None
    subject: str
    date: datetime
    message_id: str
    extra: Mapping[str, str]

    def items(self) -> list[tuple[str, object]]:
        """(name, value) pairs for an EmailMessage; extra headers replace ours."""
        own: list[tuple[str, object]] = [("From", self.sender.header())]
        if self.to:
            own.append(("To", [mailbox.header() for mailbox in self.to]))
        if self.cc:
            own.append(("Cc", [mailbox.header() for mailbox in self.cc]))
        if self.reply_to is not None:
            own.append(("Reply-To", self.reply_to.header()))
        own += [
            ("Subject", self.subject),
            ("Date", format_datetime(self.date)),
            ("Message-ID", self.message_id),
        ]
        replaced = {name.lower() for name in self.extra}
        return [item for item in own if item[0].lower() not in replaced] + list(self.extra.items())

    def fast(self) -> list[bytes] | None:
        """The same headers as encoded lines; None if one needs the email package."""
        if not self.message_id.isascii():
            return None
        replaced = {name.lower() for name in self.extra}
        lines: list[bytes | None] = []
        for name, mailboxes in (
            ("From", [self.sender]),
            ("To", self.to),
            ("Cc", self.cc),
            ("Reply-To", [self.reply_to] if self.reply_to is not None else []),
        ):
            if mailboxes and name.lower() not in replaced:
                lines.append(mime.address_header(name, mailboxes))
        own = (
            ("Subject", self.subject),
            ("Date", format_datetime(self.date)),
            ("Message-ID", self.message_id),
        )
        for name, value in own:
            if name.lower() not in replaced:
                lines.append(mime.text_header(name, value))
        for name, value in self.extra.items():
            lines.append(mime.text_header(name, value))
        if any(line is None for line in lines):
            return None
        return cast(list[bytes], lines)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_list(addresses: Sequence[AddressLike] | AddressLike | None) -> list[AddressLike]:
    # One address on its own is a list of one, not a string to iterate.
    if addresses is None:
        return []
    if isinstance(addresses, str):
        return [addresses]
    return list(addresses)


def _check_address_value(field: str, value: AddressLike | None) -> None:
    parts: tuple[object, ...] = (value,) if isinstance(value, str) else tuple(value or ())
    for part in parts:
        if isinstance(part, str):
            check_header_value(field, part)


def _attach(mime: EmailMessage, attachment: Attachment, ascii_only: bool) -> None:
    filename = attachment.filename
    if filename is not None and ascii_only:
        filename = _ascii_filename(filename)
    maintype, _, subtype = attachment.content_type.partition("/")
    if not subtype:
        raise MessageError(
            f"attachment content_type must be type/subtype: {attachment.content_type!r}"
        )
    options: dict[str, object] = {
        "disposition": attachment.disposition,
        "filename": filename,
        "headers": [f"{name}: {value}" for name, value in attachment.headers.items()],
    }
    if isinstance(attachment.data, str):
        if maintype != "text":
            raise MessageError(f"attachment {filename!r}: str data needs a text/* content type")
        mime.add_attachment(attachment.data, subtype=subtype, **options)  # type: ignore[arg-type]
    else:
        mime.add_attachment(attachment.data, maintype, subtype, **options)  # type: ignore[arg-type]


def _ascii_filename(filename: str) -> str:
    """Flask-Mail's MAIL_ASCII_ATTACHMENTS: drop accents, then anything non-ASCII."""
    ascii_name = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode("ascii")
    return ascii_name or "attachment"


def _guess_type(filename: str | None) -> str:
    guessed = mimetypes.guess_type(filename)[0] if filename else None
    return guessed or "application/octet-stream"


def _as_datetime(date: float | datetime | None) -> datetime:
    if date is None:
        return datetime.now(UTC).replace(microsecond=0)
    if isinstance(date, datetime):
        if date.tzinfo is None:
            raise MessageError("date must be timezone-aware (or a Unix timestamp)")
        return date
    return datetime.fromtimestamp(date, UTC)


def _unique(addresses: Iterable[str]) -> list[str]:
    # One RCPT per address, even if it is both in To and in Bcc.
    return list(dict.fromkeys(addresses))
