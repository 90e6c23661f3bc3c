"""Read and check the ``MAIL_*`` settings, once, when the app is set up.

Every setting is read here and nowhere else; a bad value raises
:class:`~quartmail.errors.ConfigError` naming the setting, so a mistake stops
the app at start-up instead of surprising it at the first send. Values may
come from Python (``app.config.update``) or from the environment as strings
(``app.config.from_prefixed_env()``), so booleans and numbers also accept
their usual spellings.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from .addresses import AddressLike, parse_address
from .errors import ConfigError, MailError
from .ratelimit import PERIODS, RateLimit
from .smtp import SMTPSettings, TokenProvider, make_tls_context, token_problem

if TYPE_CHECKING:
    from .dkim import DKIMSigner

__all__ = ["DevInboxSettings", "MailSettings", "is_loopback"]

log = logging.getLogger("quartmail")

# Background delivery defaults.
# A few connections already overlap the network round trips of a remote relay;
# providers and Postfix (50 per client) refuse far more than that.
POOL_SIZE = 4
# 1 + 2 + 4 + 8 + 16 s (with jitter): rides out a relay restart or a greylisting
# pass of about half a minute, then reports the failure instead of hoarding mail.
RETRIES = 5
RETRY_DELAY = 1.0
# Inside both Quart's test app shutdown limit (6 s) and Hypercorn's default
# shutdown_timeout (60 s); hypercorn.toml leaves room for it.
SHUTDOWN_TIMEOUT = 5.0
# Every message ends within this many seconds of its submit (or enqueue), delivered or
# failed, whatever the server does. An hour rides out a relay restart, a maintenance window
# or a provider's throttling (which asks for minutes); mail about a sign-up that is still
# undelivered after that is better reported to the app than kept. It is also the longest
# wait between two retries, so no retry schedule reaches past it by much.
DELIVERY_TIMEOUT = 3600.0

# The outbox. A lease must outlast any send (a connect and a few commands,
# each up to MAIL_TIMEOUT); past it, another dispatcher sends the row again.
OUTBOX_LEASE = 300.0
# How often a dispatcher looks for retries and expired leases; new mail wakes
# it at once (NOTIFY on PostgreSQL, a commit in the same process).
OUTBOX_POLL = 1.0

# How often the outbox's gauges are refreshed (a query): Prometheus' usual
# scrape interval, so a scrape sees counts at most that old.
METRICS_INTERVAL = 15.0

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True, slots=True)
class MailSettings:
    """The checked ``MAIL_*`` settings of one app (the README's table)."""

    smtp: SMTPSettings  # server, port, TLS, credentials, timeout, MAIL_DEBUG
    default_sender: AddressLike | None
    max_emails: int | None
    suppress_send: bool
    ascii_attachments: bool
    pool_size: int
    retries: int
    retry_delay: float
    shutdown_timeout: float
    delivery_timeout: float
    outbox: bool  # MAIL_OUTBOX: for the app to decide; the outbox needs its engine
    outbox_lease: float
    outbox_poll: float
    # MAIL_DKIM_*: signs every message where the core flattens it; None: unsigned
    dkim: DKIMSigner | None = None
    # MAIL_METRICS, MAIL_TRACING: None (off), True (prometheus-client's default
    # registry, OpenTelemetry's global tracer provider) or the app's own one
    metrics: object | None = None
    tracing: object | None = None
    metrics_interval: float = METRICS_INTERVAL  # MAIL_METRICS_INTERVAL: outbox gauges
    # MAIL_RATE_LIMIT: at most count MAIL FROMs in any window of period seconds; None: no limit
    rate_limit: RateLimit | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, testing: bool, debug: bool) -> MailSettings:
        """Read the settings from an app's config; ``testing`` and ``debug``
        are the app's, the defaults of MAIL_SUPPRESS_SEND and MAIL_DEBUG."""
        reader = _Reader(config)
        use_tls = reader.flag("MAIL_USE_TLS", False)
        use_ssl = reader.flag("MAIL_USE_SSL", False)
        if use_tls and use_ssl:
            raise ConfigError(
                "MAIL_USE_TLS (STARTTLS, port 587) and MAIL_USE_SSL (implicit TLS, port 465) "
                "are both on; choose one"
            )
        server = reader.text("MAIL_SERVER") or "localhost"
        port = reader.number(
            "MAIL_PORT", 465 if use_ssl else 587 if use_tls else 25, low=1, high=65535
        )
        username = reader.text("MAIL_USERNAME")
        password = reader.text("MAIL_PASSWORD")
        oauth2_token = reader.token("MAIL_OAUTH2_TOKEN")
        if oauth2_token is not None and password is not None:
            raise ConfigError(
                "MAIL_PASSWORD and MAIL_OAUTH2_TOKEN are both set: with MAIL_OAUTH2_TOKEN the "
                "login is AUTH XOAUTH2, with the token instead of a password; set only one"
            )
        if oauth2_token is not None and username is None:
            raise ConfigError(
                "MAIL_OAUTH2_TOKEN needs MAIL_USERNAME: the account (its e-mail address) "
                "the token was issued for"
            )
        timeout = reader.seconds("MAIL_TIMEOUT", 30.0)
        validate_certs = reader.flag("MAIL_VALIDATE_CERTS", True)
        ca_file = reader.text("MAIL_CA_FILE")
        if ca_file is not None and not os.path.isfile(ca_file):
            raise ConfigError(f"MAIL_CA_FILE: no such file: {ca_file!r}")
        debug_smtp = reader.flag("MAIL_DEBUG", debug)
        local_hostname = reader.text("MAIL_LOCAL_HOSTNAME")
        if local_hostname is not None and (
            not local_hostname.isascii() or any(c.isspace() for c in local_hostname)
        ):
            raise ConfigError(f"MAIL_LOCAL_HOSTNAME must be a host name, got {local_hostname!r}")

        tls_context = None
        if use_tls or use_ssl:
            try:
                tls_context = make_tls_context(validate_certs=validate_certs, ca_file=ca_file)
            except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
                raise ConfigError(f"MAIL_CA_FILE: cannot load {ca_file!r}: {err}") from err
        if username and not (use_tls or use_ssl) and not is_loopback(server):
            log.warning(
                "MAIL_USERNAME is set but neither MAIL_USE_TLS nor MAIL_USE_SSL is: "
                "the %s would cross the network to %s unencrypted",
                "password" if oauth2_token is None else "access token",
                server,
            )

        outbox_lease = reader.seconds("MAIL_OUTBOX_LEASE", OUTBOX_LEASE)
        outbox_poll = reader.seconds("MAIL_OUTBOX_POLL", OUTBOX_POLL)
        if outbox_lease < 3 * outbox_poll:
            # A dispatcher renews its leases between polls: a shorter lease
            # could run out under a live dispatcher.
            raise ConfigError(
                f"MAIL_OUTBOX_LEASE ({outbox_lease:g} s) must be at least three times "
                f"MAIL_OUTBOX_POLL ({outbox_poll:g} s)"
            )
        return cls(
            default_sender=reader.address("MAIL_DEFAULT_SENDER"),
            max_emails=reader.optional_number("MAIL_MAX_EMAILS", low=1),
            suppress_send=reader.flag("MAIL_SUPPRESS_SEND", testing),
            ascii_attachments=reader.flag("MAIL_ASCII_ATTACHMENTS", False),
            pool_size=reader.number("MAIL_POOL_SIZE", POOL_SIZE, low=1, high=1000),
            retries=reader.number("MAIL_RETRIES", RETRIES, low=0, high=100),
            retry_delay=reader.seconds("MAIL_RETRY_DELAY", RETRY_DELAY),
            shutdown_timeout=reader.seconds("MAIL_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT),
            delivery_timeout=reader.seconds("MAIL_DELIVERY_TIMEOUT", DELIVERY_TIMEOUT),
            outbox=reader.flag("MAIL_OUTBOX", False),
            outbox_lease=outbox_lease,
            outbox_poll=outbox_poll,
            dkim=_dkim_signer(config),
            metrics=reader.switch("MAIL_METRICS"),
            tracing=reader.switch("MAIL_TRACING"),
            metrics_interval=reader.seconds("MAIL_METRICS_INTERVAL", METRICS_INTERVAL),
            rate_limit=reader.rate_limit("MAIL_RATE_LIMIT"),
            smtp=SMTPSettings(
                hostname=server,
                port=port,
                use_tls=use_tls,
                use_ssl=use_ssl,
                username=username,
                password=password,
                oauth2_token=oauth2_token,
                timeout=timeout,
                tls_context=tls_context,
                local_hostname=local_hostname,
                debug=debug_smtp,
                pipelining=reader.flag("MAIL_PIPELINING", True),
            ),
        )


@dataclass(frozen=True, slots=True)
class DevInboxSettings:
    """``MAIL_DEV_INBOX`` and its companions (:mod:`quartmail.devinbox`)."""

    path: str  # MAIL_DEV_INBOX_PATH: where the app serves the inbox
    size: int  # MAIL_DEV_INBOX_SIZE: how many messages it keeps

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], *, testing: bool, debug: bool
    ) -> DevInboxSettings | None:
        """The inbox's settings, or None when ``MAIL_DEV_INBOX`` is off.

        ``MAIL_DEV_INBOX = True`` needs debug or testing (a ConfigError otherwise),
        ``"force"`` runs it anyway.
        """
        reader = _Reader(config)
        value = config.get("MAIL_DEV_INBOX")
        forced = isinstance(value, str) and value.strip().lower() == "force"
        try:
            if not forced and not reader.flag("MAIL_DEV_INBOX", False):
                return None
        except ConfigError:
            raise ConfigError(
                f'MAIL_DEV_INBOX must be true, false or "force", got {value!r}'
            ) from None
        if not (forced or debug or testing):
            # An inbox anyone can read that swallows every mail: never by accident.
            raise ConfigError(
                "MAIL_DEV_INBOX is on, but the app is neither in debug nor in testing mode: "
                "it would catch every mail and show it to anyone; turn it off in production, "
                'or set MAIL_DEV_INBOX = "force"'
            )
        path = reader.text("MAIL_DEV_INBOX_PATH") or "/dev/inbox"
        prefix = path.rstrip("/")  # the blueprint's url_prefix
        # "<" would start a URL converter; the others are not plain path characters.
        if not prefix.startswith("/") or any(c in prefix for c in "<>?#% \t\r\n\\"):
            raise ConfigError(
                f"MAIL_DEV_INBOX_PATH must be a path such as /dev/inbox, got {path!r}"
            )
        size = reader.number("MAIL_DEV_INBOX_SIZE", 50, low=1, high=10_000)
        return cls(path=prefix, size=size)


