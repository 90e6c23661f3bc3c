"""Tests of the SMTP test server itself (quartmail.testing), with real aiosmtplib as the client."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import subprocess
import sys
import time
from email.message import EmailMessage

import aiosmtplib
import pytest

from quartmail.testing import ReceivedMessage, SMTPServerFactory, SMTPTestServer, TLSCertificates

SENDER = "sender@example.com"
RECIPIENT = "rcpt@example.com"


def make_message(subject: str = "Hello", to: str = RECIPIENT) -> EmailMessage:
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = to
    message["Subject"] = subject
    message.set_content("Body text\n")
    return message


def client(server: SMTPTestServer, **kwargs: object) -> aiosmtplib.SMTP:
    """An aiosmtplib client for *server*: no opportunistic STARTTLS, no getfqdn()."""
    options: dict[str, object] = {"start_tls": False, "timeout": 5}
    options.update(kwargs)
    return aiosmtplib.SMTP(
        hostname=server.host,
        port=server.port,
        local_hostname="client.example.com",
        **options,  # type: ignore[arg-type]
    )


async def test_plain_send_is_recorded_with_envelope_and_raw_bytes(
    smtp_server: SMTPTestServer,
) -> None:
    raw = b"Subject: Dots\r\nFrom: sender@example.com\r\n\r\n.leading dot\r\nlast line\r\n"
    async with client(smtp_server) as smtp:
        errors, _ = await smtp.sendmail(SENDER, [RECIPIENT, "two@example.com"], raw)
        assert errors == {}
        await smtp.send_message(make_message("Second"))

    first, second = await smtp_server.wait_for_messages(2)
    assert first.mail_from == SENDER
    assert first.rcpt_tos == [RECIPIENT, "two@example.com"]
    # Exactly what the client meant, dot-stuffing undone, CRLF kept.
    assert first.data == raw
    assert first.tls is False
    assert first.login is None
    assert second.parsed()["Subject"] == "Second"
    assert second.parsed().get_content() == "Body text\n"
    assert b"\r\n" in second.data
    assert "BODY=8BITMIME" in second.mail_options
    assert smtp_server.connections == 1
    assert smtp_server.data_attempts == 2


async def test_starttls_with_auth(
    smtp_server_factory: SMTPServerFactory, smtp_certificates: TLSCertificates
) -> None:
    server = await smtp_server_factory(tls="starttls", auth=("alice", "s3cret"))
    assert server.certificates == smtp_certificates  # given by the factory
    await aiosmtplib.send(
        make_message(),
        hostname="localhost",
        port=server.port,
        start_tls=True,
        cert_bundle=str(smtp_certificates.ca_file),
        username="alice",
        password="s3cret",
        local_hostname="client.example.com",
        timeout=5,
    )
    [message] = server.messages
    assert message.tls is True
    assert message.login == "alice"
    assert server.auth_attempts == ["alice"]


async def test_starttls_is_required_before_mail(smtp_server_factory: SMTPServerFactory) -> None:
    server = await smtp_server_factory(tls="starttls")
    async with client(server) as smtp:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await smtp.send_message(make_message())
    assert refused.value.code == 530
    assert server.messages == []


async def test_auth_is_required_before_mail(
    smtp_server_factory: SMTPServerFactory, smtp_certificates: TLSCertificates
) -> None:
    server = await smtp_server_factory(tls="starttls", auth=("alice", "s3cret"))
    async with client(
        server, start_tls=True, tls_context=smtp_certificates.client_context()
    ) as smtp:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await smtp.send_message(make_message())
    assert refused.value.code == 530


async def test_implicit_tls_with_auth_is_quiet(
    smtp_server_factory: SMTPServerFactory,
    smtp_certificates: TLSCertificates,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    # filterwarnings=error would also turn aiosmtpd's auth_require_tls UserWarning into a failure.
    server = await smtp_server_factory(tls="implicit", auth=("bob", "pw"))
    async with client(server, use_tls=True, tls_context=smtp_certificates.client_context()) as smtp:
        await smtp.login("bob", "pw")
        await smtp.send_message(make_message())
        assert smtp.get_transport_info("ssl_object") is not None
    [message] = server.messages
    assert message.tls is True
    assert message.login == "bob"
    assert [r.getMessage() for r in caplog.records if r.name.startswith("mail.")] == []


async def test_plain_server_with_auth(smtp_server_factory: SMTPServerFactory) -> None:
    server = await smtp_server_factory(auth=("carol", "pw"))
    async with client(server, username="carol", password="pw") as smtp:
        await smtp.send_message(make_message())
    assert server.messages[0].login == "carol"
    assert server.messages[0].tls is False


async def test_wrong_password_gives_535_quickly(smtp_server_factory: SMTPServerFactory) -> None:
    server = await smtp_server_factory(tls="implicit", auth=("bob", "pw"))
    assert server.certificates is not None
    started = time.monotonic()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
        async with client(
            server,
            use_tls=True,
            tls_context=server.certificates.client_context(),
            username="bob",
            password="wrong",
        ):
            pass
    assert failed.value.code == 535
    assert time.monotonic() - started < 2  # a real reply, not the client's read timeout
    # aiosmtplib tries each mechanism the server offers (PLAIN, then LOGIN) before giving up.
    assert server.auth_attempts and set(server.auth_attempts) == {"bob"}


async def test_refused_recipient_is_partial(smtp_server: SMTPTestServer) -> None:
    smtp_server.refuse_recipients["bad@example.com"] = "550 5.1.1 User unknown"
    async with client(smtp_server) as smtp:
        errors, _ = await smtp.sendmail(
            SENDER, [RECIPIENT, "bad@example.com"], b"Subject: x\r\n\r\n"
        )
        assert errors["bad@example.com"].code == 550
        assert errors["bad@example.com"].message == "5.1.1 User unknown"
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await smtp.sendmail(SENDER, ["bad@example.com"], b"Subject: y\r\n\r\n")
    [message] = smtp_server.messages
    assert message.rcpt_tos == [RECIPIENT]
    assert smtp_server.data_attempts == 1


async def test_data_replies_then_accept(smtp_server: SMTPTestServer) -> None:
    smtp_server.data_replies += ["451 4.3.0 Try again", "554 5.6.0 Rejected"]
    async with client(smtp_server) as smtp:
        for code in (451, 554):
            with pytest.raises(aiosmtplib.SMTPDataError) as rejected:
                await smtp.send_message(make_message())
            assert rejected.value.code == code
        await smtp.send_message(make_message("third time"))
    [message] = smtp_server.messages
    assert message.parsed()["Subject"] == "third time"
    assert smtp_server.data_attempts == 3
    assert smtp_server.data_replies == []


async def test_data_reply_421_closes_the_connection(smtp_server: SMTPTestServer) -> None:
    smtp_server.data_replies.append("421 4.3.2 Shutting down")
    smtp = client(smtp_server)
    await smtp.connect()
    try:
        with pytest.raises(aiosmtplib.SMTPDataError) as rejected:
            await smtp.send_message(make_message())
        assert rejected.value.code == 421
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await smtp.noop()
    finally:
        smtp.close()
    assert smtp_server.messages == []


async def test_recipient_reply_421_closes_the_connection(smtp_server: SMTPTestServer) -> None:
    # A raw socket client: aiosmtplib would close the connection itself after a 421.
    smtp_server.refuse_recipients[RECIPIENT] = "421 4.7.0 Try again later"
    reader, writer = await asyncio.open_connection(smtp_server.host, smtp_server.port)
    try:
        assert (await reader.readline()).startswith(b"220 ")
        writer.write(f"HELO client\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\n".encode())
        assert (await reader.readline()).startswith(b"250 ")
        assert (await reader.readline()).startswith(b"250 ")
        assert await reader.readline() == b"421 4.7.0 Try again later\r\n"
        assert await asyncio.wait_for(reader.read(), timeout=2) == b""  # closed by the server
    finally:
        writer.close()
        await writer.wait_closed()


async def test_command_replies_throttle_the_first_commands_of_a_kind(
    smtp_server: SMTPTestServer,
) -> None:
    smtp_server.command_replies["MAIL"] = ["454 4.7.0 Throttling failure"]
    smtp_server.command_replies["RCPT"] = ["421 4.7.0 Try again later"]
    reader, writer = await asyncio.open_connection(smtp_server.host, smtp_server.port)
    try:
        assert (await reader.readline()).startswith(b"220 ")
        mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
        writer.write(b"HELO client\r\n" + mail + mail + f"RCPT TO:<{RECIPIENT}>\r\n".encode())
        assert (await reader.readline()).startswith(b"250 ")
        assert await reader.readline() == b"454 4.7.0 Throttling failure\r\n"
        assert (await reader.readline()).startswith(b"250 ")  # only the first MAIL
        assert await reader.readline() == b"421 4.7.0 Try again later\r\n"
        assert await asyncio.wait_for(reader.read(), timeout=2) == b""  # closed by the server
    finally:
        writer.close()
        await writer.wait_closed()
    assert smtp_server.command_replies == {"MAIL": [], "RCPT": []}
    # Each command is recorded, with the time the server read it.
    verbs = [(command.verb, command.session) for command in smtp_server.commands]
    assert verbs == [("HELO", 1), ("MAIL", 1), ("MAIL", 1), ("RCPT", 1)]
    times = [command.time for command in smtp_server.commands]
    assert times == sorted(times)
    # After the throttled ones, the server handles the commands again.
    async with client(smtp_server) as smtp:
        await smtp.send_message(make_message())
    assert len(smtp_server.messages) == 1


async def test_data_delay(smtp_server: SMTPTestServer) -> None:
    smtp_server.data_delay = 0.3
    async with client(smtp_server) as smtp:
        started = time.monotonic()
        await smtp.send_message(make_message())
        assert time.monotonic() - started >= 0.25  # timers may fire a clock tick early
        smtp_server.data_delay = 0
        with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
            smtp_server.data_delay = 1
            await smtp.send_message(make_message(), timeout=0.1)
    assert len(smtp_server.messages) == 1


async def test_max_connections_refuses_with_421(smtp_server_factory: SMTPServerFactory) -> None:
    server = await smtp_server_factory(max_connections=1)
    async with client(server) as first:
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
            async with client(server):
                pass
        assert refused.value.code == 421
        await first.send_message(make_message())
    assert server.refused_connections == 1
    assert server.connections == 1
    # The slot is free again once the first session is over.
    async with client(server) as again:
        await again.noop()
    assert server.connections == 2


async def test_max_connections_with_simultaneous_tls_clients(
    smtp_server_factory: SMTPServerFactory, smtp_certificates: TLSCertificates
) -> None:
    server = await smtp_server_factory(tls="implicit", max_connections=2)
    clients = [
        client(server, use_tls=True, tls_context=smtp_certificates.client_context())
        for _ in range(5)
    ]
    results = await asyncio.gather(*(c.connect() for c in clients), return_exceptions=True)
    try:
        refused = [r for r in results if isinstance(r, aiosmtplib.SMTPConnectResponseError)]
        assert len(refused) == 3
        assert {r.code for r in refused} == {421}
        assert (server.connections, server.refused_connections) == (2, 3)
    finally:
        for c in clients:
            c.close()


async def test_silent_server_makes_the_client_time_out(
    smtp_server_factory: SMTPServerFactory,
) -> None:
    server = await smtp_server_factory(silent=True)
    started = time.monotonic()
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await client(server, timeout=0.5).connect()
    assert time.monotonic() - started < 2
    assert server.connections == 0


async def test_stop_drops_clients_and_restart_reuses_the_port(
    smtp_server: SMTPTestServer,
) -> None:
    port = smtp_server.port
    smtp = client(smtp_server)
    await smtp.connect()
    try:
        await smtp_server.stop()
        assert not smtp_server.is_serving
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await smtp.noop()
    finally:
        smtp.close()
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await client(smtp_server).connect()

    await smtp_server.restart()
    assert smtp_server.port == port
    async with client(smtp_server) as smtp:
        await smtp.send_message(make_message())
    assert len(smtp_server.messages) == 1
    assert smtp_server.connections == 2


async def test_a_socket_bound_in_advance_is_served_then_its_port_again() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    async with SMTPTestServer(sock=sock) as server:
        assert server.port == port
        async with client(server) as smtp:
            await smtp.send_message(make_message("Bound before"))
        await server.restart()  # the socket was closed by stop(): the port is bound again
        assert server.port == port
        async with client(server) as smtp:
            await smtp.send_message(make_message("Bound again"))
    assert [m.subject for m in server.messages] == ["Bound before", "Bound again"]
    assert sock.fileno() == -1


async def test_on_message_takes_the_mail_instead_of_the_list() -> None:
    handed: list[str | None] = []

    async def hand_on(message: ReceivedMessage) -> None:
        handed.append(message.subject)

    async with SMTPTestServer(on_message=hand_on) as server, client(server) as smtp:
        await smtp.send_message(make_message("Handed on"))
    assert handed == ["Handed on"]
    assert server.messages == []
    assert server.data_attempts == 1


async def test_data_line_limit() -> None:
    long_line = b"x" * 5000
    raw = b"Subject: Long\r\n\r\n" + long_line + b"\r\n"
    async with SMTPTestServer() as server, client(server) as smtp:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await smtp.sendmail(SENDER, [RECIPIENT], raw)
        assert refused.value.code == 500
    async with SMTPTestServer(data_line_limit=10_000) as server, client(server) as smtp:
        await smtp.sendmail(SENDER, [RECIPIENT], raw)
    [message] = server.messages
    assert long_line in message.data


async def test_stop_during_starttls_session(
    smtp_server_factory: SMTPServerFactory, smtp_certificates: TLSCertificates
) -> None:
    server = await smtp_server_factory(tls="starttls", auth=("u", "p"))
    smtp = client(
        server,
        start_tls=True,
        tls_context=smtp_certificates.client_context(),
        username="u",
        password="p",
    )
    await smtp.connect()
    try:
        await server.stop()
        assert asyncio.all_tasks() == {asyncio.current_task()}  # no session task left behind
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await smtp.noop()
    finally:
        smtp.close()
    await server.restart()
    await smtp.connect()
    try:
        await smtp.send_message(make_message())
    finally:
        await smtp.quit()
    assert server.messages[0].tls is True


async def test_implicit_tls_client_without_the_ca_fails(
    smtp_server_factory: SMTPServerFactory,
) -> None:
    server = await smtp_server_factory(tls="implicit")
    with pytest.raises(aiosmtplib.SMTPConnectError) as failed:
        await client(server, use_tls=True).connect()
    assert isinstance(failed.value.__cause__, ssl.SSLCertVerificationError)
    assert server.connections == 0


async def test_starttls_client_without_the_ca_fails(
    smtp_server_factory: SMTPServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    server = await smtp_server_factory(tls="starttls")
    smtp = client(server, start_tls=True)
    with pytest.raises(ssl.SSLCertVerificationError):
        await smtp.connect()
    smtp.close()
    await server.stop()
    # The failed handshake is the client's doing: no "SMTP session exception" from the server.
    assert [r.getMessage() for r in caplog.records] == []


async def test_wait_for_messages(smtp_server: SMTPTestServer) -> None:
    with pytest.raises(TimeoutError, match=r"expected 1 message.*but 0 arrived"):
        await smtp_server.wait_for_messages(1, timeout=0.1)

    async def send_later() -> None:
        await asyncio.sleep(0.05)
        await aiosmtplib.send(
            make_message(),
            hostname=smtp_server.host,
            port=smtp_server.port,
            start_tls=False,
            local_hostname="client.example.com",
        )

    sender = asyncio.create_task(send_later())
    [message] = await smtp_server.wait_for_messages(1, timeout=2)
    await sender
    assert message.rcpt_tos == [RECIPIENT]


async def test_smtputf8(smtp_server_factory: SMTPServerFactory) -> None:
    server = await smtp_server_factory()
    async with client(server) as smtp:
        await smtp.send_message(make_message(to="josé@example.com"))
    [message] = server.messages
    assert message.rcpt_tos == ["josé@example.com"]
    assert "SMTPUTF8" in message.mail_options

    ascii_only = await smtp_server_factory(smtputf8=False)
    async with client(ascii_only) as smtp:
        with pytest.raises(aiosmtplib.SMTPNotSupported):
            await smtp.send_message(make_message(to="josé@example.com"))


async def test_idle_timeout_drops_the_session(smtp_server_factory: SMTPServerFactory) -> None:
    server = await smtp_server_factory(idle_timeout=0.1)
    smtp = client(server)
    await smtp.connect()
    try:
        await asyncio.sleep(0.3)
        assert not smtp.is_connected
    finally:
        smtp.close()


def test_mail_config(smtp_certificates: TLSCertificates) -> None:
    plain = SMTPTestServer(port=2525)
    assert plain.mail_config() == {
        "MAIL_SERVER": "127.0.0.1",
        "MAIL_PORT": 2525,
        "MAIL_USE_TLS": False,
        "MAIL_USE_SSL": False,
        "MAIL_USERNAME": None,
        "MAIL_PASSWORD": None,
        "MAIL_OAUTH2_TOKEN": None,
        "MAIL_CA_FILE": None,
        "MAIL_SUPPRESS_SEND": False,
        "MAIL_TIMEOUT": 5,
    }
    starttls = SMTPTestServer(
        tls="starttls", certificates=smtp_certificates, auth=("u", "p"), port=587
    ).mail_config()
    assert starttls["MAIL_USE_TLS"] is True
    assert starttls["MAIL_USE_SSL"] is False
    assert (starttls["MAIL_USERNAME"], starttls["MAIL_PASSWORD"]) == ("u", "p")
    assert starttls["MAIL_CA_FILE"] == str(smtp_certificates.ca_file)
    implicit = SMTPTestServer(tls="implicit", certificates=smtp_certificates, port=465)
    assert implicit.mail_config()["MAIL_USE_SSL"] is True
    with pytest.raises(RuntimeError, match="start the server first"):
        SMTPTestServer().mail_config()


def test_invalid_options(smtp_certificates: TLSCertificates) -> None:
    with pytest.raises(ValueError, match="needs certificates"):
        SMTPTestServer(tls="starttls")
    with pytest.raises(ValueError, match="tls must be"):
        SMTPTestServer(tls="ssl", certificates=smtp_certificates)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_connections"):
        SMTPTestServer(max_connections=0)
    with pytest.raises(ValueError, match="idle_timeout must be positive, not 0"):
        SMTPTestServer(idle_timeout=0)
    with pytest.raises(ValueError, match="data_line_limit must be at least 1000, not 80"):
        SMTPTestServer(data_line_limit=80)


async def test_context_manager_and_double_start() -> None:
    async with SMTPTestServer() as server:
        assert server.is_serving
        with pytest.raises(RuntimeError, match="already running"):
            await server.start()
    assert not server.is_serving
    await server.stop()  # stopping twice is fine


def test_certificates(smtp_certificates: TLSCertificates) -> None:
    assert smtp_certificates.ca_file.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert smtp_certificates.server_context().verify_mode == ssl.CERT_NONE
    client_context = smtp_certificates.client_context()
    assert client_context.check_hostname
    assert client_context.verify_mode == ssl.CERT_REQUIRED


def test_plugin_import_is_light_and_async_fixtures_are_optional() -> None:
    """Loading the plugin (as every pytest run does) imports neither trustme nor the server,
    and without pytest-asyncio it defines only the sync fixture instead of failing."""
    code = """
import sys
import quartmail.pytest_plugin as plugin
print(sorted(m for m in ("trustme", "quartmail.testing") if m in sys.modules))
sys.modules["pytest_asyncio"] = None  # import pytest_asyncio now raises ImportError
del sys.modules["quartmail.pytest_plugin"]
import quartmail.pytest_plugin as plugin
print([hasattr(plugin, f) for f in ("smtp_certificates", "smtp_server_factory", "smtp_server")])
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.split("\n")[:2] == ["[]", "[True, False, False]"]
