"""Throttling replies (421, 454, 4xx 4.7.x to MAIL, RCPT or DATA) slow the whole app down and
cost no message: background delivery, mail.send and connect(), against the real SMTP test
server throttling as SES and Gmail do. (The outbox's tests are in test_outbox_throttle.py.)"""

from __future__ import annotations

import asyncio
import logging

import pytest
from test_background import message, serving, wait_until

from quartmail import Message, RecipientsRefusedError, SendError
from quartmail.errors import AuthenticationError, ConnectError
from quartmail.testing import ReceivedCommand, SMTPServerFactory, SMTPTestServer
from quartmail.throttle import MAX_BACKOFF, grown, throttling, throttling_reply

from conftest import MakeMail

SES = "454 4.7.0 Throttling failure: Maximum sending rate exceeded."
GMAIL_421 = "421 4.7.0 Try again later, closing connection."
GMAIL_451 = "451 4.7.1 Try again later"
# Where each provider answers so.
THROTTLING = [("MAIL", SES), ("DATA", GMAIL_451), ("RCPT", GMAIL_421)]
IDS = ["SES 454 to MAIL", "Gmail 451 4.7.1 to DATA", "Gmail 421 to RCPT"]


def throttle_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "quartmail.throttle" and r.levelno == level
    ]


def mails(server: SMTPTestServer) -> list[ReceivedCommand]:
    return [command for command in server.commands if command.verb == "MAIL"]


# The rule


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (421, "4.7.0 Try again later", True),
        (421, "Service shutting down", True),  # 421 at any point, enhanced code or not
        (454, "4.7.0 Throttling failure: Maximum sending rate exceeded.", True),
        (454, "Throttling failure", True),
        (451, "4.7.1 Try again later", True),
        (450, "  4.7.28 rate limited", True),
        (451, "4.3.0 Try again later", False),  # a transient failure of the server's
        (452, "4.5.3 Too many recipients", False),  # send the rest in another transaction
        (450, "4.2.1 Mailbox busy; 4.7.1 elsewhere", False),  # the code comes first
        (550, "5.7.1 Relaying denied", False),  # permanent: not throttling
        (451, "4.7.1000 not an RFC 3463 code", False),
        (None, "4.7.0", False),
    ],
)
def test_which_replies_throttle(code: int | None, text: str, expected: bool) -> None:
    assert throttling_reply(code, text) is expected


def test_every_recipient_must_be_refused_so_for_a_refusal_to_throttle() -> None:
    throttled = {"a@example.com": (451, "4.7.1 Later"), "b@example.com": (421, "Bye")}
    assert throttling(RecipientsRefusedError("x", code=421, refused=throttled)) == (421, "Bye")
    mixed = {**throttled, "c@example.com": (550, "5.1.1 Unknown")}
    assert throttling(RecipientsRefusedError("x", code=550, refused=mixed)) is None
    ses = SendError("x", code=454, reply="4.7.0 Throttling")
    assert throttling(ses) == (454, "4.7.0 Throttling")
    assert throttling(ConnectError("lost")) is None
    # Replies outside a transaction: a connection limit, a login failure.
    assert throttling(ConnectError("refused: 421 4.7.0 Too many connections", code=421)) is None
    assert throttling(AuthenticationError("x", code=454, reply="4.7.0 Temporary failure")) is None
    assert throttling(ValueError("not ours")) is None


def test_the_back_off_doubles_with_jitter_up_to_its_ceiling() -> None:
    for step, base in [(1, 1.0), (2, 2.0), (4, 8.0)]:
        assert 0.75 * base <= grown(1.0, step, MAX_BACKOFF) <= 1.25 * base
    assert grown(1.0, 1000, MAX_BACKOFF) <= 1.25 * MAX_BACKOFF


# Background delivery


