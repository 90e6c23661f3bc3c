"""pytest fixtures for testing apps that send mail with quartmail (registered as ``quartmail``).

Fixtures:

- ``smtp_certificates`` (session): a throwaway CA and server certificate
  (:class:`quartmail.testing.TLSCertificates`), made once per test run.
- ``smtp_server_factory`` (function, async): ``await make(**kwargs)`` makes and starts an
  :class:`quartmail.testing.SMTPTestServer`, passing ``certificates=smtp_certificates`` when TLS
  is asked for; every server it made is stopped at teardown.
- ``smtp_server`` (function, async): a started plain server (no TLS, no AUTH).

The async fixtures need pytest-asyncio; without it they are not defined. Loading the plugin
imports nothing heavy: quartmail.testing (aiosmtpd) and trustme are imported by the fixtures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from quartmail.testing import SMTPServerFactory, SMTPTestServer, TLSCertificates

__all__ = ["smtp_certificates", "smtp_server", "smtp_server_factory"]


@pytest.fixture(scope="session")
def smtp_certificates(tmp_path_factory: pytest.TempPathFactory) -> TLSCertificates:
    """A CA and a server certificate for localhost / 127.0.0.1 / ::1, shared by the session."""
    from quartmail.testing import TLSCertificates

    return TLSCertificates.create(tmp_path_factory.mktemp("smtp-tls"))


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the async fixtures need pytest-asyncio
    pass
else:

    @pytest_asyncio.fixture
    async def smtp_server_factory(
        request: pytest.FixtureRequest,
    ) -> AsyncIterator[SMTPServerFactory]:
        """Make and start SMTP test servers; all of them are stopped at teardown.

        ``certificates`` defaults to the ``smtp_certificates`` fixture when ``tls`` is not
        ``"none"`` (that fixture, and so trustme, is only used then).
        """
        from quartmail.testing import SMTPTestServer

        servers: list[SMTPTestServer] = []

        async def make(**kwargs: Any) -> SMTPTestServer:
            if kwargs.get("tls", "none") != "none" and kwargs.get("certificates") is None:
                kwargs["certificates"] = request.getfixturevalue("smtp_certificates")
            server = SMTPTestServer(**kwargs)
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
