"""The reference sign-up app (quartmail.app), checked the way a user would check it.

Every test builds a fresh app with ``create_app`` and runs it through its real
lifespan (``async with app.test_app()``), talking to it with the test client,
with a real SQLite file and a real SMTP test server (STARTTLS or implicit TLS,
with AUTH, where it matters). Nothing is mocked. The CLI tests run ``quart`` in
a subprocess, awaited, so that the SMTP server in this test's loop keeps serving.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from contextlib import closing
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import pytest
from quart import Quart, Response
from quart.typing import TestClientProtocol as Client
from sqlalchemy.ext.asyncio import create_async_engine

from quartmail import ConfigError
from quartmail.app import create_app
from quartmail.testing import ReceivedMessage, SMTPServerFactory, SMTPTestServer

from conftest import empty_database, postgres_url

ADMIN = "admin@example.com"
SENDER = "Flasky Admin <flasky@example.com>"
USER, PASSWORD = "mailer", "s3cret-Pa55word"


# --- fixtures and helpers -------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("no_app_settings")


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/app.db"


def make_app(server: SMTPTestServer, database_url: str, **overrides: Any) -> Quart:
    """The testing app, sending its mail to *server*, the admin ``admin@example.com``."""
    settings: dict[str, Any] = {
        "DATABASE_URL": database_url,
        "FLASKY_ADMIN": ADMIN,
        "MAIL_SUPPRESS_SEND": False,
        **server.mail_config(),
        **overrides,
    }
    return create_app("testing", **settings)


class _Inputs(HTMLParser):
    """The ``<input>`` elements of a page, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: dict[str, dict[str, str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "input":
            fields = {key: value or "" for key, value in attrs}
            self.inputs[fields.get("name", "")] = fields


def form_inputs(page: str) -> dict[str, dict[str, str]]:
    parser = _Inputs()
    parser.feed(page)
    parser.close()
    return parser.inputs


async def text(response: Response) -> str:
    return await response.get_data(as_text=True)


async def get_page(client: Client, path: str = "/") -> str:
    response = await client.get(path)
    assert response.status_code == 200, await text(response)
    assert response.content_type.startswith("text/html")
    return await text(response)


async def csrf_token(client: Client) -> str:
    token = form_inputs(await get_page(client))["csrf_token"]["value"]
    assert token
    return token


async def post_name(client: Client, name: str) -> Response:
    """Fill in the form on / and submit it, as a browser does."""
    token = await csrf_token(client)
    response: Response = await client.post("/", form={"csrf_token": token, "name": name})
    return response


def assert_redirect_home(response: Response) -> None:
    assert response.status_code in (302, 303)
    assert urlsplit(response.headers["Location"]).path == "/"


def parts(received: ReceivedMessage) -> tuple[str, str]:
    """The text/plain and text/html parts of a multipart/alternative message."""
    message = received.parsed()
    assert message.get_content_type() == "multipart/alternative"
    plain = message.get_body(preferencelist=("plain",))
    rich = message.get_body(preferencelist=("html",))
    assert plain is not None and plain.get_content_type() == "text/plain"
    assert rich is not None and rich.get_content_type() == "text/html"
    return plain.get_content(), rich.get_content()


def assert_admin_mail(received: ReceivedMessage, name: str) -> None:
    message = received.parsed()
    assert message["Subject"] == "[Flasky] New User"
    assert message["From"] == SENDER
    assert message["To"] == ADMIN
    assert received.mail_from == "flasky@example.com"
    assert received.rcpt_tos == [ADMIN]
    plain, rich = parts(received)
    assert name in plain
    assert name in rich


async def poll(condition: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """Wait, at most *within* seconds, until *condition* holds."""
    async with asyncio.timeout(within):
        while not await condition():  # noqa: ASYNC110 (a page has no event to wait on)
            await asyncio.sleep(0.02)


async def no_user(client: Client, user_id: int = 1) -> bool:
    response: Response = await client.get(f"/api/users/{user_id}")
    return response.status_code == 404


# --- 1. the form ------------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_form_sign_up_sends_one_admin_mail(
    tls: Literal["starttls", "implicit"], smtp_server_factory: SMTPServerFactory, database_url: str
) -> None:
    server = await smtp_server_factory(tls=tls, auth=(USER, PASSWORD))
    app = make_app(server, database_url)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        page = await get_page(client)
        inputs = form_inputs(page)
        assert inputs["name"]["type"] == "text"
        assert inputs["csrf_token"]["type"] == "hidden"
        assert "Hello, Stranger!" in page

        response = await post_name(client, "张伟")
        assert_redirect_home(response)
        page = await get_page(client)
        assert "Hello, 张伟!" in page
        assert "Pleased to meet you!" in page

        [received] = await server.wait_for_messages(1)
        assert_admin_mail(received, "张伟")
        assert received.tls and received.login == USER

        response = await post_name(client, "张伟")
        assert_redirect_home(response)
        page = await get_page(client)
        assert "Hello, 张伟!" in page
        assert "Happy to see you again!" in page
    # The shutdown drained the mail queue: a second mail would be here by now.
    assert len(server.messages) == 1


# --- 2. escaping ------------------------------------------------------------------------


async def test_names_are_escaped_in_the_page_and_the_html_mail(
    smtp_server: SMTPTestServer, database_url: str
) -> None:
    name = "<script>alert(1)</script>"
    app = make_app(smtp_server, database_url)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert_redirect_home(await post_name(client, name))
        page = await get_page(client)
        assert "Hello, &lt;script&gt;alert(1)&lt;/script&gt;!" in page
        assert name not in page
        [received] = await smtp_server.wait_for_messages(1)
    plain, rich = parts(received)
    assert name in plain
    assert "<b>&lt;script&gt;alert(1)&lt;/script&gt;</b>" in rich
    assert "<script>" not in rich


# --- 3. form validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("", "Please enter your name."),
        ("   \t ", "Please enter your name."),
        ("x" * 65, "Names are at most 64 characters long."),
        ("张" * 65, "Names are at most 64 characters long."),
        ("bad\x07name", "Names cannot contain control characters."),
    ],
    ids=["empty", "whitespace", "65-chars", "65-cjk-chars", "control-char"],
)
async def test_form_rejects_a_bad_name(
    name: str, error: str, smtp_server: SMTPTestServer, database_url: str
) -> None:
    app = make_app(smtp_server, database_url)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        response = await post_name(client, name)
        assert response.status_code == 400
        page = await text(response)
        # The form again, with the message, so the visitor can correct the name.
        assert error in page
        inputs = form_inputs(page)
        assert "name" in inputs and inputs["csrf_token"]["value"]
        assert "Hello, Stranger!" in page
        assert await no_user(client)
        assert "Hello, Stranger!" in await get_page(client)
    assert smtp_server.messages == []
    assert smtp_server.connections == 0


