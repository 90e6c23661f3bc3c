"""Optional parts of quartmail and the extra that installs each.

``pip install quartmail`` is the extension alone (Quart, aiosmtplib, blinker).
A module that needs more imports its optional packages in a ``try`` and turns
a missing one into an error that says which extra to install, as httpx does
for ``httpx[http2]``::

    try:
        from sqlalchemy import select
    except ModuleNotFoundError as error:
        raise missing_extra(error, "outbox", "The durable outbox") from None
"""

from __future__ import annotations

__all__ = ["OPTIONAL_PACKAGES", "missing_extra"]

#: The import names of every package an extra adds.
OPTIONAL_PACKAGES = frozenset(
    {
        "sqlalchemy",
        "alembic",
        "asyncpg",
        "aiosqlite",
        "aiosmtpd",
        "trustme",
        "quart_schema",
        "pydantic",
        "dkim",
        "nacl",
        "cryptography",
        "dns",
        "prometheus_client",
        "opentelemetry",
    }
)


def missing_extra(error: ModuleNotFoundError, extra: str, part: str) -> ModuleNotFoundError:
    """The error to raise when importing *part* failed with *error*.

    A missing optional package becomes an error that names ``quartmail[extra]``;
    any other missing module (a bug, not an extra) is returned as it is.
    """
    package = (error.name or "").partition(".")[0]
    if package not in OPTIONAL_PACKAGES:
        return error
    return ModuleNotFoundError(
        f"{part} needs {package}, which quartmail installs only with an extra: "
        f"pip install 'quartmail[{extra}]'",
        name=error.name,
    )
