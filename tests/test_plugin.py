"""The pytest plugin as a user meets it: a user's test files, run by pytest in a subprocess
(pytester), with the documented settings: the docs' example, sync tests, the errors for
setup mistakes, a run without quartmail[testing] or pytest-asyncio, and pytest-xdist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

DOCS = Path(__file__).resolve().parent.parent / "docs" / "testing.md"

# The pytest settings docs/testing.md tells users to write.
SETTINGS = """
[tool.pytest.ini_options]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"
asyncio_default_test_loop_scope = "function"
filterwarnings = ["error"]
"""

# Each run is a fresh interpreter; on a busy machine it may take a while.
TIMEOUT = 300


def documented_files() -> dict[str, str]:
    """The files docs/testing.md shows: each python block that starts with ``# <file name>``."""
    blocks = re.findall(r"```python\n# (\S+\.py)\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    return dict(blocks)


# Makes {packages} unimportable in the user's run, as if they were not installed.
NOT_INSTALLED = """
import importlib.abc
import sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {packages!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=TIMEOUT)


def test_the_documented_settings_are_those_tested() -> None:
    assert SETTINGS.strip() in DOCS.read_text()


def test_the_documented_example_passes(pytester: pytest.Pytester) -> None:
    files = documented_files()
    assert set(files) == {"test_signup.py", "conftest.py", "test_shared.py"}
    pytester.makepyprojecttoml(SETTINGS)
    for name, source in files.items():
        pytester.makepyfile(**{name.removesuffix(".py"): source})
    result = run(pytester)
    result.assert_outcomes(passed=6)


def test_loop_bound_fixtures_in_a_sync_test_fail_at_once_and_say_why(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyprojecttoml(SETTINGS)
    pytester.makepyfile(
        """
        import smtplib

        def test_sync_with_the_loop_bound_server(smtp_server):
            with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=3):
                pass

        def test_sync_with_the_loop_bound_factory(smtp_server_factory):
            pass

        def test_sync_with_the_threaded_server(threaded_smtp_server_factory, smtp_certificates):
            server = threaded_smtp_server_factory(tls="implicit", auth=("u", "p"))
            context = smtp_certificates.client_context()
            with smtplib.SMTP_SSL(server.host, server.port, context=context) as smtp:
                smtp.login("u", "p")
                smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: s\\r\\n\\r\\nx\\r\\n")
            [message] = server.wait_for_messages(1)
            assert (message.subject, message.tls, message.login) == ("s", True, "u")
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=2)
    output = result.stdout.str()
    for fixture, test in [
        ("smtp_server", "test_sync_with_the_loop_bound_server"),
        ("smtp_server_factory", "test_sync_with_the_loop_bound_factory"),
    ]:
        assert (
            f"{fixture} serves SMTP in the test's event loop, which does not run during the "
            f"sync test {test}"
        ) in output
    assert "Use threaded_smtp_server (or threaded_smtp_server_factory)" in output
    # At once: the client never got as far as waiting for a greeting.
    assert "timed out" not in output.lower()


def test_without_pytest_asyncio_the_async_fixtures_say_what_to_install(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\nfilterwarnings = ["error"]\n')
    # Loaded with -p, before the plugins of installed packages: pytest-asyncio is not there.
    pytester.makepyfile(no_pytest_asyncio=NOT_INSTALLED.format(packages={"pytest_asyncio"}))
    pytester.makepyfile(
        """
        def test_loop_bound(smtp_server):
            pass

        def test_loop_bound_factory(smtp_server_factory):
            pass

        def test_threaded(threaded_smtp_server):
            assert threaded_smtp_server.is_serving
        """
    )
    result = run(pytester, "-p", "no_pytest_asyncio", "-p", "no:asyncio")
    result.assert_outcomes(passed=1, errors=2)
    for fixture in ("smtp_server", "smtp_server_factory"):
        assert (
            f"{fixture} is an async fixture and needs pytest-asyncio: pip install pytest-asyncio"
        ) in result.stdout.str()


def test_without_the_testing_extra_only_the_fixtures_fail(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml(SETTINGS)
    # Without quartmail[testing].
    pytester.makeconftest(NOT_INSTALLED.format(packages={"aiosmtpd", "trustme"}))
    pytester.makepyfile(
        """
        import sys

        import pytest

        def test_the_plugin_imported_neither():
            assert "quartmail.pytest_plugin" in sys.modules
            assert not {"aiosmtpd", "trustme", "quartmail.testing"} & set(sys.modules)

        async def test_loop_bound(smtp_server):
            pass

        def test_threaded(threaded_smtp_server):
            pass

        def test_certificates(smtp_certificates):
            pass

        def test_importing_the_server():
            with pytest.raises(ModuleNotFoundError, match="quartmail.testing"):
                import quartmail.testing
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=2, errors=3)
    message = (
        "The SMTP test server (quartmail.testing) needs aiosmtpd, which quartmail installs "
        "only with an extra: pip install 'quartmail[testing]'"
    )
    # Once per fixture, and nothing else: no traceback, no chained error.
    errors = result.stdout.str().split("= ERRORS =")[1].split("short test summary")[0]
    assert errors.count(message) == 3
    assert "Traceback" not in errors and "During handling" not in errors


def test_under_xdist(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml(SETTINGS)
    pytester.makepyfile(
        """
        import smtplib

        import aiosmtplib
        import pytest

        @pytest.mark.parametrize("tls", ["none", "starttls", "implicit"])
        async def test_loop_bound(smtp_server_factory, smtp_certificates, tls):
            server = await smtp_server_factory(tls=tls)
            await aiosmtplib.send(
                b"Subject: " + tls.encode() + b"\\r\\n\\r\\nx\\r\\n",
                sender="a@example.com",
                recipients=["b@example.com"],
                hostname="localhost",
                port=server.port,
                use_tls=tls == "implicit",
                start_tls=tls == "starttls",
                tls_context=smtp_certificates.client_context(),
                local_hostname="client.example.com",
            )
            [message] = await server.wait_for_messages(1)
            assert message.subject == tls

        @pytest.mark.parametrize("n", range(3))
        def test_threaded(threaded_smtp_server, n):
            with smtplib.SMTP(threaded_smtp_server.host, threaded_smtp_server.port) as smtp:
                smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: t\\r\\n\\r\\nx\\r\\n")
            assert threaded_smtp_server.wait_for_messages(1)[0].subject == "t"
        """
    )
    result = run(pytester, "-n", "2")
    result.assert_outcomes(passed=6)
    assert "2 workers" in result.stdout.str()
