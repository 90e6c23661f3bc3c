"""The public API is what quartmail.__all__ says, and it says it in order."""

from __future__ import annotations

import inspect

import quartmail


def test_all_is_sorted_and_names_every_public_member() -> None:
    public = {
        name
        for name, value in vars(quartmail).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert set(quartmail.__all__) == public
    assert list(quartmail.__all__) == sorted(quartmail.__all__)


def test_the_contract_names_are_exported() -> None:
    for name in (
        "Mail",
        "Message",
        "Attachment",
        "Connection",
        "BadHeaderError",
        "MailError",
        "email_dispatched",
        "email_failed",
    ):
        assert name in quartmail.__all__


def test_every_error_is_a_mail_error() -> None:
    errors = [getattr(quartmail, name) for name in quartmail.__all__ if name.endswith("Error")]
    assert len(errors) == 11
    for error in errors:
        assert issubclass(error, quartmail.MailError)
    assert issubclass(quartmail.BadHeaderError, ValueError)
    assert issubclass(quartmail.ConnectError, ConnectionError)
    assert issubclass(quartmail.SendTimeoutError, TimeoutError)
