"""Background delivery (Mail.send_background) against a real SMTP server,
with faults injected on the server side."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from quart import Quart

from quartmail import (
    BadHeaderError,
    MailError,
    Message,
    MessageError,
    SendError,
    SendResult,
    email_dispatched,
    email_failed,
)
from quartmail.testing import SMTPServerFactory, SMTPTestServer

from conftest import MakeMail


def message(n: int = 0, **kwargs: Any) -> Message:
    kwargs.setdefault("recipients", ["admin@example.com"])
    return Message(f"message {n}", body=f"body {n}", **kwargs)


@asynccontextmanager
async def serving(app: Quart) -> AsyncIterator[None]:
    """The app's lifespan (startup and the shutdown drain) with an app context."""
    async with app.test_app(), app.app_context():
        yield


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll a server counter (they have no event to wait on)."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_300_messages_over_a_pool_of_3_starttls_sessions(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", auth=("mailer", "pw"))
    app, mail = make_mail(server, MAIL_POOL_SIZE=3)
    async with serving(app):
        futures = [mail.send_background(message(n)) for n in range(300)]
        results = await asyncio.gather(*futures)

    assert len(server.messages) == 300
    assert {m.parsed()["Subject"] for m in server.messages} == {f"message {n}" for n in range(300)}
    ids = [m.parsed()["Message-ID"] for m in server.messages]
    assert len(set(ids)) == 300
    assert sorted(r.message_id for r in results) == sorted(ids)
    assert 1 <= server.connections <= 3
    assert all(m.tls and m.login == "mailer" for m in server.messages)


