"""``python -m quartmail.app``: the sign-up app on every core, under Hypercorn's own run loop.

Hypercorn starts, watches and stops the workers (``hypercorn.run.run``); this module only
completes its Config and reads one thing it loses. With worker processes, Hypercorn 0.18
exits 0 when a worker fails to start (hypercorn#269: its main process overwrites the
worker's exit code with the others'). So each worker runs the app behind a thin ASGI
wrapper that records a failed start in a file the launcher names in the environment, and
the launcher exits 1 when the file is there.

The launcher also loads the app once before any worker starts: a bad setting fails at once
(exit 1, the error on stderr), and it learns whether the app's development inbox is on. The
inbox lives in the process that caught the mail, so the app is then served from this one
process (Hypercorn's ``workers = 0``).

Two settings it completes cost less CPU per request: uvloop's event loop, when installed and
no ``worker_class`` is chosen, and an access log that writes Hypercorn's lines without
copying the environment for each (:mod:`quartmail.app.accesslog`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.logging import Logger
from hypercorn.run import run
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope
from hypercorn.utils import load_application
from quart import Quart

from .accesslog import AccessLogger

__all__ = ["FailedStartRecorder", "hypercorn_config", "main", "worker_app"]

DEFAULT_APPLICATION = "quartmail.app:create_app()"
# What the launcher tells its workers (spawned processes inherit the environment).
APPLICATION_VARIABLE = "QUARTMAIL_APPLICATION"
FAILED_START_VARIABLE = "QUARTMAIL_FAILED_START_FILE"
# Hypercorn loads this in every worker: "asgi:" skips its ASGI-or-WSGI guess.
WORKER_APPLICATION = "asgi:quartmail.app.launcher:worker_app()"


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the app with Hypercorn, one worker per core; return the exit code."""
    args = _parser().parse_args(argv)
    config = hypercorn_config(args)
    try:
        app = _load(args.application)
    except Exception:
        traceback.print_exc()
        print(f"quartmail.app: {args.application} failed to load", file=sys.stderr)
        return 1
    dev_inbox = _close_dev_inbox(app)
    del app  # each worker makes its own

    if args.workers is None:
        config.workers = 0 if dev_inbox else os.cpu_count() or 1
    elif dev_inbox and args.workers > 1:
        print(
            "quartmail.app: the development inbox (MAIL_DEV_INBOX) keeps its mail in the "
            "process that caught it: serve it with --workers 0 or 1, or set MAIL_SERVER",
            file=sys.stderr,
        )
        return 2
    else:
        config.workers = args.workers

    with tempfile.TemporaryDirectory(prefix="quartmail-") as directory:
        failed = Path(directory, "failed-start")
        os.environ[APPLICATION_VARIABLE] = args.application
        os.environ[FAILED_START_VARIABLE] = str(failed)
        config.application_path = WORKER_APPLICATION
        exitcode = run(config)
        if exitcode == 0 and failed.exists():
            print("quartmail.app: a worker failed to start (its error is above)", file=sys.stderr)
            exitcode = 1
    return exitcode


def hypercorn_config(args: argparse.Namespace) -> Config:
    """Hypercorn's Config from the launcher's arguments (``config``, ``bind``,
    ``worker_class``): the TOML file's settings, then the command line's; :func:`main`
    sets the ``workers``."""
    config = Config.from_toml(args.config) if args.config else Config()
    if args.bind:
        config.bind = args.bind
    if args.worker_class:
        config.worker_class = args.worker_class
    elif "worker_class" not in vars(config) and importlib.util.find_spec("uvloop") is not None:
        # Not chosen (by -k or the TOML file): uvloop's event loop when it is installed (the
        # uvloop extra), for less CPU per request than asyncio's (docs/app.md has figures).
        config.worker_class = "uvloop"
    if config.logger_class is Logger and config.statsd_host is None:
        # The same access log, without a copy of the environment per request.
        config.logger_class = AccessLogger
    return config


def worker_app() -> ASGIFramework:
    """The app as a worker serves it (Hypercorn calls this in each worker process)."""
    failed = Path(os.environ[FAILED_START_VARIABLE])
    try:
        app = _load(os.environ[APPLICATION_VARIABLE])
    except Exception:
        _record_failed_start(failed)
        raise
    return FailedStartRecorder(app, failed)


class FailedStartRecorder:
    """An ASGI app that passes everything to *app*, and records in *failed* (a file) that
    its lifespan start-up failed."""

    def __init__(self, app: ASGIFramework, failed: Path) -> None:
        self.app = app
        self.failed = failed

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message: dict[str, object]) -> None:
            nonlocal started
            if message["type"] == "lifespan.startup.complete":
                started = True
            elif message["type"] == "lifespan.startup.failed":
                _record_failed_start(self.failed)
            await send(message)  # type: ignore[arg-type]

        try:
            await self.app(scope, receive, watch)  # type: ignore[arg-type]
        except Exception:
            if not started:  # an app that raises instead of sending startup.failed
                _record_failed_start(self.failed)
            raise


def _load(application: str) -> ASGIFramework:
    """The ASGI app that *application* (``module:expression``) names, loaded as Hypercorn does."""
    wrapper = load_application(application, 0)
    if not isinstance(wrapper, ASGIWrapper):
        raise TypeError(f"{application} is not an ASGI app")
    return wrapper.app


def _record_failed_start(failed: Path) -> None:
    # Appended, one line per worker: the launcher only checks that the file exists.
    with failed.open("a") as file:
        file.write(f"{os.getpid()}\n")


def _close_dev_inbox(app: object) -> bool:
    """Whether *app* runs a development inbox; its socket is released (never served here)."""
    if not isinstance(app, Quart):
        return False
    try:
        from quartmail.devinbox import DevInbox
    except ImportError:  # no testing extra: no inbox either
        return False
    try:
        inbox = DevInbox.of(app)
    except LookupError:
        return False
    inbox.close()
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m quartmail.app",
        description="Serve the sign-up app with Hypercorn, one worker process per core "
        "(one process when the development inbox is on). Other settings: the TOML file.",
    )
    parser.add_argument(
        "application",
        nargs="?",
        default=DEFAULT_APPLICATION,
        help=f"the app, as Hypercorn takes it (default: {DEFAULT_APPLICATION})",
    )
    parser.add_argument(
        "-c", "--config", help="Hypercorn's TOML configuration (its workers setting is ignored)"
    )
    parser.add_argument("-b", "--bind", action="append", help="address to listen on (repeatable)")
    parser.add_argument(
        "-w",
        "--workers",
        type=int,
        help="worker processes (default: one per core; 0 serves from this process)",
    )
    parser.add_argument(
        "-k",
        "--worker-class",
        help="asyncio or uvloop (default: the TOML file's, else uvloop when installed)",
    )
    return parser
