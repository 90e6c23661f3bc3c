"""Bad addresses and settings fail early, with our errors, naming what is wrong."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from quartmail import BadHeaderError, ConfigError, Message, MessageError
from quartmail.settings import MailSettings

SENDER = "sender@example.com"


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("sender", ("only one part",), "expected \\(name, address\\)"),
        ("sender", ("Name", 42), "expected \\(name, address\\)"),
        ("sender", "a@example.com, b@example.com", "expected one valid address"),
        ("sender", "Name <a@example.com", "invalid address|expected one valid address"),
        ("sender", ("Name", "no-at-sign"), "invalid address"),
        ("sender", ("Name", "two words@example.com"), "invalid address"),
        ("sender", ("Name", "a@exa mple.com"), "invalid address"),
        ("reply_to", "not an address", "reply_to"),
    ],
)
def test_a_bad_address_is_a_message_error_naming_the_field(
    field: str, value: Any, error: str
) -> None:
    fields: dict[str, Any] = {"sender": SENDER, field: value}
    message = Message("hi", recipients=["to@example.com"], body="x", **fields)
    with pytest.raises(MessageError, match=error) as caught:
        message.as_bytes()
    assert field in str(caught.value)


def test_recipients_set_to_a_bare_string_is_refused() -> None:
    # Iterating the string would send to each of its characters.
    message = Message("hi", sender=SENDER, body="x")
    message.recipients = "to@example.com"  # type: ignore[assignment]
    with pytest.raises(MessageError, match="must be a list of addresses, not a string"):
        message.as_bytes()


@pytest.mark.parametrize("value", ["Evil\r\nBcc: victim@example.com", ("Evil\nX: y", SENDER)])
def test_a_line_break_in_an_address_is_a_bad_header(value: Any) -> None:
    message = Message("hi", sender=value, recipients=["to@example.com"], body="x")
    with pytest.raises(BadHeaderError):
        message.as_bytes()


def read(**config: Any) -> MailSettings:
    return MailSettings.from_config(config, testing=False, debug=False)


def test_a_setting_of_the_wrong_type_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="MAIL_SERVER must be a string, got int"):
        read(MAIL_SERVER=25)


def test_a_ca_file_that_is_not_pem_is_a_config_error(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="MAIL_CA_FILE: cannot load"):
        read(MAIL_USE_TLS=True, MAIL_CA_FILE=str(ca_file))


@pytest.mark.parametrize(("value", "use_tls"), [(1, True), (" Yes ", True), ("off", False)])
def test_usual_spellings_of_a_flag_are_read(value: object, use_tls: bool) -> None:
    assert read(MAIL_USE_TLS=value).smtp.use_tls is use_tls


@pytest.mark.parametrize("value", [None, ""])
def test_unset_seconds_take_the_default(value: object) -> None:
    assert read(MAIL_TIMEOUT=value).smtp.timeout == 30.0


@pytest.mark.parametrize("value", [True, "nan", "inf"])
def test_seconds_must_be_a_finite_number(value: object) -> None:
    with pytest.raises(ConfigError, match="MAIL_TIMEOUT must be a number of seconds"):
        read(MAIL_TIMEOUT=value)


@pytest.mark.parametrize(
    ("server", "warned"),
    [("smtp.example.com", True), ("127.0.0.1", False), ("::1", False), ("localhost", False)],
)
def test_a_password_that_would_cross_the_network_unencrypted_is_warned_of(
    caplog: pytest.LogCaptureFixture, server: str, warned: bool
) -> None:
    with caplog.at_level(logging.WARNING, logger="quartmail"):
        read(MAIL_SERVER=server, MAIL_USERNAME="user", MAIL_PASSWORD="Secret-Pa55")
    assert ("unencrypted" in caplog.text) is warned
    assert "Secret-Pa55" not in caplog.text


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("a@[", "invalid address 'a@\\['"),  # the email package's parser fails on its own
        ('"', "invalid address"),
        ('"ab"@example.com', "write it as local@domain"),
        (42, "expected an address string, got int"),
    ],
)
def test_an_address_the_parser_cannot_read_is_a_message_error(value: Any, error: str) -> None:
    message = Message("hi", sender=value, recipients=["to@example.com"], body="x")
    with pytest.raises(MessageError, match=error) as caught:
        message.as_bytes()
    assert "sender" in str(caught.value)


def test_a_header_value_that_is_not_text_is_a_message_error() -> None:
    message = Message("hi", sender=SENDER, recipients=["to@example.com"], body="x")
    message.extra_headers = {"X-Count": 3}  # type: ignore[dict-item]
    with pytest.raises(MessageError, match=r"extra_headers\['X-Count'\] must be a string, got int"):
        message.as_bytes()


def test_a_mailbox_prints_as_flask_mail_shows_it() -> None:
    from quartmail.addresses import parse_address

    assert str(parse_address(("Ann Example", "ann@example.com"))) == "Ann Example <ann@example.com>"
    assert str(parse_address("ann@example.com")) == "ann@example.com"


@pytest.mark.parametrize("value", ["soon", [30]])
def test_seconds_that_are_not_a_number_name_the_setting(value: object) -> None:
    with pytest.raises(ConfigError, match="MAIL_TIMEOUT must be a number of seconds"):
        read(MAIL_TIMEOUT=value)


@pytest.mark.parametrize(
    ("content_type", "data", "error"),
    [
        ("multipart/mixed", b"x", "cannot be multipart"),
        ("image/png", "text", r"str data needs a text/\* content type"),
    ],
)
def test_an_attachment_the_message_cannot_carry_is_refused(
    content_type: str, data: Any, error: str
) -> None:
    message = Message("hi", sender=SENDER, recipients=["to@example.com"], body="x")
    message.attach("a.bin", content_type, data)
    with pytest.raises(MessageError, match=error):
        message.as_bytes()


def test_a_body_that_is_not_text_is_refused() -> None:
    message = Message("hi", sender=SENDER, recipients=["to@example.com"], body=42)  # type: ignore[arg-type]
    with pytest.raises(MessageError, match="body must be a string, got int"):
        message.as_bytes()