async def test_form_rejects_a_name_that_is_not_utf8(
    smtp_server: SMTPTestServer, database_url: str
) -> None:
    # A form posted in Latin-1: the field decodes to "Jos\ufffd", which would be stored
    # in place of the name typed.
    app = make_app(smtp_server, database_url)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        token = await csrf_token(client)
        response = await client.post(
            "/",
            data=f"csrf_token={token}&name=Jos%E9".encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response.status_code == 400
        page = await text(response)
        assert "The name was not sent as UTF-8" in page
        assert form_inputs(page)["csrf_token"]["value"] == token
        assert await no_user(client)
    assert smtp_server.connections == 0


@pytest.mark.parametrize("name", ["x" * 64, "张" * 64], ids=["ascii", "cjk"])
async def test_form_accepts_64_characters_after_trimming(
    name: str, smtp_server: SMTPTestServer, database_url: str
) -> None:
    app = make_app(smtp_server, database_url)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert_redirect_home(await post_name(client, f"  {name}\t "))
        assert f"Hello, {name}!" in await get_page(client)
        user = await (await client.get("/api/users/1")).get_json()
        assert user == {"id": 1, "name": name}
    [received] = smtp_server.messages
    assert_admin_mail(received, name)


# --- 4. CSRF ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["missing", "wrong", "another-visitors", "no-session", "non-ascii"]
)
async def test_form_without_the_sessions_csrf_token_is_rejected(
    case: str, smtp_server: SMTPTestServer, database_url: str
) -> None:
    app = make_app(smtp_server, database_url)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        form = {"name": "Mallory"}
        if case == "missing":
            await csrf_token(client)  # the visitor has a session, and a token
        elif case == "wrong":
            form["csrf_token"] = (await csrf_token(client))[::-1]
        elif case == "non-ascii":
            # hmac.compare_digest refuses non-ASCII text: that was a 500.
            form["csrf_token"] = "é" + (await csrf_token(client))[1:]
        elif case == "another-visitors":
            form["csrf_token"] = await csrf_token(test_app.test_client())
            await csrf_token(client)
        else:
            form["csrf_token"] = "made-up-token"
        response = await client.post("/", form=form)
        assert response.status_code == 400
        assert "did not come from this site" in await text(response)
        assert await no_user(client)
        assert "Hello, Stranger!" in await get_page(client)
    assert smtp_server.connections == 0


