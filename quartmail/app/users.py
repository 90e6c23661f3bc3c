"""Sign-up, shared by the HTML form and the JSON API."""

from __future__ import annotations

import unicodedata

from quart import current_app
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from quartmail import Message

from .db import Database
from .email import NEW_USERS, render_email
from .extensions import mail
from .models import USER_ID_MAX, USERNAME_MAX, User

__all__ = ["clean_name", "get_user", "sign_up"]


def clean_name(value: str) -> str:
    """The name a visitor typed, trimmed; ``ValueError`` says what is wrong."""
    name = value.strip()
    if not name:
        raise ValueError("Please enter your name.")
    if len(name) > USERNAME_MAX:
        raise ValueError(f"Names are at most {USERNAME_MAX} characters long.")
    categories = {unicodedata.category(char) for char in name}
    if "Cc" in categories:
        raise ValueError("Names cannot contain control characters.")
    if "Cs" in categories:
        # A lone surrogate (JSON's "\ud800") is no character: no database,
        # template or mail can encode it as UTF-8.
        raise ValueError("Names cannot contain unpaired surrogates (invalid Unicode).")
    if "\ufffd" in name:
        # What a form field that was not UTF-8 decodes to: the name typed is
        # lost, and storing the damaged one would hide that.
        raise ValueError(
            "The name was not sent as UTF-8 (it holds U+FFFD, the replacement character)."
        )
    return name


async def sign_up(name: str) -> tuple[User, bool]:
    """Store a new user named *name* and tell the administrator; return the
    user and whether it is new. A known name changes nothing and sends nothing.
    The notice carries a one-click unsubscribe; once the administrator has
    used it, the suppression list keeps the notices from being sent.

    The admin mail is rendered before the commit (a template error rolls the
    sign-up back). With the outbox (``MAIL_OUTBOX``) it is committed with the
    user, in one transaction; without, it is queued after the commit (no mail
    about a user that was not stored).
    """
    admin = current_app.config.get("FLASKY_ADMIN")
    async with Database.session() as session:
        user = await session.scalar(select(User).where(User.username == name))
        if user is not None:
            return user, False
        user = User(username=name)
        session.add(user)
        message: Message | None = None
        try:
            await session.flush()
            if admin:
                message = await render_email(
                    admin, "New User", "mail/new_user", unsubscribe_list=NEW_USERS, user=user
                )
                if mail.state.outbox is not None:
                    await mail.outbox.enqueue(session, message)
                    message = None  # the outbox sends it
            await session.commit()
        except IntegrityError:
            # The same name signed up a moment ago, in another request.
            await session.rollback()
            user = await session.scalar(select(User).where(User.username == name))
            if user is None:
                raise
            return user, False
    if message is not None:
        mail.send_background(message)
    return user, True


async def get_user(user_id: int) -> User | None:
    """The user with id *user_id*, or ``None``."""
    if not 0 < user_id <= USER_ID_MAX:
        return None
    async with Database.session() as session:
        return await session.get(User, user_id)
