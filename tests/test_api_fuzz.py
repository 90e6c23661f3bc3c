"""The sign-up app's JSON API, fuzzed from its own OpenAPI document (issue 9): no 5xx.

schemathesis reads ``/openapi.json`` and generates requests for every operation, both
valid ones (positive mode) and ones that break the schema (negative mode: wrong types,
missing fields, odd path parameters). Hypothesis runs them in a thread of its own, with a
fixed seed and a bounded number of examples, so a run is repeatable; each request goes
to the app, running its real lifespan in the test's loop, through the test client, with
a real SQLite file or PostgreSQL and a real SMTP test server behind it, the outbox off
and on.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from quart import Response
from quart.testing import QuartClient
from schemathesis import Case
from schemathesis.generation import GenerationMode

from quartmail.app import create_app
from quartmail.testing import SMTPTestServer

from conftest import empty_database_url

ADMIN = "admin@example.com"
SEED = 20261129
EXAMPLES = 150  # per run; each is one request
REQUEST_TIMEOUT = 30.0  # seconds for the app to answer one request (a bound, not a timing)


pytestmark = pytest.mark.usefixtures("no_app_settings")


async def send(client: QuartClient, case: Case[Any]) -> Response:
    """*case* as the request a client would put on the wire, sent through the test client."""
    request: dict[str, Any] = case.as_transport_kwargs(base_url="http://localhost")
    url = urlsplit(request["url"])
    headers = dict(request.get("headers") or {})
    body = request.get("data")
    if "json" in request:
        body = json.dumps(request["json"]).encode()
        headers.setdefault("Content-Type", "application/json")
    if isinstance(body, str):
        body = body.encode()
    response: Response = await client.open(
        url.path + (f"?{url.query}" if url.query else ""),
        method=request["method"],
        headers=headers,
        data=body,
        query_string=request.get("params") or None,
    )
    return response


async def database_url(backend: str, tmp_path: Path) -> str:
    """An empty database: an SQLite file, or the test PostgreSQL without the app's tables."""
    return await empty_database_url(backend, tmp_path)


# Both databases (their integer ranges differ) and both ways of sending the admin mail.
@pytest.mark.parametrize(
    ("backend", "outbox"),
    [("sqlite", False), ("postgresql", True)],
    ids=["sqlite-in-memory", "postgresql-outbox"],
)
async def test_no_request_from_the_openapi_document_gets_a_5xx(
    backend: str, outbox: bool, smtp_server: SMTPTestServer, tmp_path: Path
) -> None:
    app = create_app(
        "testing",
        DATABASE_URL=await database_url(backend, tmp_path),
        FLASKY_ADMIN=ADMIN,
        MAIL_OUTBOX=outbox,
        MAIL_OUTBOX_POLL=0.05,
        # The abuse limits would answer most sign-ups with a 429: let the fuzzer go deeper.
        FLASKY_SIGNUPS_PER_HOUR=10**6,
        FLASKY_CONFIRM_MAILS_PER_HOUR=10**6,
        **smtp_server.mail_config(),
    )
    created: set[int] = set()
    async with app.test_app() as test_app:
        client = test_app.test_client()
        assert isinstance(client, QuartClient)  # (quart-schema's subclass)
        response = await client.get("/openapi.json")
        assert response.status_code == 200
        schema = schemathesis.openapi.from_dict(await response.get_json())
        cases = schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(
            GenerationMode.NEGATIVE
        )
        loop = asyncio.get_running_loop()

        # Hypothesis drives the examples from a thread; each request runs in this loop,
        # where the app and the SMTP test server live.
        @seed(SEED)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(case=cases)
        def fuzz(case: Case[Any]) -> None:
            future = asyncio.run_coroutine_threadsafe(send(client, case), loop)
            response = future.result(timeout=REQUEST_TIMEOUT)
            answer = asyncio.run_coroutine_threadsafe(response.get_data(), loop).result(
                timeout=REQUEST_TIMEOUT
            )
            assert response.status_code < 500, (
                f"{response.status_code} for\n{case.as_curl_command()}\n{answer[:2000]!r}"
            )
            if response.status_code == 201:
                created.add(json.loads(answer)["id"])

        await asyncio.to_thread(fuzz)
    # Every sign-up the fuzzer made was told to the administrator, once; the rest of the
    # mail is confirmations, to the addresses it gave.
    assert created, "the fuzzer never made a valid sign-up"
    notices = [message for message in smtp_server.messages if message.rcpt_tos == [ADMIN]]
    assert len(notices) == len(created)
    assert all(
        message.subject == "[Flasky] Confirm Your Address"
        for message in smtp_server.messages
        if message.rcpt_tos != [ADMIN]
    )
