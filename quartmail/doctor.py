"""Check an app's mail set-up without sending a message (``quart --app ... mail doctor``).

:func:`diagnose` reads the app's settings and returns :class:`Finding` objects, each with a
level (``ok``, ``warning`` or ``error``), what was found and what to do about it:

- **settings**: a setting that does not parse, MAIL_SUPPRESS_SEND left on, certificates not
  checked (MAIL_VALIDATE_CERTS off);
- **connection** and **tls**: whether the server answers, and in which TLS mode, against the
  configured one: implicit TLS (port 465), STARTTLS (port 587) or none, with the setting to change
  when they differ; a server that offers no STARTTLS;
- **certificate**: not trusted, expired, not yet valid, or for another host name, in plain words
  with the setting to change (MAIL_CA_FILE, MAIL_SERVER); one about to expire;
- **auth**: the login with MAIL_USERNAME and MAIL_PASSWORD through quartmail's own session code
  (:class:`~quartmail.smtp.SMTPSession`), AUTH not offered, or (without a user name) whether the
  server takes ``MAIL FROM`` without a login;
- **extensions**: SIZE, PIPELINING, CHUNKING, SMTPUTF8 and 8BITMIME as the server offers them;
- with ``dns=True`` (dnspython, the ``doctor`` extra): the sender domain's **spf** record, the
  **dkim** public key against MAIL_DKIM_KEY, and the **dmarc** policy.

Each connection is bounded by MAIL_TIMEOUT. No finding ever contains the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import aiosmtplib

from ._extras import missing_extra
from .addresses import parse_address
from .errors import AuthenticationError, ConfigError, MailError, SendError
from .settings import MailSettings, is_loopback
from .smtp import SMTPSession, SMTPSettings

if TYPE_CHECKING:
    from quart import Quart

    from .dkim import DKIMSigner

__all__ = ["Finding", "Level", "all_well", "check_dns", "check_smtp", "diagnose"]

Level = Literal["ok", "warning", "error"]
_TLSMode = Literal["none", "starttls", "implicit"]

# A certificate closer than this to its end is worth a warning: time to renew.
_EXPIRY_WARNING_DAYS = 14

# OpenSSL's verification results (X509_V_ERR_*), as ssl.SSLCertVerificationError.verify_code.
_NOT_YET_VALID = 9
_EXPIRED = 10
_UNTRUSTED = frozenset({2, 18, 19, 20, 21})  # no issuer, self-signed, unknown CA
_WRONG_NAME = frozenset({62, 64})  # host name / IP address mismatch

_SPF = re.compile(r"v=spf1(?:\s|$)", re.IGNORECASE)
_SPF_ALL = re.compile(r"([+?~-]?)all", re.IGNORECASE)
_DMARC = re.compile(r"v\s*=\s*DMARC1\s*(?:;|$)")


@dataclass(frozen=True, slots=True)
class Finding:
    """One result of the doctor: its ``level``, the ``topic`` (``settings``, ``server``,
    ``connection``, ``tls``, ``certificate``, ``auth``, ``extensions``, ``dns``, ``spf``,
    ``dkim``, ``dmarc``), ``what`` was found, and what to ``do`` about it (empty when nothing
    is to be done)."""

    level: Level
    topic: str
    what: str
    do: str = ""


def all_well(findings: Sequence[Finding]) -> bool:
    """True when every finding is ``ok``: the doctor's exit status is 0 only then."""
    return all(finding.level == "ok" for finding in findings)


async def diagnose(
    app: Quart,
    *,
    dns: bool = False,
    domain: str | None = None,
    dkim_selector: str | None = None,
    nameserver: tuple[str, int] | None = None,
) -> list[Finding]:
    """Check *app*'s mail settings, its SMTP server and, with *dns*, the DNS records of its
    sender domain (*domain*, or MAIL_DEFAULT_SENDER's). No message is sent.

    The settings are the app's :class:`~quartmail.Mail` state, or read from its config when
    it has none. *dkim_selector* checks a key that the mail provider signs with (when
    MAIL_DKIM_KEY is not set); *nameserver* ``(ip, port)`` asks that DNS server instead of
    the system's.
    """
    state = app.extensions.get("mail")
    settings = getattr(state, "settings", None)
    if not isinstance(settings, MailSettings):
        try:
            settings = MailSettings.from_config(app.config, testing=app.testing, debug=app.debug)
        except ConfigError as err:
            return [Finding("error", "settings", str(err), "Fix the setting it names.")]
    findings: list[Finding] = []
    if settings.suppress_send:
        findings.append(
            Finding(
                "warning",
                "settings",
                "MAIL_SUPPRESS_SEND is on (the default when TESTING is): the app records mail "
                "instead of sending it.",
                "Set MAIL_SUPPRESS_SEND = False where mail must go out.",
            )
        )
    findings += await check_smtp(settings)
    if dns:
        findings += await _dns_for(app.config, settings, domain, dkim_selector, nameserver)
    # No finding shows the password: the probes never send it, and the login's errors
    # come from quartmail.smtp, which redacts it.
    return findings


