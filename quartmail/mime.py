"""Flatten the common message (text and/or HTML, UTF-8, no attachments)
straight to bytes.

The email package's ``EmailMessage`` builds a tree of header and part
objects, parses each header back, and generates it again; for a sign-up mail
that costs more than sending it. Here the same bytes are written directly, by
the same rules the email package follows with ``policy.SMTP`` and
``cte_type="7bit"``:

- headers of printable ASCII text are folded at white space to 78 columns;
  any other text (non-ASCII, control characters, ``=?``, an unbreakable run)
  becomes RFC 2047 encoded-words (``=?utf-8?b?...?=``), split on character
  boundaries, one per line;
- display names that need it are quoted or encoded, and a name too long for a
  line is encoded-words folded between; addresses are left as they are (ASCII,
  or UTF-8 when the message travels with SMTPUTF8; at most 254 octets);
- bodies are 7bit when ASCII with lines of at most 78 octets, otherwise
  quoted-printable or base64, whichever is shorter, with CRLF line ends.

The top-level headers of every message are written here; the bodies of the
rest (attachments, other charsets) are written by the email package. The
tests parse the output back with the email package and compare.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from datetime import datetime, timedelta

from .addresses import Mailbox

__all__ = [
    "address_header",
    "boundary",
    "boundary_intact",
    "date",
    "multipart_alternative",
    "plain_header",
    "text_header",
    "text_part",
]

_MAX = 78  # RFC 5322's "SHOULD" line length
_NAME_ROOM = len("Reply-To: ")  # the longest address header's name
_CRLF = b"\r\n"
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_NO_OFFSET = timedelta(0)
_ATOM_SPECIALS = frozenset('()<>@,;:\\".[]')
_WORD_OVERHEAD = len("=?utf-8?b??=")
# What 7bit lines may hold (RFC 2045): printable ASCII and tabs, no NUL or
# other control characters; and CRLF between them.
_SEVEN_BIT_LINES = re.compile(rb"[\t\x20-\x7e\r\n]*")


def text_header(name: str, value: str) -> bytes:
    """``Name: value`` for unstructured text (Subject, extra headers), folded."""
    prefix = f"{name}: "
    if value.isascii() and "=?" not in value and value.isprintable():
        if len(prefix) + len(value) <= _MAX:  # (what _fold_words gives for one line)
            return (prefix + value).encode("ascii") + _CRLF
        folded = _fold_words(prefix, value.split(" "))
        if folded is not None:
            return folded
    return _encoded_words(prefix, value)


def address_header(name: str, mailboxes: Iterable[Mailbox]) -> bytes:
    """``Name: a, b, ...`` with each mailbox as ``name <addr>``, folded to
    78 columns between mailboxes, and between a long display name's
    encoded-words and its address, so that no line exceeds 998 octets (an
    address itself is at most 254 octets, see :mod:`quartmail.addresses`)."""
    items = list(mailboxes)
    if len(items) == 1:
        first = _mailbox_tokens(items[0], "")
        if len(first) == 1:  # one token is one line, as the loop below writes it
            return f"{name}: {first[0]}".encode() + _CRLF
    tokens: list[str] = []
    for index, mailbox in enumerate(items):
        tokens += _mailbox_tokens(mailbox, "," if index < len(items) - 1 else "")
    lines: list[str] = []
    line = f"{name}:"
    for index, token in enumerate(tokens):
        if index and len(line.encode("utf-8")) + 1 + len(token.encode("utf-8")) > _MAX:
            lines.append(line)
            line = " " + token
        else:
            line += " " + token
    lines.append(line)
    return "\r\n".join(lines).encode("utf-8") + _CRLF


def plain_header(name: str, value: str) -> bytes:
    """``Name: value`` for a value already known to be one printable ASCII
    token that fits a line (a Date, a checked Message-ID)."""
    return f"{name}: {value}\r\n".encode("ascii")


def date(value: datetime) -> str:
    """An aware datetime as RFC 5322 3.3 writes it (``Sun, 29 Nov 2026 14:07:51
    +0000``): English names whatever the locale, the datetime's own offset;
    what ``email.utils.format_datetime`` gives, without its time tuple."""
    offset = value.utcoffset()
    zone = "+0000" if offset == _NO_OFFSET else value.strftime("%z")
    return (
        f"{_DAYS[value.weekday()]}, {value.day:02d} {_MONTHS[value.month - 1]} "
        f"{value.year:04d} {value.hour:02d}:{value.minute:02d}:{value.second:02d} {zone}"
    )


def text_part(text: str, subtype: str) -> bytes:
    """A ``text/<subtype>; charset="utf-8"`` part: its headers, a blank line, its body."""
    cte, body = _encode_body(text)
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode("ascii")
        + body
    )


def multipart_alternative(parts: list[bytes], boundary: str) -> bytes:
    """A ``multipart/alternative`` body holding *parts* (text first); the
    caller checks that *boundary* occurs nowhere in them (see
    :func:`boundary_intact`)."""
    out = [f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'.encode("ascii")]
    # The CRLF before each boundary line belongs to the boundary (RFC 2046),
    # so a part's own final line break needs one more after it.
    delimiter = f"--{boundary}\r\n".encode("ascii")
    for index, part in enumerate(parts):
        out.append(delimiter if index == 0 else _CRLF + delimiter)
        out.append(part)
    out.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


def boundary(key: str, index: int) -> str:
    """The boundary of a message's *index*-th multipart: made from a random
    key kept with the message, so that flattening it again gives the same
    bytes (``as_bytes()`` is what was sent)."""
    return f"=============={key}{index}=="


def boundary_intact(data: bytes, boundary: str, parts: int) -> bool:
    """True when *boundary* occurs in *data* only as the delimiters of its
    multipart's *parts* (and the closing one): no part happens to contain it."""
    return data.count(f"--{boundary}".encode("ascii")) == parts + 1


