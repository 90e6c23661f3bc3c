"""quartmail.app.accesslog: the launcher's access log shows what Hypercorn's own would, atom
for atom, without copying the environment for every request."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypercorn.config import Config
from hypercorn.logging import AccessLogAtoms as HypercornAtoms
from hypercorn.typing import HTTPScope, ResponseSummary, WWWScope

from quartmail.app.accesslog import AccessLogAtoms, AccessLogger

HEADERS = [
    (b"Host", b"example.com"),
    (b"User-Agent", b"curl/8.5"),
    (b"Referer", b"https://example.com/\xe9"),  # latin-1, as Hypercorn decodes it
    (b"X-Forwarded-For", b"203.0.113.7"),
]


def scope(**changes: Any) -> WWWScope:
    base: dict[str, Any] = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": "/api/users",
        "query_string": b"next=%2F&x=1",
        "headers": HEADERS,
        "client": ("192.0.2.1", 51234),
    }
    http: HTTPScope = base | changes  # type: ignore[assignment]
    return http


RESPONSE: ResponseSummary = {
    "status": 201,
    "headers": [(b"Content-Length", b"25"), (b"Content-Type", b"application/json")],
}
CASES = {
    "http": (scope(), RESPONSE, 0.0123),
    "no query, no client": (scope(query_string=b"", client=None), RESPONSE, 1.5),
    "unix socket client": (scope(client=("/run/app.sock",)), RESPONSE, 0.0),
    "odd client": (scope(client=("a", 1, 2)), RESPONSE, 0.0),
    "unknown status": (scope(), {"status": 599, "headers": []}, 0.0),
    "no response": (scope(), None, 0.0),
    "websocket": (
        {k: v for k, v in scope(type="websocket").items() if k not in ("method", "http_version")},
        None,
        0.0,
    ),
}


@pytest.mark.parametrize(("request_", "response", "seconds"), CASES.values(), ids=CASES.keys())
def test_every_atom_is_hypercorns(
    monkeypatch: pytest.MonkeyPatch,
    request_: WWWScope,
    response: ResponseSummary | None,
    seconds: float,
) -> None:
    monkeypatch.setenv("QUARTMAIL_REGION", "eu-west")
    monkeypatch.setenv("quartmail_region", "the last one wins")
    theirs = HypercornAtoms(request_, response, seconds)
    ours = AccessLogAtoms(request_, response, seconds)

    # Every atom Hypercorn has, asked for in any case (as a format names them), and some
    # it has not; "t" (the time now) may tick between the two.
    keys = [key for key in theirs if key != "t"]
    keys += [key.upper() for key in keys if key.startswith("{")]
    keys += ["{No-Such-Header}i", "{No-Such-Header}o", "{NO_SUCH_VARIABLE}e", "zz"]
    assert {key: ours[key] for key in keys} == {key: theirs[key] for key in keys}
    assert any(key.endswith("}e") for key in keys)  # the environment was compared
    assert ours["{QUARTMAIL_REGION}e"] == theirs["{quartmail_region}e"]
    assert ours["t"].startswith("[")


def test_the_environment_is_not_copied() -> None:
    atoms = AccessLogAtoms(scope(), RESPONSE, 0.0)
    assert not [key for key in atoms if key.endswith("}e")]


async def test_the_access_line_is_hypercorns(caplog: pytest.LogCaptureFixture) -> None:
    config = Config()
    config.accesslog = logging.getLogger("test.access")
    config.access_log_format = '%(h)s "%(r)s" %(s)s %(b)s "%(a)s" %({HOME}e)s'
    config.logger_class = AccessLogger
    with caplog.at_level(logging.INFO, logger="test.access"):
        await config.log.access(scope(), RESPONSE, 0.01)
        await Config.logger_class(config).access(scope(), RESPONSE, 0.01)
    ours, theirs = (record.getMessage() for record in caplog.records)
    assert ours == theirs
    assert ours.startswith('192.0.2.1:51234 "POST /api/users 1.1" 201 25 "curl/8.5" /')
