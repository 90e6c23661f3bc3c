"""The development inbox (MAIL_DEV_INBOX), through Quart's test client: the app's mail goes to
its own SMTP server on loopback, and its pages, JSON and warnings show what was sent.

Mail reaches the inbox over real SMTP: sent by the app's Mail, or, for messages quartmail
would never build (no Date, a doubled Message-ID, a 1200-octet line), by aiosmtplib itself.
"""

from __future__ import annotations

import asyncio
import gc
import re
from typing import Any

import aiosmtplib
import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client
from quart_schema import QuartSchema
from test_install import _run as run_without_extras

from quartmail import ConfigError, Mail, Message
from quartmail.devinbox import DevInbox
from quartmail.devinbox.checks import GMAIL_CLIP_BYTES
from quartmail.devinbox.views import content_disposition

SENDER = "Sender <sender@example.com>"
TO = "reader@example.com"
HOSTILE = "<script>alert(1)</script>"


def make_app(**config: Any) -> tuple[Quart, Mail]:
    app = Quart(__name__)
    app.config.update(TESTING=True, MAIL_DEV_INBOX=True, MAIL_DEFAULT_SENDER=SENDER)
    app.config.update(config)
    return app, Mail(app)


async def send(app: Quart, mail: Mail, message: Message) -> None:
    async with app.app_context():
        await mail.send(message)


async def send_raw(app: Quart, data: bytes, *, timeout: float = 10) -> None:  # noqa: ASYNC109
    """Send *data* as it is, over SMTP, to the app's inbox."""
    await aiosmtplib.send(
        data,
        sender="raw@example.com",
        recipients=[TO],
        hostname="127.0.0.1",
        port=DevInbox.of(app).port,
        timeout=timeout,
    )


async def page(client: Client, path: str) -> str:
    response = await client.get(path)
    assert response.status_code == 200, (path, response.status_code)
    assert response.content_type == "text/html; charset=utf-8"
    # The inbox's own pages run no script and load nothing but the framed HTML.
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "frame-src 'self'" in policy, policy
    return await response.get_data(as_text=True)


async def json_of(client: Client, number: int) -> dict[str, Any]:
    response = await client.get(f"/dev/inbox/{number}.json")
    assert response.status_code == 200
    data: dict[str, Any] = await response.get_json()
    return data


def raw_message(*headers: str, body: str = "Hello.\r\n") -> bytes:
    lines = [*headers, "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8"]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


DATE = "Date: Sun, 29 Nov 2026 06:00:00 +0000"
MESSAGE_ID = "Message-ID: <1@example.com>"


# --- the mail goes to the inbox, and the pages show it ---------------------------------------


