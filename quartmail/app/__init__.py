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
from werkzeug.exceptions import HTTPException, TooManyRequests

from .._extras import missing_extra
from ..unsubscribe import UnsubscribeTokens, unsubscribe_blueprint

try:
    from quart_schema import hide

    from .api import JSONErrorsRequest, api, json_response
    from .cli import register_commands
    from .config import CONFIGS, check_settings, config_values, from_environment
    from .csrf import csrf_token
    from .db import Database
    from .email import unsubscribed
    from .extensions import mail, schema
    from .limits import LimitReachedError
    from .sessions import CookieSessions
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
    app.session_interface = CookieSessions()
    app.config.from_mapping(config_values(config_class))
    app.config.from_mapping(from_environment())
    app.config.from_mapping(overrides)
    config_class.init_app(app)
    check_settings(app)
    _configure_logging(app)
    # A misspelt variable in a template is an error, not an empty string.
    app.jinja_options = {**app.jinja_options, "undefined": StrictUndefined}
    app.jinja_env.globals["csrf_token"] = csrf_token

    if app.config["DEV_SMTP_SERVER"] and not app.config.get("MAIL_SERVER"):
        # No SMTP server named: quartmail's development inbox catches the mail (/dev/inbox/).
        app.config.setdefault("MAIL_DEV_INBOX", True)
    if app.config.get("METRICS_TOKEN"):
        app.config.setdefault("MAIL_METRICS", True)  # what /metrics serves
    # The schema first: Mail's start-up starts the outbox's dispatcher on it.
    app.before_serving(_prepare_database)
    mail.init_app(app)
    database = Database(app)  # after Mail: the engine is disposed after the mail drain
    # The app always has a database: the suppression list is there, outbox or not.
    mail.init_suppression(app, database.engine)
    if app.extensions["mail"].settings.outbox:
        mail.init_outbox(app, database.engine)
    schema.init_app(app)

    app.register_blueprint(main)
    app.register_blueprint(api)
    # One-click unsubscribe (RFC 8058) from the administrator's notices.
    tokens = app.extensions["unsubscribe_tokens"] = UnsubscribeTokens.from_config(app.config)
    app.register_blueprint(unsubscribe_blueprint(tokens, unsubscribed))
    for endpoint, view in app.view_functions.items():
        if endpoint.startswith("unsubscribe."):
            hide(view)  # pages for people, not the JSON API: out of the OpenAPI document
    if app.config.get("METRICS_TOKEN"):
        from .metrics import metrics  # prometheus-client only when served

        app.register_blueprint(metrics)
    app.register_error_handler(HTTPException, _error_page)
    app.register_error_handler(LimitReachedError, _limit_reached)
    register_commands(app)
    _drop_flasks_context_processor(app)
    keep_draining_on_sigterm(app)
    if app.config["GC_FREEZE"]:
        app.before_serving(_freeze_startup_objects)
    return app


async def _prepare_database() -> None:
    await Database.of().prepare()


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


async def _limit_reached(error: LimitReachedError) -> ResponseReturnValue:
    # The form's page and the API's JSON alike: 429, and when to try again.
    if error.limit.kind == "address":
        text = "Too many confirmation mails have gone to this address in the last hour."
    else:
        text = "Too many sign-ups with an address have come from your network in the last hour."
    minutes = -(-error.retry_after // 60)
    unit = "minute" if minutes == 1 else "minutes"
    description = f"{text} Nothing was sent. Please try again in {minutes} {unit}."
    return await _error_page(TooManyRequests(description, retry_after=error.retry_after))


async def _error_page(error: HTTPException) -> ResponseReturnValue:
    code = error.code or 500
    # Keep what the error says in its headers (Allow on a 405), not its body's type.
    headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
    if request.path.startswith("/api/"):
        # Routing errors (404, 405) never reach the API blueprint's handlers.
        return json_response({"error": error.description or error.name}, code, headers.items())
    return await render_template("error.html", error=error, code=code), code, headers
