"""Hypercorn worker processes: a SIGTERM never cuts a worker's mail drain short.

With ``workers >= 1`` Hypercorn 0.18's main process stops its workers through a shared
event and installs no SIGTERM handler in them. Once the first worker has finished its
shutdown, the main process sends SIGTERM to every other one, which by default kills it in
the middle of its drain; a process manager's SIGTERM to the whole group (systemd's
default) does the same. The shutdown is already under way by then, so in such a worker
SIGTERM means "keep draining", as Hypercorn already makes its workers ignore SIGINT. The
main process then waits for them (its interpreter exit joins its non-daemon children).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal

from quart import Quart

__all__ = ["keep_draining_on_sigterm"]

logger = logging.getLogger("quartmail.app")


def keep_draining_on_sigterm(app: Quart) -> None:
    """Make a Hypercorn worker process outlive a SIGTERM until it has drained its mail.

    Does nothing where the serving process handles SIGTERM itself (Hypercorn with
    ``workers = 0``, tests) or was not started by a parent process.
    """
    app.before_serving(_install_handler)


async def _install_handler() -> None:
    parent = multiprocessing.parent_process()
    # A SIGTERM left at its default action in a multiprocessing child: a worker whose
    # server stops it by other means (Hypercorn's shared shutdown event).
    if parent is None or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    loop = asyncio.get_running_loop()

    def on_sigterm() -> None:
        if parent.is_alive():
            logger.info("SIGTERM ignored: Hypercorn's main process stops its workers")
            return
        # An orphan (its main process was killed): a SIGTERM ends it, as before.
        loop.remove_signal_handler(signal.SIGTERM)  # back to the default action
        os.kill(os.getpid(), signal.SIGTERM)

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
