"""Address confirmation tokens: signed, expiring, and good for nothing else.

A token carries the user's id and the address it confirms, signed with
``SECRET_KEY`` (and checked with ``SECRET_KEY_FALLBACKS`` too, as
:class:`quartmail.unsubscribe.UnsubscribeTokens` does) under a salt of its
own, so that no other value the app signs passes for one. It expires after
``FLASKY_CONFIRM_MAX_AGE`` seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

__all__ = ["SALT", "ConfirmTokenError", "ConfirmTokens", "Confirmation"]

SALT = "quartmail.app.confirm"


class ConfirmTokenError(ValueError):
    """A confirmation token is malformed, was tampered with, or has expired."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True, slots=True)
class Confirmation:
    """What a valid token says: which user, and which of their addresses."""

    user_id: int
    email: str


class ConfirmTokens:
    """Makes and checks the confirmation tokens of an app's config."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        keys = [*(config.get("SECRET_KEY_FALLBACKS") or []), config["SECRET_KEY"]]
        # itsdangerous signs with the last key and accepts every one.
        self._serializer = URLSafeTimedSerializer(keys, salt=SALT)
        self.max_age: int = config["FLASKY_CONFIRM_MAX_AGE"]

    def make(self, user_id: int, email: str) -> str:
        """A URL-safe token confirming *email* for the user *user_id*."""
        token: str = self._serializer.dumps([user_id, email])
        return token

    def check(self, token: str) -> Confirmation:
        """What *token* says; raises :class:`ConfirmTokenError` if it is not
        one of ours, was changed, or is older than ``max_age``."""
        if not token.isascii():
            # Ours are URL-safe base64; itsdangerous would fail to encode a
            # lone surrogate (a UnicodeEncodeError, not BadSignature).
            raise ConfirmTokenError("This confirmation link is not valid.")
        try:
            payload = self._serializer.loads(token, max_age=self.max_age)
        except SignatureExpired:
            raise ConfirmTokenError("This confirmation link has expired.", expired=True) from None
        except BadSignature:
            raise ConfirmTokenError("This confirmation link is not valid.") from None
        match payload:
            case [int(user_id), str(email)] if not isinstance(user_id, bool):
                return Confirmation(user_id, email)
        raise ConfirmTokenError("This confirmation link is not valid.")