# --- 5. the JSON API --------------------------------------------------------------------


async def test_api_sign_up_and_look_up(smtp_server: SMTPTestServer, database_url: str) -> None:
    app = make_app(smtp_server, database_url)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        response = await client.post("/api/users", json={"name": "Alice"})
        assert response.status_code == 201
        created = await response.get_json()
        assert created == {"id": created["id"], "name": "Alice"}
        assert isinstance(created["id"], int)
        [received] = await smtp_server.wait_for_messages(1)
        assert_admin_mail(received, "Alice")

        response = await client.post("/api/users", json={"name": "  Alice "})
        assert response.status_code == 200
        assert await response.get_json() == created

        response = await client.get(f"/api/users/{created['id']}")
        assert response.status_code == 200
        assert await response.get_json() == created

        response = await client.get("/api/users/999")
        assert response.status_code == 404
        assert response.content_type == "application/json"
        assert "999" in (await response.get_json())["error"]
    assert len(smtp_server.messages) == 1


def json_bytes(body: bytes, content_type: str = "application/json") -> dict[str, Any]:
    """Test client arguments posting *body* as is, as JSON."""
    return {"data": body, "headers": {"Content-Type": content_type}}


BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    # (id, test client arguments, what the error must mention: a regex on the lowercased body)
    ("missing-name", {"json": {}}, r"name.*required|required.*name"),
    ("name-number", {"json": {"name": 123}}, r"string"),
    ("name-null", {"json": {"name": None}}, r"string"),
    ("name-list", {"json": {"name": ["Alice"]}}, r"string"),
    ("name-empty", {"json": {"name": ""}}, r"enter your name"),
    ("name-whitespace", {"json": {"name": " \t "}}, r"enter your name"),
    ("name-65-chars", {"json": {"name": "x" * 65}}, r"at most 64"),
    ("extra-field", {"json": {"name": "x", "admin": True}}, r"admin.*(extra|not permitted)"),
    (
        "malformed-json",
        {"data": '{"name": "x"', "headers": {"Content-Type": "application/json"}},
        r"json",
    ),
    ("json-array", {"json": [{"name": "x"}]}, r"object|dictionary"),
    ("no-body", {}, r"json"),
    ("form-encoded", {"form": {"name": "x"}}, r"json"),
    # Bodies that gave a 500 (issue 9): JSON is UTF-8 only (RFC 8259, 8.1) ...
    ("invalid-utf8", json_bytes(b'{"name": "Jos\xe9"}'), r"utf-8.*byte 13"),
    (
        "latin-1-charset",
        json_bytes('{"name": "José"}'.encode("latin-1"), "application/json; charset=ISO-8859-1"),
        r"utf-8.*iso-8859-1",
    ),
    (
        "utf-16-charset",
        json_bytes('{"name": "x"}'.encode("utf-16"), "application/json; charset=utf-16"),
        r"utf-8.*utf-16",
    ),
    # ... nested deeper than the parser's recursion limit, whole or in the field ...
    ("nested-30000-deep", json_bytes(b"[" * 30_000 + b"]" * 30_000), r"nested too deeply"),
    (
        "name-nested-30000-deep",
        json_bytes(b'{"name": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"),
        r"nested too deeply",
    ),
    # ... and a lone surrogate, which no database or mail can encode.
    ("lone-surrogate", {"json": {"name": "\ud800"}}, r"surrogate"),
    ("lone-low-surrogate", {"json": {"name": "Ann \udfff Lee"}}, r"surrogate"),
    ("replacement-char", {"json": {"name": "Jos\ufffd"}}, r"u\+fffd"),
]


