"""DKIM applied by Mail (MAIL_DKIM_*): what arrives at the real SMTP test
server verifies with dkimpy, for mail.send, connect(), a retried
send_background and the outbox, against a DNS function of our own (no
network); RSA signing leaves the event loop free; a message that cannot be
signed fails in its caller, before anything connects or is queued."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from quart import Quart
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from test_dkim import dns_for, pem, signature_tags, verify

from quartmail import ConfigError, Mail, Message, MessageError
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


# One key of each algorithm, on every path; the message carries List-Unsubscribe.

UNSUBSCRIBE = ["https://example.com/unsubscribe/t0k", "mailto:leave@example.com"]

Path_ = Callable[[Mail, Message], Awaitable[None]]


async def by_send(mail: Mail, msg: Message) -> None:
    await mail.send(msg)


async def by_connect(mail: Mail, msg: Message) -> None:
    async with mail.connect() as connection:
        await connection.send(msg, envelope_from="bounces@example.com")


async def by_background(mail: Mail, msg: Message) -> None:
    await mail.send_background(msg)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
@pytest.mark.parametrize("send", [by_send, by_connect, by_background])
async def test_one_key_of_either_algorithm_signs_what_arrives(
    algorithm: str,
    send: Path_,
    smtp_server: SMTPTestServer,
    make_mail: MakeMail,
    rsa_key: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    key = rsa_key if algorithm == "rsa" else ed_key
    app, mail = make_mail(
        smtp_server, MAIL_SUPPRESS_SEND=False, MAIL_DKIM_KEY=pem(key), MAIL_DKIM_SELECTOR="s1"
    )
    msg = Message(
        "Grüße", recipients=["zoë@example.org"], body="Hallo\n", list_unsubscribe=UNSUBSCRIBE
    )
    async with app.test_app(), app.app_context():
        await send(mail, msg)
        [received] = await smtp_server.wait_for_messages(1)
    signer = mail.state.settings.dkim
    assert signer is not None
    assert verify(received.data, dns_for(signer, "example.com"))
    tags = signature_tags(received.data)
    assert tags["a"] == f"{algorithm}-sha256"
    signed = tags["h"].split(":")
    assert {"list-unsubscribe", "list-unsubscribe-post"} <= set(signed)
    assert signed.count("from") == 2  # once more than it occurs
    assert received.data.count(b"DKIM-Signature:") == 1  # signed once
    assert msg.as_bytes() == received.data  # the seam: the very bytes sent
    tampered = received.data.replace(b"Hallo", b"Hullo")
    assert not verify(tampered, dns_for(signer, "example.com"))


async def test_as_bytes_is_unsigned_again_once_the_message_changes(
    smtp_server: SMTPTestServer, make_mail: MakeMail, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    app, mail = make_mail(
        smtp_server, MAIL_SUPPRESS_SEND=False, MAIL_DKIM_KEY=pem(ed_key), MAIL_DKIM_SELECTOR="s1"
    )
    msg = message()
    async with app.app_context():
        await mail.send(msg)
        assert msg.as_bytes().startswith(b"DKIM-Signature:")
        msg.body = "Changed\n"
        assert not msg.as_bytes().startswith(b"DKIM-Signature:")
        assert b"Changed" in msg.as_bytes()
        with pytest.raises(MessageError, match="end with the flattened message"):
            msg.set_signed(msg.as_bytes(), b"DKIM-Signature: x\r\n")


async def test_a_suppressed_message_is_checked_but_not_signed(
    make_mail: MakeMail, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    app, mail = make_mail(
        MAIL_SUPPRESS_SEND=True, MAIL_DKIM_KEY=pem(ed_key), MAIL_DKIM_SELECTOR="s1"
    )
    async with app.test_app(), app.app_context():
        with mail.record_messages() as outbox:
            await mail.send(message())
            await mail.send_background(message())
        assert len(outbox) == 2
        assert not any(msg.as_bytes().startswith(b"DKIM-Signature:") for msg in outbox)
        with pytest.raises(MessageError, match="MAIL_DKIM_DOMAIN"):
            mail.send_background(unsignable())


def unsignable() -> Message:
    """A message whose From has two domains, and no MAIL_DKIM_DOMAIN: no d= to sign for."""
    return Message(
        "Two",
        recipients=["rcpt@example.com"],
        body="x",
        extra_headers={"From": "a@one.example, b@two.example"},
    )


async def test_a_message_that_cannot_be_signed_fails_in_its_caller(
    smtp_server: SMTPTestServer,
    tmp_path: Path,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/outbox.db")
    app = Quart(__name__)
    app.config.update(
        smtp_server.mail_config(),
        MAIL_DEFAULT_SENDER=SENDER,
        MAIL_DKIM_KEY=pem(ed_key),
        MAIL_DKIM_SELECTOR="s1",
    )
    mail = Mail(app)
    mail.init_outbox(app, engine)
    try:
        async with app.test_app(), app.app_context():
            with pytest.raises(MessageError, match="MAIL_DKIM_DOMAIN"):
                await mail.send(unsignable())
            with pytest.raises(MessageError, match="MAIL_DKIM_DOMAIN"):
                mail.send_background(unsignable())
            async with AsyncSession(engine) as session:
                with pytest.raises(MessageError, match="MAIL_DKIM_DOMAIN"):
                    await mail.outbox.enqueue(session, unsignable())
                assert not session.new  # nothing added to the transaction
            assert mail.state.delivery.pending == 0
    finally:
        await engine.dispose()
    assert smtp_server.connections == 0


async def test_rsa_signing_leaves_the_event_loop_free(make_mail: MakeMail) -> None:
    # A 4096-bit key: dkimpy's pure-Python RSA takes tens of milliseconds.
    key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    app, mail = make_mail(MAIL_DKIM_KEY=pem(key), MAIL_DKIM_SELECTOR="big")
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    msg = message()
    async with app.app_context():
        envelope = mail.state.envelope(msg)
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)  # the ticker runs
        before = ticks
        signed = await mail.state.core.sign(msg, envelope)
        during = ticks - before
        stop.set()
        await task
    # Signed inline, the signature would take no turn of the loop at all.
    assert during > 0
    assert signed.data.startswith(b"DKIM-Signature:") and signed.data.endswith(envelope.data)