@pytest.mark.parametrize(("verb", "reply"), THROTTLING, ids=IDS)
async def test_throttled_background_messages_are_all_delivered_with_one_retry(
    smtp_server: SMTPTestServer,
    make_mail: MakeMail,
    caplog: pytest.LogCaptureFixture,
    verb: str,
    reply: str,
) -> None:
    # More throttled commands than MAIL_RETRIES allows a message: none may be counted.
    smtp_server.command_replies[verb] = [reply] * 4
    app, mail = make_mail(smtp_server, MAIL_RETRIES=1, MAIL_RETRY_DELAY=0.02, MAIL_POOL_SIZE=2)
    caplog.set_level(logging.INFO, logger="quartmail")
    messages = [message(n) for n in range(3)]
    async with serving(app):
        async with asyncio.timeout(30):
            await asyncio.gather(*(mail.send_background(m) for m in messages))
    assert sorted(str(m.subject) for m in smtp_server.messages) == [m.subject for m in messages]
    assert smtp_server.command_replies[verb] == []  # every throttling reply was met
    # One episode, however many messages and replies: one WARNING, one INFO at its end.
    [warning] = throttle_records(caplog, logging.WARNING)
    assert reply.split(" ", 1)[1] in warning and f"127.0.0.1:{smtp_server.port}" in warning
    assert len(throttle_records(caplog, logging.INFO)) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(("verb", "reply"), THROTTLING, ids=IDS)
async def test_throttling_replies_to_pipelined_commands_are_read_alike(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, verb: str, reply: str
) -> None:
    # MAIL, RCPT and DATA in one write (RFC 2920): the throttling reply among the others.
    server = await smtp_server_factory(pipelining=True)
    server.command_replies[verb] = [reply] * 2
    app, mail = make_mail(server, MAIL_RETRIES=0, MAIL_RETRY_DELAY=0.02)
    async with serving(app):
        async with asyncio.timeout(10):
            await mail.send_background(message())
    assert len(server.messages) == 1
    assert ["MAIL", "RCPT", "DATA"] in server.command_groups()


