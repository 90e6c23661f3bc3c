"""The suppression list, on SQLite and PostgreSQL, against the real SMTP test server.

A permanent "no such mailbox" refusal adds the address; background and outbox
sends then leave it out; transactional mail still goes to an address that
only unsubscribed. PostgreSQL comes from conftest's postgres_url(), never skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from quart import Quart
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from quartmail import (
    Mail,
    MailError,
    Message,
    MessageError,
    RecipientsRefusedError,
    SuppressedError,
    email_failed,
)
from quartmail.outbox import OutboxMessage
from quartmail.suppression import SuppressionList, is_bounce, normalized
from quartmail.testing import SMTPTestServer

from conftest import SENDER

FAST = {"MAIL_RETRY_DELAY": 0.02, "MAIL_OUTBOX_POLL": 0.05}
DEAD = "dead@example.com"
ALIVE = "alive@example.com"
LEFT = "left@example.com"  # unsubscribed
USER_UNKNOWN = "550 5.1.1 <dead@example.com>: Recipient address rejected: User unknown"


@pytest_asyncio.fixture
async def table(engine: AsyncEngine) -> SuppressionList:
    table = SuppressionList(engine)
    await table.create_table()
    return table


def make_app(
    engine: AsyncEngine, server: SMTPTestServer, *, outbox: bool, **config: Any
) -> tuple[Quart, Mail]:
    app = Quart(__name__)
    app.config.update(server.mail_config(), MAIL_DEFAULT_SENDER=SENDER, **FAST)
    app.config.update(config)
    mail = Mail(app)
    if outbox:
        mail.init_outbox(app, engine)  # the suppression list comes with it
    else:
        mail.init_suppression(app, engine)
    return app, mail


async def eventually(condition: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not await condition():  # noqa: ASYNC110 (a database has no event to wait on)
            await asyncio.sleep(0.02)


class Failures:
    """The email_failed signals of one app, with an event per arrival."""

    def __init__(self, app: Quart) -> None:
        self.errors: list[tuple[Message, MailError]] = []
        self._arrived = asyncio.Event()
        email_failed.connect(self._receive, sender=app)

    def _receive(self, app: Quart, message: Message, error: MailError) -> None:
        self.errors.append((message, error))
        self._arrived.set()

    async def of_type(self, kind: type[MailError], count: int = 1) -> list[MailError]:
        async with asyncio.timeout(10):
            while len(found := [e for _, e in self.errors if isinstance(e, kind)]) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return found


async def send(mail: Mail, engine: AsyncEngine, message: Message, *, outbox: bool) -> None:
    if outbox:
        async with AsyncSession(engine) as session:
            await mail.outbox.enqueue(session, message)
            await session.commit()
    else:
        mail.send_background(message)


async def outbox_rows(engine: AsyncEngine) -> list[OutboxMessage]:
    async with engine.connect() as connection:
        result = await connection.execute(select(OutboxMessage).order_by(OutboxMessage.id))
        return [OutboxMessage(**row._mapping) for row in result]


# --- the table and its API -----------------------------------------------------------------


async def test_add_is_idempotent_and_list_and_remove(table: SuppressionList) -> None:
    assert await table.add("Ann <ann@Example.ORG>", "manual", "cli")
    assert not await table.add("ann@example.org", "manual", "again")
    assert await table.add("bob@example.org", "unsubscribe", "new-users")
    [ann, bob] = await table.entries()
    assert (ann.address, ann.reason, ann.source) == ("ann@example.org", "manual", "cli")
    assert ann.created_at.tzinfo is not None
    assert datetime.now(UTC) - ann.created_at < timedelta(minutes=5)
    assert (bob.address, bob.reason) == ("bob@example.org", "unsubscribe")
    assert [entry.address for entry in await table.entries("unsubscribe")] == [bob.address]

    assert await table.remove("ann@EXAMPLE.org")
    assert not await table.remove("ann@example.org")
    assert [entry.address for entry in await table.entries()] == ["bob@example.org"]


async def test_the_domain_is_case_insensitive_the_local_part_is_not(
    table: SuppressionList,
) -> None:
    await table.add("Ann@Example.ORG", "bounce", "550 5.1.1")
    assert await table.check(["Ann@example.org", "Ann@EXAMPLE.ORG", "ann@example.org"]) == {
        "Ann@example.org": "bounce",
        "Ann@EXAMPLE.ORG": "bounce",
    }
    # A non-ASCII domain is kept as the envelope writes it: IDNA.
    await table.add("zoë@bücher.example", "manual", "cli")
    assert normalized("zoë@BÜCHER.example") == "zoë@xn--bcher-kva.example"
    assert await table.check(["zoë@xn--BCHER-kva.example"]) == {
        "zoë@xn--BCHER-kva.example": "manual"
    }


async def test_a_bounce_replaces_an_unsubscribe_and_not_the_other_way(
    table: SuppressionList,
) -> None:
    assert await table.add(LEFT, "unsubscribe", "new-users")
    assert await table.check([LEFT], transactional=True) == {}
    assert await table.add(LEFT, "bounce", "550 5.1.1 gone")
    assert not await table.add(LEFT, "unsubscribe", "new-users")
    [entry] = await table.entries()
    assert (entry.reason, entry.source) == ("bounce", "550 5.1.1 gone")
    assert await table.check([LEFT], transactional=True) == {LEFT: "bounce"}


async def test_bad_input_is_a_clear_message_error(table: SuppressionList) -> None:
    with pytest.raises(MessageError, match="reason must be one of"):
        await table.add(ALIVE, "spam", "cli")  # type: ignore[arg-type]
    with pytest.raises(MessageError, match="valid address"):
        await table.add("not an address", "manual", "cli")
    with pytest.raises(MessageError):
        await table.remove("a@b@c")
    assert await table.entries() == []


async def test_edges_of_check_and_record(table: SuppressionList) -> None:
    assert await table.check([]) == {}
    # A stored row's recipient that does not parse is compared as it is.
    assert await table.check(["not an address"]) == {}
    assert await table.record_refusals("<id@x>", {ALIVE: (450, "4.2.1 try later")}) == []
    with pytest.raises(MessageError, match="source must be a string"):
        await table.add(ALIVE, "manual", None)  # type: ignore[arg-type]
    assert await table.entries() == []


@pytest.mark.parametrize(
    ("code", "text", "bounce"),
    [
        (550, "5.1.1 <a@x.org>: Recipient address rejected: User unknown", True),
        (550, "5.1.10 Recipient address has null MX", True),
        (553, "5.1.3 Bad recipient address syntax", True),
        (550, "5.1.6 Mailbox has moved", True),
        (550, "5.2.1 Mailbox disabled", True),
        (550, "5.1.2 Host not found", False),  # may be the relay's own DNS
        (552, "5.2.2 Mailbox full", False),
        (550, "5.7.1 Message rejected as spam", False),
        (550, "User unknown", False),  # no enhanced code: could be anything
        (450, "4.1.1 Try again later", False),
        (550, "4.1.1 inconsistent", False),
        (550, "5.1.11 not a code we know", False),
        (550, "5.1.100", False),
    ],
)
def test_which_refusals_are_bounces(code: int, text: str, bounce: bool) -> None:
    assert is_bounce(code, text) is bounce


# --- sending ----------------------------------------------------------------------------------


@pytest.mark.parametrize("outbox", [False, True], ids=["background", "outbox"])
async def test_a_550_5_1_1_adds_the_address_and_the_next_send_skips_it(
    outbox: bool, engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    smtp_server.refuse_recipients = {DEAD: USER_UNKNOWN}
    app, mail = make_app(engine, smtp_server, outbox=outbox)
    failures = Failures(app)
    async with app.test_app(), app.app_context():
        await send(
            mail, engine, Message("first", recipients=[DEAD, ALIVE], body="1"), outbox=outbox
        )
        [first] = await smtp_server.wait_for_messages(1)
        assert first.rcpt_tos == [ALIVE]

        async def dead_is_suppressed() -> bool:
            return await mail.suppression.check([DEAD]) == {DEAD: "bounce"}

        await eventually(dead_is_suppressed)
        [entry] = await mail.suppression.entries()
        assert USER_UNKNOWN.removeprefix("550 ") in entry.source
        assert first.parsed()["Message-ID"] in entry.source

        second = Message("second", recipients=["dead@EXAMPLE.com", ALIVE], body="2")
        await send(mail, engine, second, outbox=outbox)
        [_, received] = await smtp_server.wait_for_messages(2)
        assert received.rcpt_tos == [ALIVE]
        [left_out] = await failures.of_type(SuppressedError)
        assert isinstance(left_out, SuppressedError)
        assert left_out.suppressed == {"dead@EXAMPLE.com": "bounce"}
        if outbox:
            await eventually(lambda: _row_state(engine, 2, "sent"))
            note = (await outbox_rows(engine))[1].last_error or ""
            assert "dead@EXAMPLE.com (bounce)" in note

        # None left: nothing is sent, and it is said.
        await send(mail, engine, Message("third", recipients=[DEAD], body="3"), outbox=outbox)
        [_, nobody] = await failures.of_type(SuppressedError, 2)
        assert "every recipient is suppressed" in str(nobody)
        if outbox:
            await eventually(lambda: _row_state(engine, 3, "failed"))
            assert "suppressed" in ((await outbox_rows(engine))[2].last_error or "")
    assert len(smtp_server.messages) == 2
    assert smtp_server.data_attempts == 2


async def _row_state(engine: AsyncEngine, row: int, state: str) -> bool:
    rows = await outbox_rows(engine)
    return len(rows) >= row and rows[row - 1].state == state


async def test_background_result_and_future_say_who_was_left_out(
    engine: AsyncEngine, smtp_server: SMTPTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    app, mail = make_app(engine, smtp_server, outbox=False)
    async with app.test_app(), app.app_context():
        await mail.suppression.add(LEFT, "unsubscribe", "new-users")
        result = await mail.send_background(Message("hi", recipients=[LEFT, ALIVE], body="x"))
        assert result.suppressed == {LEFT: "unsubscribe"}
        assert result.refused == {}
        with (
            caplog.at_level(logging.WARNING, "quartmail"),
            pytest.raises(SuppressedError) as caught,
        ):
            await mail.send_background(Message("hi", recipients=[LEFT], body="x"))
        assert caught.value.suppressed == {LEFT: "unsubscribe"}
        assert any("every recipient is suppressed" in r.getMessage() for r in caplog.records)
    [received] = smtp_server.messages
    assert received.rcpt_tos == [ALIVE]
    # The To header still names both: the bytes (and a DKIM signature) are not changed.
    assert LEFT in received.parsed()["To"]


async def test_a_message_refused_for_its_only_recipient_adds_it(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    smtp_server.refuse_recipients = {DEAD: USER_UNKNOWN}
    app, mail = make_app(engine, smtp_server, outbox=False)
    async with app.test_app(), app.app_context():
        with pytest.raises(RecipientsRefusedError):
            await mail.send_background(Message("hi", recipients=[DEAD], body="x"))

        async def suppressed() -> bool:
            return bool(await mail.suppression.check([DEAD]))

        await eventually(suppressed)


@pytest.mark.parametrize("outbox", [False, True], ids=["background", "outbox"])
async def test_transactional_mail_goes_to_the_unsubscribed_not_to_the_bounced(
    outbox: bool, engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    app, mail = make_app(engine, smtp_server, outbox=outbox)
    failures = Failures(app)
    async with app.test_app(), app.app_context():
        await mail.suppression.add(LEFT, "unsubscribe", "new-users")
        await mail.suppression.add(DEAD, "bounce", "550 5.1.1")
        reset = Message("Password reset", recipients=[LEFT, DEAD], body="x", transactional=True)
        await send(mail, engine, reset, outbox=outbox)
        [received] = await smtp_server.wait_for_messages(1)
        assert received.rcpt_tos == [LEFT]
        assert "transactional" not in received.data.decode().lower()
        [left_out] = await failures.of_type(SuppressedError)
        assert isinstance(left_out, SuppressedError)
        assert left_out.suppressed == {DEAD: "bounce"}

        news = Message("News", recipients=[LEFT], body="x")
        await send(mail, engine, news, outbox=outbox)
        await failures.of_type(SuppressedError, 2)
        if outbox:
            rows = await outbox_rows(engine)
            assert [row.transactional for row in rows] == [True, False]
    assert len(smtp_server.messages) == 1


async def test_mail_send_sends_to_everyone_but_records_bounces(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    smtp_server.refuse_recipients = {DEAD: USER_UNKNOWN}
    app, mail = make_app(engine, smtp_server, outbox=False)
    async with app.test_app(), app.app_context():
        await mail.suppression.add(LEFT, "unsubscribe", "new-users")
        result = await mail.send(Message("direct", recipients=[LEFT, DEAD], body="x"))
        assert set(result.refused) == {DEAD}
        gone = "gone@example.com"
        smtp_server.refuse_recipients[gone] = "550 5.2.1 Mailbox disabled"
        with pytest.raises(RecipientsRefusedError):
            await mail.send(Message("direct", recipients=[gone], body="x"))

        async def both_suppressed() -> bool:
            return await mail.suppression.check([DEAD, gone]) == {DEAD: "bounce", gone: "bounce"}

        await eventually(both_suppressed)
    [received] = smtp_server.messages
    assert received.rcpt_tos == [LEFT]


async def test_the_app_without_a_list_has_a_clear_error(smtp_server: SMTPTestServer) -> None:
    app = Quart(__name__)
    app.config.update(smtp_server.mail_config(), MAIL_DEFAULT_SENDER=SENDER)
    mail = Mail(app)
    async with app.app_context():
        with pytest.raises(RuntimeError, match="init_suppression"):
            mail.suppression  # noqa: B018 (the property raises)


async def test_a_list_that_cannot_be_read_loses_no_mail(
    engine: AsyncEngine, smtp_server: SMTPTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    smtp_server.refuse_recipients = {DEAD: USER_UNKNOWN}
    app, mail = make_app(engine, smtp_server, outbox=False)
    async with app.test_app(), app.app_context():
        await mail.suppression.add(LEFT, "unsubscribe", "new-users")
        async with engine.begin() as connection:  # the table is gone, under the running app
            await connection.execute(text("DROP TABLE mail_suppression"))
        with caplog.at_level(logging.WARNING, "quartmail"):
            result = await mail.send_background(Message("hi", recipients=[LEFT, DEAD], body="x"))
            assert result.suppressed == {}
            assert set(result.refused) == {DEAD}

            def logged(text: str) -> bool:
                return any(text in record.getMessage() for record in caplog.records)

            async def bounce_not_recorded() -> bool:
                return logged("Could not add the bounced recipients")

            await eventually(bounce_not_recorded)
        assert logged("Could not read the suppression list; sending to every recipient")
    [received] = smtp_server.messages
    assert received.rcpt_tos == [LEFT]


async def test_a_burst_of_background_mail_is_checked_in_one_query(
    engine: AsyncEngine, smtp_server: SMTPTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, mail = make_app(engine, smtp_server, outbox=False, MAIL_POOL_SIZE=4)
    async with app.test_app(), app.app_context():
        await mail.suppression.add(LEFT, "unsubscribe", "new-users")
        await mail.suppression.add(DEAD, "bounce", "550 5.1.1")
        checked: list[list[str]] = []  # each check is one query
        real_check = mail.suppression.check

        async def check(recipients: list[str], **options: Any) -> dict[str, str]:
            checked.append(list(recipients))
            return await real_check(recipients, **options)

        monkeypatch.setattr(mail.suppression, "check", check)
        messages = [
            *(
                Message(f"both {n}", recipients=[LEFT, f"a{n}@example.com"], body="x")
                for n in range(20)
            ),
            Message("reset", recipients=[LEFT, DEAD], body="x", transactional=True),
            Message("nobody", recipients=[DEAD], body="x"),
        ]
        # Submitted before any worker runs: the first worker checks them all at once.
        futures = [mail.send_background(message) for message in messages]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert len(checked) == 1 and len(checked[0]) == 2 * 20 + 2 + 1
    *both, reset, nobody = outcomes
    assert all(result.suppressed == {LEFT: "unsubscribe"} for result in both)  # type: ignore[union-attr]
    assert reset.suppressed == {DEAD: "bounce"}  # type: ignore[union-attr]
    assert isinstance(nobody, SuppressedError)
    received = {message.parsed()["Subject"]: message.rcpt_tos for message in smtp_server.messages}
    assert received == {
        **{f"both {n}": [f"a{n}@example.com"] for n in range(20)},
        "reset": [LEFT],
    }


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # a lock that waits
async def test_a_check_cut_short_by_shutdown_fails_its_messages_loudly(
    engine: AsyncEngine, smtp_server: SMTPTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    app, mail = make_app(engine, smtp_server, outbox=False, MAIL_SHUTDOWN_TIMEOUT=0.2)
    await SuppressionList(engine).create_table()
    async with engine.connect() as locker:
        # The list cannot be read until this transaction ends: the check waits.
        await locker.execute(text("LOCK TABLE mail_suppression IN ACCESS EXCLUSIVE MODE"))
        with caplog.at_level(logging.ERROR, "quartmail"):
            async with app.test_app(), app.app_context():
                futures = [
                    mail.send_background(Message(f"m{n}", recipients=[ALIVE], body="x"))
                    for n in range(3)
                ]
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
        await locker.rollback()
    assert all(isinstance(outcome, MailError) for outcome in outcomes)
    assert all("shut down before" in str(outcome) for outcome in outcomes)
    assert smtp_server.messages == []
