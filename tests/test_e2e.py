"""The sign-up app served by the real Hypercorn, as deployed: ``hypercorn -c hypercorn.toml
"quartmail.app:create_app('production')"`` in a subprocess, configured through the environment,
talked to over real HTTP, sending its mail over STARTTLS with AUTH to a real SMTP test server
served in this test's event loop, and stopped with SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from quartmail.testing import ReceivedMessage, SMTPServerFactory, SMTPTestServer

from conftest import REPO_ROOT, ServedApp, serve_app

APP_SPEC = "quartmail.app:create_app('production')"
ADMIN = "admin@example.com"
USER, PASSWORD = "mailer", "s3cret-Pa55word"
SUBJECT = "[Flasky] New User"

# hypercorn.toml's graceful_timeout + shutdown_timeout is 25 s: a clean stop is well inside
# this bound, a hung one fails the test instead of hanging it.
STOP_TIMEOUT = 40.0
HTTP_TIMEOUT = 10.0
SIGN_UP_BURST, BURSTS = 4, 3  # at most 12 sign-ups, 12 s of DATA for one worker

# What must never appear in the log of a clean run.
ALARMING = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|Exception|Not sent|LifespanTimeout")


def production_environment(server: SMTPTestServer, tmp_path: Path) -> dict[str, str]:
    """The environment a deployment sets: secrets, the database and the mail relay."""
    config = server.mail_config()
    env = {
        "SECRET_KEY": "e2e-test-secret-key",
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'app.db'}",
        "FLASKY_ADMIN": ADMIN,
    }
    for key in ("MAIL_SERVER", "MAIL_PORT", "MAIL_USERNAME", "MAIL_PASSWORD", "MAIL_CA_FILE"):
        value = config[key]
        assert value is not None, key
        env[key] = str(value)
    env["MAIL_USE_TLS"] = "true"
    return env


async def mail_server(smtp_server_factory: SMTPServerFactory) -> SMTPTestServer:
    """A submission server as in production: STARTTLS required, then AUTH required."""
    return await smtp_server_factory(tls="starttls", auth=(USER, PASSWORD))


def http_client(served: ServedApp) -> httpx.AsyncClient:
    # trust_env=False: no HTTP(S)_PROXY from the environment between us and loopback.
    return httpx.AsyncClient(base_url=served.url, timeout=HTTP_TIMEOUT, trust_env=False)


def assert_admin_mail(message: ReceivedMessage, name: str) -> None:
    parsed = message.parsed()
    assert parsed["Subject"] == SUBJECT
    assert message.rcpt_tos == [ADMIN]
    assert message.tls, "the mail went over STARTTLS"
    assert message.login == USER
    text = parsed.get_body(preferencelist=("plain",))
    assert text is not None
    assert text.get_content() == f"User {name} has joined.\n"


async def stop_cleanly(served: ServedApp, *, whole_group: bool = False) -> None:
    """SIGTERM, as a process manager stops a service (to the main process, or to every
    process of the group as systemd does); Hypercorn exits 0 with a quiet log."""
    if whole_group:
        served.terminate_group()
    else:
        served.terminate()
    assert await served.wait(STOP_TIMEOUT) == 0, served.stderr
    alarming = [line for line in served.stderr.splitlines() if ALARMING.search(line)]
    assert alarming == [], served.stderr


async def test_api_signup_mail_is_delivered_across_sigterm(
    smtp_server_factory: SMTPServerFactory, tmp_path: Path
) -> None:
    server = await mail_server(smtp_server_factory)
    # A slow relay: the mail is still in DATA when SIGTERM arrives; the shutdown drain
    # (MAIL_SHUTDOWN_TIMEOUT, inside hypercorn.toml's shutdown_timeout) must deliver it.
    server.data_delay = 1.0
    env = production_environment(server, tmp_path)

    async with (
        serve_app(APP_SPEC, env, tmp_path) as served,
        http_client(served) as client,
    ):
        response = await client.post("/api/users", json={"name": "Ada Lovelace"})
        assert response.status_code == 201, response.text
        user = response.json()
        assert user["name"] == "Ada Lovelace"

        # The sign-up answered at once; its mail is now on its way: wait until the server
        # has its content and is sitting on the reply.
        try:
            async with asyncio.timeout(10):
                while server.data_attempts == 0:  # noqa: ASYNC110 (the server has no event)
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pytest.fail(f"the admin mail never reached DATA\n{served.stderr}")
        assert server.messages == [], "the mail should still be in flight at SIGTERM"

        await stop_cleanly(served)

    [message] = server.messages
    assert_admin_mail(message, "Ada Lovelace")
    assert '"POST /api/users 1.1" 201' in served.stdout  # the access log


@pytest.mark.parametrize(
    ("whole_group", "worker_class", "launcher"),
    [
        (False, "asyncio", False),
        (True, "asyncio", False),
        (False, "uvloop", False),
        (False, "asyncio", True),
        (True, "uvloop", True),
    ],
    ids=["main-process", "whole-group", "uvloop", "launcher", "launcher-whole-group-uvloop"],
)
async def test_every_worker_drains_its_mail_across_sigterm(
    smtp_server_factory: SMTPServerFactory,
    tmp_path: Path,
    whole_group: bool,
    worker_class: str,
    launcher: bool,
) -> None:
    """With two Hypercorn workers, SIGTERM to the main process (Kubernetes, docker stop)
    or to every process at once (systemd) lets each worker deliver the mail it holds
    (app/workers.py), and Hypercorn exits 0; on asyncio's loop and on uvloop's, served by
    ``hypercorn`` or by ``python -m quartmail.app``.

    Which worker accepts a connection is the kernel's choice (an idle worker may take them
    all), so the test tries to get mail in flight in both, but needs it in one only: without
    app/workers.py that worker is killed mid-drain either way (by the group's SIGTERM, or by
    the main process once the idle worker has exited) and its mail is lost."""
    server = await mail_server(smtp_server_factory)
    server.data_delay = 1.0  # each mail sits in DATA for a second
    env = production_environment(server, tmp_path)
    # One SMTP connection per worker: two mails in DATA at once are two workers' mail.
    # A drain bound above what one worker may hold here (every sign-up's mail in a row),
    # inside hypercorn.toml's shutdown_timeout.
    env |= {"MAIL_POOL_SIZE": "1", "MAIL_SHUTDOWN_TIMEOUT": "14"}

    def both_workers_in_data() -> bool:
        return server.data_attempts - len(server.messages) >= 2

    names: list[str] = []

    async def sign_up(client: httpx.AsyncClient, name: str) -> None:
        names.append(name)
        response = await client.post("/api/users", json={"name": name})
        assert response.status_code == 201, response.text

    async with serve_app(
        APP_SPEC, env, tmp_path, workers=2, worker_class=worker_class, launcher=launcher
    ) as served:
        # Both workers accept from the one socket; while one is busy with a sign-up the
        # other takes the next connection. Sign up SIGN_UP_BURST at once, each on its own
        # connection, until each worker has a mail on the wire.
        while not both_workers_in_data() and len(names) < SIGN_UP_BURST * BURSTS:
            async with contextlib.AsyncExitStack() as stack:
                clients = [
                    await stack.enter_async_context(http_client(served))
                    for _ in range(SIGN_UP_BURST)
                ]
                await asyncio.gather(
                    *(sign_up(client, f"Ada {len(names) + i}") for i, client in enumerate(clients))
                )
            # The server wakes no waiter when DATA starts: poll, for a second at most.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    while not both_workers_in_data():  # noqa: ASYNC110
                        await asyncio.sleep(0.01)

        assert server.data_attempts > len(server.messages), "no mail in flight at SIGTERM"
        await stop_cleanly(served, whole_group=whole_group)

    assert sorted(message_text(message) for message in server.messages) == sorted(
        f"User {name} has joined.\n" for name in names
    )


def message_text(message: ReceivedMessage) -> str:
    """The plain-text body of *message*."""
    text = message.parsed().get_body(preferencelist=("plain",))
    assert text is not None
    return str(text.get_content())


async def test_form_signup_over_http(
    smtp_server_factory: SMTPServerFactory, tmp_path: Path
) -> None:
    server = await mail_server(smtp_server_factory)
    env = production_environment(server, tmp_path)

    async with (
        serve_app(APP_SPEC, env, tmp_path) as served,
        http_client(served) as client,
    ):
        page = await client.get("/")
        assert page.status_code == 200
        assert "<h1>Hello, Stranger!</h1>" in page.text
        token = form_inputs(page.text)["csrf_token"]

        # Without the session cookie the token is worth nothing.
        async with http_client(served) as stranger:
            forged = await stranger.post("/", data={"csrf_token": token, "name": "Mallory"})
        assert forged.status_code == 400

        signed_up = await client.post(
            "/", data={"csrf_token": token, "name": "Grace Hopper"}, follow_redirects=True
        )
        assert signed_up.status_code == 200
        assert "<h1>Hello, Grace Hopper!</h1>" in signed_up.text
        assert "Pleased to meet you!" in signed_up.text

        [message] = await server.wait_for_messages(1, timeout=10)
        assert_admin_mail(message, "Grace Hopper")

        again = await client.post(
            "/",
            data={"csrf_token": form_inputs(signed_up.text)["csrf_token"], "name": "Grace Hopper"},
            follow_redirects=True,
        )
        assert "Happy to see you again!" in again.text

        await stop_cleanly(served)

    assert len(server.messages) == 1, "a known name sends no mail"


class _Inputs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        fields = dict(attrs)
        if tag == "input" and fields.get("name"):
            self.values[fields["name"] or ""] = fields.get("value") or ""


def form_inputs(html: str) -> dict[str, str]:
    """The values of a page's named ``<input>`` elements."""
    parser = _Inputs()
    parser.feed(html)
    return parser.values


@pytest.mark.parametrize("command", ["hypercorn", "quartmail.app"])
async def test_production_without_its_settings_fails_to_start_with_an_error_code(
    tmp_path: Path, command: str
) -> None:
    """A process manager (systemd, Kubernetes) must see the failure: a non-zero exit."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("SECRET_KEY", "MAIL_SERVER") and not key.startswith("QUART")
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        command,
        "-c",
        "hypercorn.toml",
        "--bind",
        "127.0.0.1:0",
        APP_SPEC,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(STOP_TIMEOUT):
        _, stderr = await process.communicate()
    assert process.returncode != 0
    assert "production needs SECRET_KEY and MAIL_SERVER" in stderr.decode()
