"""The sign-up app's one-click unsubscribe and its suppression list commands.

The administrator's "New User" notice carries RFC 8058 one-click unsubscribe;
using it puts the administrator on the suppression list, and the notices
stop, with the outbox and without, on SQLite and PostgreSQL. The commands run
``quart`` in a subprocess, awaited (test_app.run_quart).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from quart import Quart
from sqlalchemy import select
from test_app import run_quart

from quartmail import MailError, Message, SuppressedError, email_failed
from quartmail.app import create_app
from quartmail.app.extensions import mail
from quartmail.outbox import OutboxMessage
from quartmail.testing import SMTPTestServer

ADMIN = "admin@example.com"


pytestmark = pytest.mark.usefixtures("no_app_settings")


def make_app(server: SMTPTestServer, database_url: str, **overrides: Any) -> Quart:
    settings: dict[str, Any] = {
        "DATABASE_URL": database_url,
        "FLASKY_ADMIN": ADMIN,
        **server.mail_config(),
        "MAIL_SUPPRESS_SEND": False,
        "MAIL_OUTBOX_POLL": 0.05,
        **overrides,
    }
    return create_app("testing", **settings)


@pytest.mark.parametrize("outbox", [False, True], ids=["background", "outbox"])
async def test_the_admin_notice_stops_after_one_click_unsubscribe(
    outbox: bool, smtp_server: SMTPTestServer, database_url: str
) -> None:
    app = make_app(smtp_server, database_url, MAIL_OUTBOX=outbox)
    suppressed: list[MailError] = []
    arrived = asyncio.Event()

    def failed(app: Quart, message: Message, error: MailError) -> None:
        if isinstance(error, SuppressedError):
            suppressed.append(error)
            arrived.set()

    email_failed.connect(failed, sender=app)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert (await client.post("/api/users", json={"name": "Ann"})).status_code == 201
        [notice] = await smtp_server.wait_for_messages(1)
        headers = notice.parsed()
        assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        link = str(headers["List-Unsubscribe"]).strip("<>")
        assert link.startswith("https://")
        path = urlsplit(link).path

        # A mail scanner following the link changes nothing.
        page = await client.get(path)
        assert page.status_code == 200
        assert ADMIN in await page.get_data(as_text=True)
        async with app.app_context():
            assert await mail.suppression.entries() == []

        for _ in range(2):  # a second click is answered the same
            response = await client.post(path, form={"List-Unsubscribe": "One-Click"})
            assert response.status_code == 200
            assert "set-cookie" not in response.headers
        async with app.app_context():
            [entry] = await mail.suppression.entries()
        assert (entry.address, entry.reason) == (ADMIN, "unsubscribe")
        assert "new-users" in entry.source

        assert (await client.post("/api/users", json={"name": "Bob"})).status_code == 201
        async with asyncio.timeout(10):
            await arrived.wait()
        assert isinstance(suppressed[0], SuppressedError)
        assert suppressed[0].suppressed == {ADMIN: "unsubscribe"}
        if outbox:
            engine = app.extensions["db"].engine
            async with engine.connect() as connection:
                states = (await connection.scalars(select(OutboxMessage.state))).all()
            assert sorted(states) == ["failed", "sent"]
    assert len(smtp_server.messages) == 1  # Bob's notice was never sent


# --- the command line ---------------------------------------------------------------------


async def test_cli_suppression_add_list_remove(tmp_path: Path) -> None:
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/app.db"}

    async def quart(*args: str) -> tuple[int, str, str]:
        return await run_quart(tmp_path, "outbox", "suppression", *args, **env)

    code, out, err = await quart("add", "Ann@Example.ORG", "bob@example.org")
    assert code == 0, err
    assert out.splitlines() == ["Ann@Example.ORG: added", "bob@example.org: added"]
    code, out, err = await quart("add", "--reason", "bounce", "ann@EXAMPLE.org", "ann@example.org")
    assert code == 0, err
    # The domain's case does not matter; the local part's does.
    assert out.splitlines() == ["ann@EXAMPLE.org: added", "ann@example.org: already suppressed"]

    code, out, err = await quart("list")
    assert code == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    assert [(row[0], row[1], row[3]) for row in rows] == [
        ("Ann@example.org", "manual", "cli"),
        ("bob@example.org", "manual", "cli"),
        ("ann@example.org", "bounce", "cli"),
    ]
    assert "3 suppressed" in err
    code, out, err = await quart("list", "--reason", "bounce")
    assert [line.split("\t")[0] for line in out.splitlines()] == ["ann@example.org"]

    code, out, err = await quart("remove", "bob@EXAMPLE.org", "nobody@example.org")
    assert code != 0
    assert "bob@EXAMPLE.org: removed" in out and "nobody@example.org: not suppressed" in out
    assert "1 address(es) were not on the list" in err
    code, out, err = await quart("add", "not an address")
    assert code != 0 and "valid address" in err and "Traceback" not in err
    code, out, err = await quart("list")
    assert [line.split("\t")[0] for line in out.splitlines()] == [
        "Ann@example.org",
        "ann@example.org",
    ]
