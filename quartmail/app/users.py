"""Sign-up, address confirmation and its resending, shared by the HTML form
and the JSON API."""

from __future__ import annotations

import unicodedata
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from email_validator import EmailNotValidError, validate_email
from quart import current_app, request, url_for
from sqlalchemy import ColumnElement, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from quartmail import MailError, Message
from quartmail.addresses import parse_address

from .confirm import ConfirmTokenError, ConfirmTokens
from .db import LAST, Database
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
# The execution options of a transaction's last statement, and of the others.
_LAST = {LAST: True}
_NOT_LAST: dict[str, bool] = {}


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

    The mails are rendered before the commit (a template error stores and
    sends nothing). With the outbox (``MAIL_OUTBOX``) they are committed with
    the user, in one transaction; without, they are queued after the commit
    (no mail about a user that was not stored).
    """
    admin = current_app.config.get("FLASKY_ADMIN")
    # The notice needs only the name: rendered before the transaction, so that the
    # database (SQLite's one writer, the worker's one pooled connection) is held for
    # the statements alone. A known name has rendered it for nothing.
    messages: list[Message] = []
    if admin:
        messages.append(
            await render_email(
                admin, "New User", "mail/new_user", unsubscribe_list=NEW_USERS, name=name
            )
        )
    async with _transaction() as transaction:
        connection = transaction.connection
        if email is not None:
            await take_limits(connection, email)  # first: it locks
        # Without an address or the outbox the INSERT is all the transaction holds: on
        # SQLite it commits in its own trip, and the write lock (which another worker
        # process waits for by sleeping and retrying) is held for microseconds.
        last = email is None and not transaction.stores_mail
        while (user_id := await _add_user(connection, name, email, last=last)) is None:
            # A known name (maybe signed up a moment ago, in another request):
            # the rollback as the transaction closes leaves the limits uncounted.
            user = await _find_user(connection, User.username == name)
            if user is not None:
                return user, False
            # Deleted since the insert found it (by hand: the app deletes no one).
        if email is not None:
            # Its link names the new id: the one mail rendered while the database is held.
            messages.append(await confirmation_email(user_id, name, email))
        await transaction.commit(messages)
    return User(id=user_id, username=name, email=email), True


async def _add_user(
    connection: AsyncConnection, name: str, email: str | None, *, last: bool
) -> int | None:
    """Store a user named *name* in *connection*'s transaction and return its id;
    ``None`` when the name is taken. One statement (``INSERT ... ON CONFLICT
    DO NOTHING RETURNING``), which also settles the race of two sign-ups of
    one name: the second waits for the first to commit and then adds nothing.
    *last*: the transaction's last statement (see :data:`~quartmail.app.db.LAST`)."""
    statement = _ADD_USER[connection.dialect.name]
    parameters = {"name": name, "email": email}
    options = _LAST if last else _NOT_LAST
    return (await connection.execute(statement, parameters, execution_options=options)).scalar()


async def resend_confirmation(email: str) -> None:
    """Send a new confirmation mail to the latest unconfirmed user with the
    address *email* (from :func:`clean_email`), if there is one. Counted
    against the abuse limits either way, so that neither the answer nor the
    limits tell a stranger whether the address is known."""
    async with _transaction() as transaction:
        connection = transaction.connection
        await take_limits(connection, email)
        row = (
            await connection.execute(
                select(User.id, User.username)
                .where(User.email == email, User.confirmed_at.is_(None))
                .order_by(User.id.desc())
                .limit(1)
            )
        ).first()
        messages = [] if row is None else [await confirmation_email(row.id, row.username, email)]
        await transaction.commit(messages)  # the count, and the mail in the outbox


async def confirm(token: str) -> User:
    """Mark the address in *token* confirmed (again: no change) and return its
    user; :class:`~quartmail.app.confirm.ConfirmTokenError` for a token that
    is not valid, has expired, or names a user or address no longer stored."""
    async with _transaction() as transaction:
        user = await _user_of(transaction.connection, token)
        if user.confirmed_at is None:
            user.confirmed_at = datetime.now(UTC)
            await transaction.connection.execute(
                update(User)
                .where(User.id == user.id, User.confirmed_at.is_(None))
                .values(confirmed_at=user.confirmed_at)
            )
            await transaction.commit([])
    return user


