"""Command-line tools: ``quart --app "quartmail.app:create_app()" COMMAND``.

Quart's commands get no app context and must not nest event loops (see
DEPENDENCIES.md), so each command runs one ``asyncio.run`` through the app's
own start-up and shutdown: the tables, the mail pool and, in development,
the development SMTP server are there as when the app serves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import click
from quart import Quart

from quartmail import MailError, Message

from .db import Database
from .extensions import mail

__all__ = ["register_commands"]


def register_commands(app: Quart) -> None:
    @app.cli.command("send-test-mail")
    @click.argument("address")
    def send_test_mail(address: str) -> None:
        """Send a test mail to ADDRESS through the configured SMTP server."""
        asyncio.run(_serving(app, lambda: _send_test_mail(app, address)))

    @app.cli.command("create-db")
    def create_db() -> None:
        """Create the database tables that do not exist yet."""
        asyncio.run(_serving(app, lambda: _create_db(app)))


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
    if "devmail" in app.extensions:
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


async def _create_db(app: Quart) -> None:
    database = Database.of(app)
    await database.create_tables()
    click.echo(f"Tables ready in {database!r}")
