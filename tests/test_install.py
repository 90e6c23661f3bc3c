"""``pip install quartmail`` is the extension alone: the optional packages of the
extras are neither needed nor imported, and a part whose extra is missing says
which extra to install.

Each check runs in a fresh interpreter in which the extras' packages cannot be
imported (a meta path finder refuses them), as in a virtualenv with a plain
``pip install quartmail``; .ci/run also checks such a virtualenv for real.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap

import pytest

from quartmail._extras import OPTIONAL_PACKAGES
from quartmail.testing import SMTPTestServer

# Prepended to every script: the extras' packages are not installed.
_WITHOUT_EXTRAS = f"""
import importlib.abc, sys

class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {sorted(OPTIONAL_PACKAGES)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""


async def _run(script: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WITHOUT_EXTRAS + textwrap.dedent(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_the_extension_sends_without_any_extra(smtp_server: SMTPTestServer) -> None:
    code, stdout, stderr = await _run(
        f"""
        import asyncio
        from quart import Quart
        from quartmail import Mail, Message

        async def main():
            app = Quart("slim")
            app.config.update(MAIL_SERVER="127.0.0.1", MAIL_PORT={smtp_server.port})
            mail = Mail(app)
            async with app.app_context():
                await mail.send(Message("Slim", sender="a@example.com",
                                        recipients=["b@example.com"], body="hello"))
            loaded = sorted({{name.partition(".")[0] for name in sys.modules}}
                            & set({sorted(OPTIONAL_PACKAGES)!r}))
            print("loaded:", loaded)

        asyncio.run(main())
        """
    )
    assert code == 0, stderr
    assert "loaded: []" in stdout
    [received] = await smtp_server.wait_for_messages(1)
    assert received.parsed()["Subject"] == "Slim"


@pytest.mark.parametrize(
    ("module", "extra"),
    [
        ("quartmail.outbox", "outbox"),
        ("quartmail.app", "app"),
        ("quartmail.dkim", "dkim"),
        ("quartmail.metrics", "metrics"),
    ],
)
async def test_a_part_without_its_extra_names_the_extra(module: str, extra: str) -> None:
    code, _, stderr = await _run(f"import {module}")
    assert code == 1
    assert f"pip install 'quartmail[{extra}]'" in stderr
    assert stderr.rstrip().splitlines()[-1].startswith("ModuleNotFoundError: ")


async def test_the_outbox_of_mail_names_its_extra() -> None:
    code, _, stderr = await _run(
        """
        from quart import Quart
        from quartmail import Mail

        app = Quart("slim")
        Mail(app).init_outbox(app, engine=None)
        """
    )
    assert code == 1
    assert "pip install 'quartmail[outbox]'" in stderr


@pytest.mark.parametrize("setting", ["MAIL_METRICS", "MAIL_TRACING"])
async def test_metrics_and_traces_name_their_extra(setting: str) -> None:
    code, _, stderr = await _run(
        f"""
        from quart import Quart
        from quartmail import Mail

        app = Quart("slim")
        app.config["{setting}"] = True
        Mail(app)
        """
    )
    assert code == 1
    assert "pip install 'quartmail[metrics]'" in stderr
