"""``GET /metrics``: quartmail's metrics for Prometheus, when ``METRICS_TOKEN`` is set.

The page tells how much mail the app sends and how it fails; it names no
person, but it is not for everyone: a scraper shows the token as a bearer
token (Prometheus' ``authorization`` scrape setting), and any other request
gets 401. The metrics are those of ``MAIL_METRICS``, which the token turns
on (:func:`quartmail.app.create_app`).
"""

from __future__ import annotations

import hmac

from quart import Blueprint, current_app, request
from quart.typing import ResponseReturnValue
from quart_schema import hide
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Unauthorized

from .._extras import missing_extra

try:
    from prometheus_client.exposition import choose_encoder
except ModuleNotFoundError as error:
    raise missing_extra(error, "metrics", "The sign-up app's /metrics") from None

from quartmail.metrics import registry_for

__all__ = ["metrics"]

metrics = Blueprint("metrics", __name__)


@metrics.get("/metrics")
@hide
async def scrape() -> ResponseReturnValue:
    token: str = current_app.config["METRICS_TOKEN"]
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # In constant time: the comparison does not tell how much of a guess was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized(
            "/metrics needs the METRICS_TOKEN as a bearer token",
            www_authenticate=WWWAuthenticate("bearer"),
        )
    registry = registry_for(current_app.extensions["mail"].settings.metrics)
    # The format the scraper asks for (OpenMetrics, or the text format), as
    # prometheus-client's own HTTP server answers.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return encode(registry), 200, {"Content-Type": content_type}
