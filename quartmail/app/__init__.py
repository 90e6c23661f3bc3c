"""The reference sign-up app: the Flasky e-mail chapter on Quart.

``create_app(config_name="development", **overrides)`` builds a fresh app:
the config class, then the environment, then *overrides*, which win. Serve it
with ``python -m quartmail.app -c hypercorn.toml`` (one worker per core; see
:mod:`quartmail.app.launcher`) or ``hypercorn -c hypercorn.toml "quartmail.app:create_app()"``.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from flask.templating import (
    _default_template_ctx_processor as flask_default_context_processor,
)
from jinja2 import StrictUndefined
from quart import Quart, render_template, request
from quart.logging import default_handler
from quart.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from .._extras import missing_extra

try:
    from .api import JSONErrorsRequest, api
    from .cli import register_commands
    from .config import CONFIGS, config_values, from_environment
    from .csrf import csrf_token
    from .db import Database
    from .extensions import mail, schema
    from .views import main
    from .workers import keep_draining_on_sigterm
except ModuleNotFoundError as error:
    raise missing_extra(error, "app", "The sign-up app (quartmail.app)") from None

__all__ = ["create_app"]


def create_app(config_name: str = "development", **overrides: Any) -> Quart:
    """Build the app for *config_name* (``development``, ``testing`` or
    ``production``); keyword arguments override any setting."""
    try:
        config_class = CONFIGS[config_name]
    except KeyError:
        raise ValueError(
            f"config_name must be one of {sorted(CONFIGS)}, not {config_name!r}"
        ) from None

    app = Quart(__name__, template_folder=_templates_folder())
    app.request_class = JSONErrorsRequest
    app.config.from_mapping(config_values(config_class))
    app.config.from_mapping(from_environment())
    app.config.from_mapping(overrides)
    config_class.init_app(app)
    _configure_logging(app)
    # A misspelt variable in a template is an error, not an empty string.
    app.jinja_options = {**app.jinja_options, "undefined": StrictUndefined}
    app.jinja_env.globals["csrf_token"] = csrf_token

    if app.config["DEV_SMTP_SERVER"] and not app.config.get("MAIL_SERVER"):
        # No SMTP server named: quartmail's development inbox catches the mail (/dev/inbox/).
        app.config.setdefault("MAIL_DEV_INBOX", True)
    mail.init_app(app)
    database = Database(app)  # after Mail: the engine is disposed after the mail drain
    if app.extensions["mail"].settings.outbox:
        mail.init_outbox(app, database.engine)
    schema.init_app(app)

    app.register_blueprint(main)
    app.register_blueprint(api)
    app.register_error_handler(HTTPException, _error_page)
    register_commands(app)
    _drop_flasks_context_processor(app)
    keep_draining_on_sigterm(app)
    if app.config["GC_FREEZE"]:
        app.before_serving(_freeze_startup_objects)
    return app


def _drop_flasks_context_processor(app: Quart) -> None:
    # Each blueprint (Flask's sansio Blueprint under Quart's) carries Flask's own default
    # context processor. It is sync, so Quart runs it in a thread on every render (a
    # sign-up renders two templates), and finds no Flask context there: it adds nothing.
    # Quart's own (async) one, for the whole app, still adds g, request and session.
    for processors in app.template_context_processors.values():
        processors[:] = [p for p in processors if p is not flask_default_context_processor]


async def _freeze_startup_objects() -> None:
    # What exists once the app has started (modules, templates, the engine)
    # lives as long as the process: keep it out of the collector's full
    # passes, which otherwise stall every request now and then.
    gc.collect()
    gc.freeze()


def _configure_logging(app: Quart) -> None:
    # The app shows quartmail's log (caught mail, retries, failures) the way
    # Quart shows its own: on stderr, unless logging is configured already.
    # Done before app.logger is first used, so that Quart does not add a
    # second handler to it.
    logger = logging.getLogger("quartmail")
    if not logger.handlers:
        logger.addHandler(default_handler)
        logger.setLevel(logging.DEBUG if app.debug else logging.INFO)


def _templates_folder() -> str:
    # The wheel ships the top-level templates/ as quartmail/templates; a
    # source checkout has them beside the package.
    package = Path(__file__).resolve().parent.parent
    packaged = package / "templates"
    return str(packaged if packaged.is_dir() else package.parent / "templates")


async def _error_page(error: HTTPException) -> ResponseReturnValue:
    code = error.code or 500
    # Keep what the error says in its headers (Allow on a 405), not its body's type.
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
    if request.path.startswith("/api/"):
        # Routing errors (404, 405) never reach the API blueprint's handlers.
        return {"error": error.description or error.name}, code, headers
    return await render_template("error.html", error=error, code=code), code, headers