async def test_the_apps_mail_is_caught_and_shown() -> None:
    app, mail = make_app()
    message = Message(
        "Welcome, 张伟",
        recipients=[TO],
        body="Hello in text.\nunsubscribe: https://example.com/u\n",
        html="<p>Hello in <b>HTML</b></p>",
        extra_headers={
            "List-Unsubscribe": "<https://example.com/u>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
    )
    message.attach("report 2026.pdf", "application/pdf", b"%PDF-1.7 fake")
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert "No mail yet." in await page(client, "/dev/inbox/")
        await send(app, mail, message)

        listing = await page(client, "/dev/inbox/")
        assert '<a href="/dev/inbox/1">Welcome, 张伟</a>' in listing
        assert "<td>reader@example.com</td>" in listing

        shown = await page(client, "/dev/inbox/1")
        assert "<h1>Welcome, 张伟</h1>" in shown
        assert "<th>From</th><td>Sender &lt;sender@example.com&gt;</td>" in shown
        assert "<th>Envelope to</th><td>reader@example.com</td>" in shown
        assert "<pre>Hello in text.\nunsubscribe: https://example.com/u\n</pre>" in shown
        assert '<iframe sandbox="" src="/dev/inbox/1/html" title="HTML part"></iframe>' in shown
        assert '<a href="/dev/inbox/1/attachments/1" download>report 2026.pdf</a>' in shown
        assert "Warnings" not in shown  # a clean mail from quartmail has none

        body = await client.get("/dev/inbox/1/html")
        assert await body.get_data(as_text=True) == "<p>Hello in <b>HTML</b></p>\n"
        assert body.content_type == "text/html; charset=utf-8"
        policy = body.headers["Content-Security-Policy"]
        assert policy.startswith("sandbox;")
        assert "default-src 'none'" in policy and "script-src" not in policy
        assert "img-src data:" in policy

        source = await client.get("/dev/inbox/1/source")
        assert source.content_type == "text/plain; charset=utf-8"
        assert source.headers["X-Content-Type-Options"] == "nosniff"
        text = await source.get_data(as_text=True)
        # The source as it arrived: the subject still RFC 2047-encoded.
        assert re.search(r"\r\nSubject: [!-~ ]*=\?utf-8\?b\?[!-~]+\?=\r\n", text)
        assert "\r\nList-Unsubscribe-Post:" in text

        download = await client.get("/dev/inbox/1/attachments/1")
        assert await download.get_data() == b"%PDF-1.7 fake"
        assert download.content_type == "application/octet-stream"
        assert download.headers["Content-Disposition"] == (
            "attachment; filename=\"report 2026.pdf\"; filename*=UTF-8''report%202026.pdf"
        )

        data = await json_of(client, 1)
        assert data["subject"] == "Welcome, 张伟"
        assert data["from"] == SENDER and data["to"] == TO
        assert data["mail_from"] == "sender@example.com" and data["rcpt_tos"] == [TO]
        assert data["text"] == "Hello in text.\nunsubscribe: https://example.com/u\n"
        assert data["html"] == "<p>Hello in <b>HTML</b></p>\n"
        assert data["attachments"] == [
            {
                "filename": "report 2026.pdf",
                "content_type": "application/pdf",
                "content_id": None,
                "size": 13,
                "url": "/dev/inbox/1/attachments/1",
            }
        ]
        assert data["warnings"] == []
        assert data["message_id"].startswith("<")
        assert [name for name, _ in data["headers"]].count("Date") == 1
        assert data["source_url"] == "/dev/inbox/1/source"

        listing_json = await client.get("/dev/inbox/messages.json")
        assert [m["number"] for m in (await listing_json.get_json())["messages"]] == [1]
        for response in (listing_json, download, source, body):
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert response.headers["Cache-Control"] == "no-store"
        assert "default-src 'none'" in listing_json.headers["Content-Security-Policy"]

        for missing in ("/dev/inbox/2", "/dev/inbox/2.json", "/dev/inbox/1/attachments/2"):
            assert (await client.get(missing)).status_code == 404, missing

    [caught] = DevInbox.of(app).messages
    assert caught.subject == "Welcome, 张伟"


async def test_settings_point_the_mail_at_the_inbox(caplog: pytest.LogCaptureFixture) -> None:
    # Whatever was set, the inbox wins: loopback, its port, no TLS, no credentials.
    caplog.set_level("INFO", logger="quartmail.devinbox")
    app, mail = make_app(
        MAIL_SERVER="smtp.example.com",
        MAIL_PORT=587,
        MAIL_USE_TLS=True,
        MAIL_USERNAME="user",
        MAIL_PASSWORD="secret-password",
    )
    inbox = DevInbox.of(app)
    smtp = app.extensions["mail"].settings.smtp
    assert (smtp.hostname, smtp.port) == ("127.0.0.1", inbox.port)
    assert not smtp.use_tls and not smtp.use_ssl and smtp.username is None
    assert smtp.password is None
    assert app.config["MAIL_SERVER"] == "127.0.0.1" and app.config["MAIL_PORT"] == inbox.port
    # Testing would suppress sending: with the inbox on it does not, unless asked to.
    assert app.extensions["mail"].settings.suppress_send is False
    assert "MAIL_SERVER 'smtp.example.com' is not used" in caplog.text
    assert "secret-password" not in caplog.text + repr(inbox)
    async with app.test_app():
        await send(app, mail, Message("Hi", recipients=[TO], body="Hi"))
    assert [caught.subject for caught in inbox.messages] == ["Hi"]

    # An OAuth2 login (MAIL_OAUTH2_TOKEN) is dropped with the user name, not refused.
    app, mail = make_app(MAIL_USERNAME="user", MAIL_OAUTH2_TOKEN=lambda user: "a-token")
    assert app.extensions["mail"].settings.smtp.oauth2_token is None

    app, mail = make_app(MAIL_SUPPRESS_SEND=True)
    assert app.extensions["mail"].settings.suppress_send is True
    async with app.test_app():
        with mail.record_messages() as recorded:
            await send(app, mail, Message("Hi", recipients=[TO], body="Hi"))
    assert len(recorded) == 1 and DevInbox.of(app).messages == []


async def test_debug_mode_runs_it_and_the_path_is_configurable() -> None:
    app = Quart(__name__)
    app.config.update(DEBUG=True, MAIL_DEV_INBOX="true", MAIL_DEV_INBOX_PATH="/_mail/")
    mail = Mail(app)
    assert app.debug and not app.testing
    async with app.test_app() as test_app:
        client = test_app.test_client()
        await send(app, mail, Message("Debug", sender=SENDER, recipients=[TO], body="x"))
        assert '<a href="/_mail/1">Debug</a>' in await page(client, "/_mail/")
        assert (await client.get("/dev/inbox/")).status_code == 404


@pytest.mark.parametrize("value", [True, "on", "1"])
def test_production_refuses_the_inbox(value: object) -> None:
    app = Quart(__name__)
    app.config.update(MAIL_DEV_INBOX=value)
    assert not app.debug and not app.testing
    with pytest.raises(ConfigError, match=r'MAIL_DEV_INBOX is on.*MAIL_DEV_INBOX = "force"'):
        Mail(app)
    assert "mail_dev_inbox" not in app.extensions and "mail" not in app.extensions


async def test_force_runs_it_in_production() -> None:
    app = Quart(__name__)
    app.config.update(MAIL_DEV_INBOX="force")
    mail = Mail(app)
    async with app.test_app() as test_app:
        await send(app, mail, Message("Forced", sender=SENDER, recipients=[TO], body="x"))
        data = await json_of(test_app.test_client(), 1)
    assert data["subject"] == "Forced"


@pytest.mark.parametrize("value", [False, None, "false", "off", ""])
async def test_off_means_no_inbox(value: object) -> None:
    app = Quart(__name__)
    app.config.update(TESTING=True, MAIL_DEV_INBOX=value)
    Mail(app)
    assert "mail_dev_inbox" not in app.extensions
    with pytest.raises(LookupError, match="no development inbox"):
        DevInbox.of(app)
    async with app.test_app() as test_app:
        assert (await test_app.test_client().get("/dev/inbox/")).status_code == 404


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("MAIL_DEV_INBOX", "maybe"),
        ("MAIL_DEV_INBOX", 2),
        ("MAIL_DEV_INBOX_PATH", "dev/inbox"),
        ("MAIL_DEV_INBOX_PATH", "/"),
        ("MAIL_DEV_INBOX_PATH", "/dev/<inbox>"),
        ("MAIL_DEV_INBOX_SIZE", 0),
        ("MAIL_DEV_INBOX_SIZE", "many"),
    ],
)
def test_bad_inbox_settings_name_the_setting(setting: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"^{setting} must be"):
        make_app(**{setting: value})