async def check_smtp(settings: MailSettings) -> list[Finding]:
    """Connect to the SMTP server as the settings say, without sending a message, and report
    the TLS mode, the certificate, the extensions and the login."""
    smtp = settings.smtp
    if smtp.local_hostname is None:
        # As the app does; aiosmtplib would otherwise look it up on every connect.
        smtp = dataclasses.replace(smtp, local_hostname=await asyncio.to_thread(socket.getfqdn))
    mode: _TLSMode = "implicit" if smtp.use_ssl else "starttls" if smtp.use_tls else "none"
    login = f"login {smtp.username!r}" if smtp.username else "no login"
    findings = [
        Finding(
            "ok",
            "server",
            f"Checking {smtp.hostname}:{smtp.port}, {_mode_name(mode)}, {login}, "
            f"MAIL_TIMEOUT {smtp.timeout:g} s.",
        )
    ]
    if smtp.tls_context is not None and smtp.tls_context.verify_mode == ssl.CERT_NONE:
        findings.append(
            Finding(
                "warning",
                "certificate",
                "MAIL_VALIDATE_CERTS is off: the server's certificate is not checked, so anyone "
                "on the way can read the mail and the password.",
                "Set MAIL_VALIDATE_CERTS = True; for a server with a private or self-signed CA, "
                "set MAIL_CA_FILE to that CA's certificate instead.",
            )
        )
    sender = None if smtp.username else _probe_sender(settings)
    try:
        probe = await _probe(smtp, mode, smtp.tls_context, sender)
    except Exception as err:
        return findings + await _connect_failure(smtp, mode, err)
    findings += _tls_findings(smtp, mode, probe)
    if mode == "starttls" and not probe.starttls_offered:
        return findings
    findings.append(_extensions_finding(probe, settings))
    findings += await _auth_findings(smtp, mode, probe)
    return findings


# --- SMTP ---


@dataclass(frozen=True, slots=True)
class _Probe:
    """What one connection saw, up to EHLO after TLS (and MAIL FROM, when asked)."""

    starttls_offered: bool  # in the EHLO reply before any TLS
    tls_version: str | None
    peer_certificate: dict[str, Any] | None
    extensions: dict[str, str]  # aiosmtplib's parse: lower-case keyword -> parameters
    auth_methods: list[str]
    mail_from: tuple[int, str] | None  # the reply to MAIL FROM, then RSET


async def _probe(
    smtp: SMTPSettings, mode: _TLSMode, context: ssl.SSLContext | None, sender: str | None
) -> _Probe:
    """Connect in *mode*, EHLO, STARTTLS (in ``starttls`` mode, when offered), EHLO again,
    optionally MAIL FROM and RSET, and QUIT: all within MAIL_TIMEOUT.

    aiosmtplib directly, not SMTPSession: the session cannot show what the server offers
    before and after STARTTLS, and never speaks a mode other than the configured one.
    """
    client = aiosmtplib.SMTP(
        hostname=smtp.hostname,
        port=smtp.port,
        use_tls=mode == "implicit",
        start_tls=False,
        tls_context=context if mode == "implicit" else None,
        local_hostname=smtp.local_hostname,
        timeout=smtp.timeout,
    )
    try:
        async with asyncio.timeout(smtp.timeout):
            await client.connect()
            await client.ehlo()
            starttls_offered = client.supports_extension("starttls")
            if mode == "starttls" and starttls_offered:
                await client.starttls(tls_context=context)
                await client.ehlo()  # RFC 3207 section 4.2: forget what was offered before TLS
            ssl_object = client.get_transport_info("ssl_object")
            reply = None
            if sender is not None:
                try:
                    response = await client.mail(sender)
                    reply = (response.code, response.message)
                except aiosmtplib.SMTPResponseException as err:
                    reply = (err.code, err.message)
                with contextlib.suppress(aiosmtplib.SMTPException):
                    await client.rset()
            probe = _Probe(
                starttls_offered=starttls_offered,
                tls_version=ssl_object.version() if ssl_object is not None else None,
                peer_certificate=ssl_object.getpeercert() if ssl_object is not None else None,
                extensions=dict(client.esmtp_extensions),
                auth_methods=list(client.server_auth_methods),
                mail_from=reply,
            )
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit()
            return probe
    finally:
        client.close()


