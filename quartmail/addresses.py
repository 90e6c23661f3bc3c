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

__all__ = ["AddressLike", "Mailbox", "check_header_value", "parse_address", "parse_addresses"]

_NON_ASCII = re.compile(r"[^\x00-\x7f]")

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
    def needs_smtputf8(self) -> bool:
        """A non-ASCII local part can only travel with the SMTPUTF8 extension.

        (A non-ASCII domain does not: it is sent IDNA-encoded.)
        """
        return not self.addr.isascii()

    def header(self) -> HeaderAddress:
        """The value for a ``From``/``To``/... header; the email package
        RFC 2047-encodes a non-ASCII display name when the message is flattened."""
        local, _, domain = self.addr.rpartition("@")
        return HeaderAddress(display_name=self.name, username=local, domain=domain)

    def __str__(self) -> str:
        return str(self.header())


def check_header_value(field: str, value: str) -> None:
    """Raise :class:`BadHeaderError` if *value* could start a new header line."""
    if "\r" in value or "\n" in value:
        raise BadHeaderError(f"{field} contains a line break (CR or LF): {value!r}")


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
    except (HeaderParseError, IndexError, ValueError) as err:
        raise MessageError(f"{field}: invalid address {value!r}") from err
    if len(addresses) != 1 or defects:
        raise MessageError(f"{field}: expected one valid address, got {value!r}")
    return _parse_pair(addresses[0].display_name, addresses[0].addr_spec, field)


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
    return Mailbox(name=name, addr=f"{local}@{domain}")