async def test_without_the_testing_extra_it_names_the_extra() -> None:
    # A fresh interpreter in which aiosmtpd and the other extras cannot be imported.
    script = """
        from quart import Quart
        from quartmail import Mail

        off = Quart("off")
        off.config.update(TESTING=True, MAIL_DEV_INBOX="false")
        Mail(off)  # off: aiosmtpd is never imported
        print("off: fine")
        on = Quart("on")
        on.config.update(TESTING=True, MAIL_DEV_INBOX=True)
        Mail(on)
        """
    code, stdout, stderr = await run_without_extras(script)
    assert code == 1 and "off: fine" in stdout
    assert "The development inbox (MAIL_DEV_INBOX) needs aiosmtpd" in stderr
    assert "pip install 'quartmail[testing]'" in stderr


def test_a_bad_mail_setting_leaves_no_socket_open() -> None:
    # The inbox binds its socket before Mail checks the other MAIL_* settings; a ConfigError
    # must not leave it behind (a ResourceWarning, an error here, once collected).
    with pytest.raises(ConfigError, match="MAIL_POOL_SIZE"):
        make_app(MAIL_POOL_SIZE="lots")
    # Nor an app that is made and never served.
    make_app()
    gc.collect()


# --- the lifespan --------------------------------------------------------------------------


async def test_the_server_serves_until_after_the_mail_drain() -> None:
    app, mail = make_app()
    inbox = DevInbox.of(app)
    async with app.test_app(), app.app_context():
        # Queued, not sent: the shutdown drains it, and the inbox still catches it.
        future = mail.send_background(Message("Late", recipients=[TO], body="x"))
    assert future.done() and future.result().message_id
    assert [caught.subject for caught in inbox.messages] == ["Late"]
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", inbox.port)
    assert "stopped" in repr(inbox)