def _probe_sender(settings: MailSettings) -> str:
    """The reverse-path for MAIL FROM: the default sender, or the null one (``<>``)."""
    if settings.default_sender is None:
        return ""
    try:
        mailbox = parse_address(settings.default_sender)
    except MailError:
        return ""
    # A non-ASCII local part would need SMTPUTF8; the extensions finding reports that.
    return mailbox.addr if mailbox.addr.isascii() else ""


async def _connect_failure(smtp: SMTPSettings, mode: _TLSMode, err: Exception) -> list[Finding]:
    where = f"{smtp.hostname}:{smtp.port}"
    certificate = _certificate_error(err)
    if certificate is not None:
        return await _certificate_findings(smtp, certificate)
    # A server that never greets may be waiting for a TLS handshake: port 465.
    if isinstance(err, TimeoutError) and mode != "implicit" and await _answers(smtp, "implicit"):
        return [
            Finding(
                "error",
                "tls",
                f"{where} expects TLS from the first byte (implicit TLS, as on port 465), "
                f"but {_mode_name(mode)} is configured: the server never greets in plain text.",
                "Set MAIL_USE_SSL = True and MAIL_USE_TLS = False (or, for STARTTLS, use "
                "the server's port 587).",
            )
        ]
    plain = None
    if mode == "implicit" and _ssl_error(err) is not None:
        # The handshake failed without a certificate problem: is it plain SMTP?
        with contextlib.suppress(Exception):
            plain = await _probe(smtp, "none", None, None)
    if plain is not None:
        if plain.starttls_offered:
            do = (
                "Set MAIL_USE_TLS = True and MAIL_USE_SSL = False (or, for implicit TLS, use "
                "the server's port 465)."
            )
            offers = "speaks plain SMTP and offers STARTTLS (as on port 587)"
        else:
            do = (
                "Use your provider's port for implicit TLS (465, MAIL_USE_SSL = True) or for "
                "STARTTLS (587, MAIL_USE_TLS = True); check MAIL_SERVER and MAIL_PORT."
            )
            offers = "speaks plain SMTP without any TLS"
        return [
            Finding(
                "error",
                "tls",
                f"{where} {offers}, but MAIL_USE_SSL expects TLS from the first byte: "
                "the TLS handshake fails.",
                do,
            )
        ]
    if isinstance(err, TimeoutError):
        return [
            Finding(
                "error",
                "connection",
                f"{where} did not answer within {smtp.timeout:g} s (MAIL_TIMEOUT).",
                "Check MAIL_SERVER and MAIL_PORT, and that no firewall drops the connection "
                "(many hosting providers block outgoing port 25); raise MAIL_TIMEOUT for a "
                "slow server.",
            )
        ]
    if isinstance(err, aiosmtplib.SMTPConnectResponseError):
        return [
            Finding(
                "error",
                "connection",
                f"{where} refused the connection: {err.code} {err.message}",
                "A 421 is temporary (a connection limit, a restart): try again later; "
                "otherwise check MAIL_SERVER and MAIL_PORT.",
            )
        ]
    return [
        Finding(
            "error",
            "connection",
            f"Cannot connect to {where}: {_text(err)}",
            "Check MAIL_SERVER and MAIL_PORT (and that the server runs and is reachable).",
        )
    ]


async def _answers(smtp: SMTPSettings, mode: _TLSMode) -> bool:
    """Does the server greet in *mode*? Certificates unchecked: only the protocol matters."""
    try:
        await _probe(smtp, mode, _unverified_context() if mode != "none" else None, None)
    except Exception:
        return False
    return True