async def to_confirm(token: str) -> User:
    """The user whose address *token* would confirm, changing nothing; raises as :func:`confirm`."""
    async with Database.connect() as connection:
        return await _user_of(connection, token)


async def _user_of(connection: AsyncConnection, token: str) -> User:
    confirmation = ConfirmTokens(current_app.config).check(token)
    user = await get_user(confirmation.user_id, connection)
    # The address may have changed since the mail was sent (or the user gone).
    if user is None or user.email != confirmation.email:
        raise ConfirmTokenError("This confirmation link is not valid.")
    return user


async def take_limits(connection: AsyncConnection, email: str) -> None:
    """Count a mail to *email*, asked for by this request's client, against
    ``FLASKY_CONFIRM_MAILS_PER_HOUR`` and ``FLASKY_SIGNUPS_PER_HOUR``, in
    *connection*'s transaction (before anything else in it)."""
    config = current_app.config
    client = client_key(
        request.remote_addr,
        request.headers.getlist("X-Forwarded-For"),
        config["FLASKY_TRUSTED_PROXIES"],
    )
    await take(
        connection,
        [
            Limit("client", client, config["FLASKY_SIGNUPS_PER_HOUR"]),
            Limit("address", address_key(email), config["FLASKY_CONFIRM_MAILS_PER_HOUR"]),
        ],
    )


async def confirmation_email(user_id: int, name: str, email: str) -> Message:
    """The mail with the confirmation link of the user *user_id*, named *name*
    (needs the request, for the link's host)."""
    token = ConfirmTokens(current_app.config).make(user_id, email)
    url = url_for("main.confirm_page", token=token, _external=True)
    max_hours = current_app.config["FLASKY_CONFIRM_MAX_AGE"] // 3600
    return await render_email(
        mailbox(email),
        "Confirm Your Address",
        "mail/confirm",
        name=name,
        email=email,
        url=url,
        hours=max_hours,
    )


class _Transaction:
    """A write transaction: its statements run on ``connection`` (SQLAlchemy
    Core); :meth:`commit` commits it with the mails it is to send."""

    def __init__(self, connection: AsyncConnection, session: AsyncSession | None) -> None:
        self.connection = connection
        self._session = session
        #: Whether :meth:`commit` stores the mails in it (the outbox).
        self.stores_mail = session is not None

    async def commit(self, messages: Sequence[Message]) -> None:
        """Commit, and the *messages* with it: into the outbox, in this
        transaction; or, without one, queued for delivery once it has committed."""
        if self._session is None:
            await self.connection.commit()
            for message in messages:
                mail.send_background(message)
            return
        for message in messages:
            await mail.outbox.enqueue(self._session, message)
        await self._session.commit()


@asynccontextmanager
async def _transaction() -> AsyncIterator[_Transaction]:
    # A Core connection: about a fifth less CPU than an ORM session's begin, execute
    # and commit. The outbox adds its rows through a session: with it, the transaction
    # is that session's. Left without a commit, either rolls back.
    if mail.state.outbox is None:
        async with Database.connect() as connection:
            yield _Transaction(connection, None)
    else:
        async with Database.session() as session:
            yield _Transaction(await session.connection(), session)


# Every column of a user.
_USER = select(User.id, User.username, User.email, User.confirmed_at)


async def _find_user(connection: AsyncConnection, where: ColumnElement[bool]) -> User | None:
    row = (await connection.execute(_USER.where(where))).first()
    if row is None:
        return None
    # Not tracked by any session: the caller reads it, and writes go through statements.
    return User(id=row.id, username=row.username, email=row.email, confirmed_at=row.confirmed_at)


async def get_user(user_id: int, connection: AsyncConnection | None = None) -> User | None:
    """The user with id *user_id*, or ``None`` (in *connection*'s transaction, or on a
    connection of its own)."""
    if not 0 < user_id <= USER_ID_MAX:
        return None
    if connection is not None:
        return await _find_user(connection, User.id == user_id)
    async with Database.connect() as connection:
        return await _find_user(connection, User.id == user_id)