async def test_a_second_lifespan_serves_again_on_the_same_port() -> None:
    app, mail = make_app()
    inbox = DevInbox.of(app)
    port = inbox.port
    for subject in ("First", "Second"):
        async with app.test_app():
            await send(app, mail, Message(subject, recipients=[TO], body="x"))
    assert inbox.port == port
    assert [caught.subject for caught in inbox.messages] == ["First", "Second"]


async def test_it_keeps_the_last_messages_and_waits_for_them() -> None:
    app, mail = make_app(MAIL_DEV_INBOX_SIZE=2)
    inbox = DevInbox.of(app)
    async with app.test_app() as test_app:
        async with app.app_context():
            mail.send_background(Message("Background", recipients=[TO], body="x"))
        [caught] = await inbox.wait_for_messages(1)
        assert caught.subject == "Background"
        for number in (2, 3):
            await send(app, mail, Message(f"Mail {number}", recipients=[TO], body="x"))
        assert [c.subject for c in await inbox.wait_for_messages(3)] == ["Mail 2", "Mail 3"]
        assert inbox.get(1) is None and inbox.get(3) is not None
        assert (await test_app.test_client().get("/dev/inbox/1")).status_code == 404
        inbox.clear()
        assert inbox.messages == []
        with pytest.raises(TimeoutError, match="expected 1 message"):
            await inbox.wait_for_messages(1, timeout=0.1)
        await send(app, mail, Message("Mail 4", recipients=[TO], body="x"))
        [caught] = await inbox.wait_for_messages(1)
        assert caught.number == 4


# --- warnings ------------------------------------------------------------------------------


def clean(**kwargs: Any) -> Message:
    return Message("Subject", recipients=[TO], **kwargs)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (clean(html="<p>HTML only</p>"), "no-text-part"),
        (clean(body="x", html="<p>" + "x" * GMAIL_CLIP_BYTES + "</p>"), "html-clipped"),
        (clean(body="To unsubscribe, reply STOP."), "no-list-unsubscribe"),
        (clean(body="News", extra_headers={"Precedence": "bulk"}), "no-list-unsubscribe"),
        (
            clean(body="News", extra_headers={"List-Id": "<news.example.com>"}),
            "no-list-unsubscribe",
        ),
        (
            Message("All", recipients=[f"r{n}@example.com" for n in range(10)], body="Hi"),
            "no-list-unsubscribe",
        ),
        (
            clean(body="News", extra_headers={"List-Unsubscribe": "<https://example.com/u>"}),
            "no-one-click-unsubscribe",
        ),
    ],
    ids=[
        "html-only",
        "html-over-102kb",
        "unsubscribe-in-body",
        "precedence-bulk",
        "list-id",
        "ten-recipients",
        "no-one-click",
    ],
)
async def test_each_warning_of_a_built_message(message: Message, code: str) -> None:
    app, mail = make_app()
    async with app.test_app() as test_app:
        await send(app, mail, message)
        client = test_app.test_client()
        data = await json_of(client, 1)
        assert [warning["code"] for warning in data["warnings"]] == [code]
        shown = await page(client, "/dev/inbox/1")
        assert f'<li data-code="{code}">' in shown
        assert '<span class="count">1</span>' in await page(client, "/dev/inbox/")


@pytest.mark.parametrize(
    ("data", "codes"),
    [
        (raw_message("Subject: x", DATE, MESSAGE_ID), []),
        (raw_message("Subject: x", DATE), ["message-id-missing"]),
        (
            raw_message("Subject: x", DATE, MESSAGE_ID, "Message-ID: <2@example.com>"),
            ["message-id-duplicated"],
        ),
        (raw_message("Subject: x", MESSAGE_ID), ["date-missing"]),
        (raw_message("Subject: x", DATE, DATE, MESSAGE_ID), ["date-duplicated"]),
        (
            raw_message("Subject: x", DATE, MESSAGE_ID, body="a" * 999 + "\r\nok\r\n" + "b" * 1200),
            ["long-lines"],
        ),
        (raw_message("Subject: x", DATE, MESSAGE_ID, body="c" * 998 + "\r\n"), []),
    ],
    ids=[
        "clean",
        "no-message-id",
        "two-message-ids",
        "no-date",
        "two-dates",
        "lines-over-998",
        "line-of-998",
    ],
)
async def test_each_warning_of_a_raw_message(data: bytes, codes: list[str]) -> None:
    app, _ = make_app()
    async with app.test_app() as test_app:
        await send_raw(app, data)
        found = (await json_of(test_app.test_client(), 1))["warnings"]
    assert [warning["code"] for warning in found] == codes
    if codes == ["long-lines"]:
        assert "2 line(s) over 998 octets" in found[0]["message"]