def _tls_findings(smtp: SMTPSettings, mode: _TLSMode, probe: _Probe) -> list[Finding]:
    where = f"{smtp.hostname}:{smtp.port}"
    loopback = is_loopback(smtp.hostname)
    if mode == "implicit":
        return [
            Finding("ok", "tls", f"{where}: implicit TLS ({probe.tls_version})."),
            *_expiry_findings(probe),
        ]
    if mode == "starttls":
        if not probe.starttls_offered:
            hint = (
                "port 25 is for server-to-server relay; your provider's submission port is "
                "usually 587. "
                if smtp.port == 25
                else ""
            )
            return [
                Finding(
                    "error",
                    "tls",
                    f"{where} offers no STARTTLS, which MAIL_USE_TLS requires: every send fails.",
                    f"Use a port that offers STARTTLS ({hint}check MAIL_PORT), or implicit TLS "
                    "(port 465, MAIL_USE_SSL = True); only for a relay on this machine set "
                    "MAIL_USE_TLS = False.",
                )
            ]
        return [
            Finding("ok", "tls", f"{where}: STARTTLS ({probe.tls_version})."),
            *_expiry_findings(probe),
        ]
    if loopback:
        return [Finding("ok", "tls", f"{where}: plain SMTP to this machine; nothing leaves it.")]
    if probe.starttls_offered:
        return [
            Finding(
                "warning",
                "tls",
                f"{where} offers STARTTLS, but neither MAIL_USE_TLS nor MAIL_USE_SSL is set: "
                "mail (and the password) cross the network unencrypted.",
                "Set MAIL_USE_TLS = True.",
            )
        ]
    return [
        Finding(
            "error" if smtp.username else "warning",
            "tls",
            f"{where} offers no TLS at all: mail"
            + (" and the password cross" if smtp.username else " crosses")
            + " the network unencrypted.",
            "Use your provider's port for implicit TLS (465, MAIL_USE_SSL = True) or for "
            "STARTTLS (587, MAIL_USE_TLS = True).",
        )
    ]


def _expiry_findings(probe: _Probe) -> list[Finding]:
    not_after = (probe.peer_certificate or {}).get("notAfter")
    if not isinstance(not_after, str):  # unchecked certificate: Python shows no fields
        return []
    days = (ssl.cert_time_to_seconds(not_after) - time.time()) / 86400
    if days > _EXPIRY_WARNING_DAYS:
        return [Finding("ok", "certificate", f"Certificate valid until {not_after}.")]
    return [
        Finding(
            "warning",
            "certificate",
            f"The server's certificate expires on {not_after} (in {max(days, 0):.0f} days); "
            "then every connection fails.",
            "Ask the server's operator to renew its certificate.",
        )
    ]


async def _certificate_findings(
    smtp: SMTPSettings, error: ssl.SSLCertVerificationError
) -> list[Finding]:
    where = f"{smtp.hostname}:{smtp.port}"
    reason = error.verify_message
    never_off = " Do not turn MAIL_VALIDATE_CERTS off: anyone on the way could then read the mail."
    if error.verify_code in _WRONG_NAME:
        names = await _certificate_names(smtp)
        if names:
            do = f"Set MAIL_SERVER to a name the certificate is for: {', '.join(names)}."
            what = f"The certificate of {where} is for {', '.join(names)}, not {smtp.hostname}."
        else:
            do = "Set MAIL_SERVER to the host name the server's certificate is for."
            what = f"The certificate of {where} is not for {smtp.hostname} ({reason})."
        return [Finding("error", "certificate", what, do + never_off)]
    if error.verify_code == _EXPIRED:
        return [
            Finding(
                "error",
                "certificate",
                f"The certificate of {where} has expired.",
                "Ask the server's operator to renew it." + never_off,
            )
        ]
    if error.verify_code == _NOT_YET_VALID:
        return [
            Finding(
                "error",
                "certificate",
                f"The certificate of {where} is not valid yet.",
                "Check this machine's clock (and the server's certificate).",
            )
        ]
    if error.verify_code in _UNTRUSTED:
        return [
            Finding(
                "error",
                "certificate",
                f"The certificate of {where} is not signed by a CA this machine trusts ({reason}).",
                "If the server uses a private or self-signed CA, set MAIL_CA_FILE to that CA's "
                "certificate (PEM); if it should have a public one, its operator must send the "
                "intermediate certificates too." + never_off,
            )
        ]
    return [
        Finding(
            "error",
            "certificate",
            f"The certificate of {where} was refused: {reason}.",
            "Ask the server's operator to fix its certificate." + never_off,
        )
    ]


async def _certificate_names(smtp: SMTPSettings) -> list[str]:
    """The names a certificate is for, from a connection that checks the CA but not the
    name (the verification failed on the name alone, so the CA is trusted)."""
    context = ssl.create_default_context()
    if smtp.tls_context is not None:
        for der in smtp.tls_context.get_ca_certs(binary_form=True):
            context.load_verify_locations(cadata=der)
    context.check_hostname = False
    try:
        mode: _TLSMode = "implicit" if smtp.use_ssl else "starttls"
        probe = await _probe(smtp, mode, context, None)
    except Exception:
        return []
    alt_names = (probe.peer_certificate or {}).get("subjectAltName", ())
    return [str(value) for _, value in alt_names]


