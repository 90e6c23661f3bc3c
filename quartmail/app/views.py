"""The Flasky page: a form that asks for a name and greets the visitor."""

from __future__ import annotations

from quart import Blueprint, redirect, render_template, request, session, url_for
from quart.typing import ResponseReturnValue
from quart_schema import hide

from .csrf import check_csrf
from .users import clean_name, sign_up

__all__ = ["main"]

main = Blueprint("main", __name__)


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
    try:
        name = clean_name(typed)
    except ValueError as error:
        return await _page(error=str(error), typed=typed), 400
    _, created = await sign_up(name)
    session["name"] = name
    session["known"] = not created
    # 303: the browser follows with a GET, so a reload does not post again.
    return redirect(url_for("main.index"), 303)


async def _page(*, error: str | None = None, typed: str = "") -> str:
    return await render_template(
        "index.html",
        name=session.get("name"),
        known=session.get("known", False),
        error=error,
        typed=typed,
    )