@pytest.mark.parametrize(
    ("body", "mentions"), [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES]
)
async def test_api_rejects_a_bad_body_with_a_json_error(
    body: dict[str, Any], mentions: str, smtp_server: SMTPTestServer, database_url: str
) -> None:
    app = make_app(smtp_server, database_url)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        response = await client.post("/api/users", **body)
        # 415 for a charset other than UTF-8 (RFC 9110, 15.5.16).
        assert response.status_code in (400, 415, 422), await text(response)
        assert response.content_type == "application/json"
        error = await response.get_json()
        assert isinstance(error, dict) and isinstance(error.get("error"), str), error
        said = json.dumps(error, ensure_ascii=False).lower()
        assert re.search(mentions, said), f"the error does not say what is wrong: {said}"
        assert await no_user(client)
    assert smtp_server.connections == 0


@pytest.mark.parametrize("user_id", [2**31, 2**63, 2**64, 10**30])
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_api_user_ids_past_the_column_range_are_a_json_404(
    user_id: int, backend: str, smtp_server: SMTPTestServer, database_url: str
) -> None:
    # User.id is 32 bits on PostgreSQL and 64 on SQLite: the drivers raised on larger ids.
    url = database_url
    if backend == "postgresql":
        url = await postgres_url()
        engine = create_async_engine(url)
        await empty_database(engine)  # the app migrates an empty database at start-up
        await engine.dispose()
    app = make_app(smtp_server, url)
    async with app.test_app() as test_app:
        response = await test_app.test_client().get(f"/api/users/{user_id}")
        assert response.status_code == 404, await text(response)
        assert response.content_type == "application/json"
        assert await response.get_json() == {"error": f"No user with id {user_id}."}


async def test_api_wrong_method_gets_a_json_405_with_allow(
    smtp_server: SMTPTestServer, database_url: str
) -> None:
    # api.py's error handler promises "a wrong method...: JSON, not an HTML page";
    # and a 405 must say which methods are allowed (RFC 9110, 15.5.6).
    app = make_app(smtp_server, database_url)
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/api/users")
        assert response.status_code == 405
        assert "POST" in response.headers.get("Allow", ""), dict(response.headers)
        assert response.content_type == "application/json", (await text(response))[:200]
        assert isinstance((await response.get_json())["error"], str)


