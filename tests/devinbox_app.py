"""A minimal Quart app with the development inbox on, served by Hypercorn in
tests/test_devinbox_browser.py. ``GET /send`` sends one mail whose HTML shows an inline image
and tries to run a script and to load an image and a style sheet from the app;
``/beacon-hits`` counts those loads."""

from __future__ import annotations

import struct
import zlib

from quart import Quart

from quartmail import Mail, Message

HTML = """\
<link rel="stylesheet" href="/beacon.css">
<h1 id="greeting">Hello from the inbox</h1>
<script>document.getElementById("greeting").textContent = "scripted";</script>
<img src="/beacon.png" alt="beacon">
<p id="styled" style="color: rgb(0, 128, 0)">Styled inline</p>
<img id="logo" src="cid:logo@example.com" alt="logo">
"""


def png(width: int, height: int) -> bytes:
    """A valid grey PNG of *width* x *height* pixels."""
    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def create_app() -> Quart:
    """The app, in debug mode, its mail caught by MAIL_DEV_INBOX."""
    app = Quart(__name__)
    app.config.update(
        DEBUG=True,
        MAIL_DEV_INBOX=True,
        MAIL_DEFAULT_SENDER="App <app@example.com>",
        MAIL_DEBUG=False,
    )
    mail = Mail(app)
    hits: list[str] = []

    @app.get("/send")
    async def send() -> str:
        message = Message(
            "Inbox in Chromium", recipients=["reader@example.com"], body="Hi", html=HTML
        )
        # An inline image the HTML shows by its Content-ID.
        message.attach(
            "logo.png", "image/png", png(7, 5), "inline", {"Content-ID": "<logo@example.com>"}
        )
        await mail.send(message)
        return "sent"

    @app.get("/beacon.png")
    @app.get("/beacon.css")
    async def beacon() -> tuple[str, int]:
        hits.append("hit")
        return "", 204

    @app.get("/beacon-hits")
    async def beacon_hits() -> dict[str, int]:
        return {"hits": len(hits)}

    return app
