"""The app's tables (SQLAlchemy 2.0, typed declarative mapping)."""

from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["USERNAME_MAX", "Base", "User"]

USERNAME_MAX = 64


class Base(DeclarativeBase):
    pass


class User(Base):
    """Someone who signed up: Flasky's ``User``, a unique name."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(USERNAME_MAX), unique=True, index=True)

    def __repr__(self) -> str:
        return f"<User {self.id} {self.username!r}>"
