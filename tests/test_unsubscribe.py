"""One-click unsubscribe (RFC 8058): tokens, the blueprint through Quart's test
client, and the List-Unsubscribe header values."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from quart import Quart
from quart.typing import TestClientProtocol as Client
from werkzeug.datastructures import Headers

from quartmail import BadHeaderError, ConfigError, Message, MessageError
from quartmail.unsubscribe import (
    SALT,
    UnsubscribeTokenError,
    UnsubscribeTokens,
    Unsubscription,
    list_unsubscribe_headers,
    unsubscribe_blueprint,
    unsubscribe_url,
)

SECRET = "test secret key"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}


class Suppressions:
    """The app's side: who left which list (a set, so repeats change nothing)."""

    def __init__(self) -> None:
        self.entries: set[tuple[str, str]] = set()
        self.calls = 0

    async def __call__(self, address: str, list_name: str) -> None:
        self.calls += 1
        self.entries.add((address, list_name))


@pytest.fixture
def tokens() -> UnsubscribeTokens:
    return UnsubscribeTokens(SECRET)


@pytest.fixture
def suppressions() -> Suppressions:
    return Suppressions()


@pytest.fixture
async def client(tokens: UnsubscribeTokens, suppressions: Suppressions) -> AsyncIterator[Client]:
    app = Quart(__name__)
    app.config["SECRET_KEY"] = SECRET
    app.register_blueprint(unsubscribe_blueprint(tokens, suppressions))
    async with app.test_app() as test_app:
        yield test_app.test_client()


