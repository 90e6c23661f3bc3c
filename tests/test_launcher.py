"""``python -m quartmail.app``: Hypercorn with one worker per core, a failed start that exits
non-zero, and the development inbox served from one process. Real processes, real HTTP, a
real SMTP test server; the drain across SIGTERM with two workers is in test_e2e.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import cast

import httpx
import pytest
from hypercorn.logging import Logger
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from hypercorn.utils import NoAppError

from quartmail.app.accesslog import AccessLogger
from quartmail.app.launcher import (
    APPLICATION_VARIABLE,
    FAILED_START_VARIABLE,
    FailedStartRecorder,
    hypercorn_config,
    main,
    worker_app,
)
from quartmail.testing import SMTPServerFactory

from conftest import REPO_ROOT, clean_environment, serve_app

PRODUCTION = "quartmail.app:create_app('production')"
EXIT_TIMEOUT = 40.0  # generous: the machine is shared; a hung launcher fails instead
HTTP_TIMEOUT = 10.0


async def launch(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run ``python -m quartmail.app -c hypercorn.toml --bind 127.0.0.1:0 *args`` to its
    end; its exit code and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "quartmail.app",
        "-c",
        "hypercorn.toml",
        "--bind",
        "127.0.0.1:0",
        *args,
        cwd=REPO_ROOT,
        env=clean_environment(**env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(EXIT_TIMEOUT):
        _, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stderr.decode(errors="replace")


async def test_a_worker_that_fails_to_start_exits_non_zero(
    smtp_server_factory: SMTPServerFactory, tmp_path: Path
) -> None:
    """The settings load (so the launcher starts the workers), but each worker's start-up
    fails (its database cannot be opened): Hypercorn 0.18 alone may exit 0 here
    (hypercorn#269); the launcher exits 1, and the worker's error is on stderr."""
    server = await smtp_server_factory()
    env = {
        "SECRET_KEY": "launcher-test-secret-key",
        "MAIL_SERVER": str(server.mail_config()["MAIL_SERVER"]),
        "MAIL_PORT": str(server.mail_config()["MAIL_PORT"]),
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'app.db'}",
    }

    code, stderr = await launch("--workers", "2", PRODUCTION, env=env)

    assert code == 1, stderr
    assert "unable to open database file" in stderr
    assert "quartmail.app: a worker failed to start" in stderr


async def test_a_bad_setting_exits_non_zero_before_any_worker_starts() -> None:
    env = {"SECRET_KEY": "launcher-test-secret-key", "MAIL_SERVER": "localhost"}
    code, stderr = await launch("--workers", "2", PRODUCTION, env=env | {"MAIL_PORT": "smtp"})

    assert code == 1, stderr
    assert "MAIL_PORT" in stderr
    assert "Running on" not in stderr  # no worker was started


async def test_the_development_inbox_is_served_from_one_process(tmp_path: Path) -> None:
    """No MAIL_SERVER in development: the launcher's default is one process, the one that
    holds the inbox, so the sign-up's mail shows in /dev/inbox/ whichever request asks."""
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"}
    async with (
        serve_app("quartmail.app:create_app()", env, tmp_path, launcher=True) as served,
        httpx.AsyncClient(base_url=served.url, timeout=HTTP_TIMEOUT, trust_env=False) as client,
    ):
        response = await client.post("/api/users", json={"name": "Ada Lovelace"})
        assert response.status_code == 201, response.text

        subjects: list[str] = []
        async with asyncio.timeout(HTTP_TIMEOUT):
            while not subjects:
                # Each request on a new connection: with several workers, some would miss it.
                async with httpx.AsyncClient(base_url=served.url, trust_env=False) as fresh:
                    inbox = (await fresh.get("/dev/inbox/messages.json")).json()
                subjects = [message["subject"] for message in inbox["messages"]]
        assert subjects == ["[Flasky] New User"]
        assert served.stderr.count("Running on") == 1

        served.terminate()
        assert await served.wait(EXIT_TIMEOUT) == 0, served.stderr


