"""What the sign-up request spends per call, kept low: no thread hop for a template's context,
one trip to aiosqlite's thread per statement and none to commit or roll back nothing; and what
these cuts must not change. Real SQLite,
the real app, a real SMTP test server.
"""

from __future__ import annotations

import inspect
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from sqlalchemy import text

from quartmail.app import create_app
from quartmail.app.db import Database
from quartmail.app.sqlite import connect
from quartmail.testing import SMTPTestServer

pytestmark = pytest.mark.usefixtures("no_app_settings")


async def test_rendering_a_template_runs_no_sync_context_processor(
    smtp_server: SMTPTestServer, tmp_path: Path
) -> None:
    """Quart runs a sync context processor in a thread on every render; the app has none
    (Flask's, which each blueprint carries, is dropped), and its pages still see
    ``request`` and the session (the form's CSRF token)."""
    app = create_app(
        "testing",
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'app.db'}",
        **smtp_server.mail_config(),
    )
    processors = [p for group in app.template_context_processors.values() for p in group]
    assert processors, "Quart's own processor (g, request, session) stays"
    assert all(inspect.iscoroutinefunction(p) for p in processors), processors

    async with app.test_app():
        page = await app.test_client().get("/")
    assert page.status_code == 200
    assert 'name="csrf_token"' in await page.get_data(as_text=True)


async def count_trips(database: Database) -> list[str]:
    """The names of the calls the engine's one pooled aiosqlite connection runs in its
    thread from now on: each is a trip there and back (they go through unchanged)."""
    trips: list[str] = []
    async with database.engine.connect() as connection:
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        in_thread = driver._execute

        async def counted(function: Any, *args: Any, **kwargs: Any) -> Any:
            trips.append(getattr(function, "__name__", repr(function)))
            return await in_thread(function, *args, **kwargs)

        driver._execute = counted
    trips.clear()  # the checkout's own reset
    return trips


def signup_app(smtp_server: SMTPTestServer, tmp_path: Path) -> Quart:
    """The testing app on an SQLite file in *tmp_path*, mailing the administrator."""
    return create_app(
        "testing",
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'app.db'}",
        FLASKY_ADMIN="admin@example.com",
        **smtp_server.mail_config(),
    )


async def test_a_sign_up_costs_one_trip_to_the_database_and_is_kept(
    smtp_server: SMTPTestServer, tmp_path: Path
) -> None:
    app = signup_app(smtp_server, tmp_path)
    async with app.test_app():
        trips = await count_trips(Database.of(app))
        client = app.test_client()
        response = await client.post("/api/users", json={"name": "Ada"})
        assert response.status_code == 201
        await smtp_server.wait_for_messages(1)

        # The sign-up's one statement (INSERT ... RETURNING) with its commit, in one
        # trip (it is the transaction's last); the read of the suppression list before
        # the admin's mail is sent is a second (the library reads it on aiosqlite's own
        # execute_fetchall), and nothing else: no cursor opened or closed on its own, no
        # rollback after a commit (the pool default) or after a read (sqlite3 opened no
        # transaction for it).
        assert Counter(trips) == {"run": 1, "_execute_fetchall": 1}
        trips.clear()
        again = await client.post("/api/users", json={"name": "Ada"})
        assert again.status_code == 200  # known: it was stored
        assert (await again.get_json())["id"] == (await response.get_json())["id"]
        # The insert that found the name taken (and committed nothing), the read of the
        # user; nothing left to roll back.
        assert Counter(trips) == {"run": 2}
    assert [message.subject for message in smtp_server.messages] == ["[Flasky] New User"]
    assert await stored_names(tmp_path / "app.db") == ["Ada"]


async def stored_names(path: Path) -> list[str]:
    """The names in the database file at *path*, read by a connection of its own."""
    async with connect(str(path)) as connection:
        rows = await connection.execute_fetchall("SELECT username FROM users ORDER BY id")
    return [name for (name,) in rows]


async def test_a_sign_up_with_an_address_commits_once_after_its_mail_is_rendered(
    smtp_server: SMTPTestServer, tmp_path: Path
) -> None:
    """The confirmation names the new id, so it is rendered inside the transaction, which
    commits after it in a trip of its own; the address's limits count in it."""
    app = signup_app(smtp_server, tmp_path)
    async with app.test_app():
        trips = await count_trips(Database.of(app))
        response = await app.test_client().post(
            "/api/users", json={"name": "Ada", "email": "ada@example.com"}
        )
        assert response.status_code == 201
        await smtp_server.wait_for_messages(2)
        # The limits' insert and count, the user's insert, the commit; two reads of the
        # suppression list (one per mail, or one for both: the batch gathers what waits).
        assert Counter(name for name in trips if name != "_execute_fetchall") == {
            "run": 3,
            "commit": 1,
        }
    assert await stored_names(tmp_path / "app.db") == ["Ada"]


async def test_a_transaction_left_open_is_rolled_back_when_given_back(tmp_path: Path) -> None:
    """Work SQLAlchemy did not begin (run on the driver's connection) is never committed
    by the next user of the pooled connection."""
    app = create_app("testing", DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    async with app.test_app():
        engine = Database.of(app).engine
        async with engine.connect() as connection:
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            await driver.execute("INSERT INTO users (username) VALUES ('left open')")
            assert driver.in_transaction

        async with engine.begin() as connection:
            await connection.execute(text("INSERT INTO users (username) VALUES ('committed')"))
        async with engine.connect() as connection:
            names = (await connection.execute(text("SELECT username FROM users"))).scalars()
            assert list(names) == ["committed"]
