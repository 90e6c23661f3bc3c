"""The outbox goes on whatever a row or the server holds: bad rows end failed with the
reason, broken receivers and a server refusing every connection stop nothing, and refusals
keep their codes. On SQLite and PostgreSQL, against the real SMTP test server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from test_outbox import make_app, message

from quartmail import MailError, Message, RecipientsRefusedError, email_dispatched, email_failed
from quartmail.outbox import OutboxMessage
from quartmail.testing import SMTPServerFactory, SMTPTestServer

Row = tuple[int, str, str, int | None, str | None]


async def states(engine: AsyncEngine) -> dict[str, Row]:
    """Message-ID -> (id, state, ..., last_error_code, last_error), without reading the JSON
    columns (some rows here hold JSON that does not load)."""
    columns = (
        OutboxMessage.id,
        OutboxMessage.message_id,
        OutboxMessage.state,
        OutboxMessage.last_error_code,
        OutboxMessage.last_error,
    )
    async with engine.connect() as connection:
        result = await connection.execute(select(*columns).order_by(OutboxMessage.id))
        return {row.message_id: tuple(row) for row in result}  # type: ignore[misc]


async def until(condition: Callable[[], Any], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not await condition():  # noqa: ASYNC110 (a database has no event to wait on)
            await asyncio.sleep(0.02)


async def enqueue(mail: Any, engine: AsyncEngine, *messages: Message) -> list[str]:
    async with AsyncSession(engine, expire_on_commit=False) as session:
        ids = [await mail.outbox.enqueue(session, m) for m in messages]
        await session.commit()
    return list(ids)


def all_settled(engine: AsyncEngine, count: int) -> Callable[[], Any]:
    async def check() -> bool:
        rows = await states(engine)
        return len(rows) == count and all(r[2] in ("sent", "failed") for r in rows.values())

    return check


CORRUPTIONS: dict[str, dict[str, Any]] = {
    "recipients is a string": {"recipients": "admin@example.com"},
    "recipients is empty": {"recipients": []},
    "mail_options is an object": {"mail_options": {"SMTPUTF8": True}},
    "rcpt_options holds numbers": {"rcpt_options": [1, 2]},
    "data is empty": {"data": b""},
    "data is not a message": {"data": b"just some text\r\nand more\r\n"},
    "message_id has CR LF": {"message_id": "<x@example.com>\r\nBcc: evil@example.com"},
    "recipient has CR LF": {"recipients": ["a@example.com\r\nRCPT TO:<evil@example.com>"]},
}


async def test_bad_rows_fail_with_the_reason_and_the_others_are_sent(
    engine: AsyncEngine,
    smtp_server: SMTPTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, mail = make_app(engine, smtp_server)
    await mail.outbox.create_table()
    good = await enqueue(mail, engine, message(0))
    bad = await enqueue(mail, engine, *(message(n + 1) for n in range(len(CORRUPTIONS))))
    async with engine.begin() as connection:
        for message_id, values in zip(bad, CORRUPTIONS.values(), strict=True):
            await connection.execute(
                update(OutboxMessage).where(OutboxMessage.message_id == message_id).values(values)
            )
        if engine.dialect.name == "sqlite":  # PostgreSQL refuses invalid JSON itself
            await connection.execute(
                text("UPDATE mail_outbox SET mail_options = 'not json [' WHERE message_id = :m"),
                {"m": bad[0]},
            )
    failures: list[tuple[Message, MailError]] = []
    with email_failed.connected_to(
        lambda _app, message, error, **_: failures.append((message, error))
    ):
        async with app.test_app(), app.app_context():
            await until(all_settled(engine, 1 + len(bad)))
            # The dispatcher is still at work.
            later = await enqueue(mail, engine, message(100))
            await smtp_server.wait_for_messages(2)
            await until(all_settled(engine, 2 + len(bad)))

    rows = await states(engine)
    assert [rows[m][2] for m in good + later] == ["sent", "sent"]
    assert [m.rcpt_tos for m in smtp_server.messages] == [["admin@example.com"]] * 2
    failed = [row for row in rows.values() if row[2] == "failed"]
    assert len(failed) == len(bad)
    for row in failed:
        assert row[4] is not None and row[4].startswith("cannot be sent as stored")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([e for e in errors if "cannot be sent as stored" in e]) == len(bad)
    assert not any("\r\nBcc" in e for e in errors)  # the Message-ID is logged quoted
    # Signalled too, with the Message-ID where it is one line.
    assert len(failures) == len(bad)
    assert all("cannot be sent as stored" in str(error) for _, error in failures)
    assert {m.msg_id for m, _ in failures} >= set(bad[:-2])
    assert not any("\r" in str(m.msg_id) for m, _ in failures)


async def cancelled_receiver(app: object, message: Message, **_: object) -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.cancel()
    await future  # raises CancelledError, the receiver's own


def raising_receiver(app: object, message: Message, **_: object) -> None:
    raise RuntimeError("broken receiver")


async def hanging_receiver(app: object, message: Message, **_: object) -> None:
    await asyncio.Event().wait()  # never returns


@pytest.mark.parametrize("receiver", [cancelled_receiver, raising_receiver, hanging_receiver])
async def test_a_broken_receiver_does_not_stop_the_dispatcher(
    engine: AsyncEngine,
    smtp_server: SMTPTestServer,
    receiver: Callable[..., Any],
) -> None:
    app, mail = make_app(engine, smtp_server, MAIL_SHUTDOWN_TIMEOUT=0.5)
    with email_dispatched.connected_to(receiver):
        async with app.test_app(), app.app_context():
            await enqueue(mail, engine, message(1))
            await smtp_server.wait_for_messages(1)
            await enqueue(mail, engine, message(2))
            await smtp_server.wait_for_messages(2)
            await until(all_settled(engine, 2))
    assert [row[2] for row in (await states(engine)).values()] == ["sent", "sent"]


async def test_a_server_refusing_every_connection_fails_the_row_in_time(
    engine: AsyncEngine,
    smtp_server_factory: SMTPServerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await smtp_server_factory(greeting="421 4.3.2 Service not available")
    app, mail = make_app(engine, server, MAIL_DELIVERY_TIMEOUT=0.5)
    failures: list[MailError] = []
    with email_failed.connected_to(lambda _app, message, error, **_: failures.append(error)):
        async with app.test_app(), app.app_context():
            [message_id] = await enqueue(mail, engine, message())
            await until(all_settled(engine, 1))
    [(_, _, state, code, error)] = (await states(engine)).values()
    assert (state, code) == ("failed", 421)
    assert error is not None and "MAIL_DELIVERY_TIMEOUT" in error
    assert len(failures) == 1
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [message_id in r.getMessage() for r in logged] == [True]


async def test_a_row_enqueued_before_its_delivery_timeout_fails_without_a_connection(
    engine: AsyncEngine,
    smtp_server: SMTPTestServer,
) -> None:
    app, mail = make_app(engine, smtp_server, MAIL_DELIVERY_TIMEOUT=60)
    await mail.outbox.create_table()
    await enqueue(mail, engine, message())
    async with engine.begin() as connection:
        # Claimed late, after an attempt that met a transient error.
        await connection.execute(
            update(OutboxMessage).values(
                created_at=datetime.now(UTC) - timedelta(hours=1),
                attempts=1,
                last_error_code=451,
                last_error="(451, '4.3.0 Try again later')",
            )
        )
    async with app.test_app(), app.app_context():
        await until(all_settled(engine, 1))
        [(_, _, state, code, error)] = (await states(engine)).values()
        # Its last error is kept, and no attempt is counted for what never reached the server.
        assert (state, code) == ("failed", 451)
        assert error == (
            "not delivered within MAIL_DELIVERY_TIMEOUT (60 s); "
            "last error: (451, '4.3.0 Try again later')"
        )
        async with engine.connect() as connection:
            assert await connection.scalar(select(OutboxMessage.attempts)) == 1
        assert smtp_server.connections == 0
        # Queued again by hand, it has a new MAIL_DELIVERY_TIMEOUT.
        assert await mail.outbox.retry(failed=True) == 1
        await smtp_server.wait_for_messages(1)


async def test_every_recipient_refused_stores_the_code(
    engine: AsyncEngine,
    smtp_server: SMTPTestServer,
) -> None:
    smtp_server.refuse_recipients["admin@example.com"] = "550 5.1.1 User unknown"
    app, mail = make_app(engine, smtp_server)
    async with app.test_app(), app.app_context():
        await enqueue(mail, engine, message())
        await until(all_settled(engine, 1))
    [(_, _, state, code, error)] = (await states(engine)).values()
    assert (state, code) == ("failed", 550)
    assert error is not None and "User unknown" in error


async def test_a_partial_refusal_is_kept_logged_and_signalled(
    engine: AsyncEngine,
    smtp_server: SMTPTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    smtp_server.refuse_recipients["gone@example.com"] = "550 5.1.1 User unknown"
    smtp_server.max_recipients = 2  # and the rest in a second transaction
    app, mail = make_app(engine, smtp_server)
    failures: list[MailError] = []
    recipients = ["a@example.com", "gone@example.com", "b@example.com", "c@example.com"]
    with email_failed.connected_to(lambda _app, message, error, **_: failures.append(error)):
        async with app.test_app(), app.app_context():
            [message_id] = await enqueue(
                mail, engine, Message("partly", recipients=recipients, body="x")
            )
            await until(all_settled(engine, 1))
            await until(lambda: asyncio.sleep(0, bool(failures)))
    [(_, _, state, code, error)] = (await states(engine)).values()
    assert (state, code) == ("sent", 550)
    assert error is not None and "gone@example.com" in error
    delivered = sorted(a for m in smtp_server.messages for a in m.rcpt_tos)
    assert delivered == ["a@example.com", "b@example.com", "c@example.com"]
    [refusal] = failures
    assert isinstance(refusal, RecipientsRefusedError)
    assert refusal.refused == {"gone@example.com": (550, "5.1.1 User unknown")}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(message_id in w and "gone@example.com: 550" in w for w in warnings)


async def test_at_shutdown_a_send_on_the_wire_finishes_and_nothing_new_starts(
    engine: AsyncEngine,
    smtp_server: SMTPTestServer,
) -> None:
    smtp_server.data_delay = 0.6
    app, mail = make_app(engine, smtp_server, MAIL_POOL_SIZE=1, MAIL_SHUTDOWN_TIMEOUT=0.1)
    async with app.test_app(), app.app_context():
        ids = await enqueue(mail, engine, *(message(n) for n in range(3)))
        async with asyncio.timeout(10):
            while smtp_server.data_attempts < 1:  # noqa: ASYNC110 (a counter, no event)
                await asyncio.sleep(0.005)
    rows = await states(engine)
    # The first was on the wire at the deadline: it finished and is recorded sent; the
    # others never started and are handed back for the next dispatcher.
    assert [rows[m][2] for m in ids] == ["sent", "queued", "queued"]
    assert smtp_server.data_attempts == 1
    assert [m.parsed()["Message-ID"] for m in smtp_server.messages] == ids[:1]


async def test_a_database_that_goes_away_is_polled_again_until_it_is_back(
    engine: AsyncEngine,
    smtp_server: SMTPTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, mail = make_app(engine, smtp_server)
    async with app.test_app(), app.app_context():
        async with engine.begin() as connection:  # as good as a database that went away
            await connection.execute(text("ALTER TABLE mail_outbox RENAME TO mail_outbox_away"))

        async def claim_failed() -> bool:
            return "Could not claim outbox messages" in caplog.text

        await until(claim_failed)
        async with engine.begin() as connection:
            await connection.execute(text("ALTER TABLE mail_outbox_away RENAME TO mail_outbox"))
        [message_id] = await enqueue(mail, engine, message(1))
        [received] = await smtp_server.wait_for_messages(1)
        await until(all_settled(engine, 1))
    assert received.parsed()["Message-ID"] == message_id
    assert [row[2] for row in (await states(engine)).values()] == ["sent"]
