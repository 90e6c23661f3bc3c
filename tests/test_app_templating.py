"""The app's Jinja (quartmail.app.templating): each render's context is the one Jinja builds,
for less; a mail's bodies are rendered as ``render_template`` renders them, the context
processors run once. Real templates on disk, a real Quart app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import pytest
from jinja2 import StrictUndefined, UndefinedError
from quart import Quart, g, render_template
from quart.signals import before_render_template, template_rendered

from quartmail.app.templating import render_templates

pytestmark = pytest.mark.usefixtures("no_app_settings")


@pytest.fixture
def app(tmp_path: Path) -> Quart:
    """A Quart app with the app's environment, two bodies of a mail and a page."""
    (tmp_path / "note.txt").write_text("Hi {{ name }} <{{ who() }}> {{ g.mark }} {{ extra }}")
    (tmp_path / "note.html").write_text("<p>Hi {{ name }} {{ g.mark }} {{ extra }}</p>")
    (tmp_path / "broken.html").write_text("{{ missing.attribute }}")
    app = Quart(__name__, template_folder=str(tmp_path))
    app.jinja_options = {**app.jinja_options, "undefined": StrictUndefined}
    app.jinja_env.globals["who"] = lambda: "global"
    processed: list[int] = []
    app.extensions["processed"] = processed

    @app.context_processor
    async def extra() -> dict[str, Any]:
        processed.append(1)
        return {"extra": "from a processor"}

    return app


async def test_the_bodies_are_what_render_template_gives(app: Quart) -> None:
    names = ["note.txt", "note.html"]
    async with app.test_request_context("/"):
        g.mark = "<g>"
        theirs = [await render_template(name, name="<Ada>") for name in names]
        ours = await render_templates(names, name="<Ada>")
    assert ours == theirs
    assert ours == [
        "Hi <Ada> <global> <g> from a processor",
        "<p>Hi &lt;Ada&gt; &lt;g&gt; from a processor</p>",  # .html: autoescaped
    ]


async def test_the_context_processors_run_once_for_both_bodies(app: Quart) -> None:
    async with app.test_request_context("/"):
        g.mark = "g"
        await render_templates(["note.txt", "note.html"], name="Ada")
    assert app.extensions["processed"] == [1]


async def test_each_body_sends_quarts_signals_with_a_context_of_its_own(app: Quart) -> None:
    seen: list[tuple[str, str, str]] = []

    async def before(sender: Quart, template: jinja2.Template, context: dict[str, Any]) -> None:
        seen.append(("before", str(template.name), context["name"]))
        context["name"] = "changed"  # for this template only

    async def after(sender: Quart, template: jinja2.Template, context: dict[str, Any]) -> None:
        seen.append(("rendered", str(template.name), context["name"]))

    before_render_template.connect(before, app)
    template_rendered.connect(after, app)
    try:
        async with app.test_request_context("/"):
            g.mark = "g"
            text, html = await render_templates(["note.txt", "note.html"], name="Ada")
    finally:
        before_render_template.disconnect(before, app)
        template_rendered.disconnect(after, app)
    assert seen == [
        ("before", "note.txt", "Ada"),
        ("rendered", "note.txt", "changed"),
        ("before", "note.html", "Ada"),
        ("rendered", "note.html", "changed"),
    ]
    assert text.startswith("Hi changed") and html.startswith("<p>Hi changed")


async def test_a_template_error_is_raised(app: Quart) -> None:
    async with app.test_request_context("/"):
        with pytest.raises(UndefinedError):
            await render_templates(["note.txt", "broken.html"], name="Ada")
