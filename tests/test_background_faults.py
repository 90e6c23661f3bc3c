"""Every background message ends: MAIL_DELIVERY_TIMEOUT whatever the server does, partial
refusals logged and signalled, and nothing new started past the shutdown drain deadline."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from test_background import message, serving, wait_until

from quartmail import (
    MailError,
    Message,
    RecipientsRefusedError,
    SendError,
    SendResult,
    email_dispatched,
    email_failed,
)
from quartmail.testing import SMTPServerFactory, SMTPTestServer

from conftest import MakeMail


def errors_about(caplog: pytest.LogCaptureFixture, message_id: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and message_id in r.getMessage()
    ]


async def outcome(future: asyncio.Future[SendResult]) -> SendResult | BaseException:
    try:
        return await future
    except MailError as error:
        return error


async def test_a_server_answering_421_to_every_greeting_fails_the_message_in_time(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail, caplog: pytest.LogCaptureFixture
) -> None:
    server = await smtp_server_factory(greeting="421 4.3.2 Service not available")
    app, mail = make_mail(server, MAIL_DELIVERY_TIMEOUT=0.5, MAIL_RETRY_DELAY=0.01)
    failures: list[tuple[Message, MailError]] = []
    msg = message()
    with email_failed.connected_to(
        lambda _app, message, error, **_: failures.append((message, error))
    ):
        async with app.test_app(), app.app_context():
            future = mail.send_background(msg)
            async with asyncio.timeout(10):  # the bug: pending until shutdown
                with pytest.raises(SendError) as caught:
                    await future
    assert failures == [(msg, caught.value)]
    assert caught.value.code == 421
    assert "MAIL_DELIVERY_TIMEOUT" in str(caught.value)
    assert server.refused_connections >= 1
    assert len(errors_about(caplog, msg.msg_id)) == 1


async def test_retries_stop_at_the_delivery_timeout(
    smtp_server: SMTPTestServer, make_mail: MakeMail, caplog: pytest.LogCaptureFixture
) -> None:
    smtp_server.data_replies.extend(["451 4.3.0 Try again later"] * 1000)
    app, mail = make_mail(
        smtp_server, MAIL_RETRIES=100, MAIL_RETRY_DELAY=0.05, MAIL_DELIVERY_TIMEOUT=0.5
    )
    msg = message()
    async with app.test_app(), app.app_context():
        async with asyncio.timeout(10):
            with pytest.raises(SendError) as caught:
                await mail.send_background(msg)
    assert caught.value.code == 451
    assert "MAIL_DELIVERY_TIMEOUT" in str(caught.value)
    assert 2 <= smtp_server.data_attempts < 100
    assert len(errors_about(caplog, msg.msg_id)) == 1


async def test_messages_queued_behind_a_slow_server_fail_at_the_delivery_timeout(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.data_delay = 0.4
    app, mail = make_mail(smtp_server, MAIL_POOL_SIZE=1, MAIL_DELIVERY_TIMEOUT=0.3)
    async with app.test_app(), app.app_context():
        futures = [mail.send_background(message(n)) for n in range(4)]
        async with asyncio.timeout(10):
            outcomes = [await outcome(future) for future in futures]
    delivered = [o for o in outcomes if isinstance(o, SendResult)]
    timed_out = [o for o in outcomes if "MAIL_DELIVERY_TIMEOUT" in str(o)]
    assert len(delivered) <= 1 and len(delivered) + len(timed_out) == 4
    # Nothing was started past the deadline, and what the server took is reported delivered.
    assert smtp_server.data_attempts <= 1
    assert len(smtp_server.messages) == len(delivered)


def test_the_delivery_timeout_is_checked_at_init(make_mail: MakeMail) -> None:
    with pytest.raises(MailError, match="MAIL_DELIVERY_TIMEOUT"):
        make_mail(MAIL_DELIVERY_TIMEOUT=0)
    _, mail = make_mail()
    assert mail.state.settings.delivery_timeout == 3600


async def test_a_partial_refusal_in_the_background_is_logged_and_signalled(
    smtp_server: SMTPTestServer, make_mail: MakeMail, caplog: pytest.LogCaptureFixture
) -> None:
    smtp_server.refuse_recipients["gone@example.com"] = "550 5.1.1 User unknown"
    smtp_server.refuse_recipients["full@example.com"] = "552 5.2.2 Mailbox full"
    app, mail = make_mail(smtp_server)
    dispatched: list[Message] = []
    failures: list[tuple[Message, MailError]] = []
    msg = message(recipients=["ok@example.com", "gone@example.com", "full@example.com"])
    with (
        email_dispatched.connected_to(lambda _app, message, **_: dispatched.append(message)),
        email_failed.connected_to(
            lambda _app, message, error, **_: failures.append((message, error))
        ),
    ):
        async with app.test_app(), app.app_context():
            mail.send_background(msg)  # the future dropped: nothing may be lost with it
    assert smtp_server.messages[0].rcpt_tos == ["ok@example.com"]
    assert dispatched == [msg]
    [(failed, error)] = failures
    assert failed is msg
    assert isinstance(error, RecipientsRefusedError)
    assert error.refused == {
        "gone@example.com": (550, "5.1.1 User unknown"),
        "full@example.com": (552, "5.2.2 Mailbox full"),
    }
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    text = warning.getMessage()
    assert msg.msg_id in text
    assert "gone@example.com: 550" in text and "full@example.com: 552" in text


async def test_nothing_new_starts_past_the_drain_deadline(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.data_delay = 0.6
    app, mail = make_mail(smtp_server, MAIL_POOL_SIZE=1, MAIL_SHUTDOWN_TIMEOUT=0.1)
    async with app.test_app(), app.app_context():
        futures = [mail.send_background(message(n)) for n in range(3)]
        await wait_until(lambda: smtp_server.data_attempts >= 1, within=10)
    # The first was on the wire at the deadline and could finish; the others never started.
    assert smtp_server.data_attempts == 1
    outcomes = [await outcome(future) for future in futures]
    for left in outcomes[1:]:
        assert isinstance(left, MailError) and "shut down" in str(left)
    delivered = [o for o in outcomes if isinstance(o, SendResult)]
    assert len(smtp_server.messages) == len(delivered)


@pytest.mark.parametrize("signal", [email_dispatched, email_failed], ids=lambda s: s.name)
async def test_a_receiver_that_never_returns_does_not_block_the_worker(
    smtp_server: SMTPTestServer,
    make_mail: MakeMail,
    caplog: pytest.LogCaptureFixture,
    signal: Any,
) -> None:
    if signal is email_failed:
        smtp_server.data_replies.extend(["554 5.6.0 Rejected content"] * 3)
    entered: list[str | None] = []

    async def hanging_receiver(app: object, message: Message, **_: object) -> None:
        entered.append(message.msg_id)
        await asyncio.Event().wait()  # never returns

    # One worker: were it held by the receiver, the second message would never go.
    app, mail = make_mail(smtp_server, MAIL_POOL_SIZE=1, MAIL_SHUTDOWN_TIMEOUT=0.5)
    messages = [message(n) for n in range(3)]
    with signal.connected_to(hanging_receiver):
        async with serving(app):
            async with asyncio.timeout(30):
                outcomes = [await outcome(mail.send_background(msg)) for msg in messages]
        # Shutdown did not wait forever: it cancelled the receivers, and said so.
    assert entered == [msg.msg_id for msg in messages]
    if signal is email_failed:
        assert all(isinstance(o, SendError) and o.code == 554 for o in outcomes)
    else:
        assert [o.message_id for o in outcomes if isinstance(o, SendResult)] == entered
    assert any(
        "signal receivers still running at shutdown" in r.getMessage() for r in caplog.records
    )


async def test_a_failure_that_lands_during_the_drain_gets_its_retry_now(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    # The 451 comes back after the shutdown began: the message was not
    # waiting for a retry then, but is as much at shutdown as one that was.
    smtp_server.data_replies.append("451 4.3.0 Try again later")
    smtp_server.data_delay = 0.5
    app, mail = make_mail(smtp_server, MAIL_RETRY_DELAY=30)  # far beyond the drain
    async with serving(app):
        future = mail.send_background(message())
        await wait_until(lambda: smtp_server.data_attempts == 1)
    assert isinstance(await outcome(future), SendResult)
    assert len(smtp_server.messages) == 1
