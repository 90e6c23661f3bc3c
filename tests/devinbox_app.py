"""A minimal Quart app with the development inbox on, served by Hypercorn in
tests/test_devinbox_browser.py: ``GET /send`` sends one mail whose HTML tries to run a script
and to load an image and a style sheet from the app; ``/beacon-hits`` counts those loads."""

from __future__ import annotations

from quart import Quart

from quartmail import Mail, Message

HTML = """\
<link rel="stylesheet" href="/beacon.css">
<h1 id="greeting">Hello from the inbox</h1>
<script>document.getElementById("greeting").textContent = "scripted";</script>
<img src="/beacon.png" alt="beacon">
<p id="styled" style="color: rgb(0, 128, 0)">Styled inline</p>
"""


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
        await mail.send(
            Message("Inbox in Chromium", recipients=["reader@example.com"], body="Hi", html=HTML)
        )
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
