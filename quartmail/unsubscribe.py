"""One-click unsubscribe (RFC 8058) for mail that people subscribed to.

Three pieces, wired together by the app::

    tokens = UnsubscribeTokens.from_config(app.config)        # SECRET_KEY signs them
    app.register_blueprint(unsubscribe_blueprint(tokens, on_unsubscribe))

    async def on_unsubscribe(address: str, list_name: str) -> None:
        ...  # remember it; called again for a repeated click, so make it idempotent

    # when writing a mail, in a request (or with SERVER_NAME set):
    url = unsubscribe_url(tokens, "ann@example.com", "new-users")
    msg = Message(..., list_unsubscribe=[url, "mailto:unsubscribe@example.com"])

- :class:`UnsubscribeTokens` makes and checks the signed, expiring token that
  carries the address and the list's name (itsdangerous, with a salt of its
  own, so that no other signed value of the app passes for one).
- :func:`unsubscribe_blueprint` serves ``POST /unsubscribe/<token>``, what a
  mail client sends when the user clicks "Unsubscribe", with the body
  ``List-Unsubscribe=One-Click`` and no cookies; and ``GET`` on the same URL,
  a page with a button that sends that POST. Mail scanners fetch every link in
  a mail, so a GET never unsubscribes.
- ``Message(list_unsubscribe=url)`` (or a list of an https and a mailto URL)
  writes the ``List-Unsubscribe`` (RFC 2369) and ``List-Unsubscribe-Post``
  (RFC 8058 section 3.1) headers; :func:`list_unsubscribe_headers`, from
  :mod:`quartmail.listunsubscribe`, gives their values.

Mailbox providers only offer the one-click button when a DKIM signature covers
both headers (RFC 8058 section 4); with ``MAIL_DKIM_KEY`` set, ``Mail``'s
signature (:mod:`quartmail.dkim`) does.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, Serializer, SignatureExpired, URLSafeTimedSerializer
from itsdangerous.encoding import base64_encode
from markupsafe import Markup
from quart import Blueprint, Response, request, url_for

from .addresses import check_header_value, parse_address
from .errors import ConfigError, MailError, MessageError
from .listunsubscribe import ONE_CLICK, list_unsubscribe_headers  # re-exported (the rule's home)

__all__ = [
    "MAX_AGE",
    "SALT",
    "OnUnsubscribe",
    "UnsubscribeTokenError",
    "UnsubscribeTokens",
    "Unsubscription",
    "list_unsubscribe_headers",
    "unsubscribe_blueprint",
    "unsubscribe_url",
]

log = logging.getLogger("quartmail.unsubscribe")

#: How long an unsubscribe link works, in seconds: 90 days, three times the 30
#: days that CAN-SPAM requires; a reader of older mail has newer links.
MAX_AGE = 90 * 24 * 3600

#: What the app does when someone unsubscribes: ``await on_unsubscribe(address, list_name)``.
OnUnsubscribe = Callable[[str, str], Awaitable[None]]

#: The itsdangerous salt of unsubscribe tokens: no other value the app signs
#: with its secret key (a session cookie, say) passes for one.
SALT = "quartmail.unsubscribe"

_MAX_LIST_NAME = 100
# No caching, no indexing, and the token in the URL is not sent on to any link.
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex",
}


class UnsubscribeTokenError(MailError, ValueError):
    """An unsubscribe token is malformed, was tampered with, or has expired."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True, slots=True)
class Unsubscription:
    """What a valid token says: who unsubscribes, and from what."""

    address: str
    list_name: str


class _TokenSerializer(URLSafeTimedSerializer):
    """itsdangerous' URL-safe timed serializer, writing the payload uncompressed.

    itsdangerous tries zlib on every payload and keeps the result only when it is 2 bytes
    shorter, which an address and a list name rarely are: a third of a token's cost. Both
    forms read back the same (a compressed payload starts with "."), so tokens made either
    way, before or after, are checked alike.
    """

    def dump_payload(self, obj: Any) -> bytes:
        return base64_encode(Serializer.dump_payload(self, obj))  # the compact JSON