def _extensions_finding(probe: _Probe, settings: MailSettings) -> Finding:
    offered = probe.extensions
    shown = []
    for name in ("SIZE", "PIPELINING", "CHUNKING", "SMTPUTF8", "8BITMIME"):
        if name.lower() not in offered:
            continue
        size = offered[name.lower()].strip()
        if name == "SIZE" and size.isdigit() and int(size) > 0:
            shown.append(f"SIZE {int(size) / 2**20:.1f} MiB")
        else:
            shown.append(name)
    missing = [
        name
        for name in ("SIZE", "PIPELINING", "CHUNKING", "SMTPUTF8", "8BITMIME")
        if name.lower() not in offered
    ]
    what = f"The server offers: {', '.join(shown) or 'none of them'}"
    what += f"; not: {', '.join(missing)}." if missing else "."
    sender = settings.default_sender
    mailbox = None
    with contextlib.suppress(MailError):
        mailbox = parse_address(sender) if sender is not None else None
    if mailbox is not None and mailbox.needs_smtputf8 and "smtputf8" not in offered:
        return Finding(
            "error",
            "extensions",
            what + f" MAIL_DEFAULT_SENDER ({mailbox.addr}) needs SMTPUTF8.",
            "Use a server that offers SMTPUTF8, or an ASCII sender address.",
        )
    return Finding("ok", "extensions", what)


async def _auth_findings(smtp: SMTPSettings, mode: _TLSMode, probe: _Probe) -> list[Finding]:
    if smtp.username is None:
        return [_mail_from_finding(probe)]
    if "auth" not in probe.extensions:
        hint = (
            "It may offer AUTH only after STARTTLS: set MAIL_USE_TLS = True. "
            if mode == "none" and probe.starttls_offered
            else ""
        )
        return [
            Finding(
                "error",
                "auth",
                f"MAIL_USERNAME is set, but the server offers no AUTH"
                f"{' on this connection' if mode == 'none' else ''}.",
                hint + "Check that MAIL_PORT is the submission port (587 or 465), not the relay "
                "port 25; or unset MAIL_USERNAME if the server accepts you by address.",
            )
        ]
    offered = " ".join(probe.auth_methods).upper()
    if smtp.oauth2_token is not None:
        if "xoauth2" not in probe.auth_methods:
            return [
                Finding(
                    "error",
                    "auth",
                    f"MAIL_OAUTH2_TOKEN is set, but the server offers AUTH {offered} only, "
                    "not XOAUTH2.",
                    "Use the provider's OAuth2 SMTP server (smtp.office365.com:587, "
                    "smtp.gmail.com:465), or log in with MAIL_PASSWORD instead.",
                )
            ]
    elif not any(method in probe.auth_methods for method in aiosmtplib.SMTP.AUTH_METHODS):
        return [
            Finding(
                "error",
                "auth",
                f"The server offers AUTH {offered} only; "
                "quartmail logs in with PLAIN, LOGIN or CRAM-MD5 (or XOAUTH2 with "
                "MAIL_OAUTH2_TOKEN).",
                "Enable password (PLAIN or LOGIN) logins for the account at the provider, set "
                "MAIL_OAUTH2_TOKEN if it offers XOAUTH2, or use another server.",
            )
        ]
    user = f"{smtp.username!r}"
    try:
        # The app's own session code: connect, TLS and login exactly as a send does.
        async with asyncio.timeout(smtp.timeout):
            session = await SMTPSession.open(smtp)
            await session.close()
    except AuthenticationError as err:
        return [Finding("error", "auth", str(err), _login_refused_advice(err.code))]
    except (SendError, TimeoutError) as err:
        reason = str(err) or f"no answer within {smtp.timeout:g} s (MAIL_TIMEOUT)"
        return [
            Finding(
                "error",
                "auth",
                f"Logging in as {user} failed: {reason}",
                "Check MAIL_USERNAME and MAIL_PASSWORD (or MAIL_OAUTH2_TOKEN), and the findings "
                "above.",
            )
        ]
    return [Finding("ok", "auth", f"Logged in as {user}.")]


def _login_refused_advice(code: int | None) -> str:
    if code == 534:
        # Gmail: "534 5.7.9 Application-specific password required".
        return (
            "The provider wants an app password: create one in the account's security "
            "settings and set it as MAIL_PASSWORD."
        )
    if code == 538 or code == 530:
        return "The server wants encryption first: set MAIL_USE_TLS = True (or MAIL_USE_SSL)."
    if code is not None and 400 <= code < 500:
        return "The server refused for now (a temporary failure): try again later."
    return (
        "Check MAIL_USERNAME and MAIL_PASSWORD (or the token MAIL_OAUTH2_TOKEN gives: "
        "expired, or without the SMTP scope). With two-step sign-in (Gmail, Outlook.com, "
        "iCloud, Yahoo), MAIL_PASSWORD must be an app password, not the account's password; "
        "Microsoft 365 also needs SMTP AUTH enabled for the mailbox."
    )


