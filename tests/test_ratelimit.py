"""MAIL_RATE_LIMIT in one process: the server's own MAIL FROM times show the limit
held by every path (send, connect, send_background, the 452 split), the wait
counts toward MAIL_DELIVERY_TIMEOUT, not MAIL_TIMEOUT, and waiters go first come,
first served. Across processes (the outbox on PostgreSQL): test_ratelimit_shared.py.

Only upper bounds are asserted: a slow machine only sends slower.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from quart import Quart

from quartmail import ConfigError, Mail, Message, SendError
from quartmail.ratelimit import RateLimit, RateLimiter
from quartmail.settings import MailSettings
from quartmail.testing import SMTPTestServer

from conftest import MakeMail

# Every wait in these tests is bounded by this; generous, for a loaded machine.
WITHIN = 60.0


def message(n: int = 0, **kwargs: Any) -> Message:
    kwargs.setdefault("recipients", ["admin@example.com"])
    return Message(f"message {n}", body=f"body {n}", **kwargs)


def read(value: object) -> RateLimit | None:
    settings = MailSettings.from_config({"MAIL_RATE_LIMIT": value}, testing=False, debug=False)
    return settings.rate_limit


# --- the setting ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("20/s", RateLimit(20, 1.0)),
        ("600/m", RateLimit(600, 60.0)),
        ("1000/h", RateLimit(1000, 3600.0)),
        (14, RateLimit(14, 1.0)),
        (14.0, RateLimit(14, 1.0)),
        ("14", RateLimit(14, 1.0)),  # from the environment
    ],
)
def test_good_values_are_read(value: object, expected: RateLimit | None) -> None:
    assert read(value) == expected
    if expected is not None:
        assert str(expected) in {"20/s", "600/m", "1000/h", "14/s"}


@pytest.mark.parametrize(
    "value",
    [
        0,
        -5,
        "0/s",
        "-5/s",
        2.5,
        math.nan,
        math.inf,
        True,
        False,
        "10/d",
        "10/",
        "/s",
        "abc",
        " 10/s",
        "10/s ",
        "10 /s",
        "10/ s",
        "+10/s",
        "1e3/s",
        "١٠/s",
        "10/S",
        "10/sec",
        "100001/s",
        [10, "s"],
    ],
)
def test_bad_values_stop_the_app_naming_the_setting(value: object) -> None:
    app = Quart(__name__)
    app.config["MAIL_RATE_LIMIT"] = value
    with pytest.raises(ConfigError, match="MAIL_RATE_LIMIT"):
        Mail(app)


# --- every path, measured by the server ----------------------------------------------------------


async def test_send_holds_the_limit(smtp_server: SMTPTestServer, make_mail: MakeMail) -> None:
    app, mail = make_mail(smtp_server, MAIL_RATE_LIMIT="5/s")
    async with app.app_context(), asyncio.timeout(WITHIN):
        for n in range(12):
            await mail.send(message(n))
    assert len(smtp_server.messages) == 12
    assert smtp_server.most_in_window(1.0) <= 5


async def test_connect_holds_the_limit(smtp_server: SMTPTestServer, make_mail: MakeMail) -> None:
    app, mail = make_mail(smtp_server, MAIL_RATE_LIMIT="5/s")
    async with app.app_context(), asyncio.timeout(WITHIN), mail.connect() as connection:
        for n in range(12):
            await connection.send(message(n))
    assert len(smtp_server.messages) == 12
    assert smtp_server.connections == 1
    assert smtp_server.most_in_window(1.0) <= 5


async def test_background_holds_the_limit_over_the_pool(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.pipelining = True  # the pipelined path starts its MAIL FROM elsewhere
    app, mail = make_mail(smtp_server, MAIL_RATE_LIMIT="6/s", MAIL_POOL_SIZE=4)
    async with app.test_app(), app.app_context(), asyncio.timeout(WITHIN):
        await asyncio.gather(*(mail.send_background(message(n)) for n in range(15)))
    assert len(smtp_server.messages) == 15
    assert smtp_server.connections <= 4
    assert smtp_server.most_in_window(1.0) <= 6


async def test_each_transaction_of_a_452_split_counts(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    smtp_server.max_recipients = 2
    recipients = [f"user{n}@example.com" for n in range(6)]
    app, mail = make_mail(smtp_server, MAIL_RATE_LIMIT="2/s")
    async with app.app_context(), asyncio.timeout(WITHIN):
        result = await mail.send(message(recipients=recipients))
        await mail.send(message(1))
    assert result.refused == {}
    assert sorted(r for m in smtp_server.messages for r in m.rcpt_tos) == sorted(
        [*recipients, "admin@example.com"]
    )
    # Four transactions, at most two in any second.
    assert len([c for c in smtp_server.commands if c.verb == "MAIL"]) == 4
    assert smtp_server.most_in_window(1.0) <= 2


# --- the wait's deadline ------------------------------------------------------------------------


async def test_the_wait_does_not_count_toward_mail_timeout(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    # Each message waits up to a second for its slot, far past MAIL_TIMEOUT.
    app, mail = make_mail(smtp_server, MAIL_RATE_LIMIT="1/s", MAIL_TIMEOUT=0.3)
    async with app.app_context(), asyncio.timeout(WITHIN):
        for n in range(3):
            await mail.send(message(n))
    assert len(smtp_server.messages) == 3
    assert smtp_server.most_in_window(1.0) <= 1


async def test_a_deadline_that_passes_while_waiting_fails_with_nothing_sent(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(
        smtp_server, MAIL_RATE_LIMIT="1/h", MAIL_DELIVERY_TIMEOUT=0.5, MAIL_RETRIES=3
    )
    async with app.test_app(), app.app_context(), asyncio.timeout(WITHIN):
        await mail.send_background(message(0))
        late = mail.send_background(message(1))
        with pytest.raises(SendError, match="not delivered within MAIL_DELIVERY_TIMEOUT") as info:
            await late
        with pytest.raises(SendError, match="not delivered within MAIL_DELIVERY_TIMEOUT"):
            await mail.send(message(2))
    assert not info.value.transient  # no retry: its time is up
    # The second and third never started a transaction.
    assert [m.parsed()["Subject"] for m in smtp_server.messages] == ["message 0"]
    assert len([c for c in smtp_server.commands if c.verb == "MAIL"]) == 1


async def test_a_message_cancelled_while_waiting_frees_its_turn(
    smtp_server: SMTPTestServer, make_mail: MakeMail
) -> None:
    app, mail = make_mail(smtp_server, MAIL_RATE_LIMIT="1/s", MAIL_POOL_SIZE=2)
    async with app.test_app(), app.app_context(), asyncio.timeout(WITHIN):
        await mail.send_background(message(0))
        waiting = mail.send_background(message(1))
        after = mail.send_background(message(2))
        await asyncio.sleep(0)
        waiting.cancel()
        await after
    assert [m.parsed()["Subject"] for m in smtp_server.messages] == ["message 0", "message 2"]
    assert smtp_server.most_in_window(1.0) <= 1


# --- the limiter itself -------------------------------------------------------------------------


async def test_waiters_are_served_first_come_first_served() -> None:
    limiter = RateLimiter(RateLimit(2, 0.2))
    served: list[int] = []

    async def one(n: int) -> None:
        permit = await limiter.acquire()
        assert permit is not None
        served.append(n)
        permit.release()
        permit.release()  # a second release gives nothing back twice

    async with asyncio.timeout(WITHIN):
        tasks = []
        for n in range(8):
            tasks.append(asyncio.create_task(one(n)))
            await asyncio.sleep(0)  # each one queues before the next starts
        await asyncio.gather(*tasks)
    assert served == list(range(8))
    assert repr(limiter) == "<RateLimiter 2/0.2s LocalSlots>"


async def test_slots_held_by_running_transactions_wait_for_their_end() -> None:
    limiter = RateLimiter(RateLimit(1, 0.05))
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(WITHIN):
        first = await limiter.acquire()
        assert first is not None
        # The slot is in use: nothing before the deadline, however long the period ago.
        assert await limiter.acquire(loop.time() + 0.2) is None
        first.release()
        released = loop.time()
        second = await limiter.acquire()
        assert second is not None
        assert loop.time() - released >= 0.05  # a period after the end, not the start
        second.release()
        await limiter.close()
