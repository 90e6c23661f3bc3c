"""PIPELINING (RFC 2920) and CHUNKING (RFC 3030) against the real SMTP test server: which
commands arrive together, the bytes delivered, and every error path of a pipelined group."""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

import aiosmtplib
import pytest
from aiosmtplib.protocol import normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from quartmail import (
    ConfigError,
    ConnectError,
    Message,
    RecipientsRefusedError,
    SendError,
    SendTimeoutError,
)
from quartmail.pipelining import _crlf_only
from quartmail.testing import SMTPServerFactory, SMTPTestServer, TLSMode

from conftest import MakeMail

Mode = Literal["chunking", "pipelining"]
RECIPIENTS = ["a@example.com", "b@example.com", "c@example.com"]
# Lines starting with "." are dot-stuffed after DATA (RFC 5321 4.5.2), never after BDAT.
BODY = "Hello,\n.a line starting with a dot\n..two dots\n.\nend\n"


def message(recipients: list[str] | None = None, **options: object) -> Message:
    return Message("hello", recipients=recipients or RECIPIENTS, body=BODY, **options)  # type: ignore[arg-type]


async def server_for(
    factory: SMTPServerFactory, mode: Mode, tls: TLSMode = "none"
) -> SMTPTestServer:
    return await factory(tls=tls, pipelining=True, chunking=mode == "chunking")


def last_verb(mode: Mode) -> str:
    return "BDAT" if mode == "chunking" else "DATA"


def transactions(server: SMTPTestServer) -> list[list[str]]:
    """The command groups that open a transaction (start with MAIL)."""
    return [group for group in server.command_groups() if group[0] == "MAIL"]


@pytest.mark.parametrize("tls", ["none", "starttls", "implicit"])
@pytest.mark.parametrize("mode", ["chunking", "pipelining"])
async def test_the_envelope_and_the_message_go_in_one_write(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, mode: Mode, tls: TLSMode
) -> None:
    server = await server_for(smtp_server_factory, mode, tls)
    app, mail = make_mail(server)
    async with app.app_context(), mail.connect() as conn:
        for _ in range(2):
            result = await conn.send(message())
            assert result.refused == {}
    assert transactions(server) == [["MAIL", "RCPT", "RCPT", "RCPT", last_verb(mode)]] * 2
    assert [m.rcpt_tos for m in server.messages] == [RECIPIENTS] * 2
    assert all(m.tls == (tls != "none") for m in server.messages)
    assert server.connections == 1
    times = [command.time for command in server.commands]
    assert times == sorted(times)


@pytest.mark.parametrize("mode", ["chunking", "pipelining"])
async def test_the_bytes_received_are_the_bytes_sent(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, mode: Mode
) -> None:
    pipelined = await server_for(smtp_server_factory, mode)
    plain = await smtp_server_factory()
    msg = message()
    for server in (pipelined, plain):
        app, mail = make_mail(server)
        async with app.app_context():
            await mail.send(msg)
    [got], [expected] = pipelined.messages, plain.messages
    assert got.data == expected.data
    assert b"\r\n.a line starting with a dot\r\n..two dots\r\n.\r\nend" in got.data
    assert got.text == expected.text == BODY


@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n"]), max_size=12))
def test_bytes_already_in_crlf_lines_are_sent_as_they_are(pieces: list[bytes]) -> None:
    # The pipelined path skips aiosmtplib's normalizing exactly when it would change nothing.
    data = b"".join(pieces)
    assert _crlf_only(data) == (normalize_message_line_endings(data) == data)


