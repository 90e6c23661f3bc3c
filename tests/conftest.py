"""Shared fixtures: a fresh Quart app per test, wired to a real SMTP test server.

The SMTP test server fixtures (``smtp_server``, ``smtp_server_factory``,
``smtp_certificates``) come from quartmail's own pytest plugin
(quartmail.pytest_plugin), registered by entry point.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from quart import Quart
from sqlalchemy.ext.asyncio import create_async_engine

from quartmail import Mail
from quartmail.testing import SMTPTestServer

SENDER = "Sender <sender@example.com>"

# The database .ci/run creates; set QUARTMAIL_TEST_POSTGRES to use another.
POSTGRES_DEFAULT = "postgresql+asyncpg://quartmail:quartmail@127.0.0.1:5432/quartmail_test"


async def postgres_url() -> str:
    """The test PostgreSQL database's URL; skips the test when none answers."""
    url = os.environ.get("QUARTMAIL_TEST_POSTGRES", POSTGRES_DEFAULT)
    engine = create_async_engine(url)
    try:
        async with engine.connect():
            pass
    except Exception as error:
        pytest.skip(f"PostgreSQL is not reachable at {url} ({error}); .ci/run starts one")
    finally:
        await engine.dispose()
    return url


MakeMail = Callable[..., tuple[Quart, Mail]]


@pytest.fixture
def make_mail() -> MakeMail:
    """``make_mail(server, **config)``: a new app whose Mail points at *server*."""

    def make(server: SMTPTestServer | None = None, **config: Any) -> tuple[Quart, Mail]:
        app = Quart(__name__)
        app.config["MAIL_DEFAULT_SENDER"] = SENDER
        if server is not None:
            app.config.update(server.mail_config())
        app.config.update(config)
        return app, Mail(app)

    return make