class UnsubscribeTokens:
    """Makes and checks unsubscribe tokens, signed with the app's secret key.

    ``secret_key`` may be a list, oldest first and the current key last (as
    itsdangerous takes it): tokens signed with an older key still work after
    the key is rotated. A token is good for ``max_age`` seconds.
    """

    def __init__(
        self, secret_key: str | bytes | Sequence[str | bytes], *, max_age: int = MAX_AGE
    ) -> None:
        given = [secret_key] if isinstance(secret_key, str | bytes) else list(secret_key)
        if not given or not all(given):
            raise ConfigError("SECRET_KEY is not set: unsubscribe tokens are signed with it")
        if max_age <= 0:
            raise ConfigError(f"max_age of unsubscribe tokens must be positive, got {max_age}")
        self.max_age = max_age
        keys = [key.encode("utf-8") if isinstance(key, str) else key for key in given]
        self._serializer = _TokenSerializer(keys, salt=SALT)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, max_age: int = MAX_AGE) -> UnsubscribeTokens:
        """Tokens signed with ``SECRET_KEY``, and checked with ``SECRET_KEY_FALLBACKS`` too."""
        secret_key = config.get("SECRET_KEY")
        if not secret_key:
            raise ConfigError("SECRET_KEY is not set: unsubscribe tokens are signed with it")
        return cls([*(config.get("SECRET_KEY_FALLBACKS") or []), secret_key], max_age=max_age)

    def __repr__(self) -> str:
        return f"UnsubscribeTokens(max_age={self.max_age})"

    def make(self, address: str, list_name: str) -> str:
        """A URL-safe token for *address* leaving the list *list_name*.

        Raises :class:`~quartmail.MessageError` for an invalid address or list name.
        """
        mailbox = parse_address(address, "address")
        if not isinstance(list_name, str) or not 0 < len(list_name) <= _MAX_LIST_NAME:
            raise MessageError(f"list_name must be 1 to {_MAX_LIST_NAME} characters")
        check_header_value("list_name", list_name)
        token: str = self._serializer.dumps([mailbox.addr, list_name])
        return token

    def check(self, token: str) -> Unsubscription:
        """What *token* says; raises :class:`UnsubscribeTokenError` if it is
        not one of ours, was changed, or is older than ``max_age``."""
        if not token.isascii():
            # Ours are URL-safe base64; itsdangerous would fail to encode a lone
            # surrogate (UnicodeEncodeError, not BadSignature).
            raise UnsubscribeTokenError("the unsubscribe link is not valid")
        try:
            payload = self._serializer.loads(token, max_age=self.max_age)
        except SignatureExpired:
            raise UnsubscribeTokenError("the unsubscribe link has expired", expired=True) from None
        except BadSignature:
            raise UnsubscribeTokenError("the unsubscribe link is not valid") from None
        match payload:
            case [str(address), str(list_name)]:
                return Unsubscription(address, list_name)
        raise UnsubscribeTokenError("the unsubscribe link is not valid")


def unsubscribe_url(
    tokens: UnsubscribeTokens, address: str, list_name: str, *, blueprint: str = "unsubscribe"
) -> str:
    """The https URL of *address*'s unsubscribe link for *list_name*.

    Needs an app context: a request's, or ``SERVER_NAME`` set in the config.
    """
    return url_for(
        f"{blueprint}.unsubscribe",
        token=tokens.make(address, list_name),
        _external=True,
        _scheme="https",  # RFC 8058 section 3.1: one-click needs an HTTPS URI
    )


def unsubscribe_blueprint(
    tokens: UnsubscribeTokens,
    on_unsubscribe: OnUnsubscribe,
    *,
    name: str = "unsubscribe",
    url_prefix: str = "/unsubscribe",
) -> Blueprint:
    """A blueprint serving ``<url_prefix>/<token>``.

    ``POST`` with ``List-Unsubscribe=One-Click`` in its form body awaits
    ``on_unsubscribe(address, list_name)`` and answers 200, every time (the
    callback must be idempotent). ``GET`` answers a page whose button sends
    that POST, and changes nothing. A bad token gets 400 and an expired one
    410, each with a short page. No response sets a cookie or redirects.
    Exempt the blueprint from any CSRF protection: mail clients POST without
    a CSRF token (RFC 8058 section 3.2).
    """
    blueprint = Blueprint(name, __name__, url_prefix=url_prefix)

    @blueprint.get("/<token>")
    async def confirm(token: str) -> Response:
        try:
            unsubscription = tokens.check(token)
        except UnsubscribeTokenError as err:
            return _error_page(err)
        body = Markup(
            "<p>Stop sending <strong>{list_name}</strong> mail to <strong>{address}</strong>?</p>"
            '<form method="post"><input type="hidden" name="{key}" value="{value}">'
            '<button type="submit">Unsubscribe</button></form>'
        ).format(
            list_name=unsubscription.list_name,
            address=unsubscription.address,
            key=ONE_CLICK[0],
            value=ONE_CLICK[1],
        )
        return _page(200, "Unsubscribe", body)

    @blueprint.post("/<token>")
    async def unsubscribe(token: str) -> Response:
        try:
            unsubscription = tokens.check(token)
        except UnsubscribeTokenError as err:
            return _error_page(err)
        form = await request.form
        if form.get(ONE_CLICK[0]) != ONE_CLICK[1]:
            return _page(
                400,
                "Not unsubscribed",
                Markup("<p>The request must carry <code>List-Unsubscribe=One-Click</code>.</p>"),
            )
        await on_unsubscribe(unsubscription.address, unsubscription.list_name)
        log.info("%s unsubscribed from %s", unsubscription.address, unsubscription.list_name)
        body = Markup(
            "<p><strong>{address}</strong> gets no more <strong>{list_name}</strong> mail.</p>"
        )
        return _page(
            200,
            "Unsubscribed",
            body.format(address=unsubscription.address, list_name=unsubscription.list_name),
        )

    return blueprint


def _error_page(err: UnsubscribeTokenError) -> Response:
    if err.expired:
        text = "This unsubscribe link has expired. Newer mail from us has a link that works."
        return _page(410, "Link expired", Markup("<p>{}</p>").format(text))
    return _page(400, "Link not valid", Markup("<p>This unsubscribe link is not valid.</p>"))


def _page(status: int, title: str, body: Markup) -> Response:
    html = Markup(
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>{title}</title></head>\n<body><main><h1>{title}</h1>{body}</main></body></html>\n"
    ).format(title=title, body=body)
    return Response(html, status=status, headers=_PAGE_HEADERS, mimetype="text/html")
