"""Flatten the common message (text and/or HTML, UTF-8, no attachments)
straight to bytes.

The email package's ``EmailMessage`` builds a tree of header and part
objects, parses each header back, and generates it again; for a sign-up mail
that costs more than sending it. Here the same bytes are written directly, by
the same rules the email package follows with ``policy.SMTP`` and
``cte_type="7bit"``:

- headers of ASCII text are folded at white space to 78 columns; any other
  text (non-ASCII, ``=?``, an unbreakable run) becomes RFC 2047 encoded-words
  (``=?utf-8?b?...?=``), split on character boundaries, one per line;
- display names that need it are quoted or encoded; addresses are left as they
  are (ASCII, or UTF-8 when the message travels with SMTPUTF8);
- bodies are 7bit when ASCII with lines of at most 78 octets, otherwise
  quoted-printable or base64, whichever is shorter, with CRLF line ends.

Everything else (attachments, other charsets) goes through the email package.
The tests parse the output back with the email package and compare.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Iterable

from .addresses import Mailbox

__all__ = ["address_header", "multipart_alternative", "text_header", "text_part"]

_MAX = 78  # RFC 5322's "SHOULD" line length
_CRLF = b"\r\n"
_ATOM_SPECIALS = frozenset('()<>@,;:\\".[]')
_WORD_OVERHEAD = len("=?utf-8?b??=")
# What a 7bit line may hold (RFC 2045): printable ASCII and tabs, no NUL or
# other control characters.
_SEVEN_BIT = re.compile(rb"[\t\x20-\x7e]*")


def text_header(name: str, value: str) -> bytes:
    """``Name: value`` for unstructured text (Subject, extra headers), folded."""
    prefix = f"{name}: "
    if value.isascii() and "=?" not in value and _printable(value):
        folded = _fold_words(prefix, value.split(" "))
        if folded is not None:
            return folded
    return _encoded_words(prefix, value)


def address_header(name: str, mailboxes: Iterable[Mailbox]) -> bytes | None:
    """``Name: a, b, ...`` with each mailbox as ``name <addr>``, folded
    between mailboxes; None when a mailbox is too long for a line (the caller
    then lets the email package fold it)."""
    items = [_mailbox(mailbox) for mailbox in mailboxes]
    lines: list[str] = []
    line = f"{name}:"
    for index, item in enumerate(items):
        text = item + ("," if index < len(items) - 1 else "")
        if index and len(line) + 1 + len(text) > _MAX:
            lines.append(line)
            line = " " + text
        else:
            line += " " + text
    lines.append(line)
    if any(len(each.encode("utf-8")) > 998 for each in lines):
        return None
    return "\r\n".join(lines).encode("utf-8") + _CRLF


def text_part(text: str, subtype: str) -> bytes:
    """A ``text/<subtype>; charset="utf-8"`` part: its headers, a blank line, its body."""
    cte, body = _encode_body(text)
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode("ascii")
        + body
    )


def multipart_alternative(parts: list[bytes]) -> bytes:
    """A ``multipart/alternative`` body holding *parts* (text first)."""
    boundary = _boundary(parts)
    out = [f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'.encode("ascii")]
    # The CRLF before each boundary line belongs to the boundary (RFC 2046),
    # so a part's own final line break needs one more after it.
    delimiter = f"--{boundary}\r\n".encode("ascii")
    for index, part in enumerate(parts):
        out.append(delimiter if index == 0 else _CRLF + delimiter)
        out.append(part)
    out.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


def _boundary(parts: list[bytes]) -> str:
    # Random enough never to occur in a part; checked all the same.
    while True:
        boundary = f"==============={secrets.token_hex(12)}=="
        encoded = boundary.encode("ascii")
        if not any(encoded in part for part in parts):
            return boundary


def _printable(value: str) -> bool:
    return all(" " <= char <= "~" for char in value)


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


def _mailbox(mailbox: Mailbox) -> str:
    if not mailbox.name:
        return mailbox.addr
    return f"{_phrase(mailbox.name)} <{mailbox.addr}>"


def _phrase(name: str) -> str:
    if not name.isascii() or "=?" in name or not _printable(name):
        # Encoded-words in a phrase: one per 45 bytes, separated by spaces
        # (folding may break a line there).
        return _encoded_words("", name).decode("ascii").replace("\r\n ", " ").rstrip("\r\n")
    if any(char in _ATOM_SPECIALS for char in name) or "  " in name or name != name.strip():
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    return name


def _encode_body(text: str) -> tuple[str, bytes]:
    lines = text.encode("utf-8").splitlines()
    data = _CRLF.join(lines) + _CRLF
    if all(len(line) <= _MAX and _SEVEN_BIT.fullmatch(line) for line in lines):
        return "7bit", data
    quoted = binascii.b2a_qp(data, istext=True)
    encoded = base64.encodebytes(data).replace(b"\n", _CRLF)
    if len(quoted) <= len(encoded):
        return "quoted-printable", quoted
    return "base64", encoded
