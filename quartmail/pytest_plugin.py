"""pytest fixtures for testing apps that send mail with quartmail (registered as ``quartmail``).

Fixtures (see docs/testing.md):

- ``smtp_certificates`` (session): a throwaway CA and server certificate
  (:class:`quartmail.testing.TLSCertificates`), made once per test run (per xdist worker).
- ``smtp_server_factory`` (async tests): ``await make(**options)`` makes and starts an
  :class:`quartmail.testing.SMTPTestServer` in the test's event loop, passing
  ``certificates=smtp_certificates`` when TLS is asked for; all are stopped at teardown.
- ``smtp_server`` (async tests): a started plain server (no TLS, no AUTH).
- ``threaded_smtp_server_factory`` and ``threaded_smtp_server``: the same, as
  :class:`quartmail.testing_threaded.ThreadedSMTPTestServer` (own thread and loop), for sync
  tests and sync clients.

Loading the plugin, as every pytest run does once quartmail is installed, imports neither
aiosmtpd nor trustme: without ``quartmail[testing]`` the fixtures fail with the command that
installs it, and nothing else changes. The loop-bound fixtures need pytest-asyncio.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from ._extras import OPTIONAL_PACKAGES

if TYPE_CHECKING:
    from quartmail.testing import SMTPServerFactory, SMTPTestServer, TLSCertificates
    from quartmail.testing_threaded import ThreadedSMTPTestServer

__all__ = [
    "ThreadedSMTPServerFactory",
    "smtp_certificates",
    "smtp_server",
    "smtp_server_factory",
    "threaded_smtp_server",
    "threaded_smtp_server_factory",
]


class ThreadedSMTPServerFactory(Protocol):
    """Type of ``threaded_smtp_server_factory``: makes and starts a ThreadedSMTPTestServer,
    with the keyword arguments of :class:`~quartmail.testing.SMTPTestServer`."""

    def __call__(self, **options: Any) -> ThreadedSMTPTestServer: ...


@contextmanager
def _testing_extra() -> Iterator[None]:
    """Turn a missing aiosmtpd or trustme into a failure that says what to install."""
    try:
        yield
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] not in OPTIONAL_PACKAGES:
            raise
        # The message (from quartmail._extras) names pip install 'quartmail[testing]'.
        raise pytest.fail.Exception(str(error), pytrace=False) from None


def _with_certificates(request: pytest.FixtureRequest, options: dict[str, Any]) -> None:
    """Give a TLS server the session's certificates, unless the test brought its own."""
    if options.get("tls", "none") != "none" and options.get("certificates") is None:
        options["certificates"] = request.getfixturevalue("smtp_certificates")


@pytest.fixture(scope="session")
def smtp_certificates(tmp_path_factory: pytest.TempPathFactory) -> TLSCertificates:
    """A CA and a server certificate for localhost / 127.0.0.1 / ::1, shared by the session."""
    with _testing_extra():
        from quartmail.testing import TLSCertificates

        return TLSCertificates.create(tmp_path_factory.mktemp("smtp-tls"))


@pytest.fixture
def threaded_smtp_server_factory(
    request: pytest.FixtureRequest,
) -> Iterator[ThreadedSMTPServerFactory]:
    """Make and start SMTP test servers that run in threads of their own (for sync tests and
    sync clients); all of them are stopped at teardown."""
    with _testing_extra():
        from quartmail.testing_threaded import ThreadedSMTPTestServer

    servers: list[ThreadedSMTPTestServer] = []

    def make(**options: Any) -> ThreadedSMTPTestServer:
        _with_certificates(request, options)
        server = ThreadedSMTPTestServer(**options)
        server.start()
        servers.append(server)
        return server

    yield make
    _stop_all([server.stop for server in reversed(servers)])


@pytest.fixture
def threaded_smtp_server(
    threaded_smtp_server_factory: ThreadedSMTPServerFactory,
) -> ThreadedSMTPTestServer:
    """A started plain SMTP test server (no TLS, no AUTH) in a thread of its own."""
    return threaded_smtp_server_factory()


def _stop_all(stops: list[Any]) -> None:
    # Every server is stopped even if stopping one fails; the first error is raised.
    errors: list[BaseException] = []
    for stop in stops:
        try:
            stop()
        except Exception as error:  # teardown must reach every server
            errors.append(error)
    if errors:
        raise errors[0]


def _refuse_sync_test(request: pytest.FixtureRequest) -> None:
    """The loop-bound server answers only while the test's loop runs: not in a sync test."""
    test = getattr(request.node, "obj", None)
    if test is None or inspect.iscoroutinefunction(test):
        return
    fixture = "smtp_server" if "smtp_server" in request.fixturenames else request.fixturename
    pytest.fail(
        f"{fixture} serves SMTP in the test's event loop, which does not run "
        f"during the sync test {request.node.name}: a client would wait for a greeting that "
        "never comes. Use threaded_smtp_server (or threaded_smtp_server_factory), which "
        "serves from a thread of its own, or make the test `async def`.",
        pytrace=False,
    )


try:
    import pytest_asyncio
except ImportError:

    @pytest.fixture(name="smtp_server_factory")
    def _smtp_server_factory_needs_pytest_asyncio() -> None:
        """Needs pytest-asyncio (fails with that message without it)."""
        _need_pytest_asyncio("smtp_server_factory")

    @pytest.fixture(name="smtp_server")
    def _smtp_server_needs_pytest_asyncio() -> None:
        """Needs pytest-asyncio (fails with that message without it)."""
        _need_pytest_asyncio("smtp_server")

else:

    @pytest_asyncio.fixture
    async def smtp_server_factory(
        request: pytest.FixtureRequest,
    ) -> AsyncIterator[SMTPServerFactory]:
        """Make and start SMTP test servers in the test's event loop; all of them are stopped
        at teardown.

        ``certificates`` defaults to the ``smtp_certificates`` fixture when ``tls`` is not
        ``"none"`` (that fixture, and so trustme, is only used then).
        """
        _refuse_sync_test(request)
        with _testing_extra():
            from quartmail.testing import SMTPTestServer

        servers: list[SMTPTestServer] = []

        async def make(**options: Any) -> SMTPTestServer:
            _with_certificates(request, options)
            server = SMTPTestServer(**options)
            await server.start()
            servers.append(server)
            return server

        try:
            yield make
        finally:
            # Newest first; every server is stopped even if stopping one fails.
            errors: list[BaseException] = []
            for server in reversed(servers):
                try:
                    await server.stop()
                except Exception as error:  # teardown must reach every server
                    errors.append(error)
            if errors:
                raise errors[0]

    @pytest_asyncio.fixture
    async def smtp_server(smtp_server_factory: SMTPServerFactory) -> SMTPTestServer:
        """A started plain SMTP test server (no TLS, no AUTH), stopped at teardown."""
        return await smtp_server_factory()


def _need_pytest_asyncio(fixture: str) -> None:
    pytest.fail(
        f"{fixture} is an async fixture and needs pytest-asyncio: pip install pytest-asyncio, "
        'and set asyncio_mode = "auto" in your pytest settings. In sync tests, use '
        f"threaded_{fixture} instead.",
        pytrace=False,
    )
