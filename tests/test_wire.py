"""What goes on the wire: the bytes the SMTP server received, checked as an MTA
and a spam filter would check them."""

from __future__ import annotations

import re
from email.message import EmailMessage
from email.utils import parsedate_to_datetime

import pytest
from quart import Quart

from quartmail import Mail, Message, SendError
from quartmail.testing import ReceivedMessage, SMTPServerFactory, SMTPTestServer

from conftest import MakeMail

MESSAGE_ID = re.compile(r"^<[^<>@\s]+@[^<>@\s]+>$")


async def send(app: Quart, mail: Mail, server: SMTPTestServer, msg: Message) -> ReceivedMessage:
    async with app.app_context():
        await mail.send(msg)
    return server.messages[-1]


def leaf_parts(parsed: EmailMessage) -> list[EmailMessage]:
    return [part for part in parsed.walk() if not part.is_multipart()]


def assert_transfer_encodings_valid(received: ReceivedMessage) -> None:
    """Every leaf part has a CTE that matches its bytes: never 8-bit data as 7bit."""
    for part in leaf_parts(received.parsed()):
        cte = part.get("Content-Transfer-Encoding", "7bit").lower()
        assert cte in {"7bit", "quoted-printable", "base64"}, cte
        if cte == "7bit":
            payload = part.get_payload(decode=False)
            assert isinstance(payload, str)
            assert payload.isascii()


def assert_lines_short(data: bytes) -> None:
    longest = max(len(line) for line in data.split(b"\r\n"))
    assert longest <= 998, f"a line of {longest} octets"


