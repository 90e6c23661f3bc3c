"""Migrations: quartmail's Alembic branch and the sign-up app's, on SQLite and PostgreSQL.

Every test starts from an empty real database (an SQLite file, or the test PostgreSQL
with quartmail's, the app's and Alembic's tables dropped) and checks the schema that
the migrations leave against the models, the rows they keep, and what start-up says.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from quart import Quart
from quart.testing.app import LifespanError
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    select,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from quartmail import Mail
from quartmail import migrations as library
from quartmail.app import create_app, migrations
from quartmail.app.models import Base as AppBase
from quartmail.outbox import OutboxBase, OutboxMessage
from quartmail.testing import SMTPTestServer

from conftest import REPO_ROOT, SENDER, clean_environment

# quartmail's newest revision: the head of its branch, beside the app's.
LIBRARY_HEAD = library.RATE_LIMIT
APP_HEAD = "app0002"
HEADS = {APP_HEAD, LIBRARY_HEAD}


def differences(connection: Connection) -> list[Any]:
    """What autogenerate would change to make the database match the models."""
    return list(compare_metadata(MigrationContext.configure(connection), _models()))


def _models() -> MetaData:
    models = MetaData()
    for metadata in (AppBase.metadata, OutboxBase.metadata):
        for table in metadata.tables.values():
            table.to_metadata(models)
    return models


def columns(connection: Connection, table: str) -> set[str]:
    return {column["name"] for column in inspect(connection).get_columns(table)}


def tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


# mail_outbox as quartmail made it (create_all) before claimed_by: what an existing
# deployment has, with no alembic_version table.
_OLD = MetaData()
Table(
    "mail_outbox",
    _OLD,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("message_id", String(998), nullable=False, index=True),
    Column("sender", Text, nullable=False),
    Column("recipients", JSON, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("mail_options", JSON, nullable=False),
    Column("rcpt_options", JSON, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("lease_until", DateTime(timezone=True)),
    Column("last_error_code", Integer),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
)


async def make_old_schema(engine: AsyncEngine, message_id: str) -> None:
    """The old mail_outbox and the app's users table, one message queued in it."""
    now = datetime.now(UTC)
    data = (
        f"From: {SENDER}\r\nTo: admin@example.com\r\nSubject: queued before the upgrade\r\n"
        f"Message-ID: {message_id}\r\n\r\nkept\r\n"
    ).encode()
    async with engine.begin() as connection:
        await connection.run_sync(_OLD.create_all)
        await connection.run_sync(AppBase.metadata.create_all)
        await connection.execute(
            _OLD.tables["mail_outbox"].insert(),
            {
                "message_id": message_id,
                "sender": "sender@example.com",
                "recipients": ["admin@example.com"],
                "data": data,
                "mail_options": [],
                "rcpt_options": [],
                "state": "queued",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            },
        )


async def refusal(app: Quart) -> str:
    """What *app* says when it refuses to start (Quart's test app raises LifespanError)."""
    with pytest.raises(LifespanError) as caught:
        async with app.test_app():
            pass
    if "db" in app.extensions:  # (the app's shutdown, which disposes it, never ran)
        await app.extensions["db"].engine.dispose()
    return str(caught.value)


def outbox_app(engine: AsyncEngine, server: SMTPTestServer) -> Quart:
    app = Quart(__name__)
    app.config.update(server.mail_config(), MAIL_DEFAULT_SENDER=SENDER, MAIL_OUTBOX_POLL=0.05)
    Mail(app).init_outbox(app, engine)
    return app


async def test_upgrade_from_empty_makes_the_schema_of_the_models(engine: AsyncEngine) -> None:
    assert await migrations.upgrade(engine) == migrations.heads() == HEADS
    async with engine.connect() as connection:
        assert await connection.run_sync(differences) == []


