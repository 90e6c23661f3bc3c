"""A mail's bodies rendered with one template context: Quart's ``render_template`` for
each, the app's context processors run once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from quart import current_app
from quart.signals import before_render_template, template_rendered

__all__ = ["render_templates"]


async def render_templates(names: Sequence[str], **context: Any) -> list[str]:
    """``render_template(name, **context)`` for each of *names*, the app's context
    processors run once for them all (Quart's runs them for each): each template gets its
    own copy of the context, and the ``before_render_template`` and ``template_rendered``
    signals, as with ``render_template``."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    await app.update_template_context(context)
    rendered: list[str] = []
    for name in names:
        template = app.jinja_env.get_or_select_template(name)
        own = dict(context)  # what a before_render_template receiver changes stays its own
        await before_render_template.send_async(
            app, _sync_wrapper=app.ensure_async, template=template, context=own
        )
        rendered.append(await template.render_async(own))
        await template_rendered.send_async(
            app, _sync_wrapper=app.ensure_async, template=template, context=own
        )
    return rendered
