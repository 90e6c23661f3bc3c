"""AUTH XOAUTH2 with MAIL_OAUTH2_TOKEN (issue 12), against the real SMTP test server: a fixed
token, a callable asked again after a refusal, an async provider, a wrong token, the token kept
out of every log, repr and error, background delivery and the outbox, and the settings' checks."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from quart import Quart
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from quartmail import AuthenticationError, ConfigError, Mail, Message, SendTimeoutError
from quartmail.app import create_app
from quartmail.testing import SMTPServerFactory, SMTPTestServer, TLSCertificates, TLSMode

from conftest import MakeMail, everything_said

USER = "mailer@example.com"
# About the size of a Microsoft 365 access token (a JWT): its AUTH line is far over 512 octets.
TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9." + "A1b2-C3d4_" * 160 + ".sig-Nature_x"
NEW_TOKEN = "ya29.a0AfH6SMBnew-token-0123456789"
EXPIRED = "ya29.a0AfH6SMBexpired-token-987654"


def message(n: int = 0) -> Message:
    return Message(f"message {n}", recipients=["admin@example.com"], body=f"body {n}")


def forms(token: str) -> list[str]:
    """Every form in which a token could leak: plain, and the base64 XOAUTH2 string."""
    xoauth2 = f"user={USER}\x01auth=Bearer {token}\x01\x01".encode()
    return [token, base64.b64encode(xoauth2).decode()]


class Provider:
    """A token provider that hands out *tokens* in order (the last one again and again)
    and remembers each call: the user, and whether it ran in the event loop's thread."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)
        self.calls: list[str] = []
        self.in_loop: list[bool] = []

    def _next(self, username: str) -> str:
        self.calls.append(username)
        return self.tokens.pop(0) if len(self.tokens) > 1 else self.tokens[0]

    def __call__(self, username: str) -> str:
        try:
            asyncio.get_running_loop()
            self.in_loop.append(True)
        except RuntimeError:
            self.in_loop.append(False)
        return self._next(username)


class AsyncProvider(Provider):
    async def get(self, username: str) -> str:
        await asyncio.sleep(0)  # a real one awaits its identity service
        return self._next(username)


# --- sending with a token ---------------------------------------------------------------


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_a_fixed_token_logs_in_with_xoauth2(
    tls: TLSMode, smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls=tls, oauth2_tokens={USER: TOKEN})
    config = server.mail_config()
    assert (config["MAIL_USERNAME"], config["MAIL_OAUTH2_TOKEN"]) == (USER, TOKEN)
    assert config["MAIL_PASSWORD"] is None
    app, mail = make_mail(server)
    async with app.app_context():
        await mail.send(message())
    [received] = server.messages
    assert received.login == USER and received.tls
    assert server.auth_attempts == [USER]


async def test_connect_sends_many_messages_after_one_xoauth2_login(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: TOKEN})
    provider = Provider(TOKEN)
    app, mail = make_mail(server, MAIL_OAUTH2_TOKEN=provider)
    async with app.app_context(), mail.connect() as connection:
        for n in range(3):
            await connection.send(message(n))
    assert [m.subject for m in server.messages] == ["message 0", "message 1", "message 2"]
    assert provider.calls == [USER]


async def test_an_expired_token_is_replaced_by_asking_the_callable_again(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: NEW_TOKEN})
    provider = Provider(EXPIRED, NEW_TOKEN)
    app, mail = make_mail(server, MAIL_OAUTH2_TOKEN=provider)
    async with app.app_context():
        await mail.send(message())
    [received] = server.messages
    assert received.login == USER
    assert provider.calls == [USER, USER]
    assert server.auth_attempts == [USER, USER]
    # A plain function may block (msal, google-auth): it runs outside the event loop.
    assert provider.in_loop == [False, False]


async def test_an_async_provider_is_awaited(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: TOKEN})
    provider = AsyncProvider(TOKEN)
    app, mail = make_mail(server, MAIL_OAUTH2_TOKEN=provider.get)
    async with app.app_context():
        await mail.send(message())
    assert len(server.messages) == 1
    assert provider.calls == [USER]


