"""The public API as an app uses it, checked by ``mypy --strict`` and never run.

pytest does not collect this file (its name does not start with ``test_``);
CI's ``mypy --strict quartmail tests bench`` checks that what users write
type-checks, and that the types they get back are the ones documented. A
change to a public signature that would break an app's type check fails here.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, assert_type

from quart import Quart
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from quartmail import (
    Attachment,
    BadHeaderError,
    ConfigError,
    Connection,
    Mail,
    MailError,
    Message,
    MessageError,
    RecipientsRefusedError,
    SendError,
    SendResult,
    SuppressedError,
    email_dispatched,
    email_failed,
)
from quartmail.testing_threaded import ThreadedSMTPTestServer


def create_app() -> Quart:
    app = Quart(__name__)
    app.config.update(MAIL_SERVER="smtp.example.com", MAIL_PORT=587, MAIL_USE_TLS=True)
    try:
        mail.init_app(app)
    except ConfigError as error:
        raise SystemExit(str(error)) from error
    return app


mail = Mail()
direct = Mail(Quart(__name__))


def build_message(pdf: bytes) -> Message:
    msg = Message(
        "Hello",
        sender=("Me", "me@example.com"),
        recipients=["you@example.com", ("Them", "them@example.com")],
        cc="cc@example.com",
        bcc=["bcc@example.com"],
        reply_to="Replies <replies@example.com>",
        date=datetime.now(UTC),
        extra_headers={"X-Campaign": "spring"},
    )
    msg.body = "text"
    msg.html = "<b>HTML</b>"
    msg.attach("report.pdf", "application/pdf", pdf)
    msg.add_recipient("late@example.com")
    assert_type(msg.attachments, list[Attachment])
    assert_type(msg.msg_id, str)
    assert_type(msg.has_bad_headers(), bool)
    assert_type(msg.as_bytes(), bytes)
    return msg


async def send_now(msg: Message) -> None:
    try:
        result = await mail.send(msg)
    except RecipientsRefusedError as error:
        assert_type(error.refused, dict[str, tuple[int, str]])
        return
    except SendError as error:
        assert_type(error.code, int | None)
        assert_type(error.transient, bool)
        return
    except (MessageError, BadHeaderError):
        return
    assert_type(result, SendResult)
    assert_type(result.message_id, str)
    for address, (code, text) in result.refused.items():
        assert_type(address, str)
        assert_type(code, int)
        assert_type(text, str)
    assert_type(await mail.send_message("Hi", recipients=["a@example.com"]), SendResult)


async def send_many(messages: list[Message]) -> list[SendResult]:
    async with mail.connect() as conn:
        assert_type(conn, Connection)
        results = [await conn.send(msg) for msg in messages]
        results.append(await conn.send(messages[0], envelope_from="bounces@example.com"))
        return results


async def send_later(msg: Message) -> SendResult | None:
    future = mail.send_background(msg)
    assert_type(future, asyncio.Future[SendResult])
    try:
        return await future
    except MailError:
        return None


async def record() -> list[Message]:
    with mail.record_messages() as outbox:
        await mail.send_message("Hi", recipients=["a@example.com"], body="text")
    assert_type(outbox, list[Message])
    return outbox


async def enqueue(app: Quart, msg: Message) -> str:
    engine = create_async_engine("sqlite+aiosqlite:///mail.db")
    mail.init_outbox(app, engine)
    async with AsyncSession(engine) as session:
        message_id = await mail.outbox.enqueue(session, msg)
        await session.commit()
    assert_type(message_id, str)
    return message_id


@email_dispatched.connect
async def on_sent(app: Quart, message: Message, **kwargs: Any) -> None:
    app.logger.info("sent %s", message.msg_id)


@email_failed.connect
def on_failed(app: Quart, message: Message, error: MailError, **kwargs: Any) -> None:
    app.logger.error("not sent %s: %s", message.msg_id, error)


async def shut_down() -> None:
    await mail.shutdown()


def threaded_faults(server: ThreadedSMTPTestServer) -> None:
    server.refuse_recipients["b@example.com"] = "550 5.1.1 User unknown"
    server.max_recipients = 2
    server.ehlo_reply = "garbage"
    server.echo_auth = True
    server.oauth2_tokens = {"user": "new-token"}
    assert_type(server.greeting, str | None)


def newsletter(url: str, sign: Any) -> Message:
    msg = Message("News", recipients=["you@example.com"], body="x", list_unsubscribe=url)
    msg.list_unsubscribe = [url, "mailto:leave@example.com"]
    data = msg.as_bytes()
    msg.set_signed(data, sign(data))  # a signer of the app's own
    return msg


async def suppression(app: Quart) -> None:
    mail.init_suppression(app, create_async_engine("sqlite+aiosqlite:///mail.db"))
    assert_type(await mail.suppression.add("a@example.com", "manual", "support"), bool)
    assert_type(await mail.suppression.check(["a@example.com"]), dict[str, str])
    reset = Message("Reset", recipients=["a@example.com"], body="...", transactional=True)
    try:
        result = await mail.send_background(reset)
    except SuppressedError as error:
        assert_type(error.suppressed, dict[str, str])
        return
    assert_type(result.suppressed, dict[str, str])
