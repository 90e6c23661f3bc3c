"""``send_email``: the Flasky e-mail chapter's helper, async; and the
administrator's one-click unsubscribe from the "New User" notices."""

from __future__ import annotations

import asyncio
from typing import Any

from quart import current_app

from quartmail import Message, SendResult
from quartmail.unsubscribe import UnsubscribeTokens, unsubscribe_url

from .extensions import mail
from .templating import render_templates

__all__ = ["NEW_USERS", "render_email", "send_email", "unsubscribed"]

#: The list the administrator's "New User" notices belong to.
NEW_USERS = "new-users"


async def render_email(
    to: str, subject: str, template: str, *, unsubscribe_list: str | None = None, **kwargs: Any
) -> Message:
    """Build the message ``send_email`` sends: ``template + '.txt'`` and
    ``template + '.html'`` rendered with *kwargs* (the HTML autoescaped), the
    subject prefixed with ``FLASKY_MAIL_SUBJECT_PREFIX``, from ``FLASKY_MAIL_SENDER``.

    Rendering happens here, in the request, so a template error fails the
    request instead of vanishing in a background task. The two bodies are rendered as
    ``render_template`` would, the context processors run once for both.

    With *unsubscribe_list*, the message carries a one-click unsubscribe
    (RFC 8058) from that list for *to*: see :func:`unsubscribed`.
    """
    config = current_app.config
    unsubscribe = None
    if unsubscribe_list is not None:
        tokens: UnsubscribeTokens = current_app.extensions["unsubscribe_tokens"]
        unsubscribe = unsubscribe_url(tokens, to, unsubscribe_list)
    body, html = await render_templates([template + ".txt", template + ".html"], **kwargs)
    return Message(
        config["FLASKY_MAIL_SUBJECT_PREFIX"] + subject,
        sender=config["FLASKY_MAIL_SENDER"],
        recipients=[to],
        body=body,
        html=html,
        list_unsubscribe=unsubscribe,
    )


async def send_email(
    to: str, subject: str, template: str, **kwargs: Any
) -> asyncio.Future[SendResult]:
    """Render the message and queue it for background delivery; the response
    never waits on SMTP. Returns the delivery future (awaiting it is optional)."""
    message = await render_email(to, subject, template, **kwargs)
    return mail.send_background(message)


async def unsubscribed(address: str, list_name: str) -> None:
    """The unsubscribe blueprint's callback: *address* goes on the
    suppression list (reason ``unsubscribe``), so no more mail of this app
    reaches it, except transactional mail. Adding it again changes nothing."""
    await mail.suppression.add(address, "unsubscribe", f"unsubscribed from {list_name}")
