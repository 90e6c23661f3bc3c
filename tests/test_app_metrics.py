"""The sign-up app's ``GET /metrics`` (METRICS_TOKEN), through the test client, after a
real sign-up whose mail goes to the SMTP test server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from quart import Quart

from quartmail.app import create_app
from quartmail.testing import SMTPTestServer

TOKEN = "scrape-7c1f0b8e5d2a4e96"


pytestmark = pytest.mark.usefixtures("no_app_settings")


def make_app(server: SMTPTestServer, tmp_path: Path, **overrides: Any) -> Quart:
    return create_app(
        "testing",
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/app.db",
        FLASKY_ADMIN="admin@example.com",
        **{"MAIL_SUPPRESS_SEND": False, **server.mail_config(), **overrides},
    )


async def test_metrics_after_a_sign_up(smtp_server: SMTPTestServer, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    app = make_app(smtp_server, tmp_path, METRICS_TOKEN=TOKEN, MAIL_METRICS=registry)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        response = await client.post("/api/users", json={"name": "Alice"})
        assert response.status_code == 201
        await smtp_server.wait_for_messages(1)
        # The counter moves when the client has read the server's reply: soon after.
        async with asyncio.timeout(10):
            while registry.get_sample_value("quartmail_messages_sent_total") != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        response = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200
        assert response.content_type.startswith("text/plain; version=0.0.4")
        text = await response.get_data(as_text=True)
    assert "quartmail_messages_sent_total 1.0\n" in text
    assert 'quartmail_send_duration_seconds_count{outcome="sent"} 1.0\n' in text
    assert "quartmail_background_in_flight_messages 0.0\n" in text
    assert "admin@example.com" not in text


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x"]
)
async def test_metrics_need_the_token(
    smtp_server: SMTPTestServer, tmp_path: Path, authorization: str | None
) -> None:
    app = make_app(smtp_server, tmp_path, METRICS_TOKEN=TOKEN, MAIL_METRICS=CollectorRegistry())
    headers = {"Authorization": authorization} if authorization else {}
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/metrics", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].lower() == "bearer"
    body = await response.get_data(as_text=True)
    assert TOKEN not in body
    assert "quartmail_" not in body


async def test_the_token_turns_on_the_default_registry(
    smtp_server: SMTPTestServer, tmp_path: Path
) -> None:
    app = make_app(smtp_server, tmp_path, METRICS_TOKEN=TOKEN)
    async with app.test_app() as test_app:
        response = await test_app.test_client().get(
            "/metrics",
            headers={
                "Authorization": f"bearer {TOKEN}",
                # What Prometheus asks for first.
                "Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
            },
        )
        assert response.status_code == 200
        assert response.content_type.startswith("application/openmetrics-text; version=1.0.0")
        text = await response.get_data(as_text=True)
    assert "# TYPE quartmail_messages_sent counter" in text  # OpenMetrics: no _total here
    assert text.endswith("# EOF\n")


async def test_no_metrics_without_a_token(smtp_server: SMTPTestServer, tmp_path: Path) -> None:
    app = make_app(smtp_server, tmp_path)
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/metrics")
    assert response.status_code == 404