async def test_upgrade_from_the_schema_before_claimed_by_keeps_and_sends_a_queued_row(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    await make_old_schema(engine, "<old@example.com>")
    app = outbox_app(engine, smtp_server)
    assert re.search(r"mail_outbox\.claimed_by is missing.*upgrade heads", await refusal(app))

    # Adopted: stamped with the revisions its tables match, then upgraded.
    assert await migrations.upgrade(engine) == HEADS
    async with engine.connect() as connection:
        assert "claimed_by" in await connection.run_sync(columns, "mail_outbox")
    app = outbox_app(engine, smtp_server)
    async with app.test_app():
        [received] = await smtp_server.wait_for_messages(1, timeout=10)
    assert received.parsed()["Message-ID"] == "<old@example.com>"
    async with engine.connect() as connection:
        state = await connection.scalar(select(OutboxMessage.state))
    assert state == "sent"


async def test_downgrade_and_upgrade_again(engine: AsyncEngine) -> None:
    await migrations.upgrade(engine)
    assert await migrations.downgrade(engine, f"{library.BRANCH}@-1") == {
        APP_HEAD,
        library.SUPPRESSION,
    }
    async with engine.connect() as connection:
        assert "mail_rate_limit" not in await connection.run_sync(tables)
    assert await migrations.downgrade(engine, f"{library.BRANCH}@-1") == {APP_HEAD, "qm0002"}
    async with engine.connect() as connection:
        assert "transactional" not in await connection.run_sync(columns, "mail_outbox")
        assert "mail_suppression" not in await connection.run_sync(tables)
    assert await migrations.downgrade(engine, f"{library.BRANCH}@{library.BASELINE}") == {
        APP_HEAD,
        library.BASELINE,
    }
    async with engine.connect() as connection:
        assert "claimed_by" not in await connection.run_sync(columns, "mail_outbox")
    assert await migrations.downgrade(engine, "base") == set()
    async with engine.connect() as connection:
        assert await connection.run_sync(tables) == {"alembic_version"}
    assert await migrations.upgrade(engine) == HEADS
    async with engine.connect() as connection:
        assert {"users", "mail_outbox"} <= await connection.run_sync(tables)
        assert "claimed_by" in await connection.run_sync(columns, "mail_outbox")


async def test_start_up_upgrades_an_empty_database(engine: AsyncEngine, database_url: str) -> None:
    app = create_app("testing", DATABASE_URL=database_url, MAIL_OUTBOX=True)
    async with app.test_app() as test_app:
        response = await test_app.test_client().post("/api/users", json={"name": "Alice"})
        assert response.status_code == 201
    assert await migrations.current(engine) == HEADS


async def test_start_up_refuses_a_database_behind_and_names_the_command(
    engine: AsyncEngine, database_url: str
) -> None:
    await migrations.upgrade(engine, f"{library.BRANCH}@{library.BASELINE}")
    await migrations.upgrade(engine, "signup@head")
    app = create_app("testing", DATABASE_URL=database_url)
    said = await refusal(app)
    assert migrations.UPGRADE_COMMAND in said and "older than the code" in said
    assert await migrations.current(engine) == {APP_HEAD, library.BASELINE}  # untouched


async def test_start_up_refuses_an_unversioned_database(
    engine: AsyncEngine, database_url: str
) -> None:
    await make_old_schema(engine, "<old@example.com>")
    app = create_app("testing", DATABASE_URL=database_url)
    assert re.search(r"no migration history.*db upgrade", await refusal(app))


async def test_start_up_refuses_a_database_of_a_newer_release(
    engine: AsyncEngine, database_url: str
) -> None:
    await migrations.upgrade(engine)
    async with engine.begin() as connection:
        await connection.exec_driver_sql(
            "UPDATE alembic_version SET version_num = 'qm9999'"
            f" WHERE version_num = '{LIBRARY_HEAD}'"
        )
    app = create_app("testing", DATABASE_URL=database_url)
    assert re.search("qm9999, which this code does not know", await refusal(app))


async def test_an_outbox_in_an_alembic_database_is_not_created_behind_its_back(
    engine: AsyncEngine, smtp_server: SMTPTestServer
) -> None:
    await migrations.upgrade(engine, "signup@head")  # an app's own history, without ours
    app = outbox_app(engine, smtp_server)
    assert re.search("table mail_outbox is missing", await refusal(app))
    async with engine.connect() as connection:
        assert "mail_outbox" not in await connection.run_sync(tables)


async def run(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(60):
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.communicate()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode()


async def quart(tmp_path: Path, database_url: str, *args: str) -> tuple[int, str]:
    env = clean_environment(DATABASE_URL=database_url)
    app = '--app=quartmail.app:create_app("testing")'
    return await run(sys.executable, "-m", "quart", app, *args, env=env, cwd=tmp_path)


async def test_db_commands(tmp_path: Path, database_url: str, engine: AsyncEngine) -> None:
    code, out = await quart(tmp_path, database_url, "db", "current")
    assert code == 0, out
    assert "no revision" in out and "db upgrade" in out

    code, out = await quart(tmp_path, database_url, "db", "upgrade")
    assert code == 0, out
    assert f"{APP_HEAD} (head)" in out and f"{LIBRARY_HEAD} (head)" in out
    assert await migrations.current(engine) == HEADS

    code, out = await quart(tmp_path, database_url, "db", "downgrade", "quartmail@qm0001")
    assert code == 0, out
    code, out = await quart(tmp_path, database_url, "db", "current")
    assert code == 0, out
    assert "qm0001\n" in out and "behind the code" in out

    code, out = await quart(tmp_path, database_url, "db", "downgrade", "nowhere")
    assert code == 1
    assert "Error:" in out and "nowhere" in out and "Traceback" not in out


async def test_a_server_started_on_a_database_behind_exits_naming_the_command(
    tmp_path: Path, database_url: str, engine: AsyncEngine
) -> None:
    await migrations.upgrade(engine, f"{library.BRANCH}@{library.BASELINE}")
    env = clean_environment(DATABASE_URL=database_url)
    code, out = await run(
        sys.executable,
        "-m",
        "hypercorn",
        "-c",
        "hypercorn.toml",
        "--bind",
        "127.0.0.1:0",
        "quartmail.app:create_app()",
        env=env,
        cwd=REPO_ROOT,
    )
    assert code != 0, out
    assert migrations.UPGRADE_COMMAND in out


async def test_two_processes_upgrading_an_empty_database_take_turns(
    tmp_path: Path, database_url: str, engine: AsyncEngine
) -> None:
    script = (
        "import asyncio, sys\n"
        "from sqlalchemy.ext.asyncio import create_async_engine\n"
        "from quartmail.app.migrations import prepare\n"
        "async def main():\n"
        "    engine = create_async_engine(sys.argv[1])\n"
        "    try:\n"
        "        await prepare(engine)\n"
        "    finally:\n"
        "        await engine.dispose()\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ}
    results = await asyncio.gather(
        *(run(sys.executable, "-c", script, database_url, env=env, cwd=tmp_path) for _ in range(3))
    )
    for code, out in results:
        assert code == 0, out
    assert await migrations.current(engine) == HEADS
    async with engine.connect() as connection:
        assert {"users", "mail_outbox", "mail_suppression"} <= await connection.run_sync(tables)


USER_ENV = """
import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import async_engine_from_config

from quartmail.outbox import OutboxBase  # added for quartmail

target_metadata = [OutboxBase.metadata]  # the app's own metadata first, in a real app


def do_run_migrations(connection):
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations():
    config = context.config
    engine = async_engine_from_config(
        config.get_section(config.config_ini_section, {}), poolclass=pool.NullPool
    )
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await engine.dispose()


asyncio.run(run_async_migrations())
"""

USER_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "u0001"
down_revision = None
branch_labels = ("myapp",)
depends_on = None


def upgrade():
    op.create_table("things", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade():
    op.drop_table("things")
"""


async def test_an_apps_own_alembic_environment_includes_quartmails_branch(
    tmp_path: Path, smtp_server: SMTPTestServer
) -> None:
    # The Alembic async recipe's env.py, with the lines docs/migrations.md tells an app to add.
    (tmp_path / "alembic" / "versions").mkdir(parents=True)
    (tmp_path / "alembic" / "env.py").write_text(USER_ENV)
    (tmp_path / "alembic" / "versions" / "u0001_things.py").write_text(USER_REVISION)
    (tmp_path / "alembic.ini").write_text(
        "[alembic]\n"
        "script_location = %(here)s/alembic\n"
        "path_separator = space\n"
        "version_locations = %(here)s/alembic/versions quartmail:migrations/versions\n"
        "sqlalchemy.url = sqlite+aiosqlite:///%(here)s/app.db\n"
    )
    alembic = (sys.executable, "-m", "alembic", "-c", "alembic.ini")
    code, out = await run(*alembic, "upgrade", "heads", env={**os.environ}, cwd=tmp_path)
    assert code == 0, out
    code, out = await run(*alembic, "current", env={**os.environ}, cwd=tmp_path)
    assert code == 0, out
    assert "u0001 (head)" in out and f"{LIBRARY_HEAD} (head)" in out

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/app.db")
    try:
        async with engine.connect() as connection:
            assert {"things", "mail_outbox"} <= await connection.run_sync(tables)
        app = outbox_app(engine, smtp_server)
        async with app.test_app(), app.app_context():
            await app.extensions["mail"].send_message(
                subject="hi", recipients=["admin@example.com"], body="after alembic"
            )
    finally:
        await engine.dispose()
    assert len(smtp_server.messages) == 1


async def test_outbox_commands_refuse_a_table_behind_the_code(
    tmp_path: Path, database_url: str, engine: AsyncEngine
) -> None:
    await make_old_schema(engine, "<old@example.com>")
    code, out = await quart(tmp_path, database_url, "outbox", "status")
    assert code == 1, out
    assert "mail_outbox.claimed_by is missing" in out and "Traceback" not in out
    await migrations.upgrade(engine)
    code, out = await quart(tmp_path, database_url, "outbox", "status")
    assert code == 0, out
    assert re.search(r"^queued +1$", out, re.MULTILINE)