def _mail_from_finding(probe: _Probe) -> Finding:
    if probe.mail_from is None:
        return Finding("ok", "auth", "No MAIL_USERNAME: the app sends without logging in.")
    code, text = probe.mail_from
    if code == 250:
        return Finding(
            "ok", "auth", "No MAIL_USERNAME: the server takes mail from the sender without a login."
        )
    reply = f"{code} {text}"
    if "starttls" in text.lower():
        return Finding(
            "error",
            "auth",
            f"The server wants STARTTLS before any mail: {reply}",
            "Set MAIL_USE_TLS = True.",
        )
    if code == 530 or "auth" in text.lower():
        return Finding(
            "error",
            "auth",
            f"The server wants a login before any mail: {reply}",
            "Set MAIL_USERNAME and MAIL_PASSWORD.",
        )
    return Finding(
        "error" if code >= 500 else "warning",
        "auth",
        f"The server refuses mail from the sender: {reply}",
        "Check MAIL_DEFAULT_SENDER: the server must accept it as a sender (and may want a "
        "login: MAIL_USERNAME, MAIL_PASSWORD).",
    )


def _certificate_error(err: BaseException) -> ssl.SSLCertVerificationError | None:
    # STARTTLS raises it as it is; implicit TLS wraps it in SMTPConnectError.
    for cause in _chain(err):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
    return None


def _ssl_error(err: BaseException) -> ssl.SSLError | None:
    for cause in _chain(err):
        if isinstance(cause, ssl.SSLError):
            return cause
    return None


def _chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _unverified_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _mode_name(mode: _TLSMode) -> str:
    names = {
        "none": "plain SMTP",
        "starttls": "STARTTLS (MAIL_USE_TLS)",
        "implicit": "implicit TLS (MAIL_USE_SSL)",
    }
    return names[mode]


def _text(err: BaseException) -> str:
    if isinstance(err, aiosmtplib.SMTPException):
        return err.message
    return str(err) or type(err).__name__


# --- DNS ---


async def _dns_for(
    config: Mapping[str, Any],
    settings: MailSettings,
    domain: str | None,
    dkim_selector: str | None,
    nameserver: tuple[str, int] | None,
) -> list[Finding]:
    if domain is None:
        if settings.default_sender is None:
            return [
                Finding(
                    "error",
                    "dns",
                    "No sender domain to check: MAIL_DEFAULT_SENDER is not set.",
                    "Set MAIL_DEFAULT_SENDER, or pass --domain.",
                )
            ]
        domain = parse_address(settings.default_sender).domain
    signer = None
    if config.get("MAIL_DKIM_KEY"):
        try:
            from .dkim import dkim_signer_from_config
        except ModuleNotFoundError as err:
            return [Finding("error", "dkim", str(err), "pip install 'quartmail[dkim]'")]
        try:
            signer = dkim_signer_from_config(config)
        except ConfigError as err:
            return [Finding("error", "dkim", str(err), "Fix the setting it names.")]
    return await check_dns(
        domain,
        dkim=signer,
        dkim_selector=dkim_selector,
        nameserver=nameserver,
        timeout=settings.smtp.timeout,
    )


async def check_dns(
    domain: str,
    *,
    dkim: DKIMSigner | None = None,
    dkim_selector: str | None = None,
    nameserver: tuple[str, int] | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 (MAIL_TIMEOUT, passed on to the resolver)
) -> list[Finding]:
    """Check *domain*'s SPF record, its DKIM key(s) (*dkim*'s, or any key under
    *dkim_selector*) and its DMARC policy, asking *nameserver* ``(ip, port)`` or the
    system's resolver, each lookup within *timeout* seconds. Needs dnspython."""
    try:
        import dns.asyncresolver  # noqa: F401 (checked here; used by _Resolver)
    except ModuleNotFoundError as err:
        error = missing_extra(err, "doctor", "mail doctor --dns")
        return [Finding("error", "dns", str(error), "pip install 'quartmail[doctor]'")]
    try:
        # RFC 5890: DNS carries A-labels.
        domain = domain.strip().rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return [Finding("error", "dns", f"{domain!r} is not a domain name.", "Check the domain.")]
    resolver = await _Resolver.make(nameserver, timeout)
    return [
        *await _spf_findings(resolver, domain),
        *await _dkim_findings(resolver, domain, dkim, dkim_selector),
        *await _dmarc_findings(resolver, domain),
    ]


