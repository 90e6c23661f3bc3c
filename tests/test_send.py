"""Sending with Mail.send / Mail.connect against a real SMTP server on loopback."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from email.message import MIMEPart
from typing import Any, Literal

import pytest
from quart import Quart

from quartmail import (
    AuthenticationError,
    BadHeaderError,
    ConfigError,
    ConnectError,
    MailError,
    Message,
    MessageError,
    RecipientsRefusedError,
    SendError,
    SendTimeoutError,
    email_dispatched,
)
from quartmail.testing import SMTPServerFactory, SMTPTestServer, TLSCertificates

from conftest import SENDER, MakeMail

TLSMode = Literal["starttls", "implicit"]


def text_of(part: MIMEPart) -> str:
    """A text part's content as a reader sees it (base64 text keeps MIME's CRLFs)."""
    content: str = part.get_content()
    return content.replace("\r\n", "\n").rstrip("\n")


html_of = text_of

CHINESE_SUBJECT = "你好，世界：注册确认"
CHINESE_NAME = "张伟"
CHINESE_BODY = "欢迎加入！这是一封测试邮件。"


async def test_text_and_html_arrive_as_multipart_alternative(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message("test mail", sender="you@example.com", recipients=["them@example.com"])
    msg.body = "This is the plain text body"
    msg.html = "This is the <b>HTML</b> body"
    async with app.app_context():
        result = await mail.send(msg)

    [received] = smtp_server.messages
    assert received.mail_from == "you@example.com"
    assert received.rcpt_tos == ["them@example.com"]
    parsed = received.parsed()
    assert parsed.get_content_type() == "multipart/alternative"
    text, html = parsed.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert text_of(text) == "This is the plain text body"
    assert html.get_content_type() == "text/html"
    assert html_of(html) == "This is the <b>HTML</b> body"
    assert result.refused == {}
    assert result.message_id == parsed["Message-ID"] == msg.msg_id


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_tls_and_auth_with_chinese_subject_name_and_body(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, tls: TLSMode
) -> None:
    server = await smtp_server_factory(tls=tls, auth=("mailer", "s3cret-pässword"))
    app, mail = make_mail(server)
    async with app.app_context():
        await mail.send_message(
            CHINESE_SUBJECT,
            sender=(CHINESE_NAME, "zhang@example.com"),
            recipients=[f"{CHINESE_NAME} <wei@example.com>"],
            body=CHINESE_BODY,
            html=f"<p>{CHINESE_BODY}</p>",
        )

    [received] = server.messages
    assert received.tls
    assert received.login == "mailer"
    raw_headers = received.data.split(b"\r\n\r\n", 1)[0]
    assert raw_headers.isascii(), "non-ASCII headers must be RFC 2047-encoded"
    assert b"=?utf-8?" in raw_headers
    parsed = received.parsed()
    assert parsed["Subject"] == CHINESE_SUBJECT
    assert parsed["From"].addresses[0].display_name == CHINESE_NAME
    assert parsed["To"].addresses[0].display_name == CHINESE_NAME
    text, html = parsed.iter_parts()
    assert text_of(text) == CHINESE_BODY
    assert html_of(html) == f"<p>{CHINESE_BODY}</p>"


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_untrusted_certificate_is_refused(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, tls: TLSMode
) -> None:
    server = await smtp_server_factory(tls=tls)
    app, mail = make_mail(server, MAIL_CA_FILE=None)
    async with app.app_context():
        with pytest.raises(ConnectError, match="certificate"):
            await mail.send_message("hi", recipients=["a@example.com"], body="x")
    assert server.messages == []


async def test_validate_certs_off_accepts_an_untrusted_certificate(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="implicit")
    app, mail = make_mail(server, MAIL_CA_FILE=None, MAIL_VALIDATE_CERTS=False)
    async with app.app_context():
        await mail.send_message("hi", recipients=["a@example.com"], body="x")
    assert len(server.messages) == 1


async def test_starttls_required_but_not_offered_sends_nothing(
    smtp_server: SMTPTestServer, make_mail: MakeMail, smtp_certificates: TLSCertificates
) -> None:
    app, mail = make_mail(
        smtp_server, MAIL_USE_TLS=True, MAIL_CA_FILE=str(smtp_certificates.ca_file)
    )
    async with app.app_context():
        with pytest.raises(SendError, match="STARTTLS"):
            await mail.send_message("hi", recipients=["a@example.com"], body="x")
    assert smtp_server.messages == []


async def test_wrong_password_raises_without_the_password(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", auth=("mailer", "right-password"))
    app, mail = make_mail(server, MAIL_PASSWORD="wrong-Pa55word")
    async with app.app_context():
        with pytest.raises(AuthenticationError) as caught:
            await mail.send_message("hi", recipients=["a@example.com"], body="x")
    assert caught.value.code == 535
    assert not caught.value.transient
    text = f"{caught.value} {caught.value!r}"
    assert "wrong-Pa55word" not in text
    assert base64.b64encode(b"\0mailer\0wrong-Pa55word").decode() not in text
    assert server.messages == []


def test_tls_and_ssl_together_fail_at_init(make_mail: MakeMail) -> None:
    with pytest.raises(ConfigError, match=r"MAIL_USE_TLS.*MAIL_USE_SSL"):
        make_mail(MAIL_USE_TLS=True, MAIL_USE_SSL=True)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("MAIL_PORT", "not-a-port"),
        ("MAIL_PORT", 70000),
        ("MAIL_TIMEOUT", 0),
        ("MAIL_MAX_EMAILS", 0),
        ("MAIL_USE_TLS", "maybe"),
        ("MAIL_DEFAULT_SENDER", "not an address"),
        ("MAIL_CA_FILE", "/no/such/ca.pem"),
        ("MAIL_POOL_SIZE", "lots"),
        ("MAIL_RETRY_DELAY", -1),
        ("MAIL_OUTBOX_LEASE", 1),  # under 3 x MAIL_OUTBOX_POLL (1 s)
        ("MAIL_LOCAL_HOSTNAME", "two words"),
    ],
)
def test_bad_setting_fails_at_init_naming_it(
    make_mail: MakeMail, setting: str, value: object
) -> None:
    with pytest.raises(ConfigError, match=setting):
        make_mail(**{setting: value})


def test_settings_from_the_environment_are_parsed(make_mail: MakeMail) -> None:
    _, mail = make_mail(MAIL_PORT="2525", MAIL_USE_SSL="true", MAIL_TIMEOUT="2.5")
    assert mail.app is not None
    settings = mail.app.extensions["mail"].settings
    assert (settings.smtp.port, settings.smtp.use_ssl, settings.smtp.timeout) == (2525, True, 2.5)


async def test_cc_and_bcc_are_in_the_envelope_but_bcc_is_not_on_the_wire(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    async with app.app_context():
        await mail.send_message(
            "hi",
            recipients=["to@example.com"],
            cc=["Carbon <cc@example.com>"],
            bcc=["secret@example.com"],
            body="x",
        )
    [received] = smtp_server.messages
    assert received.rcpt_tos == ["to@example.com", "cc@example.com", "secret@example.com"]
    assert b"secret@example.com" not in received.data
    assert b"\r\nBcc:" not in received.data
    assert received.parsed()["Cc"] == "Carbon <cc@example.com>"


async def test_binary_attachment_with_non_ascii_name_round_trips(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    payload = bytes(range(256)) * 40
    filename = "résumé 报告 2026.pdf"
    app, mail = make_mail(smtp_server)
    msg = Message("report", recipients=["a@example.com"], body="see attached", html="<p>see</p>")
    msg.attach(filename, "application/pdf", payload)
    async with app.app_context():
        await mail.send(msg)

    [received] = smtp_server.messages
    assert b"filename*=utf-8''" in received.data  # RFC 2231
    parsed = received.parsed()
    assert parsed.get_content_type() == "multipart/mixed"
    alternative, attachment = parsed.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    assert attachment.get_filename() == filename
    assert attachment["Content-Transfer-Encoding"] == "base64"
    assert attachment.get_content() == payload


async def test_ascii_attachments_setting_strips_accents(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server, MAIL_ASCII_ATTACHMENTS=True)
    msg = Message("report", recipients=["a@example.com"], body="x")
    msg.attach("résumé.txt", "text/plain", "hello")
    async with app.app_context():
        await mail.send(msg)
    [attachment] = smtp_server.messages[0].parsed().iter_attachments()
    assert attachment.get_filename() == "resume.txt"


@pytest.mark.parametrize(
    "field",
    ["subject", "recipients", "sender", "reply_to", "cc", "bcc", "extra_headers"],
)
async def test_header_injection_raises_and_sends_nothing(
    smtp_server: SMTPTestServer, make_mail: MakeMail, field: str
) -> None:
    evil = "a@example.com\r\nBcc: victim@example.org"
    values: dict[str, Any] = {
        "subject": "Hello\nBcc: victim@example.org",
        "recipients": [evil],
        "sender": evil,
        "reply_to": evil,
        "cc": [evil],
        "bcc": [evil],
        "extra_headers": {"X-Note": "hi\r\nBcc: victim@example.org"},
    }
    kwargs: dict[str, Any] = {"recipients": ["ok@example.com"], "body": "x"}
    kwargs[field] = values[field]
    app, mail = make_mail(smtp_server)
    msg = Message(**kwargs)
    assert msg.has_bad_headers()
    async with app.app_context():
        with pytest.raises(BadHeaderError):
            await mail.send(msg)
    assert smtp_server.connections == 0


async def test_suppressed_send_records_and_never_connects(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server, MAIL_SUPPRESS_SEND=True)
    async with app.app_context():
        with mail.record_messages() as outbox:
            result = await mail.send_message("hi", recipients=["a@example.com"], body="x")
    assert [m.subject for m in outbox] == ["hi"]
    assert outbox[0].sender == SENDER
    assert result.message_id == outbox[0].msg_id
    assert smtp_server.connections == 0


async def test_testing_app_suppresses_by_default(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server, TESTING=True, MAIL_SUPPRESS_SEND=None)
    async with app.app_context():
        with mail.record_messages() as outbox:
            await mail.send_message("hi", recipients=["a@example.com"], body="x")
    assert len(outbox) == 1
    assert smtp_server.connections == 0


async def test_record_messages_also_records_real_sends(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    async with app.app_context():
        with mail.record_messages() as outbox:
            await mail.send_message("hi", recipients=["a@example.com"], body="x")
        await mail.send_message("after", recipients=["a@example.com"], body="x")
    assert [m.subject for m in outbox] == ["hi"]
    assert len(smtp_server.messages) == 2


async def test_connect_reuses_one_session(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", auth=("mailer", "pw"))
    app, mail = make_mail(server)
    async with app.app_context(), mail.connect() as conn:
        for n in range(3):
            await conn.send(Message(f"m{n}", recipients=["a@example.com"], body="x"))
    assert [m.parsed()["Subject"] for m in server.messages] == ["m0", "m1", "m2"]
    assert server.connections == 1


async def test_max_emails_reconnects(smtp_server: SMTPTestServer, make_mail: MakeMail) -> None:
    app, mail = make_mail(smtp_server, MAIL_MAX_EMAILS=2)
    async with app.app_context(), mail.connect() as conn:
        for n in range(5):
            await conn.send_message(f"m{n}", recipients=["a@example.com"], body="x")
    assert len(smtp_server.messages) == 5
    assert smtp_server.connections == 3


@pytest.mark.parametrize("setting", [None, "mailer.example.com"])
async def test_ehlo_gives_the_local_hostname(
    smtp_server: SMTPTestServer, make_mail: MakeMail, setting: str | None
) -> None:
    app, mail = make_mail(smtp_server, MAIL_LOCAL_HOSTNAME=setting)
    async with app.app_context():
        await mail.send_message("hi", recipients=["a@example.com"], body="x")
    assert smtp_server.messages[0].helo == (setting or socket.getfqdn())


async def test_each_send_opens_its_own_session(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    async with app.app_context():
        for _ in range(2):
            await mail.send_message("hi", recipients=["a@example.com"], body="x")
    assert smtp_server.connections == 2


@pytest.mark.parametrize(
    ("default_sender", "envelope", "header"),
    [
        ("plain@example.com", "plain@example.com", "plain@example.com"),
        (
            ("Flasky Admin", "flasky@example.com"),
            "flasky@example.com",
            "Flasky Admin <flasky@example.com>",
        ),
        (
            ["Flasky Admin", "flasky@example.com"],
            "flasky@example.com",
            "Flasky Admin <flasky@example.com>",
        ),
    ],
)
async def test_default_sender(
    smtp_server: SMTPTestServer,
    make_mail: MakeMail,
    default_sender: object,
    envelope: str,
    header: str,
) -> None:
    app, mail = make_mail(smtp_server, MAIL_DEFAULT_SENDER=default_sender)
    async with app.app_context():
        await mail.send_message("hi", recipients=["a@example.com"], body="x")
    [received] = smtp_server.messages
    assert received.mail_from == envelope
    assert received.parsed()["From"] == header


async def test_missing_sender_or_recipients_raise_before_connecting(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server, MAIL_DEFAULT_SENDER=None)
    async with app.app_context():
        with pytest.raises(MessageError, match="sender"):
            await mail.send_message("hi", recipients=["a@example.com"], body="x")
        with pytest.raises(MessageError, match="recipients"):
            await mail.send_message("hi", sender="me@example.com", body="x")
        with pytest.raises(MessageError, match="one valid address"):
            await mail.send_message("hi", sender="me@example.com", recipients="a@x.org, b@x.org")
    assert smtp_server.connections == 0


async def test_partial_refusal_is_reported_and_the_rest_delivered(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.refuse_recipients["gone@example.com"] = "550 5.1.1 User unknown"
    app, mail = make_mail(smtp_server)
    async with app.app_context():
        result = await mail.send_message(
            "hi", recipients=["ok@example.com", "gone@example.com"], body="x"
        )
    assert result.refused == {"gone@example.com": (550, "5.1.1 User unknown")}
    assert smtp_server.messages[0].rcpt_tos == ["ok@example.com"]


async def test_all_recipients_refused_raises(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.refuse_recipients["gone@example.com"] = "550 5.1.1 User unknown"
    smtp_server.refuse_recipients["later@example.com"] = "451 4.3.0 Try again later"
    app, mail = make_mail(smtp_server)
    async with app.app_context():
        with pytest.raises(RecipientsRefusedError) as caught:
            await mail.send_message(
                "hi", recipients=["gone@example.com", "later@example.com"], body="x"
            )
    assert caught.value.refused == {
        "gone@example.com": (550, "5.1.1 User unknown"),
        "later@example.com": (451, "4.3.0 Try again later"),
    }
    assert not caught.value.transient
    assert smtp_server.messages == []


async def test_rejected_data_keeps_the_code(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.data_replies.append("554 5.6.0 Rejected content")
    app, mail = make_mail(smtp_server)
    async with app.app_context():
        with pytest.raises(SendError) as caught:
            await mail.send_message("hi", recipients=["a@example.com"], body="x")
    assert caught.value.code == 554
    assert not caught.value.transient
    assert isinstance(caught.value.__cause__, Exception)


async def test_a_server_that_never_answers_fails_within_the_timeout(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(silent=True)
    app, mail = make_mail(server, MAIL_TIMEOUT=0.3)
    async with app.app_context(), asyncio.timeout(10):  # a hang fails the test, not the run
        with pytest.raises(SendTimeoutError) as caught:
            await mail.send_message("hi", recipients=["a@example.com"], body="x")
    assert caught.value.transient
    assert isinstance(caught.value, TimeoutError)


async def test_connection_refused_is_a_connect_error(
    make_mail: MakeMail, unused_tcp_port: int
) -> None:
    app, mail = make_mail(MAIL_SERVER="127.0.0.1", MAIL_PORT=unused_tcp_port)
    async with app.app_context():
        with pytest.raises(ConnectError) as caught:
            await mail.send_message("hi", recipients=["a@example.com"], body="x")
    assert caught.value.transient
    assert isinstance(caught.value, MailError)


async def test_debug_log_masks_the_password(
    smtp_server_factory: SMTPServerFactory,
    make_mail: MakeMail,
    caplog: pytest.LogCaptureFixture,
) -> None:
    password = "Tr0ub4dor&3-secret"
    server = await smtp_server_factory(tls="starttls", auth=("mailer", password))
    app, mail = make_mail(server, MAIL_DEBUG=True)
    caplog.set_level(logging.DEBUG, logger="quartmail")
    async with app.app_context():
        await mail.send_message("hi", recipients=["a@example.com"], body="x")
        async with mail.connect() as conn:
            await conn.send_message("hi", recipients=["a@example.com"], body="x")
            everything = " ".join(
                [caplog.text, repr(mail.state.settings), repr(mail.state), repr(conn)]
            )

    assert ">>> MAIL FROM:<sender@example.com>" in caplog.text
    assert "AUTH" in caplog.text and "****" in caplog.text
    forms = [
        password,
        base64.b64encode(password.encode()).decode(),
        base64.b64encode(f"\0mailer\0{password}".encode()).decode(),
    ]
    for form in forms:
        assert form not in everything


async def test_signal_receivers_sync_and_async(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    seen: list[str] = []

    def sync_receiver(app: Quart, message: Message, **extra: object) -> None:
        seen.append(f"sync {message.subject}")

    async def async_receiver(app: Quart, message: Message, **extra: object) -> None:
        await asyncio.sleep(0)
        seen.append(f"async {message.subject}")

    def broken_receiver(app: Quart, message: Message, **extra: object) -> None:
        raise RuntimeError("a broken receiver must not fail the send")

    app, mail = make_mail(smtp_server)
    with (
        email_dispatched.connected_to(sync_receiver),
        email_dispatched.connected_to(broken_receiver),
        email_dispatched.connected_to(async_receiver),
    ):
        async with app.app_context():
            result = await mail.send_message("hi", recipients=["a@example.com"], body="x")
    assert sorted(seen) == ["async hi", "sync hi"]  # called as receiver(app, message=...)
    assert result.refused == {}