async def test_send_background_returns_without_waiting_for_smtp(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.data_delay = 0.2
    app, mail = make_mail(smtp_server, MAIL_POOL_SIZE=8)
    async with serving(app):
        futures = [mail.send_background(message(n)) for n in range(50)]
        # Every call has returned, and the server has not seen a single DATA:
        # nothing waited on SMTP.
        assert smtp_server.data_attempts == 0
        assert not any(future.done() for future in futures)
    # ...and the shutdown drain delivered them all.
    assert len(smtp_server.messages) == 50
    assert all(future.done() and not future.exception() for future in futures)


async def test_transient_replies_are_retried_until_delivered(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.data_replies.extend(["451 4.3.0 Try again later", "421 4.3.2 Shutting down"])
    dispatched: list[Message] = []
    failed: list[Message] = []
    app, mail = make_mail(smtp_server, MAIL_RETRY_DELAY=0.01)
    with (
        email_dispatched.connected_to(lambda app, message, **_: dispatched.append(message)),
        email_failed.connected_to(lambda app, message, **_: failed.append(message)),
    ):
        async with serving(app):
            result = await mail.send_background(message())
    assert smtp_server.data_attempts == 3
    assert len(smtp_server.messages) == 1
    assert result.message_id == smtp_server.messages[0].parsed()["Message-ID"]
    assert len(dispatched) == 1 and failed == []


async def test_permanent_failure_is_not_retried(
    smtp_server: SMTPTestServer, make_mail: MakeMail, caplog: pytest.LogCaptureFixture
) -> None:
    smtp_server.data_replies.append("554 5.6.0 Rejected content")
    failures: list[tuple[Message, MailError]] = []
    app, mail = make_mail(smtp_server, MAIL_RETRY_DELAY=0.01)
    msg = message()
    with email_failed.connected_to(lambda _app, message, error: failures.append((message, error))):
        async with serving(app):
            future = mail.send_background(msg)
            with pytest.raises(SendError) as caught:
                await future
    assert caught.value.code == 554
    assert smtp_server.data_attempts == 1
    assert smtp_server.messages == []
    assert failures == [(msg, caught.value)]
    logged = [r for r in caplog.records if msg.msg_id in r.getMessage()]
    assert len(logged) == 1 and "554" in logged[0].getMessage()


async def test_transient_failures_give_up_after_the_retries(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.data_replies.extend(["451 4.3.0 Try again later"] * 3)
    app, mail = make_mail(smtp_server, MAIL_RETRIES=2, MAIL_RETRY_DELAY=0.01)
    async with serving(app):
        with pytest.raises(SendError) as caught:
            await mail.send_background(message())
    assert caught.value.code == 451
    assert smtp_server.data_attempts == 3  # the first try and 2 retries


async def test_partial_refusal_is_a_delivery_not_a_retry(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.refuse_recipients["gone@example.com"] = "550 5.1.1 User unknown"
    app, mail = make_mail(smtp_server, MAIL_RETRY_DELAY=0.01)
    async with serving(app):
        result = await mail.send_background(
            message(recipients=["ok@example.com", "gone@example.com"])
        )
    assert result.refused == {"gone@example.com": (550, "5.1.1 User unknown")}
    assert smtp_server.data_attempts == 1


async def test_outage_then_recovery_delivers_everything(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server, MAIL_RETRIES=8, MAIL_RETRY_DELAY=0.05)
    async with serving(app):
        await mail.send_background(message(-1))  # the pool is connected
        await smtp_server.stop()  # the server goes down, dropping the session
        futures = [mail.send_background(message(n)) for n in range(20)]
        await asyncio.sleep(0.5)
        await smtp_server.restart()
        await asyncio.gather(*futures)
    subjects = {m.parsed()["Subject"] for m in smtp_server.messages}
    assert subjects >= {f"message {n}" for n in range(20)}
    assert len(smtp_server.messages) == 21


async def test_server_connection_limit_below_the_pool_size(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(max_connections=2)
    # No retries at all: refused connects must not cost a message anything.
    app, mail = make_mail(server, MAIL_POOL_SIZE=4, MAIL_RETRIES=0, MAIL_RETRY_DELAY=0.05)
    async with serving(app):
        await asyncio.gather(*(mail.send_background(message(n)) for n in range(40)))
    assert len(server.messages) == 40
    assert server.refused_connections >= 1


async def test_fire_and_forget_is_delivered_by_shutdown(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.data_delay = 0.02
    app, mail = make_mail(smtp_server, MAIL_POOL_SIZE=2)
    async with serving(app):
        for n in range(30):
            mail.send_background(message(n))
    assert len(smtp_server.messages) == 30


async def test_a_retry_waiting_at_shutdown_is_delivered(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.data_replies.append("451 4.3.0 Try again later")
    app, mail = make_mail(smtp_server, MAIL_RETRY_DELAY=30)  # far beyond the drain
    async with serving(app):
        mail.send_background(message())
        await wait_until(lambda: smtp_server.data_attempts == 1)
    assert len(smtp_server.messages) == 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"subject": "hi\r\nBcc: victim@example.org"}, BadHeaderError),
        ({"recipients": ["a@example.com\nBcc: victim@example.org"]}, BadHeaderError),
        ({"recipients": []}, MessageError),
        ({"sender": None}, MessageError),
    ],
)
async def test_bad_messages_raise_in_the_caller(
    smtp_server: SMTPTestServer, make_mail: MakeMail, kwargs: dict[str, Any], error: type
) -> None:
    app, mail = make_mail(smtp_server, MAIL_DEFAULT_SENDER=None)
    kwargs.setdefault("sender", "me@example.com")
    kwargs.setdefault("recipients", ["a@example.com"])
    async with serving(app):
        with pytest.raises(error):
            mail.send_background(Message(body="x", **kwargs))
        assert mail.state.delivery.pending == 0
    assert smtp_server.connections == 0


async def test_a_send_cancelled_mid_data_does_not_poison_the_pool(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.data_delay = 5.0
    app, mail = make_mail(smtp_server, MAIL_POOL_SIZE=1)
    async with serving(app):
        slow = mail.send_background(message(0))
        await wait_until(lambda: smtp_server.data_attempts == 1)  # the server is in DATA
        slow.cancel()
        smtp_server.data_delay = 0.0
        results = await asyncio.gather(*(mail.send_background(message(n)) for n in range(1, 6)))
    assert slow.cancelled()
    assert [r.message_id for r in results] == [
        m.parsed()["Message-ID"] for m in smtp_server.messages
    ]
    assert smtp_server.connections == 2  # the cancelled session was closed, not reused


async def test_a_session_closed_by_the_server_while_idle_is_replaced(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(idle_timeout=0.1)
    app, mail = make_mail(server, MAIL_POOL_SIZE=1, MAIL_RETRIES=0)
    async with serving(app):
        await mail.send_background(message(1))
        await asyncio.sleep(0.3)  # the server drops the idle session
        await mail.send_background(message(2))  # no retries allowed: no failure either
    assert len(server.messages) == 2
    assert server.connections == 2


async def test_max_emails_applies_per_pooled_connection(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server, MAIL_POOL_SIZE=1, MAIL_MAX_EMAILS=2)
    async with serving(app):
        await asyncio.gather(*(mail.send_background(message(n)) for n in range(5)))
    assert len(smtp_server.messages) == 5
    assert smtp_server.connections == 3


async def test_suppressed_messages_are_recorded_and_resolve_at_once(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server, MAIL_SUPPRESS_SEND=True)
    dispatched: list[Message] = []
    with email_dispatched.connected_to(lambda app, message, **_: dispatched.append(message)):
        async with serving(app):
            with mail.record_messages() as outbox:
                future = mail.send_background(message())
                assert future.done()
                assert isinstance(future.result(), SendResult)
                assert [m.subject for m in outbox] == ["message 0"]
    assert len(dispatched) == 1
    assert smtp_server.connections == 0


async def test_what_is_left_at_shutdown_is_failed_and_logged(
    smtp_server: SMTPTestServer, make_mail: MakeMail, caplog: pytest.LogCaptureFixture
) -> None:
    smtp_server.data_delay = 30.0
    app, mail = make_mail(smtp_server, MAIL_SHUTDOWN_TIMEOUT=0.2, MAIL_POOL_SIZE=1)
    async with serving(app):
        stuck = message(0)
        future = mail.send_background(stuck)
        await wait_until(lambda: smtp_server.data_attempts == 1)
    with pytest.raises(MailError, match="shut down"):
        future.result()
    assert any(stuck.msg_id in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    with pytest.raises(MailError, match="shut down"):
        async with app.app_context():
            mail.send_background(message(1))


async def test_a_dropped_failed_future_makes_no_never_retrieved_noise(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.data_replies.append("554 5.6.0 Rejected content")
    contexts: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: contexts.append(ctx))
    failed: list[Message] = []
    app, mail = make_mail(smtp_server)
    with email_failed.connected_to(lambda app, message, **_: failed.append(message)):
        async with serving(app):
            mail.send_background(message())  # dropped at once
            await wait_until(lambda: len(failed) == 1)
    gc.collect()
    await asyncio.sleep(0)
    assert contexts == []


async def test_background_delivery_logs_nothing_at_error_when_all_is_well(
    smtp_server: SMTPTestServer, make_mail: MakeMail, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="quartmail")
    app, mail = make_mail(smtp_server)
    async with serving(app):
        await asyncio.gather(*(mail.send_background(message(n)) for n in range(10)))
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_retry_scheduled_before_shutdown_is_sent_in_the_drain(
    smtp_server: SMTPTestServer, make_mail: MakeMail, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="quartmail")
    smtp_server.data_replies.append("451 4.3.0 Try again later")
    app, mail = make_mail(smtp_server, MAIL_RETRY_DELAY=30)  # far beyond the drain
    msg = message()
    async with serving(app):
        future = mail.send_background(msg)
        # Logged as the retry is scheduled: it waits, not a worker, when shutdown begins.
        await wait_until(lambda: "Retrying" in caplog.text)
        assert f"Retrying {msg.msg_id} in " in caplog.text
    assert future.done() and future.result().refused == {}
    assert [m.parsed()["Message-ID"] for m in smtp_server.messages] == [msg.msg_id]
    assert smtp_server.data_attempts == 2
