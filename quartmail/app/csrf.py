"""CSRF protection for the HTML form: a random token kept in the (signed)
session, put in a hidden input, and compared on POST."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping

from quart import session
from werkzeug.exceptions import BadRequest

__all__ = ["CSRFError", "check_csrf", "csrf_token"]

_KEY = "csrf_token"


class CSRFError(BadRequest):
    """The form's token is missing or does not match the session's."""

    description = "The form has expired or did not come from this site. Please try again."


def csrf_token() -> str:
    """This session's token (made on first use); templates call it."""
    token = session.get(_KEY)
    if not isinstance(token, str):
        token = session[_KEY] = secrets.token_urlsafe(32)
    return token


def check_csrf(form: Mapping[str, str]) -> None:
    """Raise :class:`CSRFError` (a 400) unless the form carries this session's token."""
    expected = session.get(_KEY)
    sent = form.get(_KEY, "")
    # compare_digest refuses non-ASCII text (a TypeError); our tokens are
    # ASCII, so anything else is simply not this session's token.
    if not (isinstance(expected, str) and sent.isascii() and expected.isascii()):
        raise CSRFError()
    if not hmac.compare_digest(sent, expected):
        raise CSRFError()
