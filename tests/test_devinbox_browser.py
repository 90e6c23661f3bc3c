"""The development inbox of a plain Quart app (tests/devinbox_app.py) in a real headless
Chromium, driven by Playwright, the app served by the real Hypercorn: send a mail, open it in
the inbox, and see its HTML rendered in the sandboxed frame, its inline image shown, its
script not run and its remote image and style sheet never requested.

Chromium is Debian's (/usr/bin/chromium), launched as in tests/test_browser.py; without it the
test is skipped.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from playwright.async_api import ConsoleMessage, async_playwright, expect
from test_browser import CHROMIUM, CHROMIUM_ARGS, STOP_TIMEOUT, TIMEOUT_MS, pytestmark

from conftest import serve_app

__all__ = ["pytestmark"]

SUBJECT = "Inbox in Chromium"


async def test_a_sent_mail_renders_in_the_sandboxed_frame(tmp_path: Path) -> None:
    async with (
        serve_app("tests.devinbox_app:create_app()", {}, tmp_path) as served,
        async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            console: list[str] = []

            def log(message: ConsoleMessage) -> None:
                console.append(message.text)

            page.on("console", log)

            await page.goto(f"{served.url}/send")
            await expect(page.locator("body")).to_have_text("sent")

            await page.goto(f"{served.url}/dev/inbox/")
            await page.get_by_role("link", name=SUBJECT).click()
            await expect(page.get_by_role("heading", level=1)).to_have_text(SUBJECT)
            await page.wait_for_load_state("load")  # the frame's document included

            frame = page.frame_locator("iframe[title='HTML part']")
            # Rendered, styled inline, and its script never ran.
            await expect(frame.locator("#greeting")).to_have_text("Hello from the inbox")
            await expect(frame.locator("#styled")).to_have_css("color", "rgb(0, 128, 0)")
            # The inline image (cid:) is shown, decoded: 7 x 5 pixels.
            logo = frame.locator("#logo")
            await expect(logo).to_have_js_property("complete", True)
            assert await logo.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [7, 5]
            await expect(page.locator("iframe[title='HTML part']")).to_have_attribute("sandbox", "")
            await expect(page.locator("pre")).to_have_text("Hi")
        finally:
            await browser.close()

        async with httpx.AsyncClient(base_url=served.url) as client:
            hits = (await client.get("/beacon-hits")).json()
        # Neither the image nor the style sheet was requested; Chromium says why.
        assert hits == {"hits": 0}
        assert any("Content Security Policy" in line for line in console), console

        served.terminate()
        assert await served.wait(STOP_TIMEOUT) == 0, served.stderr
    assert "Traceback" not in served.stderr, served.stderr
