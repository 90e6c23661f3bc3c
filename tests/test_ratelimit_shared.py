"""MAIL_RATE_LIMIT kept in the outbox's database (quartmail.sharedlimit): held by
several dispatcher processes together, on PostgreSQL and on an SQLite file, as the
SMTP test server's MAIL FROM times show; and by every path of a process with the
outbox. The dispatcher processes are test_outbox_processes.py run as a script.

Only upper bounds are asserted: a slow machine only sends slower.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from test_outbox_processes import outbox_rows, run_dispatchers

from quartmail import Mail, Message, SendError
from quartmail.outbox import RateLimitSlot
from quartmail.ratelimit import RateLimit
from quartmail.sharedlimit import DatabaseSlots
from quartmail.testing import SMTPTestServer

from conftest import SENDER, empty_database

ADMIN = "admin@example.com"
# Every wait on a process or on the mail is bounded by this; generous, for slow CI machines.
WITHIN = 120.0


def mail_config(server: SMTPTestServer, **settings: Any) -> dict[str, Any]:
    return {
        **server.mail_config(),
        "MAIL_DEFAULT_SENDER": SENDER,
        "MAIL_OUTBOX_POLL": 0.1,
        **settings,
    }


async def test_three_dispatcher_processes_share_one_limit(
    database: tuple[str, AsyncEngine], smtp_server: SMTPTestServer
) -> None:
    url, engine = database
    mails, processes = 24, 3
    config = mail_config(smtp_server, MAIL_RATE_LIMIT="8/s", MAIL_POOL_SIZE=2)
    app = Quart(__name__)
    app.config.update(config)
    outbox = Mail(app).init_outbox(app, engine)
    await outbox.create_table()
    async with app.app_context(), AsyncSession(engine) as session:
        for n in range(mails):
            await outbox.enqueue(session, Message(f"limited {n}", recipients=[ADMIN], body="x"))
        await session.commit()

    delivered = await run_dispatchers(
        url, config, smtp_server, count=processes, mails=mails, within=WITHIN
    )
    shares = [len(message_ids) for message_ids in delivered]

    assert len(smtp_server.messages) == mails
    assert {row.state for row in await outbox_rows(engine)} == {"sent"}
    assert sum(shares) == mails
    # Each process alone would start 8 a second: together they do.
    assert smtp_server.most_in_window(1.0) <= 8
    async with engine.connect() as connection:
        slots = (await connection.execute(select(RateLimitSlot.slot))).scalars().all()
    assert sorted(slots) == list(range(8))
    print(f"\nshares of {mails}: {shares}")


async def test_every_path_of_a_process_with_the_outbox_takes_the_shared_slots(
    database: tuple[str, AsyncEngine], smtp_server: SMTPTestServer
) -> None:
    _, engine = database
    app = Quart(__name__)
    app.config.update(mail_config(smtp_server, MAIL_RATE_LIMIT="4/s"))
    mail = Mail(app)
    outbox = mail.init_outbox(app, engine)
    async with app.test_app(), app.app_context(), asyncio.timeout(WITHIN):
        for n in range(3):
            await mail.send(Message(f"send {n}", recipients=[ADMIN], body="x"))
        async with mail.connect() as connection:
            for n in range(3):
                await connection.send(Message(f"connect {n}", recipients=[ADMIN], body="x"))
        await asyncio.gather(
            *(
                mail.send_background(Message(f"bg {n}", recipients=[ADMIN], body="x"))
                for n in range(3)
            )
        )
        async with AsyncSession(engine) as session:
            for n in range(3):
                await outbox.enqueue(session, Message(f"outbox {n}", recipients=[ADMIN], body="x"))
            await session.commit()
        await smtp_server.wait_for_messages(12, timeout=WITHIN)
    assert smtp_server.most_in_window(1.0) <= 4
    slots = mail.state.core.limiter
    assert slots is not None and isinstance(slots.slots, DatabaseSlots)
    assert repr(slots.slots) == f"<DatabaseSlots '@{smtp_server.host}:{smtp_server.port}' 4/s>"


async def test_a_database_out_of_reach_makes_the_send_wait_not_break_the_limit(
    smtp_server: SMTPTestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A database file in a directory that does not exist: every take fails.
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/missing/app.db")
    app = Quart(__name__)
    app.config.update(mail_config(smtp_server, MAIL_RATE_LIMIT="4/s", MAIL_DELIVERY_TIMEOUT=0.5))
    mail = Mail(app)
    mail.init_outbox(app, engine)
    try:
        with caplog.at_level(logging.ERROR, logger="quartmail.outbox"):
            async with app.app_context(), asyncio.timeout(WITHIN):
                with pytest.raises(SendError, match="not delivered within MAIL_DELIVERY_TIMEOUT"):
                    await mail.send(Message("never", recipients=[ADMIN], body="x"))
    finally:
        await engine.dispose()
    assert smtp_server.messages == []
    assert not [c for c in smtp_server.commands if c.verb == "MAIL"]
    assert "Could not take a MAIL_RATE_LIMIT slot" in caplog.text


async def test_slots_are_made_once_for_a_large_limit_and_freed_a_period_after_the_end(
    database: tuple[str, AsyncEngine],
) -> None:
    _, engine = database
    slots = DatabaseSlots(engine, RateLimit(1200, 3600.0), "mailer@relay:587", hold=60.0)
    async with asyncio.timeout(WITHIN):
        taken, wait = await slots.take(1)
        assert (taken, wait) == ([(0, 0.0)], 0.0)  # free since forever: at once
        slots.give_back(0)
        await slots.close()  # waits for the write
        async with engine.connect() as connection:
            columns = RateLimitSlot.account, RateLimitSlot.slot, RateLimitSlot.free_at
            rows = (await connection.execute(select(*columns))).all()
        assert len(rows) == 1200
        freed = next(row for row in rows if row.slot == 0)
        # Free again an hour after its end, by the database's clock.
        assert freed.free_at - time.time() > 3500
        assert {row.account for row in rows} == {"mailer@relay:587"}


async def test_a_slot_whose_end_cannot_be_written_stays_held_and_is_logged(
    database: tuple[str, AsyncEngine], caplog: pytest.LogCaptureFixture
) -> None:
    _, engine = database
    slots = DatabaseSlots(engine, RateLimit(1, 1.0), "mailer@relay:587", hold=60.0)
    async with asyncio.timeout(WITHIN):
        assert [slot for slot, _ in (await slots.take(2))[0]] == [0]
        taken, wait = await slots.take(1)
        assert taken == [] and 0 < wait <= 1.0  # held: ask again within a poll
        await empty_database(engine)
        with caplog.at_level(logging.ERROR, logger="quartmail.outbox"):
            slots.give_back(0)
            await slots.close()
    assert "Could not free MAIL_RATE_LIMIT slots [0]" in caplog.text


async def test_a_slot_free_within_a_poll_is_taken_with_the_wait_left(
    database: tuple[str, AsyncEngine],
) -> None:
    _, engine = database
    # Polls every 0.25 s (period / count): a slot freed 0.5 s from now is out of reach.
    slots = DatabaseSlots(engine, RateLimit(2, 0.5), "mailer@relay:587", hold=60.0)
    async with asyncio.timeout(WITHIN):
        taken, _ = await slots.take(2)
        assert sorted(slot for slot, _ in taken) == [0, 1]
        slots.give_back(0)
        await slots.close()
        taken, wait = await slots.take(1)
        assert taken == [] and 0 < wait <= 0.25
        while not taken:
            await asyncio.sleep(wait)
            taken, wait = await slots.take(1)
        [(slot, left)] = taken
        assert slot == 0 and 0 <= left <= 0.25
