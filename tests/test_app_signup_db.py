"""The sign-up's database work, as cheap as it is (one INSERT ... ON CONFLICT DO NOTHING
RETURNING per sign-up, the limits' statements folded, one trip to aiosqlite's thread per
statement) and what that must not change: two sign-ups of one name at once store one user and
send one mail, a known name changes and counts nothing, a template error rolls the sign-up
back, old limit rows are pruned. Real SQLite files and PostgreSQL, the real app, a real SMTP
test server.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from jinja2 import ChoiceLoader, DictLoader
from quart import Quart, Response
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from quartmail.app import create_app
from quartmail.app.db import LAST, Database
from quartmail.app.limits import WINDOW, Limit, LimitReachedError, take
from quartmail.app.models import LimitEvent, User
from quartmail.app.sqlite import OneTripConnection, connect
from quartmail.testing import SMTPTestServer

ADMIN = "admin@example.com"
CONFIRM_SUBJECT = "[Flasky] Confirm Your Address"
WITHIN = 30.0  # seconds: the bound on every wait for mail


pytestmark = pytest.mark.usefixtures("no_app_settings")


def make_app(server: SMTPTestServer, database_url: str, **overrides: Any) -> Quart:
    return create_app(
        "testing",
        DATABASE_URL=database_url,
        FLASKY_ADMIN=ADMIN,
        **server.mail_config(),
        **overrides,
    )


async def sign_up(
    client: Any, name: str, email: str | None = None, client_ip: str = "192.0.2.1"
) -> Response:
    body = {"name": name} if email is None else {"name": name, "email": email}
    response: Response = await client.post(
        "/api/users", json=body, scope_base={"client": (client_ip, 40000)}
    )
    return response


async def stored(database_url: str) -> list[tuple[int, str, str | None]]:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                select(User.id, User.username, User.email).order_by(User.id)
            )
            return [(id_, name, email) for id_, name, email in rows]
    finally:
        await engine.dispose()


async def test_one_name_signed_up_at_once_in_two_processes_is_stored_once(
    smtp_server: SMTPTestServer, database_url: str
) -> None:
    # Two apps on one database, each with its own engine, as two Hypercorn workers have;
    # every request from its own client, all with the same name and address.
    first, second = make_app(smtp_server, database_url), make_app(smtp_server, database_url)
    async with first.test_app() as one, second.test_app() as two:
        clients = [one.test_client(), two.test_client()]
        responses = await asyncio.gather(
            *(sign_up(clients[n % 2], "Ada", "ada@example.com", f"192.0.2.{n}") for n in range(10))
        )
        assert sorted(response.status_code for response in responses) == [200] * 9 + [201]
        ids = {(await response.get_json())["id"] for response in responses}
        [user_id] = ids
        assert await stored(database_url) == [(user_id, "Ada", "ada@example.com")]

        # The nine that found the name taken counted nothing against the address's
        # limit (3 confirmation mails an hour): two more sign-ups reach it.
        assert (await sign_up(clients[0], "Bob", "ada@example.com")).status_code == 201
        assert (await sign_up(clients[1], "Cy", "ada@example.com")).status_code == 201
        assert (await sign_up(clients[0], "Di", "ada@example.com")).status_code == 429
    # The shutdown drained the mail: one notice and one confirmation per new user.
    subjects = sorted(str(message.subject) for message in smtp_server.messages)
    assert subjects == [CONFIRM_SUBJECT] * 3 + ["[Flasky] New User"] * 3


# The notice is rendered before the transaction, the confirmation (its link names the new
# id) in it; with the outbox the mails are committed with the user.
@pytest.mark.parametrize("template", ["mail/new_user.txt", "mail/confirm.txt"])
@pytest.mark.parametrize("outbox", [False, True], ids=["background", "outbox"])
async def test_a_template_error_rolls_the_sign_up_back(
    smtp_server: SMTPTestServer, database_url: str, template: str, outbox: bool
) -> None:
    app = make_app(smtp_server, database_url, MAIL_OUTBOX=outbox, MAIL_OUTBOX_POLL=0.05)
    working = app.jinja_env.loader
    assert working is not None
    # The template misspells a variable: StrictUndefined makes that an error.
    app.jinja_env.loader = ChoiceLoader([DictLoader({template: "{{ name.nickname }}"}), working])
    async with app.test_app() as test_app:
        client = test_app.test_client()
        response = await sign_up(client, "Ada", "ada@example.com")
        assert response.status_code == 500
        assert "UndefinedError" in await response.get_data(as_text=True)
        assert await stored(database_url) == []

        app.jinja_env.loader = working
        # Nothing was counted either: the address's three mails an hour are all there.
        for name in ("Ada", "Bob", "Cy"):
            assert (await sign_up(client, name, "ada@example.com")).status_code == 201
        assert (await sign_up(client, "Di", "ada@example.com")).status_code == 429
        await smtp_server.wait_for_messages(6, timeout=WITHIN)
    assert [name for _, name, _ in await stored(database_url)] == ["Ada", "Bob", "Cy"]
    assert len(smtp_server.messages) == 6  # nothing of the failed sign-up


async def test_limit_rows_past_the_window_are_pruned_in_batches(database_url: str) -> None:
    app = create_app("testing", DATABASE_URL=database_url)
    async with app.test_app():
        engine = Database.of(app).engine

        async def take_at(now: float, client: str = "192.0.2.1") -> None:
            async with engine.begin() as connection:
                await take(connection, [Limit("client", client, 2)], now=now)

        async def rows() -> int:
            async with engine.connect() as connection:
                count = await connection.scalar(select(func.count()).select_from(LimitEvent))
                assert count is not None
                return count

        start = float(int(time.time()))
        await take_at(start)
        await take_at(start + 10)
        # Past the window, but not long enough past it to be worth a DELETE of its own.
        await take_at(start + WINDOW + 20)
        await take_at(start + WINDOW + 25)
        assert await rows() == 4
        with pytest.raises(LimitReachedError):
            await take_at(start + WINDOW + 26)  # the two before count, the old ones do not
        assert await rows() == 4
        # A minute on, the rows older than the window go, and only they.
        await take_at(start + WINDOW + 80, "192.0.2.2")
        assert await rows() == 3


# --- the SQLite connection ------------------------------------------------------------


async def test_one_trip_connection_answers_as_sqlite3_does(tmp_path: Path) -> None:
    async with connect(str(tmp_path / "one.db")) as connection:
        trips: list[str] = []
        in_thread: Any = connection._execute

        async def counted(function: Any, *args: Any, **kwargs: Any) -> Any:
            trips.append(getattr(function, "__name__", ""))
            return await in_thread(function, *args, **kwargs)

        setattr(connection, "_execute", counted)  # noqa: B010 (a method of this one object)
        cursor = await connection.cursor()
        await cursor.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, name TEXT UNIQUE)")
        assert cursor.description is None
        await cursor.executemany("INSERT INTO t (name) VALUES (?)", [("a",), ("b",), ("c",)])
        assert cursor.rowcount == 3
        await cursor.execute("INSERT INTO t (name) VALUES (?)", ("d",))
        assert (cursor.lastrowid, cursor.rowcount) == (4, 1)
        assert connection.in_transaction
        await connection.commit()

        await cursor.execute("SELECT n, name FROM t ORDER BY n")
        assert [column[0] for column in cursor.description] == ["n", "name"]
        assert await cursor.fetchone() == (1, "a")
        cursor.arraysize = 2
        assert cursor.arraysize == 2
        assert await cursor.fetchmany() == [(2, "b"), (3, "c")]
        assert await cursor.fetchmany(5) == [(4, "d")]
        assert await cursor.fetchone() is None
        await cursor.execute("INSERT INTO t (name) VALUES ('e') RETURNING n")
        assert await cursor.fetchall() == [(5,)]
        assert cursor.rowcount == 1
        await connection.rollback()

        # One trip per statement; none to commit or roll back when nothing is open.
        assert trips == ["run"] * 3 + ["commit"] + ["run"] * 2 + ["rollback"]
        await connection.commit()
        await connection.rollback()
        await cursor.close()
        assert len(trips) == 7

        await cursor.execute("SELECT count(*) FROM t")
        assert await cursor.fetchall() == [(4,)]  # the RETURNING insert was rolled back
        with pytest.raises(sqlite3.IntegrityError):
            await cursor.execute("INSERT INTO t (name) VALUES ('a')")
        with pytest.raises(NotImplementedError):
            await cursor.executescript("SELECT 1;")


async def test_a_statement_marked_last_commits_in_its_own_trip(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    app = create_app("testing", DATABASE_URL=f"sqlite+aiosqlite:///{path}")
    async with app.test_app():
        engine = Database.of(app).engine
        async with engine.connect() as connection:
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            assert isinstance(driver, OneTripConnection)
            await connection.execute(insert(User), {"username": "kept"})
            assert driver.in_transaction  # an ordinary statement leaves it open
            await connection.execute(
                insert(User), {"username": "also kept"}, execution_options={LAST: True}
            )
            assert not driver.in_transaction and not driver.commit_with_next
            # A statement that fails commits nothing: what it left open is rolled back.
            await connection.execute(insert(User), {"username": "rolled back"})
            with pytest.raises(IntegrityError):
                await connection.execute(
                    insert(User), {"username": "kept"}, execution_options={LAST: True}
                )
            assert driver.in_transaction and not driver.commit_with_next
            # Closed without a commit.
    async with connect(str(path)) as connection:
        rows = await connection.execute_fetchall("SELECT username FROM users ORDER BY id")
    assert [name for (name,) in rows] == ["kept", "also kept"]


async def test_the_engine_streams_results_through_one_trip_cursors(tmp_path: Path) -> None:
    app = create_app("testing", DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    async with app.test_app():
        engine = Database.of(app).engine
        async with engine.begin() as connection:
            await connection.execute(insert(User), [{"username": f"user {n}"} for n in range(100)])
        async with engine.connect() as connection:
            # A server-side cursor (yield_per): fetched in parts from the rows kept.
            result = await connection.stream(
                select(User.username).order_by(User.id).execution_options(yield_per=30)
            )
            names = [name async for name in result.scalars()]
        assert names == [f"user {n}" for n in range(100)]
