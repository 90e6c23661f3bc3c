"""The test server's helpers (what a received message says, find, wait_for, reset, the Bcc
check, configure) and its threaded variant, driven by quartmail itself and by smtplib."""

from __future__ import annotations

import asyncio
import smtplib
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest
from quart import Quart

from quartmail import Mail, Message
from quartmail.pytest_plugin import ThreadedSMTPServerFactory
from quartmail.smtp import SMTPSession, SMTPSettings
from quartmail.testing import SMTPServerFactory, SMTPTestServer, TLSCertificates
from quartmail.testing_threaded import ThreadedSMTPTestServer

SENDER = "sender@example.com"


def app_for(server: SMTPTestServer | ThreadedSMTPTestServer) -> tuple[Quart, Mail]:
    app = Quart(__name__)
    app.config.update(MAIL_DEFAULT_SENDER=SENDER, MAIL_LOCAL_HOSTNAME="client.example.com")
    server.configure(app)
    return app, Mail(app)


def sync_send(server: ThreadedSMTPTestServer, to: str = "rcpt@example.com") -> None:
    """Send one message with the standard library's blocking client."""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = SENDER, to, "From smtplib"
    message.set_content("Sent without an event loop.\n")
    with smtplib.SMTP(server.host, server.port, local_hostname="client.example.com") as smtp:
        smtp.send_message(message)


async def test_what_a_received_message_says(smtp_server: SMTPTestServer) -> None:
    app, mail = app_for(smtp_server)
    message = Message(
        "Café ☕ confirm",
        recipients=["new@example.com"],
        body="Hello,\nconfirm at https://example.com/confirm?t=a1 please.\n",
        html='<p>Hello, <a href="https://example.com/confirm?t=a1&amp;x=2">confirm</a>'
        '<a href="https://example.com/help">help</a></p>',
    )
    message.attach("report 2026.csv", "text/csv", b"a,b\n1,2\n")
    message.attach("logo.png", "image/png", b"\x89PNG\r\n\x00binary")
    async with app.app_context():
        await mail.send(message)

    [received] = await smtp_server.wait_for_messages(1)
    assert received.subject == "Café ☕ confirm"
    assert received.text == "Hello,\nconfirm at https://example.com/confirm?t=a1 please.\n"
    assert received.html is not None and 'href="https://example.com/help"' in received.html
    assert received.links == [
        "https://example.com/confirm?t=a1&x=2",  # entities decoded, as a browser reads them
        "https://example.com/help",
        "https://example.com/confirm?t=a1",
    ]
    assert [a.filename for a in received.attachments] == ["report 2026.csv", "logo.png"]
    assert received.attachment("logo.png").data == b"\x89PNG\r\n\x00binary"
    assert received.attachment("logo.png").content_type == "image/png"
    with pytest.raises(KeyError, match=r"no attachment named 'x.pdf'.*'logo.png'"):
        received.attachment("x.pdf")


async def test_a_text_only_message_has_no_html(smtp_server: SMTPTestServer) -> None:
    app, mail = app_for(smtp_server)
    async with app.app_context():
        await mail.send_message(recipients=["a@example.com"], body="Just text\n")
    [received] = await smtp_server.wait_for_messages(1)
    # No subject, no Subject: header (as Flask-Mail 0.10 writes it).
    assert (received.subject, received.html, received.links) == (None, None, [])
    assert received.text == "Just text\n"
    assert received.attachments == []


async def test_find_wait_for_and_the_bcc_check(smtp_server: SMTPTestServer) -> None:
    app, mail = app_for(smtp_server)
    async with app.app_context():
        await mail.send_message("Welcome", recipients=["Ann@Example.com"], body="hi")
        sent = mail.send_background(
            Message("Report", recipients=["boss@example.com"], bcc=["audit@example.com"], body=".")
        )
        # Background delivery: wait for what the server sees, not for the app.
        [report] = await smtp_server.wait_for(lambda: smtp_server.find(subject="Report"))
        await sent
        await mail.shutdown()

    assert report.rcpt_tos == ["boss@example.com", "audit@example.com"]
    assert smtp_server.find(to="ann@example.com") == smtp_server.find(subject="Welcome")
    assert smtp_server.find(to="audit@example.com", subject="Welcome") == []
    assert [m.subject for m in smtp_server.find(sender=SENDER.upper())] == ["Welcome", "Report"]
    smtp_server.assert_no_bcc()  # audit@ is only in the envelope

    # A client that leaves Bcc in the header (RFC 5322 3.6.3 allows it) is caught.
    async with aiosmtplib.SMTP(
        hostname=smtp_server.host, port=smtp_server.port, start_tls=False
    ) as smtp:
        await smtp.sendmail(
            SENDER,
            ["to@example.com", "hidden@example.com"],
            b"Subject: Leaky\r\nTo: to@example.com\r\nBcc: hidden@example.com\r\n\r\nx\r\n",
        )
    with pytest.raises(AssertionError, match=r"'Leaky' .* has Bcc: hidden@example.com"):
        smtp_server.assert_no_bcc()

    with pytest.raises(TimeoutError, match=r"still false after 0.1 s \(3 message"):
        await smtp_server.wait_for(lambda: smtp_server.find(subject="Never"), timeout=0.1)