async def test_a_wrong_token_is_refused_after_exactly_one_more_ask(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: TOKEN})
    provider = AsyncProvider(EXPIRED)
    app, mail = make_mail(server, MAIL_OAUTH2_TOKEN=provider.get)
    async with app.app_context():
        with pytest.raises(AuthenticationError) as caught:
            await mail.send(message())
    assert caught.value.code == 535 and not caught.value.transient
    assert USER in str(caught.value)
    assert provider.calls == [USER, USER]
    assert server.messages == []


async def test_a_wrong_fixed_token_is_not_tried_twice(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: TOKEN})
    app, mail = make_mail(server, MAIL_OAUTH2_TOKEN=EXPIRED)
    async with app.app_context():
        with pytest.raises(AuthenticationError, match="535"):
            await mail.send(message())
    assert server.auth_attempts == [USER]


async def test_no_token_in_logs_reprs_or_the_error_chain(
    smtp_server_factory: SMTPServerFactory,
    make_mail: MakeMail,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: TOKEN})
    server.echo_auth = True  # the 535 quotes the token and the whole AUTH argument
    second = EXPIRED + "-again"
    provider = Provider(EXPIRED, second)
    app, mail = make_mail(server, MAIL_OAUTH2_TOKEN=provider, MAIL_DEBUG=True)
    caplog.set_level(logging.DEBUG, logger="quartmail")
    async with app.app_context():
        with pytest.raises(AuthenticationError) as caught:
            await mail.send(message())
        # And a good one, logged in full with MAIL_DEBUG.
        provider.tokens = [TOKEN]
        await mail.send(message())
    assert len(server.messages) == 1
    assert "AUTH XOAUTH2 ****" in caplog.text  # the conversation was logged
    assert "refused the login" in str(caught.value) and "****" in str(caught.value)
    assert caught.value.__cause__ is not None  # kept, with the token masked
    state = app.extensions["mail"]
    said = "\n".join(
        [everything_said(caught.value), caplog.text, repr(state), repr(state.settings)]
    )
    for token in (EXPIRED, second, TOKEN):
        for form in forms(token):
            assert form not in said


async def test_background_delivery_asks_the_provider_for_each_new_session(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: TOKEN})
    # The first session uses TOKEN; by the second it has expired, and the provider still
    # hands out its cached copy once before a new one.
    provider = Provider(TOKEN, TOKEN, NEW_TOKEN)
    app, mail = make_mail(server, MAIL_OAUTH2_TOKEN=provider, MAIL_MAX_EMAILS=1)
    async with app.test_app(), app.app_context():
        await asyncio.wait_for(mail.send_background(message(1)), 10)
        server.oauth2_tokens = {USER: NEW_TOKEN}
        await asyncio.wait_for(mail.send_background(message(2)), 10)
    assert [m.subject for m in server.messages] == ["message 1", "message 2"]
    assert provider.calls == [USER, USER, USER]


async def test_the_outbox_dispatcher_logs_in_with_the_provider(
    smtp_server_factory: SMTPServerFactory, tmp_path: Path
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: TOKEN})
    provider = AsyncProvider(EXPIRED, TOKEN)
    app = Quart(__name__)
    app.config.update(
        server.mail_config(),
        MAIL_DEFAULT_SENDER="sender@example.com",
        MAIL_OAUTH2_TOKEN=provider.get,
        MAIL_OUTBOX_POLL=0.05,
    )
    mail = Mail(app)
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/outbox.db")
    mail.init_outbox(app, engine)
    try:
        async with app.test_app(), app.app_context():
            async with AsyncSession(engine) as session:
                await mail.outbox.enqueue(session, message())
                await session.commit()
            [received] = await server.wait_for_messages(1, timeout=10)
    finally:
        await engine.dispose()
    assert received.login == USER
    assert provider.calls == [USER, USER]


# --- failures of the provider or the server ---------------------------------------------


