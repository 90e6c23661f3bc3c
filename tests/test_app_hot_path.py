"""What the sign-up request spends per call, kept low: no thread hop for a template's context,
no rollback after a commit on SQLite; and what these cuts must not change. Real SQLite,
the real app, a real SMTP test server.
"""

from __future__ import annotations

import inspect
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from quartmail.app import create_app
from quartmail.app.config import ENVIRONMENT_KEYS
from quartmail.app.db import Database
from quartmail.testing import SMTPTestServer


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting from the real environment leaks into an app."""
    for key in ENVIRONMENT_KEYS:
        monkeypatch.delenv(key, raising=False)


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


async def count_driver_calls(database: Database) -> Counter[str]:
    """How often the engine's one pooled aiosqlite connection commits and rolls back from
    now on (each call is a trip to aiosqlite's thread; the calls go through unchanged)."""
    calls: Counter[str] = Counter()
    async with database.engine.connect() as connection:
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        for name in ("commit", "rollback"):
            method = getattr(driver, name)

            def counted(method: Any = method, name: str = name) -> Any:
                calls[name] += 1
                return method()

            setattr(driver, name, counted)
    return calls


async def test_a_committed_sign_up_costs_no_rollback_and_is_kept(
    smtp_server: SMTPTestServer, tmp_path: Path
) -> None:
    app = create_app(
        "testing",
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'app.db'}",
        FLASKY_ADMIN="admin@example.com",
        **smtp_server.mail_config(),
    )
    async with app.test_app():
        calls = await count_driver_calls(Database.of(app))
        client = app.test_client()
        response = await client.post("/api/users", json={"name": "Ada"})
        assert response.status_code == 201
        await smtp_server.wait_for_messages(1)

        # The sign-up's one commit, and no rollback after it (the pool default), nor
        # after the read of the suppression list before the admin's mail (one trip).
        assert calls == {"commit": 1}
        again = await client.post("/api/users", json={"name": "Ada"})
        assert again.status_code == 200  # known: it was stored
        assert (await again.get_json())["id"] == (await response.get_json())["id"]


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