# --- hostile mail ----------------------------------------------------------------------------


async def test_inline_images_are_shown_from_the_message() -> None:
    app, mail = make_app()
    message = Message(
        "Logo",
        recipients=[TO],
        body="Logo",
        html=(
            '<img src="cid:logo@example.com"><img src="CID:logo%40example.com">'
            '<img src="cid:missing@example.com"><img src="cid:page@example.com">'
        ),
    )
    message.attach(
        "logo.png", "image/png", b"PNG bytes", "inline", {"Content-ID": "<logo@example.com>"}
    )
    # Not an image: its cid: URL is left alone (and loads nothing).
    message.attach(
        "page.html", "text/html", b"<script>", "inline", {"Content-ID": "<page@example.com>"}
    )
    async with app.test_app() as test_app:
        await send(app, mail, message)
        client = test_app.test_client()
        body = await (await client.get("/dev/inbox/1/html")).get_data(as_text=True)
        data = await json_of(client, 1)
    image = "data:image/png;base64,UE5HIGJ5dGVz"
    assert body == (
        f'<img src="{image}"><img src="{image}">'
        '<img src="cid:missing@example.com"><img src="cid:page@example.com">\n'
    )
    assert [a["content_id"] for a in data["attachments"]] == [
        "logo@example.com",
        "page@example.com",
    ]
    assert "cid:logo@example.com" in data["html"]  # the JSON keeps the HTML as sent


async def test_hostile_mail_stays_text() -> None:
    app, mail = make_app()
    message = Message(
        f"Hi {HOSTILE}",
        sender=(f"Eve {HOSTILE}", "eve@example.com"),
        recipients=[TO],
        body=f"Text {HOSTILE} </pre><img src=x onerror=alert(1)>",
        html=f"<p>HTML</p>{HOSTILE}<img src='https://tracker.example/p.gif'>",
        extra_headers={"X-Evil": '"><svg onload=alert(1)>'},
    )
    message.attach(f"{HOSTILE}.html", "text/html", HOSTILE.encode())
    async with app.test_app() as test_app:
        await send(app, mail, message)
        client = test_app.test_client()
        for path in ("/dev/inbox/", "/dev/inbox/1"):
            shown = await page(client, path)
            assert "<script>" not in shown and "<svg" not in shown and "<img" not in shown, path
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown
        shown = await page(client, "/dev/inbox/1")
        assert "<pre>Text &lt;script&gt;" in shown
        # The HTML is never inlined in the page: the sandboxed frame loads it, under a policy
        # that refuses scripts and remote images.
        assert "tracker.example" not in shown
        body = await client.get("/dev/inbox/1/html")
        assert "default-src 'none'" in body.headers["Content-Security-Policy"]

        download = await client.get("/dev/inbox/1/attachments/1")
        assert download.content_type == "application/octet-stream"
        # Only the last path segment of "<script>alert(1)</script>.html" is a file name.
        assert download.headers["Content-Disposition"] == (
            "attachment; filename=\"script>.html\"; filename*=UTF-8''script%3E.html"
        )


async def test_a_hostile_attachment_name_downloads_safely() -> None:
    app, _ = make_app()
    data = (
        "Subject: files\r\n"
        f"{DATE}\r\n{MESSAGE_ID}\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        "--b\r\nContent-Type: text/html\r\n"
        'Content-Disposition: attachment; filename="..\\\\..\\\\evil\\";.exe"\r\n\r\n'
        "<script>alert(1)</script>\r\n"
        "--b\r\nContent-Type: application/octet-stream\r\n"
        "Content-Disposition: attachment; filename*=UTF-8''%2E%2E%2Fetc%2Fpasswd%0D%0AX%3A%20y\r\n"
        "\r\nroot\r\n"
        "--b--\r\n"
    ).encode()
    async with app.test_app() as test_app:
        await send_raw(app, data)
        client = test_app.test_client()
        shown = await json_of(client, 1)
        assert [a["filename"] for a in shown["attachments"]] == [
            '..\\..\\evil";.exe',
            "../etc/passwd\r\nX: y",
        ]
        first = await client.get("/dev/inbox/1/attachments/1")
        assert first.headers["Content-Disposition"] == (
            "attachment; filename=\"evil__.exe\"; filename*=UTF-8''evil%22%3B.exe"
        )
        assert await first.get_data() == b"<script>alert(1)</script>"
        assert first.content_type == "application/octet-stream"
        second = await client.get("/dev/inbox/1/attachments/2")
        assert second.headers["Content-Disposition"] == (
            "attachment; filename=\"passwdX: y\"; filename*=UTF-8''passwdX%3A%20y"
        )
        assert "X" not in second.headers  # no header injected by the CRLF in the name


