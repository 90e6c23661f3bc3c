"""Sign-up, address confirmation and its resending, shared by the HTML form
and the JSON API."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime

from email_validator import EmailNotValidError, validate_email
from quart import current_app, request, url_for
from sqlalchemy import bindparam, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from quartmail import MailError, Message
from quartmail.addresses import parse_address

from .confirm import ConfirmTokenError, ConfirmTokens
from .db import Database
from .email import NEW_USERS, render_email
from .extensions import mail
from .limits import Limit, address_key, client_key, take
from .models import EMAIL_MAX, USER_ID_MAX, USERNAME_MAX, User

__all__ = [
    "clean_email",
    "clean_name",
    "confirm",
    "get_user",
    "resend_confirmation",
    "sign_up",
    "to_confirm",
]

# Far more than any address (EMAIL_MAX): longer input is refused before it is parsed.
_EMAIL_INPUT_MAX = 1000

# The INSERT of a new user, per dialect (the app runs on these two), built once.
_ADD_USER = {
    name: insert(User)
    .values(username=bindparam("name"), email=bindparam("email"))
    .on_conflict_do_nothing(index_elements=[User.username])
    .returning(User.id)
    for name, insert in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))
}


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


def clean_email(value: str) -> str:
    """The address a visitor typed, checked and normalized (email-validator:
    RFC 5321/5322 syntax, IDNA domains, RFC 6531 internationalized local parts,
    the length limits; no DNS lookup); ``ValueError`` says what is wrong."""
    typed = value.strip()
    if not typed:
        raise ValueError("Please enter your e-mail address.")
    if len(typed) > _EMAIL_INPUT_MAX:
        raise ValueError(f"E-mail addresses are at most {EMAIL_MAX} characters long.")
    if "\ufffd" in typed:
        # As for names: a form field that was not UTF-8; the address typed is lost.
        raise ValueError(
            "The address was not sent as UTF-8 (it holds U+FFFD, the replacement character)."
        )
    try:
        # strict: the local part's length limit too (64, RFC 5321 section 4.5.3.1.1).
        checked = validate_email(typed, check_deliverability=False, strict=True)
    except EmailNotValidError as error:
        raise ValueError(f"That is not a valid e-mail address: {error}") from None
    except ValueError:
        # Input the IDNA codec cannot take at all (a lone surrogate, say).
        raise ValueError("That is not a valid e-mail address.") from None
    address: str = checked.normalized
    try:
        # What the mail library will send to: its limits count octets (a
        # non-ASCII local part is longer in UTF-8 than in characters).
        parse_address(mailbox(address), "email")
    except MailError as error:
        raise ValueError(f"That is not an e-mail address we can send to: {error}") from None
    if len(address) > EMAIL_MAX:
        raise ValueError(f"E-mail addresses are at most {EMAIL_MAX} characters long.")
    return address


def mailbox(address: str) -> str:
    """*address* (from :func:`clean_email`) as it goes on the wire: its domain
    as the A-label of IDNA 2008 (RFC 5891), which email-validator computes;
    the mail library would encode it with Python's IDNA 2003 codec, which
    maps some names to other domains ("ß" to "ss")."""
    checked = validate_email(address, check_deliverability=False, strict=True)
    return f"{checked.local_part}@{checked.ascii_domain}"


async def sign_up(name: str, email: str | None = None) -> tuple[User, bool]:
    """Store a new user named *name* and tell the administrator; return the
    user and whether it is new. A known name changes nothing and sends nothing.
    The notice carries a one-click unsubscribe; once the administrator has
    used it, the suppression list keeps the notices from being sent.

    With an *email* (from :func:`clean_email`) the request is counted against
    the abuse limits in the same transaction
    (:class:`~quartmail.app.limits.LimitReachedError` when one is full: nothing
    is stored or sent), and a new user is stored with the address unconfirmed
    and sent a confirmation mail. The response is the same
    whoever else gave that address: nothing tells a stranger it is known.

    The mails are rendered before the commit (a template error rolls the
    sign-up back). With the outbox (``MAIL_OUTBOX``) they are committed with
    the user, in one transaction; without, they are queued after the commit
    (no mail about a user that was not stored).
    """
    admin = current_app.config.get("FLASKY_ADMIN")
    async with Database.session() as session:
        if email is not None:
            await take_limits(session, email)  # first: it locks
        while (user_id := await _add_user(session, name, email)) is None:
            # A known name (maybe signed up a moment ago, in another request):
            # the rollback as the session closes leaves the limits uncounted.
            user = await session.scalar(select(User).where(User.username == name))
            if user is not None:
                return user, False
            # Deleted since the insert found it (by hand: the app deletes no one).
        user = User(id=user_id, username=name, email=email)
        messages: list[Message] = []
        if admin:
            messages.append(
                await render_email(
                    admin, "New User", "mail/new_user", unsubscribe_list=NEW_USERS, user=user
                )
            )
        if email is not None:
            messages.append(await confirmation_email(user, email))
        messages = await _enqueue(session, messages)
        await session.commit()
    for message in messages:
        mail.send_background(message)
    return user, True


async def _add_user(session: AsyncSession, name: str, email: str | None) -> int | None:
    """Store a user named *name* in *session*'s transaction and return its id;
    ``None`` when the name is taken. One statement (``INSERT ... ON CONFLICT
    DO NOTHING RETURNING``), which also settles the race of two sign-ups of
    one name: the second waits for the first to commit and then adds nothing."""
    connection = await session.connection()
    statement = _ADD_USER[connection.dialect.name]
    return (await connection.execute(statement, {"name": name, "email": email})).scalar()


async def resend_confirmation(email: str) -> None:
    """Send a new confirmation mail to the latest unconfirmed user with the
    address *email* (from :func:`clean_email`), if there is one. Counted
    against the abuse limits either way, so that neither the answer nor the
    limits tell a stranger whether the address is known."""
    async with Database.session() as session:
        await take_limits(session, email)
        user = await session.scalar(
            select(User)
            .where(User.email == email, User.confirmed_at.is_(None))
            .order_by(User.id.desc())
            .limit(1)
        )
        messages = [] if user is None else [await confirmation_email(user, email)]
        messages = await _enqueue(session, messages)
        await session.commit()  # the count, and the mail in the outbox
    for message in messages:
        mail.send_background(message)


async def confirm(token: str) -> User:
    """Mark the address in *token* confirmed (again: no change) and return its
    user; :class:`~quartmail.app.confirm.ConfirmTokenError` for a token that
    is not valid, has expired, or names a user or address no longer stored."""
    async with Database.session() as session:
        user = await _user_of(session, token)
        if user.confirmed_at is None:
            user.confirmed_at = datetime.now(UTC)
            await session.commit()
    return user


async def to_confirm(token: str) -> User:
    """The user whose address *token* would confirm, changing nothing; raises as :func:`confirm`."""
    async with Database.session() as session:
        return await _user_of(session, token)


async def _user_of(session: AsyncSession, token: str) -> User:
    confirmation = ConfirmTokens(current_app.config).check(token)
    user = await get_user(confirmation.user_id, session)
    # The address may have changed since the mail was sent (or the user gone).
    if user is None or user.email != confirmation.email:
        raise ConfirmTokenError("This confirmation link is not valid.")
    return user


async def take_limits(session: AsyncSession, email: str) -> None:
    """Count a mail to *email*, asked for by this request's client, against
    ``FLASKY_CONFIRM_MAILS_PER_HOUR`` and ``FLASKY_SIGNUPS_PER_HOUR``, in
    *session*'s transaction (before anything else in it)."""
    config = current_app.config
    client = client_key(
        request.remote_addr,
        request.headers.getlist("X-Forwarded-For"),
        config["FLASKY_TRUSTED_PROXIES"],
    )
    await take(
        await session.connection(),
        [
            Limit("client", client, config["FLASKY_SIGNUPS_PER_HOUR"]),
            Limit("address", address_key(email), config["FLASKY_CONFIRM_MAILS_PER_HOUR"]),
        ],
    )


async def confirmation_email(user: User, email: str) -> Message:
    """The mail with *user*'s confirmation link (needs the request, for the link's host)."""
    token = ConfirmTokens(current_app.config).make(user.id, email)
    url = url_for("main.confirm_page", token=token, _external=True)
    max_hours = current_app.config["FLASKY_CONFIRM_MAX_AGE"] // 3600
    return await render_email(
        mailbox(email),
        "Confirm Your Address",
        "mail/confirm",
        user=user,
        email=email,
        url=url,
        hours=max_hours,
    )


async def _enqueue(session: AsyncSession, messages: list[Message]) -> list[Message]:
    # With the outbox, the messages join the session's transaction and none
    # is left to send; without, all of them are, once it has committed.
    if mail.state.outbox is None:
        return messages
    for message in messages:
        await mail.outbox.enqueue(session, message)
    return []


async def get_user(user_id: int, session: AsyncSession | None = None) -> User | None:
    """The user with id *user_id*, or ``None`` (in *session*, or a session of its own)."""
    if not 0 < user_id <= USER_ID_MAX:
        return None
    if session is not None:
        return await session.get(User, user_id)
    async with Database.session() as session:
        return await session.get(User, user_id)