class _LookupError(Exception):
    """A DNS lookup failed (timeout, SERVFAIL): nothing is known about the record."""


class _Resolver:
    """TXT lookups over dnspython's asyncio resolver."""

    def __init__(self, resolver: Any) -> None:
        self._resolver = resolver

    @classmethod
    async def make(cls, nameserver: tuple[str, int] | None, lifetime: float) -> _Resolver:
        import dns.asyncresolver

        if nameserver is None:
            # Reads /etc/resolv.conf: a file, so not on the event loop.
            resolver = await asyncio.to_thread(dns.asyncresolver.Resolver)
        else:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [nameserver[0]]
            resolver.port = nameserver[1]
        resolver.lifetime = lifetime
        return cls(resolver)

    async def txt(self, name: str) -> list[str]:
        """The TXT records at *name*, each one string; empty when there are none."""
        import dns.exception
        import dns.resolver

        try:
            answer = await self._resolver.resolve(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as err:
            raise _LookupError(f"Cannot look up TXT {name}: {err}") from err
        # RFC 7208 section 3.3, RFC 6376 section 3.6.2.2: a record's strings are joined
        # without spaces.
        return [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer]


def _lookup_failed(topic: str, err: _LookupError) -> Finding:
    return Finding(
        "error",
        topic,
        str(err),
        "Check this machine's DNS (or pass --nameserver) and try again.",
    )


async def _spf_findings(resolver: _Resolver, domain: str) -> list[Finding]:
    try:
        records = [text for text in await resolver.txt(domain) if _SPF.match(text)]
    except _LookupError as err:
        return [_lookup_failed("spf", err)]
    if not records:
        return [
            Finding(
                "error",
                "spf",
                f"{domain} has no SPF record: receivers cannot tell which servers may send its "
                "mail, and Gmail and Yahoo refuse or junk such mail.",
                f"Publish a TXT record at {domain}: 'v=spf1 include:<your provider's SPF domain> "
                "~all' (your provider documents the include).",
            )
        ]
    if len(records) > 1:
        return [
            Finding(
                "error",
                "spf",
                f"{domain} has {len(records)} SPF records; receivers treat that as an error "
                "(RFC 7208 section 4.5) and SPF fails.",
                "Merge them into one TXT record starting with 'v=spf1'.",
            )
        ]
    [record] = records
    terms = record.split()[1:]
    qualifiers = [m.group(1) for term in terms if (m := _SPF_ALL.fullmatch(term))]
    redirect = any(term.lower().startswith("redirect=") for term in terms)
    if qualifiers and qualifiers[-1] in ("", "+"):
        return [
            Finding(
                "error",
                "spf",
                f"{domain}'s SPF record lets every server send as {domain}: {record!r}",
                "End the record with '~all' or '-all' instead of '+all'.",
            )
        ]
    if (qualifiers and qualifiers[-1] == "?") or (not qualifiers and not redirect):
        return [
            Finding(
                "warning",
                "spf",
                f"{domain}'s SPF record says nothing about other servers: {record!r}",
                "End it with '~all' (or '-all') so that mail from other servers fails SPF.",
            )
        ]
    return [Finding("ok", "spf", f"SPF record of {domain}: {record!r}.")]


def _tags(record: str) -> dict[str, str]:
    """A DKIM or DMARC tag list (``k=v; k=v``, RFC 6376 section 3.2), names as written."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, equals, value = part.partition("=")
        if equals:
            tags.setdefault(name.strip(), value.strip())
    return tags


async def _dkim_findings(
    resolver: _Resolver, domain: str, signer: DKIMSigner | None, selector: str | None
) -> list[Finding]:
    if signer is None:
        if selector is None:
            return [
                Finding(
                    "warning",
                    "dkim",
                    "MAIL_DKIM_KEY is not set: quartmail does not sign the mail (DKIM), which "
                    "Gmail and Yahoo require of bulk senders.",
                    "Set MAIL_DKIM_KEY and MAIL_DKIM_SELECTOR; or, when your provider signs "
                    f"for {domain}, check its key with --dkim-selector.",
                )
            ]
        name = f"{selector}._domainkey.{domain}"
        try:
            keys = [_tags(text) for text in await resolver.txt(name)]
        except _LookupError as err:
            return [_lookup_failed("dkim", err)]
        if any(re.sub(r"\s", "", tags.get("p", "")) for tags in keys):
            return [Finding("ok", "dkim", f"A DKIM key is published at {name}.")]
        return [
            Finding(
                "error",
                "dkim",
                f"No DKIM key is published at {name}.",
                "Publish the record your provider gives for this selector, or check the "
                "selector's name.",
            )
        ]
    findings = []
    d = signer.domain or domain
    for name, expected in signer.dns_records(d).items():
        try:
            records = await resolver.txt(name)
        except _LookupError as err:
            findings.append(_lookup_failed("dkim", err))
            continue
        want = _tags(expected)
        published = [_tags(text) for text in records]
        # RFC 6376 section 3.6.1: p= may be folded with whitespace; k= defaults to rsa.
        matches = [
            tags
            for tags in published
            if re.sub(r"\s", "", tags.get("p", "")) == want["p"]
            and tags.get("k", "rsa") == want["k"]
        ]
        if matches:
            findings.append(Finding("ok", "dkim", f"The DKIM key at {name} matches MAIL_DKIM_KEY."))
            continue
        if not published:
            what = f"No DKIM key is published at {name}: receivers cannot check the signatures."
        elif not any(re.sub(r"\s", "", tags.get("p", "")) for tags in published):
            what = f"The DKIM key at {name} is revoked (empty p=)."
        else:
            what = (
                f"The DKIM key at {name} is not MAIL_DKIM_KEY's public key: every signature fails."
            )
        findings.append(
            Finding("error", "dkim", what, f"Publish this TXT record at {name}: {expected}")
        )
    if not _aligned(d, domain):
        findings.append(
            Finding(
                "warning",
                "dkim",
                f"MAIL_DKIM_DOMAIN ({d}) is neither {domain} nor a parent of it: DMARC does not "
                "count such a signature for mail from "
                f"{domain}.",
                f"Set MAIL_DKIM_DOMAIN to {domain} (or leave it unset).",
            )
        )
    return findings


def _aligned(dkim_domain: str, from_domain: str) -> bool:
    # RFC 7489 section 3.1.1, relaxed mode, without the public suffix list: one
    # domain is the other or a parent of it.
    return (
        dkim_domain == from_domain
        or from_domain.endswith("." + dkim_domain)
        or dkim_domain.endswith("." + from_domain)
    )


async def _dmarc_findings(resolver: _Resolver, domain: str) -> list[Finding]:
    # RFC 7489 section 6.6.3: the From domain's record, else its organizational
    # domain's; without the public suffix list, each parent down to two labels.
    labels = domain.split(".")
    candidates = [".".join(labels[i:]) for i in range(max(len(labels) - 1, 1))]
    for candidate in candidates:
        name = f"_dmarc.{candidate}"
        try:
            records = [text for text in await resolver.txt(name) if _DMARC.match(text)]
        except _LookupError as err:
            return [_lookup_failed("dmarc", err)]
        if records:
            return _dmarc_policy(domain, name, records, inherited=candidate != domain)
    return [
        Finding(
            "error",
            "dmarc",
            f"{domain} has no DMARC record (_dmarc.{domain}): Gmail and Yahoo require one of "
            "bulk senders since 2024.",
            f"Publish a TXT record at _dmarc.{domain}: 'v=DMARC1; p=none; "
            f"rua=mailto:dmarc-reports@{domain}' to start by collecting reports.",
        )
    ]


def _dmarc_policy(domain: str, name: str, records: list[str], *, inherited: bool) -> list[Finding]:
    if len(records) > 1:
        return [
            Finding(
                "error",
                "dmarc",
                f"{name} has {len(records)} DMARC records: receivers apply none "
                "(RFC 7489 section 6.6.3).",
                "Keep one TXT record starting with 'v=DMARC1'.",
            )
        ]
    [record] = records
    tags = _tags(record)
    policy = tags.get("sp", tags.get("p")) if inherited else tags.get("p")
    if policy not in ("none", "quarantine", "reject"):
        return [
            Finding(
                "error",
                "dmarc",
                f"The DMARC record at {name} has no valid policy (p=): {record!r}",
                "Add p=none (collect reports), p=quarantine or p=reject.",
            )
        ]
    if policy == "none":
        return [
            Finding(
                "ok",
                "dmarc",
                f"DMARC policy of {domain}: none (reports only), from {name}. When the reports "
                "show only your own mail, consider p=quarantine.",
            )
        ]
    return [Finding("ok", "dmarc", f"DMARC policy of {domain}: {policy}, from {name}.")]
