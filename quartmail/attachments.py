"""Attachments, and the MIME body the email package writes.

The common message (text and/or HTML in UTF-8, no attachments) is written
directly by :mod:`quartmail.mime`; a message with attachments, or in another
charset, gets its body from the email package here: :func:`mime_body`, with
one part per :class:`Attachment` (a ``message/rfc822`` one kept 7bit, RFC
2046 5.2.1). :func:`check_attachment` checks, before anything is written,
every field of an attachment that ends up in a part header.
"""

from __future__ import annotations

import email
import mimetypes
import re
import unicodedata
from collections.abc import Mapping
from email import policy as email_policy
from email.message import MIMEPart

from . import mime
from .addresses import check_header_value
from .errors import MessageError

__all__ = ["TOKEN", "Attachment", "check_attachment", "check_field_name", "check_text", "mime_body"]

# Never 8bit: bodies are 7bit when they are ASCII with short lines, otherwise
# quoted-printable or base64, so that a server without 8BITMIME takes them and
# no line runs past 998 octets. mangle_from_ is already off in these policies.
# refold_source="none": the part headers we write ourselves (set_raw) are
# already encoded and folded; the email package must not parse them again.
_POLICY = email_policy.SMTP.clone(cte_type="7bit", refold_source="none")

# RFC 5322 field names: printable ASCII but the colon.
_FIELD_NAME = re.compile(r"[!-9;-~]+")
# RFC 2045 5.1: a token (a MIME type, subtype, disposition or charset name).
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Part headers the attachment's own fields decide.
_PART_FIELDS = {"content-type", "content-transfer-encoding", "content-disposition", "mime-version"}
# What a 7bit body may hold (RFC 2045 2.7): lines of at most 998 octets, no NUL.
_SEVEN_BIT_LINE = re.compile(rb"[\x01-\x7f]{0,998}")