async def test_wait_for_wakes_on_each_event(smtp_server: SMTPTestServer) -> None:
    smtp_server.data_replies.append("451 4.3.0 Try again")
    smtp = aiosmtplib.SMTP(hostname=smtp_server.host, port=smtp_server.port, start_tls=False)
    await smtp.connect()
    try:
        assert await smtp_server.wait_for(lambda: smtp_server.connections) == 1
        with pytest.raises(aiosmtplib.SMTPDataError):
            await smtp.sendmail(SENDER, ["a@example.com"], b"Subject: x\r\n\r\n")
        # A refused DATA records no message; its counter is what there is to wait for.
        assert await smtp_server.wait_for(lambda: smtp_server.data_attempts == 1)
    finally:
        await smtp.quit()
    assert smtp_server.messages == []


async def test_reset_gives_back_a_fresh_server(
    smtp_server_factory: SMTPServerFactory, smtp_certificates: TLSCertificates
) -> None:
    options: dict[str, Any] = {"tls": "starttls", "auth": ("u", "p"), "max_connections": 3}
    server = await smtp_server_factory(**options)
    app, mail = app_for(server)
    async with app.app_context():
        await mail.send_message("One", recipients=["a@example.com"], body="1")
    server.refuse_recipients["x@example.com"] = "550 No"
    server.data_replies.append("451 Later")
    server.data_delay = 0.5
    server.ehlo_reply = "garbage"
    server.max_recipients = 1
    server.echo_auth = True
    server.command_replies["MAIL"] = ["454 4.7.0 Throttling failure"]
    assert server.messages and server.connections and server.auth_attempts

    server.reset()

    def public(s: SMTPTestServer) -> dict[str, object]:
        return {k: v for k, v in vars(s).items() if not k.startswith("_") and k != "port"}

    # Every public attribute (counters, lists, faults) as on a server never used.
    fresh = SMTPTestServer(certificates=smtp_certificates, **options)
    assert public(server) == public(fresh)
    assert server.auth_attempts == []
    assert server.is_serving
    async with app.app_context():
        await mail.send_message("Two", recipients=["a@example.com"], body="2")
    assert [m.subject for m in server.messages] == ["Two"]


def test_configure_refuses_an_app_that_has_mail_already() -> None:
    server = SMTPTestServer(port=2525)
    app = Quart(__name__)
    app.config["TESTING"] = True
    server.configure(app)
    assert app.config["MAIL_PORT"] == 2525
    assert app.config["MAIL_SUPPRESS_SEND"] is False  # TESTING would suppress sending
    Mail(app)
    with pytest.raises(RuntimeError, match=r"before Mail\(app\)"):
        server.configure(app)


def test_auth_must_be_a_pair_and_repr_survives_a_failed_constructor() -> None:
    with pytest.raises(ValueError, match=r"auth=\('user', 'pass'\), not a str") as failed:
        SMTPTestServer(auth="user:s3cret")  # type: ignore[arg-type]
    assert "s3cret" not in str(failed.value)
    with pytest.raises(ValueError, match="tuple of two str"):
        SMTPTestServer(auth=("user",))  # type: ignore[arg-type]
    # The half-made object shows in pytest's tracebacks: its repr must not raise.
    half_made = SMTPTestServer.__new__(SMTPTestServer)
    assert repr(half_made) == "<SMTPTestServer (not constructed)>"
    with pytest.raises(ValueError, match="auth must be"):
        ThreadedSMTPTestServer(auth="user:pass")
    assert "ThreadedSMTPTestServer" in repr(ThreadedSMTPTestServer.__new__(ThreadedSMTPTestServer))