async def test_openapi_lists_the_api_and_hides_the_html_routes(
    smtp_server: SMTPTestServer, database_url: str
) -> None:
    app = make_app(smtp_server, database_url)
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/openapi.json")
        assert response.status_code == 200
        spec = await response.get_json()
    paths = spec["paths"]
    assert "/api/users" in paths and "/api/users/{user_id}" in paths
    schema = paths["/api/users"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["name"]
    assert schema["properties"]["name"]["type"] == "string"
    assert "/" not in paths
    assert all(path.startswith("/api/") for path in paths), sorted(paths)


# --- 6. the response never waits on SMTP -------------------------------------------------


async def test_response_does_not_wait_for_a_slow_smtp_server(
    smtp_server_factory: SMTPServerFactory, database_url: str
) -> None:
    server = await smtp_server_factory(tls="starttls", auth=(USER, PASSWORD))
    server.data_delay = 2.0
    app = make_app(server, database_url)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        response = await post_name(client, "Slowpoke")
        assert_redirect_home(response)
        # The redirect is here and the server has not even been given the message.
        assert server.data_attempts == 0
        assert server.messages == []
        assert "Pleased to meet you!" in await get_page(client)
    # The shutdown waited for the slow server: the mail was delivered, not dropped.
    [received] = server.messages
    assert_admin_mail(received, "Slowpoke")


# --- 7. no admin, no mail ---------------------------------------------------------------


async def test_without_flasky_admin_sign_ups_are_stored_and_nothing_is_sent(
    smtp_server: SMTPTestServer, database_url: str
) -> None:
    app = make_app(smtp_server, database_url, FLASKY_ADMIN=None)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert_redirect_home(await post_name(client, "张伟"))
        assert "Pleased to meet you!" in await get_page(client)
        response = await client.post("/api/users", json={"name": "Alice"})
        assert response.status_code == 201
        user = await response.get_json()
        assert await (await client.get(f"/api/users/{user['id']}")).get_json() == user
        assert await (await client.get("/api/users/1")).get_json() == {"id": 1, "name": "张伟"}
    assert smtp_server.messages == []
    assert smtp_server.connections == 0


# --- 8. production start-up -------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({"MAIL_SERVER": "smtp.example.com"}, ["SECRET_KEY"]),
        ({"SECRET_KEY": "k" * 32}, ["MAIL_SERVER"]),
        ({}, ["SECRET_KEY", "MAIL_SERVER"]),
        ({"SECRET_KEY": "", "MAIL_SERVER": "smtp.example.com"}, ["SECRET_KEY"]),
    ],
    ids=["no-secret-key", "no-mail-server", "neither", "empty-secret-key"],
)
def test_production_refuses_to_start_without_its_settings(
    given: dict[str, str], missing: list[str], database_url: str
) -> None:
    with pytest.raises(RuntimeError) as raised:
        create_app("production", DATABASE_URL=database_url, **given)
    said = str(raised.value)
    for key in ("SECRET_KEY", "MAIL_SERVER"):
        assert (key in said) == (key in missing), said


async def test_production_builds_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, smtp_server: SMTPTestServer, database_url: str
) -> None:
    monkeypatch.setenv("SECRET_KEY", "production-secret-key-from-env")
    monkeypatch.setenv("MAIL_SERVER", smtp_server.host)
    monkeypatch.setenv("MAIL_PORT", str(smtp_server.port))
    monkeypatch.setenv("FLASKY_ADMIN", ADMIN)
    monkeypatch.setenv("DATABASE_URL", database_url)
    app = create_app("production")
    assert not app.testing and not app.debug
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert_redirect_home(await post_name(client, "Prod"))
        assert (await client.get("/dev/inbox/")).status_code == 404
    [received] = smtp_server.messages
    assert_admin_mail(received, "Prod")


def test_unknown_config_name_is_an_error(database_url: str) -> None:
    with pytest.raises(ValueError, match="staging"):
        create_app("staging", DATABASE_URL=database_url)


def test_a_bad_mail_setting_in_development_leaves_no_socket_open(database_url: str) -> None:
    # The development SMTP server binds its socket in create_app, before Mail checks the
    # MAIL_* settings; a ConfigError must not leave that socket behind (a ResourceWarning,
    # an error under filterwarnings=error, once the app is collected).
    with pytest.raises(ConfigError, match="MAIL_POOL_SIZE"):
        create_app("development", DATABASE_URL=database_url, MAIL_POOL_SIZE="lots")
    gc.collect()


# --- 9. environment and overrides --------------------------------------------------------


