"""The app's sessions: Quart's signed cookies, opened without a signer when there is no cookie.

Quart builds the session's signer (an itsdangerous serializer, which encodes a test value
to learn its kind) on every request before it looks for the cookie. The JSON API's
requests carry none; for them the session is the empty one Quart would give, at once.
"""

from __future__ import annotations

from quart import Quart
from quart.sessions import SecureCookieSession, SecureCookieSessionInterface
from quart.wrappers import BaseRequestWebsocket

__all__ = ["CookieSessions"]


class CookieSessions(SecureCookieSessionInterface):
    """:class:`~quart.sessions.SecureCookieSessionInterface`, without building the signer
    for a request with no session cookie."""

    async def open_session(
        self, app: Quart, request: BaseRequestWebsocket
    ) -> SecureCookieSession | None:
        if app.secret_key and self.get_cookie_name(app) not in request.cookies:
            return self.session_class()  # what Quart's gives then
        return await super().open_session(app, request)
