"""What a misbehaving SMTP server does to send, connect() and background delivery: a
recipient limit (452), replies that are not SMTP, a 535 that quotes the credentials."""

from __future__ import annotations

import base64
import logging
import re

import pytest

from quartmail import (
    AuthenticationError,
    ConnectError,
    Message,
    RecipientsRefusedError,
)
from quartmail.testing import ReceivedMessage, SMTPServerFactory, SMTPTestServer

from conftest import MakeMail, everything_said

RECIPIENTS = [f"user{n}@example.com" for n in range(5)]


def message(recipients: list[str] | None = None) -> Message:
    return Message("hello", recipients=recipients or RECIPIENTS, body="body")


def one_message_id(received: list[ReceivedMessage]) -> str:
    ids = {str(m.parsed()["Message-ID"]) for m in received}
    assert len(ids) == 1, ids
    return ids.pop()


# 452 too many recipients: the rest in another transaction (RFC 5321 4.5.3.1.10)


async def test_send_splits_at_the_servers_recipient_limit(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.max_recipients = 2
    app, mail = make_mail(smtp_server)
    async with app.app_context():
        msg = message()
        result = await mail.send(msg)
    assert result.refused == {}
    assert [m.rcpt_tos for m in smtp_server.messages] == [
        RECIPIENTS[:2],
        RECIPIENTS[2:4],
        RECIPIENTS[4:],
    ]
    assert one_message_id(smtp_server.messages) == msg.msg_id == result.message_id
    assert smtp_server.connections == 1


async def test_connect_splits_and_keeps_other_refusals(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.max_recipients = 2
    smtp_server.refuse_recipients["user1@example.com"] = "550 5.1.1 User unknown"
    app, mail = make_mail(smtp_server)
    async with app.app_context(), mail.connect() as conn:
        first = await conn.send(message())
        second = await conn.send(message(["a@example.com", "b@example.com", "c@example.com"]))
    assert first.refused == {"user1@example.com": (550, "5.1.1 User unknown")}
    assert second.refused == {}
    delivered = [address for m in smtp_server.messages for address in m.rcpt_tos]
    assert sorted(delivered) == sorted(
        [a for a in RECIPIENTS if a != "user1@example.com"]
        + ["a@example.com", "b@example.com", "c@example.com"]
    )
    assert smtp_server.connections == 1


async def test_background_splits_at_the_servers_recipient_limit(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.max_recipients = 3
    app, mail = make_mail(smtp_server)
    async with app.test_app(), app.app_context():
        result = await mail.send_background(message())
    assert result.refused == {}
    assert sorted(a for m in smtp_server.messages for a in m.rcpt_tos) == RECIPIENTS
    assert len(smtp_server.messages) == 2
    assert one_message_id(smtp_server.messages) == result.message_id


async def test_a_server_that_takes_no_recipient_at_all_is_not_looped_on(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.max_recipients = 0
    app, mail = make_mail(smtp_server)
    async with app.app_context():
        with pytest.raises(RecipientsRefusedError) as caught:
            await mail.send(message())
    assert caught.value.code == 452
    assert caught.value.transient
    assert set(caught.value.refused) == set(RECIPIENTS)
    assert smtp_server.data_attempts == 0


# Codes: a reply that is not SMTP has no code and is transient


@pytest.mark.parametrize("fault", ["greeting", "ehlo"])
async def test_a_malformed_reply_has_no_code_and_is_transient(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, fault: str
) -> None:
    server = await smtp_server_factory(greeting="garbage" if fault == "greeting" else None)
    server.ehlo_reply = "garbage" if fault == "ehlo" else None
    app, mail = make_mail(server)
    async with app.app_context():
        with pytest.raises(ConnectError) as caught:
            await mail.send(message())
    assert caught.value.code is None
    assert caught.value.transient
    assert "malformed" in str(caught.value)


async def test_background_retries_a_malformed_reply(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.ehlo_reply = "garbage"
    app, mail = make_mail(smtp_server, MAIL_RETRIES=1, MAIL_RETRY_DELAY=0.01)
    async with app.test_app(), app.app_context():
        with pytest.raises(ConnectError) as caught:
            await mail.send_background(message())
    assert caught.value.code is None
    assert smtp_server.connections == 2  # tried again: transient


async def test_every_recipient_refused_carries_the_code(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.refuse_recipients["gone@example.com"] = "550 5.1.1 User unknown"
    app, mail = make_mail(smtp_server)
    async with app.app_context():
        with pytest.raises(RecipientsRefusedError) as caught:
            await mail.send(message(["gone@example.com"]))
    assert caught.value.code == 550
    assert not caught.value.transient


# Secrets: nowhere in the exception chain


def forms(user: str, password: str) -> list[str]:
    return [
        password,
        base64.b64encode(password.encode()).decode(),
        base64.b64encode(f"\0{user}\0{password}".encode()).decode(),
    ]


async def test_a_535_quoting_the_password_leaves_it_nowhere_in_the_chain(
    smtp_server_factory: SMTPServerFactory,
    make_mail: MakeMail,
    caplog: pytest.LogCaptureFixture,
) -> None:
    password = "wrong-Pa55word-7"
    server = await smtp_server_factory(tls="starttls", auth=("mailer", "right-password"))
    server.echo_auth = True
    app, mail = make_mail(server, MAIL_USERNAME="mailer", MAIL_PASSWORD=password, MAIL_DEBUG=True)
    caplog.set_level(logging.DEBUG, logger="quartmail")
    async with app.app_context():
        with pytest.raises(AuthenticationError) as caught:
            await mail.send(message())
    said = everything_said(caught.value) + caplog.text
    assert "535" in str(caught.value) and "****" in str(caught.value)
    assert caught.value.__cause__ is not None  # kept, with the password masked
    for form in forms("mailer", password):
        assert form not in said


async def test_masking_a_one_letter_password_does_not_point_at_it(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", auth=("mailer", "right-password"))
    server.echo_auth = True
    app, mail = make_mail(server, MAIL_USERNAME="mailer", MAIL_PASSWORD="e")
    async with app.app_context():
        with pytest.raises(AuthenticationError) as caught:
            await mail.send(message())
    said = everything_said(caught.value)
    # Words that merely contain the letter are left alone...
    assert "refused the login for 'mailer'" in str(caught.value)
    assert "Refused AUTH" in str(caught.value)
    # ...and the password, where it stands alone, and its base64 forms are masked.
    assert re.search(r"(?<![A-Za-z0-9])e(?![A-Za-z0-9])", said) is None
    for form in forms("mailer", "e")[1:]:
        assert form not in said
