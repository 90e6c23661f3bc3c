"""Flask-Mail's view of an app's mail settings.

Flask-Mail keeps a ``_Mail`` in ``app.extensions["mail"]`` and code written
for it (other extensions, tests) reads the settings there as attributes:
``current_app.extensions["mail"].default_sender``. :class:`FlaskMailSettings`
gives quartmail's state the same attributes, read from its checked
:class:`~quartmail.settings.MailSettings`. ``default_sender`` and
``ascii_attachments`` may be changed, as Flask-Mail's tests do; the others
describe connections already configured, and changing one raises a
:class:`~quartmail.ConfigError` rather than being silently ignored. The
password is not among them: it stays out of reach, as of every repr.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Generic, Self, TypeVar, overload

from .addresses import AddressLike, parse_address
from .errors import ConfigError, MailError
from .settings import MailSettings

__all__ = ["FlaskMailSettings"]

T = TypeVar("T")


class _ReadOnly(Generic[T]):
    """A setting read from the state's MailSettings; fixed once Mail is set up."""

    def __init__(self, key: str, read: Callable[[MailSettings], T]) -> None:
        self.key = key
        self.read = read
        self.name = key

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.name = name

    @overload
    def __get__(self, state: None, owner: type[Any]) -> Self: ...

    @overload
    def __get__(self, state: FlaskMailSettings, owner: type[Any]) -> T: ...

    def __get__(self, state: FlaskMailSettings | None, owner: type[Any]) -> T | Self:
        if state is None:
            return self
        return self.read(state.settings)

    def __set__(self, state: FlaskMailSettings, value: object) -> None:
        raise ConfigError(
            f"{self.name} cannot be changed once Mail is set up: "
            f"set app.config[{self.key!r}] before Mail(app) or init_app(app)"
        )


class FlaskMailSettings:
    """The attributes of Flask-Mail's ``_Mail``, on quartmail's state."""

    settings: MailSettings

    server = _ReadOnly("MAIL_SERVER", lambda settings: settings.smtp.hostname)
    port = _ReadOnly("MAIL_PORT", lambda settings: settings.smtp.port)
    username = _ReadOnly("MAIL_USERNAME", lambda settings: settings.smtp.username)
    use_tls = _ReadOnly("MAIL_USE_TLS", lambda settings: settings.smtp.use_tls)
    use_ssl = _ReadOnly("MAIL_USE_SSL", lambda settings: settings.smtp.use_ssl)
    debug = _ReadOnly("MAIL_DEBUG", lambda settings: int(settings.smtp.debug))
    max_emails = _ReadOnly("MAIL_MAX_EMAILS", lambda settings: settings.max_emails)
    suppress = _ReadOnly("MAIL_SUPPRESS_SEND", lambda settings: settings.suppress_send)

    @property
    def default_sender(self) -> AddressLike | None:
        """``MAIL_DEFAULT_SENDER``; may be changed (it is checked)."""
        return self.settings.default_sender

    @default_sender.setter
    def default_sender(self, value: AddressLike | None) -> None:
        if value is not None:
            try:
                parse_address(value, "MAIL_DEFAULT_SENDER")
            except MailError as err:
                raise ConfigError(str(err)) from None
        self.settings = replace(self.settings, default_sender=value)

    @property
    def ascii_attachments(self) -> bool:
        """``MAIL_ASCII_ATTACHMENTS``; may be changed."""
        return self.settings.ascii_attachments

    @ascii_attachments.setter
    def ascii_attachments(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ConfigError(f"MAIL_ASCII_ATTACHMENTS must be True or False, got {value!r}")
        self.settings = replace(self.settings, ascii_attachments=value)