#: The settings quartmail.dkim.dkim_signer_from_config reads.
DKIM_KEYS = (
    "MAIL_DKIM_KEY",
    "MAIL_DKIM_SELECTOR",
    "MAIL_DKIM_DOMAIN",
    "MAIL_DKIM_SECOND_KEY",
    "MAIL_DKIM_SECOND_SELECTOR",
)


def _dkim_signer(config: Mapping[str, Any]) -> DKIMSigner | None:
    """The MAIL_DKIM_* signer, or None when none is set; quartmail.dkim (the
    dkim extra) is imported only then, so a plain install runs without it."""
    if not any(config.get(key) for key in DKIM_KEYS):
        return None
    from .dkim import dkim_signer_from_config  # raises naming quartmail[dkim] without it

    return dkim_signer_from_config(config)


def is_loopback(host: str) -> bool:
    """Whether *host* names this machine (``localhost`` or a loopback address):
    credentials may cross it in clear, as no network sees them."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Reader:
    """Typed access to config values, with errors that name the setting."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._config = config

    def text(self, key: str) -> str | None:
        value = self._config.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {type(value).__name__}")
        return value or None

    def token(self, key: str) -> str | TokenProvider | None:
        """An OAuth2 access token, or a callable that returns one; the error
        never shows the value."""
        value = self._config.get(key)
        if value is None or value == "":
            return None
        if isinstance(value, str):
            problem = token_problem(value)
            if problem is not None:
                raise ConfigError(f"{key} is {problem}")
            return value
        if callable(value):
            return cast(TokenProvider, value)
        raise ConfigError(
            f"{key} must be an access token (a str) or a callable "
            f"(username) -> str | Awaitable[str], got a {type(value).__name__}"
        )

    def flag(self, key: str, default: bool) -> bool:
        value = self._config.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{key} must be true or false, got {value!r}")

    def switch(self, key: str) -> object | None:
        """A flag that may instead be an object to use (a registry, a
        provider): None when off, True when on, or the object."""
        value: object = self._config.get(key)
        if value is None or isinstance(value, bool | int | str):
            return True if self.flag(key, False) else None
        return value

    def number(self, key: str, default: int, *, low: int, high: int | None = None) -> int:
        value = self.optional_number(key, low=low, high=high)
        return default if value is None else value

    def optional_number(self, key: str, *, low: int, high: int | None = None) -> int | None:
        value = self._config.get(key)
        if value is None or value == "":
            return None
        try:
            number = int(value) if not isinstance(value, bool | float) else None
        except (TypeError, ValueError):
            number = None
        if number is None or number < low or (high is not None and number > high):
            limit = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise ConfigError(f"{key} must be a whole number {limit}, got {value!r}")
        return number

    def seconds(self, key: str, default: float, *, low: float = 0.0) -> float:
        value = self._config.get(key)
        if value is None or value == "":
            return default
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not number > low or number != number or number == float("inf"):
            raise ConfigError(f"{key} must be a number of seconds above {low:g}, got {value!r}")
        return number

    def rate_limit(self, key: str) -> RateLimit | None:
        """``"N/s"``, ``"N/m"``, ``"N/h"`` or a whole number N (per second), N >= 1."""
        value = self._config.get(key)
        if value is None or value == "":
            return None
        count, letter = None, "s"
        if isinstance(value, str):
            number, _, letter = value.partition("/")
            # Digits only: no sign, no spaces, no "1e3", no "½".
            if number.isascii() and number.isdigit() and (letter in PERIODS or value == number):
                count = int(number)
                letter = letter or "s"
        elif isinstance(value, int | float) and not isinstance(value, bool):
            count = int(value) if math.isfinite(value) and value == int(value) else None
        if count is None or not 1 <= count <= 100_000 or letter not in PERIODS:
            raise ConfigError(
                f'{key} must be "N/s", "N/m" or "N/h", or a number N (per second), with N a '
                f"whole number from 1 to 100000, got {value!r}"
            )
        return RateLimit(count, PERIODS[letter])

    def address(self, key: str) -> AddressLike | None:
        value = self._config.get(key)
        if value is None or value == "":
            return None
        if isinstance(value, list):  # JSON from the environment: ["Name", "a@x.org"]
            value = tuple(value)
        try:
            parse_address(value, key)
        except MailError as err:
            raise ConfigError(str(err)) from err
        return value