async def test_throttled_attempts_leave_the_retries_to_other_failures(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.command_replies["MAIL"] = [SES] * 3
    smtp_server.data_replies.append("451 4.3.0 Try again later")  # then a failure that counts
    app, mail = make_mail(smtp_server, MAIL_RETRIES=1, MAIL_RETRY_DELAY=0.02)
    async with serving(app):
        async with asyncio.timeout(10):
            await mail.send_background(message())
    assert len(smtp_server.messages) == 1
    assert (len(mails(smtp_server)), smtp_server.data_attempts) == (5, 2)


async def test_the_back_off_holds_back_every_transaction_of_the_app(
    smtp_server: SMTPTestServer, make_mail: MakeMail, caplog: pytest.LogCaptureFixture
) -> None:
    delay = 0.4
    smtp_server.command_replies["MAIL"] = [SES]
    app, mail = make_mail(smtp_server, MAIL_RETRY_DELAY=delay, MAIL_POOL_SIZE=2)
    async with serving(app):
        first = mail.send_background(message(1))
        await wait_until(lambda: bool(throttle_records(caplog, logging.WARNING)), within=10)
        # Another worker (a session of its own), mail.send and connect() while it backs off.
        second = mail.send_background(message(2))
        await mail.send(message(3))
        async with mail.connect() as connection:
            await connection.send(message(4))
        async with asyncio.timeout(10):
            await asyncio.gather(first, second)
    throttled, *others = mails(smtp_server)
    assert len(others) == 4
    # No MAIL FROM during the back-off (at least 0.75 * MAIL_RETRY_DELAY, with jitter):
    # on the server's clock, every later one came after it.
    assert min(command.time for command in others) >= throttled.time + 0.75 * delay
    assert len({command.session for command in others}) >= 2  # more than one session held back


async def test_a_message_that_stays_throttled_fails_at_the_delivery_timeout(
    smtp_server: SMTPTestServer, make_mail: MakeMail, caplog: pytest.LogCaptureFixture
) -> None:
    smtp_server.command_replies["MAIL"] = [SES] * 1000
    app, mail = make_mail(
        smtp_server, MAIL_RETRIES=1, MAIL_RETRY_DELAY=0.02, MAIL_DELIVERY_TIMEOUT=3
    )
    msg = message()
    async with serving(app):
        async with asyncio.timeout(20):
            with pytest.raises(SendError) as caught:
                await mail.send_background(msg)
    error = caught.value
    assert error.code == 454
    assert "MAIL_DELIVERY_TIMEOUT" in str(error) and "Throttling failure" in str(error)
    assert "MAIL_RETRIES" not in str(error)  # it ran out of time, not of retries
    assert len(mails(smtp_server)) > 2  # more tries than MAIL_RETRIES=1 would allow
    assert smtp_server.messages == []
    assert len(throttle_records(caplog, logging.WARNING)) == 1
    [failure] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert msg.msg_id in failure.getMessage()


async def test_a_new_episode_is_logged_again(
    smtp_server: SMTPTestServer, make_mail: MakeMail, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="quartmail")
    app, mail = make_mail(smtp_server, MAIL_RETRY_DELAY=0.02)
    async with serving(app):
        for n in range(2):
            smtp_server.command_replies["DATA"] = [GMAIL_451] * 2
            async with asyncio.timeout(10):
                await mail.send_background(message(n))
    assert len(throttle_records(caplog, logging.WARNING)) == 2
    assert len(throttle_records(caplog, logging.INFO)) == 2


# mail.send and connect(): no retries of their own


async def test_mail_send_raises_the_throttling_reply(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.command_replies["MAIL"] = [SES]
    app, mail = make_mail(smtp_server)
    async with app.app_context():
        with pytest.raises(SendError) as caught:
            await mail.send(message())
    assert caught.value.code == 454
    assert "Throttling failure" in str(caught.value)
    assert caught.value.transient


async def test_mail_send_fails_at_once_when_the_back_off_outlasts_mail_timeout(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.command_replies["MAIL"] = [SES]
    # A back-off of at least 7.5 s, longer than MAIL_TIMEOUT.
    app, mail = make_mail(smtp_server, MAIL_RETRY_DELAY=10, MAIL_TIMEOUT=5)
    throttle = mail.state.core.throttle
    assert repr(throttle) == f"<Throttle SMTP server 127.0.0.1:{smtp_server.port} open>"
    async with app.app_context():
        with pytest.raises(SendError):
            await mail.send(message(1))
        assert "backing off" in repr(throttle)
        async with asyncio.timeout(30):
            with pytest.raises(SendError) as caught:
                await mail.send(message(2))
    assert caught.value.code == 454
    assert "Throttling failure" in str(caught.value) and "back-off" in str(caught.value)
    assert caught.value.transient
    assert len(mails(smtp_server)) == 1  # the second never reached MAIL FROM


async def test_a_partial_refusal_by_throttling_delivers_and_backs_off(
    smtp_server: SMTPTestServer, make_mail: MakeMail, caplog: pytest.LogCaptureFixture
) -> None:
    delay = 0.4
    smtp_server.refuse_recipients["later@example.com"] = GMAIL_451
    app, mail = make_mail(smtp_server, MAIL_RETRY_DELAY=delay)
    async with app.app_context():
        result = await mail.send(message(1, recipients=["now@example.com", "later@example.com"]))
        assert result.refused == {"later@example.com": (451, "4.7.1 Try again later")}
        await mail.send(Message("two", recipients=["now@example.com"], body="2"))
    assert [m.rcpt_tos for m in smtp_server.messages] == [["now@example.com"]] * 2
    assert len(throttle_records(caplog, logging.WARNING)) == 1
    first, second = mails(smtp_server)
    assert second.time >= first.time + 0.75 * delay
