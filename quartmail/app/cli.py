"""Command-line tools: ``quart --app "quartmail.app:create_app()" COMMAND``.

Quart's commands get no app context and must not nest event loops (see
DEPENDENCIES.md), so each command runs one ``asyncio.run`` through the app's
own start-up and shutdown: the tables, the mail pool and, in development,
the development SMTP server are there as when the app serves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import click
from alembic.util import CommandError as AlembicError
from quart import Quart
from sqlalchemy.ext.asyncio import AsyncEngine

from quartmail import MailError, Message, SchemaError
from quartmail.outbox import OutboxTable
from quartmail.suppression import REASONS, Reason, SuppressionList

from . import migrations
from .db import Database
from .extensions import mail

__all__ = ["register_commands"]


def register_commands(app: Quart) -> None:
    @app.cli.command("send-test-mail")
    @click.argument("address")
    def send_test_mail(address: str) -> None:
        """Send a test mail to ADDRESS through the configured SMTP server."""
        asyncio.run(_serving(app, lambda: _send_test_mail(app, address)))

    @app.cli.group("db")
    def db() -> None:
        """Migrate the database schema (Alembic: the app's and quartmail's revisions)."""

    @db.command("upgrade")
    @click.argument("revision", default="heads")
    def db_upgrade(revision: str) -> None:
        """Upgrade the schema to REVISION (default: heads, what this code needs)."""
        asyncio.run(_with_engine(app, lambda engine: _upgrade(engine, revision)))

    @db.command("downgrade")
    @click.argument("revision")
    def db_downgrade(revision: str) -> None:
        """Downgrade the schema to REVISION: quartmail@-1, signup@base, base (all)."""
        asyncio.run(_with_engine(app, lambda engine: _downgrade(engine, revision)))

    @db.command("current")
    def db_current() -> None:
        """Show the revisions the database is at, and whether it is up to date."""
        asyncio.run(_with_engine(app, _current))

    @app.cli.command("create-db")
    def create_db() -> None:
        """Make or upgrade the database schema (the same as `db upgrade`)."""
        asyncio.run(_with_engine(app, lambda engine: _upgrade(engine, "heads")))

    @app.cli.group("outbox")
    def outbox() -> None:
        """Look after the mail outbox (MAIL_OUTBOX)."""

    @outbox.command("status")
    def outbox_status() -> None:
        """Count the messages by state; show the oldest queued one's age."""
        asyncio.run(_with_outbox(app, _status))

    @outbox.command("retry")
    @click.argument("ids", nargs=-1, type=int)
    @click.option("--failed", is_flag=True, help="Queue every failed message again.")
    def outbox_retry(ids: tuple[int, ...], failed: bool) -> None:
        """Queue failed messages (by ID, or all with --failed) to be sent again."""
        if not ids and not failed:
            raise click.UsageError("give message IDs, or --failed for all failed messages")
        asyncio.run(_with_outbox(app, lambda outbox: _retry(outbox, ids, failed)))

    @outbox.command("purge")
    @click.option(
        "--sent-before",
        "days",
        type=click.FloatRange(min=0),
        required=True,
        help="Delete messages sent more than DAYS days ago.",
    )
    def outbox_purge(days: float) -> None:
        """Delete sent messages older than --sent-before DAYS."""
        asyncio.run(_with_outbox(app, lambda outbox: _purge(outbox, days)))

    @outbox.group("suppression")
    def suppression() -> None:
        """The addresses no mail is sent to (bounced, unsubscribed, added by hand)."""

    @suppression.command("list")
    @click.option("--reason", type=click.Choice(REASONS), help="Only those with this reason.")
    def suppression_list(reason: Reason | None) -> None:
        """List the suppressed addresses, oldest first."""
        asyncio.run(_with_suppression(app, lambda table: _list_suppressed(table, reason)))

    @suppression.command("add")
    @click.argument("addresses", nargs=-1, required=True)
    @click.option(
        "--reason",
        type=click.Choice(REASONS),
        default="manual",
        show_default=True,
        help="Why (manual and bounce also stop transactional mail).",
    )
    def suppression_add(addresses: tuple[str, ...], reason: Reason) -> None:
        """Stop sending to ADDRESSES."""
        asyncio.run(_with_suppression(app, lambda table: _add(table, addresses, reason)))

    @suppression.command("remove")
    @click.argument("addresses", nargs=-1, required=True)
    def suppression_remove(addresses: tuple[str, ...]) -> None:
        """Send to ADDRESSES again."""
        asyncio.run(_with_suppression(app, lambda table: _remove(table, addresses)))