async def test_settings_come_from_the_environment_and_overrides_win(
    monkeypatch: pytest.MonkeyPatch, smtp_server: SMTPTestServer, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLASKY_MAIL_SUBJECT_PREFIX", "[Env] ")
    monkeypatch.setenv("FLASKY_ADMIN", "env-admin@example.com")
    monkeypatch.setenv("MAIL_SERVER", smtp_server.host)
    monkeypatch.setenv("MAIL_PORT", str(smtp_server.port))
    monkeypatch.setenv("MAIL_SUPPRESS_SEND", "false")
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/env.db")

    app = create_app("testing")
    async with app.test_app() as test_app:
        assert_redirect_home(await post_name(test_app.test_client(), "Env"))
    [from_env] = smtp_server.messages
    assert from_env.parsed()["Subject"] == "[Env] New User"
    assert from_env.rcpt_tos == ["env-admin@example.com"]
    assert (tmp_path / "env.db").is_file()

    app = create_app("testing", FLASKY_MAIL_SUBJECT_PREFIX="[Override] ", FLASKY_ADMIN=ADMIN)
    async with app.test_app() as test_app:
        assert_redirect_home(await post_name(test_app.test_client(), "Override"))
    assert len(smtp_server.messages) == 2
    overridden = smtp_server.messages[1]
    assert overridden.parsed()["Subject"] == "[Override] New User"
    assert overridden.rcpt_tos == [ADMIN]


# --- 10. the development inbox -----------------------------------------------------------


async def test_development_catches_mail_in_the_dev_inbox(database_url: str) -> None:
    app = create_app("development", DATABASE_URL=database_url)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert_redirect_home(await post_name(client, "张伟"))
        assert_redirect_home(await post_name(client, "<script>alert(1)</script>"))

        async def both_caught() -> bool:
            return (await get_page(client, "/dev/inbox/")).count("[Flasky] New User") == 2

        await poll(both_caught)
        inbox = await get_page(client, "/dev/inbox/")
        assert ADMIN in inbox
        links = re.findall(r'href="(/dev/inbox/\d+)"', inbox)
        assert len(links) == 2
        # Background mail goes out over a pool: the two may be caught in either order.
        pages = {link: await get_page(client, link) for link in links}
        [first] = [link for link, page in pages.items() if "张伟" in page]
        [second] = [link for link in links if link != first]

        page = pages[first]
        assert "User 张伟 has joined." in page  # the text part
        assert "<th>Subject</th><td>[Flasky] New User</td>" in page
        assert "<th>From</th><td>Flasky Admin &lt;flasky@example.com&gt;</td>" in page
        assert f"<th>To</th><td>{ADMIN}</td>" in page
        assert f'<iframe sandbox="" src="{first}/html"' in page
        assert "<p>User <b>张伟</b> has joined.</p>" in await get_page(client, f"{first}/html")

        # A hostile name stays text everywhere on the page, the framed HTML included.
        page = await get_page(client, second)
        assert "<script>" not in page
        assert "<script>" not in await get_page(client, f"{second}/html")

        assert (await client.get("/dev/inbox/999")).status_code == 404


@pytest.mark.parametrize("config_name", ["testing", "production", "development"])
async def test_dev_inbox_only_without_a_mail_server_in_development(
    config_name: str, smtp_server: SMTPTestServer, database_url: str
) -> None:
    # With MAIL_SERVER set even development sends to it, and has no inbox page.
    app = create_app(
        config_name,
        DATABASE_URL=database_url,
        SECRET_KEY="k" * 32,
        FLASKY_ADMIN=ADMIN,
        **smtp_server.mail_config(),  # MAIL_SUPPRESS_SEND=False included
    )
    async with app.test_app() as test_app:
        client = test_app.test_client()
        response = await client.get("/dev/inbox/")
        assert response.status_code == 404
        assert_redirect_home(await post_name(client, "Dora"))
    [received] = smtp_server.messages
    assert_admin_mail(received, "Dora")


# --- 11. templates and error pages -------------------------------------------------------


async def test_unknown_page_gets_the_html_404_page(
    smtp_server: SMTPTestServer, database_url: str
) -> None:
    app = make_app(smtp_server, database_url)
    async with app.test_app() as test_app:
        response = await test_app.test_client().get("/no-such-page")
        assert response.status_code == 404
        assert response.content_type.startswith("text/html")
        page = await text(response)
    assert "<title>404 Not Found</title>" in page
    assert "<h1>404 Not Found</h1>" in page
    assert 'href="/"' in page  # the site's own layout (base.html)


async def test_wrong_method_gets_the_html_405_page_with_allow(
    smtp_server: SMTPTestServer, database_url: str
) -> None:
    app = make_app(smtp_server, database_url)
    async with app.test_app() as test_app:
        response = await test_app.test_client().put("/", form={"name": "x"})
        assert response.status_code == 405
        assert response.content_type.startswith("text/html")
        assert "<h1>405 Method Not Allowed</h1>" in await text(response)
        allowed = {m.strip() for m in response.headers.get("Allow", "").split(",")}
        assert {"GET", "POST"} <= allowed, dict(response.headers)
    assert smtp_server.connections == 0


# --- 12. the database --------------------------------------------------------------------


def sqlite_tables(path: Path) -> set[str]:
    with closing(sqlite3.connect(path)) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {row[0] for row in rows}


async def test_tables_are_created_at_start_up_and_users_survive_a_restart(
    smtp_server: SMTPTestServer, tmp_path: Path, database_url: str
) -> None:
    database = tmp_path / "app.db"
    assert not database.exists()
    app = make_app(smtp_server, database_url)
    async with app.test_app() as test_app:
        assert "users" in sqlite_tables(database)  # before any request
        response = await test_app.test_client().post("/api/users", json={"name": "Alice"})
        assert response.status_code == 201
        alice = await response.get_json()

    # A restart: a new app on the same file.
    app = make_app(smtp_server, database_url)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert await (await client.get(f"/api/users/{alice['id']}")).get_json() == alice
        response = await client.post("/api/users", json={"name": "Alice"})
        assert response.status_code == 200
        assert await response.get_json() == alice
        assert_redirect_home(await post_name(client, "Alice"))
        assert "Happy to see you again!" in await get_page(client)
    [received] = smtp_server.messages  # one new user, one mail, across both runs
    assert_admin_mail(received, "Alice")


# --- 13. the command line ----------------------------------------------------------------

APP_SPEC = "quartmail.app:create_app('testing')"


async def run_quart(cwd: Path, *args: str, **env: str) -> tuple[int, str, str]:
    """Run ``python -m quart --app APP_SPEC *args`` with *env* added; awaited, so that the
    SMTP test server in this loop keeps serving meanwhile."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "quart",
        "--app",
        APP_SPEC,
        *args,
        cwd=cwd,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.communicate()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def mail_environment(server: SMTPTestServer) -> dict[str, str]:
    """The server's MAIL_* settings as environment variables (strings)."""
    env: dict[str, str] = {}
    for key, value in server.mail_config().items():
        if value is None:
            continue
        env[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


async def test_cli_create_db_migrates_the_schema(tmp_path: Path, database_url: str) -> None:
    database = tmp_path / "app.db"
    code, out, err = await run_quart(tmp_path, "create-db", DATABASE_URL=database_url)
    assert code == 0, err
    assert "app0002 (head)" in out and str(database) in out
    assert "users" in sqlite_tables(database)


async def test_cli_send_test_mail_over_starttls_and_auth(
    smtp_server_factory: SMTPServerFactory, tmp_path: Path, database_url: str
) -> None:
    server = await smtp_server_factory(tls="starttls", auth=(USER, PASSWORD))
    code, out, err = await run_quart(
        tmp_path,
        "send-test-mail",
        "someone@example.com",
        DATABASE_URL=database_url,
        **mail_environment(server),
    )
    assert code == 0, err
    [received] = server.messages
    message = received.parsed()
    assert received.rcpt_tos == ["someone@example.com"]
    assert received.tls and received.login == USER
    assert message["From"] == SENDER
    assert message["Message-ID"] in out
    assert "someone@example.com" in out
    assert PASSWORD not in out + err


@pytest.mark.parametrize("failure", ["connection-refused", "wrong-password"])
async def test_cli_send_test_mail_failure_is_clear_and_hides_the_password(
    failure: str, smtp_server_factory: SMTPServerFactory, tmp_path: Path, database_url: str
) -> None:
    server = await smtp_server_factory(tls="starttls", auth=(USER, "the-right-password"))
    env = {**mail_environment(server), "MAIL_PASSWORD": PASSWORD}
    if failure == "connection-refused":
        await server.stop()  # nothing listens on its port any more
    code, out, err = await run_quart(
        tmp_path, "send-test-mail", "someone@example.com", DATABASE_URL=database_url, **env
    )
    assert code != 0
    assert "Not sent" in err and f"{server.host}:{server.port}" in err, err
    if failure == "wrong-password":
        assert "535" in err, err
    assert "Traceback" not in err
    assert PASSWORD not in out + err
    assert server.messages == []
