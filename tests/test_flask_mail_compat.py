"""Flask-Mail 0.10's behaviour, checked as a Flask-Mail user porting an app
would check it (with ``await`` where Flask-Mail blocks), against the real SMTP
test server wherever something is sent.

The last section checks the differences we keep on purpose (the README's
"Coming from Flask-Mail").
"""

from __future__ import annotations

import asyncio
import time
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any

import pytest
from quart import Quart, current_app

from quartmail import (
    BadHeaderError,
    ConfigError,
    Mail,
    MailError,
    Message,
    MessageError,
    SendError,
    email_dispatched,
    email_failed,
)
from quartmail.testing import ReceivedMessage, SMTPServerFactory, SMTPTestServer

from conftest import SENDER, MakeMail


async def send(app: Quart, mail: Mail, server: SMTPTestServer, msg: Message) -> ReceivedMessage:
    async with app.app_context():
        await mail.send(msg)
    return server.messages[-1]


# --- 1. alts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alts",
    [
        {"html": "<p>Hello</p>", "json": '{"msg": "Hello"}'},
        [("html", "<p>Hello</p>"), ("json", '{"msg": "Hello"}')],
    ],
    ids=["dict", "pairs"],
)
async def test_alts_become_parts_of_the_alternative_in_order(
    smtp_server: SMTPTestServer, make_mail: MakeMail, alts: Any
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message("s", recipients=["to@example.com"], body="Hello", alts=alts)
    assert msg.alts == {"html": "<p>Hello</p>", "json": '{"msg": "Hello"}'}
    assert msg.html == "<p>Hello</p>"
    parsed = (await send(app, mail, smtp_server, msg)).parsed()
    assert parsed.get_content_type() == "multipart/alternative"
    parts = [(part.get_content_type(), part.get_content()) for part in parsed.iter_parts()]
    assert parts == [
        ("text/plain", "Hello\n"),
        ("text/html", "<p>Hello</p>\n"),
        ("text/json", '{"msg": "Hello"}\n'),
    ]


async def test_html_is_alts_html(smtp_server: SMTPTestServer, make_mail: MakeMail) -> None:
    msg = Message("s", recipients=["to@example.com"], body="text", alts={"json": "{}"})
    msg.html = "<b>late</b>"
    assert msg.alts == {"json": "{}", "html": "<b>late</b>"}
    msg.alts["html"] = "<b>later</b>"
    assert msg.html == "<b>later</b>"
    app, mail = make_mail(smtp_server)
    msg.attach("a.txt", "text/plain", b"attached")
    parsed = (await send(app, mail, smtp_server, msg)).parsed()
    assert parsed.get_content_type() == "multipart/mixed"
    alternative = next(parsed.iter_parts())
    subtypes = [part.get_content_subtype() for part in alternative.iter_parts()]
    assert subtypes == ["plain", "json", "html"]
    msg.html = None
    assert msg.alts == {"json": "{}"}


# --- 2. default sender at construction ---------------------------------------------------


async def test_a_message_made_in_an_app_context_takes_the_default_sender(
    make_mail: MakeMail,
) -> None:
    app, _ = make_mail()
    async with app.app_context():
        msg = Message(subject="subject", recipients=["to@example.com"])
        assert msg.sender == app.extensions["mail"].default_sender == SENDER
        app.extensions["mail"].default_sender = "other@example.com"
        assert Message("s").sender == "other@example.com"
    assert Message("s").sender is None  # outside: at send time, as before


async def test_a_message_made_outside_gets_the_default_sender_when_sent(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message("s", recipients=["to@example.com"], body="x")
    received = await send(app, mail, smtp_server, msg)
    assert msg.sender == SENDER
    assert received.mail_from == "sender@example.com"


# --- 3. a (name, address) sender --------------------------------------------------------


@pytest.mark.parametrize(
    ("pair", "shown"),
    [
        (("tester", "tester@example.com"), "tester <tester@example.com>"),
        (("Jörg Müller", "joerg@example.com"), "Jörg Müller <joerg@example.com>"),
        (("Doe, John", "john@example.com"), '"Doe, John" <john@example.com>'),
        (("", "bare@example.com"), "bare@example.com"),
    ],
)
async def test_a_sender_pair_reads_back_as_name_and_address(
    smtp_server: SMTPTestServer, make_mail: MakeMail, pair: tuple[str, str], shown: str
) -> None:
    msg = Message(subject="testing", sender=pair, recipients=["to@example.com"], body="x")
    assert msg.sender == shown
    app, mail = make_mail(smtp_server)
    received = await send(app, mail, smtp_server, msg)
    assert received.data.split(b"\r\n\r\n")[0].isascii()  # RFC 2047 on the wire
    [address] = received.parsed()["From"].addresses
    assert (address.display_name, address.addr_spec) == pair
    assert received.mail_from == pair[1]


async def test_a_default_sender_pair_reads_back_as_name_and_address(
    make_mail: MakeMail,
) -> None:
    app, _ = make_mail(MAIL_DEFAULT_SENDER=("tester", "tester@example.com"))
    async with app.app_context():
        assert Message("testing").sender == "tester <tester@example.com>"


# --- 4. date, 5. send_to, 6. str(msg), 7. no empty Subject --------------------------------


async def test_date_is_set_when_sent(smtp_server: SMTPTestServer, make_mail: MakeMail) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message("s", recipients=["to@example.com"], body="x")
    assert msg.date is None
    before = time.time()
    received = await send(app, mail, smtp_server, msg)
    after = time.time()
    assert isinstance(msg.date, float)
    assert before <= msg.date <= after
    assert parsedate_to_datetime(received.parsed()["Date"]).timestamp() == int(msg.date)
    given = Message("s", recipients=["to@example.com"], body="x", date=1_700_000_000)
    received = await send(app, mail, smtp_server, given)
    assert given.date == 1_700_000_000
    assert parsedate_to_datetime(received.parsed()["Date"]).timestamp() == 1_700_000_000


async def test_send_to_is_every_recipient_once(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    msg = Message(
        subject="subject",
        recipients=["somebody@here.com"],
        cc=["cc@example.com"],
        bcc=["bcc@example.com"],
        body="x",
    )
    assert msg.send_to == {"somebody@here.com", "cc@example.com", "bcc@example.com"}
    msg.add_recipient("cc@example.com")
    assert len(msg.send_to) == 3
    app, mail = make_mail(smtp_server)
    received = await send(app, mail, smtp_server, msg)
    assert sorted(received.rcpt_tos) == sorted(msg.send_to)


async def test_str_of_a_message_is_as_string(make_mail: MakeMail) -> None:
    app, _ = make_mail()
    async with app.app_context():
        msg = Message("subject", recipients=["to@example.com"], body="some plain text")
        assert str(msg) == msg.as_string()
        assert bytes(msg) == msg.as_bytes()
        assert "From: Sender <sender@example.com>" in str(msg)


@pytest.mark.parametrize("subject", ["", None])
async def test_no_subject_header_when_the_subject_is_empty(
    smtp_server: SMTPTestServer, make_mail: MakeMail, subject: str | None
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message(subject, recipients=["to@example.com"], body="normal ascii text")
    received = await send(app, mail, smtp_server, msg)
    assert b"Subject:" not in received.data
    async with app.app_context():
        assert "Subject:" not in msg.as_string()


# --- 8. as_string() / as_bytes() are what goes on the wire --------------------------------


@pytest.mark.parametrize("ascii_attachments", [False, True])
async def test_as_bytes_after_sending_is_what_was_sent(
    smtp_server: SMTPTestServer, make_mail: MakeMail, ascii_attachments: bool
) -> None:
    app, mail = make_mail(smtp_server, MAIL_ASCII_ATTACHMENTS=ascii_attachments)
    msg = Message("Grüße", recipients=["Ä <to@example.com>"], body="text", html="<p>html</p>")
    msg.attach("ünicödeß ←.→ ✓.txt", "text/plain", b"this is a test")
    received = await send(app, mail, smtp_server, msg)
    async with app.app_context():
        assert msg.as_bytes() == received.data
        assert msg.as_string() == received.data.decode("ascii")
    [attachment] = received.parsed().iter_attachments()
    expected = "unicode . .txt" if ascii_attachments else "ünicödeß ←.→ ✓.txt"
    assert attachment.get_filename() == expected


async def test_as_string_follows_a_changed_ascii_attachments(make_mail: MakeMail) -> None:
    app, mail = make_mail()
    async with app.app_context():
        mail.state.ascii_attachments = True
        msg = Message("s", recipients=["to@example.com"], body="hello")
        msg.attach("ünicödeß ←.→ ✓.txt", "text/plain", b"this is a test")
        assert 'Content-Disposition: attachment; filename="unicode . .txt"' in msg.as_string()
        msg.attachments[0].filename = " ✓ a ✓ ✓ b ✓.txt"
        assert 'Content-Disposition: attachment; filename="a b .txt"' in msg.as_string()


# --- 9. app.extensions["mail"] -------------------------------------------------------------


async def test_the_state_has_flask_mails_attributes(smtp_server: SMTPTestServer) -> None:
    app = Quart(__name__)
    app.config.update(
        smtp_server.mail_config(),
        MAIL_USERNAME="user",
        MAIL_PASSWORD="s3cret-Pa55",
        MAIL_DEFAULT_SENDER="support@example.com",
        MAIL_MAX_EMAILS=10,
        MAIL_DEBUG=True,
        MAIL_ASCII_ATTACHMENTS=True,
    )
    mail = Mail()
    state = mail.init_app(app)
    assert state is app.extensions["mail"]
    attributes = {
        "server": state.server,
        "username": state.username,
        "port": state.port,
        "use_tls": state.use_tls,
        "use_ssl": state.use_ssl,
        "default_sender": state.default_sender,
        "debug": state.debug,
        "max_emails": state.max_emails,
        "suppress": state.suppress,
        "ascii_attachments": state.ascii_attachments,
    }
    assert attributes == {
        "server": "127.0.0.1",
        "username": "user",
        "port": smtp_server.port,
        "use_tls": False,
        "use_ssl": False,
        "default_sender": "support@example.com",
        "debug": 1,
        "max_emails": 10,
        "suppress": False,
        "ascii_attachments": True,
    }
    assert "s3cret-Pa55" not in repr(state)
    assert not hasattr(state, "password")
    async with app.app_context():
        new_state = mail.init_mail(app.config, app.debug, app.testing)
    assert new_state is not state
    assert {name: getattr(new_state, name) for name in attributes} == attributes


async def test_changing_the_default_sender_on_the_state_takes_effect(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    app.extensions["mail"].default_sender = ("Support", "support@example.com")
    received = await send(app, mail, smtp_server, Message("s", recipients=["to@x.org"], body="x"))
    assert received.mail_from == "support@example.com"
    assert received.parsed()["From"] == "Support <support@example.com>"
    with pytest.raises(ConfigError, match="MAIL_DEFAULT_SENDER"):
        app.extensions["mail"].default_sender = "not an address"
    with pytest.raises(ConfigError, match="MAIL_ASCII_ATTACHMENTS"):
        app.extensions["mail"].ascii_attachments = "yes"


@pytest.mark.parametrize(
    ("attribute", "key"),
    [("server", "MAIL_SERVER"), ("port", "MAIL_PORT"), ("suppress", "MAIL_SUPPRESS_SEND")],
)
def test_changing_a_connection_setting_on_the_state_is_refused(
    make_mail: MakeMail, attribute: str, key: str
) -> None:
    app, _ = make_mail()
    with pytest.raises(ConfigError, match=key):
        setattr(app.extensions["mail"], attribute, "other")


async def test_code_that_uses_the_state_sends_records_and_connects(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, _ = make_mail(smtp_server)
    async with app.app_context():
        state = current_app.extensions["mail"]
        with state.record_messages() as outbox:
            await state.send(Message("one", recipients=["to@example.com"], body="x"))
            await state.send_message(subject="two", recipients=["to@example.com"], body="x")
            async with state.connect() as conn:
                await conn.send_message(subject="three", recipients=["to@example.com"], body="x")
            async with state.connect() as conn:
                await Message("four", recipients=["to@example.com"], body="x").send(conn)
    subjects = ["one", "two", "three", "four"]
    assert [msg.subject for msg in outbox] == subjects
    assert [m.parsed()["Subject"] for m in smtp_server.messages] == subjects


def test_init_mail_needs_an_app() -> None:
    with pytest.raises(RuntimeError, match="app"):
        Mail().init_mail({})


# --- 10. signals: the app is the sender ------------------------------------------------------


async def test_flask_mail_receivers_work_sync_and_async(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    other_app, _ = make_mail(smtp_server)
    seen: list[tuple[str, Quart, str]] = []

    def on_sent(app: Quart, message: Message) -> None:  # written for Flask-Mail 0.10
        seen.append(("sync", app, message.subject or ""))

    async def on_sent_async(app: Quart, message: Message) -> None:
        await asyncio.sleep(0)
        seen.append(("async", app, message.subject or ""))

    def only_other_app(app: Quart, message: Message) -> None:
        seen.append(("other", app, message.subject or ""))

    with (
        email_dispatched.connected_to(on_sent),
        email_dispatched.connected_to(on_sent_async),
        email_dispatched.connected_to(only_other_app, sender=other_app),
    ):
        await send(app, mail, smtp_server, Message("hi", recipients=["to@x.org"], body="x"))
    assert seen == [("sync", app, "hi"), ("async", app, "hi")]


async def test_email_failed_gets_the_app_the_message_and_the_error(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.data_replies.append("554 5.6.0 Rejected content")
    app, mail = make_mail(smtp_server, MAIL_RETRY_DELAY=0.01)
    failures: list[tuple[Quart, Message, MailError]] = []

    def on_failed(app: Quart, message: Message, error: MailError) -> None:
        failures.append((app, message, error))

    msg = Message("hi", recipients=["to@example.com"], body="x")
    with email_failed.connected_to(on_failed):
        async with app.test_app(), app.app_context():
            future = mail.send_background(msg)
            with pytest.raises(SendError) as caught:
                await future
    assert failures == [(app, msg, caught.value)]


# --- Differences we keep ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sender": "from@example.com\r\n"},
        {"reply_to": "evil@example.com\r"},
        {"recipients": ["to@example.com", "to\r\n@example.com"]},
        {"subject": "testing\r\n testing"},  # a folded subject: Flask-Mail sends it
    ],
)
async def test_a_line_break_in_an_address_or_the_subject_is_refused(
    smtp_server: SMTPTestServer, make_mail: MakeMail, kwargs: dict[str, Any]
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message(**({"subject": "s", "recipients": ["to@example.com"], "body": "x"} | kwargs))
    assert msg.has_bad_headers()
    async with app.app_context():
        with pytest.raises(BadHeaderError):
            await mail.send(msg)
    assert smtp_server.connections == 0


@pytest.mark.parametrize(
    "sender", [("ÄÜÖ → ✓", "from@example.com>"), "ÄÜÖ → ✓ <from@example.com>>"]
)
async def test_a_malformed_address_is_refused(
    smtp_server: SMTPTestServer, make_mail: MakeMail, sender: Any
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message("s", sender=sender, recipients=["to@example.com"], body="x")
    async with app.app_context():
        with pytest.raises(MessageError):
            await mail.send(msg)
    assert smtp_server.connections == 0


async def test_html_only_is_one_html_part_and_text_ends_with_a_line_break(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    html = await send(app, mail, smtp_server, Message("s", recipients=["t@x.org"], html="<p>x</p>"))
    assert html.parsed().get_content_type() == "text/html"
    text = await send(app, mail, smtp_server, Message("s", recipients=["t@x.org"], body="no end"))
    assert text.data.endswith(b"\r\n\r\nno end\r\n")


async def test_a_non_utf8_charset_is_for_the_bodies_headers_stay_utf8(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory()
    app, mail = make_mail(server)
    msg = Message(
        "表題",
        sender=("送信者", "from@example.com"),
        recipients=["foo@example.com"],
        body="内容",
        charset="shift_jis",
        date=1_700_000_000,
    )
    received = await send(app, mail, server, msg)
    assert b"Subject: =?utf-8?b?" in received.data
    assert b"From: =?utf-8?b?" in received.data
    parsed = received.parsed()
    assert parsed.get_content_charset() == "shift_jis"
    assert parsed.get_content().replace("\r\n", "\n") == "内容\n"  # base64 holds CRLF
    assert parsed["Subject"] == "表題"
    assert parsed["Date"] == format_datetime(parsedate_to_datetime(parsed["Date"]))


async def test_mail_without_its_app_or_outbox_says_what_is_missing(make_mail: MakeMail) -> None:
    with pytest.raises(RuntimeError, match="No app: use Mail inside an app context"):
        _ = Mail().outbox
    async with Quart(__name__).app_context():
        with pytest.raises(RuntimeError, match=r"Mail.init_app\(app\) was not called"):
            _ = Mail().outbox
    app, mail = make_mail()
    async with app.app_context():
        with pytest.raises(RuntimeError, match=r"no outbox: call mail.init_outbox"):
            _ = mail.outbox
