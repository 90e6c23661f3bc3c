"""``mail doctor``: each misconfiguration against the real SMTP test server, and the DNS
checks against a DNS server on loopback made here (dnspython's message parsing, UDP)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import pathlib
import sys
from collections.abc import AsyncIterator, Iterable
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset
import pytest
import pytest_asyncio
from click.testing import Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from quart import Quart

from quartmail import ConfigError, Mail
from quartmail.doctor import Finding, all_well, diagnose
from quartmail.testing import SMTPServerFactory, SMTPTestServer, TLSCertificates, TLSMode

from conftest import MakeMail

USER, PASSWORD = "sender@example.com", "s3cret-Pa55word"
DOMAIN = "example.com"


def levels(findings: Iterable[Finding]) -> dict[str, str]:
    """topic -> the worst level among the findings of that topic."""
    order = {"ok": 0, "warning": 1, "error": 2}
    worst: dict[str, str] = {}
    for finding in findings:
        if order[finding.level] >= order[worst.get(finding.topic, "ok")]:
            worst[finding.topic] = finding.level
    return worst


def only(findings: list[Finding], topic: str) -> Finding:
    [finding] = [finding for finding in findings if finding.topic == topic]
    return finding


def no_secret(findings: Iterable[Finding]) -> None:
    for finding in findings:
        assert PASSWORD not in finding.what + finding.do
        assert base64.b64encode(PASSWORD.encode()).decode() not in finding.what + finding.do


async def doctor(app: Quart, **options: Any) -> list[Finding]:
    async with app.app_context():
        findings = await diagnose(app, **options)
    no_secret(findings)
    return findings


# --- SMTP: all well ---


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_all_is_well_over_tls_with_a_login(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, tls: TLSMode
) -> None:
    server = await smtp_server_factory(tls=tls, auth=(USER, PASSWORD))
    app, _ = make_mail(server)
    findings = await doctor(app)
    assert all_well(findings), findings
    mode = "STARTTLS" if tls == "starttls" else "implicit TLS"
    assert mode in only(findings, "tls").what
    assert "TLSv1." in only(findings, "tls").what
    extensions = only(findings, "extensions").what
    assert "SIZE 32.0 MiB" in extensions and "SMTPUTF8" in extensions and "8BITMIME" in extensions
    assert "not: PIPELINING, CHUNKING" in extensions  # aiosmtpd offers neither
    assert only(findings, "auth").what == f"Logged in as {USER!r}."
    assert server.auth_attempts == [USER]
    assert server.messages == [] and server.data_attempts == 0  # nothing was sent


async def test_all_is_well_without_a_login(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, _ = make_mail(smtp_server)
    findings = await doctor(app)
    assert all_well(findings), findings
    assert "plain SMTP to this machine" in only(findings, "tls").what
    assert "takes mail from the sender without a login" in only(findings, "auth").what
    assert smtp_server.messages == []


# --- SMTP: the TLS mode against the port ---


@pytest.mark.parametrize(
    ("use_tls", "configured"), [(True, "STARTTLS (MAIL_USE_TLS)"), (False, "plain SMTP")]
)
async def test_starttls_or_plain_against_implicit_tls(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, use_tls: bool, configured: str
) -> None:
    # Port 465 without MAIL_USE_SSL: the server waits for a TLS handshake and never greets.
    server = await smtp_server_factory(tls="implicit")
    app, _ = make_mail(server, MAIL_USE_TLS=use_tls, MAIL_USE_SSL=False, MAIL_TIMEOUT=1.5)
    findings = await doctor(app)
    finding = only(findings, "tls")
    assert finding.level == "error"
    assert "expects TLS from the first byte (implicit TLS" in finding.what
    assert f"but {configured} is configured" in finding.what
    assert "MAIL_USE_SSL = True and MAIL_USE_TLS = False" in finding.do


async def test_implicit_tls_against_starttls(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    # Port 587 with MAIL_USE_SSL.
    server = await smtp_server_factory(tls="starttls")
    app, _ = make_mail(server, MAIL_USE_TLS=False, MAIL_USE_SSL=True)
    findings = await doctor(app)
    finding = only(findings, "tls")
    assert finding.level == "error"
    assert "offers STARTTLS" in finding.what
    assert "MAIL_USE_TLS = True and MAIL_USE_SSL = False" in finding.do


async def test_implicit_tls_against_plain_smtp(
    smtp_server: SMTPTestServer, make_mail: MakeMail, smtp_certificates: TLSCertificates
) -> None:
    app, _ = make_mail(smtp_server, MAIL_USE_SSL=True, MAIL_CA_FILE=str(smtp_certificates.ca_file))
    findings = await doctor(app)
    finding = only(findings, "tls")
    assert finding.level == "error"
    assert "without any TLS" in finding.what
    assert "465, MAIL_USE_SSL = True" in finding.do and "587, MAIL_USE_TLS = True" in finding.do


async def test_starttls_required_but_not_offered(
    smtp_server: SMTPTestServer, make_mail: MakeMail, smtp_certificates: TLSCertificates
) -> None:
    app, _ = make_mail(smtp_server, MAIL_USE_TLS=True, MAIL_CA_FILE=str(smtp_certificates.ca_file))
    findings = await doctor(app)
    finding = only(findings, "tls")
    assert finding.level == "error"
    assert "offers no STARTTLS, which MAIL_USE_TLS requires" in finding.what
    assert "MAIL_USE_SSL = True" in finding.do
    assert not all_well(findings)


async def test_plain_smtp_against_a_server_that_wants_starttls(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls")
    app, _ = make_mail(server, MAIL_USE_TLS=False, MAIL_CA_FILE=None)
    findings = await doctor(app)
    finding = only(findings, "auth")
    assert finding.level == "error"
    assert "wants STARTTLS" in finding.what and "530" in finding.what
    assert finding.do == "Set MAIL_USE_TLS = True."


async def test_a_server_that_never_answers(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(silent=True)
    app, _ = make_mail(server, MAIL_TIMEOUT=1)
    findings = await doctor(app)
    finding = only(findings, "connection")
    assert finding.level == "error"
    assert "did not answer within 1 s (MAIL_TIMEOUT)" in finding.what
    assert "MAIL_SERVER and MAIL_PORT" in finding.do


async def test_nothing_listening(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory()
    await server.stop()
    app, _ = make_mail(server)
    findings = await doctor(app)
    finding = only(findings, "connection")
    assert finding.level == "error" and "Cannot connect to 127.0.0.1:" in finding.what
    assert "MAIL_SERVER and MAIL_PORT" in finding.do


# --- SMTP: certificates ---


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_an_untrusted_certificate(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, tls: TLSMode
) -> None:
    server = await smtp_server_factory(tls=tls)
    app, _ = make_mail(server, MAIL_CA_FILE=None)  # the test CA is not among the system's
    findings = await doctor(app)
    finding = only(findings, "certificate")
    assert finding.level == "error"
    assert "not signed by a CA this machine trusts" in finding.what
    assert "set MAIL_CA_FILE to that CA's certificate" in finding.do


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_a_certificate_for_another_host(
    smtp_server_factory: SMTPServerFactory,
    make_mail: MakeMail,
    tmp_path: pathlib.Path,
    tls: TLSMode,
) -> None:
    made = TLSCertificates.create(tmp_path, "mail.example.net")
    server = await smtp_server_factory(tls=tls, certificates=made)
    app, _ = make_mail(server)
    findings = await doctor(app)
    finding = only(findings, "certificate")
    assert finding.level == "error"
    assert f"is for mail.example.net, not {server.host}" in finding.what
    assert "Set MAIL_SERVER to a name the certificate is for: mail.example.net." in finding.do


async def test_an_expired_certificate(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, tmp_path: pathlib.Path
) -> None:
    gone = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=2)
    made = TLSCertificates.create(tmp_path, "127.0.0.1", not_after=gone)
    server = await smtp_server_factory(tls="starttls", certificates=made)
    app, _ = make_mail(server)
    finding = only(await doctor(app), "certificate")
    assert finding.level == "error" and "has expired" in finding.what
    assert "renew" in finding.do and "Do not turn MAIL_VALIDATE_CERTS off" in finding.do


async def test_a_certificate_about_to_expire(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, tmp_path: pathlib.Path
) -> None:
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3, hours=1)
    made = TLSCertificates.create(tmp_path, "127.0.0.1", not_after=soon)
    server = await smtp_server_factory(tls="implicit", certificates=made)
    app, _ = make_mail(server)
    findings = await doctor(app)
    assert levels(findings) == {
        "server": "ok",
        "tls": "ok",
        "certificate": "warning",
        "extensions": "ok",
        "auth": "ok",
    }
    assert "(in 3 days)" in only(findings, "certificate").what


async def test_certificates_not_checked(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls")
    app, _ = make_mail(server, MAIL_VALIDATE_CERTS=False, MAIL_CA_FILE=None)
    findings = await doctor(app)
    finding = only(findings, "certificate")
    assert finding.level == "warning" and "MAIL_VALIDATE_CERTS is off" in finding.what
    assert levels(findings)["tls"] == "ok"


# --- SMTP: AUTH ---


async def test_a_refused_login(smtp_server_factory: SMTPServerFactory, make_mail: MakeMail) -> None:
    server = await smtp_server_factory(tls="starttls", auth=(USER, "another password"))
    app, _ = make_mail(server, MAIL_USERNAME=USER, MAIL_PASSWORD=PASSWORD)
    finding = only(await doctor(app), "auth")
    assert finding.level == "error"
    assert f"refused the login for {USER!r}" in finding.what and "535" in finding.what
    assert "app password" in finding.do and "MAIL_PASSWORD" in finding.do
    assert set(server.auth_attempts) == {USER}  # aiosmtplib tries PLAIN, then LOGIN


async def test_an_oauth2_login(smtp_server_factory: SMTPServerFactory, make_mail: MakeMail) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: "good-token"})
    app, _ = make_mail(server, MAIL_USERNAME=USER, MAIL_OAUTH2_TOKEN=lambda user: "good-token")
    assert only(await doctor(app), "auth").what == f"Logged in as {USER!r}."

    server.oauth2_tokens = {USER: "the token has changed"}
    finding = only(await doctor(app), "auth")
    assert finding.level == "error" and "MAIL_OAUTH2_TOKEN" in finding.do


async def test_an_oauth2_token_for_a_server_without_xoauth2(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", auth=(USER, PASSWORD))
    app, _ = make_mail(server, MAIL_USERNAME=USER, MAIL_PASSWORD=None, MAIL_OAUTH2_TOKEN="t0k3n")
    finding = only(await doctor(app), "auth")
    assert finding.level == "error"
    assert "MAIL_OAUTH2_TOKEN is set" in finding.what and "not XOAUTH2" in finding.what
    assert server.auth_attempts == []


async def test_auth_not_offered(smtp_server: SMTPTestServer, make_mail: MakeMail) -> None:
    app, _ = make_mail(smtp_server, MAIL_USERNAME=USER, MAIL_PASSWORD=PASSWORD)
    finding = only(await doctor(app), "auth")
    assert finding.level == "error"
    assert "MAIL_USERNAME is set, but the server offers no AUTH" in finding.what
    assert "submission port (587 or 465)" in finding.do


async def test_a_login_required_but_not_configured(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", auth=(USER, PASSWORD))
    app, _ = make_mail(server, MAIL_USERNAME=None, MAIL_PASSWORD=None)
    finding = only(await doctor(app), "auth")
    assert finding.level == "error" and "wants a login" in finding.what
    assert finding.do == "Set MAIL_USERNAME and MAIL_PASSWORD."
    assert server.messages == []


async def test_smtputf8_missing_for_an_international_sender(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(smtputf8=False)
    app, _ = make_mail(server, MAIL_DEFAULT_SENDER="张伟@example.com")
    finding = only(await doctor(app), "extensions")
    assert finding.level == "error" and "needs SMTPUTF8" in finding.what
    assert "not: PIPELINING, CHUNKING, SMTPUTF8" in finding.what


# --- settings ---


async def test_a_bad_setting_is_a_finding() -> None:
    app = Quart(__name__)  # no Mail: the doctor reads the config itself
    app.config.update(MAIL_PORT="smtp")
    [finding] = await doctor(app)
    assert finding.level == "error" and finding.topic == "settings"
    assert "MAIL_PORT" in finding.what


async def test_suppressed_sending_is_a_warning(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, _ = make_mail(smtp_server, MAIL_SUPPRESS_SEND=True)
    findings = await doctor(app)
    assert only(findings, "settings").level == "warning"
    assert not all_well(findings)


# --- DNS: a server on loopback ---


class DNSServer(asyncio.DatagramProtocol):
    """Answers TXT queries from :attr:`records` (name -> records, each a list of strings);
    NXDOMAIN for names that are neither there nor above a name there."""

    def __init__(self, records: dict[str, list[list[str]]]) -> None:
        self.records = records
        self.silent = False
        self.port = 0
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", 0)
        )
        self.port = self._transport.get_extra_info("sockname")[1]

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self.silent or self._transport is None:
            return
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        [question] = query.question
        name = question.name.to_text(omit_final_dot=True).lower()
        records = self.records.get(name)
        if records is None and not any(known.endswith("." + name) for known in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif records and question.rdtype == dns.rdatatype.TXT:
            rrset = dns.rrset.RRset(question.name, dns.rdataclass.IN, dns.rdatatype.TXT)
            for strings in records:
                rrset.add(
                    dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings), 300
                )
            response.answer.append(rrset)
        self._transport.sendto(response.to_wire(), addr)


@pytest_asyncio.fixture
async def dns_server() -> AsyncIterator[DNSServer]:
    server = DNSServer({})
    await server.start()
    try:
        yield server
    finally:
        server.close()


def txt(value: str) -> list[str]:
    """One TXT record holding *value*, split into strings of at most 255 octets (RFC 1035)."""
    return [value[i : i + 255] for i in range(0, len(value), 255)]


def rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def ed25519_pem() -> str:
    return (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


def public_record(pem: str, selector: str = "s1", domain: str = DOMAIN) -> str:
    """The TXT record quartmail.dkim says to publish for *pem*."""
    from quartmail.dkim import dkim_signer_from_config

    signer = dkim_signer_from_config({"MAIL_DKIM_KEY": pem, "MAIL_DKIM_SELECTOR": selector})
    assert signer is not None
    return signer.dns_records(domain)[f"{selector}._domainkey.{domain}"]


async def test_dns_all_well(
    smtp_server: SMTPTestServer, make_mail: MakeMail, dns_server: DNSServer
) -> None:
    key = rsa_pem()
    dns_server.records = {
        DOMAIN: [txt("v=spf1 ip4:192.0.2.0/24 include:_spf.example.net -all"), ["other=1"]],
        f"s1._domainkey.{DOMAIN}": [txt(public_record(key))],  # 2048 bits: two strings
        f"_dmarc.{DOMAIN}": [txt("v=DMARC1; p=reject; rua=mailto:d@example.com")],
    }
    app, _ = make_mail(smtp_server, MAIL_DKIM_KEY=key, MAIL_DKIM_SELECTOR="s1")
    findings = await doctor(app, dns=True, nameserver=("127.0.0.1", dns_server.port))
    assert all_well(findings), findings
    assert "-all" in only(findings, "spf").what
    assert (
        only(findings, "dkim").what
        == f"The DKIM key at s1._domainkey.{DOMAIN} matches MAIL_DKIM_KEY."
    )
    assert "DMARC policy of example.com: reject" in only(findings, "dmarc").what


async def test_dns_nothing_published(
    smtp_server: SMTPTestServer, make_mail: MakeMail, dns_server: DNSServer
) -> None:
    key = ed25519_pem()
    app, _ = make_mail(smtp_server, MAIL_DKIM_KEY=key, MAIL_DKIM_SELECTOR="s1")
    findings = await doctor(app, dns=True, nameserver=("127.0.0.1", dns_server.port))
    assert levels(findings) == {
        "server": "ok",
        "tls": "ok",
        "extensions": "ok",
        "auth": "ok",
        "spf": "error",
        "dkim": "error",
        "dmarc": "error",
    }
    assert "Publish a TXT record at example.com: 'v=spf1 include:" in only(findings, "spf").do
    assert only(findings, "dkim").do == (
        f"Publish this TXT record at s1._domainkey.{DOMAIN}: {public_record(key)}"
    )
    assert "'v=DMARC1; p=none; rua=mailto:" in only(findings, "dmarc").do


async def test_dns_another_dkim_key(
    smtp_server: SMTPTestServer, make_mail: MakeMail, dns_server: DNSServer
) -> None:
    key, old_key = ed25519_pem(), ed25519_pem()
    dns_server.records = {f"s1._domainkey.{DOMAIN}": [txt(public_record(old_key))]}
    app, _ = make_mail(smtp_server, MAIL_DKIM_KEY=key, MAIL_DKIM_SELECTOR="s1")
    findings = await doctor(app, dns=True, nameserver=("127.0.0.1", dns_server.port))
    finding = only(findings, "dkim")
    assert finding.level == "error" and "is not MAIL_DKIM_KEY's public key" in finding.what
    assert finding.do.endswith(public_record(key))


async def test_dns_a_revoked_dkim_key_and_folded_keys(
    smtp_server: SMTPTestServer, make_mail: MakeMail, dns_server: DNSServer
) -> None:
    rsa_key, ed_key = rsa_pem(), ed25519_pem()
    folded = public_record(rsa_key, "rsa").replace("p=", "p= ").replace("A", " A")
    dns_server.records = {
        f"rsa._domainkey.{DOMAIN}": [txt(folded)],  # RFC 6376 3.6.1: whitespace in p= is fine
        f"ed._domainkey.{DOMAIN}": [txt("v=DKIM1; k=ed25519; p=")],
    }
    app, _ = make_mail(
        smtp_server,
        MAIL_DKIM_KEY=rsa_key,
        MAIL_DKIM_SELECTOR="rsa",
        MAIL_DKIM_SECOND_KEY=ed_key,
        MAIL_DKIM_SECOND_SELECTOR="ed",
    )
    findings = await doctor(app, dns=True, nameserver=("127.0.0.1", dns_server.port))
    dkim = [finding for finding in findings if finding.topic == "dkim"]
    assert [(finding.level, finding.what) for finding in dkim] == [
        ("ok", f"The DKIM key at rsa._domainkey.{DOMAIN} matches MAIL_DKIM_KEY."),
        ("error", f"The DKIM key at ed._domainkey.{DOMAIN} is revoked (empty p=)."),
    ]
    assert dkim[1].do.endswith(public_record(ed_key, "ed"))


async def test_dns_dkim_for_another_domain(
    smtp_server: SMTPTestServer, make_mail: MakeMail, dns_server: DNSServer
) -> None:
    key = ed25519_pem()
    dns_server.records = {
        "s1._domainkey.example.org": [txt(public_record(key, "s1", "example.org"))]
    }
    app, _ = make_mail(
        smtp_server, MAIL_DKIM_KEY=key, MAIL_DKIM_SELECTOR="s1", MAIL_DKIM_DOMAIN="example.org"
    )
    findings = await doctor(app, dns=True, nameserver=("127.0.0.1", dns_server.port))
    dkim = [finding for finding in findings if finding.topic == "dkim"]
    assert [finding.level for finding in dkim] == ["ok", "warning"]
    assert "DMARC does not count such a signature" in dkim[1].what
    assert dkim[1].do == "Set MAIL_DKIM_DOMAIN to example.com (or leave it unset)."


async def test_a_bad_dkim_setting(smtp_server: SMTPTestServer) -> None:
    # Mail(app) refuses it at start-up; the doctor, given the app's config, names it.
    app = Quart(__name__)
    app.config.update(smtp_server.mail_config(), MAIL_DKIM_KEY=ed25519_pem())  # no selector
    with pytest.raises(ConfigError, match="MAIL_DKIM_SELECTOR is required with MAIL_DKIM_KEY"):
        Mail(app)
    app = Quart(__name__)
    app.config.update(smtp_server.mail_config(), MAIL_DKIM_KEY=ed25519_pem())
    finding = only(await doctor(app, dns=True), "settings")
    assert finding.level == "error"
    assert finding.what == "MAIL_DKIM_SELECTOR is required with MAIL_DKIM_KEY"


@pytest.mark.parametrize(
    ("records", "level", "phrase"),
    [
        (["v=spf1 -all", "v=spf1 mx -all"], "error", "has 2 SPF records"),
        (["v=spf1 +all"], "error", "lets every server send"),
        (["v=spf1 mx ?all"], "warning", "says nothing about other servers"),
        (["v=spf1 mx"], "warning", "says nothing about other servers"),
        (["v=spf1 redirect=_spf.example.net"], "ok", "SPF record of example.com"),
        (["V=SPF1 mx ~all"], "ok", "SPF record of example.com"),
    ],
)
async def test_spf_records(
    dns_server: DNSServer, records: list[str], level: str, phrase: str
) -> None:
    from quartmail.doctor import check_dns

    dns_server.records = {DOMAIN: [txt(record) for record in records]}
    findings = await check_dns(DOMAIN, nameserver=("127.0.0.1", dns_server.port), timeout=5)
    finding = only(findings, "spf")
    assert (finding.level, phrase in finding.what) == (level, True), finding
    assert finding.level == "ok" or finding.do


@pytest.mark.parametrize(
    ("records", "level", "phrase"),
    [
        ({"_dmarc.mail.example.com": "v=DMARC1; p=quarantine"}, "ok", "quarantine"),
        ({"_dmarc.example.com": "v=DMARC1; p=none; sp=reject"}, "ok", "reject, from _dmarc.ex"),
        ({"_dmarc.example.com": "v=DMARC1; p=none"}, "ok", "none (reports only)"),
        ({"_dmarc.mail.example.com": "v=DMARC1; rua=mailto:d@example.com"}, "error", "no valid"),
        ({"_dmarc.mail.example.com": "p=reject; v=DMARC1"}, "error", "has no DMARC record"),
    ],
)
async def test_dmarc_records(
    dns_server: DNSServer, records: dict[str, str], level: str, phrase: str
) -> None:
    from quartmail.doctor import check_dns

    dns_server.records = {name: [txt(value)] for name, value in records.items()}
    findings = await check_dns(
        "mail.example.com", nameserver=("127.0.0.1", dns_server.port), timeout=5
    )
    finding = only(findings, "dmarc")
    assert (finding.level, phrase in finding.what) == (level, True), finding


async def test_dkim_by_the_provider(dns_server: DNSServer) -> None:
    from quartmail.doctor import check_dns

    nameserver = ("127.0.0.1", dns_server.port)
    unsigned = only(await check_dns(DOMAIN, nameserver=nameserver, timeout=5), "dkim")
    assert unsigned.level == "warning" and "MAIL_DKIM_KEY is not set" in unsigned.what
    assert "--dkim-selector" in unsigned.do

    dns_server.records = {f"provider._domainkey.{DOMAIN}": [txt(public_record(ed25519_pem()))]}
    findings = await check_dns(DOMAIN, dkim_selector="provider", nameserver=nameserver, timeout=5)
    assert only(findings, "dkim").level == "ok"
    findings = await check_dns(DOMAIN, dkim_selector="other", nameserver=nameserver, timeout=5)
    assert only(findings, "dkim").level == "error"


async def test_dns_no_answer_is_bounded_by_mail_timeout(
    smtp_server: SMTPTestServer, make_mail: MakeMail, dns_server: DNSServer
) -> None:
    dns_server.silent = True
    app, _ = make_mail(smtp_server, MAIL_TIMEOUT=1)
    async with asyncio.timeout(30):
        findings = await doctor(app, dns=True, nameserver=("127.0.0.1", dns_server.port))
    for topic in ("spf", "dmarc"):
        finding = only(findings, topic)
        assert finding.level == "error" and "Cannot look up TXT" in finding.what
        assert "--nameserver" in finding.do


async def test_dns_needs_a_domain(smtp_server: SMTPTestServer, make_mail: MakeMail) -> None:
    app, _ = make_mail(smtp_server, MAIL_DEFAULT_SENDER=None)
    finding = only(await doctor(app, dns=True), "dns")
    assert finding.level == "error" and "MAIL_DEFAULT_SENDER is not set" in finding.what
    assert "--domain" in finding.do


# --- the command line ---


def cli_app(make_mail: MakeMail, server: SMTPTestServer, **config: Any) -> Quart:
    app, _ = make_mail(server, **config)  # Mail(app) adds the mail command group
    return app


async def invoke(app: Quart, *args: str) -> Result:
    # The command runs its own event loop (asyncio.run), so in a thread, while this loop
    # serves the test servers.
    runner = app.test_cli_runner()
    return await asyncio.to_thread(runner.invoke, args=["mail", "doctor", *args])


async def test_cli_all_well(smtp_server_factory: SMTPServerFactory, make_mail: MakeMail) -> None:
    server = await smtp_server_factory(tls="starttls", auth=(USER, PASSWORD))
    result = await invoke(cli_app(make_mail, server))
    assert result.exit_code == 0, result.output
    assert result.output.endswith("All is well.\n")
    assert f"auth         Logged in as {USER!r}." in result.output


async def test_cli_problems_exit_1_without_the_password(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", auth=(USER, "another password"))
    app = cli_app(make_mail, server, MAIL_USERNAME=USER, MAIL_PASSWORD=PASSWORD)
    result = await invoke(app)
    assert result.exit_code == 1
    assert "ERROR    auth" in result.output and "-> Check MAIL_USERNAME" in result.output
    assert result.output.endswith("1 problem(s) to fix.\n")
    assert PASSWORD not in result.output


async def test_cli_rejects_a_bad_nameserver(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    result = await invoke(cli_app(make_mail, smtp_server), "--dns", "--nameserver", "dns.example")
    assert result.exit_code == 2
    assert "is not IP or IP:PORT" in result.output


DOCTOR_APP = """
import os, sys
from quart import Quart
from quartmail import Mail