async def test_every_message_has_unique_valid_message_id_date_and_mime_version(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    async with app.app_context(), mail.connect() as conn:
        for n in range(20):
            await conn.send_message(f"m{n}", recipients=["a@example.com"], body="x")
    ids = []
    for received in smtp_server.messages:
        parsed = received.parsed()
        assert MESSAGE_ID.match(parsed["Message-ID"]), parsed["Message-ID"]
        assert parsed["Message-ID"].endswith("@example.com>")  # the sender's domain
        assert parsedate_to_datetime(parsed["Date"]).tzinfo is not None
        assert parsed["MIME-Version"] == "1.0"
        ids.append(parsed["Message-ID"])
    assert len(set(ids)) == 20


async def test_envelope_sender_is_the_bare_address(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message("hi", sender=("Ünïcode Name", "me@example.com"), recipients=["a@example.com"])
    received = await send(app, mail, smtp_server, msg)
    assert received.mail_from == "me@example.com"


async def test_from_lines_are_not_mangled_and_long_lines_are_encoded(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    body = "From the start\nFrom here on\n" + "word " * 600 + "\n.single dot line\n"
    html = "<p>" + "x" * 5000 + "</p>"
    app, mail = make_mail(smtp_server)
    received = await send(
        app, mail, smtp_server, Message("hi", recipients=["a@example.com"], body=body, html=html)
    )
    assert b">From" not in received.data
    assert_lines_short(received.data)
    assert_transfer_encodings_valid(received)
    text, html_part = received.parsed().iter_parts()
    assert text.get_content().replace("\r\n", "\n") == body
    assert html_part.get_content().rstrip("\r\n") == html


@pytest.mark.parametrize(
    "body",
    [
        "plain ascii\n",
        "naïve café — “quotes”\n",
        "中文内容，很多中文。\n" * 50,
        "\x00\x01 control\n",
    ],
)
async def test_bodies_get_a_7bit_safe_transfer_encoding(
    smtp_server: SMTPTestServer, make_mail: MakeMail, body: str
) -> None:
    app, mail = make_mail(smtp_server)
    received = await send(
        app, mail, smtp_server, Message("hi", recipients=["a@example.com"], body=body, html=body)
    )
    assert_transfer_encodings_valid(received)
    assert_lines_short(received.data)
    for part in received.parsed().iter_parts():
        assert part.get_content().replace("\r\n", "\n") == body


async def test_long_non_ascii_subject_is_encoded_and_folded(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    subject = "Ein sehr langer Betreff mit Umlauten: äöüß " * 6 + "和中文"
    app, mail = make_mail(smtp_server)
    received = await send(
        app, mail, smtp_server, Message(subject, recipients=["a@example.com"], body="x")
    )
    headers = received.data.split(b"\r\n\r\n", 1)[0]
    assert headers.isascii()
    assert all(len(line) <= 78 for line in headers.split(b"\r\n"))
    assert received.parsed()["Subject"] == subject


async def test_html_only_and_text_only_messages(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    html_only = await send(
        app, mail, smtp_server, Message("h", recipients=["a@example.com"], html="<b>hi</b>")
    )
    assert html_only.parsed().get_content_type() == "text/html"
    text_only = await send(
        app, mail, smtp_server, Message("t", recipients=["a@example.com"], body="hi")
    )
    assert text_only.parsed().get_content_type() == "text/plain"


async def test_reply_to_and_extra_headers(smtp_server: SMTPTestServer, make_mail: MakeMail) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message(
        "hi",
        recipients=["a@example.com"],
        body="x",
        reply_to="Support <help@example.com>",
        extra_headers={"List-Unsubscribe": "<mailto:unsub@example.com>", "X-Campaign": "7"},
    )
    parsed = (await send(app, mail, smtp_server, msg)).parsed()
    assert parsed["Reply-To"] == "Support <help@example.com>"
    assert parsed["List-Unsubscribe"] == "<mailto:unsub@example.com>"
    assert parsed["X-Campaign"] == "7"


async def test_inline_image_and_text_attachment(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    app, mail = make_mail(smtp_server)
    msg = Message("hi", recipients=["a@example.com"], body="x", html='<img src="cid:logo">')
    msg.attach("logo.png", "image/png", png, "inline", headers={"Content-ID": "<logo>"})
    msg.attach("notes.txt", data="line one\nFrom line two\n")
    received = await send(app, mail, smtp_server, msg)
    attachments = list(received.parsed().iter_attachments())
    image = next(part for part in attachments if part.get_filename() == "logo.png")
    assert image.get_content_disposition() == "inline"
    assert image["Content-ID"] == "<logo>"
    assert image.get_content() == png
    notes = next(part for part in attachments if part.get_filename() == "notes.txt")
    assert notes.get_content_type() == "text/plain"  # guessed from the name
    assert notes.get_content() == "line one\nFrom line two\n"
    assert_transfer_encodings_valid(received)


async def test_non_ascii_domain_goes_idna_encoded_without_smtputf8(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    received = await send(
        app, mail, smtp_server, Message("hi", recipients=["info@bücher.de"], body="x")
    )
    assert received.rcpt_tos == ["info@xn--bcher-kva.de"]
    assert "SMTPUTF8" not in received.mail_options
    assert received.data.isascii()


async def test_non_ascii_local_part_uses_smtputf8(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    received = await send(
        app, mail, smtp_server, Message("hi", recipients=["用户@example.com"], body="x")
    )
    assert received.rcpt_tos == ["用户@example.com"]
    assert "SMTPUTF8" in received.mail_options
    assert received.parsed()["To"] == "用户@example.com"


async def test_non_ascii_local_part_needs_a_server_with_smtputf8(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(smtputf8=False)
    app, mail = make_mail(server)
    async with app.app_context():
        with pytest.raises(SendError, match="SMTPUTF8"):
            await mail.send_message("hi", recipients=["用户@example.com"], body="x")
    assert server.messages == []


async def test_message_id_is_kept_when_sent_again(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message("hi", recipients=["a@example.com"], body="x")
    first = await send(app, mail, smtp_server, msg)
    second = await send(app, mail, smtp_server, msg)
    assert first.parsed()["Message-ID"] == second.parsed()["Message-ID"] == msg.msg_id