async def _serving(app: Quart, command: Callable[[], Awaitable[None]]) -> None:
    await app.startup()
    try:
        async with app.app_context():
            await command()
    finally:
        await app.shutdown()


async def _send_test_mail(app: Quart, address: str) -> None:
    settings = mail.state.settings.smtp
    where = f"{settings.hostname}:{settings.port}"
    if "mail_dev_inbox" in app.extensions:
        where += " (the development server: no MAIL_SERVER is set, so it goes nowhere)"
    message = Message(
        "quartmail test mail",
        sender=app.config["FLASKY_MAIL_SENDER"],
        recipients=[address],
        body="This is a test mail from the quartmail sign-up app.",
    )
    try:
        result = await mail.send(message)
    except MailError as error:
        raise click.ClickException(f"Not sent via {where}: {error}") from error
    click.echo(f"Sent {result.message_id} to {address} via {where}")
    for refused, (code, text) in result.refused.items():
        click.echo(f"Refused: {refused}: {code} {text}")


async def _with_outbox(app: Quart, command: Callable[[OutboxTable], Awaitable[None]]) -> None:
    # No lifespan here: the app's dispatcher must not start sending from a
    # command that only looks at the table.
    database = Database.of(app)
    table = OutboxTable(database.engine)
    try:
        # A table behind the code is refused (SchemaError), as at start-up.
        await table.create_table()
        await command(table)
    except SchemaError as error:
        raise click.ClickException(str(error)) from error
    finally:
        await database.engine.dispose()


async def _with_suppression(
    app: Quart, command: Callable[[SuppressionList], Awaitable[None]]
) -> None:
    database = Database.of(app)  # no lifespan, as for the outbox's commands
    table = SuppressionList(database.engine)
    try:
        await table.create_table()
        await command(table)
    except MailError as error:  # an address that is not one
        raise click.ClickException(str(error)) from None
    finally:
        await database.engine.dispose()


async def _list_suppressed(table: SuppressionList, reason: Reason | None) -> None:
    entries = await table.entries(reason)
    for entry in entries:
        when = entry.created_at.isoformat(timespec="seconds")
        click.echo(f"{entry.address}\t{entry.reason}\t{when}\t{entry.source}")
    click.echo(f"{len(entries)} suppressed address(es)", err=True)


async def _add(table: SuppressionList, addresses: tuple[str, ...], reason: Reason) -> None:
    for address in addresses:
        added = await table.add(address, reason, "cli")
        click.echo(f"{address}: {'added' if added else 'already suppressed'}")


async def _remove(table: SuppressionList, addresses: tuple[str, ...]) -> None:
    missing = 0
    for address in addresses:
        removed = await table.remove(address)
        missing += not removed
        click.echo(f"{address}: {'removed' if removed else 'not suppressed'}")
    if missing:
        raise click.ClickException(f"{missing} address(es) were not on the list")


async def _status(outbox: OutboxTable) -> None:
    status = await outbox.status()
    for state in ("queued", "sending", "sent", "failed"):
        click.echo(f"{state:8} {status.counts.get(state, 0)}")
    if status.oldest_queued_age is not None:
        click.echo(f"oldest queued: {status.oldest_queued_age:.0f} s ago")


async def _retry(outbox: OutboxTable, ids: tuple[int, ...], failed: bool) -> None:
    count = await outbox.retry(ids, failed=failed)
    click.echo(f"{count} message(s) queued again")


async def _purge(outbox: OutboxTable, days: float) -> None:
    count = await outbox.purge(datetime.now(UTC) - timedelta(days=days))
    click.echo(f"{count} sent message(s) deleted")


async def _with_engine(app: Quart, command: Callable[[AsyncEngine], Awaitable[None]]) -> None:
    # No lifespan: start-up would refuse a database that is behind.
    database = Database.of(app)
    click.echo(repr(database))
    try:
        await command(database.engine)
    except (SchemaError, AlembicError) as error:
        raise click.ClickException(str(error)) from error
    finally:
        await database.engine.dispose()


async def _upgrade(engine: AsyncEngine, revision: str) -> None:
    _echo_revisions(await migrations.upgrade(engine, revision))


async def _downgrade(engine: AsyncEngine, revision: str) -> None:
    _echo_revisions(await migrations.downgrade(engine, revision))


async def _current(engine: AsyncEngine) -> None:
    at = await migrations.current(engine)
    _echo_revisions(at)
    if at != migrations.heads():
        click.echo(f"behind the code: run `{migrations.UPGRADE_COMMAND}`")


def _echo_revisions(at: set[str]) -> None:
    heads = migrations.heads()
    for revision in sorted(at):
        click.echo(f"{revision} (head)" if revision in heads else revision)
    if not at:
        click.echo("no revision (an empty database)")