@pytest.mark.parametrize(
    ("name", "header"),
    [
        (
            "résumé 2026.pdf",
            "filename=\"r_sum_ 2026.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%202026.pdf",
        ),
        ("/etc/passwd", "filename=\"passwd\"; filename*=UTF-8''passwd"),
        ("..", "filename=\"attachment\"; filename*=UTF-8''attachment"),
        ("a\tb\x00c", "filename=\"abc\"; filename*=UTF-8''abc"),
        ("100%.txt", "filename=\"100_.txt\"; filename*=UTF-8''100%25.txt"),
    ],
)
def test_content_disposition_is_safe(name: str, header: str) -> None:
    assert content_disposition(name) == f"attachment; {header}"


async def test_mail_that_does_not_parse_well_is_still_shown() -> None:
    app, _ = make_app()
    data = (
        b"Subject: =?unknown-charset?q?caf=E9?=\r\n" + DATE.encode() + b"\r\n"
        b"From: <<<@@@>>>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=x-no-such-charset\r\n\r\n"
        b"caf\xe9\r\n"
    )
    async with app.test_app() as test_app:
        await send_raw(app, data)
        client = test_app.test_client()
        found = await json_of(client, 1)
        assert found["text"] == "caf\ufffd\n"
        assert "<pre>caf\ufffd\n</pre>" in await page(client, "/dev/inbox/1")


async def test_mail_that_does_not_parse_at_all_still_arrives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 1200 nested multiparts: the email package gives up (RecursionError).
    depth = 1200
    nested = b"".join(
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (level, level + 1)
        for level in range(depth)
    )
    data = b"Subject: deep\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n" + nested
    app, _ = make_app()
    async with app.test_app() as test_app:
        # Accepted all the same (a generous bound: parsing it takes seconds).
        await send_raw(app, data, timeout=120)
        client = test_app.test_client()
        found = await json_of(client, 1)
        assert [w["code"] for w in found["warnings"]] == ["unparsable"]
        assert found["headers"] == [] and found["text"] is None
        assert await (await client.get("/dev/inbox/1/source")).get_data() == data
        assert "(no subject)" in await page(client, "/dev/inbox/1")
    assert "Caught mail #1 does not parse; only its source is shown" in caplog.text


async def test_the_inbox_is_not_in_the_openapi_spec() -> None:
    app, _ = make_app()
    QuartSchema(app)
    async with app.test_app() as test_app:
        spec = await (await test_app.test_client().get("/openapi.json")).get_json()
    assert not [path for path in spec["paths"] if path.startswith("/dev/inbox")]


async def test_a_forwarded_message_is_one_attachment() -> None:
    app, _ = make_app()
    data = (
        b"Subject: Fwd: inner\r\nFrom: a@example.com\r\nTo: b@example.com\r\n"
        + DATE.encode()
        + b"\r\n"
        + MESSAGE_ID.encode()
        + b"\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        b"--b\r\nContent-Type: message/rfc822\r\n\r\n"
        b"Subject: inner\r\nFrom: c@example.com\r\n\r\nInner body.\r\n--b--\r\n"
    )
    async with app.test_app() as test_app:
        await send_raw(app, data)
        client = test_app.test_client()
        found = await json_of(client, 1)
        assert found["text"] == "See attached."
        [attachment] = found["attachments"]
        assert (attachment["filename"], attachment["content_type"]) == (
            "message-1.eml",
            "message/rfc822",
        )
        download = await client.get(attachment["url"])
        assert b"Subject: inner" in await download.get_data()
        assert b"Inner body." in await download.get_data()