def _printable(value: str) -> bool:
    # " " to "~": for ASCII text, exactly what isprintable() accepts (in C, not a loop here).
    return value.isascii() and value.isprintable()


def _fold_words(prefix: str, words: list[str]) -> bytes | None:
    """Fold ASCII words at spaces to 78 columns; None if a line would still
    exceed 998 octets or a fold would be needed where no space is."""
    if len(prefix) + len(" ".join(words)) <= _MAX:
        return (prefix + " ".join(words)).encode("ascii") + _CRLF
    if any(not word for word in words):
        return None  # runs of spaces would be lost or moved by folding
    lines: list[str] = []
    line = prefix.rstrip(" ")
    for index, word in enumerate(words):
        candidate = f"{line} {word}"
        if index and len(candidate) > _MAX:
            lines.append(line)
            line = " " + word
        else:
            line = candidate
    lines.append(line)
    if any(len(each) > 998 for each in lines):
        return None
    return "\r\n".join(lines).encode("ascii") + _CRLF


def _encoded_words(prefix: str, value: str) -> bytes:
    """RFC 2047 'B' encoded-words, one per line, never splitting a character."""
    lines: list[str] = []
    lead = prefix
    chunk = b""
    budget = _chunk_bytes(len(lead))
    for char in value:
        encoded = char.encode("utf-8")
        if chunk and len(chunk) + len(encoded) > budget:
            lines.append(lead + _word(chunk))
            lead = " "
            budget = _chunk_bytes(1)
            chunk = b""
        chunk += encoded
    lines.append(lead + _word(chunk))
    return "\r\n".join(lines).encode("ascii") + _CRLF


def _chunk_bytes(lead: int) -> int:
    """How many UTF-8 bytes fit in one encoded-word after *lead* columns."""
    return max(3, (_MAX - lead - _WORD_OVERHEAD) // 4 * 3)


def _word(chunk: bytes) -> str:
    return f"=?utf-8?b?{base64.b64encode(chunk).decode('ascii')}?="


def _mailbox_tokens(mailbox: Mailbox, comma: str) -> list[str]:
    """A mailbox as the pieces a header may be folded between, each short
    enough to follow the longest header name (``Reply-To: ``) within 78
    columns, but an address, which cannot be split."""
    if not mailbox.name:
        return [mailbox.addr + comma]
    phrase = _phrase(mailbox.name)
    address = f"<{mailbox.addr}>{comma}"
    if len(phrase) + 1 + len(address) <= _MAX - _NAME_ROOM:
        return [f"{phrase} {address}"]
    if len(phrase) <= _MAX - _NAME_ROOM:
        return [phrase, address]
    # A name too long for a line: as encoded-words, which may be folded
    # between (RFC 2047 5(3); readers drop the white space between them).
    words = _encoded_words(" " * _NAME_ROOM, mailbox.name).decode("ascii").strip()
    return [*words.split("\r\n "), address]


def _phrase(name: str) -> str:
    if not name.isascii() or "=?" in name or not _printable(name):
        # Encoded-words in a phrase: one per 45 bytes, separated by spaces
        # (folding may break a line there).
        return _encoded_words("", name).decode("ascii").replace("\r\n ", " ").rstrip("\r\n")
    if not _ATOM_SPECIALS.isdisjoint(name) or "  " in name or name != name.strip():
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return name


def _encode_body(text: str) -> tuple[str, bytes]:
    lines = text.encode("utf-8").splitlines()
    data = _CRLF.join(lines) + _CRLF
    # (Its only CR and LF are the CRLFs joining the lines: one match checks them all.)
    if max(map(len, lines), default=0) <= _MAX and _SEVEN_BIT_LINES.fullmatch(data):
        return "7bit", data
    quoted = binascii.b2a_qp(data, istext=True)
    encoded = base64.encodebytes(data).replace(b"\n", _CRLF)
    if len(quoted) <= len(encoded):
        return "quoted-printable", quoted
    return "base64", encoded
