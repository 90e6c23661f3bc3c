"""Hostile message input: whatever a caller puts in a Message, either the
server gets safe, standards-exact bytes (the same whichever way the message
is flattened), or the caller gets a MessageError/BadHeaderError before any
connection is made.

Checked as a hostile tester would, against the real SMTP test server.
"""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from typing import Any

import pytest
from quart import Quart

from quartmail import Attachment, BadHeaderError, Mail, Message, MessageError
from quartmail.testing import ReceivedMessage, SMTPTestServer

from conftest import MakeMail

# Every character str.splitlines() (and so the email package) breaks a line at.
UNICODE_LINE_BREAKS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
CONTROLS = ["\x00", "\x01", "\x08", "\x1b", "\x7f"]


async def send(app: Quart, mail: Mail, server: SMTPTestServer, msg: Message) -> ReceivedMessage:
    async with app.app_context():
        await mail.send(msg)
    return server.messages[-1]


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


def assert_no_raw_control(data: bytes) -> None:
    """No C0 control (but CRLF line ends and tabs) and no DEL anywhere on the wire."""
    stripped = data.replace(b"\r\n", b"")
    assert not [byte for byte in stripped if (byte < 0x20 and byte != 0x09) or byte == 0x7F]


def assert_lines_short(data: bytes) -> None:
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def top_headers(data: bytes) -> list[tuple[str, str]]:
    """The top-level headers but the MIME ones (which differ with the structure)."""
    return [
        (name, value)
        for name, value in email.message_from_bytes(data, policy=email.policy.compat32).items()
        if name.lower() not in ("content-type", "content-transfer-encoding", "mime-version")
    ]


# --- 7. One safe result, with or without an attachment ---------------------------------


def hostile_message(control: str, *, attachment: bool) -> Message:
    msg = Message(
        f"sub{control}ject",
        sender=(f"Na{control}me", "sender@example.com"),
        recipients=[(f"To{control}", "to@example.com")],
        cc=[(f"Cc{control}", "cc@example.com")],
        reply_to=(f"Re{control}ply", "reply@example.com"),
        body="text",
        html="<p>html</p>",
        extra_headers={"X-Note": f"no{control}te"},
        date=1_700_000_000,
    )
    msg.msg_id = "<fixed.id@example.com>"
    if attachment:
        msg.attach("a.txt", "text/plain", b"data", headers={"Content-Description": f"d{control}"})
    return msg


@pytest.mark.parametrize("control", CONTROLS)
async def test_control_characters_are_encoded_the_same_with_or_without_attachments(
    smtp_server: SMTPTestServer, make_mail: MakeMail, control: str
) -> None:
    app, mail = make_mail(smtp_server)
    fast = await send(app, mail, smtp_server, hostile_message(control, attachment=False))
    slow = await send(app, mail, smtp_server, hostile_message(control, attachment=True))
    for received in (fast, slow):
        assert_no_raw_control(received.data)
        parsed = received.parsed()
        assert parsed["Subject"] == f"sub{control}ject"
        assert parsed["X-Note"] == f"no{control}te"
    assert top_headers(fast.data) == top_headers(slow.data)
    [part] = slow.parsed().iter_attachments()
    assert part["Content-Description"] == f"d{control}"