class Attachment:
    """A file attached to a :class:`~quartmail.Message`.

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


def check_text(field_name: str, text: object) -> None:
    """*text* is a str that UTF-8 can encode."""
    if not isinstance(text, str):
        raise MessageError(f"{field_name} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MessageError(
            f"{field_name} holds text UTF-8 cannot encode (a lone surrogate)"
        ) from None


def check_field_name(field_name: str, name: str) -> None:
    """*name* is a header field name (RFC 5322 2.2)."""
    check_header_value(field_name, name)
    # 76: a name, ": " and a value still fit RFC 5322's 78 columns.
    if not _FIELD_NAME.fullmatch(name) or len(name) > 76:
        raise MessageError(f"{field_name}: {name!r} is not a header name")


def check_attachment(attachment: Attachment) -> None:
    """Every field of an attachment that ends up in a part header."""
    if not isinstance(attachment, Attachment):
        raise MessageError(f"attachments must be Attachment objects, got {attachment!r}")
    filename = attachment.filename
    if filename is not None:
        check_header_value("attachment filename", filename)
        if _CONTROL.search(filename):
            raise MessageError(f"attachment filename holds a control character: {filename!r}")
    check_header_value("attachment content_type", attachment.content_type)
    maintype, _, subtype = attachment.content_type.partition("/")
    if not (TOKEN.fullmatch(maintype) and TOKEN.fullmatch(subtype)):
        raise MessageError(
            f"attachment content_type must be type/subtype: {attachment.content_type!r}"
        )
    if maintype.lower() == "multipart":
        raise MessageError("attachment content_type cannot be multipart/*: attach each part")
    check_header_value("attachment disposition", attachment.disposition)
    if not TOKEN.fullmatch(attachment.disposition):
        raise MessageError(f"attachment disposition is not a token: {attachment.disposition!r}")
    for name, value in attachment.headers.items():
        check_field_name("attachment headers", name)
        check_header_value(f"attachment headers[{name!r}]", value)
        if name.lower() in _PART_FIELDS:
            raise MessageError(
                f"attachment headers cannot set {name}: the attachment's fields decide it"
            )
    if isinstance(attachment.data, str):
        check_text(f"attachment {filename!r}", attachment.data)
        if maintype.lower() not in ("text", "message"):
            raise MessageError(f"attachment {filename!r}: str data needs a text/* content type")
    elif not isinstance(attachment.data, bytes | bytearray | memoryview):
        raise MessageError(f"attachment {filename!r}: data must be bytes or str")


def mime_body(
    texts: list[tuple[str, str]],
    attachments: list[Attachment],
    key: str,
    charset: str,
    ascii_attachments: bool,
) -> bytes | None:
    """MIME-Version, the body's headers and the body, written by the email
    package: *texts* (subtype, text), the first one the body and the others
    its alternatives, then *attachments*. The boundaries are made from
    *key*; None when a part holds one (take another key)."""
    mime_message = MIMEPart(policy=_POLICY)  # MIMEPart: no MIME-Version in each part
    (subtype, text), *alternatives = texts
    mime_message.set_content(text, subtype=subtype, charset=charset)
    for subtype, text in alternatives:
        mime_message.add_alternative(text, subtype=subtype, charset=charset)
    for attachment in attachments:
        _attach(mime_message, attachment, ascii_attachments)
    multiparts = [part for part in mime_message.walk() if part.is_multipart()]
    for index, part in enumerate(multiparts):
        part.set_boundary(mime.boundary(key, index))
    data = b"MIME-Version: 1.0\r\n" + mime_message.as_bytes(policy=_POLICY)
    for index, part in enumerate(multiparts):
        if not mime.boundary_intact(data, mime.boundary(key, index), len(part.get_payload())):
            return None
    return data


def _attach(mime_message: MIMEPart, attachment: Attachment, ascii_only: bool) -> None:
    filename = attachment.filename
    if filename is not None and ascii_only:
        filename = _ascii_filename(filename)
    maintype, _, subtype = attachment.content_type.lower().partition("/")
    data = attachment.data
    if maintype == "message" and subtype == "rfc822":
        part = _rfc822_part(data, filename)
    else:
        part = MIMEPart(policy=_POLICY)
        if isinstance(data, str):
            part.set_content(data, subtype=subtype)
        else:
            part.set_content(bytes(data), maintype, subtype)
    part["Content-Disposition"] = attachment.disposition
    if filename is not None:
        part.set_param("filename", filename, header="Content-Disposition")
    for name, value in attachment.headers.items():
        # The same writer as the top-level headers (controls encoded, folded).
        folded = mime.text_header(name, value).decode("ascii")
        part.set_raw(name, folded[len(name) + 2 :].rstrip("\r\n"))
    if mime_message.get_content_type() != "multipart/mixed":
        mime_message.make_mixed()
    mime_message.attach(part)


def _rfc822_part(data: bytes | str, filename: str | None) -> MIMEPart:
    """A message/rfc822 part: RFC 2046 5.2.1 allows no encoding but 7bit,
    8bit or binary. The message goes as it is when it is 7bit already;
    otherwise the email package re-encodes its parts (quoted-printable or
    base64) so that it is."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    lines = raw.splitlines()
    raw = b"\r\n".join(lines) + b"\r\n"
    if not _is_seven_bit(raw):
        parsed = email.message_from_bytes(b"\n".join(lines) + b"\n", policy=_POLICY)
        raw = parsed.as_bytes(policy=_POLICY)
        if not _is_seven_bit(raw):
            raise MessageError(
                f"attachment {filename!r}: a message/rfc822 attachment must be 7bit "
                "(no NUL, lines of at most 998 octets) and this one cannot be made so"
            )
    part = MIMEPart(policy=_POLICY)
    part["Content-Type"] = "message/rfc822"
    part["Content-Transfer-Encoding"] = "7bit"
    part.set_payload(raw.decode("ascii"))
    return part


def _is_seven_bit(data: bytes) -> bool:
    return all(_SEVEN_BIT_LINE.fullmatch(line) for line in data.split(b"\r\n"))


def _ascii_filename(filename: str) -> str:
    """Flask-Mail's MAIL_ASCII_ATTACHMENTS: drop accents, then anything
    non-ASCII, then runs of white space."""
    ascii_name = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode("ascii")
    return " ".join(ascii_name.split()) or "attachment"


def _guess_type(filename: str | None) -> str:
    guessed = mimetypes.guess_type(filename)[0] if filename else None
    return guessed or "application/octet-stream"
