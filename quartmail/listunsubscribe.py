"""The ``List-Unsubscribe`` (RFC 2369) and ``List-Unsubscribe-Post`` (RFC
8058) header values: the one place their URLs are checked.

:class:`~quartmail.Message` writes them from its ``list_unsubscribe``
attribute; :mod:`quartmail.unsubscribe` (the token helper and the one-click
blueprint) re-exports :func:`list_unsubscribe_headers` for code that builds
the headers itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from .addresses import check_header_value
from .errors import MessageError

__all__ = ["ONE_CLICK", "check_url", "list_unsubscribe_headers", "list_unsubscribe_urls"]

#: RFC 8058 section 3.1: the ``List-Unsubscribe-Post`` value, which is also
#: the one key/value pair of the one-click POST body.
ONE_CLICK = ("List-Unsubscribe", "One-Click")


def list_unsubscribe_urls(urls: str | Iterable[str]) -> list[str]:
    """*urls* (one URL, or several) as a checked list: https and mailto URLs,
    at most one https (RFC 8058 section 3.1).

    Raises :class:`~quartmail.BadHeaderError` for CR or LF and
    :class:`~quartmail.MessageError` for anything else that cannot be written.
    """
    if isinstance(urls, bytes | bytearray) or not isinstance(urls, str | Iterable):
        raise MessageError(
            "list_unsubscribe takes a URL or a list of URLs, got " + type(urls).__name__
        )
    given = [urls] if isinstance(urls, str) else list(urls)
    if not given:
        raise MessageError("list_unsubscribe needs at least one https or mailto URL")
    https = 0
    for url in given:
        check_url(url)
        https += url.lower().startswith("https:")
    if https > 1:
        raise MessageError("list_unsubscribe takes one https URL (RFC 8058 section 3.1)")
    return given


def list_unsubscribe_headers(urls: str | Iterable[str]) -> list[tuple[str, str]]:
    """The ``List-Unsubscribe`` header, and ``List-Unsubscribe-Post`` when an https URL is given::

        >>> list_unsubscribe_headers(["https://example.com/u/t0k", "mailto:u@example.com"])
        [('List-Unsubscribe', '<https://example.com/u/t0k>, <mailto:u@example.com>'),
         ('List-Unsubscribe-Post', 'List-Unsubscribe=One-Click')]

    Takes https and mailto URLs, at most one https (RFC 8058 section 3.1);
    raises :class:`~quartmail.BadHeaderError` for CR or LF and
    :class:`~quartmail.MessageError` for anything else it cannot write.
    ``Message(list_unsubscribe=...)`` writes the same headers.
    """
    given = list_unsubscribe_urls(urls)
    headers = [("List-Unsubscribe", ", ".join(f"<{url}>" for url in given))]
    if any(url.lower().startswith("https:") for url in given):
        headers.append(("List-Unsubscribe-Post", "=".join(ONE_CLICK)))
    return headers


def check_url(url: object) -> None:
    """Raise unless *url* is an https or mailto URL that a ``List-Unsubscribe``
    header can carry as it is."""
    if not isinstance(url, str):
        raise MessageError(f"list_unsubscribe: expected a URL string, got {type(url).__name__}")
    check_header_value("list_unsubscribe", url)
    scheme = url.partition(":")[0].lower()
    if scheme not in {"https", "mailto"}:
        raise MessageError(
            f"list_unsubscribe takes https and mailto URLs, got {url!r}"
            + (" (one-click needs https: RFC 8058 section 3.1)" if scheme == "http" else "")
        )
    # RFC 2369 section 2: the URL sits in angle brackets, so it holds none,
    # nor white space; non-ASCII must be percent-encoded (RFC 3986).
    if not url.isascii() or any(char in url for char in "<> \t") or not url.isprintable():
        raise MessageError(f"list_unsubscribe: {url!r} is not a plain ASCII URL")
    # "=?" would make the header writer take it for an RFC 2047 encoded-word.
    if "=?" in url:
        raise MessageError(f"list_unsubscribe: {url!r} holds '=?'; percent-encode it")
    try:
        host = urlsplit(url).hostname if scheme == "https" else "-"
    except ValueError:  # a malformed [IPv6] host, a bad port
        host = None
    if not host:
        raise MessageError(f"list_unsubscribe: {url!r} has no valid host")
    if scheme == "mailto" and "@" not in url:
        raise MessageError(f"list_unsubscribe: {url!r} has no address")
    # One header line is at most 998 octets (RFC 5322 section 2.1.1).
    if len("List-Unsubscribe: <>,") + len(url) > 998:
        raise MessageError("list_unsubscribe: a URL is too long for a header line")
