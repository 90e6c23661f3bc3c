"""The app's tables (SQLAlchemy 2.0, typed declarative mapping)."""

from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["USERNAME_MAX", "USER_ID_MAX", "Base", "User"]

USERNAME_MAX = 64
# User.id is an INTEGER: 32 bits on PostgreSQL, 64 on SQLite. A larger id can
# name no user, and the drivers refuse to send one (an error, not "no row").
USER_ID_MAX = 2**31 - 1


class Base(DeclarativeBase):
    pass


class User(Base):
    """Someone who signed up: Flasky's ``User``, a unique name."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(USERNAME_MAX), unique=True, index=True)

    def __repr__(self) -> str:
        return f"<User {self.id} {self.username!r}>"
