"""The inbox's pages and JSON, served under ``MAIL_DEV_INBOX_PATH``.

Mail content is hostile: the pages render it only as escaped text (their own Jinja
environment, autoescape always on), and an HTML body is shown in an iframe with ``sandbox``
whose own response forbids scripts and every remote load (Content-Security-Policy, itself
with ``sandbox``, so the body stays inert even when opened on its own). Attachments and the
source are downloads or plain text, never sniffed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import jinja2
from quart import Blueprint, Response, abort, current_app, url_for
from quart.typing import ResponseReturnValue

from ..settings import DevInboxSettings
from .mail import CaughtMail

__all__ = ["BLUEPRINT", "EXTENSION", "CaughtMessages", "make_blueprint"]

#: The key of the app's inbox in ``app.extensions`` (kept there by DevInbox).
EXTENSION = "mail_dev_inbox"

#: The blueprint's name, so its endpoints are ``quartmail_dev_inbox.index`` and so on.
BLUEPRINT = "quartmail_dev_inbox"

_COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# The inbox's own pages: inline styles, frames from the app only, nothing else.
_PAGE_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; frame-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# A mail's HTML: its inline styles and data: images, no script, no remote request.
_BODY_CSP = (
    "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)
_DOWNLOAD_CSP = "sandbox; default-src 'none'; frame-ancestors 'none'"

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True,
    enable_async=True,
    undefined=jinja2.StrictUndefined,
)

_View = TypeVar("_View", bound=Callable[..., Any])


def _hidden(view: _View) -> _View:
    # quart-schema's @hide, without importing it: keeps the inbox out of an app's OpenAPI.
    view._quart_schema_hidden = True  # type: ignore[attr-defined]
    return view


def make_blueprint(path: str) -> Blueprint:
    """The inbox's routes under *path* (``MAIL_DEV_INBOX_PATH``, without a trailing slash)."""
    inbox = Blueprint(BLUEPRINT, __name__, url_prefix=path)
    inbox.get("/")(_hidden(index))
    inbox.get("/messages.json")(_hidden(index_json))
    inbox.get("/<int:number>")(_hidden(show))
    inbox.get("/<int:number>.json")(_hidden(show_json))
    inbox.get("/<int:number>/html")(_hidden(html_body))
    inbox.get("/<int:number>/source")(_hidden(source))
    inbox.get("/<int:number>/attachments/<int:index>")(_hidden(attachment))
    inbox.after_request(_secure)
    return inbox


async def _secure(response: Response) -> Response:
    # Every response of the inbox, JSON and errors included; a page's policy unless the
    # view set a stricter one.
    for name, value in _COMMON_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("Content-Security-Policy", _PAGE_CSP)
    return response


async def index() -> ResponseReturnValue:
    """The list of caught mail, newest first."""
    inbox = _inbox()
    return await _page("index.html", inbox=inbox, messages=list(reversed(inbox.messages)))


async def show(number: int) -> ResponseReturnValue:
    """One message: envelope, warnings, headers, HTML (framed), text, attachments."""
    return await _page("message.html", caught=_caught(number))


async def index_json() -> ResponseReturnValue:
    """Every kept message as JSON, oldest first (for tests)."""
    return {"messages": [_as_json(caught) for caught in _inbox().messages]}


async def show_json(number: int) -> ResponseReturnValue:
    """One message as JSON."""
    return _as_json(_caught(number))


async def html_body(number: int) -> ResponseReturnValue:
    """The HTML body alone, for the sandboxed iframe."""
    html = _caught(number).html_with_inline_images()
    if html is None:
        abort(404)
    return Response(
        html,
        content_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": _BODY_CSP},
    )


async def source(number: int) -> ResponseReturnValue:
    """The message as received, as plain text."""
    return Response(
        _caught(number).data,
        content_type="text/plain; charset=utf-8",
        headers={"Content-Security-Policy": _DOWNLOAD_CSP},
    )


async def attachment(number: int, index: int) -> ResponseReturnValue:
    """An attachment, as a download whatever type it claims to be."""
    found = next((a for a in _caught(number).attachments if a.index == index), None)
    if found is None:
        abort(404)
    return Response(
        found.data,
        content_type="application/octet-stream",
        headers={
            "Content-Security-Policy": _DOWNLOAD_CSP,
            "Content-Disposition": content_disposition(found.filename),
        },
    )


def content_disposition(filename: str) -> str:
    """``attachment`` with *filename* made safe: no directories or control characters, an
    ASCII ``filename`` for old clients and the real name in ``filename*`` (RFC 6266, 4.3;
    RFC 8187)."""
    name = PurePosixPath(filename.replace("\\", "/")).name
    name = "".join(c for c in name if c.isprintable()).strip().lstrip(".") or "attachment"
    fallback = "".join(c if c.isascii() and c not in '"\\;%' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


class CaughtMessages(Protocol):
    """What the pages read of the app's inbox (a DevInbox; the inbox module imports this
    one, so the pages name only what they use)."""

    port: int
    settings: DevInboxSettings

    @property
    def messages(self) -> list[CaughtMail]: ...

    def get(self, number: int) -> CaughtMail | None: ...


def _inbox() -> CaughtMessages:
    inbox: CaughtMessages = current_app.extensions[EXTENSION]
    return inbox


def _caught(number: int) -> CaughtMail:
    caught = _inbox().get(number)
    if caught is None:
        abort(404)
    return caught


def _urls(caught: CaughtMail) -> dict[str, str]:
    number = caught.number
    return {
        "url": url_for(f"{BLUEPRINT}.show", number=number),
        "json_url": url_for(f"{BLUEPRINT}.show_json", number=number),
        "source_url": url_for(f"{BLUEPRINT}.source", number=number),
        "html_url": url_for(f"{BLUEPRINT}.html_body", number=number),
    }


def _attachment_url(caught: CaughtMail, index: int) -> str:
    return url_for(f"{BLUEPRINT}.attachment", number=caught.number, index=index)


def _as_json(caught: CaughtMail) -> dict[str, Any]:
    urls = _urls(caught)
    if caught.html is None:
        del urls["html_url"]
    return {
        "number": caught.number,
        "received": caught.received.isoformat(),
        "mail_from": caught.mail_from,
        "rcpt_tos": list(caught.rcpt_tos),
        "subject": caught.subject,
        "from": caught.header("From"),
        "to": caught.header("To"),
        "message_id": caught.header("Message-ID"),
        "headers": [[name, value] for name, value in caught.headers],
        "text": caught.text,
        "html": caught.html,
        "attachments": [
            {
                "filename": a.filename,
                "content_type": a.content_type,
                "content_id": a.content_id,
                "size": a.size,
                "url": _attachment_url(caught, a.index),
            }
            for a in caught.attachments
        ],
        "warnings": [{"code": w.code, "message": w.message} for w in caught.warnings],
        **urls,
    }


async def _page(template: str, **context: Any) -> Response:
    body = await _templates.get_template(template).render_async(
        url_for=url_for, urls=_urls, attachment_url=_attachment_url, **context
    )
    return Response(body, content_type="text/html; charset=utf-8")