def old_token(address: str, list_name: str, days: int) -> str:
    """A token signed *days* ago."""

    class Past(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - days * 86400

    serializer = URLSafeTimedSerializer(SECRET, salt=SALT, signer=Past)
    token: str = serializer.dumps([address, list_name])
    return token


def assert_plain_page(headers: Headers) -> None:
    assert "Set-Cookie" not in headers
    assert "Location" not in headers
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"


# Tokens.


def test_a_token_carries_the_address_and_list(tokens: UnsubscribeTokens) -> None:
    token = tokens.make("Ann Example <ann@example.com>", "new-users")
    assert tokens.check(token) == Unsubscription("ann@example.com", "new-users")
    # It goes in a URL path segment as it is.
    assert all(char.isalnum() or char in "-_." for char in token)


def test_bad_tampered_foreign_and_expired_tokens_are_refused(tokens: UnsubscribeTokens) -> None:
    token = tokens.make("ann@example.com", "news")
    signature = token.rpartition(".")[2]
    tampered = tokens.make("bob@example.com", "news").rpartition(".")[0] + "." + signature
    for bad in [
        "",
        "nonsense",
        token[:-2],
        tampered,
        UnsubscribeTokens("other").make("a@b.c", "x"),
        token + "\ud800",  # a lone surrogate: no UTF-8 for it, so no signature either
        "é" + token,
    ]:
        with pytest.raises(UnsubscribeTokenError) as caught:
            tokens.check(bad)
        assert not caught.value.expired
    # Another signed value of the app (another salt) is not a token.
    session_like = URLSafeTimedSerializer(SECRET, salt="cookie-session").dumps(["a@b.c", "x"])
    with pytest.raises(UnsubscribeTokenError):
        tokens.check(session_like)
    with pytest.raises(UnsubscribeTokenError, match="expired") as expired:
        tokens.check(old_token("ann@example.com", "news", days=91))
    assert expired.value.expired
    assert tokens.check(old_token("ann@example.com", "news", days=89)).address == "ann@example.com"


def test_tokens_are_read_as_itsdangerous_writes_them_and_back(tokens: UnsubscribeTokens) -> None:
    """Tokens carry their payload uncompressed (itsdangerous tries zlib on each, and keeps it
    only when it is shorter); itsdangerous reads either form, so a token made by its own
    serializer (a release before, another process) and one made here check alike."""
    itsdangerous = URLSafeTimedSerializer(SECRET, salt=SALT)
    repetitive = "a" * 60 + "@" + "example." * 8 + "com"  # zlib makes this one shorter
    for address in ("ann@example.com", repetitive):
        theirs = itsdangerous.dumps([address, "news"])
        ours = tokens.make(address, "news")
        assert not ours.startswith(".")
        assert tokens.check(theirs) == tokens.check(ours) == Unsubscription(address, "news")
        assert itsdangerous.loads(ours) == [address, "news"]
    assert itsdangerous.dumps([repetitive, "news"]).startswith(".")  # compressed


def test_rotated_keys_keep_old_tokens_working() -> None:
    old = UnsubscribeTokens.from_config({"SECRET_KEY": "old"}).make("ann@example.com", "news")
    rotated = UnsubscribeTokens.from_config({"SECRET_KEY": "new", "SECRET_KEY_FALLBACKS": ["old"]})
    assert rotated.check(old).address == "ann@example.com"
    fresh = rotated.make("ann@example.com", "news")
    with pytest.raises(UnsubscribeTokenError):
        UnsubscribeTokens("old").check(fresh)  # new tokens use the new key


def test_token_input_is_checked(tokens: UnsubscribeTokens) -> None:
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        UnsubscribeTokens.from_config({"SECRET_KEY": None})
    with pytest.raises(MessageError):
        tokens.make("not an address", "news")
    with pytest.raises(MessageError):
        tokens.make("ann@example.com", "")
    with pytest.raises(BadHeaderError):
        tokens.make("ann@example.com", "news\r\nBcc: x@example.com")
    assert SECRET not in repr(tokens)


# The blueprint.


async def test_post_unsubscribes_and_is_idempotent(
    client: Client, tokens: UnsubscribeTokens, suppressions: Suppressions
) -> None:
    token = tokens.make("ann@example.com", "new-users")
    for _ in range(2):
        response = await client.post(f"/unsubscribe/{token}", form=ONE_CLICK)
        assert response.status_code == 200
        assert_plain_page(response.headers)
        assert "ann@example.com" in await response.get_data(as_text=True)
    assert suppressions.entries == {("ann@example.com", "new-users")}


async def test_post_as_multipart_form_data_also_works(
    client: Client, tokens: UnsubscribeTokens, suppressions: Suppressions
) -> None:
    # RFC 8058 section 3.2 allows either form encoding.
    token = tokens.make("ann@example.com", "news")
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
        f"One-Click\r\n--{boundary}--\r\n"
    )
    response = await client.post(
        f"/unsubscribe/{token}",
        data=body.encode(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 200
    assert suppressions.entries == {("ann@example.com", "news")}


async def test_get_shows_a_confirm_button_and_never_unsubscribes(
    client: Client, tokens: UnsubscribeTokens, suppressions: Suppressions
) -> None:
    token = tokens.make("ann&co@example.com", "news & <updates>")
    for request in (client.get, client.head):
        response = await request(f"/unsubscribe/{token}")
        assert response.status_code == 200
        assert_plain_page(response.headers)
    page = await (await client.get(f"/unsubscribe/{token}")).get_data(as_text=True)
    assert '<form method="post">' in page
    assert '<input type="hidden" name="List-Unsubscribe" value="One-Click">' in page
    assert "news &amp; &lt;updates&gt;" in page  # escaped
    assert "ann&amp;co@example.com" in page
    assert "<updates>" not in page
    assert suppressions.calls == 0


async def test_bad_and_expired_tokens_get_4xx_pages(
    client: Client, suppressions: Suppressions
) -> None:
    expired = old_token("ann@example.com", "news", days=100)
    for request in (client.get, client.post):
        bad = await request("/unsubscribe/garbage.token", form=ONE_CLICK)
        assert bad.status_code == 400
        assert_plain_page(bad.headers)
        assert "not valid" in await bad.get_data(as_text=True)
        gone = await request(f"/unsubscribe/{expired}", form=ONE_CLICK)
        assert gone.status_code == 410
        assert_plain_page(gone.headers)
        assert "expired" in await gone.get_data(as_text=True)
    assert suppressions.calls == 0


async def test_post_without_one_click_body_changes_nothing(
    client: Client, tokens: UnsubscribeTokens, suppressions: Suppressions
) -> None:
    token = tokens.make("ann@example.com", "news")
    for form in ({}, {"List-Unsubscribe": "yes"}):
        response = await client.post(f"/unsubscribe/{token}", form=form)
        assert response.status_code == 400
        assert "List-Unsubscribe=One-Click" in await response.get_data(as_text=True)
    response = await client.post(f"/unsubscribe/{token}", data=b"\xff\xfe", headers={})
    assert response.status_code == 400
    assert suppressions.calls == 0


async def test_unsubscribe_url_is_https_and_points_at_the_blueprint(
    tokens: UnsubscribeTokens, suppressions: Suppressions
) -> None:
    app = Quart(__name__)
    app.config["SERVER_NAME"] = "example.com"
    app.register_blueprint(unsubscribe_blueprint(tokens, suppressions, url_prefix="/u"))
    async with app.app_context():
        url = unsubscribe_url(tokens, "ann@example.com", "news")
    assert url.startswith("https://example.com/u/")
    async with app.test_app() as test_app:
        response = await test_app.test_client().post(
            url.removeprefix("https://example.com"), form=ONE_CLICK
        )
    assert response.status_code == 200
    assert suppressions.entries == {("ann@example.com", "news")}


# The headers.


def test_list_unsubscribe_headers() -> None:
    https = "https://example.com/unsubscribe/t0k.en"
    assert list_unsubscribe_headers(https) == [
        ("List-Unsubscribe", f"<{https}>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ]
    assert list_unsubscribe_headers([https, "mailto:leave@example.com?subject=unsubscribe"]) == [
        ("List-Unsubscribe", f"<{https}>, <mailto:leave@example.com?subject=unsubscribe>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ]
    # Without an https URL there is no one-click.
    assert list_unsubscribe_headers(["mailto:leave@example.com"]) == [
        ("List-Unsubscribe", "<mailto:leave@example.com>")
    ]


@pytest.mark.parametrize(
    "urls",
    [
        [],
        ["http://example.com/u/1"],
        ["ftp://example.com/u"],
        ["https://example.com/a", "https://example.com/b"],
        ["https://example.com/a b"],
        ["https://example.com/<a>"],
        ["https://example.com/ü"],
        ["https:///path-only"],
        ["mailto:"],
        ["https://example.com/?x=?y"],
        ["https://example.com/" + "a" * 980],
    ],
)
def test_list_unsubscribe_headers_refuse_what_they_cannot_write(urls: list[str]) -> None:
    with pytest.raises(MessageError):
        list_unsubscribe_headers(urls)


def test_list_unsubscribe_headers_refuse_line_breaks() -> None:
    with pytest.raises(BadHeaderError):
        list_unsubscribe_headers(["https://example.com/u\r\nBcc: victim@example.com"])


def test_the_headers_go_into_a_message(tokens: UnsubscribeTokens) -> None:
    url = f"https://example.com/unsubscribe/{tokens.make('ann@example.com', 'news')}"
    msg = Message(
        "News",
        sender="news@example.com",
        recipients=["ann@example.com"],
        body="x",
        extra_headers=dict(list_unsubscribe_headers([url, "mailto:leave@example.com"])),
    )
    data = msg.as_bytes()
    unfolded = data.replace(b"\r\n ", b" ")
    assert f"List-Unsubscribe: <{url}>, <mailto:leave@example.com>\r\n".encode() in unfolded
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in data


def test_tokens_need_a_key_and_a_positive_max_age() -> None:
    no_keys: list[str | bytes | list[str | bytes]] = ["", [], [SECRET, b""]]
    for keys in no_keys:
        with pytest.raises(ConfigError, match="SECRET_KEY is not set"):
            UnsubscribeTokens(keys)
    with pytest.raises(ConfigError, match="max_age of unsubscribe tokens must be positive"):
        UnsubscribeTokens(SECRET, max_age=0)


def test_a_signed_payload_that_is_not_an_address_and_list_is_refused(
    tokens: UnsubscribeTokens,
) -> None:
    # Signed with our key and salt, so only its shape gives it away.
    forged = URLSafeTimedSerializer(SECRET, salt=SALT).dumps({"address": "a@example.com"})
    with pytest.raises(UnsubscribeTokenError, match="not valid"):
        tokens.check(forged)


def test_a_url_that_is_not_text_is_refused() -> None:
    with pytest.raises(MessageError, match="expected a URL string, got int"):
        list_unsubscribe_headers([42])  # type: ignore[list-item]