@pytest.mark.parametrize(
    "attachment",
    [
        Attachment("a\x00.txt", "text/plain", b"x"),
        Attachment("a\x1b[31m.txt", "text/plain", b"x"),
        Attachment("a.txt", "text/pl\x00ain", b"x"),
        Attachment("a.txt", "text", b"x"),
        Attachment("a.txt", "text/plain; charset=x", b"x"),
        Attachment("a.txt", "text/plain", b"x", disposition="attach\x00ment"),
        Attachment("a.txt", "text/plain", b"x", disposition='attachment; filename="evil"'),
        Attachment("a.txt", "text/plain", b"x", headers={"X-\x00": "v"}),
        Attachment("a.txt", "text/plain", b"x", headers={"Content-Type": "text/html"}),
        Attachment("a.txt", "text/plain", "lone \ud800 surrogate"),
        Attachment("\udc80.txt", "text/plain", b"x"),
        Attachment("a.txt", "text/plain", b"x", headers={"X-Note": "\udc80"}),
    ],
    ids=repr,
)
async def test_bad_attachment_fields_are_refused_before_connecting(
    smtp_server: SMTPTestServer, make_mail: MakeMail, attachment: Attachment
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message("s", recipients=["a@example.com"], body="x", attachments=[attachment])
    async with app.app_context():
        with pytest.raises(MessageError):
            await mail.send(msg)
    assert smtp_server.connections == 0


@pytest.mark.parametrize("field", ["filename", "content_type", "disposition", "name", "value"])
@pytest.mark.parametrize("line_break", ["\r", "\n", "\u2028"])
def test_has_bad_headers_sees_a_line_break_in_every_attachment_field(
    field: str, line_break: str
) -> None:
    values = {
        "filename": "a.txt",
        "content_type": "text/plain",
        "disposition": "attachment",
        "name": "X-Note",
        "value": "note",
    }
    values[field] = values[field].replace(".", line_break).replace("/", line_break)
    values[field] = values[field][:1] + line_break + values[field][1:]
    msg = Message("s", sender="a@example.com", recipients=["b@example.com"], body="x")
    msg.attach(
        values["filename"],
        values["content_type"],
        b"data",
        values["disposition"],
        {values["name"]: values["value"]},
    )
    assert msg.has_bad_headers()
    with pytest.raises(BadHeaderError):
        msg.envelope()


# --- 8. Bad input is a MessageError, before any connection ------------------------------


def bad_inputs() -> list[tuple[str, dict[str, Any]]]:
    cases: list[tuple[str, dict[str, Any]]] = []
    for char in UNICODE_LINE_BREAKS:
        name = f"U+{ord(char):04X}"
        cases += [
            (f"subject {name}", {"subject": f"a{char}Bcc: evil@example.org"}),
            (f"extra header {name}", {"extra_headers": {"X-A": f"a{char}b"}}),
            (f"display name {name}", {"recipients": [(f"a{char}b", "a@example.com")]}),
            (f"address string {name}", {"recipients": [f"a@exa{char}mple.com"]}),
        ]
    cases += [
        ("extra header surrogate", {"extra_headers": {"X-A": "\ud800"}}),
        ("extra header name surrogate", {"extra_headers": {"X-\ud800": "a"}}),
        ("extra header name of 1000 octets", {"extra_headers": {"X-" + "n" * 998: "a"}}),
        ("date NaN", {"date": float("nan")}),
        ("date inf", {"date": float("inf")}),
        ("date -inf", {"date": float("-inf")}),
        ("date far future", {"date": 1e20}),
        ("date before 1900", {"date": datetime(1, 1, 1, tzinfo=UTC)}),
        ("date as text", {"date": "yesterday"}),
        ("date naive", {"date": datetime(2020, 1, 1)}),
        ("unknown charset", {"charset": "no-such-charset"}),
        ("charset with CRLF", {"charset": "utf-8\r\nX: y"}),
        ("charset that cannot encode", {"charset": "latin-1", "body": "中文"}),
        ("charset not ASCII-compatible", {"charset": "utf-16"}),
        ("mail_options CRLF", {"mail_options": ["BODY=8BITMIME\r\nRCPT TO:<evil@example.org>"]}),
        ("rcpt_options CRLF", {"rcpt_options": ["NOTIFY=NEVER\r\nRSET"]}),
        ("mail_options space", {"mail_options": ["SIZE=1 X"]}),
        ("local part of 65 octets", {"recipients": ["a" * 65 + "@example.com"]}),
        ("label of 64 octets", {"recipients": ["a@" + "b" * 64 + ".com"]}),
        ("domain of 304 octets", {"recipients": ["a@" + ".".join(["b" * 60] * 5)]}),
        ("address of 256 octets", {"recipients": ["a" * 64 + "@" + ".".join(["b" * 63] * 3)]}),
        ("space in a string domain", {"recipients": ["bob@exa mple.com"]}),
        ("tab in a string domain", {"recipients": ["bob@exa\tmple.com"]}),
        ("stray >", {"recipients": ["bob@example.com>"]}),
        ("attachment not an Attachment", {"attachments": ["report.pdf"]}),
        ("attachment data not bytes", {"attachments": [Attachment("a", "text/plain", 7)]}),  # type: ignore[arg-type]
    ]
    return cases


@pytest.mark.parametrize(("case", "kwargs"), bad_inputs(), ids=[case for case, _ in bad_inputs()])
async def test_bad_input_is_a_message_error_before_any_connection(
    smtp_server: SMTPTestServer, make_mail: MakeMail, case: str, kwargs: dict[str, Any]
) -> None:
    app, mail = make_mail(smtp_server)
    fields: dict[str, Any] = {"subject": "s", "recipients": ["a@example.com"], "body": "x"}
    msg = Message(**(fields | kwargs))
    async with app.app_context():
        with pytest.raises(MessageError):
            await mail.send(msg)
        with pytest.raises(MessageError):
            mail.send_background(msg)
    assert smtp_server.connections == 0


@pytest.mark.parametrize(
    "msg_id",
    [
        "<a@example.com>\u2028Bcc: evil@example.org",
        "<a@example.com>\x85",
        "<a\x00b@example.com>",
        "<ä@example.com>",
        "no-angle-brackets@example.com",
        "<a b@example.com>",
        "<\ud800@example.com>",
    ],
)
def test_a_bad_message_id_override_is_refused(msg_id: str) -> None:
    msg = Message("s", sender="a@example.com", recipients=["b@example.com"])
    with pytest.raises(MessageError):
        msg.msg_id = msg_id


@pytest.mark.parametrize(
    "envelope_from",
    ["a@x>\r\nRCPT TO:<evil@example.org>", "a@x.org>", "not an address", "a@exa\u2028mple.com"],
)
async def test_a_malformed_envelope_from_is_refused_before_connecting(
    smtp_server: SMTPTestServer, make_mail: MakeMail, envelope_from: str
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message("s", recipients=["a@example.com"], body="x")
    async with app.app_context(), mail.connect() as conn:
        with pytest.raises(MessageError):
            await conn.send(msg, envelope_from=envelope_from)
    assert smtp_server.connections == 0


async def test_envelope_from_is_the_bare_address(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message("s", recipients=["a@example.com"], body="x")
    async with app.app_context(), mail.connect() as conn:
        await conn.send(msg, envelope_from=("Bounces", "bounces@example.com"))
    [received] = smtp_server.messages
    assert received.mail_from == "bounces@example.com"
    assert received.parsed()["From"] == "Sender <sender@example.com>"


async def test_a_non_utf8_charset_that_can_encode_the_body_is_used(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message("s", recipients=["a@example.com"], body="Grüße", charset="latin-1")
    received = await send(app, mail, smtp_server, msg)
    part = received.parsed()
    assert part.get_content_charset() == "iso-8859-1"
    assert part.get_content() == "Grüße\n"


# --- 9. No line over 998 octets; RFC 5321 length limits -------------------------------


@pytest.mark.parametrize("attachment", [False, True])
@pytest.mark.parametrize(
    "name", ["x" * 2000, "word " * 400, "ü" * 1000, '"quoted", ' * 200, "\x00" * 500]
)
async def test_long_display_names_are_folded(
    smtp_server: SMTPTestServer, make_mail: MakeMail, name: str, attachment: bool
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message(
        "s",
        sender=(name, "sender@example.com"),
        recipients=[(name, f"to{n}@example.com") for n in range(3)],
        cc=[(name, "cc@example.com")],
        body="x",
    )
    if attachment:
        msg.attach("a.txt", "text/plain", b"x")
    received = await send(app, mail, smtp_server, msg)
    assert_lines_short(received.data)
    assert max(len(line) for line in header_block(received.data).split(b"\r\n")) <= 78
    parsed = received.parsed()
    assert [a.addr_spec for a in parsed["To"].addresses] == [f"to{n}@example.com" for n in range(3)]
    assert parsed["From"].addresses[0].addr_spec == "sender@example.com"


async def test_a_long_attachment_name_is_folded(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    name = "n" * 1500 + ".txt"
    msg = Message("s", recipients=["a@example.com"], body="x")
    msg.attach(name, "text/plain", b"x", headers={"X-Long": "v" * 1500})
    received = await send(app, mail, smtp_server, msg)
    assert_lines_short(received.data)
    [part] = received.parsed().iter_attachments()
    assert part.get_filename() == name


async def test_the_longest_addresses_rfc_5321_allows_are_sent(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    local = "l" * 64
    domain = ".".join(["d" * 63, "d" * 63, "d" * 58])  # 186 octets: 64 + 1 + 186 < 254
    app, mail = make_mail(smtp_server)
    received = await send(
        app, mail, smtp_server, Message("s", recipients=[f"{local}@{domain}"], body="x")
    )
    assert received.rcpt_tos == [f"{local}@{domain}"]
    assert_lines_short(received.data)


# --- 10. One RCPT per mailbox ---------------------------------------------------------


async def test_duplicates_differing_in_domain_case_get_one_rcpt(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message(
        "s",
        recipients=["b@example.com"],
        cc=["B <b@EXAMPLE.COM>"],
        bcc=[("", "b@Example.Com"), "c@example.com"],
        body="x",
    )
    received = await send(app, mail, smtp_server, msg)
    assert received.rcpt_tos == ["b@example.com", "c@example.com"]


async def test_local_parts_stay_case_sensitive(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    # RFC 5321 2.4: only the server of the domain may fold a local part's case.
    app, mail = make_mail(smtp_server)
    msg = Message("s", recipients=["bob@example.com", "Bob@example.com"], body="x")
    received = await send(app, mail, smtp_server, msg)
    assert received.rcpt_tos == ["bob@example.com", "Bob@example.com"]


# --- 11. message/rfc822 goes with an identity encoding --------------------------------

FORWARDED = (
    "From: Alice <alice@example.org>\r\n"
    "To: bob@example.org\r\n"
    "Subject: Original\r\n"
    "Message-ID: <orig@example.org>\r\n"
    "\r\n"
    "The original body.\r\n"
)


@pytest.mark.parametrize("data", [FORWARDED, FORWARDED.encode("ascii")], ids=["str", "bytes"])
async def test_message_rfc822_attachments_are_not_base64(
    smtp_server: SMTPTestServer, make_mail: MakeMail, data: str | bytes
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message("Fwd: Original", recipients=["a@example.com"], body="see attached")
    msg.attach("original.eml", "message/rfc822", data)
    received = await send(app, mail, smtp_server, msg)
    [part] = received.parsed().iter_attachments()
    assert part.get_content_type() == "message/rfc822"
    assert part["Content-Transfer-Encoding"] in ("7bit", "8bit", "binary")
    inner = part.get_content()
    assert inner["Subject"] == "Original"
    assert inner["Message-ID"] == "<orig@example.org>"
    assert inner.get_content() == "The original body.\n"
    assert FORWARDED.encode("ascii") in received.data  # byte for byte, as it was given


async def test_an_8bit_message_rfc822_attachment_is_made_7bit(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    original = (
        "From: alice@example.org\r\nSubject: Grüße\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: 8bit\r\n'
        "\r\nSchöne Grüße\r\n"
    ).encode()
    app, mail = make_mail(smtp_server)
    msg = Message("Fwd", recipients=["a@example.com"], body="x")
    msg.attach("original.eml", "message/rfc822", original)
    received = await send(app, mail, smtp_server, msg)
    assert received.data.isascii()
    [part] = received.parsed().iter_attachments()
    assert part["Content-Transfer-Encoding"] == "7bit"
    assert part.get_content().get_content() == "Schöne Grüße\n"


async def test_a_non_ascii_envelope_from_is_sent_with_smtputf8(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    msg = Message("s", recipients=["a@example.com"], body="x")
    async with app.app_context(), mail.connect() as conn:
        await conn.send(msg, envelope_from="jörg@example.com")
    [received] = smtp_server.messages
    assert received.mail_from == "jörg@example.com"
    assert "SMTPUTF8" in received.mail_options


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"alts": {"x y": "text"}}, "alts: 'x y' is not a MIME subtype"),
        ({"extra_headers": {"Content-Type": "text/html"}}, "extra_headers cannot set"),
        ({"charset": "utf 8"}, "unknown charset 'utf 8'"),
        ({"charset": "rot13"}, "'rot13' is not ASCII-compatible"),
    ],
)
def test_a_body_the_message_cannot_carry_is_refused(fields: dict[str, Any], error: str) -> None:
    msg = Message("s", sender="a@example.com", recipients=["b@example.com"], body="x", **fields)
    with pytest.raises(MessageError, match=error):
        msg.as_bytes()


def test_has_bad_headers_and_repr() -> None:
    msg = Message("hi", sender="a@example.com", recipients=["b@example.com", "c@example.com"])
    assert repr(msg) == "<Message 'hi' from 'a@example.com' to 2 recipient(s)>"
    assert not msg.has_bad_headers()
    msg.subject = "hi\r\nBcc: victim@example.com"
    assert msg.has_bad_headers()
