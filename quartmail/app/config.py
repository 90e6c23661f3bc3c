"""The app's configurations, in Flasky's shape: a base class, one class per
environment, each with an ``init_app`` hook that checks what it needs.

Nothing here reads the environment at import time: :func:`from_environment`
is called by ``create_app``.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from quart import Quart

from quartmail import ConfigError

__all__ = ["CONFIGS", "ENVIRONMENT_KEYS", "Config", "check_settings", "from_environment"]

# The settings the app takes from the environment, by their own names (as in
# Flasky: MAIL_USERNAME=... MAIL_PASSWORD=... quart run).
ENVIRONMENT_KEYS = (
    "SECRET_KEY",
    "DATABASE_URL",
    "FLASKY_ADMIN",
    "FLASKY_MAIL_SUBJECT_PREFIX",
    "FLASKY_MAIL_SENDER",
    "FLASKY_CONFIRM_MAX_AGE",
    "FLASKY_CONFIRM_MAILS_PER_HOUR",
    "FLASKY_SIGNUPS_PER_HOUR",
    "FLASKY_TRUSTED_PROXIES",
    "MAIL_SERVER",
    "MAIL_PORT",
    "MAIL_USE_TLS",
    "MAIL_USE_SSL",
    "MAIL_USERNAME",
    "MAIL_PASSWORD",
    "MAIL_OAUTH2_TOKEN",
    "MAIL_DEFAULT_SENDER",
    "MAIL_MAX_EMAILS",
    "MAIL_SUPPRESS_SEND",
    "MAIL_ASCII_ATTACHMENTS",
    "MAIL_DEBUG",
    "MAIL_TIMEOUT",
    "MAIL_VALIDATE_CERTS",
    "MAIL_CA_FILE",
    "MAIL_LOCAL_HOSTNAME",
    "MAIL_PIPELINING",
    "MAIL_POOL_SIZE",
    "MAIL_RETRIES",
    "MAIL_RETRY_DELAY",
    "MAIL_SHUTDOWN_TIMEOUT",
    "MAIL_DELIVERY_TIMEOUT",
    "MAIL_RATE_LIMIT",
    "MAIL_OUTBOX",
    "MAIL_OUTBOX_LEASE",
    "MAIL_OUTBOX_POLL",
    "MAIL_DKIM_KEY",  # PEM text works from the environment
    "MAIL_DKIM_SELECTOR",
    "MAIL_DKIM_DOMAIN",
    "MAIL_DKIM_SECOND_KEY",
    "MAIL_DKIM_SECOND_SELECTOR",
    "MAIL_METRICS",
    "MAIL_TRACING",
    "MAIL_METRICS_INTERVAL",
    "METRICS_TOKEN",
)


def from_environment() -> dict[str, str]:
    """The settings set in the environment (strings; quartmail parses them)."""
    return {key: os.environ[key] for key in ENVIRONMENT_KEYS if key in os.environ}


class Config:
    """Settings shared by every environment."""

    SECRET_KEY: str | None = None
    FLASKY_ADMIN: str | None = None
    FLASKY_MAIL_SUBJECT_PREFIX = "[Flasky] "
    FLASKY_MAIL_SENDER = "Flasky Admin <flasky@example.com>"
    DATABASE_URL: str | None = None  # default: an SQLite file in the instance folder
    # How long a mailed confirmation link works, in seconds (a day).
    FLASKY_CONFIRM_MAX_AGE = 86400
    # The abuse limits (quartmail/app/limits.py): confirmation mails to one
    # address, and sign-ups with an address (or resends) from one client, per hour.
    FLASKY_CONFIRM_MAILS_PER_HOUR = 3
    FLASKY_SIGNUPS_PER_HOUR = 20
    # How many proxies in front of the app append to X-Forwarded-For; 0: the
    # client is the peer of the connection (request.remote_addr).
    FLASKY_TRUSTED_PROXIES = 0
    # quartmail's development inbox (MAIL_DEV_INBOX) catches mail when no MAIL_SERVER is set.
    DEV_SMTP_SERVER = False
    # A sign-up's form and JSON bodies are tiny.
    MAX_CONTENT_LENGTH = 64 * 1024
    # gc.freeze() once started (see create_app): a server's choice, not a test run's.
    GC_FREEZE = False
    # Set: GET /metrics serves quartmail's metrics to who shows it as a bearer token.
    METRICS_TOKEN: str | None = None

    @staticmethod
    def init_app(app: Quart) -> None:
        """Check and complete the settings once everything has been applied."""


class DevelopmentConfig(Config):
    DEBUG = True
    DEV_SMTP_SERVER = True
    # So that a sign-up on a fresh machine shows its admin mail in /dev/inbox.
    FLASKY_ADMIN: str | None = "admin@example.com"
    # The development server logs a line per mail; the whole SMTP
    # conversation (MAIL_DEBUG's default in debug mode) is noise there.
    MAIL_DEBUG = False

    @staticmethod
    def init_app(app: Quart) -> None:
        if not app.config.get("SECRET_KEY"):
            # A fresh key per process: sessions do not survive a restart,
            # which is fine for development and never used elsewhere.
            app.config["SECRET_KEY"] = secrets.token_hex(32)


class TestingConfig(Config):
    TESTING = True
    SECRET_KEY = "testing-only-secret-key"


class ProductionConfig(Config):
    GC_FREEZE = True

    @staticmethod
    def init_app(app: Quart) -> None:
        missing = [key for key in ("SECRET_KEY", "MAIL_SERVER") if not app.config.get(key)]
        if missing:
            raise RuntimeError(
                f"production needs {' and '.join(missing)}: set "
                f"{'them' if len(missing) > 1 else 'it'} in the environment"
            )


# The app's own numeric settings, and the least each may be.
_COUNTS = {
    "FLASKY_CONFIRM_MAX_AGE": 1,
    "FLASKY_CONFIRM_MAILS_PER_HOUR": 1,
    "FLASKY_SIGNUPS_PER_HOUR": 1,
    "FLASKY_TRUSTED_PROXIES": 0,
}


def check_settings(app: Quart) -> None:
    """Parse the app's numeric settings (the environment gives strings) in
    place; :class:`~quartmail.ConfigError` names a bad one."""
    for key, least in _COUNTS.items():
        value = app.config[key]
        try:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise ValueError
            number = int(value)
        except ValueError:
            raise ConfigError(f"{key} must be a whole number, not {value!r}") from None
        if number < least:
            raise ConfigError(f"{key} must be at least {least}, not {number}")
        app.config[key] = number


CONFIGS: dict[str, type[Config]] = {
    "development": DevelopmentConfig,
    "testing": TestingConfig,
    "production": ProductionConfig,
}


def config_values(config_class: type[Config]) -> dict[str, Any]:
    """The upper-case settings of a config class (and its bases)."""
    return {key: getattr(config_class, key) for key in dir(config_class) if key.isupper()}