async def test_a_worker_serves_on_uvloop_with_hypercorns_access_log(
    smtp_server_factory: SMTPServerFactory, tmp_path: Path
) -> None:
    """No worker class chosen and uvloop installed (the uvloop extra): the worker runs on
    uvloop's event loop, and the access log shows each request as Hypercorn's own does."""
    server = await smtp_server_factory()
    env = {
        "SECRET_KEY": "launcher-test-secret-key",
        "MAIL_SERVER": str(server.mail_config()["MAIL_SERVER"]),
        "MAIL_PORT": str(server.mail_config()["MAIL_PORT"]),
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'app.db'}",
    }
    async with (
        serve_app(PRODUCTION, env, tmp_path, workers=1, launcher=True) as served,
        httpx.AsyncClient(base_url=served.url, timeout=HTTP_TIMEOUT, trust_env=False) as client,
    ):
        response = await client.post("/api/users", json={"name": "Ada"}, headers={"Referer": "r"})
        assert response.status_code == 201, response.text
        maps = children_maps(served.process.pid)
        assert any("/uvloop/loop." in text for text in maps.values()), maps.keys()

        size = len(response.content)

        served.terminate()
        assert await served.wait(EXIT_TIMEOUT) == 0, served.stderr
    assert f'] "POST /api/users 1.1" 201 {size} "r" "python-httpx/' in served.stdout


def children_maps(pid: int) -> dict[int, str]:
    """What each child of process *pid* (Hypercorn's workers) has mapped: /proc's maps."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {int(child): Path(f"/proc/{child}/maps").read_text() for child in children}


def arguments(**given: str) -> argparse.Namespace:
    """The launcher's arguments: *given*, else none (no TOML file, bind or worker class)."""
    return argparse.Namespace(**({"config": None, "bind": None, "worker_class": None} | given))


def test_the_worker_class_is_uvloop_unless_one_is_chosen(tmp_path: Path) -> None:
    shipped = str(REPO_ROOT / "hypercorn.toml")
    assert hypercorn_config(arguments(config=shipped)).worker_class == "uvloop"
    assert hypercorn_config(arguments()).worker_class == "uvloop"
    chosen = arguments(config=shipped, worker_class="asyncio")
    assert hypercorn_config(chosen).worker_class == "asyncio"
    toml = tmp_path / "hypercorn.toml"
    toml.write_text('worker_class = "asyncio"\n')
    assert hypercorn_config(arguments(config=str(toml))).worker_class == "asyncio"


def test_the_access_log_is_the_launchers_unless_statsd_takes_it(tmp_path: Path) -> None:
    assert hypercorn_config(arguments()).logger_class is AccessLogger
    toml = tmp_path / "hypercorn.toml"
    toml.write_text('statsd_host = "127.0.0.1:8125"\n')
    # Hypercorn swaps its own Logger for its StatsdLogger in each worker.
    assert hypercorn_config(arguments(config=str(toml))).logger_class is Logger


async def test_several_workers_with_the_development_inbox_is_refused() -> None:
    code, stderr = await launch("--workers", "2", env={})

    assert code == 2, stderr
    assert "--workers 0 or 1, or set MAIL_SERVER" in stderr


def test_an_app_that_cannot_be_loaded_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--bind", "127.0.0.1:0", "quartmail.app:no_such_factory()"]) == 1
    assert "quartmail.app:no_such_factory() failed to load" in capsys.readouterr().err


def test_a_worker_whose_app_cannot_be_loaded_records_a_failed_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed = tmp_path / "failed-start"
    monkeypatch.setenv(APPLICATION_VARIABLE, "quartmail.app:no_such_factory()")
    monkeypatch.setenv(FAILED_START_VARIABLE, str(failed))

    with pytest.raises(NoAppError):
        worker_app()
    assert failed.read_text() == f"{os.getpid()}\n"


async def test_an_app_that_raises_in_its_start_up_records_a_failed_start(tmp_path: Path) -> None:
    """An ASGI app may raise instead of sending ``lifespan.startup.failed``; requests pass
    through untouched."""
    failed = tmp_path / "failed-start"
    seen: list[str] = []

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        seen.append(scope["type"])
        if scope["type"] == "lifespan":
            raise RuntimeError("no database")

    recorder = FailedStartRecorder(app, failed)

    async def receive() -> ASGIReceiveEvent:
        return {"type": "lifespan.startup"}

    async def send(message: ASGISendEvent) -> None:
        raise AssertionError(f"nothing is sent: {message}")

    http = cast(Scope, {"type": "http"})  # only its type is read
    await recorder(http, receive, send)
    assert not failed.exists()
    with pytest.raises(RuntimeError, match="no database"):
        await recorder(cast(Scope, {"type": "lifespan"}), receive, send)
    assert failed.exists()
    assert seen == ["http", "lifespan"]
