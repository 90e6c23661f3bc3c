"""The app's tables (SQLAlchemy 2.0, typed declarative mapping)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Float, Index, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["EMAIL_MAX", "USERNAME_MAX", "USER_ID_MAX", "Base", "LimitEvent", "User"]

USERNAME_MAX = 64
# User.id is an INTEGER: 32 bits on PostgreSQL, 64 on SQLite. A larger id can
# name no user, and the drivers refuse to send one (an error, not "no row").
USER_ID_MAX = 2**31 - 1
# The longest address that fits in SMTP's forward-path (RFC 5321 section 4.5.3.1.3,
# with its erratum 1690): email-validator's limit too.
EMAIL_MAX = 254


class Base(DeclarativeBase):
    pass


class User(Base):
    """Someone who signed up: Flasky's ``User``, a unique name, and an address
    if one was given, confirmed once its owner has followed the mailed link."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(USERNAME_MAX), unique=True, index=True)
    # Not unique: a stranger may type anyone's address; telling them it is
    # taken would say who has signed up (each user confirms their own).
    email: Mapped[str | None] = mapped_column(String(EMAIL_MAX), index=True, default=None)
    confirmed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)

    def __repr__(self) -> str:
        return f"<User {self.id} {self.username!r}>"


class LimitEvent(Base):
    """One counted action (a confirmation mail to an address, a sign-up from a
    client) for the abuse limits of :mod:`quartmail.app.limits`."""

    __tablename__ = "limit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    # The SHA-256 of the address or client, in hex: no address is kept here.
    key: Mapped[str] = mapped_column(String(64))
    # Seconds since the epoch: the same on every database, with no time zone.
    at: Mapped[float] = mapped_column(Float, index=True)

    __table_args__ = (Index("ix_limit_events_kind_key_at", "kind", "key", "at"),)