if os.environ.get("WITHOUT_DNSPYTHON"):  # as if quartmail[doctor] were not installed
    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "dns":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.modules.pop("dns", None)
    sys.meta_path.insert(0, NotInstalled())

app = Quart(__name__)
app.config.update(MAIL_SERVER="127.0.0.1", MAIL_PORT=int(os.environ["SMTP_PORT"]),
                  MAIL_DEFAULT_SENDER="app@example.com")
Mail(app)  # adds the mail command group
"""


async def quart_mail_doctor(
    tmp_path: pathlib.Path, smtp_port: int, *args: str, **env: str
) -> tuple[int, str]:
    """Run ``python -m quart --app doctorapp mail doctor *args``; awaited, so that the test
    servers in this loop keep serving meanwhile."""
    (tmp_path / "doctorapp.py").write_text(DOCTOR_APP)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("QUART_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "quart", "--app", "doctorapp", "mail", "doctor", *args),
        cwd=tmp_path,
        env={**environment, "SMTP_PORT": str(smtp_port), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    assert "Traceback" not in stderr.decode(), stderr.decode()
    return process.returncode, stdout.decode()


async def test_quart_mail_doctor_dns(
    smtp_server: SMTPTestServer, dns_server: DNSServer, tmp_path: pathlib.Path
) -> None:
    """As a user runs it: ``quart --app ... mail doctor --dns`` in a process of its own."""
    dns_server.records = {
        DOMAIN: [txt("v=spf1 mx ~all")],
        f"_dmarc.{DOMAIN}": [txt("v=DMARC1; p=none")],
    }
    nameserver = f"127.0.0.1:{dns_server.port}"
    code, output = await quart_mail_doctor(
        tmp_path, smtp_server.port, "--dns", "--nameserver", nameserver, "--dkim-selector", "s"
    )
    assert code == 1, output
    assert f"ok       spf          SPF record of {DOMAIN}: 'v=spf1 mx ~all'." in output
    assert f"ERROR    dkim         No DKIM key is published at s._domainkey.{DOMAIN}." in output
    assert "ok       dmarc        DMARC policy of example.com: none" in output


async def test_quart_mail_doctor_without_dnspython(
    smtp_server: SMTPTestServer, tmp_path: pathlib.Path
) -> None:
    code, output = await quart_mail_doctor(tmp_path, smtp_server.port, WITHOUT_DNSPYTHON="1")
    assert (code, output.splitlines()[-1]) == (0, "All is well."), output
    code, output = await quart_mail_doctor(
        tmp_path, smtp_server.port, "--dns", WITHOUT_DNSPYTHON="1"
    )
    assert code == 1, output
    assert "-> pip install 'quartmail[doctor]'" in output


async def test_two_dmarc_records_are_reported(dns_server: DNSServer) -> None:
    from quartmail.doctor import check_dns

    name = f"_dmarc.{DOMAIN}"
    dns_server.records = {name: [txt("v=DMARC1; p=reject"), txt("v=DMARC1; p=none")]}
    findings = await check_dns(DOMAIN, nameserver=("127.0.0.1", dns_server.port), timeout=5)
    finding = only(findings, "dmarc")
    assert finding.level == "error" and "has 2 DMARC records" in finding.what
    assert "Keep one TXT record" in finding.do


async def test_a_domain_that_is_not_a_name_is_reported_without_a_lookup() -> None:
    from quartmail.doctor import check_dns

    [finding] = await check_dns("a..example.com", nameserver=("127.0.0.1", 9), timeout=1)
    assert (finding.level, finding.topic) == ("error", "dns")
    assert "is not a domain name" in finding.what


async def test_dkim_lookups_that_get_no_answer_are_reported(dns_server: DNSServer) -> None:
    from quartmail.dkim import dkim_signer_from_config
    from quartmail.doctor import check_dns

    dns_server.silent = True
    nameserver = ("127.0.0.1", dns_server.port)
    signer = dkim_signer_from_config(
        {"MAIL_DKIM_KEY": ed25519_pem(), "MAIL_DKIM_SELECTOR": "s1", "MAIL_DKIM_DOMAIN": DOMAIN}
    )
    for options in ({"dkim": signer}, {"dkim_selector": "provider"}):
        async with asyncio.timeout(30):
            findings = await check_dns(DOMAIN, nameserver=nameserver, timeout=1, **options)
        finding = only(findings, "dkim")
        assert finding.level == "error" and "Cannot look up TXT" in finding.what
        assert "--nameserver" in finding.do


@pytest.mark.parametrize(
    ("nameserver", "accepted"),
    [
        ("127.0.0.1:{port}", True),
        ("127.0.0.1:0", False),
        ("[::1]:70000", False),
        ("[::1]:x", False),
    ],
)
async def test_cli_nameserver_forms(
    smtp_server: SMTPTestServer,
    make_mail: MakeMail,
    dns_server: DNSServer,
    nameserver: str,
    accepted: bool,
) -> None:
    dns_server.records = {
        DOMAIN: [txt("v=spf1 -all")],
        f"_dmarc.{DOMAIN}": [txt("v=DMARC1; p=reject")],
    }
    app = cli_app(make_mail, smtp_server)
    result = await invoke(app, "--dns", "--nameserver", nameserver.format(port=dns_server.port))
    if accepted:
        assert "spf          SPF record of example.com" in result.output, result.output
        assert "DMARC policy of example.com: reject" in result.output
    else:
        assert result.exit_code == 2
        assert "is not IP or IP:PORT" in result.output


async def test_a_server_that_refuses_at_the_greeting(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(greeting="554 5.3.2 No service here")
    app, _ = make_mail(server)
    finding = only(await doctor(app), "connection")
    assert finding.level == "error"
    assert "refused the connection: 554 5.3.2 No service here" in finding.what
    assert "MAIL_SERVER and MAIL_PORT" in finding.do
