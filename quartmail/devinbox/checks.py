"""What a sender should fix before production, found in one caught message.

Each check reads the message as it crossed the wire and names what a receiving system or a
reader would do with it. They are warnings, not errors: the inbox shows them beside the mail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import EmailMessage

__all__ = ["GMAIL_CLIP_BYTES", "MAX_LINE_OCTETS", "InboxWarning", "check"]

#: Gmail shows "[Message clipped]" and hides the rest of an HTML body larger than this.
GMAIL_CLIP_BYTES = 102 * 1024
#: RFC 5322, 2.1.1: a line MUST be at most 998 characters, not counting its CRLF (RFC 5321,
#: 4.5.3.1.6: 1000 octets with it). Servers may reject or break longer lines.
MAX_LINE_OCTETS = 998
#: Envelope recipients from which one message looks like a mailing to a list.
BULK_RECIPIENTS = 10

_BULK_PRECEDENCE = {"bulk", "list", "junk"}
_UNSUBSCRIBE_WORD = re.compile(r"unsubscribe", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class InboxWarning:
    """One finding: a stable ``code`` (for tests) and a sentence for the sender."""

    code: str
    message: str


def check(
    data: bytes,
    message: EmailMessage,
    *,
    text: str | None,
    html: str | None,
    recipients: int,
) -> list[InboxWarning]:
    """The warnings for a message: its bytes as received, the parsed *message*, its text
    and HTML bodies (None when missing) and its number of envelope recipients."""
    found: list[InboxWarning] = []
    if text is None:
        found.append(
            InboxWarning(
                "no-text-part",
                "No text/plain part: text-only clients show nothing, and spam filters score "
                "HTML-only mail higher. Set Message.body as well as Message.html.",
            )
        )
    if html is not None:
        size = len(html.encode("utf-8"))
        if size > GMAIL_CLIP_BYTES:
            found.append(
                InboxWarning(
                    "html-clipped",
                    f"The HTML body is {size / 1024:.0f} KB: Gmail clips HTML over 102 KB and "
                    "hides the rest (footer and unsubscribe link included) behind a link.",
                )
            )
    found += _unsubscribe(message, text, html, recipients)
    # RFC 5322, 3.6: Date exactly once; Message-ID at most once, and it SHOULD be present.
    names = [name.lower() for name in message]
    for header in ("Message-ID", "Date"):
        count = names.count(header.lower())
        if count == 0:
            found.append(
                InboxWarning(
                    f"{header.lower()}-missing",
                    f"No {header} header: some servers add one, others reject or score the "
                    "mail as spam (RFC 5322, 3.6).",
                )
            )
        elif count > 1:
            found.append(
                InboxWarning(
                    f"{header.lower()}-duplicated",
                    f"{count} {header} headers: RFC 5322 (3.6) allows one; receivers reject "
                    "or mis-thread such mail. Set it once (extra_headers replaces, never adds).",
                )
            )
    long_lines = [
        number
        for number, line in enumerate(data.split(b"\n"), start=1)
        if len(line.removesuffix(b"\r")) > MAX_LINE_OCTETS
    ]
    if long_lines:
        found.append(
            InboxWarning(
                "long-lines",
                f"{len(long_lines)} line(s) over {MAX_LINE_OCTETS} octets (the first is line "
                f"{long_lines[0]} of the source): RFC 5322 (2.1.1) forbids them, and servers "
                "reject or break them. Encode the part (quoted-printable or base64).",
            )
        )
    return found


def _unsubscribe(
    message: EmailMessage, text: str | None, html: str | None, recipients: int
) -> list[InboxWarning]:
    has_list_unsubscribe = "List-Unsubscribe" in message
    if has_list_unsubscribe:
        # RFC 8058: an https List-Unsubscribe needs List-Unsubscribe-Post for one click,
        # which Gmail and Yahoo require of bulk senders since 2024.
        raw = str(message.get("List-Unsubscribe", ""))
        if "https:" in raw.lower() and "List-Unsubscribe-Post" not in message:
            return [
                InboxWarning(
                    "no-one-click-unsubscribe",
                    "List-Unsubscribe has an https URL but no List-Unsubscribe-Post: "
                    "List-Unsubscribe=One-Click header (RFC 8058), which Gmail and Yahoo "
                    "require of bulk senders.",
                )
            ]
        return []
    reasons = []
    precedence = str(message.get("Precedence", "")).strip().lower()
    if precedence in _BULK_PRECEDENCE:
        reasons.append(f"Precedence: {precedence}")
    if "List-Id" in message:
        reasons.append("a List-Id header")
    if recipients >= BULK_RECIPIENTS:
        reasons.append(f"{recipients} recipients")
    if any(body is not None and _UNSUBSCRIBE_WORD.search(body) for body in (text, html)):
        reasons.append('"unsubscribe" in the body')
    if not reasons:
        return []
    return [
        InboxWarning(
            "no-list-unsubscribe",
            f"This looks like bulk mail ({', '.join(reasons)}) but has no List-Unsubscribe "
            "header: Gmail and Yahoo require List-Unsubscribe and List-Unsubscribe-Post "
            "(RFC 8058) of bulk senders (see quartmail.unsubscribe).",
        )
    ]
