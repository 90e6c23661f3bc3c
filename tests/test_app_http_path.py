"""What every request of the app pays around its view, cut: the JSON body validated by the
model's own validator (validate_json), what a view answers checked by one wrapper (returns),
the body read without a task of its own, error answers written without a TypeAdapter, the
session opened without a signer when there is no cookie; and what these cuts must not
change. Real SQLite, the real app, a real SMTP test server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import quart
from itsdangerous import URLSafeTimedSerializer
from quart import Quart
from quart.sessions import SecureCookieSessionInterface
from quart_schema import (
    QuartSchema,
    RequestSchemaValidationError,
    document_response,
    validate_request,
    validate_response,
)
from werkzeug.exceptions import RequestTimeout

from quartmail.app import create_app
from quartmail.app.api import (
    Error,
    JSONErrorsRequest,
    NewUser,
    UserOut,
    invalid_body,
    returns,
    validate_json,
)
from quartmail.app.sessions import CookieSessions
from quartmail.testing import SMTPTestServer

pytestmark = pytest.mark.usefixtures("no_app_settings")


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


def answering(decorate: str) -> Quart:
    """Views answering what the query string says, their answers checked by quart-schema's
    ``validate_response`` (``decorate="theirs"``) or by :func:`returns`."""
    app = Quart(__name__)
    QuartSchema(app)
    answers: dict[str, Any] = {
        "model": (UserOut(id=1, name="Ada"), 201),
        "known": UserOut(id=1, name="Ada"),  # 200
        "dict": ({"id": 1, "name": "Ada"}, 201),
        "wrong-model": (Error(error="no"), 201),
        "wrong-status": (UserOut(id=1, name="Ada"), 202),
    }

    async def view(kind: str) -> Any:
        return answers[kind]

    checked: Callable[[str], Awaitable[Any]]
    if decorate == "theirs":
        checked = validate_response(UserOut, 201)(validate_response(UserOut, 200)(view))
    else:
        checked = returns(UserOut, 201, 200)(view)
    app.add_url_rule("/<kind>", "view", document_response(Error, 422)(checked), methods=["POST"])
    return app


async def test_returns_is_documented_as_validate_response_is() -> None:
    documents = []
    for decorate in ("theirs", "ours"):
        response = await answering(decorate).test_client().get("/openapi.json")
        documents.append(await response.get_data())
    assert documents[0] == documents[1]
    assert b'"201"' in documents[1] and b"UserOut" in documents[1]


@pytest.mark.parametrize("kind", ["model", "known", "wrong-model"])
async def test_returns_checks_the_answer_as_validate_response_does(kind: str) -> None:
    theirs = await answering("theirs").test_client().post(f"/{kind}")
    ours = await answering("ours").test_client().post(f"/{kind}")
    assert (ours.status_code, await ours.get_data()) == (
        theirs.status_code,
        await theirs.get_data(),
    )


@pytest.mark.parametrize("kind", ["dict", "wrong-status"])
async def test_returns_takes_only_the_model_with_a_documented_status(kind: str) -> None:
    """Stricter than quart-schema, which validates a dict through a TypeAdapter and lets any
    other status through unchecked: an API view answers its model, with its statuses."""
    response = await answering("ours").test_client().post(f"/{kind}")
    assert response.status_code == 500


async def test_an_error_answer_is_the_json_it_was(
    smtp_server: SMTPTestServer, tmp_path: Path
) -> None:
    """Error answers are written by the app's JSON provider directly (quart-schema would
    convert a dict through a pydantic TypeAdapter): the same JSON, status and type."""
    app = create_app(
        "testing", DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", FLASKY_ADMIN=None
    )
    async with app.test_app() as test_app:
        client = test_app.test_client()
        invalid = await client.post("/api/users", json={"name": ""})
        missing = await client.get("/api/users/999")
        not_json = await client.post("/api/users", form={"name": "Ada"})
        wrong_method = await client.delete("/api/users")
    assert invalid.status_code == 422
    assert await invalid.get_json() == {
        "error": "The request body is not valid.",
        "errors": [
            {
                "loc": ["name"],
                "msg": "Value error, Please enter your name.",
                "type": "value_error",
            }
        ],
    }
    assert (missing.status_code, await missing.get_json()) == (
        404,
        {"error": "No user with id 999."},
    )
    assert (not_json.status_code, await not_json.get_json()) == (
        400,
        {"error": "The request body must be JSON (Content-Type: application/json)."},
    )
    assert wrong_method.status_code == 405
    assert "POST" in wrong_method.headers["Allow"]
    for response in (invalid, missing, not_json, wrong_method):
        assert response.content_type == "application/json"


@pytest.fixture
async def request_() -> AsyncIterator[JSONErrorsRequest]:
    """A POST of the API, its body not arrived yet: the app's request class, as served."""
    app = Quart(__name__)
    app.request_class = JSONErrorsRequest
    async with app.test_request_context(
        "/api/users", method="POST", headers={"Content-Type": "application/json"}
    ):
        request = quart.request._get_current_object()  # type: ignore[attr-defined]
        assert isinstance(request, JSONErrorsRequest)
        request.body = request.body_class(None, None)
        yield request


async def test_a_body_that_has_arrived_is_read_without_giving_way(
    request_: JSONErrorsRequest,
) -> None:
    """Quart reads the body through wait_for, a task of its own: two turns of the event
    loop per request. Here nothing else runs while a body that has arrived is read."""
    request_.body.set_result(b'{"name":"x"}')
    others_ran: list[bool] = []
    asyncio.get_running_loop().call_soon(others_ran.append, True)
    assert await request_.get_json() == {"name": "x"}
    assert await request_.get_data(as_text=True) == '{"name":"x"}'
    assert others_ran == []


async def test_a_body_still_arriving_is_waited_for(request_: JSONErrorsRequest) -> None:
    asyncio.get_running_loop().call_soon(request_.body.set_result, b'{"name":"x"}')
    assert await request_.get_json() == {"name": "x"}


async def test_a_body_that_does_not_arrive_in_time_is_a_408_as_in_quart(
    request_: JSONErrorsRequest,
) -> None:
    request_.body_timeout = 1
    with pytest.raises(RequestTimeout):
        await request_.get_data()


async def test_the_body_is_read_with_quarts_options(request_: JSONErrorsRequest) -> None:
    """``cache=False`` forgets the body, ``parse_form_data`` parses a form first, as Quart's."""
    request_.body.set_result(b'{"name":"x"}')
    assert await request_.get_data(cache=False) == b'{"name":"x"}'
    assert await request_.get_data() == b""
    read = []
    for request_class in (quart.Request, JSONErrorsRequest):
        app = Quart(__name__)
        app.request_class = request_class
        async with app.test_request_context("/", method="POST", form={"name": "Ada"}):
            form_request = quart.request._get_current_object()  # type: ignore[attr-defined]
            data = await form_request.get_data(parse_form_data=True)
            read.append((data, dict(await form_request.form)))
    assert read[0] == read[1] == (b"name=Ada", {"name": "Ada"})