async def test_a_server_without_xoauth2_is_named(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", auth=(USER, "password"))
    provider = Provider(TOKEN)
    app, mail = make_mail(server, MAIL_PASSWORD=None, MAIL_OAUTH2_TOKEN=provider)
    async with app.app_context():
        with pytest.raises(AuthenticationError, match="does not offer AUTH XOAUTH2") as caught:
            await mail.send(message())
    assert "LOGIN PLAIN" in str(caught.value)
    assert provider.calls == [USER]  # not asked again: no token was refused
    assert server.auth_attempts == []


async def test_msals_dict_is_refused_with_a_hint_and_without_its_token(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: TOKEN})

    def acquire(username: str) -> Any:
        return {"token_type": "Bearer", "access_token": TOKEN}

    app, mail = make_mail(server, MAIL_OAUTH2_TOKEN=acquire)
    async with app.app_context():
        with pytest.raises(AuthenticationError, match=r'result\["access_token"\]') as caught:
            await mail.send(message())
    assert "MAIL_OAUTH2_TOKEN" in str(caught.value)
    assert TOKEN not in everything_said(caught.value)
    assert server.connections == 0  # nothing sent with a token that is not one


async def test_a_provider_that_raises_fails_the_send_with_its_error_as_cause(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: TOKEN})

    async def broken(username: str) -> str:
        raise LookupError("no account in the token cache")

    app, mail = make_mail(server, MAIL_OAUTH2_TOKEN=broken)
    async with app.app_context():
        with pytest.raises(AuthenticationError, match="no account in the token cache") as caught:
            await mail.send(message())
    assert isinstance(caught.value.__cause__, LookupError)
    assert server.messages == []


async def test_a_provider_that_hangs_times_out_at_mail_timeout(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: TOKEN})
    never = asyncio.Event()

    async def hanging(username: str) -> str:
        await never.wait()
        return TOKEN

    app, mail = make_mail(server, MAIL_OAUTH2_TOKEN=hanging, MAIL_TIMEOUT=0.2)
    async with app.app_context():
        with pytest.raises(SendTimeoutError, match=r"MAIL_OAUTH2_TOKEN.*MAIL_TIMEOUT"):
            await asyncio.wait_for(mail.send(message()), 10)
    assert server.messages == []


# --- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"MAIL_PASSWORD": "pw"}, r"MAIL_PASSWORD and MAIL_OAUTH2_TOKEN are both set"),
        ({"MAIL_USERNAME": None}, r"MAIL_OAUTH2_TOKEN needs MAIL_USERNAME"),
        ({"MAIL_OAUTH2_TOKEN": 12345678}, r"MAIL_OAUTH2_TOKEN must be .* callable.*got a int"),
        ({"MAIL_OAUTH2_TOKEN": TOKEN + "\n"}, r"MAIL_OAUTH2_TOKEN is a token with white space"),
    ],
)
def test_bad_settings_fail_at_start_up_naming_the_setting(
    config: dict[str, Any], expected: str, make_mail: MakeMail
) -> None:
    settings = {"MAIL_USERNAME": USER, "MAIL_OAUTH2_TOKEN": TOKEN, **config}
    with pytest.raises(ConfigError, match=expected) as caught:
        make_mail(**settings)
    assert TOKEN not in str(caught.value) and "12345678" not in str(caught.value)


async def test_the_app_reads_a_token_from_the_environment(
    smtp_server_factory: SMTPServerFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: TOKEN})
    config = server.mail_config()
    monkeypatch.setenv("MAIL_OAUTH2_TOKEN", str(config.pop("MAIL_OAUTH2_TOKEN")))
    app = create_app(
        "testing",
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/app.db",
        MAIL_DEFAULT_SENDER="sender@example.com",
        **config,
    )
    async with app.app_context():
        await app.extensions["mail"].send(message())
    assert [m.login for m in server.messages] == [USER]


# --- the test server's XOAUTH2, as a client sees it -------------------------------------


async def client(server: SMTPTestServer, certificates: TLSCertificates) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(
        hostname=server.host,
        port=server.port,
        start_tls=True,
        tls_context=certificates.client_context(),
        local_hostname="client.example.com",
        timeout=5,
    )
    await smtp.connect()
    await smtp.ehlo()
    return smtp


