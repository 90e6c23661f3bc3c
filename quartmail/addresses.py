"""Parse and check the addresses a :class:`~quartmail.Message` is given.

Users write addresses as Flask-Mail users do: ``"a@x.org"``,
``"Name <a@x.org>"`` or ``("Name", "a@x.org")``. Each is turned into a
:class:`Mailbox` once, here, so that header injection and malformed addresses
fail before anything is sent, and so that the header and the SMTP envelope are
made from the same parsed value.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from email import policy
from email.errors import HeaderParseError, NonASCIILocalPartDefect
from email.headerregistry import Address as HeaderAddress

from .errors import BadHeaderError, MessageError

__all__ = [
    "AddressLike",
    "Mailbox",
    "check_header_value",
    "format_address",
    "parse_address",
    "parse_addresses",
]

_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# Everything str.splitlines() breaks at: CR and LF, but also VT, FF, FS, GS,
# RS, NEL, LS and PS, which some readers (and the email package) treat as
# line ends too.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# RFC 5322 3.2.3 specials, plus white space: a display name holding one is quoted.
_NAME_SPECIALS = frozenset('()<>[]:;@\\,."')

#: What users may pass wherever an address is expected.
AddressLike = str | tuple[str, str]


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One parsed address: an optional display name and the bare address."""

    name: str
    addr: str

    @property
    def domain(self) -> str:
        return self.addr.rpartition("@")[2]

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the mailbox: the local part as written (it may be
        case-sensitive, RFC 5321 2.4) and the domain in lower case (it is not)."""
        local, _, domain = self.addr.rpartition("@")
        return local, domain.lower()

    @property
    def needs_smtputf8(self) -> bool:
        """A non-ASCII local part can only travel with the SMTPUTF8 extension.

        (A non-ASCII domain does not: it is sent IDNA-encoded.)
        """
        return not self.addr.isascii()

    def __str__(self) -> str:
        return format_address(self.name, self.addr)


def check_header_value(field: str, value: object) -> None:
    """The one check of every value that ends up in a header (or an SMTP
    command): raise :class:`BadHeaderError` if it holds a line break (CR, LF
    or a Unicode one) and :class:`MessageError` if it is not text UTF-8 can
    carry. Other control characters are encoded when the header is written."""
    if not isinstance(value, str):
        raise MessageError(f"{field} must be a string, got {type(value).__name__}")
    if _LINE_BREAKS.search(value):
        raise BadHeaderError(f"{field} contains a line break: {value!r}")
    if value.isascii():
        return  # (ASCII always encodes)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise MessageError(f"{field} holds text UTF-8 cannot encode (a lone surrogate)") from err


def format_address(name: str, addr: str) -> str:
    """``("Name", "a@x.org")`` as Flask-Mail shows it, ``"Name <a@x.org>"``;
    the name is quoted when it needs it, so that the string parses back to the
    same mailbox."""
    if not name:
        return addr
    if any(char in _NAME_SPECIALS or (char.isspace() and char != " ") for char in name) or (
        "  " in name or name != name.strip() or "=?" in name
    ):
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}" <{addr}>'
    return f"{name} <{addr}>"


def parse_address(value: AddressLike, field: str = "address") -> Mailbox:
    """Parse one address written as ``"a@x.org"``, ``"Name <a@x.org>"`` or
    ``("Name", "a@x.org")``.

    Raises :class:`BadHeaderError` for CR/LF and :class:`MessageError` for
    anything that is not exactly one valid address.
    """
    if isinstance(value, tuple):
        if len(value) != 2 or not all(isinstance(part, str) for part in value):
            raise MessageError(f"{field}: expected (name, address), got {value!r}")
        name, addr = value
        check_header_value(field, name)
        check_header_value(field, addr)
        return _parse_pair(name.strip(), addr.strip(), field)
    if not isinstance(value, str):
        raise MessageError(f"{field}: expected an address string, got {type(value).__name__}")
    check_header_value(field, value)
    return _parse_string(value.strip(), field)


def parse_addresses(
    values: list[AddressLike] | tuple[AddressLike, ...] | None, field: str
) -> list[Mailbox]:
    """Parse a list of addresses; a bare string is refused, since iterating
    it would silently send to each character."""
    if values is None:
        return []
    if isinstance(values, str):
        raise MessageError(f"{field} must be a list of addresses, not a string: {values!r}")
    return [parse_address(value, field) for value in values]


# Senders and recipients repeat from message to message: parse each string once.
@functools.lru_cache(maxsize=1024)
def _parse_string(value: str, field: str) -> Mailbox:
    try:
        header = policy.default.header_factory("to", value)
        addresses = header.addresses
        defects = [d for d in header.defects if not isinstance(d, NonASCIILocalPartDefect)]
    except (HeaderParseError, IndexError, ValueError, AttributeError) as err:
        # (AttributeError: CPython's parser trips over its own defect on "a@[", seen on 3.11.)
        raise MessageError(f"{field}: invalid address {value!r}") from err
    if len(addresses) != 1 or defects:
        raise MessageError(f"{field}: expected one valid address, got {value!r}")
    addr_spec = addresses[0].addr_spec
    if addr_spec not in value:
        # The parser dropped something from the address itself (white space
        # inside a domain, quotes): refuse rather than send elsewhere.
        raise MessageError(f"{field}: invalid address {value!r}: write it as local@domain")
    return _parse_pair(addresses[0].display_name, addr_spec, field)


@functools.lru_cache(maxsize=1024)
def _parse_pair(name: str, addr: str, field: str) -> Mailbox:
    try:
        (name + addr).encode("utf-8")
    except UnicodeEncodeError as err:
        raise MessageError(f"{field}: text UTF-8 cannot encode in {name!r} <{addr!r}>") from err
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain or any(c.isspace() or c in "<>,;" for c in addr):
        raise MessageError(f"{field}: invalid address {addr!r}")
    try:
        # A non-ASCII domain goes on the wire IDNA-encoded, in the header and
        # the envelope alike, so that it needs no SMTPUTF8.
        domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
        # The email package checks the syntax; it flags any non-ASCII local
        # part as a defect, so check the ASCII shape of one (SMTPUTF8 allows it).
        probe = local if local.isascii() else _NON_ASCII.sub("a", local)
        HeaderAddress(addr_spec=f"{probe}@{domain}")
    except (HeaderParseError, UnicodeError, ValueError, IndexError) as err:
        raise MessageError(f"{field}: invalid address {addr!r}") from err
    _check_lengths(field, local, domain)
    return Mailbox(name=name, addr=f"{local}@{domain}")


def _check_lengths(field: str, local: str, domain: str) -> None:
    # RFC 5321 4.5.3.1: a local part of at most 64 octets, a domain of at most
    # 255 (and labels of at most 63, RFC 1035 2.3.4), a path of at most 256
    # octets with its angle brackets. Longer ones are refused by servers, and
    # these limits keep every header line within 998 octets.
    local_octets = len(local.encode("utf-8"))
    if local_octets > 64:
        raise MessageError(f"{field}: the local part is {local_octets} octets (at most 64)")
    if len(domain) > 255 or any(len(label) > 63 for label in domain.split(".")):
        raise MessageError(f"{field}: the domain is too long (255 octets, 63 per label)")
    if local_octets + 1 + len(domain) > 254:
        raise MessageError(f"{field}: the address is longer than 254 octets")
