"""The app's extensions, unbound: ``create_app`` binds them to each new app."""

from __future__ import annotations

from quart_schema import Info, QuartSchema

from quartmail import Mail

__all__ = ["mail", "schema"]

mail = Mail()

# Only the OpenAPI document: quart-schema's UI pages load their scripts from a
# CDN, which a closed network (and a careful deployment) does not reach.
schema = QuartSchema(
    info=Info(title="quartmail sign-up API", version="0.1.0"),
    openapi_path="/openapi.json",
    swagger_ui_path=None,
    redoc_ui_path=None,
    scalar_ui_path=None,
)
