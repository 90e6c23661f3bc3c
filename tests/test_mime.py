"""The direct MIME writer (quartmail.mime) against the email package's parser:
whatever a user puts in a subject, a name or a body comes back exactly, in
bytes that follow the wire rules.

These check the flattened bytes without a server; test_wire.py checks the
same rules on what an SMTP server received.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from datetime import UTC, datetime, timedelta, timezone
from email.header import decode_header, make_header
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quartmail import Message, MessageError, mime

# Any text but line breaks (those are header injection, refused elsewhere:
# CR, LF and every other character str.splitlines() breaks at).
# Any text UTF-8 can carry (lone surrogates cannot: see the last test).
LINE_BREAKS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
header_text = st.text(st.characters(codec="utf-8", exclude_characters=LINE_BREAKS), max_size=200)
body_text = st.text(st.characters(codec="utf-8"), max_size=2000)


def parse(data: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def as_read(text: str) -> str:
    """A body as a reader gets it: its lines, then one line break (as the
    email package writes it; an empty body is one empty line)."""
    return "\n".join(line.decode("utf-8") for line in text.encode("utf-8").splitlines()) + "\n"


def display_name(data: bytes, header: str) -> str:
    """The display name in *header*, decoded as RFC 2047 says.

    The email package's address parser keeps the white space between two
    encoded-words of a phrase, which RFC 2047 (6.2) says to drop, so a long
    encoded name is decoded here with decode_header, which follows the RFC.
    """
    raw = email.message_from_bytes(data, policy=email.policy.compat32)[header]
    unfolded = re.sub(r"\r?\n[ \t]", " ", str(raw))
    if "=?" not in unfolded:
        [address] = parse(data)[header].addresses
        return str(address.display_name)
    phrase = unfolded.rpartition(" <")[0]
    return str(make_header(decode_header(phrase)))


def assert_wire_rules(data: bytes) -> None:
    headers, _, _ = data.partition(b"\r\n\r\n")
    assert headers.isascii()
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    assert b"\r" not in data.replace(b"\r\n", b"")


@settings(max_examples=300, deadline=None)
@given(subject=header_text, name=header_text)
def test_any_subject_and_display_name_round_trip(subject: str, name: str) -> None:
    message = Message(
        subject, sender=(name, "sender@example.com"), recipients=["to@example.com"], body="x"
    )
    data = message.envelope().data
    assert_wire_rules(data)
    parsed = parse(data)
    # Readers drop the blanks around a header's value (RFC 5322 unfolding),
    # whoever wrote it; everything within comes back exactly.
    # An empty subject has no Subject header at all (as in Flask-Mail).
    assert (parsed["Subject"] or "").strip() == subject.strip()
    assert ("Subject" in parsed) == (subject != "")
    assert parsed["From"].addresses[0].addr_spec == "sender@example.com"
    assert display_name(data, "From") == name.strip()
    # An encoded subject is folded within 78 columns.
    subject_lines = re.search(rb"^Subject:.*?\r\n(?! )", data, re.M | re.S)
    if subject_lines is not None and b"=?utf-8?" in subject_lines.group():
        assert all(len(line) <= 78 for line in subject_lines.group().split(b"\r\n"))


@settings(max_examples=300, deadline=None)
@given(body=body_text, html=body_text)
def test_any_body_round_trips_with_a_7bit_safe_encoding(body: str, html: str) -> None:
    data = (
        Message("s", sender="a@example.com", recipients=["b@example.com"], body=body, html=html)
        .envelope()
        .data
    )
    assert_wire_rules(data)
    parsed = parse(data)
    assert parsed.get_content_type() == "multipart/alternative"
    text_part, html_part = parsed.iter_parts()
    for part, original in ((text_part, body), (html_part, html)):
        cte = part["Content-Transfer-Encoding"]
        assert cte in {"7bit", "quoted-printable", "base64"}
        if cte == "7bit":
            raw = part.get_payload(decode=False)
            assert isinstance(raw, str) and raw.isascii()
        assert part.get_content().replace("\r\n", "\n") == as_read(original)


@settings(max_examples=100, deadline=None)
@given(names=st.lists(header_text, min_size=1, max_size=12))
def test_many_recipients_with_any_names_round_trip(names: list[str]) -> None:
    recipients = [(name, f"user{n}@example.com") for n, name in enumerate(names)]
    message = Message("s", sender="a@example.com", recipients=recipients, body="x")
    data = message.envelope().data
    assert_wire_rules(data)
    addresses = [a.addr_spec for a in parse(data)["To"].addresses]
    assert addresses == [address for _, address in recipients]
    for name, address in recipients:
        alone = Message("s", sender="a@example.com", recipients=[(name, address)], body="x")
        assert display_name(alone.envelope().data, "To") == name.strip()


def test_the_common_message_and_the_email_package_agree() -> None:
    """The fast path and the email package (taken for a non-UTF-8 charset
    name that means the same) give messages that parse the same."""
    kwargs = dict(
        subject="Grüße aus Köln: an einem schönen Tag schreiben wir eine längere Betreffzeile",
        sender=("Jörg Müller", "joerg@example.com"),
        recipients=["Anna <anna@example.com>", ("李雷", "li@example.com")],
        cc=["cc@example.com"],
        reply_to="help@example.com",
        body="Hallo,\nwie geht's? " + "lang " * 40 + "\n",
        html="<p>Hallo, <b>wie geht's?</b></p>",
        extra_headers={"X-Mailer": "quartmail"},
        date=1_700_000_000,
    )
    fast = parse(Message(**kwargs, charset="utf-8").envelope().data)  # type: ignore[arg-type]
    slow = parse(Message(**kwargs, charset="UTF8").envelope().data)  # type: ignore[arg-type]
    for name in ("From", "To", "Cc", "Reply-To", "Subject", "Date", "X-Mailer", "MIME-Version"):
        assert fast[name] == slow[name], name
    for fast_part, slow_part in zip(fast.iter_parts(), slow.iter_parts(), strict=True):
        assert fast_part.get_content_type() == slow_part.get_content_type()
        assert fast_part.get_content().replace("\r\n", "\n") == slow_part.get_content().replace(
            "\r\n", "\n"
        )


@given(
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(9999, 12, 31)),
    st.one_of(
        st.just(UTC),
        st.builds(
            timezone,
            st.timedeltas(
                min_value=timedelta(hours=-23, minutes=-59),
                max_value=timedelta(hours=23, minutes=59),
            ),
        ),
    ),
)
def test_the_date_is_written_as_the_email_package_writes_it(
    naive: datetime, zone: timezone
) -> None:
    value = naive.replace(tzinfo=zone)
    assert mime.date(value) == email.utils.format_datetime(value)


@pytest.mark.parametrize("field", ["subject", "body", "html"])
def test_text_that_utf8_cannot_carry_is_a_message_error(field: str) -> None:
    kwargs: dict[str, Any] = {"subject": "s", "body": "b", field: "lone \ud800 surrogate"}
    message = Message(sender="a@example.com", recipients=["b@example.com"], **kwargs)
    with pytest.raises(MessageError, match=field):
        message.envelope()


def test_a_name_that_utf8_cannot_carry_is_a_message_error() -> None:
    message = Message("s", sender=("\udc80", "a@example.com"), recipients=["b@example.com"])
    with pytest.raises(MessageError, match="sender"):
        message.envelope()