async def test_mail_pipelining_false_waits_for_each_reply(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await server_for(smtp_server_factory, "chunking")
    app, mail = make_mail(server, MAIL_PIPELINING="false")
    async with app.app_context():
        await mail.send(message())
    assert ["MAIL", "RCPT"] not in server.command_groups()
    assert [verb for group in server.command_groups() for verb in group if len(group) > 1] == []
    assert "BDAT" not in [command.verb for command in server.commands]
    assert len(server.messages) == 1


async def test_without_pipelining_advertised_nothing_is_pipelined(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server)
    async with app.app_context():
        await mail.send(message())
    assert all(len(group) == 1 for group in smtp_server.command_groups())
    assert len(smtp_server.messages) == 1


@pytest.mark.parametrize("mode", ["chunking", "pipelining"])
async def test_a_refused_recipient_is_reported_and_the_others_get_it(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, mode: Mode
) -> None:
    server = await server_for(smtp_server_factory, mode)
    server.refuse_recipients["b@example.com"] = "550 5.1.1 User unknown"
    app, mail = make_mail(server)
    async with app.app_context():
        result = await mail.send(message())
    assert result.refused == {"b@example.com": (550, "5.1.1 User unknown")}
    [received] = server.messages
    assert received.rcpt_tos == ["a@example.com", "c@example.com"]
    assert transactions(server) == [["MAIL", "RCPT", "RCPT", "RCPT", last_verb(mode)]]


@pytest.mark.parametrize("data_without_recipients", [False, True])
@pytest.mark.parametrize("mode", ["chunking", "pipelining"])
async def test_every_recipient_refused_then_the_session_goes_on(
    smtp_server_factory: SMTPServerFactory,
    make_mail: MakeMail,
    mode: Mode,
    data_without_recipients: bool,
) -> None:
    # The server answers DATA (or BDAT) with an error, or, as some do, DATA with 354: then
    # the client ends the message with a lone "." (RFC 2920 3.1).
    server = await server_for(smtp_server_factory, mode)
    server.data_without_recipients = data_without_recipients
    server.refuse_recipients.update(dict.fromkeys(RECIPIENTS, "550 5.1.1 User unknown"))
    app, mail = make_mail(server)
    async with app.app_context(), mail.connect() as conn:
        with pytest.raises(RecipientsRefusedError) as caught:
            await conn.send(message())
        assert set(caught.value.refused) == set(RECIPIENTS)
        assert caught.value.code == 550
        result = await conn.send(message(["d@example.com"]))
    assert result.refused == {}
    assert [m.rcpt_tos for m in server.messages] == [["d@example.com"]]
    assert server.connections == 1
    assert "RSET" in [command.verb for command in server.commands]


@pytest.mark.parametrize("mode", ["chunking", "pipelining"])
async def test_a_421_in_the_middle_ends_the_session(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, mode: Mode
) -> None:
    server = await server_for(smtp_server_factory, mode)
    server.refuse_recipients["b@example.com"] = "421 4.3.2 Shutting down"
    app, mail = make_mail(server)
    async with app.app_context(), mail.connect() as conn:
        with pytest.raises(SendError) as caught:
            await conn.send(message())
        assert caught.value.code == 421
        assert caught.value.transient
        server.refuse_recipients.clear()
        # The session closed; the next message opens a new one.
        await conn.send(message(["d@example.com"]))
    assert [m.rcpt_tos for m in server.messages] == [["d@example.com"]]
    assert server.connections == 2


@pytest.mark.parametrize("mode", ["chunking", "pipelining"])
async def test_a_refused_sender_fails_the_message_and_the_session_goes_on(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, mode: Mode
) -> None:
    # aiosmtpd refuses a MAIL parameter it does not know (501); RCPT and DATA/BDAT get 503.
    server = await server_for(smtp_server_factory, mode)
    app, mail = make_mail(server)
    async with app.app_context(), mail.connect() as conn:
        with pytest.raises(SendError) as caught:
            await conn.send(message(mail_options=["X-UNKNOWN=1"]))
        assert caught.value.code == 501  # aiosmtpd: "Syntax: MAIL FROM: ..."
        await conn.send(message())
    assert [m.rcpt_tos for m in server.messages] == [RECIPIENTS]
    assert server.connections == 1


@pytest.mark.parametrize("reply", ["451 4.3.0 Try again later", "554 5.6.0 Rejected"])
@pytest.mark.parametrize("mode", ["chunking", "pipelining"])
async def test_a_refused_message_fails_with_its_code_and_the_session_goes_on(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, mode: Mode, reply: str
) -> None:
    server = await server_for(smtp_server_factory, mode)
    server.data_replies.append(reply)
    app, mail = make_mail(server)
    async with app.app_context(), mail.connect() as conn:
        with pytest.raises(SendError) as caught:
            await conn.send(message())
        assert caught.value.code == int(reply[:3])
        assert caught.value.transient == reply.startswith("4")
        await conn.send(message())
    assert len(server.messages) == 1
    assert server.data_attempts == 2
    assert server.connections == 1


@pytest.mark.parametrize("mode", ["chunking", "pipelining"])
async def test_a_421_to_the_message_ends_the_session(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, mode: Mode
) -> None:
    server = await server_for(smtp_server_factory, mode)
    server.data_replies.append("421 4.3.2 Going down")
    app, mail = make_mail(server)
    async with app.app_context(), mail.connect() as conn:
        with pytest.raises(SendError) as caught:
            await conn.send(message())
        assert caught.value.code == 421
        await conn.send(message())
    assert len(server.messages) == 1
    assert server.connections == 2


@pytest.mark.parametrize("mode", ["chunking", "pipelining"])
async def test_recipients_over_the_limit_go_in_further_pipelined_transactions(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, mode: Mode
) -> None:
    server = await server_for(smtp_server_factory, mode)
    server.max_recipients = 2
    recipients = [f"user{n}@example.com" for n in range(5)]
    app, mail = make_mail(server)
    async with app.app_context():
        result = await mail.send(message(recipients))
    assert result.refused == {}
    assert [m.rcpt_tos for m in server.messages] == [
        recipients[:2],
        recipients[2:4],
        recipients[4:],
    ]
    ids = {str(m.parsed()["Message-ID"]) for m in server.messages}
    assert ids == {result.message_id}
    assert len({m.data for m in server.messages}) == 1
    verb = last_verb(mode)
    assert transactions(server) == [
        ["MAIL", "RCPT", "RCPT", "RCPT", "RCPT", "RCPT", verb],
        ["MAIL", "RCPT", "RCPT", "RCPT", verb],
        ["MAIL", "RCPT", verb],
    ]


async def test_the_test_server_refuses_bdat_unless_it_advertises_chunking(
    smtp_server_factory: SMTPServerFactory,
) -> None:
    server = await smtp_server_factory(pipelining=True)
    async with aiosmtplib.SMTP(hostname=server.host, port=server.port, start_tls=False) as client:
        await client.ehlo()
        assert not client.supports_extension("chunking")
        assert client.supports_extension("pipelining")
        reply = await client.execute_command(b"BDAT", b"4", b"LAST")
    assert reply.code == 500


@pytest.mark.parametrize("reply", ["451 4.3.0 Busy", "421 4.3.2 Going down"])
async def test_a_refused_data_command_fails_the_message(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, reply: str
) -> None:
    server = await server_for(smtp_server_factory, "pipelining")
    server.data_command_reply = reply
    app, mail = make_mail(server)
    async with app.app_context(), mail.connect() as conn:
        with pytest.raises(SendError) as caught:
            await conn.send(message())
        assert caught.value.code == int(reply[:3])
        server.data_command_reply = None
        await conn.send(message())
    assert len(server.messages) == 1
    # A 421 ends the session (RFC 5321 3.8); after a 451 the same session goes on.
    assert server.connections == (2 if reply.startswith("421") else 1)


@pytest.mark.parametrize("mode", ["chunking", "pipelining"])
async def test_a_server_that_does_not_answer_times_out(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, mode: Mode
) -> None:
    server = await server_for(smtp_server_factory, mode)
    server.data_delay = 30.0
    app, mail = make_mail(server, MAIL_TIMEOUT=0.3)
    async with app.app_context(), mail.connect() as conn:
        with pytest.raises(SendTimeoutError):
            await conn.send(message())
        server.data_delay = 0.0
        await conn.send(message())  # on a new session: the old one is out of step
    assert server.connections == 2
    assert [m.rcpt_tos for m in server.messages] == [RECIPIENTS]


@pytest.mark.parametrize("mode", ["chunking", "pipelining"])
async def test_a_server_that_goes_away_mid_transaction_is_a_connect_error(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, mode: Mode
) -> None:
    server = await server_for(smtp_server_factory, mode)
    server.data_delay = 30.0
    app, mail = make_mail(server)
    async with app.app_context():
        sending = asyncio.create_task(mail.send(message()))
        await server.wait_for(lambda: server.data_attempts == 1)
        await server.stop()
        with pytest.raises(ConnectError) as caught:
            await asyncio.wait_for(sending, 10)
    assert caught.value.transient
    assert server.messages == []


async def test_mail_debug_logs_the_pipelined_group_without_the_password(
    smtp_server_factory: SMTPServerFactory,
    make_mail: MakeMail,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await smtp_server_factory(
        tls="starttls", auth=("user", "s3cret-password"), pipelining=True, chunking=True
    )
    app, mail = make_mail(server, MAIL_DEBUG=True)
    with caplog.at_level(logging.DEBUG, logger="quartmail.smtp"):
        async with app.app_context():
            await mail.send(message())
    assert ">>> MAIL, 3 RCPT, BDAT (pipelined)" in caplog.text
    assert "<<< 250 2.0.0 Message accepted for delivery" in caplog.text
    assert "s3cret-password" not in caplog.text
    assert len(server.messages) == 1


async def test_background_delivery_pipelines_too(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await server_for(smtp_server_factory, "chunking")
    app, mail = make_mail(server, MAIL_POOL_SIZE=1)
    async with app.test_app(), app.app_context():
        results = [await mail.send_background(message()) for _ in range(3)]
    assert all(result.refused == {} for result in results)
    assert transactions(server) == [["MAIL", "RCPT", "RCPT", "RCPT", "BDAT"]] * 3
    assert len(server.messages) == 3


def test_mail_pipelining_must_be_a_flag(make_mail: MakeMail) -> None:
    with pytest.raises(ConfigError, match="MAIL_PIPELINING"):
        make_mail(MAIL_PIPELINING="sometimes")


async def smtp_exchange(server: SMTPTestServer, *sends: bytes) -> list[str]:
    """Send each of *sends* on one raw connection (after the greeting) and read one reply to
    each (a multi-line one whole); the first line of every reply."""
    reader, writer = await asyncio.open_connection(server.host, server.port)

    async def reply() -> str:
        first = line = await reader.readline()
        while line[3:4] == b"-":
            line = await reader.readline()
        return first.decode().rstrip()

    try:
        async with asyncio.timeout(10):
            await reply()  # the greeting
            replies = []
            for data in sends:
                writer.write(data)
                replies.append(await reply())
            return replies
    finally:
        writer.close()


async def test_the_test_server_answers_bdat_as_rfc_3030_says(
    smtp_server_factory: SMTPServerFactory,
) -> None:
    server = await smtp_server_factory(pipelining=True, chunking=True)
    # Before EHLO: 503, the chunk read all the same (RFC 3030 2), so the session goes on.
    replies = await smtp_exchange(
        server,
        b"BDAT 2 LAST\r\nab",
        b"EHLO client.example.com\r\n",
        b"BDAT x\r\n",
        b"MAIL FROM:<a@example.com>\r\n",
        b"BDAT 2 LAST\r\nab",
        b"RCPT TO:<b@example.com>\r\n",
        b"BDAT 14\r\nSubject: 1\r\n\r\n",
        b"BDAT 3 LAST\r\nx\r\n",
        b"QUIT\r\n",
    )
    assert [reply[:3] for reply in replies] == [
        "503",
        "250",
        "501",
        "250",
        "554",
        "250",
        "250",
        "250",
        "221",
    ]
    assert replies[6] == "250 2.0.0 14 octets received"
    [received] = server.messages
    assert received.data == b"Subject: 1\r\n\r\nx\r\n"