async def test_the_server_answers_a_bad_token_as_gmail_does(
    smtp_server_factory: SMTPServerFactory, smtp_certificates: TLSCertificates
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: TOKEN})
    smtp = await client(server, smtp_certificates)
    try:
        assert "xoauth2" in smtp.server_auth_methods
        bad = base64.b64encode(f"user={USER}\x01auth=Bearer {EXPIRED}\x01\x01".encode())
        challenge = await smtp.execute_command(b"AUTH", b"XOAUTH2", bad)
        assert challenge.code == 334
        assert json.loads(base64.b64decode(challenge.message))["status"] == "401"
        refusal = await smtp.execute_command(b"")
        assert (refusal.code, refusal.message) == (535, "5.7.8 Username and Password not accepted")
        # The session stays usable: the right token logs in.
        assert (await smtp.auth_xoauth2(USER, TOKEN)).code == 235
    finally:
        await smtp.quit()
    assert server.auth_attempts == [USER, USER]


async def test_the_server_offers_xoauth2_only_with_tokens(
    smtp_server_factory: SMTPServerFactory, smtp_certificates: TLSCertificates
) -> None:
    server = await smtp_server_factory(tls="starttls", auth=(USER, "password"))
    smtp = await client(server, smtp_certificates)
    try:
        assert "xoauth2" not in smtp.server_auth_methods
        assert {"plain", "login"} <= set(smtp.server_auth_methods)
    finally:
        await smtp.quit()


def test_bad_oauth2_tokens_are_refused_without_echoing_them() -> None:
    with pytest.raises(ValueError, match="oauth2_tokens must be a dict") as caught:
        SMTPTestServer(oauth2_tokens=[(USER, TOKEN)])  # type: ignore[arg-type]
    assert TOKEN not in str(caught.value)


def test_reset_gives_back_the_tokens_given() -> None:
    server = SMTPTestServer(oauth2_tokens={USER: TOKEN})
    server.oauth2_tokens = {USER: NEW_TOKEN}
    server.reset()
    assert server.oauth2_tokens == {USER: TOKEN}


async def test_the_server_answers_malformed_xoauth2_responses(
    smtp_server_factory: SMTPServerFactory, smtp_certificates: TLSCertificates
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: TOKEN})
    smtp = await client(server, smtp_certificates)
    try:
        undecodable = await smtp.execute_command(b"AUTH", b"XOAUTH2", b"not*base64")
        assert (undecodable.code, undecodable.message) == (501, "5.5.2 Can't decode base64")
        malformed = base64.b64encode(f"user={USER}\x01token {TOKEN}".encode())
        reply = await smtp.execute_command(b"AUTH", b"XOAUTH2", malformed)
        assert (reply.code, reply.message) == (501, "5.5.2 Malformed XOAUTH2 response")
        # Without an initial response: an empty 334, then the response on its own line.
        assert (await smtp.execute_command(b"AUTH", b"XOAUTH2")).code == 334
        good = base64.b64encode(f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode())
        assert (await smtp.execute_command(good)).code == 235
    finally:
        await smtp.quit()
    assert server.auth_attempts == [USER]


async def test_a_plain_callable_that_returns_a_coroutine_is_awaited(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: TOKEN})
    provider = AsyncProvider(TOKEN)
    app, mail = make_mail(server, MAIL_OAUTH2_TOKEN=functools.partial(provider.get))
    async with app.app_context():
        await mail.send(message())
    assert provider.calls == [USER]
    assert len(server.messages) == 1


async def test_an_empty_token_from_the_provider_is_refused_before_connecting(
    smtp_server_factory: SMTPServerFactory, make_mail: MakeMail
) -> None:
    server = await smtp_server_factory(tls="starttls", oauth2_tokens={USER: TOKEN})
    app, mail = make_mail(server, MAIL_OAUTH2_TOKEN=Provider(""))
    async with app.app_context():
        with pytest.raises(AuthenticationError, match="returned an empty token"):
            await mail.send(message())
    assert server.connections == 0
