"""Message(list_unsubscribe=...): the List-Unsubscribe (RFC 2369) and
List-Unsubscribe-Post (RFC 8058) headers as the real SMTP test server
received them, and the errors raised before anything connects."""

from __future__ import annotations

import email.policy
import inspect
from email.parser import BytesParser

import pytest

from quartmail import BadHeaderError, Message, MessageError
from quartmail.listunsubscribe import list_unsubscribe_headers
from quartmail.testing import SMTPTestServer
from quartmail.unsubscribe import list_unsubscribe_headers as reexported

from conftest import MakeMail

HTTPS = "https://example.com/unsubscribe/t0k.en"
MAILTO = "mailto:leave@example.com?subject=unsubscribe"
POST = b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"


def message(**kwargs: object) -> Message:
    return Message("News", recipients=["ann@example.com"], body="Hello\n", **kwargs)  # type: ignore[arg-type]


def header_block(data: bytes) -> bytes:
    """The top-level headers, unfolded (RFC 5322 section 2.2.3)."""
    return data.partition(b"\r\n\r\n")[0].replace(b"\r\n ", b" ") + b"\r\n"


async def sent(smtp_server: SMTPTestServer, make_mail: MakeMail, msg: Message) -> bytes:
    """Send *msg* over a real session; what the server received."""
    app, mail = make_mail(smtp_server, MAIL_SUPPRESS_SEND=False)
    async with app.app_context():
        await mail.send(msg)
    [received] = await smtp_server.wait_for_messages(1)
    assert msg.as_bytes() == received.data
    return received.data


async def test_one_https_url_is_one_click(smtp_server: SMTPTestServer, make_mail: MakeMail) -> None:
    data = await sent(smtp_server, make_mail, message(list_unsubscribe=HTTPS))
    headers = header_block(data)
    assert f"\r\nList-Unsubscribe: <{HTTPS}>\r\n".encode() in headers
    assert POST in headers
    parsed = BytesParser(policy=email.policy.default).parsebytes(data)
    assert parsed["List-Unsubscribe"] == f"<{HTTPS}>"
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


async def test_an_https_and_a_mailto_url(smtp_server: SMTPTestServer, make_mail: MakeMail) -> None:
    data = await sent(smtp_server, make_mail, message(list_unsubscribe=(HTTPS, MAILTO)))
    headers = header_block(data)
    assert f"\r\nList-Unsubscribe: <{HTTPS}>, <{MAILTO}>\r\n".encode() in headers
    assert headers.count(POST) == 1


async def test_mailto_alone_is_no_one_click(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    data = await sent(smtp_server, make_mail, message(list_unsubscribe=[MAILTO]))
    headers = header_block(data)
    assert f"\r\nList-Unsubscribe: <{MAILTO}>\r\n".encode() in headers
    assert b"List-Unsubscribe-Post" not in headers


async def test_set_after_construction_as_flask_mail_code_does(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    msg = message()
    msg.list_unsubscribe = [MAILTO, HTTPS]
    data = await sent(smtp_server, make_mail, msg)
    assert f"\r\nList-Unsubscribe: <{MAILTO}>, <{HTTPS}>\r\n".encode() in header_block(data)
    assert POST in data


def test_long_urls_fold_between_them_and_are_never_encoded() -> None:
    long_https = "https://example.com/unsubscribe/" + "t" * 300
    data = message(sender="news@example.com", list_unsubscribe=[long_https, MAILTO]).as_bytes()
    lines = data.partition(b"\r\n\r\n")[0].split(b"\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(b"List-Unsubscribe:"))
    assert lines[start] == f"List-Unsubscribe: <{long_https}>,".encode()
    assert lines[start + 1] == f" <{MAILTO}>".encode()
    assert b"=?" not in data
    assert max(len(line) for line in lines) <= 998


def test_the_constructor_copies_a_list_and_keeps_the_keyword_out_of_flask_mails_order() -> None:
    urls = [HTTPS]
    msg = Message("s", ["a@example.com"], "body", list_unsubscribe=urls)
    urls.append(MAILTO)
    assert msg.list_unsubscribe == [HTTPS]
    assert (msg.subject, msg.recipients, msg.body) == ("s", ["a@example.com"], "body")
    parameter = inspect.signature(Message).parameters["list_unsubscribe"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
    assert Message().list_unsubscribe is None


@pytest.mark.parametrize(
    ("urls", "match"),
    [
        ([], "at least one"),
        ("http://example.com/u/1", "RFC 8058"),
        (["ftp://example.com/u"], "https and mailto"),
        ([HTTPS, "https://example.com/other"], "one https"),
        (["https://example.com/a b"], "plain ASCII"),
        (["https://example.com/ü"], "plain ASCII"),
        (["https://[::1/u"], "no valid host"),
        (["https:///path-only"], "no valid host"),
        (["mailto:nobody"], "no address"),
        (["https://example.com/?x=?y"], "percent-encode"),
        (["https://example.com/" + "a" * 980], "too long"),
        ([b"https://example.com/u"], "URL string"),
        (b"https://example.com/u", "a URL or a list"),
        (42, "a URL or a list"),
    ],
)
async def test_bad_urls_are_refused_before_connecting(
    urls: object, match: str, smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server, MAIL_SUPPRESS_SEND=False)
    msg = message(list_unsubscribe=urls)
    async with app.app_context():
        with pytest.raises(MessageError, match=match):
            await mail.send(msg)
    assert smtp_server.connections == 0


async def test_a_line_break_is_a_bad_header(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server, MAIL_SUPPRESS_SEND=False)
    msg = message(list_unsubscribe=["https://example.com/u\r\nBcc: victim@example.com"])
    assert msg.has_bad_headers()
    async with app.app_context():
        with pytest.raises(BadHeaderError):
            mail.send_background(msg)
    assert smtp_server.connections == 0


@pytest.mark.parametrize("name", ["List-Unsubscribe", "list-unsubscribe-post"])
def test_extra_headers_may_not_set_them_too(name: str) -> None:
    msg = message(
        sender="news@example.com", list_unsubscribe=HTTPS, extra_headers={name: f"<{MAILTO}>"}
    )
    with pytest.raises(MessageError, match="use one of them"):
        msg.as_bytes()
    # Without list_unsubscribe, extra_headers writes them as before.
    msg.list_unsubscribe = None
    assert f"{name}: <{MAILTO}>".encode() in msg.as_bytes()


def test_the_helper_writes_what_message_writes() -> None:
    assert reexported is list_unsubscribe_headers
    msg = message(sender="news@example.com", list_unsubscribe=[HTTPS, MAILTO])
    headers = header_block(msg.as_bytes())
    for name, value in list_unsubscribe_headers([HTTPS, MAILTO]):
        assert f"\r\n{name}: {value}\r\n".encode() in headers
