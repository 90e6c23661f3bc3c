"""The durable outbox across real processes: kill -9, SIGTERM, two dispatchers, the CLI.

Nothing is mocked. The sign-up app runs under the real Hypercorn (``hypercorn.toml``), the
dispatchers are real Python processes, the database is a real SQLite file or the test
PostgreSQL (conftest's postgres_url(): QUARTMAIL_TEST_POSTGRES, else a throwaway server; in a
database of this module's own beside it, when the role may create one), and the mail goes to
the SMTP test server served in the test's own event loop: every wait on a process is awaited,
so that the server keeps answering meanwhile.

Run as a script, ``python tests/test_outbox_processes.py DATABASE_URL CONFIG_JSON``, this
module is one dispatcher of test_two_dispatchers_share_the_outbox_with_no_duplicate: it
builds an app with ``Mail`` and ``init_outbox``, says ``ready``, waits for a line on stdin,
runs the app's lifespan until the outbox has nothing queued or sending, and prints the
Message-IDs it delivered, as JSON.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from quart import Quart
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from quartmail import Mail, Message, email_dispatched
from quartmail.app.models import User
from quartmail.outbox import Outbox, OutboxBase, OutboxMessage
from quartmail.testing import ReceivedMessage, SMTPTestServer

from conftest import (
    SENDER,
    ServedApp,
    clean_environment,
    empty_database,
    own_postgres_url,
    serve_app,
)

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
BIN = Path(sys.executable).parent
ADMIN = "admin@example.com"
APP_SPEC = "quartmail.app:create_app('production')"
# Every wait on a process or on the mail is bounded by this; generous, for slow CI machines.
WITHIN = 60.0

Process = asyncio.subprocess.Process


@dataclass(frozen=True)
class Row:
    id: int
    message_id: str
    state: str
    attempts: int


# --- helpers ------------------------------------------------------------------------------


async def outbox_rows(engine: AsyncEngine) -> list[Row]:
    async with engine.connect() as connection:
        result = await connection.execute(
            select(
                OutboxMessage.id,
                OutboxMessage.message_id,
                OutboxMessage.state,
                OutboxMessage.attempts,
            ).order_by(OutboxMessage.id)
        )
        return [Row(*row) for row in result]


def message_id(received: ReceivedMessage) -> str:
    return str(received.parsed()["Message-ID"])


async def eventually(
    condition: Callable[[], Awaitable[bool]], what: str, within: float = WITHIN
) -> None:
    """Wait until *condition* holds, checking every 50 ms, for at most *within* seconds."""
    try:
        async with asyncio.timeout(within):
            while not await condition():  # noqa: ASYNC110 (a database has no event to wait on)
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {within} s: {what}") from None


# --- Hypercorn ----------------------------------------------------------------------------


def app_environment(database_url: str, server: SMTPTestServer, **settings: str) -> dict[str, str]:
    """The settings of the production app, with the outbox, sending to *server*
    (:func:`serve_app` adds them to an environment without any of the app's settings)."""
    return {
        "SECRET_KEY": "outbox-processes-test-secret",
        "DATABASE_URL": database_url,
        "FLASKY_ADMIN": ADMIN,
        "MAIL_SERVER": server.host,
        "MAIL_PORT": str(server.port),
        "MAIL_TIMEOUT": "40",
        "MAIL_POOL_SIZE": str(POOL_SIZE),
        "MAIL_OUTBOX": "true",
        "MAIL_OUTBOX_POLL": "0.1",
        **settings,
    }


def serve(env: dict[str, str], log_dir: Path) -> AbstractAsyncContextManager[ServedApp]:
    """The production app under Hypercorn (:func:`serve_app`), its logs in *log_dir*."""
    log_dir.mkdir(exist_ok=True)
    return serve_app(APP_SPEC, env, log_dir, ready_timeout=WITHIN)


def http_client(served: ServedApp) -> httpx.AsyncClient:
    # trust_env=False: no HTTP(S)_PROXY from the environment between us and loopback.
    return httpx.AsyncClient(base_url=served.url, timeout=WITHIN, trust_env=False)


# --- 1. kill -9 and SIGTERM under Hypercorn ------------------------------------------------


async def serve_until_all_sent(env: dict[str, str], log_dir: Path, engine: AsyncEngine) -> None:
    """Start Hypercorn again, wait until every outbox row is sent, and stop it with
    SIGTERM (to the master only: a graceful shutdown), which must exit 0."""
    async with serve(env, log_dir) as served:

        async def all_sent() -> bool:
            if served.process.returncode is not None:
                raise AssertionError(
                    f"Hypercorn exited with {served.process.returncode}:\n{served.stderr}"
                )
            return {row.state for row in await outbox_rows(engine)} == {"sent"}

        await eventually(all_sent, "every outbox row sent by the restarted app")
        served.terminate()
        returncode = await served.wait(WITHIN)
    assert returncode == 0, served.stderr


SIGN_UPS = 200
POOL_SIZE = 2
BATCH = 4 * POOL_SIZE  # what one dispatcher claims at most (Outbox._batch)


async def test_kill_9_under_hypercorn_loses_no_mail(
    database: tuple[str, AsyncEngine], smtp_server: SMTPTestServer, tmp_path: Path
) -> None:
    url, engine = database
    server = smtp_server
    # A short lease, so that the next process soon sends what the killed one had in flight;
    # still three times what a claimed row waits here (its own DATA and the one before it).
    env = app_environment(url, server, MAIL_OUTBOX_LEASE="3")

    # Slow while the users sign up (2 sessions, 2 mails a second each), so that most of
    # their mail is still to be sent when the sign-ups are done; then 0.05 s per DATA until
    # the kill.
    server.data_delay = 0.5
    async with serve(env, tmp_path / "first") as first:
        limit = asyncio.Semaphore(8)
        async with http_client(first) as client:

            async def sign_up(n: int) -> None:
                async with limit:
                    response = await client.post("/api/users", json={"name": f"user {n:03}"})
                assert response.status_code == 201, (
                    response.status_code,
                    response.text,
                    first.stderr,
                )

            async with asyncio.timeout(WITHIN):
                await asyncio.gather(*(sign_up(n) for n in range(SIGN_UPS)))
        assert len(server.messages) < SIGN_UPS // 4, "the sign-ups were too slow for this test"
        server.data_delay = 0.05
        await server.wait_for_messages(SIGN_UPS // 4, timeout=WITHIN)
        first.kill()  # SIGKILL to the process group: the master and any worker, at once
        await first.wait(WITHIN)
    await asyncio.sleep(0.1)  # the server sees the connections drop
    arrived_before = Counter(message_id(m) for m in server.messages)

    at_kill = await outbox_rows(engine)
    assert len(at_kill) == SIGN_UPS
    in_flight = {row.message_id for row in at_kill if row.state == "sending"}
    marked_sent = {row.message_id for row in at_kill if row.state == "sent"}
    assert 0 < sum(arrived_before.values()) < SIGN_UPS
    assert max(arrived_before.values()) == 1
    # A row is marked sent only once the server has taken its message, and nothing reached
    # the server that was not claimed first.
    assert marked_sent <= set(arrived_before)
    assert set(arrived_before) <= marked_sent | in_flight
    assert 0 < len(in_flight) <= BATCH

    server.data_delay = 0.01  # the slow part is over: the rest may go quickly
    await serve_until_all_sent(env, tmp_path / "restarted", engine)

    rows = await outbox_rows(engine)
    received = Counter(message_id(m) for m in server.messages)
    assert len(rows) == SIGN_UPS
    assert {row.state for row in rows} == {"sent"}
    assert set(received) == {row.message_id for row in rows}  # all 200, nothing else
    duplicated = {mid for mid, count in received.items() if count > 1}
    duplicates = sum(received.values()) - len(received)
    # At least once: only what was in flight at the kill may have been sent twice.
    assert duplicated <= in_flight
    assert duplicates <= len(in_flight) <= BATCH
    async with engine.connect() as connection:
        assert await connection.scalar(select(func.count()).select_from(User)) == SIGN_UPS
    print(
        f"\n{engine.dialect.name}: {sum(arrived_before.values())} of {SIGN_UPS} arrived before "
        f"the kill, {len(in_flight)} in flight, {duplicates} sent twice"
    )


async def test_sigterm_hands_back_what_is_in_flight(
    database: tuple[str, AsyncEngine], smtp_server: SMTPTestServer, tmp_path: Path
) -> None:
    """A graceful stop that cannot finish its sends queues their rows again, so that the
    next process sends them at once instead of after the lease (300 s, the default)."""
    url, engine = database
    server = smtp_server
    env = app_environment(url, server, MAIL_SHUTDOWN_TIMEOUT="1")
    server.data_delay = 30  # no DATA is answered before the shutdown deadline
    async with serve(env, tmp_path / "first") as first:
        async with http_client(first) as client:
            for n in range(10):
                response = await client.post("/api/users", json={"name": f"user {n}"})
                assert response.status_code == 201, (response.status_code, response.text)

        claimed: list[Row] = []

        async def both_sessions_in_data() -> bool:
            # The dispatcher claims a pool's worth or more at a time, up to BATCH; with
            # both sessions held in DATA it claims no more.
            claimed[:] = [row for row in await outbox_rows(engine) if row.state == "sending"]
            return POOL_SIZE <= len(claimed) <= BATCH and server.data_attempts == POOL_SIZE

        await eventually(both_sessions_in_data, "rows claimed, 2 sessions in DATA")
        first.terminate()  # SIGTERM to the master only: a graceful shutdown
        returncode = await first.wait(WITHIN)
    assert returncode == 0, first.stderr
    assert f"{len(claimed)} outbox messages left for the next dispatcher" in first.stderr
    rows = await outbox_rows(engine)
    assert [(row.state, row.attempts) for row in rows] == [("queued", 0)] * 10
    assert server.messages == []

    server.data_delay = 0
    await serve_until_all_sent(env, tmp_path / "restarted", engine)
    received = [message_id(m) for m in server.messages]
    assert sorted(received) == sorted(row.message_id for row in rows)


# --- 2. two dispatchers on one PostgreSQL database ----------------------------------------

MAILS = 1000
DISPATCHERS = 2


async def test_two_dispatchers_share_the_outbox_with_no_duplicate(
    smtp_server: SMTPTestServer,
) -> None:
    url = await own_postgres_url()
    server = smtp_server
    server.data_delay = 0.02  # one dispatcher alone would need seconds: both get a share
    config: dict[str, Any] = {
        **server.mail_config(),
        "MAIL_DEFAULT_SENDER": SENDER,
        "MAIL_POOL_SIZE": 4,
        "MAIL_OUTBOX_POLL": 0.1,
    }
    engine = create_async_engine(url)
    try:
        await empty_database(engine)
        # Enqueued through the extension, with no dispatcher running here (no lifespan).
        app = Quart(__name__)
        app.config.update(config)
        mail = Mail(app)
        outbox = mail.init_outbox(app, engine)
        await outbox.create_table()
        async with app.app_context(), AsyncSession(engine) as session:
            ids = [
                await outbox.enqueue(
                    session,
                    Message(f"outbox {n}", recipients=[ADMIN], body=f"message {n}"),
                )
                for n in range(MAILS)
            ]
            await session.commit()
        assert len(set(ids)) == MAILS

        outputs = await run_dispatchers(url, config, server)

        rows = await outbox_rows(engine)
    finally:
        await engine.dispose()

    received = [message_id(m) for m in server.messages]
    assert len(received) == MAILS
    assert len(set(received)) == MAILS
    assert set(received) == set(ids) == {row.message_id for row in rows}
    assert {row.state for row in rows} == {"sent"}
    assert {row.attempts for row in rows} == {0}
    shares = [set(sent) for sent in outputs]
    assert [len(share) for share in shares] == [len(sent) for sent in outputs]
    assert all(shares), f"one dispatcher sent nothing: {[len(s) for s in shares]}"
    assert sum(len(share) for share in shares) == MAILS
    assert set.union(*shares) == set(ids)
    print(f"\nshares of {MAILS}: {[len(share) for share in shares]}")


async def run_dispatchers(
    url: str,
    config: dict[str, Any],
    server: SMTPTestServer,
    *,
    count: int = DISPATCHERS,
    mails: int = MAILS,
    within: float = WITHIN,
) -> list[list[str]]:
    """Start *count* dispatcher processes, let them go at once, wait (each wait bounded
    by *within*) until *mails* messages have arrived and they have ended; return the
    Message-IDs each one delivered."""
    processes: list[Process] = []
    try:
        for _ in range(count):
            processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(SCRIPT),
                    url,
                    json.dumps(config),
                    cwd=REPO,
                    env=clean_environment(),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            )
        for process in processes:
            assert process.stdout is not None
            async with asyncio.timeout(within):
                line = await process.stdout.readline()
            if line != b"ready\n":
                _, err = await process.communicate()
                raise AssertionError(f"dispatcher did not start: {line!r}\n{err.decode()}")
        for process in processes:  # both start their dispatchers at the same moment
            assert process.stdin is not None
            process.stdin.write(b"go\n")
            await process.stdin.drain()
            process.stdin.close()
            await process.stdin.wait_closed()
        await server.wait_for_messages(mails, timeout=within)
        outputs: list[list[str]] = []
        for process in processes:
            async with asyncio.timeout(within):
                out, err = await process.communicate()
            assert process.returncode == 0, err.decode()
            outputs.append(json.loads(out.decode().splitlines()[-1]))
        return outputs
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.communicate()


def dispatcher_process(database_url: str, config: str) -> None:
    """One dispatcher process (see the module docstring)."""
    engine = create_async_engine(database_url)
    app = Quart("dispatcher")
    app.config.update(json.loads(config))
    mail = Mail(app)
    outbox = mail.init_outbox(app, engine)
    sent: list[str] = []

    def on_sent(app: Quart, message: Message, **_: object) -> None:
        sent.append(message.msg_id)

    email_dispatched.connect(on_sent, weak=False)
    print("ready", flush=True)
    sys.stdin.readline()
    asyncio.run(dispatch_until_done(app, outbox, engine))
    print(json.dumps(sent), flush=True)


async def dispatch_until_done(app: Quart, outbox: Outbox, engine: AsyncEngine) -> None:
    await app.startup()
    try:
        async with asyncio.timeout(WITHIN):
            while True:
                counts = (await outbox.status()).counts
                if not counts.get("queued") and not counts.get("sending"):
                    break
                await asyncio.sleep(0.05)
    finally:
        await app.shutdown()
        await engine.dispose()


# --- 3. the outbox CLI --------------------------------------------------------------------


async def run_outbox_cli(database_url: str, *args: str) -> tuple[int, str, str]:
    """``quart --app "quartmail.app:create_app('testing')" outbox *args``, awaited."""
    process = await asyncio.create_subprocess_exec(
        str(BIN / "quart"),
        "--app",
        "quartmail.app:create_app('testing')",
        "outbox",
        *args,
        cwd=REPO,
        env=clean_environment(DATABASE_URL=database_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(WITHIN):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def status_counts(out: str) -> dict[str, int]:
    counts = dict(re.findall(r"^(queued|sending|sent|failed) +(\d+)$", out, re.MULTILINE))
    return {state: int(count) for state, count in counts.items()}


async def test_outbox_cli_status_retry_and_purge(database: tuple[str, AsyncEngine]) -> None:
    url, engine = database
    now = datetime.now(UTC)
    async with engine.begin() as connection:
        await connection.run_sync(OutboxBase.metadata.create_all)

    def row(n: int, state: str, age: timedelta, sent: timedelta | None = None) -> OutboxMessage:
        return OutboxMessage(
            message_id=f"<cli-{n}@example.com>",
            sender="sender@example.com",
            recipients=[ADMIN],
            data=f"Subject: cli {n}\r\nMessage-ID: <cli-{n}@example.com>\r\n\r\nbody\r\n".encode(),
            mail_options=[],
            rcpt_options=[],
            state=state,
            attempts=3 if state == "failed" else 0,
            # Not due for an hour: nothing would send the queued one even if it could.
            next_attempt_at=now + timedelta(hours=1),
            last_error="550 5.1.1 Mailbox unavailable" if state == "failed" else None,
            created_at=now - age,
            sent_at=None if sent is None else now - sent,
        )

    async with AsyncSession(engine, expire_on_commit=False) as session:
        failed_1 = row(1, "failed", timedelta(hours=2))
        failed_2 = row(2, "failed", timedelta(hours=2))
        sent_long_ago = row(3, "sent", timedelta(days=10), sent=timedelta(days=10))
        sent_lately = row(4, "sent", timedelta(hours=1), sent=timedelta(hours=1))
        queued = row(5, "queued", timedelta(hours=1))
        session.add_all([failed_1, failed_2, sent_long_ago, sent_lately, queued])
        await session.commit()

    async def states() -> dict[int, tuple[str, int]]:
        return {r.id: (r.state, r.attempts) for r in await outbox_rows(engine)}

    (code, out, err), usage = await asyncio.gather(
        run_outbox_cli(url, "status"),
        run_outbox_cli(url, "retry"),  # (touches nothing: it may run meanwhile)
    )
    assert code == 0, err
    assert status_counts(out) == {"queued": 1, "sending": 0, "sent": 2, "failed": 2}
    age = re.search(r"^oldest queued: (\d+) s ago$", out, re.MULTILINE)
    assert age is not None, out
    assert 3600 <= int(age[1]) <= 3600 + WITHIN
    code, out, err = usage
    assert code != 0
    assert "Usage:" in err and "give message IDs, or --failed" in err
    assert out == ""

    # Only failed messages are queued again, by ID...
    ids = [failed_1.id, sent_lately.id, queued.id]
    code, out, err = await run_outbox_cli(url, "retry", *map(str, ids))
    assert (code, out.strip()) == (0, "1 message(s) queued again"), err
    assert await states() == {
        failed_1.id: ("queued", 0),
        failed_2.id: ("failed", 3),
        sent_long_ago.id: ("sent", 0),
        sent_lately.id: ("sent", 0),
        queued.id: ("queued", 0),
    }
    # ... or all of them.
    code, out, err = await run_outbox_cli(url, "retry", "--failed")
    assert (code, out.strip()) == (0, "1 message(s) queued again"), err
    assert (await states())[failed_2.id] == ("queued", 0)

    code, out, err = await run_outbox_cli(url, "purge", "--sent-before", "7")
    assert (code, out.strip()) == (0, "1 sent message(s) deleted"), err
    assert await states() == {
        failed_1.id: ("queued", 0),
        failed_2.id: ("queued", 0),
        sent_lately.id: ("sent", 0),
        queued.id: ("queued", 0),
    }


if __name__ == "__main__":
    dispatcher_process(*sys.argv[1:])
