"""The sign-up app's address confirmation and abuse limits (issue 16), checked as a user would:
through the test client, with the app's real lifespan, a real SMTP test server, and a real
SQLite file or PostgreSQL database (both, where the database does the work: the limits).

A visitor may give an e-mail address; the app mails a signed, expiring link; opening it shows
a page (a mail scanner opening it confirms nothing) whose button confirms. At most
``FLASKY_CONFIRM_MAILS_PER_HOUR`` confirmation mails go to one address and
``FLASKY_SIGNUPS_PER_HOUR`` sign-ups with an address come from one client in an hour; past
them the answer is 429 and nothing is stored or sent. Nothing tells a stranger whether an
address has signed up already.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from quart import Quart, Response
from quart.typing import TestClientProtocol as Client
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from quartmail import ConfigError, SuppressedError, email_failed
from quartmail.app import create_app
from quartmail.app.confirm import SALT, ConfirmTokens
from quartmail.app.extensions import mail
from quartmail.app.limits import WINDOW, Limit, LimitReachedError, address_key, client_key, take
from quartmail.app.models import User
from quartmail.testing import ReceivedMessage, SMTPTestServer
from quartmail.unsubscribe import UnsubscribeTokens

ADMIN = "admin@example.com"
CONFIRM_SUBJECT = "[Flasky] Confirm Your Address"
SECRET = "testing-only-secret-key"  # the testing config's
WITHIN = 10.0  # seconds: the bound on every wait for mail


pytestmark = pytest.mark.usefixtures("no_app_settings")


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


@pytest.fixture
async def client(smtp_server: SMTPTestServer, database_url: str) -> AsyncIterator[Client]:
    """A test client of the app (outbox off), served through its real lifespan."""
    async with make_app(smtp_server, database_url).test_app() as test_app:
        yield test_app.test_client()


async def text(response: Response) -> str:
    return await response.get_data(as_text=True)


async def csrf_token(client: Client, path: str = "/") -> str:
    page = await text(await client.get(path))
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, page
    return match[1]


async def sign_up_form(client: Client, name: str, email: str) -> Response:
    """Fill in the form on / and submit it, as a browser does."""
    form = {"csrf_token": await csrf_token(client), "name": name, "email": email}
    response: Response = await client.post("/", form=form)
    return response


async def sign_up_api(
    client: Client, name: str, email: str | None = None, client_ip: str = "192.0.2.1"
) -> Response:
    body = {"name": name} if email is None else {"name": name, "email": email}
    response: Response = await client.post("/api/users", json=body, scope_base=peer(client_ip))
    return response


def peer(ip: str) -> dict[str, Any]:
    """The ASGI scope of a connection from *ip* (request.remote_addr)."""
    return {"client": (ip, 40000)}


def confirmations(server: SMTPTestServer) -> list[ReceivedMessage]:
    return [message for message in server.messages if message.subject == CONFIRM_SUBJECT]


def admin_mails(server: SMTPTestServer) -> list[ReceivedMessage]:
    return [message for message in server.messages if message.rcpt_tos == [ADMIN]]


def confirm_path(message: ReceivedMessage) -> str:
    """The path of the confirmation link, the same in the text and the HTML part."""
    assert message.text is not None
    [url] = re.findall(r"https?://\S+/confirm/\S+", message.text)
    assert url in message.links
    path: str = urlsplit(url).path
    return path


async def confirmed_at(database_url: str, name: str) -> object:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            return (
                await connection.execute(select(User.confirmed_at).where(User.username == name))
            ).scalar_one()
    finally:
        await engine.dispose()


def old_token(user_id: int, email: str, age: float, secret: str = SECRET) -> str:
    """A confirmation token signed *age* seconds ago, as the app signed it then."""

    class Then(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time() - age)

    token: str = URLSafeTimedSerializer(secret, salt=SALT, signer=Then).dumps([user_id, email])
    return token


# --- 1. the whole flow ------------------------------------------------------------------


@pytest.mark.parametrize("outbox", [False, True], ids=["background", "outbox"])
async def test_form_sign_up_mails_a_link_whose_page_confirms_only_on_post(
    outbox: bool, smtp_server: SMTPTestServer, database_url: str
) -> None:
    app = make_app(smtp_server, database_url, MAIL_OUTBOX=outbox, MAIL_OUTBOX_POLL=0.05)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        response = await sign_up_form(client, "Ada", "  Ada.Lovelace@Example.COM ")
        assert response.status_code == 303
        page = await text(await client.get("/"))
        assert "Hello, Ada!" in page
        assert "We have sent a confirmation link to <b>Ada.Lovelace@example.com</b>" in page

        await smtp_server.wait_for_messages(2, timeout=WITHIN)
        [mail] = confirmations(smtp_server)
        assert mail.rcpt_tos == ["Ada.Lovelace@example.com"]  # the domain normalized
        assert mail.parsed()["To"] == "Ada.Lovelace@example.com"
        assert mail.text is not None and "Dear Ada," in mail.text
        assert len(admin_mails(smtp_server)) == 1  # the notice, unchanged
        path = confirm_path(mail)

        # What a mail scanner does: open the link, twice. Nothing is confirmed.
        for _ in range(2):
            response = await client.get(path)
            assert response.status_code == 200
            assert response.headers["Cache-Control"] == "no-store"
            assert response.headers["Referrer-Policy"] == "no-referrer"
            page = await text(response)
            assert "<h1>Confirm your address</h1>" in page
            assert '<button type="submit">Confirm</button>' in page
        assert await confirmed_at(database_url, "Ada") is None

        # What the owner does: press the button. Again: still confirmed, nothing else.
        for _ in range(2):
            response = await client.post(path)
            assert response.status_code == 200
            page = await text(response)
            assert "<h1>Address confirmed</h1>" in page
            assert "Ada.Lovelace@example.com</b> is confirmed" in page
        assert await confirmed_at(database_url, "Ada") is not None
    assert len(smtp_server.messages) == 2


async def test_api_sign_up_with_an_address_and_confirm(
    smtp_server: SMTPTestServer, client: Client, database_url: str
) -> None:
    response = await sign_up_api(client, "Grace", "grace@bücher.example")
    assert response.status_code == 201
    assert await response.get_json() == {"id": 1, "name": "Grace"}
    await smtp_server.wait_for_messages(2, timeout=WITHIN)
    [mail] = confirmations(smtp_server)
    # An IDNA domain: shown as typed, sent as its A-label (RFC 5890).
    assert mail.rcpt_tos == ["grace@xn--bcher-kva.example"]
    token = confirm_path(mail).rpartition("/")[2]

    response = await client.post("/api/confirm", json={"token": token})
    assert response.status_code == 200
    assert await response.get_json() == {"id": 1, "name": "Grace"}
    assert await confirmed_at(database_url, "Grace") is not None


async def test_name_only_sign_up_sends_no_confirmation(
    smtp_server: SMTPTestServer, client: Client
) -> None:
    assert (await sign_up_api(client, "Alan")).status_code == 201
    page = await text(await client.get("/"))
    assert "confirmation" not in page.split("<form")[0]
    await smtp_server.wait_for_messages(1, timeout=WITHIN)
    assert confirmations(smtp_server) == []


async def test_a_known_name_with_an_address_changes_and_sends_nothing(
    smtp_server: SMTPTestServer, client: Client
) -> None:
    assert (await sign_up_api(client, "Alan")).status_code == 201
    response = await sign_up_api(client, "Alan", "alan@example.com")
    assert response.status_code == 200
    await smtp_server.wait_for_messages(1, timeout=WITHIN)
    response = await client.post("/api/confirm/resend", json={"email": "alan@example.com"})
    assert response.status_code == 202
    assert confirmations(smtp_server) == []


async def test_the_longest_addresses_sign_up(smtp_server: SMTPTestServer, client: Client) -> None:
    longest = "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 57 + ".com"
    assert len(longest) == 254  # RFC 5321 section 4.5.3.1.3, less the angle brackets
    # German sharp s: case-folded ("ss") it grows, which the limits' keys must not mind.
    sharp = "ß" * 32 + "@" + "ß" * 40 + ".example"
    # IDNA 2008 keeps it (RFC 5892): the mail goes to that domain, not to "ssss...".
    a_label = "xn--zca" + "a" * 39 + ".example"
    for n, address in enumerate([longest, sharp]):
        response = await sign_up_api(client, f"user {n}", address)
        assert response.status_code == 201, await response.get_json()
    await smtp_server.wait_for_messages(4, timeout=WITHIN)
    assert sorted(m.rcpt_tos[0].partition("@")[2] for m in confirmations(smtp_server)) == [
        longest.partition("@")[2],
        a_label,
    ]


# --- 2. bad addresses -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("email", "says"),
    [
        ("not-an-address", "An email address must have an @-sign"),
        ("ann@", "There must be something after the @-sign"),
        ("ann@example", "The part after the @-sign is not valid"),
        ("a" * 65 + "@example.com", "too long"),
        ("ann@" + "a" * 250 + ".com", "too long"),
        ("x" * 2000, "at most 254 characters"),
        ("ann@exa mple.com", "invalid characters: SPACE"),
        # 40 characters, 80 octets: what the mail library would refuse to send to.
        ("é" * 40 + "@example.com", "the local part is 80 octets (at most 64)"),
        ("ann\ud800@example.com", "not a valid e-mail address"),
        ("ann\ufffd@example.com", "not sent as UTF-8"),
    ],
)
async def test_bad_addresses_are_a_clear_error_and_nothing_is_stored(
    email: str, says: str, smtp_server: SMTPTestServer, client: Client
) -> None:
    response = await client.post("/api/users", json={"name": "Eve", "email": email})
    assert response.status_code == 422
    body = await response.get_json()
    assert body["errors"][0]["loc"] == ["email"]
    assert says in body["errors"][0]["msg"]

    if email.isprintable() and "\ud800" not in email:  # what a form can carry
        response = await sign_up_form(client, "Eve", email)
        assert response.status_code == 400
        assert says in await text(response)

    response = await client.post("/api/confirm/resend", json={"email": email})
    assert response.status_code == 422
    assert (await client.get("/api/users/1")).status_code == 404
    assert smtp_server.messages == []


# --- 3. tokens --------------------------------------------------------------------------


async def test_expired_and_tampered_tokens_get_a_clear_page_and_confirm_nothing(
    smtp_server: SMTPTestServer, client: Client, database_url: str
) -> None:
    assert (await sign_up_api(client, "Ada", "ada@example.com")).status_code == 201
    await smtp_server.wait_for_messages(2, timeout=WITHIN)
    good = confirm_path(confirmations(smtp_server)[0]).rpartition("/")[2]

    expired = old_token(1, "ada@example.com", age=86400 + 60)
    tampered = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
    other_address = ConfirmTokens({"SECRET_KEY": SECRET, "FLASKY_CONFIRM_MAX_AGE": 60}).make(
        1, "mallory@example.com"
    )
    unsubscribe = UnsubscribeTokens(SECRET).make("ada@example.com", "news")  # another salt
    unknown_user = ConfirmTokens({"SECRET_KEY": SECRET, "FLASKY_CONFIRM_MAX_AGE": 60}).make(
        7, "ada@example.com"
    )
    for token, status, title in [
        (expired, 410, "Link expired"),
        (tampered, 400, "Link not valid"),
        (other_address, 400, "Link not valid"),
        (unsubscribe, 400, "Link not valid"),
        (unknown_user, 400, "Link not valid"),
        ("x" * 5000, 400, "Link not valid"),
        ("ä.b.c", 400, "Link not valid"),
    ]:
        for send in (client.get, client.post):
            response = await send(f"/confirm/{token}")
            assert response.status_code == status, (token, send)
            page = await text(response)
            assert f"<h1>{title}</h1>" in page
            assert 'href="/confirm/resend"' in page
        response = await client.post("/api/confirm", json={"token": token})
        assert response.status_code == status
        assert (await response.get_json())["error"].startswith("This confirmation link")
    # A lone surrogate, which JSON can carry ("\ud800") and UTF-8 cannot.
    response = await client.post("/api/confirm", json={"token": "\ud800"})
    assert response.status_code == 400
    assert await confirmed_at(database_url, "Ada") is None


async def test_a_token_signed_before_the_key_was_rotated_still_confirms(
    smtp_server: SMTPTestServer, database_url: str
) -> None:
    app = make_app(smtp_server, database_url, SECRET_KEY="new", SECRET_KEY_FALLBACKS=["old"])
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert (await sign_up_api(client, "Ada", "ada@example.com")).status_code == 201
        token = old_token(1, "ada@example.com", age=60, secret="old")
        response = await client.post("/api/confirm", json={"token": token})
        assert response.status_code == 200
        # And the other way round: a token of the old key's only, once it is dropped.
        response = await client.post(
            "/api/confirm", json={"token": old_token(1, "ada@example.com", 60, secret="older")}
        )
        assert response.status_code == 400


# --- 4. the limits ----------------------------------------------------------------------


async def test_the_fourth_confirmation_mail_to_an_address_in_an_hour_is_refused(
    smtp_server: SMTPTestServer, database_url: str
) -> None:
    async with make_app(smtp_server, database_url).test_app() as test_app:
        client = test_app.test_client()
        # Case and sub-addresses (RFC 5233) are one inbox; each sign-up is from a new client.
        addresses = ["victim@example.com", "Victim+a@example.com", "victim+b@EXAMPLE.com"]
        for n, address in enumerate(addresses):
            response = await sign_up_api(client, f"user {n}", address, f"192.0.2.{n}")
            assert response.status_code == 201
        response = await sign_up_api(client, "user 3", "VICTIM+c@example.com", "198.51.100.9")
        assert response.status_code == 429
        assert 3000 < int(response.headers["Retry-After"]) <= 3600
        error = (await response.get_json())["error"]
        assert "Too many confirmation mails have gone to this address" in error
        assert "Nothing was sent" in error
        assert (await client.get("/api/users/4")).status_code == 404  # not stored

        # The form says the same on a page, and the resend is held to the same limit.
        response = await sign_up_form(client, "user 4", "victim@example.com")
        assert response.status_code == 429
        assert "Too many confirmation mails have gone to this address" in await text(response)
        response = await client.post("/api/confirm/resend", json={"email": "victim@example.com"})
        assert response.status_code == 429
        # Another address is not held back.
        assert (await sign_up_api(client, "user 5", "other@example.com")).status_code == 201
    # The shutdown drained the mail: 4 confirmations, 4 notices, and nothing else.
    assert len(confirmations(smtp_server)) == 4
    assert len(admin_mails(smtp_server)) == 4
    assert len(smtp_server.messages) == 8


async def test_the_twenty_first_sign_up_from_one_client_in_an_hour_is_refused(
    smtp_server: SMTPTestServer, client: Client
) -> None:
    for n in range(20):
        response = await sign_up_api(client, f"user {n}", f"user{n}@example.com")
        assert response.status_code == 201
    response = await sign_up_api(client, "user 20", "user20@example.com")
    assert response.status_code == 429
    assert "from your network" in (await response.get_json())["error"]
    response = await client.post(
        "/api/confirm/resend",
        json={"email": "user1@example.com"},
        scope_base=peer("192.0.2.1"),
    )
    assert response.status_code == 429
    # Name-only sign-ups send no stranger mail and are not limited; other clients are not.
    assert (await sign_up_api(client, "user 21")).status_code == 201
    assert (await sign_up_api(client, "user 22", "u22@example.com", "192.0.2.2")).status_code == 201
    await smtp_server.wait_for_messages(20 + 22 + 1, timeout=WITHIN)
    assert len(confirmations(smtp_server)) == 21


async def test_the_limits_hold_for_requests_at_once_in_two_processes(
    smtp_server: SMTPTestServer, database_url: str
) -> None:
    # Two apps on one database, each with its own engine, as two Hypercorn workers have.
    first, second = make_app(smtp_server, database_url), make_app(smtp_server, database_url)
    async with first.test_app() as one, second.test_app() as two:
        clients = [one.test_client(), two.test_client()]
        responses = await asyncio.gather(
            *(
                sign_up_api(clients[n % 2], f"user {n}", "victim@example.com", f"192.0.2.{n}")
                for n in range(10)
            )
        )
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [201] * 3 + [429] * 7
    assert len(confirmations(smtp_server)) == 3


async def test_limits_count_an_hour_back_and_forget_older_actions(database_url: str) -> None:
    app = create_app("testing", DATABASE_URL=database_url)
    async with app.test_app():
        engine = app.extensions["db"].engine

        async def take_now(limits: list[Limit], now: float) -> None:
            async with engine.connect() as connection:
                await take(connection, limits, now=now)
                await connection.commit()

        limit = Limit("address", "victim@example.com", 2)
        start = float(int(time.time()))
        await take_now([limit], start)
        await take_now([limit], start + 10)
        with pytest.raises(LimitReachedError) as caught:
            await take_now([limit], start + 20)
        assert caught.value.retry_after == WINDOW - 20
        # Both limits are taken, or neither: a full one leaves the other uncounted.
        other = Limit("client", "192.0.2.1", 1)
        with pytest.raises(LimitReachedError):
            await take_now([other, limit], start + 30)
        await take_now([other], start + 40)
        # A rolled-back transaction counts nothing.
        async with engine.connect() as connection:
            await take(connection, [limit], now=start + WINDOW + 1)
            await connection.rollback()
        # An hour after the first action, one is free again; and only one.
        await take_now([limit], start + WINDOW + 1)
        with pytest.raises(LimitReachedError):
            await take_now([limit], start + WINDOW + 2)
        await take_now([], start)  # no limits: nothing to do


def test_address_and_client_keys() -> None:
    assert address_key("Ann+news@Example.COM") == "ann@example.com"
    assert address_key("ann@bücher.example") == "ann@bücher.example"
    assert client_key("192.0.2.1", [], 0) == "192.0.2.1"
    assert client_key(None, [], 0) == "unknown"
    # An IPv6 client counts by its /64; an IPv4-mapped one as its IPv4 address.
    assert client_key("2001:db8:1:2:3:4:5:6", [], 0) == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.7", [], 0) == "192.0.2.7"
    # Behind one trusted proxy: the address it appended, not what the client wrote.
    forwarded = ["203.0.113.66, 198.51.100.1", "192.0.2.9"]
    assert client_key("10.0.0.1", forwarded, 1) == "192.0.2.9"
    assert client_key("10.0.0.1", forwarded, 2) == "198.51.100.1"
    assert client_key("10.0.0.1", forwarded, 0) == "10.0.0.1"
    assert client_key("10.0.0.1", [], 1) == "10.0.0.1"  # no header: the peer
    assert client_key("10.0.0.1", ["garbage"], 1) == "garbage"


async def test_the_trusted_proxy_setting_limits_the_forwarded_client(
    smtp_server: SMTPTestServer, database_url: str
) -> None:
    app = make_app(
        smtp_server, database_url, FLASKY_TRUSTED_PROXIES="1", FLASKY_SIGNUPS_PER_HOUR="1"
    )
    async with app.test_app() as test_app:
        client = test_app.test_client()

        async def sign_up(name: str, forwarded_for: str) -> int:
            response = await client.post(
                "/api/users",
                json={"name": name, "email": f"{name}@example.com"},
                headers={"X-Forwarded-For": forwarded_for},
                scope_base=peer("10.0.0.1"),
            )
            return response.status_code

        assert await sign_up("a", "192.0.2.1") == 201
        assert await sign_up("b", "192.0.2.2") == 201  # the same proxy, another client
        assert await sign_up("c", "198.51.100.1, 192.0.2.1") == 429  # a forged hop is ignored


# --- 5. no existence leak ---------------------------------------------------------------


async def test_answers_do_not_tell_whether_an_address_has_signed_up(
    smtp_server: SMTPTestServer, database_url: str
) -> None:
    # A limit that the two resends to each address stay under.
    app = make_app(smtp_server, database_url, FLASKY_CONFIRM_MAILS_PER_HOUR=10)
    async with app.test_app() as test_app:
        await _answers_do_not_tell(smtp_server, test_app.test_client())


async def _answers_do_not_tell(smtp_server: SMTPTestServer, client: Client) -> None:
    assert (await sign_up_api(client, "Ann", "ann@example.com")).status_code == 201
    await smtp_server.wait_for_messages(2, timeout=WITHIN)

    # Mallory gives Ann's address, then an unknown one: the same answers.
    known = await sign_up_api(client, "Mallory", "ann@example.com", "198.51.100.1")
    fresh = await sign_up_api(client, "Mallory 2", "nobody@example.com", "198.51.100.1")
    assert (known.status_code, fresh.status_code) == (201, 201)
    assert set(await known.get_json()) == set(await fresh.get_json()) == {"id", "name"}

    answers = []
    for email in ("ann@example.com", "unknown@example.com"):
        response = await client.post("/api/confirm/resend", json={"email": email})
        answers.append((response.status_code, await response.get_json()))
    assert answers[0] == answers[1]
    assert answers[0][0] == 202

    pages = []
    for email in ("ann@example.com", "unknown@example.com"):
        token = await csrf_token(client, "/confirm/resend")
        response = await client.post("/confirm/resend", form={"csrf_token": token, "email": email})
        assert response.status_code == 200
        pages.append((await text(response)).replace(email, "ADDRESS"))
    assert pages[0] == pages[1]
    assert "a new\nconfirmation link is on its way there" in pages[0]
    # Ann's inbox: her own confirmation, one for Mallory's sign-up, and the two resends,
    # which go to the latest unconfirmed sign-up with the address: Mallory's.
    await smtp_server.wait_for_messages(2 + 4 + 2, timeout=WITHIN)
    to_ann = [m for m in confirmations(smtp_server) if m.rcpt_tos == ["ann@example.com"]]
    assert [m.text and m.text.split(",")[0] for m in to_ann] == [
        "Dear Ann",
        "Dear Mallory",
        "Dear Mallory",
        "Dear Mallory",
    ]


# --- 6. settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("FLASKY_SIGNUPS_PER_HOUR", "many", "FLASKY_SIGNUPS_PER_HOUR must be a whole number"),
        ("FLASKY_CONFIRM_MAILS_PER_HOUR", "0", "FLASKY_CONFIRM_MAILS_PER_HOUR must be at least 1"),
        ("FLASKY_CONFIRM_MAX_AGE", True, "FLASKY_CONFIRM_MAX_AGE must be a whole number"),
        ("FLASKY_TRUSTED_PROXIES", "-1", "FLASKY_TRUSTED_PROXIES must be at least 0"),
    ],
)
def test_a_bad_limit_setting_stops_the_app_at_start_up(
    key: str, value: object, says: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=says):
        create_app("testing", DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/app.db", **{key: value})


def test_limit_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLASKY_SIGNUPS_PER_HOUR", "500")
    monkeypatch.setenv("FLASKY_TRUSTED_PROXIES", "2")
    app = create_app("testing", DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/app.db")
    assert app.config["FLASKY_SIGNUPS_PER_HOUR"] == 500
    assert app.config["FLASKY_TRUSTED_PROXIES"] == 2
    assert app.config["FLASKY_CONFIRM_MAILS_PER_HOUR"] == 3
    assert app.config["FLASKY_CONFIRM_MAX_AGE"] == 86400


async def test_openapi_describes_the_address_and_the_confirm_endpoints(client: Client) -> None:
    spec = await (await client.get("/openapi.json")).get_json()
    paths = spec["paths"]
    sign_up = paths["/api/users"]["post"]
    schema = sign_up["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["name"]  # the address is optional
    assert set(schema["properties"]) == {"name", "email"}
    assert {"201", "200", "422", "429"} <= set(sign_up["responses"])
    assert {"200", "400", "410", "422"} <= set(paths["/api/confirm"]["post"]["responses"])
    assert {"202", "422", "429"} <= set(paths["/api/confirm/resend"]["post"]["responses"])
    # The HTML pages are not part of the API.
    assert not any(path.startswith("/confirm") for path in paths)


@pytest.mark.parametrize("outbox", [False, True], ids=["background", "outbox"])
async def test_an_address_on_the_suppression_list_gets_no_mail(
    smtp_server: SMTPTestServer, database_url: str, outbox: bool
) -> None:
    # The sign-up answers as for any address (no leak); the administrator is told;
    # the confirmation is left out by the library (email_failed with SuppressedError).
    app = make_app(smtp_server, database_url, MAIL_OUTBOX=outbox)
    left_out = asyncio.Event()

    async def on_failed(sender: Quart, message: Any, error: Exception) -> None:
        if isinstance(error, SuppressedError) and "bounced@example.com" in error.suppressed:
            left_out.set()

    async with app.test_app() as test_app:
        async with app.app_context():
            await mail.suppression.add("bounced@example.com", "bounce", "550 5.1.1 in a test")
        with email_failed.connected_to(on_failed, sender=app):
            response = await sign_up_api(test_app.test_client(), "Ann", "bounced@example.com")
            assert response.status_code == 201
            await smtp_server.wait_for_messages(1, timeout=WITHIN)
            async with asyncio.timeout(WITHIN):
                await left_out.wait()
    assert len(admin_mails(smtp_server)) == 1
    assert confirmations(smtp_server) == []
    assert all("bounced@example.com" not in m.rcpt_tos for m in smtp_server.messages)
