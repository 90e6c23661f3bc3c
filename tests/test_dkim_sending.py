"""DKIM applied by Mail (MAIL_DKIM_*): what arrives at the real SMTP test
server verifies with dkimpy, for mail.send, a retried send_background and the
outbox, against a DNS function of our own (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from quart import Quart
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from test_dkim import dns_for, pem, signature_tags, verify

from quartmail import ConfigError, Mail, Message
from quartmail.settings import MailSettings
from quartmail.testing import SMTPTestServer

from conftest import SENDER, MakeMail


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def message() -> Message:
    return Message("Signed", recipients=["rcpt@example.com"], body="Hello\n")


def dual(rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey) -> dict[str, str]:
    return {
        "MAIL_DKIM_KEY": pem(rsa_key),
        "MAIL_DKIM_SELECTOR": "rsa1",
        "MAIL_DKIM_SECOND_KEY": pem(ed_key),
        "MAIL_DKIM_SECOND_SELECTOR": "ed1",
    }


def check(data: bytes, mail: Mail) -> None:
    signer = mail.state.settings.dkim
    assert signer is not None
    dns = dns_for(signer, "example.com")
    assert [signature_tags(data, n)["s"] for n in (0, 1)] == ["rsa1", "ed1"]
    assert verify(data, dns, 0) and verify(data, dns, 1)


async def test_mail_send_arrives_signed(
    smtp_server: SMTPTestServer,
    make_mail: MakeMail,
    rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    app, mail = make_mail(smtp_server, MAIL_SUPPRESS_SEND=False, **dual(rsa_key, ed_key))
    sent = message()
    async with app.app_context():
        await mail.send(sent)
        [received] = await smtp_server.wait_for_messages(1)
        check(received.data, mail)
        assert sent.as_bytes() == received.data  # the very bytes sent, signature and all


async def test_a_retried_background_send_sends_the_same_signed_bytes(
    smtp_server: SMTPTestServer,
    make_mail: MakeMail,
    rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    smtp_server.data_replies.append("451 4.3.0 Try again later")
    app, mail = make_mail(
        smtp_server, MAIL_SUPPRESS_SEND=False, MAIL_RETRY_DELAY=0.01, **dual(rsa_key, ed_key)
    )
    async with app.test_app(), app.app_context():
        await mail.send_background(message())
    assert smtp_server.data_attempts == 2
    [received] = await smtp_server.wait_for_messages(1)
    check(received.data, mail)


async def test_the_outbox_sends_signed_bytes_after_a_retry(
    smtp_server: SMTPTestServer,
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    smtp_server.data_replies.append("451 4.3.0 Try again later")
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/outbox.db")
    app = Quart(__name__)
    app.config.update(
        smtp_server.mail_config(),
        MAIL_DEFAULT_SENDER=SENDER,
        MAIL_RETRY_DELAY=0.02,
        MAIL_OUTBOX_POLL=0.05,
        **dual(rsa_key, ed_key),
    )
    mail = Mail(app)
    mail.init_outbox(app, engine)
    try:
        async with app.test_app(), app.app_context():
            async with AsyncSession(engine, expire_on_commit=False) as session:
                await mail.outbox.enqueue(session, message())
                await session.commit()
            [received] = await smtp_server.wait_for_messages(1)
    finally:
        await engine.dispose()
    assert smtp_server.data_attempts == 2
    check(received.data, mail)


def test_no_dkim_setting_is_no_signer() -> None:
    assert MailSettings.from_config({}, testing=False, debug=False).dkim is None


def test_a_selector_without_a_key_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigError, match="MAIL_DKIM_SECOND_KEY"):
        MailSettings.from_config({"MAIL_DKIM_SECOND_KEY": "x"}, testing=False, debug=False)