def test_threaded_server_in_a_sync_test(
    threaded_smtp_server_factory: ThreadedSMTPServerFactory,
    smtp_certificates: TLSCertificates,
) -> None:
    server = threaded_smtp_server_factory(tls="starttls", auth=("u", "p"), max_connections=1)
    # The same faults as the loop-bound server, set from the test's thread.
    server.refuse_recipients["gone@example.com"] = "550 5.1.1 User unknown"
    server.data_replies.append("452 4.3.1 Insufficient storage")
    with smtplib.SMTP(server.host, server.port, local_hostname="client.example.com") as smtp:
        smtp.starttls(context=smtp_certificates.client_context())
        smtp.login("u", "p")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail(SENDER, ["gone@example.com"], b"Subject: 1\r\n\r\n")
        with pytest.raises(smtplib.SMTPDataError) as rejected:
            smtp.sendmail(SENDER, ["a@example.com"], b"Subject: 2\r\n\r\n")
        assert rejected.value.smtp_code == 452
        smtp.sendmail(SENDER, ["a@example.com", "gone@example.com"], b"Subject: 3\r\n\r\n")
        # A second connection is over the limit: 421 at the greeting.
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP(server.host, server.port, local_hostname="client.example.com")
        assert refused.value.smtp_code == 421
    [message] = server.wait_for_messages(1)
    assert (message.subject, message.rcpt_tos, message.tls, message.login) == (
        "3",
        ["a@example.com"],
        True,
        "u",
    )
    assert (server.data_attempts, server.refused_connections, server.auth_attempts) == (
        2,
        1,
        ["u"],
    )
    assert server.wait_for(lambda: server.find(subject="3")) == [message]


def test_threaded_server_outage_and_reset(threaded_smtp_server: ThreadedSMTPTestServer) -> None:
    sync_send(threaded_smtp_server)
    port = threaded_smtp_server.port
    threaded_smtp_server.stop()
    assert not threaded_smtp_server.is_serving
    with pytest.raises(ConnectionRefusedError):
        sync_send(threaded_smtp_server)
    with pytest.raises(TimeoutError, match="not running"):
        threaded_smtp_server.wait_for_messages(2)
    threaded_smtp_server.start()  # a new thread and loop, the same port and records
    assert threaded_smtp_server.port == port
    sync_send(threaded_smtp_server)
    assert len(threaded_smtp_server.wait_for_messages(2)) == 2
    threaded_smtp_server.reset()
    assert (threaded_smtp_server.messages, threaded_smtp_server.connections) == ([], 0)
    threaded_smtp_server.restart()
    sync_send(threaded_smtp_server)
    [message] = threaded_smtp_server.wait_for_messages(1, timeout=10)
    assert message.text == "Sent without an event loop.\n"


async def test_an_async_test_may_send_to_the_threaded_server(
    threaded_smtp_server: ThreadedSMTPTestServer,
) -> None:
    app, mail = app_for(threaded_smtp_server)
    async with app.app_context():
        await mail.send_message("Async", recipients=["a@example.com"], body="x")
    # Sent before the reply came, so already there.
    assert threaded_smtp_server.find(subject="Async")
    # Blocking this loop while it might still have to send would hang: refused at once.
    with pytest.raises(RuntimeError, match="smtp_server fixture"):
        threaded_smtp_server.wait_for_messages(1)
    [message] = await asyncio.to_thread(threaded_smtp_server.wait_for_messages, 1)
    assert message.subject == "Async"


async def test_close_waits_until_the_tls_connection_is_gone(
    threaded_smtp_server_factory: ThreadedSMTPServerFactory,
    smtp_certificates: TLSCertificates,
) -> None:
    """The leak: over TLS the socket stays open until the server's close_notify comes back,
    so a close() that returned at once left it to a loop that could end first."""
    server = threaded_smtp_server_factory(tls="starttls")
    settings = SMTPSettings(
        hostname=server.host,
        port=server.port,
        use_tls=True,
        tls_context=smtp_certificates.client_context(),
        local_hostname="client.example.com",
        timeout=5,
    )
    session = await SMTPSession.open(settings)
    sock = session._client.get_transport_info("socket")  # the TCP socket under TLS
    assert sock.fileno() != -1
    await session.close()
    assert sock.fileno() == -1


def test_threaded_server_as_a_context_manager() -> None:
    server = ThreadedSMTPTestServer()
    server.reset()  # not running yet: resets in this thread
    server.stop()  # not running: nothing to do
    with server:
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
        with pytest.raises(AttributeError):
            _ = server._hidden  # private names are not the server's
        server.data_delay = 0.0  # set on the server in its thread
        assert server.server.data_delay == 0.0
        assert server.mail_config()["MAIL_PORT"] == server.port
        message = EmailMessage()
        message["From"], message["To"], message["Bcc"] = SENDER, "a@example.com", "b@example.com"
        message.set_content("x")
        with smtplib.SMTP(server.host, server.port, local_hostname="client.example.com") as smtp:
            smtp.sendmail(SENDER, ["a@example.com"], message.as_bytes())
        server.wait_for_messages(1)
        with pytest.raises(AssertionError, match="Bcc"):
            server.assert_no_bcc()
    assert not server.is_serving


def test_threaded_server_that_cannot_start_ends_its_thread() -> None:
    with ThreadedSMTPTestServer() as taken:
        server = ThreadedSMTPTestServer(port=taken.port)  # the port is in use
        with pytest.raises(OSError):
            server.start()
    server.stop()  # the failed start left nothing running
    assert not server.is_serving
