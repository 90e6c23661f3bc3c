"""What every request of the app pays around its view, cut: the JSON body validated by the
model's own validator (validate_json), the session opened without a signer when there is
no cookie; and what these cuts must not change. Real SQLite, the real app, a real SMTP
test server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from itsdangerous import URLSafeTimedSerializer
from quart import Quart
from quart.sessions import SecureCookieSessionInterface
from quart_schema import QuartSchema, RequestSchemaValidationError, validate_request

from quartmail.app import create_app
from quartmail.app.api import NewUser, invalid_body, validate_json
from quartmail.app.config import ENVIRONMENT_KEYS
from quartmail.app.sessions import CookieSessions
from quartmail.testing import SMTPTestServer


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting from the real environment leaks into an app."""
    for key in ENVIRONMENT_KEYS:
        monkeypatch.delenv(key, raising=False)


def twins() -> Quart:
    """One model behind quart-schema's validate_request and behind validate_json, with the
    API's handler for what does not validate."""
    app = Quart(__name__)
    QuartSchema(app)
    app.register_error_handler(RequestSchemaValidationError, invalid_body)

    @app.post("/theirs")
    @validate_request(NewUser)
    async def theirs(data: NewUser) -> dict[str, Any]:
        return {"type": type(data).__name__, **data.model_dump()}

    @app.post("/ours")
    @validate_json(NewUser)
    async def ours(data: NewUser) -> dict[str, Any]:
        return {"type": type(data).__name__, **data.model_dump()}

    return app


BODIES: list[Any] = [
    {"name": " Ada "},
    {"name": "Ada", "email": "ada@example.com"},
    {"name": "Ada", "email": None},
    {"name": "Ada", "admin": True},  # extra="forbid"
    {"name": 42},  # strict: no number for a string
    {"name": ""},
    {"name": "x" * 65},
    {"name": "Ada", "email": "not an address"},
    {},
    [],
    ["Ada"],
    "Ada",
    None,
    7,
]


@pytest.mark.parametrize("body", BODIES, ids=[json.dumps(b)[:30] for b in BODIES])
async def test_a_body_is_validated_as_quart_schema_does(body: Any) -> None:
    client = twins().test_client()
    theirs = await client.post("/theirs", json=body)
    ours = await client.post("/ours", json=body)
    assert (ours.status_code, await ours.get_json()) == (
        theirs.status_code,
        await theirs.get_json(),
    )
    assert ours.status_code in (200, 422)


async def test_an_api_request_without_a_cookie_builds_no_signer(
    smtp_server: SMTPTestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The JSON API sends no cookie: its session is the empty one, with no signer built;
    the form's session (a cookie) is read and written as Quart does."""
    app = create_app(
        "testing", DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", FLASKY_ADMIN=None
    )
    assert isinstance(app.session_interface, CookieSessions)
    built: list[URLSafeTimedSerializer | None] = []
    quarts = SecureCookieSessionInterface.get_signing_serializer

    def counted(self: SecureCookieSessionInterface, app: Quart) -> URLSafeTimedSerializer | None:
        built.append(quarts(self, app))
        return built[-1]

    monkeypatch.setattr(CookieSessions, "get_signing_serializer", counted)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        response = await client.post("/api/users", json={"name": "Ada"})
        assert response.status_code == 201
        assert "Set-Cookie" not in response.headers
        assert built == []

        page = await client.get("/")  # the form's CSRF token: a session cookie
        assert "Set-Cookie" in page.headers
        async with client.session_transaction() as session:
            csrf = session["csrf_token"]
        signed_up = await client.post("/", form={"csrf_token": csrf, "name": "Grace"})
        assert signed_up.status_code == 303  # the token was read from the cookie
        assert len(built) >= 2 and None not in built


async def test_without_a_secret_key_there_is_no_session_as_in_quart(tmp_path: Path) -> None:
    app = create_app("testing", DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    app.secret_key = None
    async with app.test_request_context("/api/users", method="POST"):
        from quart import request

        request_ = request._get_current_object()  # type: ignore[attr-defined]
        assert await CookieSessions().open_session(app, request_) is None
        assert await SecureCookieSessionInterface().open_session(app, request_) is None
