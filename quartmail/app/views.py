"""The Flasky page: a form that asks for a name (and, optionally, an e-mail
address) and greets the visitor; the pages that confirm an address."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from quart import Blueprint, redirect, render_template, request, session, url_for
from quart.typing import ResponseReturnValue
from quart_schema import hide

from .confirm import ConfirmTokenError
from .csrf import check_csrf
from .models import User
from .users import clean_email, clean_name, confirm, resend_confirmation, sign_up, to_confirm

__all__ = ["main"]

main = Blueprint("main", __name__)

# The token in a confirmation URL is a secret: no cache keeps the page, and
# no link on it sends the URL on as a Referer.
_TOKEN_PAGE_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


@main.get("/")
@hide
async def index() -> ResponseReturnValue:
    return await _page()


@main.post("/")
@hide
async def sign_up_form() -> ResponseReturnValue:
    form = await request.form
    check_csrf(form)
    typed = form.get("name", "")
    typed_email = form.get("email", "")
    try:
        name = clean_name(typed)
        # The address is optional: an empty field is none.
        email = clean_email(typed_email) if typed_email.strip() else None
    except ValueError as error:
        return await _page(error=str(error), typed=typed, typed_email=typed_email), 400
    _, created = await sign_up(name, email)
    session["name"] = name
    session["known"] = not created
    # Said for every new sign-up with an address, whoever else gave it.
    session["confirm_to"] = email if created else None
    # 303: the browser follows with a GET, so a reload does not post again.
    return redirect(url_for("main.index"), 303)


@main.get("/confirm/<token>")
@hide
async def confirm_page(token: str) -> ResponseReturnValue:
    # Mail scanners open every link in a mail: this page only asks.
    return await _confirm_page(token, to_confirm, done=False)


@main.post("/confirm/<token>")
@hide
async def confirm_form(token: str) -> ResponseReturnValue:
    # No CSRF token: the signed token in the URL is the proof, and only the
    # mailbox it was sent to has it. Another site can forge this POST only
    # with a token it holds, which confirms its own sign-up and nothing else.
    return await _confirm_page(token, confirm, done=True)


async def _confirm_page(
    token: str, user_of: Callable[[str], Awaitable[User]], *, done: bool
) -> ResponseReturnValue:
    """confirm.html for the user *token* names (found, or confirmed, by *user_of*), or
    the page that says why the token is no good."""
    try:
        user = await user_of(token)
    except ConfirmTokenError as error:
        return await _token_error(error)
    page = await render_template("confirm.html", user=user, email=user.email, done=done)
    return page, 200, _TOKEN_PAGE_HEADERS


@main.get("/confirm/resend")
@hide
async def resend_page() -> ResponseReturnValue:
    return await render_template("resend.html", error=None, typed="", sent=False)


@main.post("/confirm/resend")
@hide
async def resend_form() -> ResponseReturnValue:
    form = await request.form
    check_csrf(form)
    typed = form.get("email", "")
    try:
        email = clean_email(typed)
    except ValueError as error:
        return await render_template("resend.html", error=str(error), typed=typed, sent=False), 400
    await resend_confirmation(email)
    # The same page whether or not anyone signed up with the address.
    return await render_template("resend.html", error=None, typed=email, sent=True)


async def _token_error(error: ConfirmTokenError) -> ResponseReturnValue:
    # 410 Gone for a link that worked once; 400 for one that never could.
    status = 410 if error.expired else 400
    page = await render_template("confirm_error.html", error=str(error), expired=error.expired)
    return page, status, _TOKEN_PAGE_HEADERS


async def _page(*, error: str | None = None, typed: str = "", typed_email: str = "") -> str:
    return await render_template(
        "index.html",
        name=session.get("name"),
        known=session.get("known", False),
        confirm_to=session.get("confirm_to"),
        error=error,
        typed=typed,
        typed_email=typed_email,
    )
