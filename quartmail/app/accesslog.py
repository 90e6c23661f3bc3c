"""Hypercorn's access log, the same lines for less CPU: the launcher's ``logger_class``.

For every request Hypercorn 0.18 builds a dict of everything a log line may show (its
"atoms": ``%(h)s``, ``%(r)s``, ``%({User-Agent}i)s`` ...), and copies every environment
variable into it for the ``%({NAME}e)s`` atom, whether the format shows one or not: about
2 µs per variable, most of the cost of the line (hypercorn#359 questions the atom). Its
``Logger.atoms`` is the documented place to build them otherwise; here the environment is
read only for an ``e`` atom the format names.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from http import HTTPStatus

from hypercorn import logging as hypercorn_logging
from hypercorn.typing import ResponseSummary, WWWScope

__all__ = ["AccessLogAtoms", "AccessLogger"]

# HTTPStatus(code).phrase is an Enum call per line: looked up here instead.
_PHRASES = {status.value: status.phrase for status in HTTPStatus}


class AccessLogger(hypercorn_logging.Logger):
    """Hypercorn's logger, its access-log atoms from :class:`AccessLogAtoms`."""

    def atoms(
        self, request: WWWScope, response: ResponseSummary | None, request_time: float
    ) -> Mapping[str, str]:
        return AccessLogAtoms(request, response, request_time)


class AccessLogAtoms(hypercorn_logging.AccessLogAtoms):
    """Hypercorn's atoms (its ``__getitem__``: headers by any case, ``-`` for what is
    missing), the environment looked up when asked for; tests/test_accesslog.py checks
    every atom against Hypercorn's."""

    def __init__(
        self, request: WWWScope, response: ResponseSummary | None, request_time: float
    ) -> None:
        # As hypercorn.logging.AccessLogAtoms.__init__ (0.18), less its loop over os.environ.
        for name, value in request["headers"]:
            self[f"{{{name.decode('latin1').lower()}}}i"] = value.decode("latin1")
        protocol = request.get("http_version", "ws")
        client = request.get("client")
        if client is None:
            remote_addr = None
        elif len(client) == 2:
            remote_addr = f"{client[0]}:{client[1]}"
        elif len(client) == 1:
            remote_addr = client[0]
        else:
            remote_addr = f"<???{client}???>"
        method = request["method"] if request["type"] == "http" else "GET"
        query_string = request["query_string"].decode()
        path_with_qs = request["path"] + ("?" + query_string if query_string else "")
        status_code = status_phrase = "-"
        if response is not None:
            for name, value in response.get("headers", []):
                self[f"{{{name.decode('latin1').lower()}}}o"] = value.decode("latin1")
            status_code = str(response["status"])
            status_phrase = _PHRASES.get(response["status"], f"<???{status_code}???>")
        self.update(
            {
                "h": remote_addr,
                "l": "-",
                "t": time.strftime("[%d/%b/%Y:%H:%M:%S %z]"),
                "r": f"{method} {request['path']} {protocol}",
                "R": f"{method} {path_with_qs} {protocol}",
                "s": status_code,
                "st": status_phrase,
                "S": request["scheme"],
                "m": method,
                "U": request["path"],
                "Uq": path_with_qs,
                "q": query_string,
                "H": protocol,
                "b": self.get("{content-length}o", "-"),
                "B": self.get("{content-length}o", "-"),
                "f": self.get("{referer}i", "-"),
                "a": self.get("{user-agent}i", "-"),
                "T": int(request_time),
                "D": int(request_time * 1_000_000),
                "L": f"{request_time:.6f}",
                "p": f"<{os.getpid()}>",
            }
        )

    def __getitem__(self, key: str) -> str:
        try:  # an atom as the format names it ("h", "r", ...): at once
            value: str = dict.__getitem__(self, key)
            return value
        except KeyError:
            pass
        # Hypercorn lower-cases a {...} key, and keys the environment by lower-cased
        # name, the last one winning.
        if key.startswith("{") and key.lower().endswith("}e"):
            wanted = key[1:-2].lower()
            found = [value for name, value in os.environ.items() if name.lower() == wanted]
            return found[-1] if found else "-"
        found_atom: str = super().__getitem__(key)
        return found_atom
