"""One caught message, parsed once for the inbox's pages and JSON.

The bytes come from whoever connected to the inbox's port, so nothing here trusts them: a
header that does not parse is shown as it was sent, a body in an unknown charset is decoded
with replacement characters, and every value ends up as text that the pages escape.
"""

from __future__ import annotations

import base64
import email
import email.policy
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from urllib.parse import unquote

from .checks import InboxWarning, check

__all__ = ["CaughtAttachment", "CaughtMail", "parse_mail", "unparsed_mail"]

log = logging.getLogger("quartmail.devinbox")

# RFC 2392: "cid:" and the Content-ID, URL-encoded, without its angle brackets.
_CID_URL = re.compile(r"cid:([^\s\"'<>()]+)", re.IGNORECASE)
_IMAGE_TYPE = re.compile(r"image/[a-z0-9.+-]+")


@dataclass(frozen=True, slots=True)
class CaughtAttachment:
    """A part of a caught message other than its text and HTML bodies."""

    index: int  # its place among the message's attachments, from 1
    filename: str  # as the message named it (or made up); only ever shown escaped
    content_type: str
    content_id: str | None  # without its angle brackets: what a cid: URL names (RFC 2392)
    data: bytes = field(repr=False)

    @property
    def size(self) -> int:
        """Its size in bytes, decoded."""
        return len(self.data)


@dataclass(frozen=True, slots=True)
class CaughtMail:
    """One message the development inbox caught, with what its pages show."""

    number: int
    received: datetime
    mail_from: str  # the envelope (MAIL FROM)
    rcpt_tos: tuple[str, ...]  # the envelope (RCPT TO)
    data: bytes = field(repr=False)  # the message as received
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    text: str | None = field(repr=False)
    html: str | None = field(repr=False)
    attachments: tuple[CaughtAttachment, ...] = field(repr=False)
    warnings: tuple[InboxWarning, ...] = field(repr=False)

    def header(self, name: str) -> str:
        """The first value of header *name*, decoded, or ``""``."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), "")

    @property
    def subject(self) -> str:
        """The Subject header, decoded."""
        return self.header("Subject")

    def html_with_inline_images(self) -> str | None:
        """The HTML body with each ``cid:`` URL of an attached image replaced by a ``data:``
        URL, since the framed body may load nothing else."""
        if self.html is None:
            return None
        images = {
            a.content_id: a
            for a in self.attachments
            if a.content_id is not None and _IMAGE_TYPE.fullmatch(a.content_type)
        }

        def data_url(match: re.Match[str]) -> str:
            image = images.get(unquote(match.group(1)))
            if image is None:
                return match.group(0)
            return f"data:{image.content_type};base64,{base64.b64encode(image.data).decode()}"

        return _CID_URL.sub(data_url, self.html) if images else self.html


def parse_mail(
    number: int, received: datetime, mail_from: str, rcpt_tos: list[str], data: bytes
) -> CaughtMail:
    """Parse a message caught over SMTP (CRLF line endings) and check it."""
    # Line endings as a mail store writes them, so that text bodies read back as sent.
    message = email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=email.policy.default)
    text_part, text = _body(message, "plain")
    html_part, html = _body(message, "html")
    bodies = {id(part) for part in (text_part, html_part) if part is not None}
    attachments = tuple(
        _attachment(index, part)
        for index, part in enumerate(
            (part for part in _leaves(message) if id(part) not in bodies), start=1
        )
    )
    return CaughtMail(
        number=number,
        received=received,
        mail_from=mail_from,
        rcpt_tos=tuple(rcpt_tos),
        data=data,
        headers=tuple(_headers(message)),
        text=text,
        html=html,
        attachments=attachments,
        warnings=tuple(check(data, message, text=text, html=html, recipients=len(rcpt_tos))),
    )


def unparsed_mail(
    number: int, received: datetime, mail_from: str, rcpt_tos: list[str], data: bytes
) -> CaughtMail:
    """A message :func:`parse_mail` failed on: its envelope and source only."""
    return CaughtMail(
        number=number,
        received=received,
        mail_from=mail_from,
        rcpt_tos=tuple(rcpt_tos),
        data=data,
        headers=(),
        text=None,
        html=None,
        attachments=(),
        warnings=(InboxWarning("unparsable", "The message does not parse; see its source."),),
    )


def _headers(message: EmailMessage) -> Iterator[tuple[str, str]]:
    for name, raw in message.raw_items():
        try:
            value = str(message.policy.header_fetch_parse(name, raw))
        except Exception:  # hostile input: the email package has raised on odd headers
            log.debug("Header %r does not parse; shown as sent", name, exc_info=True)
            value = " ".join(str(raw).split())
        yield str(name), value


def _body(message: EmailMessage, subtype: str) -> tuple[EmailMessage | None, str | None]:
    try:
        part = message.get_body(preferencelist=(subtype,))
    except Exception:  # a malformed structure: treated as having no such body
        log.debug("No %s body found", subtype, exc_info=True)
        return None, None
    if not isinstance(part, EmailMessage) or part.get_content_type() != f"text/{subtype}":
        return None, None
    try:
        content = part.get_content()
    except LookupError:  # an unknown charset
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    return part, str(content)


def _leaves(part: EmailMessage) -> Iterator[EmailMessage]:
    # An attached message (message/rfc822) is one attachment, not its parts.
    if part.get_content_type() == "message/rfc822" or not part.is_multipart():
        yield part
        return
    for sub in part.iter_parts():
        if isinstance(sub, EmailMessage):
            yield from _leaves(sub)


def _attachment(index: int, part: EmailMessage) -> CaughtAttachment:
    content_type = part.get_content_type()
    try:
        filename = part.get_filename()
        content_id = str(part.get("Content-ID", "")).strip().strip("<>") or None
    except Exception:  # hostile input: the email package has raised on odd headers
        filename = content_id = None
    data: bytes
    if content_type == "message/rfc822":
        inner = part.get_payload(0)
        data = inner.as_bytes() if isinstance(inner, EmailMessage) else b""
        default_name = f"message-{index}.eml"
    else:
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        default_name = f"part-{index}"
    return CaughtAttachment(
        index=index,
        filename=str(filename) if filename else default_name,
        content_type=content_type,
        content_id=content_id,
        data=data,
    )
