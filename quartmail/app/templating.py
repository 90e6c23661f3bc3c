"""The app's Jinja: Quart's environment, each render's context built for less; and a mail's
bodies rendered with one template context.

Jinja keeps a template's globals as a ``ChainMap`` over the environment's (13 names in
this app) and flattens it into a new dict on every render, one ``ChainMap.__getitem__``
per name, then walks it again for the names' set: about 10 µs of the 50 a small template
costs here. :class:`Template` flattens it map by map into the same dict (what
pallets/jinja#2185 proposes upstream; drop this class once Jinja does it).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2.runtime import Context, new_context
from quart import current_app
from quart.signals import before_render_template, template_rendered
from quart.templating import Environment as QuartEnvironment

__all__ = ["Environment", "Template", "render_templates"]


class Template(jinja2.Template):
    """Jinja's template, its render context built from its globals' maps directly."""

    def new_context(
        self,
        vars: dict[str, Any] | None = None,
        shared: bool = False,
        locals: Mapping[str, Any] | None = None,
    ) -> Context:
        globals = self.globals
        if isinstance(globals, ChainMap):
            # The same dict as dict(globals): the first map holding a name wins.
            flat: dict[str, Any] = {}
            for layer in reversed(globals.maps):
                flat.update(layer)
            globals = flat
        return new_context(self.environment, self.name, self.blocks, vars, shared, globals, locals)


class Environment(QuartEnvironment):
    """Quart's Jinja environment (the app's ``jinja_environment``), making :class:`Template`s."""

    template_class = Template


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
