"""The outbox under throttling, on SQLite and PostgreSQL: a throttled row is retried after
the back-off without counting an attempt, and every row is sent."""

from __future__ import annotations

import asyncio
import logging
from functools import partial

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from test_outbox import make_app, message, rows, wait_for
from test_throttle import IDS, THROTTLING, throttle_records

from quartmail import MailError, SendError, email_failed
from quartmail.outbox import OutboxMessage
from quartmail.testing import SMTPTestServer

# The second message waits for MAIL_RATE_LIMIT's next slot past its MAIL_DELIVERY_TIMEOUT.
ONE_A_MINUTE = {"MAIL_RATE_LIMIT": "1/m", "MAIL_DELIVERY_TIMEOUT": 1.5, "MAIL_POOL_SIZE": 1}


async def settled(engine: AsyncEngine) -> bool:
    """Whether every row has ended, sent or failed."""
    return {row.state for row in await rows(engine)} <= {"sent", "failed"}


@pytest.mark.parametrize(("verb", "reply"), THROTTLING, ids=IDS)
async def test_throttled_outbox_rows_are_all_sent_without_spending_attempts(
    engine: AsyncEngine,
    smtp_server: SMTPTestServer,
    caplog: pytest.LogCaptureFixture,
    verb: str,
    reply: str,
) -> None:
    smtp_server.command_replies[verb] = [reply] * 4
    app, mail = make_app(engine, smtp_server, MAIL_RETRIES=1, MAIL_POOL_SIZE=2)
    async with app.test_app(), app.app_context():
        async with AsyncSession(engine, expire_on_commit=False) as session:
            for n in range(3):
                await mail.outbox.enqueue(session, message(n))
            await session.commit()

        async def all_sent() -> bool:
            return [row.state for row in await rows(engine)] == ["sent"] * 3

        await wait_for(all_sent, within=30)
    assert len(smtp_server.messages) == 3
    assert smtp_server.command_replies[verb] == []  # every throttling reply was met
    code = int(reply[:3])
    # No attempt counted; the throttling reply is kept on the rows it met.
    assert [row.attempts for row in await rows(engine)] == [0, 0, 0]
    assert {row.last_error_code for row in await rows(engine)} <= {None, code}
    assert code in {row.last_error_code for row in await rows(engine)}
    assert len(throttle_records(caplog, logging.WARNING)) == 1


async def test_an_outbox_row_that_stays_throttled_fails_at_the_delivery_timeout(
    engine: AsyncEngine,
    smtp_server: SMTPTestServer,
) -> None:
    smtp_server.command_replies["MAIL"] = ["454 4.7.0 Throttling failure"] * 1000
    app, mail = make_app(engine, smtp_server, MAIL_RETRIES=1, MAIL_DELIVERY_TIMEOUT=3)
    async with app.test_app(), app.app_context():
        async with AsyncSession(engine, expire_on_commit=False) as session:
            await mail.outbox.enqueue(session, message())
            await session.commit()

        async def failed() -> bool:
            return [row.state for row in await rows(engine)] == ["failed"]

        async with asyncio.timeout(30):
            await wait_for(failed, within=30)
    [row] = await rows(engine)
    assert (row.attempts, row.last_error_code) == (0, 454), row.last_error
    assert row.last_error is not None
    assert "MAIL_DELIVERY_TIMEOUT" in row.last_error and "Throttling failure" in row.last_error
    assert len([c for c in smtp_server.commands if c.verb == "MAIL"]) > 2


async def test_a_row_whose_deadline_passes_in_the_pools_queue_keeps_its_attempts_and_error(
    engine: AsyncEngine,
    smtp_server: SMTPTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One connection, held by a message whose DATA the server answers after the second
    # row's MAIL_DELIVERY_TIMEOUT: the second row's deadline passes while it waits in
    # the pool's queue, and it never reaches the server.
    smtp_server.data_delay = 3.0
    app, mail = make_app(engine, smtp_server, MAIL_POOL_SIZE=1, MAIL_DELIVERY_TIMEOUT=2)
    throttled = "454 4.7.0 Throttling failure: Maximum sending rate exceeded."
    failures: list[MailError] = []
    with email_failed.connected_to(lambda _app, message, error, **_: failures.append(error)):
        async with app.test_app(), app.app_context():
            async with AsyncSession(engine, expire_on_commit=False) as session:
                first = await mail.outbox.enqueue(session, message(0))
                second = await mail.outbox.enqueue(session, message(1))
                # As a throttled attempt leaves it (no attempt counted).
                await session.flush()
                await session.execute(
                    update(OutboxMessage)
                    .where(OutboxMessage.message_id == second)
                    .values(last_error_code=454, last_error=f"({throttled})")
                )
                await session.commit()

            await wait_for(partial(settled, engine), within=30)
            await wait_for(lambda: asyncio.sleep(0, bool(failures)), within=10)
    by_id = {row.message_id: row for row in await rows(engine)}
    assert (by_id[first].state, by_id[first].attempts) == ("sent", 0)
    row = by_id[second]
    # Failed at its deadline, with no attempt counted and the last error it had.
    assert (row.state, row.attempts, row.last_error_code) == ("failed", 0, 454), row.last_error
    assert row.last_error is not None
    assert row.last_error.startswith("not delivered within MAIL_DELIVERY_TIMEOUT (2 s)")
    assert row.last_error.count("MAIL_DELIVERY_TIMEOUT") == 1
    assert "Throttling failure" in row.last_error
    assert [m.parsed()["Message-ID"] for m in smtp_server.messages] == [first]
    [failure] = failures
    assert isinstance(failure, SendError)
    assert (failure.code, str(failure)) == (454, row.last_error)
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1 and second in logged[0] and "SMTP code 454" in logged[0]


async def test_a_row_whose_deadline_passes_waiting_for_the_rate_limit_keeps_its_attempts(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    # It never reaches the server.
    app, mail = make_app(engine, smtp_server, **ONE_A_MINUTE)
    async with app.test_app(), app.app_context():
        async with AsyncSession(engine, expire_on_commit=False) as session:
            ids = [await mail.outbox.enqueue(session, message(n)) for n in range(2)]
            await session.flush()
            await session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.message_id == ids[1])
                .values(attempts=1, last_error_code=451, last_error="(451 4.3.0 Try again)")
            )
            await session.commit()

        await wait_for(partial(settled, engine), within=30)
    by_id = {row.message_id: row for row in await rows(engine)}
    assert (by_id[ids[0]].state, by_id[ids[0]].attempts) == ("sent", 0)
    row = by_id[ids[1]]
    assert (row.state, row.attempts, row.last_error_code) == ("failed", 1, 451), row.last_error
    assert row.last_error is not None and "Try again" in row.last_error
    assert len(smtp_server.messages) == 1


async def test_a_background_mail_whose_deadline_passes_waiting_for_the_rate_limit(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    app, mail = make_app(engine, smtp_server, **ONE_A_MINUTE)
    async with app.test_app(), app.app_context():
        first, second = (mail.send_background(message(n)) for n in range(2))
        await asyncio.wait_for(first, 10)
        with pytest.raises(SendError, match=r"^not delivered within MAIL_DELIVERY_TIMEOUT"):
            await asyncio.wait_for(second, 10)
    assert len(smtp_server.messages) == 1
