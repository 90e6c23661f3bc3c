"""``send_email``: the Flasky e-mail chapter's helper, async."""

from __future__ import annotations

import asyncio
from typing import Any

from quart import current_app, render_template

from quartmail import Message, SendResult

from .extensions import mail

__all__ = ["render_email", "send_email"]


async def render_email(to: str, subject: str, template: str, **kwargs: Any) -> Message:
    """Build the message ``send_email`` sends: ``template + '.txt'`` and
    ``template + '.html'`` rendered with *kwargs* (the HTML autoescaped), the
    subject prefixed with ``FLASKY_MAIL_SUBJECT_PREFIX``, from ``FLASKY_MAIL_SENDER``.

    Rendering happens here, in the request, so a template error fails the
    request instead of vanishing in a background task.
    """
    config = current_app.config
    return Message(
        config["FLASKY_MAIL_SUBJECT_PREFIX"] + subject,
        sender=config["FLASKY_MAIL_SENDER"],
        recipients=[to],
        body=await render_template(template + ".txt", **kwargs),
        html=await render_template(template + ".html", **kwargs),
    )


async def send_email(
    to: str, subject: str, template: str, **kwargs: Any
) -> asyncio.Future[SendResult]:
    """Render the message and queue it for background delivery; the response
    never waits on SMTP. Returns the delivery future (awaiting it is optional)."""
    message = await render_email(to, subject, template, **kwargs)
    return mail.send_background(message)
